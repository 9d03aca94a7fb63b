//! `outpost bench dicom`: dcmtk's storescu sends the same set of CT-like instances to the
//! agent (each answered only once it is encrypted on disk and committed to the queue) and,
//! in the same run, to dcmtk's storescp writing plain files; then the agent's forward rate
//! to Orthanc. Both dcmtk tools run with `TCP_NODELAY=1` (without it Nagle's algorithm
//! holds them near 20 instances/s on loopback), so the comparison is against the peer at
//! its best.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{free_loopback_addr, stop, tail, wait_for_port};

/// The instance maker, from the verified peer recipe.
const GEN_CT: &str = include_str!("../../../../peers/gen_ct.py");
/// Keeps dcmtk's and Orthanc's listeners on loopback (they have no bind-address option).
const BINDLO: &str = include_str!("../../../../peers/bindlo.c");

/// Runs the benchmark and prints its figures.
pub async fn run(instances: usize, size: usize, python: &str) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let files = work.path().join("files");
    let script = work.path().join("gen_ct.py");
    std::fs::write(&script, GEN_CT)?;
    eprintln!("making {instances} instances of {size}x{size} with pydicom…");
    let made = Command::new(python)
        .arg(&script)
        .arg(&files)
        .arg(instances.to_string())
        .arg(size.to_string())
        .status()
        .with_context(|| format!("running {python} (needs pydicom: pip install pydicom)"))?;
    if !made.success() {
        bail!("{python} gen_ct.py failed");
    }
    let total_bytes: u64 = std::fs::read_dir(&files)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let bindlo = build_bindlo(work.path())?;

    // The peer: storescp writing each instance to a file.
    let peer_addr = free_loopback_addr()?;
    let peer_dir = work.path().join("storescp");
    std::fs::create_dir_all(&peer_dir)?;
    let mut peer = Command::new("/usr/bin/storescp")
        .env("LD_PRELOAD", &bindlo)
        .env("TCP_NODELAY", "1")
        .args(["-aet", "STORESCP", "-od"])
        .arg(&peer_dir)
        .args(["-fe", ".dcm"])
        .arg(peer_addr.port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting /usr/bin/storescp (apt install dcmtk)")?;
    wait_for_port(peer_addr, &mut peer).await?;
    let peer_time = storescu(peer_addr, "STORESCP", &files)?;
    stop(&mut peer);

    // The agent: durable and encrypted, forwarding to Orthanc when there is one.
    let orthanc = Orthanc::start(work.path(), &bindlo).await.ok();
    let agent_addr = free_loopback_addr()?;
    let agent_toml = work.path().join("agent.toml");
    let mut config = format!(
        "data_dir = \"agent\"\n[[source]]\nname = \"modalities\"\nkind = \"dicom\"\nlisten = \"{agent_addr}\"\nae_title = \"OUTPOST\"\n"
    );
    match &orthanc {
        Some(orthanc) => config.push_str(&format!(
            "[[sink]]\nname = \"pacs\"\nkind = \"dicom\"\nconnect = \"127.0.0.1:{}\"\nae_title = \"ORTHANC\"\n",
            orthanc.dicom_port
        )),
        None => config.push_str(
            "[[sink]]\nname = \"pacs\"\nkind = \"dicom\"\nconnect = \"127.0.0.1:9\"\nae_title = \"NONE\"\n",
        ),
    }
    config.push_str("[[route]]\nfrom = \"modalities\"\nto = [\"pacs\"]\n");
    std::fs::write(&agent_toml, config)?;
    // Intake and forwarding overlap, as they do at a practice; the forward figure runs from
    // the first instance in to the last one stored in Orthanc.
    let log = work.path().join("agent.log");
    let mut agent = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "agent", "--config"])
        .arg(&agent_toml)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the agent")?;
    let started = Instant::now();
    let result = async {
        wait_for_port(agent_addr, &mut agent).await?;
        let agent_time = storescu(agent_addr, "OUTPOST", &files)?;
        let forward_time = match &orthanc {
            Some(orthanc) => Some(orthanc.wait_for(instances, started).await?),
            None => None,
        };
        Ok::<_, anyhow::Error>((agent_time, forward_time))
    }
    .await;
    stop(&mut agent);
    let (agent_time, forward_time) =
        result.with_context(|| format!("agent log: {}", tail(&log)))?;

    // The same files straight from storescu to Orthanc: what Orthanc itself takes.
    let orthanc_direct = match &orthanc {
        Some(orthanc) => Some(storescu(
            std::net::SocketAddr::from(([127, 0, 0, 1], orthanc.dicom_port)),
            "ORTHANC",
            &files,
        )?),
        None => None,
    };
    let per_sec = |time: Duration| instances as f64 / time.as_secs_f64().max(1e-6);
    let mb_per_sec = |time: Duration| total_bytes as f64 / 1e6 / time.as_secs_f64().max(1e-6);
    println!(
        "storescu -> storescp (plain files): {:.0} instances/s, {:.1} MB/s",
        per_sec(peer_time),
        mb_per_sec(peer_time)
    );
    println!(
        "storescu -> agent (encrypted, committed before success): {:.0} instances/s, {:.1} MB/s",
        per_sec(agent_time),
        mb_per_sec(agent_time)
    );
    let forward = forward_time.map(per_sec);
    let direct = orthanc_direct.map(per_sec);
    match (forward, direct) {
        (Some(rate), Some(direct)) => println!("agent -> Orthanc (C-STORE): {rate:.0} instances/s from the first instance in to the last stored | storescu -> Orthanc: {direct:.0} instances/s"),
        _ => println!("agent -> Orthanc: skipped (no /usr/sbin/Orthanc)"),
    }
    let ratio = per_sec(agent_time) / per_sec(peer_time);
    println!(
        "dicom: {instances} x {:.2} MB | agent {:.0} inst/s {:.1} MB/s | storescp {:.0} inst/s {:.1} MB/s | forward {} inst/s (storescu to Orthanc {}) | ratio {ratio:.2}",
        total_bytes as f64 / 1e6 / instances.max(1) as f64,
        per_sec(agent_time),
        mb_per_sec(agent_time),
        per_sec(peer_time),
        mb_per_sec(peer_time),
        forward.map_or_else(|| "n/a".to_owned(), |rate| format!("{rate:.0}")),
        direct.map_or_else(|| "n/a".to_owned(), |rate| format!("{rate:.0}")),
    );
    if let Some(mut orthanc) = orthanc {
        stop(&mut orthanc.process);
    }
    Ok(())
}

/// Sends every file in `files` with one storescu association; returns the wall time.
fn storescu(addr: std::net::SocketAddr, called: &str, files: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = Command::new("/usr/bin/storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aet", "BENCH", "-aec", called, "+sd"])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(files)
        .output()
        .context("running /usr/bin/storescu (apt install dcmtk)")?;
    let took = started.elapsed();
    if !output.status.success() {
        bail!(
            "storescu to {called} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(took)
}

fn build_bindlo(dir: &Path) -> anyhow::Result<PathBuf> {
    let source = dir.join("bindlo.c");
    let library = dir.join("bindlo.so");
    std::fs::write(&source, BINDLO)?;
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status()
        .context("running cc to build peers/bindlo.c")?;
    if !built.success() {
        bail!("cc could not build peers/bindlo.c");
    }
    Ok(library)
}

struct Orthanc {
    process: std::process::Child,
    dicom_port: u16,
    http_port: u16,
}

impl Orthanc {
    async fn start(dir: &Path, bindlo: &Path) -> anyhow::Result<Orthanc> {
        let binary = Path::new("/usr/sbin/Orthanc");
        if !binary.exists() {
            bail!("no Orthanc");
        }
        let dicom = free_loopback_addr()?;
        let http = free_loopback_addr()?;
        let db = dir.join("orthanc");
        std::fs::create_dir_all(&db)?;
        let config = db.join("orthanc.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"Name": "bench", "StorageDirectory": {db:?}, "IndexDirectory": {db:?}, "HttpPort": {}, "DicomPort": {}, "DicomAet": "ORTHANC", "RemoteAccessAllowed": false, "AuthenticationEnabled": false, "DicomAlwaysAllowStore": true, "DicomAlwaysAllowEcho": true}}"#,
                http.port(),
                dicom.port(),
                db = db.display().to_string()
            ),
        )?;
        let mut process = Command::new(binary)
            .env("LD_PRELOAD", bindlo)
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_for_port(dicom, &mut process).await?;
        Ok(Orthanc {
            process,
            dicom_port: dicom.port(),
            http_port: http.port(),
        })
    }

    /// Waits until Orthanc holds `count` instances; returns the time since `since`.
    async fn wait_for(&self, count: usize, since: Instant) -> anyhow::Result<Duration> {
        let url = format!("http://127.0.0.1:{}/statistics", self.http_port);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let stats: serde_json::Value = client.get(&url).send().await?.json().await?;
            if stats["CountInstances"].as_u64().unwrap_or(0) as usize >= count {
                return Ok(since.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "Orthanc holds {} of {count} instances after 600 s",
                    stats["CountInstances"]
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
