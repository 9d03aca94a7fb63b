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
pub async fn run(
    instances: usize,
    size: usize,
    associations: usize,
    rounds: usize,
    python: &str,
) -> anyhow::Result<()> {
    let associations = associations.max(1);
    let rounds = rounds.max(1);
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
    let shares = split_into_shares(&files, &work.path().join("shares"), associations)?;
    let bindlo = build_bindlo(work.path())?;
    let per_sec = |time: Duration| instances as f64 / time.as_secs_f64().max(1e-6);
    let mb_per_sec = |time: Duration| total_bytes as f64 / 1e6 / time.as_secs_f64().max(1e-6);

    // Intake alone, as storescp does nothing else: the agent's sink points at a closed
    // port, so it only backs off while the instances come in.
    // Each round starts with nothing waiting to be written back: otherwise a round pays
    // for the gigabyte the round before left in the page cache (the agent's syncs wait
    // behind it; storescp never syncs).
    // The two sides take turns for `rounds` rounds and each side's median round counts
    // (the best is printed too): this VM's speed drifts by a third or more within minutes
    // (other tenants, the file system's bookkeeping of recent deletes), and taking turns
    // gives both sides the same chances; the median is not swayed by one lucky or unlucky
    // round on either side. Every round writes a fresh folder; nothing is deleted until the
    // end. Each round starts as `prepare_round` says.
    let one = std::slice::from_ref(&files);
    eprintln!("one association: storescp and the agent, {rounds} rounds each…");
    let one_rounds = take_turns(rounds, |round| {
        let (work, bindlo) = (work.path(), bindlo.as_path());
        async move {
            prepare_round(total_bytes);
            let peer = storescp_run(work, bindlo, false, &format!("storescp-{round}"), one).await?;
            prepare_round(total_bytes);
            let agent = agent_run(work, &format!("intake-1-{round}"), None, one).await?;
            Ok((peer, agent))
        }
    })
    .await?;
    let many_rounds = if associations > 1 {
        eprintln!("{associations} associations at once: storescp --fork and the agent, {rounds} rounds each…");
        let many_rounds = take_turns(rounds, |round| {
            let (work, bindlo, shares) = (work.path(), bindlo.as_path(), shares.as_slice());
            async move {
                prepare_round(total_bytes);
                let peer = storescp_run(
                    work,
                    bindlo,
                    true,
                    &format!("storescp-fork-{round}"),
                    shares,
                )
                .await?;
                prepare_round(total_bytes);
                let agent = agent_run(work, &format!("intake-n-{round}"), None, shares).await?;
                Ok((peer, agent))
            }
        })
        .await?;
        Some(many_rounds)
    } else {
        None
    };

    // Forwarding: intake and forwarding overlap, as they do at a practice; the figure runs
    // from the first instance in to the last one stored in Orthanc.
    let orthanc = Orthanc::start(work.path(), &bindlo).await.ok();
    let mut forward = None;
    let mut direct = None;
    if let Some(orthanc) = &orthanc {
        eprintln!("forwarding to Orthanc…");
        let started = Instant::now();
        agent_run(
            work.path(),
            "forward",
            Some((orthanc, instances, started)),
            std::slice::from_ref(&files),
        )
        .await?;
        forward = Some(per_sec(started.elapsed()));
        // The same files straight from storescu to Orthanc: what Orthanc itself takes.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], orthanc.dicom_port));
        direct = Some(per_sec(storescu(addr, "ORTHANC", &files)?));
    }
    if let Some(mut orthanc) = orthanc {
        stop(&mut orthanc.process);
    }

    let best_rounds = |times: &Rounds| {
        let (peer, agent) = times.best();
        format!(
            "best rounds: storescp {:.0}, agent {:.0}, ratio {:.2}",
            per_sec(peer),
            per_sec(agent),
            per_sec(agent) / per_sec(peer)
        )
    };
    let (peer_one, agent_one) = one_rounds.medians();
    let ratio_one = per_sec(agent_one) / per_sec(peer_one);
    println!(
        "1 association (median of {rounds}): storescu -> storescp (plain files) {:.0} instances/s {:.1} MB/s | storescu -> agent (encrypted, durable before success) {:.0} instances/s {:.1} MB/s | ratio {ratio_one:.2} | {}",
        per_sec(peer_one),
        mb_per_sec(peer_one),
        per_sec(agent_one),
        mb_per_sec(agent_one),
        best_rounds(&one_rounds),
    );
    let many = match &many_rounds {
        Some(many_rounds) => {
            let (peer, agent) = many_rounds.medians();
            let ratio = per_sec(agent) / per_sec(peer);
            println!(
                "{associations} associations at once (median of {rounds}): storescp --fork {:.0} instances/s {:.1} MB/s | agent {:.0} instances/s {:.1} MB/s | ratio {ratio:.2} | {}",
                per_sec(peer),
                mb_per_sec(peer),
                per_sec(agent),
                mb_per_sec(agent),
                best_rounds(many_rounds),
            );
            format!(
                " | {associations} assoc: agent {:.0} inst/s, storescp --fork {:.0} inst/s, ratio {ratio:.2}",
                per_sec(agent),
                per_sec(peer)
            )
        }
        None => String::new(),
    };
    match (forward, direct) {
        (Some(rate), Some(direct)) => println!("agent -> Orthanc (C-STORE): {rate:.0} instances/s from the first instance in to the last stored | storescu -> Orthanc: {direct:.0} instances/s"),
        _ => println!("agent -> Orthanc: skipped (no /usr/sbin/Orthanc)"),
    }
    println!(
        "dicom: {instances} x {:.2} MB, median of {rounds} rounds | 1 assoc: agent {:.0} inst/s {:.1} MB/s, storescp {:.0} inst/s {:.1} MB/s{many} | forward {} inst/s (storescu to Orthanc {}) | ratio {ratio_one:.2}",
        total_bytes as f64 / 1e6 / instances.max(1) as f64,
        per_sec(agent_one),
        mb_per_sec(agent_one),
        per_sec(peer_one),
        mb_per_sec(peer_one),
        forward.map_or_else(|| "n/a".to_owned(), |rate| format!("{rate:.0}")),
        direct.map_or_else(|| "n/a".to_owned(), |rate| format!("{rate:.0}")),
    );
    Ok(())
}

/// Spreads the files over `count` folders (hard links), one per association.
fn split_into_shares(files: &Path, shares: &Path, count: usize) -> anyhow::Result<Vec<PathBuf>> {
    let folders: Vec<PathBuf> = (0..count).map(|i| shares.join(i.to_string())).collect();
    for folder in &folders {
        std::fs::create_dir_all(folder)?;
    }
    let mut names: Vec<_> = std::fs::read_dir(files)?
        .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
        .collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let to = folders[i % count].join(name);
        if std::fs::hard_link(files.join(name), &to).is_err() {
            std::fs::copy(files.join(name), &to)?;
        }
    }
    Ok(folders)
}

/// Each side's time in every round.
struct Rounds {
    peer: Vec<Duration>,
    agent: Vec<Duration>,
}

impl Rounds {
    /// The median round of each side: (storescp, agent).
    fn medians(&self) -> (Duration, Duration) {
        (median(&self.peer), median(&self.agent))
    }

    /// The fastest round of each side: (storescp, agent).
    fn best(&self) -> (Duration, Duration) {
        let fastest = |times: &[Duration]| times.iter().copied().min().unwrap_or(Duration::MAX);
        (fastest(&self.peer), fastest(&self.agent))
    }
}

/// The middle time (the mean of the two middle ones for an even count).
fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::MAX,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2,
    }
}

/// Runs `round` (storescp's time, then the agent's) `rounds` times.
async fn take_turns<F, Fut>(rounds: usize, mut round: F) -> anyhow::Result<Rounds>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Duration, Duration)>>,
{
    let mut times = Rounds {
        peer: Vec::with_capacity(rounds),
        agent: Vec::with_capacity(rounds),
    };
    for index in 0..rounds {
        let (peer, agent) = round(index).await?;
        eprintln!(
            "  round {}: storescp {:.2} s, agent {:.2} s",
            index + 1,
            peer.as_secs_f64(),
            agent.as_secs_f64()
        );
        times.peer.push(peer);
        times.agent.push(agent);
    }
    Ok(times)
}

/// Makes every timed round start alike: nothing left to write back, and memory for the
/// round's page cache ready to use.
fn prepare_round(round_bytes: u64) {
    write_back_page_cache();
    warm_memory(round_bytes.saturating_mul(3) / 2);
}

/// Touches, then frees, `bytes` of memory. A VM that hands freed memory back to its host
/// (this one does) makes the next process to fill that much fresh page cache pay for
/// faulting it back in: storescp, which writes through the page cache, ran at 420–480
/// instances/s over one association after a quiet spell and at 630–780 right after memory
/// had been touched and freed (the agent writes with `O_DIRECT`: 490–585 either way). A
/// physical server has no such cost, so every round gets memory that is ready, which is
/// the peer at its best.
fn warm_memory(bytes: u64) {
    let Ok(len) = usize::try_from(bytes) else {
        return;
    };
    let mut memory = vec![0u8; len];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&memory);
}

/// Writes every dirty page back to disk (`sync`), so no round pays for another's.
#[cfg(unix)]
fn write_back_page_cache() {
    if let Err(err) = Command::new("sync").status() {
        eprintln!("sync: {err} (rounds may pay for each other's write-back)");
    }
}

/// Windows has no `sync`; its cache manager writes back on its own schedule.
#[cfg(not(unix))]
fn write_back_page_cache() {}

/// storescp writing plain files under `label` (`--fork`: a process per association);
/// returns the wall time for storescu to send every folder, one association per folder,
/// all at once.
async fn storescp_run(
    dir: &Path,
    bindlo: &Path,
    fork: bool,
    label: &str,
    folders: &[PathBuf],
) -> anyhow::Result<Duration> {
    let addr = free_loopback_addr()?;
    let out = dir.join(label);
    std::fs::create_dir_all(&out)?;
    let mut command = Command::new("/usr/bin/storescp");
    command
        .env("LD_PRELOAD", bindlo)
        .env("TCP_NODELAY", "1")
        .args(["-aet", "STORESCP", "-od"])
        .arg(&out)
        .args(["-fe", ".dcm"]);
    if fork {
        command.arg("--fork");
    }
    let mut peer = command
        .arg(addr.port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting /usr/bin/storescp (apt install dcmtk)")?;
    let result = async {
        wait_for_port(addr, &mut peer).await?;
        storescu_all(addr, "STORESCP", folders)
    }
    .await;
    stop(&mut peer);
    result
}

/// An agent with one DICOM source and a sink to Orthanc (or to a closed port); returns the
/// wall time for storescu to send every folder at once, or with `forward`, the time until
/// Orthanc holds every instance.
async fn agent_run(
    dir: &Path,
    label: &str,
    forward: Option<(&Orthanc, usize, Instant)>,
    folders: &[PathBuf],
) -> anyhow::Result<Duration> {
    let addr = free_loopback_addr()?;
    let home = dir.join(label);
    std::fs::create_dir_all(&home)?;
    let sink_port = forward.map_or(9, |(orthanc, _, _)| orthanc.dicom_port);
    let config = format!(
        "data_dir = \"agent\"\n[[source]]\nname = \"modalities\"\nkind = \"dicom\"\nlisten = \"{addr}\"\nae_title = \"OUTPOST\"\n[[sink]]\nname = \"pacs\"\nkind = \"dicom\"\nconnect = \"127.0.0.1:{sink_port}\"\nae_title = \"ORTHANC\"\n[[route]]\nfrom = \"modalities\"\nto = [\"pacs\"]\n"
    );
    let agent_toml = home.join("agent.toml");
    std::fs::write(&agent_toml, config)?;
    let log = home.join("agent.log");
    let mut agent = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "agent", "--config"])
        .arg(&agent_toml)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the agent")?;
    let result = async {
        wait_for_port(addr, &mut agent).await?;
        let took = storescu_all(addr, "OUTPOST", folders)?;
        match forward {
            Some((orthanc, count, since)) => orthanc.wait_for(count, since).await,
            None => Ok(took),
        }
    }
    .await;
    stop(&mut agent);
    result.with_context(|| format!("agent log: {}", tail(&log)))
}

/// One storescu per folder, all at once; returns the wall time until the last finishes.
fn storescu_all(
    addr: std::net::SocketAddr,
    called: &str,
    folders: &[PathBuf],
) -> anyhow::Result<Duration> {
    if let [one] = folders {
        return storescu(addr, called, one);
    }
    let started = Instant::now();
    let senders = folders
        .iter()
        .map(|folder| {
            let called = called.to_owned();
            let folder = folder.clone();
            std::thread::spawn(move || storescu(addr, &called, &folder))
        })
        .collect::<Vec<_>>();
    for sender in senders {
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("a storescu thread panicked"))??;
    }
    Ok(started.elapsed())
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
