//! Reading a DICOM sink's queue in study batches. A sink may wait for a study to be
//! complete (no new instance of it for `study_quiet_secs`, the rule existing gateways
//! use) before forwarding any of it; then the study, not each instance, is the unit sent.

use std::collections::HashMap;
use std::time::Duration;

use outpost_core::ItemId;
use outpost_queue::{Lease, RetryPolicy};

use super::InstanceRecord;
use crate::connectors::SinkContext;
use crate::ConnectorError;

/// Pending items looked at per round, at most, to find a complete study.
const SCAN_LIMIT: usize = 5_000;
/// Items read per page while scanning.
const PAGE: usize = 500;

/// What the sink should do next.
pub enum Next {
    /// Send these (one study, or several when not waiting for studies), in queue order.
    Send(Vec<(Lease, InstanceRecord)>),
    /// Nothing to send now; look again after this long (or on a new item).
    Wait(Duration),
}

/// The next batch: up to `max_items` instances. With a quiet period, only instances of
/// the first study (in queue order) whose newest pending instance arrived at least that
/// long ago. Items whose record cannot be read are dead-lettered on the way.
pub async fn next_batch(
    cx: &SinkContext,
    quiet: Option<Duration>,
    max_items: usize,
    policy: &RetryPolicy,
) -> Result<Next, ConnectorError> {
    let mut after = ItemId(0);
    let mut seen: Vec<(Lease, InstanceRecord)> = Vec::new();
    let mut backoff = None;
    loop {
        let page_size = match quiet {
            Some(_) => PAGE,
            None => max_items.max(1),
        };
        let (leases, wait) = cx
            .queue
            .ready_after(&cx.name, after, page_size, 16 * 1024 * 1024)
            .await?;
        backoff = backoff.or(wait);
        let got = leases.len();
        for lease in leases {
            after = lease.id;
            match serde_json::from_slice::<InstanceRecord>(&lease.payload) {
                Ok(record) => seen.push((lease, record)),
                Err(err) => {
                    cx.queue
                        .mark_failed(
                            &cx.name,
                            lease.id,
                            &format!("not a DICOM instance record: {err}"),
                            *policy,
                            true,
                        )
                        .await?;
                }
            }
        }
        let Some(quiet) = quiet else {
            break;
        };
        if got < page_size || wait.is_some() || seen.len() >= SCAN_LIMIT {
            return Ok(pick_complete_study(seen, quiet, max_items, backoff));
        }
    }
    if seen.is_empty() {
        return Ok(Next::Wait(backoff.unwrap_or(Duration::from_secs(1))));
    }
    seen.truncate(max_items.max(1));
    Ok(Next::Send(seen))
}

fn pick_complete_study(
    seen: Vec<(Lease, InstanceRecord)>,
    quiet: Duration,
    max_items: usize,
    backoff: Option<Duration>,
) -> Next {
    let now = outpost_queue::now_ms();
    let quiet_ms = quiet.as_millis() as i64;
    let mut newest: HashMap<String, i64> = HashMap::new();
    for (lease, record) in &seen {
        let study = study_key(record);
        let entry = newest.entry(study).or_insert(lease.received_at_ms);
        *entry = (*entry).max(lease.received_at_ms);
    }
    let first_complete = seen
        .iter()
        .map(|(_, record)| study_key(record))
        .find(|study| newest.get(study).is_some_and(|t| now - t >= quiet_ms));
    match first_complete {
        Some(study) => {
            let batch: Vec<(Lease, InstanceRecord)> = seen
                .into_iter()
                .filter(|(_, record)| study_key(record) == study)
                .take(max_items.max(1))
                .collect();
            Next::Send(batch)
        }
        None => {
            // The soonest any study becomes complete.
            let soonest = newest
                .values()
                .map(|t| quiet_ms - (now - t))
                .min()
                .map(|ms| Duration::from_millis(ms.max(50) as u64));
            Next::Wait(
                soonest
                    .or(backoff)
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1)),
            )
        }
    }
}

/// Instances without a Study Instance UID form a study of their own.
fn study_key(record: &InstanceRecord) -> String {
    record
        .study_instance_uid
        .clone()
        .unwrap_or_else(|| format!("instance:{}", record.sop_instance_uid))
}
