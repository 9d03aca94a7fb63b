//! Helpers for the remote-support tests: an agent enrolled with a [`Hub`] and running a
//! support policy of the test's choosing, jobs submitted and followed through the hub's
//! API, and the agent's audit log (`audit.jsonl`) read and verified.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{describe_output, run, wait_until_explained, Agent, Hub, HubApi};

/// How long a job gets to reach a final state at the hub.
pub const JOB_DEADLINE: Duration = Duration::from_secs(30);

/// The job states after which nothing changes (`outpost_proto::JobState::is_final`).
pub const FINAL_STATES: [&str; 7] = [
    "done",
    "failed",
    "refused",
    "denied",
    "expired",
    "cancelled",
    "skipped",
];

/// Starts an agent enrolled with `hub` (with a fresh one-time token named `name`), with no
/// connectors and `policy = "policy.toml"`, the policy being `policy(agent folder)` (so
/// that it can name roots inside the agent's temporary folder). Waits until the agent is
/// connected and returns it with its id.
pub fn start_policy_agent(
    bin: impl AsRef<Path>,
    hub: &Hub,
    name: &str,
    policy: impl FnOnce(&Path) -> String,
) -> (Agent, String) {
    let token = hub.token(name, "1h");
    start_policy_agent_with_token(bin, hub, &token, policy)
}

/// [`start_policy_agent`] with an enrollment token made elsewhere (e.g. by another hub
/// process on the same database); the agent enrolls with and connects to `hub`.
pub fn start_policy_agent_with_token(
    bin: impl AsRef<Path>,
    hub: &Hub,
    token: &str,
    policy: impl FnOnce(&Path) -> String,
) -> (Agent, String) {
    let config = format!(
        "policy = \"policy.toml\"\n\n[hub]\nurl = \"{url}\"\ntoken = \"{token}\"\nca_file = {ca:?}\n",
        url = hub.url(),
        ca = hub.ca_path().display().to_string(),
    );
    let mut agent = Agent::prepare(bin, &config);
    let policy_path = agent.dir().join("policy.toml");
    std::fs::write(&policy_path, policy(agent.dir()))
        .unwrap_or_else(|err| panic!("write {}: {err}", policy_path.display()));
    agent.launch();
    wait_connected(&agent, 0, hub);
    let id = crate::enrolled_agent_id(&agent.data_dir());
    (agent, id)
}

/// How many times the agent's log says it connected to the hub (all runs so far).
pub fn connections(agent: &Agent) -> usize {
    agent
        .log()
        .lines()
        .filter(|line| line.contains("connected to the hub"))
        .count()
}

/// Waits until the agent's log says it connected to the hub more than `before` times.
pub fn wait_connected(agent: &Agent, before: usize, hub: &Hub) {
    wait_until_explained(
        Duration::from_secs(30),
        &format!(
            "the agent has connected to the hub (connection #{})",
            before + 1
        ),
        || Some(()).filter(|_| connections(agent) > before),
        || context(hub, &[agent]),
    );
}

/// Stops the agent with SIGTERM, waits for it to exit, starts it again and waits until it
/// is connected again.
pub fn restart_agent(agent: &mut Agent, hub: &Hub) {
    agent.terminate();
    agent.wait_exit(Duration::from_secs(20));
    start_again(agent, hub);
}

/// Starts a stopped agent again and waits until it is connected again.
pub fn start_again(agent: &mut Agent, hub: &Hub) {
    let before = connections(agent);
    agent.restart();
    wait_connected(agent, before, hub);
}

/// The hub's and the agents' log tails, for failure messages.
pub fn context(hub: &Hub, agents: &[&Agent]) -> String {
    let mut text = format!("hub log tail:\n{}\n", hub.log_tail(25));
    for agent in agents {
        text.push_str(&format!(
            "agent (pid {}) log tail:\n{}\n",
            agent.pid(),
            agent.log_tail(25)
        ));
    }
    text
}

/// `POST /api/v1/jobs` for one agent; panics unless the hub answers 201. Returns the job id.
pub fn submit_job(
    api: &HubApi,
    agent_id: &str,
    capability: &str,
    args: Value,
    expires_in_secs: Option<u64>,
) -> String {
    let mut body = json!({"agents": [agent_id], "capability": capability, "args": args});
    if let Some(secs) = expires_in_secs {
        body["expires_in_secs"] = json!(secs);
    }
    let answer = api.post_json("/api/v1/jobs", &body);
    assert_eq!(
        answer.status, 201,
        "POST /api/v1/jobs {body}: {}",
        answer.text
    );
    answer.json["jobs"][0]["id"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "POST /api/v1/jobs answered without a job id: {}",
                answer.text
            )
        })
        .to_owned()
}

/// `GET /api/v1/jobs/{id}` as JSON; panics unless the hub answers 200.
pub fn job(api: &HubApi, job_id: &str) -> Value {
    let answer = api.get(&format!("/api/v1/jobs/{job_id}"));
    assert_eq!(
        answer.status, 200,
        "GET /api/v1/jobs/{job_id}: {}",
        answer.text
    );
    answer.json
}

/// Waits until the job is in a final state at the hub and returns it.
pub fn wait_job_final(api: &HubApi, job_id: &str, explain: impl FnOnce() -> String) -> Value {
    wait_until_explained(
        JOB_DEADLINE,
        &format!("job {job_id} is final at the hub"),
        || {
            let job = job(api, job_id);
            let state = job["state"].as_str().unwrap_or("");
            if FINAL_STATES.contains(&state) {
                Ok(job)
            } else {
                Err(job.to_string())
            }
        },
        explain,
    )
}

/// Waits until the job is in `state` at the hub and returns it.
pub fn wait_job_state(
    api: &HubApi,
    job_id: &str,
    state: &str,
    explain: impl FnOnce() -> String,
) -> Value {
    wait_until_explained(
        JOB_DEADLINE,
        &format!("job {job_id} is {state} at the hub"),
        || {
            let job = job(api, job_id);
            if job["state"] == state {
                Ok(job)
            } else {
                Err(job.to_string())
            }
        },
        explain,
    )
}

/// The agent's audit log.
pub fn audit_path(agent: &Agent) -> PathBuf {
    agent.data_dir().join("audit.jsonl")
}

/// Every entry of an audit log, parsed; panics on a line that is not JSON.
pub fn audit_entries(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).unwrap_or_else(|err| {
                panic!(
                    "{} line {}: not JSON ({err}): {line}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// The seq of the log's last entry (0 for an empty or missing log).
pub fn last_seq(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    audit_entries(path)
        .last()
        .and_then(|entry| entry["seq"].as_u64())
        .unwrap_or(0)
}

/// Runs `outpost audit verify <path>`.
pub fn audit_verify(bin: impl AsRef<Path>, path: &Path) -> Output {
    run(Command::new(bin.as_ref())
        .args(["audit", "verify"])
        .arg(path)
        .env_remove("RUST_LOG"))
}

/// Runs `outpost audit verify <path>` and panics unless it passes.
pub fn assert_audit_verifies(bin: impl AsRef<Path>, path: &Path) {
    let output = audit_verify(bin, path);
    assert!(
        output.status.success(),
        "`outpost audit verify {}` should pass\n{}\nlog:\n{}",
        path.display(),
        describe_output(&output),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

/// Runs `outpost job run --agent <id> health` as the staff member and panics unless it
/// exits 0 (the job ended `done`): the agent still serves jobs.
pub fn assert_health_job_runs(hub: &Hub, staff_token: &str, agent: &Agent, agent_id: &str) {
    let output = hub.job_cli(staff_token, &["run", "--agent", agent_id, "health"]);
    assert!(
        output.status.success(),
        "`outpost job run --agent {agent_id} health` should exit 0 (job done): the agent must keep serving\n{}\n{}",
        describe_output(&output),
        context(hub, &[agent])
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(agent_id),
        "the health report should name the agent {agent_id}: {stdout}"
    );
}

/// Starts another hub process (own folder, port, CA and data folder) whose store is the
/// PostgreSQL database at `url`, shared with a hub already using it. Its
/// [`Hub::backend`] says `Sqlite` (the helper does not own the database), but its config
/// names `database = "<url>"`.
pub fn start_hub_on_database(bin: impl AsRef<Path>, url: &str) -> Hub {
    Hub::start_with(bin, &format!("database = \"{url}\"\n"))
}
