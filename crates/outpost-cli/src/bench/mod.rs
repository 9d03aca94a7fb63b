//! `outpost bench hl7`: an agent (MLLP in → queue → MLLP out) in its own process with a
//! downstream on loopback, driven by N messages over M connections; then the same load
//! against python-hl7's asyncio MLLP server, which stores nothing, as the reference peer.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use outpost_hl7::Ack;
use outpost_mllp::MllpClient;

use crate::downstream::Downstream;
use crate::samples;

/// The reference peer, copied from the verified recipe in `peers/`.
const PYTHON_PEER: &str = include_str!("../../../../peers/pyhl7_mllp_server.py");

mod cdc;
mod dicom;
mod fleet;
mod jobs;
mod uplink;

/// A progress bar for enrolling and connecting simulated agents.
pub(crate) fn fleet_progress(agents: usize) -> ProgressBar {
    let progress = ProgressBar::new(agents as u64);
    progress.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress
}

/// Registers `agents` simulated agents straight in the hub's store, each with a key made
/// here; returns their ids and keys.
pub(crate) async fn register_agents(
    store: &dyn outpost_hub::store::Store,
    agents: usize,
    id_prefix: &str,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<(String, ed25519_dalek::SigningKey)>> {
    progress.set_prefix("enrolling");
    let mut identities = Vec::with_capacity(agents);
    for n in 0..agents {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let agent = outpost_hub::store::AgentRecord {
            id: format!("{id_prefix}{n:06}"),
            name: format!("Bench practice {n}"),
            public_key: hex::encode(key.verifying_key().to_bytes()),
            hostname: format!("bench-{n}"),
            enrolled_at_ms: outpost_hub::now_ms(),
            revoked_at_ms: None,
            last_seen_ms: None,
            inventory: None,
        };
        store.insert_agent(&agent).await?;
        identities.push((agent.id, key));
        progress.inc(1);
    }
    Ok(identities)
}

/// When each message was sent, by control id, for end-to-end latency.
pub(crate) type SendTimes = Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>;

/// What to benchmark.
#[derive(Subcommand)]
pub enum BenchTarget {
    /// HL7 over MLLP through the agent's durable queue, beside python-hl7's server.
    Hl7 {
        /// Messages to send.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Sender connections (each waits for its ACK before the next message).
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// The Python that has the `hl7` package (pip install hl7).
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Many simulated agents (real uplink sessions) against one hub: memory per session
    /// and heartbeats per second.
    Fleet {
        /// Simulated agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Heartbeat period the hub asks for.
        #[arg(long, default_value_t = 5)]
        heartbeat_secs: u64,
    },
    /// Support jobs: one `health` job fanned out to N simulated agents (real uplinks and
    /// job runners in this process), jobs/s for one agent, and the agent-side check cost.
    Jobs {
        /// Simulated agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
    },
    /// DICOM: dcmtk's storescu sends the same CT-like instances to the agent (durable,
    /// encrypted) and to dcmtk's storescp (plain files); then the agent forwards them to
    /// Orthanc.
    Dicom {
        /// Instances to send.
        #[arg(long, default_value_t = 2000)]
        instances: usize,
        /// Rows and columns of each 16-bit image (512: about 0.5 MB per instance).
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// Associations at once in the second round (storescp runs with --fork there).
        #[arg(long, default_value_t = 4)]
        associations: usize,
        /// Timed rounds per side, storescp and agent taking turns; each side's median
        /// counts, so a stall (or a lucky spell) of the machine in one round decides nothing.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The Python that has pydicom (to make the instances).
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Database sync: PostgreSQL changes at a steady rate, latency from commit to the
    /// agent's queue, and the snapshot's rows/s beside `COPY … TO STDOUT`.
    Cdc {
        /// Changes (single-row transactions) per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// How long to write.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Rows of the snapshot table.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Which databases, comma-separated.
        #[arg(long, default_value = "postgres,mariadb")]
        databases: String,
    },
    /// Agent queue to the hub's store: messages/s, and latency from MLLP in to visible in
    /// the data API.
    Uplink {
        /// Messages to send.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Sender connections into the agent's MLLP source.
        #[arg(long, default_value_t = 8)]
        connections: usize,
    },
}

/// Runs a benchmark and prints its figures.
pub async fn run(target: BenchTarget) -> anyhow::Result<()> {
    match target {
        BenchTarget::Hl7 {
            messages,
            connections,
            python,
        } => hl7(messages, connections, python).await,
        BenchTarget::Uplink {
            messages,
            connections,
        } => uplink::run(messages, connections).await,
        BenchTarget::Fleet {
            agents,
            heartbeat_secs,
        } => fleet::run(agents, heartbeat_secs).await,
        BenchTarget::Jobs { agents } => jobs::run(agents).await,
        BenchTarget::Cdc {
            rate,
            seconds,
            rows,
            databases,
        } => cdc::run(rate, seconds, rows, &databases).await,
        BenchTarget::Dicom {
            instances,
            size,
            associations,
            rounds,
            python,
        } => dicom::run(instances, size, associations, rounds, &python).await,
    }
}

async fn hl7(messages: usize, connections: usize, python: String) -> anyhow::Result<()> {
    let connections = connections.max(1);
    let work = tempfile::tempdir()?;
    let downstream = Downstream::start(None).await?;

    let source_addr = free_loopback_addr()?;
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[[source]]\nname = \"in\"\nkind = \"mllp\"\nlisten = \"{source_addr}\"\n\
             [[sink]]\nname = \"out\"\nkind = \"mllp\"\nconnect = \"{}\"\n[[route]]\nfrom = \"in\"\nto = [\"out\"]\n",
            downstream.addr
        ),
    )?;
    let mut agent = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("agent.log"))?)
        .spawn()
        .context("starting the agent")?;
    let agent_result =
        measure_agent(&mut agent, source_addr, messages, connections, &downstream).await;
    stop(&mut agent);
    let agent_figures = agent_result
        .with_context(|| format!("agent log: {}", tail(&work.path().join("agent.log"))))?;

    let peer_addr = free_loopback_addr()?;
    let script = work.path().join("pyhl7_mllp_server.py");
    std::fs::write(&script, PYTHON_PEER)?;
    let mut peer = Command::new(&python)
        .arg(&script)
        .arg(peer_addr.port().to_string())
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("peer.log"))?)
        .spawn()
        .with_context(|| format!("starting {python} (needs python-hl7: pip install hl7)"))?;
    let peer_result = async {
        wait_for_port(peer_addr, &mut peer).await?;
        drive("python-hl7", peer_addr, messages, connections, None).await
    }
    .await;
    stop(&mut peer);
    let peer_figures = peer_result.with_context(|| {
        format!(
            "python-hl7 peer log: {}",
            tail(&work.path().join("peer.log"))
        )
    })?;

    let fsyncs = fsync_rate(work.path())?;
    let AgentFigures {
        load,
        drained_after,
        rss_idle_kb,
        rss_load_kb,
    } = agent_figures;
    println!("agent: {} acknowledged, {} errors in {:.2} s; downstream had all of them {:.2} s after the first", load.acked, load.errors, load.elapsed.as_secs_f64(), drained_after.as_secs_f64());
    println!(
        "peer python-hl7: {} acknowledged, {} errors in {:.2} s",
        peer_figures.acked,
        peer_figures.errors,
        peer_figures.elapsed.as_secs_f64()
    );
    println!("disk: {fsyncs:.0} fsync/s on this machine (one fsync per message would cap the agent there; group commit is what lifts it)");
    println!(
        "memory: agent RSS idle {} | under load {}",
        mb(rss_idle_kb),
        mb(rss_load_kb)
    );
    let ratio = load.rate() / peer_figures.rate().max(f64::MIN_POSITIVE);
    println!(
        "hl7: {:.0} msg/s p50 {:.2} ms p99 {:.2} ms | peer python-hl7: {:.0} msg/s | ratio {:.2}",
        load.rate(),
        load.percentile_ms(50.0),
        load.percentile_ms(99.0),
        peer_figures.rate(),
        ratio
    );
    Ok(())
}

struct AgentFigures {
    load: LoadFigures,
    drained_after: Duration,
    rss_idle_kb: Option<u64>,
    rss_load_kb: Option<u64>,
}

async fn measure_agent(
    agent: &mut Child,
    addr: SocketAddr,
    messages: usize,
    connections: usize,
    downstream: &Downstream,
) -> anyhow::Result<AgentFigures> {
    wait_for_port(addr, agent).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = agent.id();
    let rss_idle_kb = rss_kb(pid);
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = None;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_kb(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let load = drive("agent", addr, messages, connections, None).await;
    sampling.store(false, Ordering::Relaxed);
    let rss_load_kb = sampler.await.ok().flatten();
    let load = load?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while downstream.count.load(Ordering::Relaxed) < load.acked as u64 {
        if Instant::now() > deadline {
            bail!(
                "downstream received {} of {} acknowledged messages within 120 s",
                downstream.count.load(Ordering::Relaxed),
                load.acked
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(AgentFigures {
        load,
        drained_after: started.elapsed(),
        rss_idle_kb,
        rss_load_kb,
    })
}

pub(crate) struct LoadFigures {
    pub(crate) acked: usize,
    pub(crate) errors: usize,
    pub(crate) elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl LoadFigures {
    pub(crate) fn rate(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        self.latencies_us[rank.min(self.latencies_us.len() - 1)] as f64 / 1000.0
    }
}

/// Sends `messages` over `connections` persistent connections, each waiting for its ACK.
pub(crate) async fn drive(
    label: &str,
    addr: SocketAddr,
    messages: usize,
    connections: usize,
    send_times: Option<SendTimes>,
) -> anyhow::Result<LoadFigures> {
    let progress = ProgressBar::new(messages as u64);
    progress.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    progress.set_prefix(label.to_owned());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for connection in 0..connections {
        let progress = progress.clone();
        let send_times = send_times.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = MllpClient::connect(
                addr,
                Duration::from_secs(5),
                outpost_mllp::DEFAULT_MAX_FRAME_BYTES,
            )
            .await?;
            let (mut acked, mut errors, mut latencies) = (0usize, 0usize, Vec::new());
            for n in (connection..messages).step_by(connections) {
                let message = samples::lab_result(&format!("B{n}"), n);
                let sent = Instant::now();
                if let Some(times) = &send_times {
                    if let Ok(mut times) = times.lock() {
                        times.insert(format!("B{n}"), sent);
                    }
                }
                let reply = client.request(&message, Duration::from_secs(30)).await?;
                match Ack::parse(&reply) {
                    Ok(ack) if ack.code.is_accept() => {
                        acked += 1;
                        latencies.push(sent.elapsed().as_micros() as u64);
                    }
                    _ => errors += 1,
                }
                progress.inc(1);
            }
            anyhow::Ok((acked, errors, latencies))
        }));
    }
    let mut figures = LoadFigures {
        acked: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    for task in tasks {
        let (acked, errors, latencies) = task.await??;
        figures.acked += acked;
        figures.errors += errors;
        figures.latencies_us.extend(latencies);
    }
    figures.elapsed = started.elapsed();
    figures.latencies_us.sort_unstable();
    progress.finish_and_clear();
    Ok(figures)
}

pub(crate) fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

pub(crate) async fn wait_for_port(addr: SocketAddr, process: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = process.try_wait()? {
            bail!("process exited with {status} before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("nothing listening on {addr} after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn stop(process: &mut Child) {
    let _ = process.kill();
    let _ = process.wait();
}

/// fsyncs per second of 4 KiB appends in `dir`, for one second.
fn fsync_rate(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0u8; 4096];
    let started = Instant::now();
    let mut count = 0u32;
    while started.elapsed() < Duration::from_secs(1) {
        file.write_all(&block)?;
        file.sync_data()?;
        count += 1;
    }
    let rate = f64::from(count) / started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// Resident memory of a process in KiB, where the OS tells it.
#[cfg(target_os = "linux")]
pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn rss_kb(_pid: u32) -> Option<u64> {
    None
}

pub(crate) fn mb(kb: Option<u64>) -> String {
    kb.map(|kb| format!("{:.1} MB", kb as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
