//! DICOM peers for the gateway's end-to-end tests, all on 127.0.0.1:
//!
//! - [`Storescp`]: dcmtk's `storescp` in bit-preserving mode, accepting every transfer
//!   syntax (a PACS that keeps exactly the bytes it was sent);
//! - [`Orthanc`]: Orthanc with its DICOMweb plugin, read back over its REST API;
//! - [`storescu`], [`echoscu`] and [`pynetdicom_storescu`]: the modalities;
//! - [`dicom_tool`] (`peers/dicom_tool.py`, pydicom and pynetdicom): test data, data set
//!   comparison and protocol probes;
//! - [`associate_rq`] and [`read_pdu`]: raw PDUs for malformed-input tests.
//!
//! dcmtk 3.6.7's `storescp` and Orthanc 1.10 cannot be told which address to bind, so they
//! run with `peers/bindlo.c` preloaded (compiled once per test process), which turns their
//! wildcard binds into loopback binds. dcmtk tools are always run by absolute path: pip's
//! pynetdicom installs commands of the same names that shadow them on `PATH`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{describe_output, free_port, peers_dir, port_accepts, python, run, tail};

/// The gateway's AE title in the tests' configs.
pub const AGENT_AE: &str = "OUTPOST";
/// The modality AE title the tests' configs allow.
pub const MODALITY_AE: &str = "MODALITY";
/// A second allowed modality AE title (pynetdicom's sends).
pub const PY_MODALITY_AE: &str = "PYMODALITY";
/// Verification SOP Class.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Implicit VR Little Endian.
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

const DCMTK_TOOLS: [&str; 3] = ["/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"];
const ORTHANC: &str = "/usr/sbin/Orthanc";
const ORTHANC_DICOMWEB: &str = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";
const PYTHON_INSTALL: &str = "python3 -m pip install pydicom==3.0.2 pynetdicom==3.0.4";
const PEER_START: Duration = Duration::from_secs(30);

/// A peer a DICOM test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DicomPeer {
    /// dcmtk's storescu, storescp and echoscu in `/usr/bin`, and a C compiler for the
    /// loopback shim.
    Dcmtk,
    /// Orthanc in `/usr/sbin` with the DICOMweb plugin.
    Orthanc,
}

impl DicomPeer {
    /// Why it cannot run here, if it cannot.
    pub fn missing(self) -> Option<String> {
        match self {
            DicomPeer::Dcmtk => {
                if let Some(tool) = DCMTK_TOOLS.iter().find(|t| !Path::new(t).exists()) {
                    return Some(format!("{tool} is missing (apt-get install dcmtk)"));
                }
                bindlo().err()
            }
            DicomPeer::Orthanc => {
                if !Path::new(ORTHANC).exists() || !Path::new(ORTHANC_DICOMWEB).exists() {
                    return Some(format!(
                        "{ORTHANC} or {ORTHANC_DICOMWEB} is missing (apt-get install orthanc orthanc-dicomweb)"
                    ));
                }
                bindlo().err()
            }
        }
    }
}

/// Whether a DICOM peer test must be skipped: `OUTPOST_PEERS=skip`, or one of `needs` is
/// not installed. Says why with a `SKIPPED <test>` line written straight to stderr (the
/// harness shows it even for a passing test). Panics, naming the install command, if the
/// Python interpreter lacks pydicom or pynetdicom (they are installed by `scripts/test.sh`).
pub fn skip_dicom_tests(test: &str, needs: &[DicomPeer]) -> bool {
    let reason = if std::env::var("OUTPOST_PEERS").is_ok_and(|v| v == "skip") {
        Some("OUTPOST_PEERS=skip (it needs dcmtk, Orthanc, pydicom and pynetdicom)".to_owned())
    } else {
        needs.iter().find_map(|peer| peer.missing())
    };
    match reason {
        Some(reason) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
            true
        }
        None => {
            require_pydicom();
            false
        }
    }
}

/// Panics, naming the install command, unless the Python interpreter imports pydicom and
/// pynetdicom.
pub fn require_pydicom() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let python = python();
        match Command::new(&python)
            .args(["-c", "import pydicom, pynetdicom"])
            .output()
        {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!(
                "`{python} -c 'import pydicom, pynetdicom'` failed. Install them with `{PYTHON_INSTALL}` \
                 (or set OUTPOST_PYTHON, or OUTPOST_PEERS=skip to skip peer tests)\n{}",
                describe_output(&output)
            )),
            Err(err) => Err(format!(
                "cannot run `{python}` ({err}): the DICOM tests need python3 with `{PYTHON_INSTALL}` \
                 (or set OUTPOST_PYTHON, or OUTPOST_PEERS=skip to skip peer tests)"
            )),
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// `peers/bindlo.c` compiled (once per test process, in a temporary folder that is then
/// removed): the shared object's bytes, written beside each peer that needs it.
fn bindlo() -> Result<&'static [u8], String> {
    static SO: OnceLock<Result<Vec<u8>, String>> = OnceLock::new();
    SO.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("outpost-bindlo-")
            .tempdir()
            .map_err(|err| format!("temporary folder for bindlo.so: {err}"))?;
        let so = dir.path().join("bindlo.so");
        let source = peers_dir().join("bindlo.c");
        let output = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&so)
            .arg(&source)
            .arg("-ldl")
            .output()
            .map_err(|err| {
                format!(
                    "cannot run cc to build {} ({err}): install gcc",
                    source.display()
                )
            })?;
        if !output.status.success() {
            return Err(format!(
                "cc {} failed\n{}",
                source.display(),
                describe_output(&output)
            ));
        }
        std::fs::read(&so).map_err(|err| format!("read {}: {err}", so.display()))
    })
    .as_ref()
    .map(Vec::as_slice)
    .map_err(Clone::clone)
}

/// Writes the loopback shim into `dir` and returns its path, for `LD_PRELOAD`.
fn install_bindlo(dir: &Path) -> PathBuf {
    let bytes = bindlo().unwrap_or_else(|err| panic!("the loopback shim: {err}"));
    let path = dir.join("bindlo.so");
    std::fs::write(&path, bytes).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    path
}

/// A dcmtk tool by absolute path, with `TCP_NODELAY=1` (dcmtk reads it from the
/// environment), stdin closed.
pub fn dcmtk(tool: &str) -> Command {
    let mut command = Command::new(format!("/usr/bin/{tool}"));
    command.env("TCP_NODELAY", "1").stdin(Stdio::null());
    command
}

/// The storescu option that makes it propose `transfer_syntax` (it proposes only
/// uncompressed syntaxes by default, and then cannot send a compressed file).
pub fn storescu_option(transfer_syntax: &str) -> &'static str {
    match transfer_syntax {
        IMPLICIT_LE => "-xi",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        _ => "-x=",
    }
}

/// Runs `storescu -v <options> -aet <calling> -aec <called> 127.0.0.1 <port> <files>` and
/// returns its output (not checked).
pub fn storescu(
    port: u16,
    called: &str,
    calling: &str,
    options: &[&str],
    files: &[&Path],
) -> Output {
    run(storescu_command(port, called, calling, options, files).stdout(Stdio::piped()))
}

/// The `storescu` command line of [`storescu`], to spawn it yourself.
pub fn storescu_command(
    port: u16,
    called: &str,
    calling: &str,
    options: &[&str],
    files: &[&Path],
) -> Command {
    let mut command = dcmtk("storescu");
    command
        .arg("-v")
        .args(options)
        .args(["-aet", calling, "-aec", called, "127.0.0.1"])
        .arg(port.to_string())
        .args(files);
    command
}

/// A finished command's stdout and stderr together (dcmtk and pynetdicom log to stderr).
pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Files `storescu -v` reports acknowledged with success, in order: each `Sending file: X`
/// followed by `Received Store Response (Success)`.
pub fn storescu_acknowledged(output: &str) -> Vec<PathBuf> {
    let mut acked = Vec::new();
    let mut current: Option<PathBuf> = None;
    for line in output.lines() {
        if let Some(file) = line.split_once("Sending file: ").map(|(_, f)| f.trim()) {
            current = Some(PathBuf::from(file));
        } else if line.contains("Received Store Response (Success)") {
            if let Some(file) = current.take() {
                acked.push(file);
            }
        }
    }
    acked
}

/// Runs `echoscu -aet <calling> -aec <called> 127.0.0.1 <port>` (not checked).
pub fn echoscu(port: u16, called: &str, calling: &str) -> Output {
    run(dcmtk("echoscu")
        .args(["-v", "-aet", calling, "-aec", called, "127.0.0.1"])
        .arg(port.to_string()))
}

/// Runs pynetdicom's `storescu -v -cx` (only the contexts the files need) and returns its
/// output (not checked; it logs to stderr).
pub fn pynetdicom_storescu(port: u16, called: &str, calling: &str, files: &[&Path]) -> Output {
    require_pydicom();
    run(Command::new(python())
        .args(["-m", "pynetdicom", "storescu", "-v", "-cx"])
        .args(["-aet", calling, "-aec", called, "127.0.0.1"])
        .arg(port.to_string())
        .args(files)
        .stdin(Stdio::null()))
}

/// How many C-STOREs pynetdicom's storescu reports answered with success.
pub fn pynetdicom_successes(output: &Output) -> usize {
    output_text(output)
        .lines()
        .filter(|line| line.contains("Received Store Response (Status: 0x0000"))
        .count()
}

/// Runs `python peers/dicom_tool.py <args>`; panics unless it succeeds, and returns its
/// stdout.
pub fn dicom_tool(args: &[&str]) -> String {
    require_pydicom();
    let python = python();
    let script = peers_dir().join("dicom_tool.py");
    let output = run(Command::new(&python).arg(&script).args(args));
    assert!(
        output.status.success(),
        "`{python} {} {}` failed\n{}",
        script.display(),
        args.join(" "),
        describe_output(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One DICOM Part-10 file of the test data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DicomFile {
    /// Where it is.
    pub path: PathBuf,
    /// (0002,0002).
    pub sop_class_uid: String,
    /// (0002,0003).
    pub sop_instance_uid: String,
    /// (0002,0010).
    pub transfer_syntax: String,
    /// Where the data set starts (after the preamble and the file meta).
    pub dataset_offset: usize,
}

impl DicomFile {
    /// Reads the file meta of `path`; panics if it is not a Part-10 file.
    pub fn open(path: &Path) -> DicomFile {
        let bytes =
            std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
        let meta = part10_meta(&bytes).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        DicomFile {
            path: path.to_owned(),
            ..meta
        }
    }

    /// Its data set bytes (everything after the file meta).
    pub fn dataset(&self) -> Vec<u8> {
        let bytes = std::fs::read(&self.path)
            .unwrap_or_else(|err| panic!("read {}: {err}", self.path.display()));
        bytes[self.dataset_offset.min(bytes.len())..].to_vec()
    }

    /// The storescu option for its transfer syntax.
    pub fn storescu_option(&self) -> &'static str {
        storescu_option(&self.transfer_syntax)
    }
}

/// Parses the preamble and file meta group (explicit VR little endian) of a Part-10 file.
pub fn part10_meta(bytes: &[u8]) -> Result<DicomFile, String> {
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" {
        return Err("not a Part-10 file (no DICM at 128)".into());
    }
    if bytes[132..138] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
        return Err("the file meta does not start with (0002,0000) UL".into());
    }
    let group_len = u32::from_le_bytes([bytes[140], bytes[141], bytes[142], bytes[143]]) as usize;
    let end = 144 + group_len;
    if bytes.len() < end {
        return Err(format!("the file meta ({group_len} bytes) is cut short"));
    }
    let mut elements: BTreeMap<u16, String> = BTreeMap::new();
    let mut at = 144;
    while at + 8 <= end {
        let group = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let element = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]);
        let vr = &bytes[at + 4..at + 6];
        let (len, header) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            if at + 12 > end {
                return Err("a file meta element header is cut short".into());
            }
            let l = &bytes[at + 8..at + 12];
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (
                u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]) as usize,
                8,
            )
        };
        if group != 2 || at + header + len > end {
            return Err(format!("bad file meta element ({group:04x},{element:04x})"));
        }
        let value = &bytes[at + header..at + header + len];
        let text = String::from_utf8_lossy(value)
            .trim_end_matches(['\0', ' '])
            .to_owned();
        elements.insert(element, text);
        at += header + len;
    }
    let get = |element: u16, name: &str| {
        elements
            .get(&element)
            .cloned()
            .ok_or_else(|| format!("the file meta has no {name} (0002,{element:04x})"))
    };
    Ok(DicomFile {
        path: PathBuf::new(),
        sop_class_uid: get(2, "Media Storage SOP Class UID")?,
        sop_instance_uid: get(3, "Media Storage SOP Instance UID")?,
        transfer_syntax: get(0x10, "Transfer Syntax UID")?,
        dataset_offset: end,
    })
}

/// The data set bytes of a Part-10 file held in memory.
pub fn dataset_of(bytes: &[u8]) -> Result<&[u8], String> {
    part10_meta(bytes).map(|meta| &bytes[meta.dataset_offset..])
}

/// Whether `received` is `source` as a sender that re-encodes would send it: identical, or
/// identical up to a trailing (FFFC,FFFC) Data Set Trailing Padding element, which dcmtk's
/// storescu drops (PS3.10 §7.2 lets any application remove it).
pub fn same_dataset(received: &[u8], source: &[u8]) -> bool {
    received == source
        || (source.starts_with(received)
            && source[received.len()..].starts_with(&[0xFC, 0xFF, 0xFC, 0xFF]))
}

/// What `dicom_tool.py compare` says about two files: equal element by element (trailing
/// padding aside) with identical pixel data, or which tags differ.
pub fn compare_files(a: &Path, b: &Path) -> serde_json::Value {
    let out = dicom_tool(&["compare", &a.to_string_lossy(), &b.to_string_lossy()]);
    serde_json::from_str(out.trim())
        .unwrap_or_else(|err| panic!("dicom_tool.py compare printed {out:?}: {err}"))
}

/// Test data in a temporary folder of its own.
pub struct TestData {
    dir: TempDir,
}

impl TestData {
    /// An empty folder.
    pub fn new() -> TestData {
        TestData {
            dir: tempfile::Builder::new()
                .prefix("outpost-dicom-data-")
                .tempdir()
                .unwrap_or_else(|err| panic!("create a temporary folder for DICOM data: {err}")),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// pydicom's CT_small (explicit LE), MR_small (explicit LE), SC_rgb_jpeg_dcmtk (JPEG
    /// baseline), SC_rgb_rle (RLE lossless), JPEG2000 (J2K) and MR_small_implicit (implicit
    /// LE, with a SOP Instance UID of its own), copied into `<dir>/<sub>`.
    pub fn pydicom_samples(&self, sub: &str) -> Vec<DicomFile> {
        let dir = self.dir.path().join(sub);
        let out = dicom_tool(&["samples", &dir.to_string_lossy()]);
        out.lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("dicom_tool.py samples printed {line:?}: {err}"));
                DicomFile::open(Path::new(value["file"].as_str().unwrap_or_default()))
            })
            .collect()
    }

    /// `n` CT instances (`size`×`size` 16-bit pixels, one study, fresh UIDs) in
    /// `<dir>/<sub>`, in file-name (and instance number) order.
    pub fn ct_batch(&self, sub: &str, n: usize, size: u32) -> Vec<DicomFile> {
        let dir = self.dir.path().join(sub);
        dicom_tool(&[
            "batch",
            &dir.to_string_lossy(),
            &n.to_string(),
            &size.to_string(),
        ]);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("read {}: {err}", dir.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        files.sort();
        files.iter().map(|path| DicomFile::open(path)).collect()
    }

    /// A multi-frame 16-bit grayscale instance of about `mib` MiB at `<dir>/<name>`.
    pub fn multiframe(&self, name: &str, mib: u64) -> DicomFile {
        let path = self.dir.path().join(name);
        dicom_tool(&["multiframe", &path.to_string_lossy(), &mib.to_string()]);
        DicomFile::open(&path)
    }

    /// `source` with a fresh SOP Instance UID, cut `keep` bytes into its data set, at
    /// `<dir>/<name>` (the file meta still names the new UID).
    pub fn truncated(&self, source: &Path, name: &str, keep: usize) -> DicomFile {
        let path = self.dir.path().join(name);
        dicom_tool(&[
            "truncate",
            &source.to_string_lossy(),
            &path.to_string_lossy(),
            &keep.to_string(),
        ]);
        DicomFile::open(&path)
    }
}

impl Default for TestData {
    fn default() -> Self {
        TestData::new()
    }
}

/// Starts `command` with its output appended to `log`, killed (SIGKILL) if `port` does not accept
/// connections within [`PEER_START`]; panics with the log tail.
fn spawn_listening(mut command: Command, log: &Path, port: u16, what: &str) -> Child {
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|err| panic!("open {}: {err}", log.display()));
    let file_err = file
        .try_clone()
        .unwrap_or_else(|err| panic!("clone the log file handle: {err}"));
    command.stdin(Stdio::null()).stdout(file).stderr(file_err);
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("start {what} ({command:?}): {err}"));
    let started = Instant::now();
    while !port_accepts(port) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before listening on 127.0.0.1:{port}\nlog:\n{}",
                file_tail(log, 30)
            );
        }
        if started.elapsed() > PEER_START {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not listen on 127.0.0.1:{port} within {PEER_START:?}\nlog:\n{}",
                file_tail(log, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn file_tail(path: &Path, n: usize) -> String {
    tail(
        &String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()),
        n,
    )
}

/// dcmtk's `storescp` on 127.0.0.1 as a PACS: bit-preserving (`+B`, each data set kept
/// exactly as received), every transfer syntax (`+xa`), one association at a time, files
/// in `<dir>/in/<modality>.<SOP Instance UID>.dcm` (a second copy of an instance replaces
/// the first). Killed on drop.
pub struct Storescp {
    port: u16,
    ae: String,
    extra: Vec<String>,
    dir: TempDir,
    child: Option<Child>,
}

impl Storescp {
    /// Starts it on a free port with AE title `ae` and any extra storescp options.
    pub fn start(ae: &str, extra: &[&str]) -> Storescp {
        let mut scp = Storescp::prepare(ae, extra);
        scp.launch();
        scp
    }

    /// Picks its port and folder without starting it (a PACS that is down); start it
    /// with [`Storescp::launch`].
    pub fn prepare(ae: &str, extra: &[&str]) -> Storescp {
        let dir = tempfile::Builder::new()
            .prefix("outpost-storescp-")
            .tempdir()
            .unwrap_or_else(|err| panic!("create a temporary folder for storescp: {err}"));
        std::fs::create_dir_all(dir.path().join("in"))
            .unwrap_or_else(|err| panic!("create {}/in: {err}", dir.path().display()));
        Storescp {
            port: free_port(),
            ae: ae.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            dir,
            child: None,
        }
    }

    /// Starts it (again) on its port and waits until it accepts connections.
    pub fn launch(&mut self) {
        assert!(
            self.child.is_none(),
            "storescp on port {} is running",
            self.port
        );
        let so = install_bindlo(self.dir.path());
        let mut command = dcmtk("storescp");
        command
            .env("LD_PRELOAD", &so)
            .args(["-v", "+xa", "+B", "-aet", &self.ae, "-od"])
            .arg(self.dir.path().join("in"))
            .args(["-fe", ".dcm"])
            .args(&self.extra)
            .arg(self.port.to_string());
        let log = self.dir.path().join("storescp.log");
        self.child = Some(spawn_listening(command, &log, self.port, "dcmtk storescp"));
    }

    /// Stops it (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its AE title.
    pub fn ae_title(&self) -> &str {
        &self.ae
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The folder instances are written to.
    pub fn in_dir(&self) -> PathBuf {
        self.dir.path().join("in")
    }

    /// The received files by SOP Instance UID (from their names).
    pub fn received(&self) -> BTreeMap<String, PathBuf> {
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(self.in_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".dcm") else {
                continue;
            };
            if let Some((_, uid)) = stem.split_once('.') {
                found.insert(uid.to_owned(), entry.path());
            }
        }
        found
    }

    /// The received file for a SOP Instance UID, if it is complete (its data set has the
    /// length of `expected`'s; storescp writes while receiving).
    pub fn received_like(&self, expected: &[u8], sop_instance_uid: &str) -> Option<Vec<u8>> {
        let path = self.received().remove(sop_instance_uid)?;
        let bytes = std::fs::read(path).ok()?;
        let dataset = dataset_of(&bytes).ok()?.to_vec();
        same_dataset(&dataset, expected).then_some(dataset)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.dir.path().join("storescp.log"), n)
    }
}

impl Drop for Storescp {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- storescp {} on 127.0.0.1:{} log tail ---\n{}\n---",
                self.ae,
                self.port,
                self.log_tail(20)
            );
        }
    }
}

/// Orthanc on 127.0.0.1 (DICOM AE `ORTHANC`, REST and DICOMweb over HTTP), its storage in
/// a temporary folder. Killed on drop.
pub struct Orthanc {
    http_port: u16,
    dicom_port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl Orthanc {
    /// Its AE title.
    pub const AE: &'static str = "ORTHANC";

    /// Starts it on free ports and waits until `/system` answers and the DICOM port
    /// accepts connections.
    pub fn start() -> Orthanc {
        let dir = tempfile::Builder::new()
            .prefix("outpost-orthanc-")
            .tempdir()
            .unwrap_or_else(|err| panic!("create a temporary folder for Orthanc: {err}"));
        let (http_port, dicom_port) = (free_port(), free_port());
        let db = dir.path().join("db");
        let config = serde_json::json!({
            "Name": "outpost-test-orthanc",
            "StorageDirectory": db,
            "IndexDirectory": db,
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": Orthanc::AE,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomAlwaysAllowEcho": true,
            "DicomAlwaysAllowStore": true,
            "Plugins": [ORTHANC_DICOMWEB],
            "DicomWeb": { "Enable": true, "Root": "/dicom-web/" }
        });
        let config_path = dir.path().join("orthanc.json");
        std::fs::write(&config_path, config.to_string())
            .unwrap_or_else(|err| panic!("write {}: {err}", config_path.display()));
        let so = install_bindlo(dir.path());
        let mut command = Command::new(ORTHANC);
        command.env("LD_PRELOAD", &so).arg(&config_path);
        let log = dir.path().join("orthanc.log");
        let child = spawn_listening(command, &log, dicom_port, "Orthanc");
        let orthanc = Orthanc {
            http_port,
            dicom_port,
            dir,
            child: Some(child),
        };
        crate::wait_until_explained(
            PEER_START,
            "Orthanc answers GET /system",
            || match http_get(orthanc.http_port, "/system") {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => {
                    Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
                }
                Err(err) => Err(err),
            },
            || format!("Orthanc log tail:\n{}", orthanc.log_tail(30)),
        );
        orthanc
    }

    /// Its DICOM port.
    pub fn dicom_port(&self) -> u16 {
        self.dicom_port
    }

    /// Its HTTP port (REST and DICOMweb at `/dicom-web/`).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `GET <path>` on its REST API; panics unless it answers 200.
    pub fn get(&self, path: &str) -> Vec<u8> {
        match http_get(self.http_port, path) {
            Ok((200, body)) => body,
            Ok((status, body)) => panic!(
                "Orthanc GET {path}: HTTP {status}: {}\nOrthanc log tail:\n{}",
                String::from_utf8_lossy(&body),
                self.log_tail(20)
            ),
            Err(err) => panic!(
                "Orthanc GET {path}: {err}\nOrthanc log tail:\n{}",
                self.log_tail(20)
            ),
        }
    }

    /// Its instances: Orthanc id by SOP Instance UID (`GET /instances?expand`).
    pub fn instances(&self) -> BTreeMap<String, String> {
        let body = self.get("/instances?expand");
        let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|err| {
            panic!(
                "Orthanc /instances?expand is not JSON ({err}): {}",
                String::from_utf8_lossy(&body)
            )
        });
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|instance| {
                Some((
                    instance["MainDicomTags"]["SOPInstanceUID"]
                        .as_str()?
                        .to_owned(),
                    instance["ID"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    /// The Part-10 file Orthanc keeps for an instance (`GET /instances/{id}/file`).
    pub fn file(&self, id: &str) -> Vec<u8> {
        self.get(&format!("/instances/{id}/file"))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.dir.path().join("orthanc.log"), n)
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- Orthanc on 127.0.0.1:{}/{} log tail ---\n{}\n---",
                self.dicom_port,
                self.http_port,
                self.log_tail(20)
            );
        }
    }
}

/// `GET http://127.0.0.1:<port><path>` over HTTP/1.0: the status and the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .map_err(|err| format!("connect 127.0.0.1:{port}: {err}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|err| err.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|err| format!("send GET {path}: {err}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|err| format!("read the answer to GET {path}: {err}"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no end of headers in {} bytes", response.len()))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line in {head:?}"))?;
    let mut body = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(|| format!("GET {path}: bad chunked body"))?;
    }
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// `[[source]] kind = "dicom"` named `name` on 127.0.0.1:`port`, AE [`AGENT_AE`], allowing
/// [`MODALITY_AE`] and [`PY_MODALITY_AE`]; `extra` is added (TOML lines).
pub fn dicom_source(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[source]]\nname = \"{name}\"\nkind = \"dicom\"\nlisten = \"127.0.0.1:{port}\"\n\
         ae_title = \"{AGENT_AE}\"\nallowed_callers = [\"{MODALITY_AE}\", \"{PY_MODALITY_AE}\"]\n\
         timeout_secs = 20\n{extra}\n\n"
    )
}

/// `[[sink]] kind = "dicom"` named `name`, sending to 127.0.0.1:`port` as AE `ae`, with
/// short retry delays; `extra` is added (TOML lines).
pub fn dicom_sink(name: &str, port: u16, ae: &str, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"{name}\"\nkind = \"dicom\"\nconnect = \"127.0.0.1:{port}\"\n\
         ae_title = \"{ae}\"\ntimeout_secs = 20\nretry_initial_ms = 100\nretry_max_secs = 2\n{extra}\n\n"
    )
}

/// A `[[route]]` from `from` to `to`; `extra` is added (filters, TOML lines).
pub fn route(from: &str, to: &[&str], extra: &str) -> String {
    let to: Vec<String> = to.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        "[[route]]\nfrom = \"{from}\"\nto = [{}]\n{extra}\n\n",
        to.join(", ")
    )
}

/// An A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2) from `calling` to `called` with one presentation
/// context (id 1) for `abstract_syntax` in `transfer_syntax`, maximum PDU 16 KiB.
pub fn associate_rq(
    called: &str,
    calling: &str,
    abstract_syntax: &str,
    transfer_syntax: &str,
) -> Vec<u8> {
    fn item(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind, 0];
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }
    fn ae(title: &str) -> [u8; 16] {
        let mut field = [b' '; 16];
        for (slot, byte) in field.iter_mut().zip(title.bytes()) {
            *slot = byte;
        }
        field
    }
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_be_bytes()); // protocol version
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&ae(called));
    body.extend_from_slice(&ae(calling));
    body.extend_from_slice(&[0; 32]);
    body.extend(item(0x10, b"1.2.840.10008.3.1.1.1"));
    let mut context = vec![1, 0, 0, 0];
    context.extend(item(0x30, abstract_syntax.as_bytes()));
    context.extend(item(0x40, transfer_syntax.as_bytes()));
    body.extend(item(0x20, &context));
    body.extend(item(0x50, &item(0x51, &16_384u32.to_be_bytes())));
    let mut pdu = vec![0x01, 0];
    pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pdu.extend(body);
    pdu
}

/// Reads one PDU: its type and body. Errors on EOF or a body over 1 MiB.
pub fn read_pdu(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 6];
    stream.read_exact(&mut header)?;
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("a PDU of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok((header[0], body))
}

/// An A-ABORT PDU (source: service user).
pub const A_ABORT: [u8; 10] = [0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0];

/// An A-RELEASE-RQ PDU.
pub const A_RELEASE_RQ: [u8; 10] = [0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0];

/// A C-STORE-RQ command set (implicit VR little endian, PS3.7 §9.3.1.1) announcing a data
/// set.
pub fn c_store_rq(sop_class_uid: &str, sop_instance_uid: &str, message_id: u16) -> Vec<u8> {
    fn element(out: &mut Vec<u8>, tag: u16, value: &[u8]) {
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    fn uid(value: &str) -> Vec<u8> {
        let mut bytes = value.as_bytes().to_vec();
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        bytes
    }
    let mut rest = Vec::new();
    element(&mut rest, 0x0002, &uid(sop_class_uid));
    element(&mut rest, 0x0100, &0x0001u16.to_le_bytes()); // C-STORE-RQ
    element(&mut rest, 0x0110, &message_id.to_le_bytes());
    element(&mut rest, 0x0700, &0u16.to_le_bytes()); // priority medium
    element(&mut rest, 0x0800, &0u16.to_le_bytes()); // a data set follows
    element(&mut rest, 0x1000, &uid(sop_instance_uid));
    let mut command = Vec::new();
    element(&mut command, 0x0000, &(rest.len() as u32).to_le_bytes());
    command.extend(rest);
    command
}

/// A P-DATA-TF PDU with one presentation data value.
pub fn p_data_tf(pc_id: u8, command: bool, last: bool, data: &[u8]) -> Vec<u8> {
    let header = u8::from(command) | (u8::from(last) << 1);
    let item_len = (data.len() + 2) as u32;
    let mut pdu = vec![0x04, 0];
    pdu.extend_from_slice(&(item_len + 4).to_be_bytes());
    pdu.extend_from_slice(&item_len.to_be_bytes());
    pdu.push(pc_id);
    pdu.push(header);
    pdu.extend_from_slice(data);
    pdu
}

/// The Status (0000,0900) of a DIMSE response whose command set is in `pdu_body` (the body
/// of a P-DATA-TF holding one command PDV, as the gateway and dcmtk send responses).
pub fn response_status(pdu_body: &[u8]) -> Option<u16> {
    // PDV item: length (4), context id (1), header (1), then the command set.
    let command = pdu_body.get(6..)?;
    let mut at = 0;
    while at + 8 <= command.len() {
        let group = u16::from_le_bytes([command[at], command[at + 1]]);
        let element = u16::from_le_bytes([command[at + 2], command[at + 3]]);
        let len = u32::from_le_bytes([
            command[at + 4],
            command[at + 5],
            command[at + 6],
            command[at + 7],
        ]) as usize;
        if (group, element) == (0, 0x0900) && len == 2 {
            let value = command.get(at + 8..at + 10)?;
            return Some(u16::from_le_bytes([value[0], value[1]]));
        }
        at += 8 + len;
    }
    None
}

/// Sends `dataset` (bytes as they are, possibly broken) as one C-STORE on an association
/// `stream` opened with a single presentation context (id 1) for `sop_class_uid`, in PDVs
/// of at most 16 KiB, and returns the status of the response. Errors if the association
/// ends first.
pub fn raw_c_store(
    stream: &mut TcpStream,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    dataset: &[u8],
) -> std::io::Result<u16> {
    stream.write_all(&p_data_tf(
        1,
        true,
        true,
        &c_store_rq(sop_class_uid, sop_instance_uid, 1),
    ))?;
    let chunks: Vec<&[u8]> = dataset.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        stream.write_all(&p_data_tf(1, false, i + 1 == chunks.len(), chunk))?;
    }
    let (kind, body) = read_pdu(stream)?;
    if kind != 0x04 {
        return Err(std::io::Error::other(format!(
            "PDU type {kind:#04x} instead of a C-STORE-RSP: {body:02x?}"
        )));
    }
    response_status(&body)
        .ok_or_else(|| std::io::Error::other(format!("a response without a status: {body:02x?}")))
}
