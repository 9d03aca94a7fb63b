//! `connector.restart`, `connector.pause` and `connector.resume`: control one connector by
//! name (argument `connector`). Each writes one JSON line saying what changed.

use async_trait::async_trait;
use outpost_policy::Capability;
use serde_json::json;

use super::Args;
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// What a [`ConnectorControl`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop the connector's task and start it again.
    Restart,
    /// Stop it until resumed.
    Pause,
    /// Start a paused one again.
    Resume,
}

/// One of the three connector capabilities.
#[derive(Debug, Clone, Copy)]
pub struct ConnectorControl(pub Action);

impl ConnectorControl {
    /// `connector.restart`.
    pub const RESTART: ConnectorControl = ConnectorControl(Action::Restart);
    /// `connector.pause`.
    pub const PAUSE: ConnectorControl = ConnectorControl(Action::Pause);
    /// `connector.resume`.
    pub const RESUME: ConnectorControl = ConnectorControl(Action::Resume);
}

#[async_trait]
impl CapabilityHandler for ConnectorControl {
    fn capability(&self) -> Capability {
        match self.0 {
            Action::Restart => Capability::ConnectorRestart,
            Action::Pause => Capability::ConnectorPause,
            Action::Resume => Capability::ConnectorResume,
        }
    }

    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let args = Args::new(job.args, &["connector"])?;
        let name = args.required_str("connector", "a connector name from the agent config")?;
        let unknown = |_| {
            let known = cx.connectors.names();
            let known = if known.is_empty() {
                "none are running".to_owned()
            } else {
                format!("known: {}", known.join(", "))
            };
            CapabilityError::BadArgs(format!(
                "argument `connector`: no connector is named {name:?} ({known})"
            ))
        };
        let (result, summary) = match self.0 {
            Action::Restart => {
                cx.connectors.restart(name).map_err(unknown)?;
                let paused = cx.connectors.is_paused(name).unwrap_or(false);
                let summary = if paused {
                    format!("restart of {name} requested; it stays paused until resumed")
                } else {
                    format!("restart of {name} requested")
                };
                (
                    json!({"connector": name, "restarted": true, "paused": paused}),
                    summary,
                )
            }
            Action::Pause => {
                let was_running = cx.connectors.pause(name).map_err(unknown)?;
                let summary = if was_running {
                    format!("paused {name}")
                } else {
                    format!("{name} was already paused")
                };
                (
                    json!({"connector": name, "paused": true, "was_running": was_running}),
                    summary,
                )
            }
            Action::Resume => {
                let was_paused = cx.connectors.resume(name).map_err(unknown)?;
                let summary = if was_paused {
                    format!("resumed {name}")
                } else {
                    format!("{name} was not paused")
                };
                (
                    json!({"connector": name, "paused": false, "was_paused": was_paused}),
                    summary,
                )
            }
        };
        let _ = out.write_json(&result).await;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::testutil;
    use outpost_core::ConnectorName;

    const POLICY: &str = "[allow]\n\"connector.restart\" = true\n\"connector.pause\" = true\n\"connector.resume\" = true\n";

    #[tokio::test]
    async fn pause_resume_and_restart_change_the_connector_control() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let control = cx
            .connectors
            .register(&ConnectorName::new("lab-in").unwrap());
        let policy = testutil::policy(POLICY);
        let args = json!({"connector": "lab-in"});

        let (result, output) =
            testutil::run(&ConnectorControl::PAUSE, &cx, &policy, args.clone()).await;
        assert_eq!(result.unwrap(), "paused lab-in");
        assert_eq!(testutil::lines(&output)[0]["was_running"], true);
        assert!(control.borrow().paused);

        let (result, _) = testutil::run(&ConnectorControl::PAUSE, &cx, &policy, args.clone()).await;
        assert_eq!(result.unwrap(), "lab-in was already paused");

        let (result, _) =
            testutil::run(&ConnectorControl::RESTART, &cx, &policy, args.clone()).await;
        assert!(result.unwrap().contains("stays paused"));
        assert_eq!(control.borrow().restarts, 1);

        let (result, output) =
            testutil::run(&ConnectorControl::RESUME, &cx, &policy, args.clone()).await;
        assert_eq!(result.unwrap(), "resumed lab-in");
        assert_eq!(testutil::lines(&output)[0]["was_paused"], true);
        assert!(!control.borrow().paused);
    }

    #[tokio::test]
    async fn an_unknown_connector_is_refused_naming_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        cx.connectors
            .register(&ConnectorName::new("lab-in").unwrap());
        cx.connectors
            .register(&ConnectorName::new("lab-out").unwrap());
        let policy = testutil::policy(POLICY);
        for handler in [
            ConnectorControl::RESTART,
            ConnectorControl::PAUSE,
            ConnectorControl::RESUME,
        ] {
            let (result, output) =
                testutil::run(&handler, &cx, &policy, json!({"connector": "lab-inn"})).await;
            match result {
                Err(CapabilityError::BadArgs(message)) => {
                    assert!(message.contains("\"lab-inn\""), "{message}");
                    assert!(message.contains("known: lab-in, lab-out"), "{message}");
                }
                other => panic!("expected BadArgs, got {other:?}"),
            }
            assert!(output.is_empty());
        }
        let (result, _) = testutil::run(&ConnectorControl::PAUSE, &cx, &policy, json!({})).await;
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("`connector`: missing"));
    }
}
