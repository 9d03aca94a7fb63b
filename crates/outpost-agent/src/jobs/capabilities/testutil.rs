//! What the capability tests share: a job context without queue or config, a policy from
//! text, and a runner that collects the whole output.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use outpost_policy::Policy;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control::ConnectorControls;
use crate::health::Health;
use crate::jobs::capability::{
    CapabilityError, CapabilityHandler, JobContext, JobInput, Output, ReloadRequest,
    MAX_OUTPUT_BYTES,
};
use crate::logbuf::LogBuffer;

/// A context like a simulated agent's (no queue, no config), and the reload receiver.
pub fn context(data_dir: &Path) -> (JobContext, watch::Receiver<u64>) {
    let (reload, reloads) = ReloadRequest::new();
    let cx = JobContext {
        agent_id: "agent-test".to_owned(),
        config: None,
        queue: None,
        health: Health::default(),
        connectors: ConnectorControls::default(),
        logs: LogBuffer::default(),
        data_dir: data_dir.to_owned(),
        started: Instant::now(),
        reload,
    };
    (cx, reloads)
}

/// A minimal valid agent config with a hub token, written to `dir/agent.toml` and loaded.
pub fn write_config(dir: &Path) -> Arc<AgentConfig> {
    let path = dir.join("agent.toml");
    std::fs::write(&path, MINIMAL_CONFIG).unwrap();
    Arc::new(AgentConfig::load(&path).unwrap())
}

/// The config [`write_config`] writes.
pub const MINIMAL_CONFIG: &str = r#"data_dir = "./data"

[hub]
url = "https://hub.example.com:8443"
token = "enroll-SECRET-123"
ca_file = "hub-ca.pem"

[[source]]
name = "lab-in"
kind = "mllp"
listen = "0.0.0.0:2575"

[[sink]]
name = "lab-out"
kind = "mllp"
connect = "127.0.0.1:2576"

[[route]]
from = "lab-in"
to = ["lab-out"]
"#;

/// A policy from text.
pub fn policy(text: &str) -> Policy {
    Policy::parse(text, Path::new("policy.toml")).unwrap()
}

/// Runs `handler` with `args`; returns its result and everything it wrote.
pub async fn run(
    handler: &dyn CapabilityHandler,
    cx: &JobContext,
    policy: &Policy,
    args: Value,
) -> (Result<String, CapabilityError>, String) {
    run_limited(handler, cx, policy, args, MAX_OUTPUT_BYTES).await
}

/// [`run`] with an output limit.
pub async fn run_limited(
    handler: &dyn CapabilityHandler,
    cx: &JobContext,
    policy: &Policy,
    args: Value,
    limit: usize,
) -> (Result<String, CapabilityError>, String) {
    let (sender, mut receiver) = mpsc::channel(4096);
    let mut out = Output::new(sender, limit);
    let job = JobInput {
        job_id: "job-1",
        staff: "support@vendor",
        args: &args,
        policy,
        cancel: CancellationToken::new(),
    };
    let result = handler.run(cx, &job, &mut out).await;
    out.finish().await;
    let mut text = String::new();
    while let Ok(chunk) = receiver.try_recv() {
        text.push_str(&chunk);
    }
    (result, text)
}

/// The output's JSON lines.
pub fn lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}
