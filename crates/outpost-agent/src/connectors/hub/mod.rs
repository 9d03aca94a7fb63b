//! `[[sink]] kind = "hub"`: delivers a sink's queue to the vendor's hub over the agent's
//! uplink session. Several batches are kept in flight; each is marked delivered once the
//! hub has stored it. The hub drops an item id it already has, so a batch resent after a
//! lost session or a crash is still seen once.

use std::collections::VecDeque;
use std::time::Duration;

mod upload;

use outpost_core::{ItemId, ItemKind};
use outpost_proto::{Payload, UpItem};
use serde::Deserialize;

use crate::connectors::SinkContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

/// `[[sink]] kind = "hub"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Items per batch.
    #[serde(default = "default_batch_items")]
    pub batch_items: usize,
    /// Bytes per batch (a batch always holds at least one item). DICOM instances are
    /// uploaded on their own, in parts, before their item.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
}

fn default_batch_items() -> usize {
    256
}
fn default_batch_bytes() -> usize {
    4 * 1024 * 1024
}

/// Batches sent and not yet stored: their ids and the hub's answer to come.
type InFlight = VecDeque<(
    Vec<ItemId>,
    tokio::sync::oneshot::Receiver<Result<(), outpost_uplink::UplinkError>>,
)>;

/// Batches sent and not yet stored, at most (the uplink allows as many).
const WINDOW: usize = 4;
/// Retry policy for items that cannot be read (made dead letters at once).
const UNREADABLE: outpost_queue::RetryPolicy = outpost_queue::RetryPolicy {
    initial_backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(60),
    max_attempts: Some(1),
};
/// How long the sink waits for a replaced session before trying again on the same one.
const RETRY_SAME_SESSION: Duration = Duration::from_secs(10);
/// How long an idle sink waits before looking at the queue again without a wake-up.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Delivers until shutdown.
pub async fn run_sink(config: SinkConfig, cx: SinkContext) -> Result<(), ConnectorError> {
    let Some(uplink) = cx.uplink.clone() else {
        return Err(ConnectorError::Unavailable(
            "this agent has no hub session".into(),
        ));
    };
    loop {
        cx.health.set_state(&cx.name, ConnectorState::Starting);
        let session = tokio::select! {
            _ = cx.shutdown.cancelled() => break,
            session = uplink.wait_connected() => session,
        };
        cx.health.set_state(&cx.name, ConnectorState::Running);
        let mut after = ItemId(0);
        let mut in_flight = InFlight::new();
        let lost = 'session: loop {
            let generation = cx.queue.append_generation();
            while in_flight.len() < WINDOW {
                let (batch, _) = cx
                    .queue
                    .ready_after(
                        &cx.name,
                        after,
                        config.batch_items.max(1),
                        config.batch_bytes,
                    )
                    .await?;
                let Some(last) = batch.last() else { break };
                after = last.id;
                let mut ids: Vec<ItemId> = Vec::with_capacity(batch.len());
                let mut items = Vec::with_capacity(batch.len());
                for lease in batch {
                    let payload = if lease.kind == ItemKind::Dicom {
                        // The instance's file goes first, resumably; the item carries only
                        // what it is.
                        match upload::instance(&uplink, &cx, &lease).await {
                            Ok(summary) => summary,
                            Err(upload::UploadError::Unreadable(problem)) => {
                                let failed = cx
                                    .queue
                                    .mark_failed(&cx.name, lease.id, &problem, UNREADABLE, true)
                                    .await?;
                                tracing::error!(item_id = %lease.id, problem, outcome = ?failed, "an instance cannot be read for the hub");
                                continue;
                            }
                            Err(upload::UploadError::Link(reason)) => break 'session reason,
                        }
                    } else {
                        lease.payload
                    };
                    ids.push(lease.id);
                    items.push(UpItem {
                        id: lease.id.0,
                        source: lease.source,
                        kind: lease.kind.as_str().to_owned(),
                        msg_type: lease.msg_type,
                        control_id: lease.control_id,
                        received_at_ms: lease.received_at_ms,
                        payload: Payload(payload),
                    });
                }
                if items.is_empty() {
                    continue;
                }
                let stored = uplink.send_items(session, items).await;
                in_flight.push_back((ids, stored));
            }
            let Some((ids, stored)) = in_flight.pop_front() else {
                tokio::select! {
                    _ = cx.shutdown.cancelled() => return stopped(&cx),
                    _ = cx.queue.wait_for_append(generation, IDLE_POLL) => {}
                }
                continue;
            };
            let outcome = tokio::select! {
                _ = cx.shutdown.cancelled() => return stopped(&cx),
                outcome = tokio::time::timeout(outpost_uplink::STORE_TIMEOUT, stored) => outcome,
            };
            match outcome {
                Ok(Ok(Ok(()))) => {
                    let count = ids.len();
                    cx.queue.mark_delivered_many(&cx.name, ids).await?;
                    for _ in 0..count {
                        cx.health.count_item(&cx.name);
                    }
                }
                Ok(Ok(Err(err))) => break err.to_string(),
                Ok(Err(_)) => break "uplink stopped".to_owned(),
                Err(_) => {
                    break format!(
                        "hub did not store a batch within {} s",
                        outpost_uplink::STORE_TIMEOUT.as_secs()
                    )
                }
            }
        };
        tracing::warn!(
            reason = lost,
            "hub delivery interrupted; unacknowledged items will be resent"
        );
        cx.health.record_failure(&cx.name, &lost);
        // Wait for the session to be replaced before starting again from the head.
        tokio::select! {
            _ = cx.shutdown.cancelled() => break,
            _ = wait_for_new_session(&uplink, session) => {}
            // A timeout on a session that stays up (a slow hub) is tried again on it.
            _ = tokio::time::sleep(RETRY_SAME_SESSION) => {}
        }
    }
    stopped(&cx)
}

fn stopped(cx: &SinkContext) -> Result<(), ConnectorError> {
    cx.health.set_state(&cx.name, ConnectorState::Stopped);
    Ok(())
}

async fn wait_for_new_session(uplink: &outpost_uplink::UplinkHandle, old: u64) {
    loop {
        if matches!(uplink.state(), outpost_uplink::LinkState::Up(n) if n != old) {
            return;
        }
        if matches!(uplink.state(), outpost_uplink::LinkState::Down(_)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
