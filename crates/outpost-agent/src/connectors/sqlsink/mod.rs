//! `[[sink]] kind = "sql"`: write-back into a practice database through statements the
//! practice's config names (`[sink.operations]`), called by the hub with an operation
//! name, values and an idempotency key (`SqlCall`), never with SQL text. The statement,
//! the binding of values and the idempotency ledger are `outpost_sql::writeback`'s; this
//! module wires them to the hub session:
//!
//! - [`start_calls`] takes calls from the hub link, runs each on its sink's
//!   [`Writer`] (one call at a time per sink, calls on different sinks side by side),
//!   and answers `SqlResult` on the uplink;
//! - [`run_sink`] is the sink's supervised task: it takes no queue items (routes to a SQL
//!   sink are refused by the config check) and only reports the sink as running. A sink
//!   paused by a support job refuses calls until resumed.
//!
//! Each sink keeps its ledger in `<data_dir>/sql/<sink>/idempotency.db`; results there
//! are sealed, and request digests keyed, with the queue key, so the file holds no
//! patient data in clear.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use outpost_core::ItemId;
use outpost_proto::{AgentToHub, SqlCall, SqlOutcome};
use outpost_sql::writeback::{CallOutcome, Sealer, Writer};
use outpost_uplink::UplinkHandle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use outpost_sql::writeback::SinkConfig;

use crate::config::AgentConfig;
use crate::connectors::{SinkContext, SinkKind};
use crate::health::{ConnectorState, Health};
use crate::ConnectorError;

/// Runs until shutdown: calls arrive through [`start_calls`], not the queue.
pub async fn run_sink(_config: SinkConfig, cx: SinkContext) -> Result<(), ConnectorError> {
    cx.health.set_state(&cx.name, ConnectorState::Running);
    cx.shutdown.cancelled().await;
    Ok(())
}

/// XChaCha20-Poly1305's nonce, stored ahead of each sealed result.
const NONCE_BYTES: usize = 24;

/// The queue key as the ledger's sealer. Ledger rows use negative associated data, so a
/// sealed result can never be mistaken for a queue item's payload.
struct QueueKeySealer(outpost_queue::Keys);

impl Sealer for QueueKeySealer {
    fn seal(&self, context: i64, plain: &[u8]) -> Vec<u8> {
        let (sealed, nonce) = self.0.seal(ItemId(-context), plain);
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    fn open(&self, context: i64, sealed: &[u8]) -> Option<Vec<u8>> {
        let split = NONCE_BYTES;
        if sealed.len() < split {
            return None;
        }
        let (nonce, body) = sealed.split_at(split);
        self.0.open(ItemId(-context), nonce, body).ok()
    }

    fn digest(&self, request: &[u8]) -> Vec<u8> {
        let mut bytes = b"outpost sql write-back request v1\0".to_vec();
        bytes.extend_from_slice(request);
        self.0.subject_digest(&bytes)
    }
}

struct Sinks {
    config: Arc<AgentConfig>,
    health: Health,
    writers: tokio::sync::Mutex<HashMap<String, Arc<Writer>>>,
}

impl Sinks {
    /// The sink's writer, opened on first use (a config or ledger problem is reported to
    /// the caller, and tried again on the next call).
    async fn writer(&self, name: &str) -> Result<Arc<Writer>, SqlOutcome> {
        let mut writers = self.writers.lock().await;
        if let Some(writer) = writers.get(name) {
            return Ok(writer.clone());
        }
        let sql_sinks: Vec<String> = self
            .config
            .sinks
            .iter()
            .filter(|s| matches!(s.kind, SinkKind::Sql(_)))
            .map(|s| s.name.to_string())
            .collect();
        let Some((sink_name, config)) = self.config.sinks.iter().find_map(|s| match &s.kind {
            SinkKind::Sql(config) if s.name.as_str() == name => Some((s.name.clone(), config)),
            _ => None,
        }) else {
            return Err(SqlOutcome::UnknownSink {
                message: if sql_sinks.is_empty() {
                    format!("this agent has no SQL sink named {name:?} (it has none)")
                } else {
                    format!(
                        "this agent has no SQL sink named {name:?}; its SQL sinks: {}",
                        sql_sinks.join(", ")
                    )
                },
            });
        };
        let data_dir = self.config.data_dir.clone();
        let base = self
            .config
            .path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let keys = tokio::task::spawn_blocking(move || {
            outpost_queue::Keys::load(&data_dir.join(outpost_queue::KEY_FILE))
        })
        .await
        .map_err(|err| err.to_string())
        .and_then(|keys| keys.map_err(|err| err.to_string()));
        let keys = keys.map_err(|err| {
            tracing::error!(sink = name, error = %err, "cannot load the queue key for the write-back ledger");
            SqlOutcome::Unavailable {
                message: format!("sink {name:?}: the agent cannot open its key; nothing was run"),
            }
        })?;
        let state_dir = self.config.data_dir.join("sql").join(name);
        let writer = Writer::open(
            name,
            config,
            &base,
            &state_dir,
            Arc::new(QueueKeySealer(keys)),
        )
        .await
        .map_err(|err| {
            self.health.record_failure(&sink_name, &err.to_string());
            tracing::error!(sink = name, error = %err, "cannot open the SQL sink");
            SqlOutcome::Unavailable {
                message: format!("sink {name:?} cannot be opened: {err}; nothing was run"),
            }
        })?;
        let writer = Arc::new(writer);
        writers.insert(name.to_owned(), writer.clone());
        Ok(writer)
    }

    async fn call(&self, call: &SqlCall) -> SqlOutcome {
        let writer = match self.writer(&call.sink).await {
            Ok(writer) => writer,
            Err(outcome) => return outcome,
        };
        let paused = self.health.snapshot().into_iter().any(|(name, status)| {
            name.as_str() == call.sink && status.state == ConnectorState::Paused
        });
        if paused {
            return SqlOutcome::Unavailable {
                message: format!(
                    "sink {:?} is paused on the agent; nothing was run (retry with the same key once it is resumed)",
                    call.sink
                ),
            };
        }
        let outcome = writer
            .call(&call.operation, &call.values, &call.idempotency_key)
            .await;
        self.account(&call.sink, &outcome);
        into_proto(&call.sink, outcome)
    }

    fn account(&self, sink: &str, outcome: &CallOutcome) {
        let Some(name) = self
            .config
            .sinks
            .iter()
            .find(|s| s.name.as_str() == sink)
            .map(|s| s.name.clone())
        else {
            return;
        };
        match outcome {
            CallOutcome::Done {
                replayed: false, ..
            } => {
                self.health.count_item(&name);
                self.health.set_state(&name, ConnectorState::Running);
            }
            CallOutcome::Unavailable(message) | CallOutcome::OutcomeUnknown(message) => {
                self.health.record_failure(&name, message);
            }
            _ => {}
        }
    }
}

fn into_proto(sink: &str, outcome: CallOutcome) -> SqlOutcome {
    match outcome {
        CallOutcome::Done {
            rows_affected,
            returned,
            replayed,
        } => SqlOutcome::Done {
            rows_affected,
            returned,
            replayed,
        },
        CallOutcome::Refused {
            code,
            message,
            replayed,
        } => SqlOutcome::DatabaseError {
            code,
            message,
            replayed,
        },
        CallOutcome::UnknownOperation { operation, known } => SqlOutcome::UnknownOperation {
            message: format!(
                "sink {sink:?} has no operation {operation:?}; its operations: {}",
                known.join(", ")
            ),
            known,
        },
        CallOutcome::InvalidValues(message) => SqlOutcome::InvalidValues { message },
        CallOutcome::KeyReused(message) => SqlOutcome::KeyReused { message },
        CallOutcome::OutcomeUnknown(message) => SqlOutcome::OutcomeUnknown { message },
        CallOutcome::Unavailable(message) => SqlOutcome::Unavailable { message },
    }
}

/// Starts taking write-back calls; returns where the hub link hands them.
pub fn start_calls(
    config: Arc<AgentConfig>,
    uplink: UplinkHandle,
    health: Health,
    shutdown: CancellationToken,
) -> mpsc::Sender<SqlCall> {
    let (calls, mut incoming) = mpsc::channel::<SqlCall>(64);
    let sinks = Arc::new(Sinks {
        config,
        health,
        writers: tokio::sync::Mutex::new(HashMap::new()),
    });
    tokio::spawn(async move {
        loop {
            let call = tokio::select! {
                _ = shutdown.cancelled() => break,
                call = incoming.recv() => match call {
                    Some(call) => call,
                    None => break,
                },
            };
            let (sinks, uplink) = (sinks.clone(), uplink.clone());
            // Calls on one sink queue up on its writer; calls on others go on meanwhile.
            tokio::spawn(async move {
                let outcome = sinks.call(&call).await;
                tracing::info!(
                    call_id = %call.call_id,
                    sink = %call.sink,
                    operation = %call.operation,
                    outcome = outcome_name(&outcome),
                    "write-back call"
                );
                let answer = AgentToHub::SqlResult {
                    call_id: call.call_id,
                    outcome,
                };
                if uplink.send(answer).await.is_err() {
                    tracing::warn!("hub link stopped before a write-back result was sent (a retry with the same key gets it)");
                }
            });
        }
    });
    calls
}

fn outcome_name(outcome: &SqlOutcome) -> &'static str {
    match outcome {
        SqlOutcome::Done {
            replayed: false, ..
        } => "done",
        SqlOutcome::Done { replayed: true, .. } => "replayed",
        SqlOutcome::DatabaseError { .. } => "database_error",
        SqlOutcome::UnknownSink { .. } => "unknown_sink",
        SqlOutcome::UnknownOperation { .. } => "unknown_operation",
        SqlOutcome::InvalidValues { .. } => "invalid_values",
        SqlOutcome::KeyReused { .. } => "key_reused",
        SqlOutcome::OutcomeUnknown { .. } => "outcome_unknown",
        SqlOutcome::Unavailable { .. } => "unavailable",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;

    use crate::config::AgentConfig;
    use crate::connectors::SinkKind;

    const CONFIG: &str = r#"[hub]
url = "https://hub.example.com:8443"
token = "t"
[[source]]
name = "lab-in"
kind = "mllp"
listen = "127.0.0.1:2575"
[[sink]]
name = "vendor"
kind = "hub"
[[route]]
from = "lab-in"
to = ["vendor"]
[[sink]]
name = "pms-write"
kind = "sql"
url = "postgres://outpost_writer:secret@127.0.0.1:5433/pms"
[sink.operations]
create_appointment = "INSERT INTO appointment (patnum, start_at, note) VALUES (:patnum, :start_at, :note) RETURNING aptnum"
"#;

    #[test]
    fn the_brief_shape_loads() {
        let config = AgentConfig::parse(CONFIG, Path::new("/etc/outpost/outpost.toml")).unwrap();
        let SinkKind::Sql(sink) = &config.sinks[1].kind else {
            panic!("not a sql sink")
        };
        assert_eq!(sink.operations.len(), 1);
        assert!(config.uses_hub());
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn bad_sql_sinks_name_the_key() {
        let bad = CONFIG.replace("VALUES (:patnum", "VALUES ($1");
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("outpost.toml")
                && err.contains("key `sink[1].operations.create_appointment`"),
            "{err}"
        );
        let bad = CONFIG.replace(
            "postgres://outpost_writer:secret@",
            "oracle://outpost_writer:secret@",
        );
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `sink[1].url`") && !err.contains("secret"),
            "{err}"
        );
        let bad = CONFIG.replace("to = [\"vendor\"]", "to = [\"vendor\", \"pms-write\"]");
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `route[0].to[1]`") && err.contains("\"sql\""),
            "{err}"
        );
        let bad = CONFIG.replace(
            "[sink.operations]",
            "password_env = \"PW\"\npassword_file = \"pw\"\n[sink.operations]",
        );
        let err = AgentConfig::parse(&bad, Path::new("outpost.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `sink[1].password_env`"), "{err}");
    }
}
