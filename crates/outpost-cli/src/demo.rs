//! `outpost demo`: an agent on loopback between a sender and a downstream "lab", with
//! sample messages going through, and a report of where each went.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use outpost_agent::AgentConfig;
use outpost_hl7::Ack;
use outpost_mllp::MllpClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::downstream::Downstream;
use crate::{inspect, samples, signals};

/// How often the demo sends another message after the first batch.
const SEND_EVERY: Duration = Duration::from_secs(3);

/// Runs the demo until `run_for` passes or Ctrl-C.
pub async fn run(run_for: Option<Duration>, data_dir: PathBuf) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::channel(256);
    let downstream = Downstream::start(Some(events_tx))
        .await
        .context("starting the demo downstream")?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let config_text = format!(
        r#"data_dir = {data_dir:?}
[[source]]
name = "lab-in"
kind = "mllp"
listen = "127.0.0.1:0"
[[sink]]
name = "lab-out"
kind = "mllp"
connect = "{downstream}"
[[route]]
from = "lab-in"
to = ["lab-out"]
"#,
        data_dir = data_dir.display().to_string(),
        downstream = downstream.addr
    );
    let config_path = data_dir.join("demo-agent.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = AgentConfig::parse(&config_text, &config_path)?;
    let shutdown = CancellationToken::new();
    let agent = outpost_agent::start(config.clone(), shutdown.clone()).await?;
    let source_addr = agent
        .listeners
        .first()
        .map(|(_, addr)| *addr)
        .context("the demo source did not bind")?;

    println!("Outpost demo");
    println!("  agent     MLLP source \"lab-in\" listening on {source_addr}");
    println!(
        "  agent     MLLP sink \"lab-out\" delivering to the downstream lab at {}",
        downstream.addr
    );
    println!("  queue     {}", agent.queue.path().display());
    println!(
        "  config    {}  (try: outpost queue status --config {})",
        config_path.display(),
        config_path.display()
    );
    println!();

    let printer = tokio::spawn(async move {
        while let Some(received) = events.recv().await {
            println!(
                "  downstream lab received {} {} ({} bytes)",
                received.msg_type, received.control_id, received.bytes
            );
        }
    });

    let mut sender = MllpClient::connect(
        source_addr,
        Duration::from_secs(5),
        outpost_mllp::DEFAULT_MAX_FRAME_BYTES,
    )
    .await?;
    let run_id = outpost_queue::now_ms() / 1000;
    let first_batch = [
        samples::lab_result(&format!("DEMO{run_id}-1"), 1),
        samples::admission(&format!("DEMO{run_id}-2")),
        samples::order(&format!("DEMO{run_id}-3")),
        b"this is not an HL7 message".to_vec(),
    ];
    for message in &first_batch {
        send_and_print(&mut sender, message).await?;
    }

    let deadline = run_for.map(|d| tokio::time::Instant::now() + d);
    let mut next = 4;
    loop {
        let stop_at = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop_at => break,
            _ = signals::shutdown_requested() => break,
            _ = tokio::time::sleep(SEND_EVERY) => {
                send_and_print(&mut sender, &samples::lab_result(&format!("DEMO{run_id}-{next}"), next)).await?;
                next += 1;
            }
        }
    }
    // Give the sink a moment to deliver what was just acknowledged.
    let received = downstream.count.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!();
    println!(
        "Where the messages went (downstream received {}):",
        downstream.count.load(Ordering::Relaxed).max(received)
    );
    let stats = agent.queue.stats().await?;
    for sink in &stats.sinks {
        println!(
            "  sink {:<10} delivered {}  pending {}  dead letters {}",
            sink.sink, sink.delivered, sink.pending, sink.dead
        );
    }
    println!(
        "  refused at intake and kept for inspection: {}",
        stats.rejected
    );
    for (name, status) in agent.health.snapshot() {
        println!(
            "  {} {:<10} {:<8} items {}  failures {}  last error: {}",
            status.role,
            name,
            status.state.as_str(),
            status.items,
            status.failures,
            status.last_error.as_deref().unwrap_or("-")
        );
    }
    println!(
        "  queue on disk: {}",
        inspect::bytes(agent.queue.disk_bytes())
    );
    println!(
        "  search it: outpost hl7 search --config {} --type ORU^R01",
        config_path.display()
    );
    agent.stop().await;
    printer.abort();
    Ok(())
}

async fn send_and_print(sender: &mut MllpClient, message: &[u8]) -> anyhow::Result<()> {
    let reply = sender.request(message, Duration::from_secs(10)).await?;
    match Ack::parse(&reply) {
        Ok(ack) => println!(
            "  sender got {} for {}{}",
            ack.code.as_str(),
            if ack.control_id.is_empty() {
                "(no control id)"
            } else {
                &ack.control_id
            },
            ack.text.map(|t| format!(": {t}")).unwrap_or_default()
        ),
        Err(err) => println!("  sender got an unreadable reply: {err}"),
    }
    Ok(())
}
