//! The SQL source's task: read batches, queue them with the position after them (one
//! queue transaction), then tell the source they are durable.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use outpost_core::ItemKind;
use outpost_queue::{Appending, NewItem, SourceState};
use outpost_sql::{ChangeEvent, Position};

use super::SourceConfig;
use crate::connectors::SourceContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

/// Where older versions kept the position, in the source's state folder.
const LEGACY_POSITION_FILE: &str = "position";

/// Runs until shutdown; returns an error (and is restarted with backoff) when the
/// database or the queue fails.
pub async fn run_source(config: SourceConfig, cx: SourceContext) -> Result<(), ConnectorError> {
    let state_dir = cx.config.data_dir.join("sql").join(cx.name.as_str());
    let base = cx
        .config
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let state_name = format!("sql:{}", cx.name);
    let legacy_path = state_dir.join(LEGACY_POSITION_FILE);
    let legacy_file = legacy_path.exists();
    let queued_state = cx.queue.source_state(&state_name).await?;
    let stored = match queued_state.clone() {
        Some(text) => Some(Position(text)),
        None => {
            let (dir, path) = (state_dir.clone(), legacy_path.clone());
            tokio::task::spawn_blocking(move || read_legacy_position(&dir, &path))
                .await
                .map_err(|err| ConnectorError::Unavailable(err.to_string()))??
        }
    };
    cx.health.set_state(&cx.name, ConnectorState::Starting);
    let opened = tokio::select! {
        _ = cx.shutdown.cancelled() => return Ok(()),
        opened = outpost_sql::open(cx.name.as_str(), &config, &base, &state_dir, stored) => opened,
    };
    let mut source = opened.map_err(unavailable)?;
    let sinks = cx.config.sinks_for(&cx.name, None);
    tracing::info!(tables = config.tables.len(), "sql source started");
    cx.health.set_state(&cx.name, ConnectorState::Running);
    let mut pipeline = Pipeline {
        state_name,
        // Each batch names the state it follows; the queue refuses it (and every batch
        // after it) if that is not the stored one, so a failed batch is never passed over.
        expected: queued_state,
        in_flight: VecDeque::with_capacity(IN_FLIGHT),
        legacy_path: legacy_file.then_some(legacy_path),
    };
    let result = pipeline.run(&cx, &mut *source, &sinks).await;
    // Let what was handed over settle, so a restart reads the state it left.
    while let Some(done) = pipeline.in_flight.pop_front() {
        let _ = done.appending.committed().await;
    }
    cx.health.set_state(&cx.name, ConnectorState::Stopped);
    result
}

/// A source's way to the queue: the batches in flight and the state they follow.
struct Pipeline {
    state_name: String,
    expected: Option<String>,
    in_flight: VecDeque<InFlight>,
    /// An older version's position file, removed once the queue holds the position.
    legacy_path: Option<PathBuf>,
}

impl Pipeline {
    async fn run(
        &mut self,
        cx: &SourceContext,
        source: &mut dyn outpost_sql::ChangeSource,
        sinks: &[outpost_core::ConnectorName],
    ) -> Result<(), ConnectorError> {
        // Until a batch holds nothing the queue already has, look each event up first.
        let mut checking = true;
        let mut tracker = super::progress::Tracker::default();
        loop {
            let mut batch = tokio::select! {
                _ = cx.shutdown.cancelled() => break,
                batch = source.next_batch() => batch.map_err(unavailable)?,
            };
            // From here the batch is brought to a safe point even if shutdown comes meanwhile.
            let mut repeats = 0usize;
            let mut items = Vec::with_capacity(batch.events.len());
            for event in &batch.events {
                let external_ref = event.id.as_ref().map(|id| format!("sql:{}:{id}", cx.name));
                if checking {
                    if let Some(external_ref) = &external_ref {
                        if cx.queue.find_by_external_ref(external_ref).await?.is_some() {
                            repeats += 1;
                            continue;
                        }
                    }
                }
                items.push(item(cx, event, external_ref, sinks)?);
            }
            let mut queued_events = items.len();
            if let Some(encoded) = batch.encoded.take() {
                queued_events += encoded.count;
                tracker.observe_encoded(&encoded);
                items.push(chunk_item(cx, encoded, sinks));
            }
            // One transaction for the batch's items and the position after them: after a
            // crash the source resumes exactly after what the queue holds, nothing lost and
            // nothing queued twice.
            let state = SourceState {
                name: self.state_name.clone(),
                expected: self.expected.replace(batch.position.0.clone()),
                value: batch.position.0.clone(),
            };
            let appending = cx.queue.enqueue_with_state(items, Some(state)).await?;
            self.in_flight.push_back(InFlight {
                appending,
                position: batch.position,
                events: batch.events,
                queued_events,
            });
            checking = repeats > 0;
            if repeats > 0 {
                tracing::info!(repeats, "skipped events already queued before a restart");
            }
            // A source that reads ahead (a snapshot) keeps a few batches on their way to the
            // queue, which commits them together; any other waits for each.
            let keep = if source.reads_ahead() {
                IN_FLIGHT - 1
            } else {
                0
            };
            while self.in_flight.len() > keep {
                let Some(done) = self.in_flight.pop_front() else {
                    break;
                };
                done.appending.committed().await?;
                cx.health.count_items(&cx.name, done.queued_events as u64);
                if done.queued_events > 0 {
                    tracing::debug!(events = done.queued_events, "batch queued");
                }
                source
                    .committed(&done.position)
                    .await
                    .map_err(unavailable)?;
                tracker.observe(&done.events);
            }
            if self.in_flight.is_empty() {
                if let Some(path) = self.legacy_path.take() {
                    // The queue holds the position now; an old file would only mislead.
                    let _ = std::fs::remove_file(path);
                }
            }
            if tracker.probe_due() {
                match source.progress().await {
                    Ok(progress) => tracker.update(progress),
                    Err(err) => {
                        tracker.probe_failed();
                        tracing::debug!(error = %err, "could not read the source's lag");
                    }
                }
                let line = tracker.line();
                if tracker.snapshotting() {
                    tracing::info!(progress = %line, "snapshot running");
                }
                cx.health.set_detail(&cx.name, Some(line));
            }
        }
        Ok(())
    }
}

/// Batches a source that reads ahead may have on their way to the queue at once.
const IN_FLIGHT: usize = 3;

/// A batch handed to the queue, not yet known to be committed.
struct InFlight {
    appending: Appending,
    position: Position,
    events: Vec<ChangeEvent>,
    queued_events: usize,
}

fn unavailable(err: outpost_sql::SqlError) -> ConnectorError {
    ConnectorError::Unavailable(err.to_string())
}

/// One queue item: the event's JSON; the type label `<table>.<op>` and the database
/// position are kept in clear (neither is patient data).
fn item(
    cx: &SourceContext,
    event: &ChangeEvent,
    external_ref: Option<String>,
    sinks: &[outpost_core::ConnectorName],
) -> Result<NewItem, ConnectorError> {
    let payload = serde_json::to_vec(event)
        .map_err(|err| ConnectorError::Unavailable(format!("encode a change event: {err}")))?;
    Ok(NewItem {
        source: cx.name.clone(),
        kind: ItemKind::Change,
        msg_type: Some(format!("{}.{}", event.table, event.op.as_str())),
        control_id: event.position.clone(),
        subject: None,
        external_ref,
        payload,
        sinks: sinks.to_vec(),
    })
}

/// One queue item for a chunk of encoded events (a snapshot chunk): the payload is their
/// newline-delimited JSON, the type label `<table>.<op>` as for single events, and the
/// control id says how many events it holds (`1000 events`).
fn chunk_item(
    cx: &SourceContext,
    encoded: outpost_sql::EncodedEvents,
    sinks: &[outpost_core::ConnectorName],
) -> NewItem {
    NewItem {
        source: cx.name.clone(),
        kind: ItemKind::Change,
        msg_type: Some(format!("{}.{}", encoded.table, encoded.op.as_str())),
        control_id: Some(format!("{} events", encoded.count)),
        subject: None,
        external_ref: None,
        payload: encoded.ndjson,
        sinks: sinks.to_vec(),
    }
}

/// The position file of versions that kept it beside the queue: read once, when the
/// queue holds no position yet, so an upgraded agent resumes where the old one stopped.
fn read_legacy_position(dir: &Path, path: &Path) -> Result<Option<Position>, ConnectorError> {
    std::fs::create_dir_all(dir)
        .map_err(|err| ConnectorError::Unavailable(format!("create {}: {err}", dir.display())))?;
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some(Position(text.trim().to_owned()))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(ConnectorError::Unavailable(format!(
            "read {}: {err}",
            path.display()
        ))),
    }
}
