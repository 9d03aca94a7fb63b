//! `outpost bench jobs --agents N`: a hub in its own process and N simulated agents in
//! this one, each a real agent uplink with the real job runner (signature, expiry, replay
//! and policy checks, a fsynced audit log, the audit mirror). Measures the time from
//! submitting one `health` job to all N until every result is back, jobs per second for
//! one agent, and the agent-side check and policy decision per job.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use outpost_agent::jobs::capability::ReloadRequest;
use outpost_agent::jobs::gate::Gate;
use outpost_agent::jobs::mirror;
use outpost_agent::jobs::{runner, JobContext, RunnerSettings};
use outpost_hub::store::StaffRecord;
use outpost_hub::HubConfig;
use outpost_policy::{Policy, Request};
use outpost_proto::{Inventory, JobSpec};
use outpost_uplink::{Credentials, Uplink, UplinkHandle};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{free_loopback_addr, stop, tail, wait_for_port};

/// Sessions opened at once while ramping up.
const WAVE: usize = 200;
/// Jobs sent to one agent for the jobs/s figure.
const SINGLE_AGENT_JOBS: usize = 200;
/// Jobs checked in-process for the check-and-decide figure.
const CHECKS: usize = 5_000;

const POLICY: &str = "access = \"unattended\"\n[allow]\nhealth = true\n";

/// Runs the benchmark and prints its figures.
pub async fn run(agents: usize) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let addr = free_loopback_addr()?;
    let hub_toml = work.path().join("hub.toml");
    std::fs::write(
        &hub_toml,
        format!("listen = \"{addr}\"\ndata_dir = \"hub\"\nheartbeat_secs = 30\n"),
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
    let result = measure(&mut hub, addr, &hub_toml, work.path(), agents, &shutdown).await;
    shutdown.cancel();
    stop(&mut hub);
    // The simulated agents' tasks stop on the cancel; give them a moment before their
    // folders go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let figures = result.with_context(|| format!("hub log: {}", tail(&log)))?;
    let check_us = check_and_decide_micros()?;
    println!(
        "fan-out: {} agents' health results back in {:.2} s (target < 2 s for 1000)",
        figures.agents,
        figures.fan_out.as_secs_f64()
    );
    println!(
        "one agent: {:.0} jobs/s ({SINGLE_AGENT_JOBS} health jobs submitted at once)",
        figures.single_agent_jobs_per_sec
    );
    println!("agent check (signature, agent id, expiry, replay) + policy decision: {check_us:.1} µs per job (target < 100 µs)");
    println!(
        "jobs: {} agents in {:.2} s | {:.0} jobs/s one agent | check+policy {check_us:.1} µs",
        figures.agents,
        figures.fan_out.as_secs_f64(),
        figures.single_agent_jobs_per_sec
    );
    Ok(())
}

struct Figures {
    agents: usize,
    fan_out: Duration,
    single_agent_jobs_per_sec: f64,
}

async fn measure(
    hub: &mut std::process::Child,
    addr: std::net::SocketAddr,
    hub_toml: &std::path::Path,
    work: &std::path::Path,
    agents: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<Figures> {
    wait_for_port(addr, hub).await?;
    let config = HubConfig::load(hub_toml)?;
    let store = outpost_hub::open_store(&config).await?;
    let ca = config.data_dir.join("tls").join(outpost_hub::tls::CA_FILE);
    let job_key = outpost_hub::jobs::load_job_key(store.as_ref()).await?;
    let staff_token = outpost_hub::secrets::new_secret("ops_");
    store
        .insert_staff(&StaffRecord {
            name: "bench@vendor".into(),
            role: "support".into(),
            token_hash: outpost_hub::secrets::hash_secret(&staff_token),
            created_at_ms: outpost_hub::now_ms(),
            disabled_at_ms: None,
        })
        .await?;
    let policy_path = work.join("policy.toml");
    std::fs::write(&policy_path, POLICY)?;

    let progress = super::fleet_progress(agents);
    let identities = super::register_agents(store.as_ref(), agents, "agt_jobs", &progress).await?;
    drop(store);

    progress.set_position(0);
    progress.set_prefix("connecting");
    let mut handles: Vec<UplinkHandle> = Vec::with_capacity(agents);
    for wave in identities.chunks(WAVE) {
        let mut this_wave = Vec::new();
        for (agent_id, key) in wave {
            let data_dir = work.join("agents").join(agent_id);
            std::fs::create_dir_all(&data_dir)?;
            let credentials = Credentials {
                agent_id: agent_id.clone(),
                name: agent_id.clone(),
                hub_url: format!("https://{addr}"),
                key: key.clone(),
                job_key: Some(job_key.verifying_key()),
                tls: outpost_uplink::client_tls(Some(&ca))?,
            };
            let hostname = agent_id.clone();
            let inventory: outpost_uplink::InventorySource = Arc::new(move || {
                let hostname = hostname.clone();
                Box::pin(async move {
                    Inventory {
                        hostname,
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Inventory::default()
                    }
                })
            });
            let (inbound, inbound_rx) = tokio::sync::mpsc::channel(64);
            let uplink = Uplink::start(credentials, inventory, inbound, shutdown.child_token());
            let settings = RunnerSettings {
                agent_id: agent_id.clone(),
                agent_key: key.clone(),
                job_key: Some(job_key.verifying_key()),
                data_dir: data_dir.clone(),
                policy_path: Some(policy_path.clone()),
                config_path: None,
                max_concurrent: 4,
            };
            let cx = JobContext {
                agent_id: agent_id.clone(),
                config: None,
                queue: None,
                health: outpost_agent::Health::default(),
                connectors: outpost_agent::control::ConnectorControls::default(),
                logs: outpost_agent::logbuf::LogBuffer::new(16),
                data_dir,
                started: Instant::now(),
                reload: ReloadRequest::new().0,
            };
            let runner = runner::start(settings, cx, uplink.clone(), shutdown.child_token())?;
            let (mirror_events, mirror_rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(mirror::run(
                runner.audit.clone(),
                uplink.clone(),
                mirror_rx,
                shutdown.child_token(),
            ));
            let (downs, _) = tokio::sync::mpsc::channel(1);
            tokio::spawn(outpost_agent::route_inbound(
                inbound_rx,
                downs,
                runner.messages,
                mirror_events,
            ));
            this_wave.push(uplink);
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
    progress.finish_and_clear();
    // Let the first audit mirror batches settle so they do not count against the jobs.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let client = api_client(&ca)?;
    let base = format!("https://{addr}");
    let fan_out_started = Instant::now();
    let submitted = post(
        &client,
        &base,
        &staff_token,
        &json!({"selector": "all", "capability": "health", "max_concurrency": agents.max(1)}),
    )
    .await?;
    let rollout_id = submitted["rollout"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let view = wait_finished(&client, &base, &staff_token, &rollout_id).await?;
    let fan_out = fan_out_started.elapsed();
    let done = view["counts"]["done"].as_u64().unwrap_or(0) as usize;
    if done != agents {
        bail!(
            "only {done} of {agents} health jobs ended `done`: {}",
            view["counts"]
        );
    }

    let first = identities
        .first()
        .map(|(id, _)| id.clone())
        .unwrap_or_default();
    let single_started = Instant::now();
    let mut rollouts = Vec::with_capacity(SINGLE_AGENT_JOBS);
    for _ in 0..SINGLE_AGENT_JOBS {
        let submitted = post(
            &client,
            &base,
            &staff_token,
            &json!({"agents": [first], "capability": "health"}),
        )
        .await?;
        rollouts.push(
            submitted["rollout"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    for rollout_id in &rollouts {
        let view = wait_finished(&client, &base, &staff_token, rollout_id).await?;
        if view["counts"]["done"].as_u64() != Some(1) {
            bail!("a single-agent job did not end `done`: {}", view["counts"]);
        }
    }
    let single_agent_jobs_per_sec =
        SINGLE_AGENT_JOBS as f64 / single_started.elapsed().as_secs_f64();
    drop(handles);
    Ok(Figures {
        agents,
        fan_out,
        single_agent_jobs_per_sec,
    })
}

/// The agent-side work per job before a capability runs: the gate and the policy.
fn check_and_decide_micros() -> anyhow::Result<f64> {
    let hub_key = SigningKey::from_bytes(&[9; 32]);
    let policy = Policy::parse(POLICY, std::path::Path::new("policy.toml"))?;
    let now = outpost_queue::now_ms();
    let jobs: Vec<_> = (0..CHECKS)
        .map(|n| {
            outpost_proto::sign_job(
                &JobSpec {
                    job_id: format!("job_{n}"),
                    agent_id: "agt_check".into(),
                    capability: "health".into(),
                    args: json!({}),
                    staff: "bench@vendor".into(),
                    issued_at_ms: now,
                    expires_at_ms: now + 600_000,
                    nonce: format!("{n:032x}"),
                },
                &hub_key,
            )
        })
        .collect();
    let mut gate = Gate::new("agt_check", Some(hub_key.verifying_key()));
    let timestamp = jiff::Timestamp::now();
    let started = Instant::now();
    for signed in &jobs {
        let spec = gate
            .check(signed, now)
            .map_err(|refusal| anyhow::anyhow!("check refused a good job: {}", refusal.reason))?;
        let decision = policy.decide(&Request {
            capability: &spec.capability,
            args: &spec.args,
            now: timestamp,
        });
        std::hint::black_box(decision);
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / CHECKS as f64)
}

fn api_client(ca: &std::path::Path) -> anyhow::Result<reqwest::Client> {
    let tls = outpost_uplink::client_tls(Some(ca))?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(Duration::from_secs(60))
        .build()?)
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let response = client
        .post(format!("{base}/api/v1/jobs"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("submitting a job: {status}: {body}");
    }
    Ok(body)
}

async fn wait_finished(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    rollout_id: &str,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view: Value = client
            .get(format!("{base}/api/v1/rollouts/{rollout_id}"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if view["finished"].as_bool() == Some(true) {
            return Ok(view);
        }
        if Instant::now() > deadline {
            bail!(
                "rollout {rollout_id} did not finish within 120 s: {}",
                view["counts"]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
