//! `outpost bench uplink`: an agent in its own process (MLLP in → queue → hub sink) and a
//! hub in this process; messages/s into the hub's store and the latency from MLLP in to
//! visible in the data API, measured by a reader long-polling the API as an app would.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost_hub::{secrets, HubConfig};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{drive, free_loopback_addr, mb, rss_kb, stop, tail, wait_for_port, SendTimes};

#[derive(Deserialize)]
struct Page {
    messages: Vec<Seen>,
    next_cursor: i64,
}

#[derive(Deserialize)]
struct Seen {
    control_id: Option<String>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(messages: usize, connections: usize) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let hub_config = HubConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: work.path().join("hub"),
        ..HubConfig::default()
    };
    let hub = outpost_hub::start(hub_config, shutdown.child_token()).await?;
    let ca = hub.ca_path.clone().context("bench hub has no CA")?;
    let url = format!("https://{}", hub.addr);
    let (token, api_key) = (secrets::new_secret("opt_"), secrets::new_secret("opk_"));
    let now = outpost_hub::now_ms();
    hub.state
        .store
        .create_token(&secrets::hash_secret(&token), "bench", now + 600_000)
        .await?;
    hub.state
        .store
        .create_api_key(&secrets::hash_secret(&api_key), "bench", now)
        .await?;

    let source = free_loopback_addr()?;
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"agent\"\n[hub]\nurl = \"{url}\"\ntoken = \"{token}\"\nca_file = {ca:?}\n\
             [[source]]\nname = \"in\"\nkind = \"mllp\"\nlisten = \"{source}\"\n\
             [[sink]]\nname = \"vendor\"\nkind = \"hub\"\n[[route]]\nfrom = \"in\"\nto = [\"vendor\"]\n",
            ca = ca.display().to_string()
        ),
    )?;
    let log = work.path().join("agent.log");
    let mut agent = Command::new(std::env::current_exe()?)
        .args(["--log", "warn", "agent", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the agent")?;
    let result = measure(
        &mut agent,
        source,
        &url,
        &ca,
        &api_key,
        messages,
        connections,
    )
    .await;
    stop(&mut agent);
    shutdown.cancel();
    hub.wait().await;
    let figures = result.with_context(|| format!("agent log: {}", tail(&log)))?;
    println!(
        "agent → hub: {} messages stored in {:.2} s; agent RSS under load {}",
        figures.stored,
        figures.elapsed.as_secs_f64(),
        mb(figures.rss_kb)
    );
    println!(
        "uplink: {:.0} msg/s into the hub's store | end-to-end MLLP in → visible in the API p50 {:.1} ms p99 {:.1} ms",
        figures.stored as f64 / figures.elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        figures.p50_ms,
        figures.p99_ms
    );
    Ok(())
}

struct Figures {
    stored: usize,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    rss_kb: Option<u64>,
}

async fn measure(
    agent: &mut std::process::Child,
    source: std::net::SocketAddr,
    url: &str,
    ca: &std::path::Path,
    api_key: &str,
    messages: usize,
    connections: usize,
) -> anyhow::Result<Figures> {
    wait_for_port(source, agent).await?;
    let pem = std::fs::read(ca)?;
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .build()?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let (client, url, key, seen) = (
            client.clone(),
            url.to_owned(),
            api_key.to_owned(),
            seen.clone(),
        );
        tokio::spawn(async move {
            let mut after = 0i64;
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let count = seen.lock().map(|s| s.len()).unwrap_or(0);
                if count >= messages || Instant::now() > deadline {
                    return count;
                }
                let page = client
                    .get(format!(
                        "{url}/api/v1/messages?after={after}&limit=1000&wait=5"
                    ))
                    .bearer_auth(&key)
                    .send()
                    .await;
                let Ok(page) = page else { continue };
                let Ok(page) = page.json::<Page>().await else {
                    continue;
                };
                let at = Instant::now();
                if let Ok(mut seen) = seen.lock() {
                    for message in page.messages {
                        seen.entry(message.control_id.unwrap_or_default())
                            .or_insert(at);
                    }
                }
                after = page.next_cursor;
            }
        })
    };
    let send_times: SendTimes = Arc::default();
    let started = Instant::now();
    let pid = agent.id();
    let load = drive(
        "agent",
        source,
        messages,
        connections,
        Some(send_times.clone()),
    )
    .await?;
    let rss = rss_kb(pid);
    let stored = reader.await?;
    if stored < load.acked {
        bail!(
            "the API showed {stored} of {} acknowledged messages within 300 s",
            load.acked
        );
    }
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let sent = send_times.lock().map(|s| s.clone()).unwrap_or_default();
    let last_seen = seen.values().max().copied().unwrap_or(started);
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            seen.get(id)
                .map(|s| s.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        latencies
            .get(((p / 100.0) * (latencies.len().saturating_sub(1)) as f64).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Figures {
        stored,
        elapsed: last_seen.duration_since(started),
        p50_ms: percentile(50.0),
        p99_ms: percentile(99.0),
        rss_kb: rss,
    })
}
