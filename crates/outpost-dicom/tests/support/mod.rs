//! Shared helpers for the peer tests: sample files from pydicom, a file-backed
//! `InstanceStore`, an SCP started on a free loopback port, dcmtk processes and log capture.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use outpost_dicom::{
    read_part10_meta, IncomingInstance, InstanceAttributes, InstanceStore, InstanceWriter,
    Part10Meta, ScpConfig, StoreStatus,
};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Whether peer tests must be skipped; prints why.
pub fn peers_skipped(test: &str) -> bool {
    if std::env::var("OUTPOST_PEERS").as_deref() == Ok("skip") {
        println!("skipping {test}: OUTPOST_PEERS=skip");
        return true;
    }
    if !Path::new("/usr/bin/storescp").exists() {
        println!("skipping {test}: /usr/bin/storescp is missing (install dcmtk)");
        return true;
    }
    false
}

/// A sample file from pydicom's bundled test data.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub meta: Part10Meta,
    /// The storescu option that makes it propose this file's transfer syntax.
    pub storescu_option: &'static str,
}

impl Sample {
    pub fn dataset(&self) -> Vec<u8> {
        dataset_bytes(&self.path)
    }
}

/// CT (explicit LE), MR (explicit and implicit LE), JPEG baseline, RLE and JPEG 2000.
pub fn samples() -> Vec<Sample> {
    static SAMPLES: OnceLock<Vec<Sample>> = OnceLock::new();
    SAMPLES
        .get_or_init(|| {
            let names = [
                ("CT_small.dcm", "-x="),
                ("MR_small.dcm", "-x="),
                ("MR_small_implicit.dcm", "-xi"),
                ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),
                ("SC_rgb_rle.dcm", "-xr"),
                ("JPEG2000.dcm", "-xw"),
            ];
            // MR_small_implicit shares its SOP Instance UID with MR_small; a copy with its own
            // UID keeps instances distinguishable at the receiver.
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("outpost-dicom-samples");
            std::fs::create_dir_all(&dir).unwrap();
            let script = format!(
                "import os, pydicom\n\
                 from pydicom.data import get_testdata_file as g\n\
                 for n in {names:?}:\n\
                 \x20   p = g(n)\n\
                 \x20   if n == 'MR_small_implicit.dcm':\n\
                 \x20       d = pydicom.dcmread(p)\n\
                 \x20       d.SOPInstanceUID = d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID + '.99'\n\
                 \x20       p = os.path.join({dir:?}, n)\n\
                 \x20       d.save_as(p, enforce_file_format=True)\n\
                 \x20   print(p)",
                names = names.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                dir = dir.display().to_string(),
            );
            let out = std::process::Command::new(python())
                .args(["-c", &script])
                .output()
                .expect("python3 with pydicom (pip install pydicom==3.0.2)");
            assert!(
                out.status.success(),
                "python3 -c {script:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .zip(names)
                .map(|(path, (_, option))| {
                    let path = PathBuf::from(path.trim());
                    let meta = read_part10_meta(std::fs::File::open(&path).unwrap()).unwrap();
                    Sample {
                        path,
                        meta,
                        storescu_option: option,
                    }
                })
                .collect()
        })
        .clone()
}

/// The data set bytes of a Part-10 file (everything after the file meta).
pub fn dataset_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let meta = read_part10_meta(&bytes[..]).unwrap();
    bytes[meta.dataset_offset as usize..].to_vec()
}

/// Whether `received` is `source` as a sender re-encoding it would send it: identical, or
/// identical up to a trailing (FFFC,FFFC) Data Set Trailing Padding element, which dcmtk
/// drops when it sends (PS3.10 §7.2 lets any application remove it).
pub fn same_dataset(received: &[u8], source: &[u8]) -> bool {
    received == source
        || (source.starts_with(received)
            && source[received.len()..].starts_with(&[0xFC, 0xFF, 0xFC, 0xFF]))
}

/// Counts what happened to the instances a [`FileStore`] was given.
#[derive(Debug, Default)]
pub struct Counts {
    pub begun: AtomicUsize,
    pub committed: AtomicUsize,
    pub aborted: AtomicUsize,
    pub failed_commits: AtomicUsize,
    pub attributes: Mutex<Vec<InstanceAttributes>>,
}

/// Writes each instance to `<dir>/.<n>.part`, fsyncs and renames it to
/// `<dir>/<sop instance uid>.dcm` on commit; deletes it on abort or a refused commit.
pub struct FileStore {
    pub dir: PathBuf,
    pub counts: Arc<Counts>,
    pub fail_commit: bool,
    next: AtomicU64,
}

impl FileStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            counts: Arc::default(),
            fail_commit: false,
            next: AtomicU64::new(0),
        }
    }

    pub fn stored_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }
}

pub struct FileWriter {
    file: tokio::io::BufWriter<tokio::fs::File>,
    tmp: PathBuf,
    dir: PathBuf,
    sop_instance_uid: String,
    fail_commit: bool,
    counts: Arc<Counts>,
}

#[async_trait]
impl InstanceStore for FileStore {
    type Writer = FileWriter;

    async fn begin(&self, instance: &IncomingInstance) -> Result<FileWriter, StoreStatus> {
        self.counts.begun.fetch_add(1, Ordering::SeqCst);
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let tmp = self.dir.join(format!(".{n}.part"));
        let file = tokio::fs::File::create(&tmp).await.map_err(refused)?;
        Ok(FileWriter {
            file: tokio::io::BufWriter::with_capacity(256 * 1024, file),
            tmp,
            dir: self.dir.clone(),
            sop_instance_uid: instance.sop_instance_uid.clone(),
            fail_commit: self.fail_commit,
            counts: self.counts.clone(),
        })
    }
}

fn refused(e: std::io::Error) -> StoreStatus {
    StoreStatus {
        code: outpost_dicom::status::OUT_OF_RESOURCES,
        comment: e.to_string(),
    }
}

#[async_trait]
impl InstanceWriter for FileWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreStatus> {
        self.file.write_all(bytes).await.map_err(refused)
    }

    async fn commit(mut self, attributes: InstanceAttributes) -> Result<(), StoreStatus> {
        if self.fail_commit {
            let _ = tokio::fs::remove_file(&self.tmp).await;
            self.counts.failed_commits.fetch_add(1, Ordering::SeqCst);
            return Err(StoreStatus {
                code: outpost_dicom::status::OUT_OF_RESOURCES,
                comment: "test store refuses every commit".into(),
            });
        }
        self.file.flush().await.map_err(refused)?;
        self.file.get_mut().sync_all().await.map_err(refused)?;
        let target = self.dir.join(format!("{}.dcm", self.sop_instance_uid));
        tokio::fs::rename(&self.tmp, &target)
            .await
            .map_err(refused)?;
        tokio::fs::File::open(&self.dir)
            .await
            .map_err(refused)?
            .sync_all()
            .await
            .map_err(refused)?;
        self.counts.attributes.lock().unwrap().push(attributes);
        self.counts.committed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn abort(self) {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.tmp).await;
        self.counts.aborted.fetch_add(1, Ordering::SeqCst);
    }
}

/// A running SCP; cancelling `shutdown` stops it.
pub struct RunningScp {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), outpost_dicom::DicomError>>,
    pub store: Arc<FileStore>,
}

impl Drop for RunningScp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The SCP's AE title in every test.
pub const SCP_AE: &str = "OUTPOST";
/// The calling AE title allowed by default.
pub const SENDER_AE: &str = "SENDER";

pub fn scp_config() -> ScpConfig {
    let mut config = ScpConfig::new("127.0.0.1:0".parse().unwrap(), SCP_AE);
    config.allowed_callers = Some(vec![SENDER_AE.into(), "OUTPOST-SCU".into()]);
    config.timeout = Duration::from_secs(10);
    config
}

pub async fn start_scp(config: ScpConfig, store: FileStore) -> RunningScp {
    let listener = outpost_dicom::bind(&config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = Arc::new(store);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost_dicom::serve(
        listener,
        config,
        store.clone(),
        shutdown.clone(),
    ));
    RunningScp {
        addr,
        shutdown,
        task,
        store,
    }
}

/// Runs a dcmtk tool (absolute path: pynetdicom installs same-named scripts on PATH).
pub async fn dcmtk(tool: &str, args: &[String]) -> std::process::Output {
    tokio::process::Command::new(format!("/usr/bin/{tool}"))
        .args(args)
        // dcmtk reads TCP_NODELAY from the environment.
        .env("TCP_NODELAY", "1")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("/usr/bin/{tool}: {e}"))
}

pub fn describe(output: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A free loopback port for a peer that binds by number, below the kernel's ephemeral
/// range so no outgoing connection takes it as its source port before the peer binds it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 1_000) * 7;
    for _ in 0..12_000 {
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between 20000 and 32000")
}

/// Polls `check` every 20 ms until it holds, failing with `what` after `within`.
pub async fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}; log tail:\n{}",
            log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        // OUTPOST_TEST_LOG=1 also shows the lines while debugging a test.
        if std::env::var_os("OUTPOST_TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this test binary's log lines (once; tests share the buffer and search it for
/// lines naming their own ports).
pub fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(|| Capture)
            .try_init();
    });
}

pub fn logs() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

pub fn log_tail(n: usize) -> String {
    let all = logs();
    let lines: Vec<&str> = all.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The captured lines containing every one of `needles`.
pub fn log_lines_with(needles: &[&str]) -> Vec<String> {
    logs()
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .map(str::to_string)
        .collect()
}

/// The Python with pydicom: `OUTPOST_PYTHON` (set by `scripts/test.sh`), else `python3`.
pub fn python() -> String {
    std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// `tests/bindlo.c` built once per test process: preloaded into peers that have no
/// bind-address option, it turns their wildcard binds into loopback ones.
pub fn bindlo_shim() -> PathBuf {
    static SHIM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SHIM.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bindlo.c");
        let shim = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("bindlo-{}.so", std::process::id()));
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&shim)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("cc, to build the loopback bind shim");
        assert!(status.success(), "cc {} failed", source.display());
        shim
    })
    .clone()
}

/// A dcmtk storescp in bit-preserving mode accepting every transfer syntax; killed on drop.
pub struct Storescp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: tokio::process::Child,
}

impl Storescp {
    pub async fn start(ae: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // storescp has no bind-address option: the shim keeps it on loopback.
        let child = tokio::process::Command::new("/usr/bin/storescp")
            .env("LD_PRELOAD", bindlo_shim())
            .args(["+xa", "+B", "-aet", ae, "-od"])
            .arg(dir.path())
            .args(["-fe", ".dcm", &port.to_string()])
            .env("TCP_NODELAY", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("/usr/bin/storescp");
        let scp = Self { port, dir, child };
        let addr = format!("127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "storescp did not listen on {addr} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        scp
    }

    pub fn received(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
            .collect()
    }
}

impl Drop for Storescp {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
