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

/// Appends `text` and fsyncs. A last line left unfinished by a crash (kill -9 or power
/// loss mid-write) is cut off first: its items were never recorded as delivered, so they
/// are in `text` or a later batch, whole, and a reader never meets half an event.
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
    let whole = end_of_last_line(&mut file, len)?;
    if whole < len {
        tracing::warn!(path = %path.display(), bytes = len - whole, "cutting off a line left unfinished by a crash; its items are written again whole");
        file.set_len(whole)?;
    }
    file.write_all(text)?;
    file.sync_data()
}

/// Where the file's last complete line ends (after its newline; 0 if it has none).
fn end_of_last_line(file: &mut std::fs::File, len: u64) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let mut block = vec![0u8; BLOCK as usize];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let piece = &mut block[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(piece)?;
        if let Some(at) = piece.iter().rposition(|byte| *byte == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn appends_lines_and_cuts_off_a_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/events.jsonl");
        let torn = |path: &Path, bytes: &[u8]| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap()
                .write_all(bytes)
                .unwrap();
        };
        append_synced(&path, b"{\"a\":1}\n").unwrap();
        torn(&path, b"{\"torn");
        append_synced(&path, b"{\"b\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        // A torn line longer than the block read backwards, and a file that is only one.
        let long = vec![b'x'; 200_000];
        torn(&path, &long);
        append_synced(&path, b"{\"c\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n"
        );
        let only = dir.path().join("only.jsonl");
        torn(&only, &long);
        append_synced(&only, b"{\"d\":4}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&only).unwrap(), "{\"d\":4}\n");
    }
}
