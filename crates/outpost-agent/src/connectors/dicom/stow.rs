//! The STOW-RS sink: forwards queued instances to a DICOMweb server, a study batch per
//! request, each Part-10 file streamed from its blob as the request body is sent.

use std::time::Duration;

use outpost_dicom::stow::{StowAuth, StowClient, StowPart};
use outpost_queue::blob::BlobStore;
use outpost_queue::RetryPolicy;

use super::batch::{next_batch, Next};
use super::{InstanceRecord, StowSinkConfig};
use crate::connectors::SinkContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

/// Backoff while the server cannot be reached or answers 5xx.
const UNREACHABLE_BACKOFF: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_millis(500),
    max_backoff: Duration::from_secs(30),
    max_attempts: None,
};

/// Delivers until shutdown; errors only when the queue itself fails.
pub async fn run_sink(config: StowSinkConfig, cx: SinkContext) -> Result<(), ConnectorError> {
    let blobs = BlobStore::open(&cx.data_dir)
        .map_err(|err| ConnectorError::Unavailable(err.to_string()))?;
    let auth = match (&config.bearer_token, &config.username) {
        (Some(token), _) => Some(StowAuth::Bearer(token.clone())),
        (None, Some(user)) => Some(StowAuth::Basic {
            user: user.clone(),
            password: config.password.clone().unwrap_or_default(),
        }),
        (None, None) => None,
    };
    let client = StowClient::new(
        config.url.clone(),
        auth,
        Duration::from_secs(config.timeout_secs),
    )
    .map_err(|err| ConnectorError::Unavailable(err.to_string()))?;
    let policy = config.retry_policy();
    let quiet = config.study_quiet_secs.map(Duration::from_secs);
    let mut failures = 0u32;
    loop {
        if cx.shutdown.is_cancelled() {
            break;
        }
        let generation = cx.queue.append_generation();
        let batch = match next_batch(&cx, quiet, config.batch, &policy).await? {
            Next::Send(batch) => batch,
            Next::Wait(wait) => {
                cx.health.set_state(&cx.name, ConnectorState::Running);
                tokio::select! {
                    _ = cx.shutdown.cancelled() => break,
                    _ = cx.queue.wait_for_append(generation, wait) => {}
                }
                continue;
            }
        };
        match send(&client, &blobs, &cx, &policy, batch).await? {
            None => failures = 0,
            Some(problem) => {
                failures = failures.saturating_add(1);
                let delay = UNREACHABLE_BACKOFF.backoff(failures);
                cx.health.set_state(&cx.name, ConnectorState::BackingOff);
                cx.health.record_failure(&cx.name, &problem);
                tracing::warn!(url = %config.url, problem, retry_in_ms = delay.as_millis() as u64, "cannot deliver by STOW-RS; will retry");
                tokio::select! {
                    _ = cx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    Ok(())
}

/// Sends one batch and records each instance's outcome. Returns the problem when the
/// server could not be reached or asked to come back later (nothing counted).
async fn send(
    client: &StowClient,
    blobs: &BlobStore,
    cx: &SinkContext,
    policy: &RetryPolicy,
    batch: Vec<(outpost_queue::Lease, InstanceRecord)>,
) -> Result<Option<String>, ConnectorError> {
    let mut parts = Vec::with_capacity(batch.len());
    let mut sent = Vec::with_capacity(batch.len());
    for (lease, record) in batch {
        let opened = match record.blob_ref() {
            Some(blob) => blobs
                .open_reader(&blob)
                .await
                .map_err(|err| err.to_string()),
            None => Err("the record's blob key is not hex".to_owned()),
        };
        match opened {
            Ok(reader) => {
                parts.push(StowPart {
                    len: record.len,
                    reader: Box::new(reader.into_async_read()),
                });
                sent.push((lease, record));
            }
            Err(problem) => {
                let failed = cx
                    .queue
                    .mark_failed(&cx.name, lease.id, &problem, *policy, true)
                    .await?;
                tracing::error!(item_id = %lease.id, problem, outcome = ?failed, "an instance's blob cannot be read");
            }
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let outcome = match client.store(parts).await {
        Ok(outcome) => outcome,
        Err(err) => return Ok(Some(err.to_string())),
    };
    if outcome.retryable() {
        return Ok(Some(format!(
            "the server answered HTTP {}",
            outcome.http_status
        )));
    }
    for (lease, record) in sent {
        if outcome.is_stored(&record.sop_instance_uid) {
            cx.queue.mark_delivered(&cx.name, lease.id).await?;
            cx.health.count_item(&cx.name);
            tracing::info!(item_id = %lease.id, sop_instance_uid = %record.sop_instance_uid, "instance delivered by STOW-RS");
        } else {
            let reason = outcome
                .failed
                .iter()
                .find(|f| f.sop_instance_uid.as_deref() == Some(record.sop_instance_uid.as_str()))
                .and_then(|f| f.reason)
                .map(|code| format!(" (failure reason {code:#06x})"))
                .unwrap_or_default();
            let error = format!(
                "the server answered HTTP {} without storing the instance{reason}",
                outcome.http_status
            );
            let failed = cx
                .queue
                .mark_failed(&cx.name, lease.id, &error, *policy, false)
                .await?;
            cx.health.record_failure(&cx.name, &error);
            tracing::warn!(item_id = %lease.id, sop_instance_uid = %record.sop_instance_uid, outcome = ?failed, "{error}");
        }
    }
    Ok(None)
}
