//! The jsonl sink's task.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use outpost_core::{ItemId, ItemKind};
use outpost_queue::Lease;
use serde_json::json;

use super::SinkConfig;
use crate::connectors::SinkContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

/// How long an idle sink waits before looking at the queue again without a wake-up.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The most payload bytes read per batch.
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Wait after a failed write before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Delivers until shutdown. Returns an error only when the queue fails.
pub async fn run_sink(config: SinkConfig, cx: SinkContext) -> Result<(), ConnectorError> {
    cx.health.set_state(&cx.name, ConnectorState::Running);
    loop {
        if cx.shutdown.is_cancelled() {
            break;
        }
        let generation = cx.queue.append_generation();
        let (leases, backoff) = cx
            .queue
            .ready_after(&cx.name, ItemId(0), config.batch_items.max(1), BATCH_BYTES)
            .await?;
        if leases.is_empty() {
            let wait = backoff.map_or(IDLE_POLL, |d| d.min(IDLE_POLL));
            tokio::select! {
                _ = cx.shutdown.cancelled() => break,
                _ = cx.queue.wait_for_append(generation, wait) => {}
            }
            continue;
        }
        let mut text = Vec::with_capacity(leases.iter().map(|l| l.payload.len() + 1).sum());
        for lease in &leases {
            write_line(lease, &mut text);
            text.push(b'\n');
        }
        let ids: Vec<ItemId> = leases.iter().map(|l| l.id).collect();
        let path = config.path.clone();
        let written = tokio::task::spawn_blocking(move || append_synced(&path, &text))
            .await
            .map_err(|err| ConnectorError::Unavailable(err.to_string()))?;
        match written {
            Ok(()) => {
                cx.queue.mark_delivered_many(&cx.name, ids.clone()).await?;
                for _ in &ids {
                    cx.health.count_item(&cx.name);
                }
                cx.health.set_state(&cx.name, ConnectorState::Running);
            }
            Err(err) => {
                let error = format!("append to {}: {err}", config.path.display());
                tracing::warn!(error, "items stay queued");
                cx.health.record_failure(&cx.name, &error);
                cx.health.set_state(&cx.name, ConnectorState::BackingOff);
                tokio::select! {
                    _ = cx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
    }
    cx.health.set_state(&cx.name, ConnectorState::Stopped);
    Ok(())
}

/// Appends one item as one line of JSON (without the newline). A change event is written
/// as it is; a chunk of change events (a snapshot chunk: one event per line) as its lines.
fn write_line(lease: &Lease, out: &mut Vec<u8>) {
    if lease.kind == ItemKind::Change && is_change_events(&lease.payload) {
        let end = lease.payload.len() - usize::from(lease.payload.ends_with(b"\n"));
        out.extend_from_slice(&lease.payload[..end]);
        return;
    }
    let mut value = json!({
        "item_id": lease.id.0,
        "source": lease.source,
        "kind": lease.kind.as_str(),
        "msg_type": lease.msg_type,
        "received_at_ms": lease.received_at_ms,
    });
    match std::str::from_utf8(&lease.payload) {
        Ok(text) => value["payload"] = json!(text),
        Err(_) => {
            value["payload_base64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&lease.payload))
        }
    }
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &value);
}

/// Whether `payload` is one JSON object, or several, one per line (a snapshot chunk). Only
/// the shape is looked at: change items are written by the agent's own SQL source and
/// authenticated by the queue's sealing, and a full parse of every line would cost more
/// than the write.
fn is_change_events(payload: &[u8]) -> bool {
    let mut lines = payload
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .peekable();
    lines.peek().is_some()
        && lines.all(|line| line.first() == Some(&b'{') && line.last() == Some(&b'}'))
}

/// Appends `text` and fsyncs. A last line left unfinished by a crash (power loss) is ended
/// first, so it never runs into the next one.
fn append_synced(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut out = Vec::with_capacity(text.len() + 1);
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            out.push(b'\n');
        }
    }
    out.extend_from_slice(text);
    file.write_all(&out)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn appends_lines_and_ends_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/events.jsonl");
        append_synced(&path, b"{\"a\":1}\n").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"torn")
            .unwrap();
        append_synced(&path, b"{\"b\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"torn\n{\"b\":2}\n"
        );
    }
}
