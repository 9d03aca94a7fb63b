//! `outpost demo`: a hub and an enrolled agent on loopback with embedded defaults. Sample
//! HL7 messages go into the agent's MLLP source and out to the hub (visible in the data API
//! and dashboard) and to a downstream "lab" MLLP server. A small practice database (SQLite)
//! is captured too: each appointment booked or moved becomes a change event in
//! `events.jsonl` in the agent's folder and at the hub. Prints where everything is and
//! what to try.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use outpost_agent::AgentConfig;
use outpost_hl7::Ack;
use outpost_hub::store::StaffRecord;
use outpost_hub::{secrets, HubConfig};
use outpost_mllp::MllpClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::downstream::Downstream;
use crate::{inspect, samples, signals};

/// How often the demo sends another message after the first batch.
const SEND_EVERY: Duration = Duration::from_secs(3);

/// The demo practice's database: SQLite, with the column the agent polls on.
const PRACTICE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS appointment (
    aptnum     INTEGER PRIMARY KEY,
    patnum     INTEGER NOT NULL,
    start_at   TEXT NOT NULL,
    note       TEXT,
    updated_at INTEGER NOT NULL
)";

/// Runs the demo until `run_for` passes or Ctrl-C. Without `data_dir` it works in a
/// temporary folder that is removed at the end.
/// The demo practice's support policy: status, logs and connector control unattended,
/// nothing else.
const DEMO_POLICY: &str = r#"# The practice owns this file; the hub can neither read nor change it.
access = "unattended"

[allow]
health = true
"logs.tail" = true
"logs.search" = true
diagnostics = true
"connector.restart" = true
"connector.pause" = true
"connector.resume" = true
"#;

pub async fn run(run_for: Option<Duration>, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temporary = tempfile::Builder::new().prefix("outpost-demo-").tempdir()?;
    let root = match &data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.canonicalize()?
        }
        None => temporary.path().to_owned(),
    };
    let shutdown = CancellationToken::new();

    let hub_config = HubConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: root.join("hub"),
        heartbeat: Duration::from_secs(2),
        ..HubConfig::default()
    };
    let hub = outpost_hub::start(hub_config, shutdown.child_token())
        .await
        .context("starting the demo hub")?;
    let hub_url = format!("https://{}", hub.addr);
    let ca = hub
        .ca_path
        .clone()
        .context("the demo hub has no CA of its own")?;
    let now = outpost_hub::now_ms();
    let token = secrets::new_secret("opt_");
    hub.state
        .store
        .create_token(
            &secrets::hash_secret(&token),
            "Demo Family Practice",
            now + 3_600_000,
        )
        .await?;
    let api_key = secrets::new_secret("opk_");
    hub.state
        .store
        .create_api_key(&secrets::hash_secret(&api_key), "demo", now)
        .await?;
    let staff_token = secrets::new_secret("ops_");
    let staff = StaffRecord {
        name: "support@demo-vendor".into(),
        role: "admin".into(),
        token_hash: secrets::hash_secret(&staff_token),
        created_at_ms: now,
        disabled_at_ms: None,
    };
    hub.state.store.insert_staff(&staff).await?;

    let (events_tx, mut events) = mpsc::channel(256);
    let lab = Downstream::start(Some(events_tx))
        .await
        .context("starting the demo lab")?;
    let practice = PracticeDatabase::create(&root.join("agent").join("pms.db"))?;
    let agent_config = agent_config(&root.join("agent"), &hub_url, &token, &ca, lab.addr)?;
    let agent = outpost_agent::start(agent_config.clone(), shutdown.child_token())
        .await
        .context("starting the demo agent")?;
    let source = agent
        .listeners
        .first()
        .map(|(_, addr)| *addr)
        .context("the demo source did not bind")?;

    println!("Outpost demo (hub and agent on loopback)");
    println!("  hub        {hub_url}   CA {}", ca.display());
    println!("  dashboard  {hub_url}/   (sign in with the API key; the CA is the demo's own, so the browser will warn)");
    println!("  API key    {api_key}");
    println!("  staff      support@demo-vendor, token {staff_token} (sign in with it to run support jobs)");
    println!("  agent      MLLP source \"lab-in\" on {source}, sinks \"vendor\" (the hub) and \"lab-out\" (a lab at {})", lab.addr);
    println!(
        "             SQL source \"pms\" polling {} into {} and the hub",
        practice.path.display(),
        agent_config.data_dir.join("events.jsonl").display()
    );
    println!("  try        curl --cacert {} -H 'Authorization: Bearer {api_key}' '{hub_url}/api/v1/messages?after=0&limit=10'", ca.display());
    println!(
        "             curl --cacert {} {hub_url}/api/v1/openapi.json",
        ca.display()
    );
    println!(
        "             outpost queue status --config {}",
        agent_config.path.display()
    );
    let agent_id = outpost_uplink::Credentials::load(&agent_config.data_dir)?.agent_id;
    println!(
        "             OUTPOST_HUB={hub_url} OUTPOST_HUB_CA={} OUTPOST_STAFF_TOKEN={staff_token} outpost job run --agent {agent_id} logs.tail",
        ca.display()
    );
    println!(
        "             outpost approvals --config {} list",
        agent_config.path.display()
    );
    println!();

    let printer = tokio::spawn(async move {
        while let Some(received) = events.recv().await {
            println!(
                "  lab received {} {} ({} bytes)",
                received.msg_type, received.control_id, received.bytes
            );
        }
    });
    let mut sender = MllpClient::connect(
        source,
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
    practice.book(1, 1001, "2026-12-01T09:00:00Z", Some("new patient"))?;
    practice.book(2, 1002, "2026-12-01T09:30:00Z", None)?;
    support_job(&hub, &staff, &agent_id).await?;
    let deadline = run_for.map(|d| tokio::time::Instant::now() + d);
    let mut next: usize = 4;
    let mut booked: i64 = 3;
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
                if next.is_multiple_of(2) {
                    practice.book(booked, 1000 + booked, "2026-12-02T10:00:00Z", Some("booked online"))?;
                    booked += 1;
                } else {
                    practice.move_to(1, &format!("2026-12-01T{:02}:00:00Z", 8 + next % 9))?;
                }
                next += 1;
            }
        }
    }
    // The source polls every second: give it one more look before the report.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    wait_for_drain(&agent).await;
    report(&hub, &agent, lab.count.load(Ordering::Relaxed)).await?;
    report_changes(&agent_config.data_dir.join("events.jsonl"))?;
    agent.stop().await;
    shutdown.cancel();
    hub.wait().await;
    printer.abort();
    Ok(())
}

/// Runs one signed `health` job through the hub as the demo's staff member and prints
/// how the agent decided and what it answered.
async fn support_job(
    hub: &outpost_hub::RunningHub,
    staff: &StaffRecord,
    agent_id: &str,
) -> anyhow::Result<()> {
    let request = outpost_hub::jobs::JobRequest {
        agent_ids: vec![agent_id.to_owned()],
        capability: "health".into(),
        args: serde_json::json!({}),
        expires_in: Duration::from_secs(60),
        max_concurrency: 1,
        error_threshold: None,
    };
    let (_, jobs) = outpost_hub::jobs::submit(&hub.state, staff, request).await?;
    let Some(job_id) = jobs.first().map(|job| job.id.clone()) else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if let Some(job) = hub.state.store.job(&job_id).await? {
            let finished = outpost_proto::JobState::from_name(&job.state)
                .is_some_and(outpost_proto::JobState::is_final);
            if finished {
                println!(
                    "  support job {job_id} (health, signed for {}): {} by policy rule {}: {}",
                    job.staff,
                    job.state,
                    job.rule.as_deref().unwrap_or("-"),
                    job.summary.or(job.reason).unwrap_or_default()
                );
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  support job {job_id} (health): no answer within 15 s");
    Ok(())
}

/// Gives the sinks up to five seconds to deliver what was just acknowledged.
async fn wait_for_drain(agent: &outpost_agent::RunningAgent) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let pending: u64 = match agent.queue.stats().await {
            Ok(stats) => stats.sinks.iter().map(|s| s.pending).sum(),
            Err(_) => return,
        };
        if pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn agent_config(
    dir: &Path,
    hub_url: &str,
    token: &str,
    ca: &Path,
    lab: std::net::SocketAddr,
) -> anyhow::Result<AgentConfig> {
    std::fs::create_dir_all(dir)?;
    let text = format!(
        r#"data_dir = "."
policy = "policy.toml"
[hub]
url = "{hub_url}"
token = "{token}"
ca_file = {ca:?}
[[source]]
name = "lab-in"
kind = "mllp"
listen = "127.0.0.1:0"
[[sink]]
name = "vendor"
kind = "hub"
[[sink]]
name = "lab-out"
kind = "mllp"
connect = "{lab}"
[[route]]
from = "lab-in"
to = ["vendor", "lab-out"]
[[source]]
name = "pms"
kind = "sql"
url = "sqlite:pms.db"
mode = "poll"
interval = "1s"
watermark = "updated_at"
tables = [ {{ name = "appointment", key = ["aptnum"] }} ]
[[sink]]
name = "events"
kind = "jsonl"
path = "events.jsonl"
[[route]]
from = "pms"
to = ["events", "vendor"]
"#,
        ca = ca.display().to_string()
    );
    std::fs::write(dir.join("policy.toml"), DEMO_POLICY)?;
    let path = dir.join("agent.toml");
    std::fs::write(&path, &text)?;
    Ok(AgentConfig::parse(&text, &path)?)
}

async fn report(
    hub: &outpost_hub::RunningHub,
    agent: &outpost_agent::RunningAgent,
    lab_count: u64,
) -> anyhow::Result<()> {
    println!();
    let filter = outpost_hub::store::MessageFilter {
        limit: 1000,
        ..Default::default()
    };
    let at_hub = hub.state.store.messages(&filter).await?;
    println!("Where the messages went:");
    println!(
        "  hub stored {} (data API: GET /api/v1/messages)",
        at_hub.len()
    );
    println!("  lab received {lab_count}");
    let stats = agent.queue.stats().await?;
    for sink in &stats.sinks {
        println!(
            "  agent sink {:<8} delivered {}  pending {}  dead letters {}",
            sink.sink, sink.delivered, sink.pending, sink.dead
        );
    }
    println!(
        "  refused at intake and kept for inspection: {}",
        stats.rejected
    );
    for (name, status) in agent.health.snapshot() {
        println!(
            "  {} {:<8} {:<8} items {}  failures {}  last error: {}",
            status.role,
            name,
            status.state.as_str(),
            status.items,
            status.failures,
            status.last_error.as_deref().unwrap_or("-")
        );
        if let Some(detail) = &status.detail {
            println!("      {detail}");
        }
    }
    println!(
        "  agent queue on disk: {}",
        inspect::bytes(agent.queue.disk_bytes())
    );
    Ok(())
}

/// The demo practice's database, written the way a practice-management program would.
struct PracticeDatabase {
    path: PathBuf,
    connection: rusqlite::Connection,
}

impl PracticeDatabase {
    fn create(path: &Path) -> anyhow::Result<PracticeDatabase> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let connection = rusqlite::Connection::open(path)
            .with_context(|| format!("creating the demo practice database {}", path.display()))?;
        connection.execute_batch(PRACTICE_SCHEMA)?;
        Ok(PracticeDatabase {
            path: path.to_owned(),
            connection,
        })
    }

    fn book(
        &self,
        aptnum: i64,
        patnum: i64,
        start_at: &str,
        note: Option<&str>,
    ) -> anyhow::Result<()> {
        self.connection.execute(
            "INSERT OR REPLACE INTO appointment (aptnum, patnum, start_at, note, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![aptnum, patnum, start_at, note, outpost_queue::now_ms()],
        )?;
        println!("  practice booked appointment {aptnum} for patient {patnum} at {start_at}");
        Ok(())
    }

    fn move_to(&self, aptnum: i64, start_at: &str) -> anyhow::Result<()> {
        self.connection.execute(
            "UPDATE appointment SET start_at = ?2, updated_at = ?3 WHERE aptnum = ?1",
            rusqlite::params![aptnum, start_at, outpost_queue::now_ms()],
        )?;
        println!("  practice moved appointment {aptnum} to {start_at}");
        Ok(())
    }
}

/// How many change events reached the folder sink, and the last one.
fn report_changes(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    println!(
        "  practice database: {} change event(s) in {}",
        lines.len(),
        path.display()
    );
    if let Some(last) = lines.last() {
        println!("      last: {last}");
    }
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
