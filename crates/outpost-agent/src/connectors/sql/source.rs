//! The SQL source's task: read batches, queue them, store the position, commit.

use std::io::Write;
use std::path::{Path, PathBuf};

use outpost_core::ItemKind;
use outpost_queue::NewItem;
use outpost_sql::{ChangeEvent, Position};

use super::SourceConfig;
use crate::connectors::SourceContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

/// The position file's name in the source's state folder.
const POSITION_FILE: &str = "position";

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
    let position_path = state_dir.join(POSITION_FILE);
    let stored = {
        let (dir, path) = (state_dir.clone(), position_path.clone());
        tokio::task::spawn_blocking(move || read_position(&dir, &path))
            .await
            .map_err(|err| ConnectorError::Unavailable(err.to_string()))??
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
    // Until a batch holds nothing the queue already has, look each event up first.
    let mut checking = true;
    let mut tracker = super::progress::Tracker::default();
    loop {
        let batch = tokio::select! {
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
            items.push(item(&cx, event, external_ref, &sinks)?);
        }
        // Submitted together, so the queue's writer commits them in a few transactions
        // (group commit) rather than one fsync each. The futures are first polled in order
        // and the writer's channel is FIFO (also when full), so item ids keep event order.
        let queued = items.len();
        futures::future::try_join_all(items.into_iter().map(|item| cx.queue.append(item))).await?;
        for _ in 0..queued {
            cx.health.count_item(&cx.name);
        }
        checking = repeats > 0;
        if repeats > 0 {
            tracing::info!(repeats, "skipped events already queued before a restart");
        }
        if !batch.events.is_empty() {
            tracing::debug!(events = batch.events.len(), "batch queued");
        }
        let (dir, path, position) = (
            state_dir.clone(),
            position_path.clone(),
            batch.position.clone(),
        );
        tokio::task::spawn_blocking(move || write_position(&dir, &path, &position))
            .await
            .map_err(|err| ConnectorError::Unavailable(err.to_string()))??;
        source
            .committed(&batch.position)
            .await
            .map_err(unavailable)?;
        tracker.observe(&batch.events);
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
    cx.health.set_state(&cx.name, ConnectorState::Stopped);
    Ok(())
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

fn read_position(dir: &Path, path: &Path) -> Result<Option<Position>, ConnectorError> {
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

/// Replaces the position file atomically: temporary file, fsync, rename, fsync the folder.
fn write_position(dir: &Path, path: &Path, position: &Position) -> Result<(), ConnectorError> {
    let fail = |what: &str, err: std::io::Error| {
        ConnectorError::Unavailable(format!("{what} {}: {err}", path.display()))
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|err| fail("create", err))?;
    file.write_all(position.0.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|err| fail("write", err))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|err| fail("rename into", err))?;
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| fail("sync the folder of", err))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
