//! The C-STORE sink: forwards queued instances to a PACS, a batch per association, each
//! in the transfer syntax it arrived in, decrypting its blob as it streams.
//!
//! As with MLLP, a PACS that cannot be reached is the sink's problem (back off, no attempt
//! counted); a PACS that answers with a failure status is the instance's (counted, dead
//! letter after `max_attempts`).

use std::time::Duration;

use outpost_dicom::scu::{OutgoingInstance, ScuConfig, StatusClass, StoreAssociation};
use outpost_queue::blob::BlobStore;
use outpost_queue::{Lease, RetryPolicy};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::batch::{next_batch, Next};
use super::{InstanceRecord, SinkConfig};
use crate::connectors::SinkContext;
use crate::health::ConnectorState;
use crate::ConnectorError;

/// Backoff bounds while the PACS cannot be reached.
const CONNECT_BACKOFF: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_millis(500),
    max_backoff: Duration::from_secs(30),
    max_attempts: None,
};

/// Delivers until shutdown; errors only when the queue itself fails.
pub async fn run_sink(config: SinkConfig, cx: SinkContext) -> Result<(), ConnectorError> {
    let blobs = BlobStore::open(&cx.data_dir)
        .map_err(|err| ConnectorError::Unavailable(err.to_string()))?;
    let scu = ScuConfig {
        address: config.connect.0.clone(),
        called_ae: config.ae_title.clone(),
        calling_ae: config.calling_ae_title.clone(),
        max_pdu: config.max_pdu,
        timeout: Duration::from_secs(config.timeout_secs),
    };
    let policy = config.retry_policy();
    let mut connection_failures = 0u32;
    loop {
        if cx.shutdown.is_cancelled() {
            break;
        }
        let generation = cx.queue.append_generation();
        let quiet = config.study_quiet_secs.map(Duration::from_secs);
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
        match send_batch(&scu, &blobs, &cx, &policy, batch).await? {
            BatchEnd::Done => connection_failures = 0,
            BatchEnd::PacsUnreachable(problem) => {
                connection_failures = connection_failures.saturating_add(1);
                let delay = CONNECT_BACKOFF.backoff(connection_failures);
                cx.health.set_state(&cx.name, ConnectorState::BackingOff);
                cx.health.record_failure(&cx.name, &problem);
                tracing::warn!(pacs = %scu.address, problem, retry_in_ms = delay.as_millis() as u64, "cannot deliver to the PACS; will retry");
                tokio::select! {
                    _ = cx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    Ok(())
}

enum BatchEnd {
    Done,
    PacsUnreachable(String),
}

async fn send_batch(
    scu: &ScuConfig,
    blobs: &BlobStore,
    cx: &SinkContext,
    policy: &RetryPolicy,
    batch: Vec<(Lease, InstanceRecord)>,
) -> Result<BatchEnd, ConnectorError> {
    let mut contexts: Vec<(String, String)> = Vec::new();
    for (_, record) in &batch {
        let pair = (record.sop_class_uid.clone(), record.transfer_syntax.clone());
        if !contexts.contains(&pair) {
            contexts.push(pair);
        }
    }
    let mut association = match StoreAssociation::open(scu, &contexts).await {
        Ok(association) => association,
        Err(err) => return Ok(BatchEnd::PacsUnreachable(err.to_string())),
    };
    let accepted = association.accepted_contexts();
    for (lease, record) in batch {
        if cx.shutdown.is_cancelled() {
            break;
        }
        let context = (record.sop_class_uid.clone(), record.transfer_syntax.clone());
        if !accepted.contains(&context) {
            // The PACS said no to this class in this syntax: the instance's problem (it is
            // never transcoded), counted like a refusal.
            let error = format!(
                "the PACS does not accept SOP class {} in transfer syntax {}",
                record.sop_class_uid, record.transfer_syntax
            );
            let failed = cx
                .queue
                .mark_failed(&cx.name, lease.id, &error, *policy, false)
                .await?;
            cx.health.record_failure(&cx.name, &error);
            tracing::warn!(item_id = %lease.id, sop_instance_uid = %record.sop_instance_uid, outcome = ?failed, "{error}");
            continue;
        }
        let outcome = send_one(&mut association, blobs, &record).await;
        match outcome {
            Ok(code) => match outpost_dicom::scu::classify_status(code) {
                StatusClass::Success | StatusClass::Warning => {
                    cx.queue.mark_delivered(&cx.name, lease.id).await?;
                    cx.health.count_item(&cx.name);
                    tracing::info!(item_id = %lease.id, sop_instance_uid = %record.sop_instance_uid, status = format!("{code:#06x}"), "instance delivered");
                }
                StatusClass::RetryLater | StatusClass::Failed => {
                    // Even a failure status is retried (up to `max_attempts`): a PACS
                    // refusing a class or a syntax is usually fixed on the PACS.
                    let error = format!("the PACS answered status {code:#06x}");
                    let failed = cx
                        .queue
                        .mark_failed(&cx.name, lease.id, &error, *policy, false)
                        .await?;
                    cx.health.record_failure(&cx.name, &error);
                    tracing::warn!(item_id = %lease.id, sop_instance_uid = %record.sop_instance_uid, status = format!("{code:#06x}"), outcome = ?failed, "the PACS refused an instance");
                    // Nothing after a refused instance may overtake it in this batch.
                    break;
                }
            },
            Err(SendError::Blob(problem)) => {
                let failed = cx
                    .queue
                    .mark_failed(&cx.name, lease.id, &problem, *policy, true)
                    .await?;
                tracing::error!(item_id = %lease.id, problem, outcome = ?failed, "an instance's blob cannot be read");
            }
            Err(SendError::Link(problem)) => {
                // The association broke while this instance was on its way: count it, so
                // an instance the PACS aborts on every time ends as a dead letter instead
                // of blocking the sink for ever. A PACS that went away is backed off from.
                let error = format!("the association broke while sending: {problem}");
                let failed = cx
                    .queue
                    .mark_failed(&cx.name, lease.id, &error, *policy, false)
                    .await?;
                tracing::warn!(item_id = %lease.id, sop_instance_uid = %record.sop_instance_uid, outcome = ?failed, "{error}");
                return Ok(BatchEnd::PacsUnreachable(problem));
            }
        }
    }
    if let Err(err) = association.release().await {
        // Everything in the batch is already recorded; a failed release only means the
        // PACS closed first.
        tracing::debug!(error = %err, "releasing the association");
    }
    Ok(BatchEnd::Done)
}

enum SendError {
    /// The blob is missing or damaged: no retry helps.
    Blob(String),
    /// The association broke.
    Link(String),
}

async fn send_one(
    association: &mut StoreAssociation,
    blobs: &BlobStore,
    record: &InstanceRecord,
) -> Result<u16, SendError> {
    let blob = record
        .blob_ref()
        .ok_or_else(|| SendError::Blob("the record's blob key is not hex".into()))?;
    let reader = blobs
        .open_reader(&blob)
        .await
        .map_err(|err| SendError::Blob(err.to_string()))?;
    let mut file = reader.into_async_read();
    let header_len = skip_part10_header(&mut file)
        .await
        .map_err(|err| SendError::Blob(format!("blob {}: {err}", record.blob)))?;
    let instance = OutgoingInstance {
        sop_class_uid: record.sop_class_uid.clone(),
        sop_instance_uid: record.sop_instance_uid.clone(),
        transfer_syntax: record.transfer_syntax.clone(),
        dataset_len: record.len.saturating_sub(header_len),
    };
    association
        .store(&instance, file)
        .await
        .map_err(|err| SendError::Link(err.to_string()))
}

/// Reads past the preamble and file meta group of a Part-10 stream; returns how many bytes
/// that was. The meta group starts with its group length (0002,0000), explicit VR LE.
async fn skip_part10_header<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<u64> {
    let mut preamble = [0u8; 132];
    reader.read_exact(&mut preamble).await?;
    if &preamble[128..] != b"DICM" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a Part-10 file (no DICM)",
        ));
    }
    let mut group_length = [0u8; 12];
    reader.read_exact(&mut group_length).await?;
    if group_length[..6] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file meta does not start with its group length",
        ));
    }
    let length = u32::from_le_bytes([
        group_length[8],
        group_length[9],
        group_length[10],
        group_length[11],
    ]) as u64;
    let skipped = tokio::io::copy(&mut (&mut *reader).take(length), &mut tokio::io::sink()).await?;
    if skipped != length {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file meta is cut short",
        ));
    }
    Ok(144 + length)
}
