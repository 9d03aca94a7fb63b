//! `outpost bench fleet --agents N`: a hub in its own process and N simulated agents in
//! this one, each a real agent uplink (TLS 1.3 WebSocket, signed challenge, heartbeats with
//! an inventory). Prints the hub's memory per session and the heartbeats it takes per second.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_hub::HubConfig;
use outpost_proto::Inventory;
use outpost_uplink::{Credentials, Uplink, UplinkHandle};
use tokio_util::sync::CancellationToken;

use super::{free_loopback_addr, mb, rss_kb, stop, tail, wait_for_port};

/// Sessions opened at once while ramping up.
const WAVE: usize = 200;
/// How long heartbeats are counted once every session is up.
const MEASURE: Duration = Duration::from_secs(15);

/// Runs the benchmark and prints its figures.
pub async fn run(agents: usize, heartbeat_secs: u64) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let addr = free_loopback_addr()?;
    let hub_toml = work.path().join("hub.toml");
    std::fs::write(
        &hub_toml,
        format!("listen = \"{addr}\"\ndata_dir = \"hub\"\nheartbeat_secs = {heartbeat_secs}\n"),
    )?;
    let log = work.path().join("hub.log");
    let mut hub = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "hub", "--config"])
        .arg(&hub_toml)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the hub")?;
    let shutdown = CancellationToken::new();
    let result = measure(&mut hub, addr, &hub_toml, agents, &shutdown).await;
    shutdown.cancel();
    stop(&mut hub);
    let figures = result.with_context(|| format!("hub log: {}", tail(&log)))?;
    let per_session_kb = figures
        .rss_full_kb
        .zip(figures.rss_idle_kb)
        .map(|(full, idle)| full.saturating_sub(idle) as f64 / agents.max(1) as f64);
    println!(
        "hub RSS idle {} | with {} sessions {} | ramp-up {:.1} s",
        mb(figures.rss_idle_kb),
        figures.connected,
        mb(figures.rss_full_kb),
        figures.ramp.as_secs_f64()
    );
    println!(
        "fleet: {} sessions held | hub memory {} KiB per session | {:.0} heartbeats/s (every {heartbeat_secs} s per agent)",
        figures.connected,
        per_session_kb.map(|kb| format!("{kb:.1}")).unwrap_or_else(|| "n/a".into()),
        figures.heartbeats_per_sec
    );
    Ok(())
}

struct Figures {
    connected: usize,
    ramp: Duration,
    rss_idle_kb: Option<u64>,
    rss_full_kb: Option<u64>,
    heartbeats_per_sec: f64,
}

async fn measure(
    hub: &mut std::process::Child,
    addr: std::net::SocketAddr,
    hub_toml: &std::path::Path,
    agents: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<Figures> {
    wait_for_port(addr, hub).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = hub.id();
    let rss_idle_kb = rss_kb(pid);
    let config = HubConfig::load(hub_toml)?;
    let store = outpost_hub::open_store(&config).await?;
    let ca = config.data_dir.join("tls").join(outpost_hub::tls::CA_FILE);

    let progress = super::fleet_progress(agents);
    let identities = super::register_agents(store.as_ref(), agents, "agt_bench", &progress).await?;
    drop(store);

    progress.set_position(0);
    progress.set_prefix("connecting");
    let heartbeats = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ramp_start = Instant::now();
    let mut handles: Vec<UplinkHandle> = Vec::with_capacity(agents);
    for wave in identities.chunks(WAVE) {
        let mut this_wave = Vec::new();
        for (agent_id, key) in wave {
            let credentials = Credentials {
                agent_id: agent_id.clone(),
                name: agent_id.clone(),
                hub_url: format!("https://{addr}"),
                key: key.clone(),
                job_key: None,
                tls: outpost_uplink::client_tls(Some(&ca))?,
            };
            let counter = heartbeats.clone();
            let hostname = agent_id.clone();
            let inventory: outpost_uplink::InventorySource = Arc::new(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let hostname = hostname.clone();
                Box::pin(async move {
                    Inventory {
                        hostname,
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Inventory::default()
                    }
                })
            });
            let (downs, _) = tokio::sync::mpsc::channel(1);
            this_wave.push(Uplink::start(
                credentials,
                inventory,
                downs,
                shutdown.child_token(),
            ));
        }
        for handle in &this_wave {
            if tokio::time::timeout(Duration::from_secs(60), handle.wait_connected())
                .await
                .is_err()
            {
                bail!(
                    "a simulated agent did not connect within 60 s ({} connected so far): {:?}",
                    handles.len(),
                    handle.state()
                );
            }
            progress.inc(1);
        }
        handles.extend(this_wave);
    }
    let ramp = ramp_start.elapsed();
    progress.finish_and_clear();

    let before = heartbeats.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(MEASURE).await;
    let counted = heartbeats.load(std::sync::atomic::Ordering::Relaxed) - before;
    let heartbeats_per_sec = counted as f64 / started.elapsed().as_secs_f64();
    let rss_full_kb = rss_kb(pid);
    let connected = handles
        .iter()
        .filter(|h| matches!(h.state(), outpost_uplink::LinkState::Up(_)))
        .count();
    Ok(Figures {
        connected,
        ramp,
        rss_idle_kb,
        rss_full_kb,
        heartbeats_per_sec,
    })
}
