//! `outpost job run`: submit a support job through the hub as a staff member and print its
//! result as it arrives (one agent), or follow a fan-out with a progress bar.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// `outpost job` actions.
#[derive(Subcommand)]
pub enum JobAction {
    /// Run a capability on one agent (`--agent`) or many (`--agents`).
    Run(RunArgs),
    /// Cancel a running job, or one waiting for approval.
    Cancel {
        #[command(flatten)]
        hub: HubArgs,
        /// The job id.
        id: String,
    },
}

/// How to reach the hub as a staff member.
#[derive(Args)]
pub struct HubArgs {
    /// The hub's URL.
    #[arg(long, env = "OUTPOST_HUB", default_value = "https://127.0.0.1:8443")]
    hub: String,
    /// Your staff token (`outpost hub staff add`).
    #[arg(long, env = "OUTPOST_STAFF_TOKEN", hide_env_values = true)]
    token: String,
    /// The hub's CA certificate to trust (default: the public roots).
    #[arg(long, env = "OUTPOST_HUB_CA")]
    ca: Option<PathBuf>,
}

/// `outpost job run`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    hub: HubArgs,
    /// The agent id (may be given several times).
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// Fan out to `all`, `online` or `name:PATTERN` agents.
    #[arg(long = "agents", conflicts_with = "agents")]
    selector: Option<String>,
    /// Jobs in flight at once during a fan-out.
    #[arg(long, default_value_t = 50)]
    max_concurrency: u32,
    /// Halt the rest of a fan-out once more than this many jobs failed.
    #[arg(long)]
    error_threshold: Option<u32>,
    /// How long the job stays valid, e.g. `10m`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    expires: Duration,
    /// Arguments as a JSON object, e.g. `{"path":"exports/today.csv"}`.
    #[arg(long)]
    args: Option<String>,
    /// One argument as KEY=VALUE (VALUE is JSON if it parses, else a string); repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    arg: Vec<String>,
    /// Submit and print the job ids without waiting for results.
    #[arg(long)]
    no_wait: bool,
    /// The capability, e.g. `health`, `logs.tail`, `files.read`.
    capability: String,
}

/// Runs a job action.
pub async fn run(action: JobAction) -> anyhow::Result<()> {
    match action {
        JobAction::Run(args) => run_job(args).await,
        JobAction::Cancel { hub, id } => {
            let client = Client::new(&hub)?;
            let answer = client
                .post(&format!("/api/v1/jobs/{id}/cancel"), &json!({}))
                .await?;
            println!("{answer}");
            Ok(())
        }
    }
}

async fn run_job(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.hub)?;
    let mut job_args = match &args.args {
        Some(text) => {
            serde_json::from_str::<Value>(text).context("--args: expected a JSON object")?
        }
        None => json!({}),
    };
    let Some(fields) = job_args.as_object_mut() else {
        bail!("--args: expected a JSON object, like {{\"lines\": 50}}");
    };
    for pair in &args.arg {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--arg {pair:?}: expected KEY=VALUE");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        fields.insert(key.to_owned(), value);
    }
    let mut body = json!({
        "capability": args.capability,
        "args": job_args,
        "expires_in_secs": args.expires.as_secs().max(1),
        "max_concurrency": args.max_concurrency,
        "error_threshold": args.error_threshold,
    });
    match (&args.selector, args.agents.is_empty()) {
        (Some(selector), _) => body["selector"] = json!(selector),
        (None, false) => body["agents"] = json!(args.agents),
        (None, true) => bail!(
            "name the agent with --agent ID, or fan out with --agents all|online|name:PATTERN"
        ),
    }
    let submitted = client.post("/api/v1/jobs", &body).await?;
    let rollout_id = submitted["rollout"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let jobs = submitted["jobs"].as_array().cloned().unwrap_or_default();
    if args.no_wait {
        for job in &jobs {
            println!(
                "{}  {}",
                job["id"].as_str().unwrap_or(""),
                job["agent_id"].as_str().unwrap_or("")
            );
        }
        return Ok(());
    }
    if jobs.len() == 1 && args.selector.is_none() {
        let job_id = jobs[0]["id"].as_str().unwrap_or_default().to_owned();
        return follow_one(&client, &job_id).await;
    }
    follow_rollout(&client, &rollout_id, jobs.len()).await
}

/// Prints one job's output as it arrives, then its outcome.
async fn follow_one(client: &Client, job_id: &str) -> anyhow::Result<()> {
    let mut after = 0i64;
    let mut last_state = String::new();
    loop {
        let page = client
            .get(&format!(
                "/api/v1/jobs/{job_id}/output?after={after}&wait=10"
            ))
            .await?;
        for chunk in page["chunks"].as_array().into_iter().flatten() {
            print!("{}", chunk["data"].as_str().unwrap_or(""));
        }
        after = page["next"].as_i64().unwrap_or(after);
        let job = &page["job"];
        let state = job["state"].as_str().unwrap_or("").to_owned();
        if state != last_state {
            if state == "awaiting_approval" {
                eprintln!(
                    "job {job_id}: waiting for approval at the practice ({})",
                    job["rule"].as_str().unwrap_or("")
                );
            }
            last_state = state.clone();
        }
        let is_final = outpost_proto::JobState::from_name(&state).is_some_and(|s| s.is_final());
        let drained = page["chunks"].as_array().is_none_or(|c| c.is_empty());
        if is_final && drained {
            let detail = describe_job(job);
            eprintln!(
                "job {job_id} on {}: {state}{detail}",
                job["agent_id"].as_str().unwrap_or("")
            );
            if state == "done" {
                return Ok(());
            }
            bail!("job {job_id} ended {state}{detail}");
        }
    }
}

fn describe_job(job: &Value) -> String {
    let mut parts = Vec::new();
    for key in ["rule", "reason", "summary", "approver"] {
        if let Some(text) = job[key].as_str() {
            parts.push(format!("{key}: {text}"));
        }
    }
    if job["truncated"].as_bool() == Some(true) {
        parts.push("output truncated".into());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

/// Shows a fan-out's progress, then one line per agent.
async fn follow_rollout(client: &Client, rollout_id: &str, total: usize) -> anyhow::Result<()> {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} agents answered [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let view = loop {
        let view = client
            .get(&format!("/api/v1/rollouts/{rollout_id}"))
            .await?;
        let jobs = view["jobs"].as_array().cloned().unwrap_or_default();
        let done = jobs
            .iter()
            .filter(|job| {
                outpost_proto::JobState::from_name(job["state"].as_str().unwrap_or(""))
                    .is_some_and(|s| s.is_final())
            })
            .count();
        bar.set_position(done as u64);
        bar.set_message(view["counts"].to_string());
        if view["finished"].as_bool() == Some(true) {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    let mut failed = 0usize;
    for job in view["jobs"].as_array().into_iter().flatten() {
        let state = job["state"].as_str().unwrap_or("");
        if state != "done" {
            failed += 1;
        }
        println!(
            "{}  {}  {state}{}",
            job["agent_id"].as_str().unwrap_or(""),
            job["id"].as_str().unwrap_or(""),
            describe_job(job)
        );
    }
    eprintln!(
        "rollout {rollout_id} {}: {}",
        view["rollout"]["state"].as_str().unwrap_or(""),
        view["counts"]
    );
    if failed > 0 {
        bail!("{failed} of {total} jobs did not finish `done`");
    }
    Ok(())
}

/// A small JSON client for the hub's API with a staff token.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(hub: &HubArgs) -> anyhow::Result<Client> {
        let tls = outpost_uplink::client_tls(hub.ca.as_deref())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Client {
            http,
            base: hub.hub.trim_end_matches('/').to_owned(),
            token: hub.token.trim().to_owned(),
        })
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(request).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(request).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "hub answered {status}: {}: {}",
                body["code"].as_str().unwrap_or("error"),
                body["message"].as_str().unwrap_or("")
            );
        }
        Ok(body)
    }
}
