//! `health`: agent and connector status, queue depths, version, disk and clock, as one JSON
//! object. Called often and across many agents, so it does no file reads of its own and
//! asks the queue only for its counts.

use std::time::Duration;

use async_trait::async_trait;
use outpost_core::ConnectorName;
use outpost_policy::Capability;
use serde::Serialize;

use super::{cut_note, now_ms, Args};
use crate::health::ConnectorState;
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// How long the queue's counts may take before the report goes out without them: a busy
/// or stuck queue must not make the agent look dead.
const QUEUE_STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// The `health` capability.
pub struct HealthCapability;

/// The health report.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// This agent's id.
    pub agent_id: String,
    /// The agent's version.
    pub version: &'static str,
    /// The operating system, e.g. `linux`, `windows`.
    pub os: &'static str,
    /// The CPU architecture, e.g. `x86_64`.
    pub arch: &'static str,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// The agent's clock (unix ms), so support can spot a skewed clock.
    pub clock_unix_ms: i64,
    /// Every connector, sorted by name.
    pub connectors: Vec<ConnectorReport>,
    /// The queue, if the agent has one open.
    pub queue: Option<QueueReport>,
}

/// One connector's status.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectorReport {
    /// Its name.
    pub name: ConnectorName,
    /// `source` or `sink`.
    pub role: &'static str,
    /// Its kind, e.g. `mllp`.
    pub kind: &'static str,
    /// `starting`, `running`, `backing off` or `stopped`.
    pub state: &'static str,
    /// Whether support paused it (`None` if it has no control registered).
    pub paused: Option<bool>,
    /// The last error, kept after recovery.
    pub last_error: Option<String>,
    /// A one-line state of its own (a SQL source: lag, WAL behind, snapshot progress).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Items taken in or delivered since start.
    pub items: u64,
    /// Items refused or failed attempts since start.
    pub failures: u64,
}

/// The queue at a glance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueReport {
    /// Counts per sink.
    pub sinks: Vec<SinkReport>,
    /// Items stored.
    pub items: u64,
    /// Items refused at intake and kept for inspection.
    pub rejected: u64,
    /// Bytes the queue occupies on disk.
    pub queue_bytes: u64,
    /// Free bytes on the data directory's disk.
    pub disk_free_bytes: Option<u64>,
    /// Why the counts are missing, if they are.
    pub error: Option<String>,
}

/// Counts for one sink.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    /// The sink.
    pub sink: String,
    /// Waiting to be delivered.
    pub pending: u64,
    /// Pending items that failed at least once.
    pub retrying: u64,
    /// Dead letters.
    pub dead: u64,
    /// Delivered and still within retention.
    pub delivered: u64,
    /// Age of the oldest pending item, in milliseconds.
    pub oldest_pending_ms: Option<i64>,
}

impl HealthReport {
    /// A PHI-free one-liner: `3 connectors (3 running), 12 pending`.
    pub fn summary(&self) -> String {
        let running = self
            .connectors
            .iter()
            .filter(|c| c.state == ConnectorState::Running.as_str() && c.paused != Some(true))
            .count();
        let paused = self
            .connectors
            .iter()
            .filter(|c| c.paused == Some(true))
            .count();
        let mut summary = format!(
            "{} connector{} ({running} running",
            self.connectors.len(),
            if self.connectors.len() == 1 { "" } else { "s" }
        );
        if paused > 0 {
            summary.push_str(&format!(", {paused} paused"));
        }
        summary.push(')');
        match &self.queue {
            None => summary.push_str(", no queue"),
            Some(queue) if queue.error.is_some() => summary.push_str(", queue counts unavailable"),
            Some(queue) => {
                let pending: u64 = queue.sinks.iter().map(|s| s.pending).sum();
                let dead: u64 = queue.sinks.iter().map(|s| s.dead).sum();
                summary.push_str(&format!(", {pending} pending"));
                if dead > 0 {
                    summary.push_str(&format!(", {dead} dead"));
                }
            }
        }
        summary
    }
}

/// Collects the health report; `diagnostics` includes it too.
pub async fn collect(cx: &JobContext) -> HealthReport {
    let connectors = cx
        .health
        .snapshot()
        .into_iter()
        .map(|(name, status)| ConnectorReport {
            paused: cx.connectors.is_paused(name.as_str()),
            name,
            role: status.role,
            kind: status.kind,
            state: status.state.as_str(),
            last_error: status.last_error,
            detail: status.detail,
            items: status.items,
            failures: status.failures,
        })
        .collect();
    let queue = match &cx.queue {
        None => None,
        Some(queue) => {
            let mut report = QueueReport {
                queue_bytes: queue.disk_bytes(),
                disk_free_bytes: queue.disk_free_bytes(),
                ..QueueReport::default()
            };
            match tokio::time::timeout(QUEUE_STATS_TIMEOUT, queue.stats()).await {
                Ok(Ok(stats)) => {
                    report.items = stats.items;
                    report.rejected = stats.rejected;
                    report.sinks = stats
                        .sinks
                        .into_iter()
                        .map(|s| SinkReport {
                            sink: s.sink,
                            pending: s.pending,
                            retrying: s.retrying,
                            dead: s.dead,
                            delivered: s.delivered,
                            oldest_pending_ms: s.oldest_pending_ms,
                        })
                        .collect();
                }
                Ok(Err(err)) => report.error = Some(err.to_string()),
                Err(_) => {
                    report.error = Some(format!(
                        "the queue did not answer within {}s",
                        QUEUE_STATS_TIMEOUT.as_secs()
                    ))
                }
            }
            Some(report)
        }
    };
    HealthReport {
        agent_id: cx.agent_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
        uptime_secs: cx.started.elapsed().as_secs(),
        clock_unix_ms: now_ms(),
        connectors,
        queue,
    }
}

#[async_trait]
impl CapabilityHandler for HealthCapability {
    fn capability(&self) -> Capability {
        Capability::Health
    }

    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        Args::new(job.args, &[])?;
        let report = collect(cx).await;
        let _ = out.write_json(&report).await;
        Ok(format!("{}{}", report.summary(), cut_note(out)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::testutil;
    use outpost_queue::{NewItem, Queue, QueueOptions};
    use serde_json::json;

    #[tokio::test]
    async fn health_works_without_a_queue_or_config() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let lab_in = ConnectorName::new("lab-in").unwrap();
        let lab_out = ConnectorName::new("lab-out").unwrap();
        cx.health.register(&lab_in, "source", "mllp");
        cx.health.register(&lab_out, "sink", "mllp");
        cx.health.set_state(&lab_in, ConnectorState::Running);
        cx.health.set_state(&lab_out, ConnectorState::Running);
        cx.health.record_failure(&lab_out, "connection refused");
        cx.connectors.register(&lab_in);
        cx.connectors.register(&lab_out);
        cx.connectors.pause("lab-out").unwrap();

        let policy = testutil::policy("[allow]\nhealth = true\n");
        let (result, output) = testutil::run(&HealthCapability, &cx, &policy, json!({})).await;
        let summary = result.unwrap();
        assert_eq!(summary, "2 connectors (1 running, 1 paused), no queue");
        let report = &testutil::lines(&output)[0];
        assert_eq!(report["agent_id"], "agent-test");
        assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(report["os"], std::env::consts::OS);
        assert!(report["clock_unix_ms"].as_i64().unwrap() > 0);
        assert!(report["queue"].is_null());
        let connectors = report["connectors"].as_array().unwrap();
        assert_eq!(connectors[0]["name"], "lab-in");
        assert_eq!(connectors[0]["state"], "running");
        assert_eq!(connectors[0]["paused"], false);
        assert_eq!(connectors[1]["paused"], true);
        assert_eq!(connectors[1]["failures"], 1);
        assert_eq!(connectors[1]["last_error"], "connection refused");
    }

    #[tokio::test]
    async fn health_refuses_arguments_it_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let policy = testutil::policy("[allow]\nhealth = true\n");
        let (result, _) =
            testutil::run(&HealthCapability, &cx, &policy, json!({"verbose": true})).await;
        assert!(matches!(result, Err(CapabilityError::BadArgs(m)) if m.contains("`verbose`")));
    }

    #[tokio::test]
    async fn health_counts_pending_items_per_sink() {
        let dir = tempfile::tempdir().unwrap();
        let options = QueueOptions {
            min_free_disk_bytes: 0,
            reserve_bytes: 0,
            ..QueueOptions::default()
        };
        let queue = Queue::open(&dir.path().join("data"), options).unwrap();
        let lab_out = ConnectorName::new("lab-out").unwrap();
        for i in 0..3 {
            queue
                .append(NewItem {
                    source: ConnectorName::new("lab-in").unwrap(),
                    kind: outpost_core::ItemKind::Hl7,
                    msg_type: Some("ORU^R01".to_owned()),
                    control_id: Some(format!("c{i}")),
                    subject: None,
                    external_ref: None,
                    payload: b"MSH|^~\\&|LAB\r".to_vec(),
                    sinks: vec![lab_out.clone()],
                })
                .await
                .unwrap();
        }
        let (mut cx, _reloads) = testutil::context(dir.path());
        cx.queue = Some(queue.clone());
        let report = collect(&cx).await;
        let queue_report = report.queue.as_ref().unwrap();
        assert_eq!(queue_report.items, 3);
        assert_eq!(queue_report.sinks[0].sink, "lab-out");
        assert_eq!(queue_report.sinks[0].pending, 3);
        assert!(queue_report.queue_bytes > 0);
        assert_eq!(report.summary(), "0 connectors (0 running), 3 pending");
        queue.close().await.unwrap();
    }
}
