//! Uploading an item's file (a DICOM instance) to the hub in parts, resumably: the hub says
//! how much it holds, the agent sends the rest from there, decrypting the blob as it goes,
//! and a session lost halfway costs only the parts not yet held.

use std::time::Duration;

use outpost_proto::{AgentToHub, Payload, MAX_BLOB_PART};
use outpost_queue::blob::BlobStore;
use outpost_queue::Lease;
use outpost_uplink::UplinkHandle;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::connectors::dicom::InstanceRecord;
use crate::connectors::SinkContext;

/// Bytes sent and not yet confirmed by the hub, at most.
const UNCONFIRMED_BYTES: u64 = 8 * 1024 * 1024;
/// How long to wait for the hub's answer about an upload.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Offers of the same upload in one go before giving up on this session.
const MAX_OFFERS: usize = 3;

/// What the hub keeps in the item itself: what the instance is, never where or how it is
/// stored on the agent (the blob's name and key stay here).
#[derive(Serialize)]
struct InstanceSummary<'a> {
    sop_class_uid: &'a str,
    sop_instance_uid: &'a str,
    transfer_syntax: &'a str,
    calling_ae: &'a str,
    study_instance_uid: Option<&'a str>,
    series_instance_uid: Option<&'a str>,
    modality: Option<&'a str>,
    bytes: u64,
}

/// Why an upload stopped.
pub enum UploadError {
    /// The instance's record or blob cannot be read: no retry helps (a dead letter).
    Unreadable(String),
    /// The link or the hub: try again (the upload resumes).
    Link(String),
}

impl From<String> for UploadError {
    fn from(problem: String) -> Self {
        UploadError::Link(problem)
    }
}

/// Uploads the instance of `lease` until the hub holds all of it; returns the item's
/// payload for the hub (the instance's summary).
pub async fn instance(
    uplink: &UplinkHandle,
    cx: &SinkContext,
    lease: &Lease,
) -> Result<Vec<u8>, UploadError> {
    let unreadable =
        |problem: String| UploadError::Unreadable(format!("item {}: {problem}", lease.id));
    let record: InstanceRecord = serde_json::from_slice(&lease.payload)
        .map_err(|err| unreadable(format!("not a DICOM instance record: {err}")))?;
    let blob = record
        .blob_ref()
        .ok_or_else(|| unreadable("the blob key is not hex".to_owned()))?;
    let blobs = BlobStore::open(&cx.data_dir).map_err(|err| unreadable(err.to_string()))?;
    let item_id = lease.id.0;
    let total = blob.len;
    let mut answers = uplink.blob_answers();
    for _ in 0..MAX_OFFERS {
        send(uplink, AgentToHub::BlobOffer { item_id, total }).await?;
        let held = answer(&mut answers, item_id).await?;
        if held >= total {
            return Ok(summary(&record));
        }
        if held > 0 {
            tracing::info!(
                item_id,
                held,
                total,
                "resuming an instance upload the hub holds part of"
            );
        }
        let mut reader = blobs
            .open_reader(&blob)
            .await
            .map_err(|err| unreadable(err.to_string()))?;
        let mut position = 0u64;
        let mut part = Vec::with_capacity(MAX_BLOB_PART);
        let mut part_offset = held;
        let mut confirmed = held;
        while let Some(chunk) = reader
            .next_chunk()
            .await
            .map_err(|err| unreadable(err.to_string()))?
        {
            let start = position;
            position += chunk.len() as u64;
            if position <= held {
                continue;
            }
            let mut rest = &chunk[held.saturating_sub(start) as usize..];
            while !rest.is_empty() {
                let take = (MAX_BLOB_PART - part.len()).min(rest.len());
                part.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if part.len() == MAX_BLOB_PART {
                    let data = std::mem::replace(&mut part, Vec::with_capacity(MAX_BLOB_PART));
                    let len = data.len() as u64;
                    send_part(uplink, item_id, part_offset, data).await?;
                    part_offset += len;
                    while part_offset - confirmed > UNCONFIRMED_BYTES {
                        confirmed = answer(&mut answers, item_id).await?;
                    }
                }
            }
        }
        if !part.is_empty() {
            let len = part.len() as u64;
            send_part(uplink, item_id, part_offset, std::mem::take(&mut part)).await?;
            part_offset += len;
        }
        // Every part is answered; the last answer says where the hub stands.
        while confirmed < part_offset {
            let held_now = answer(&mut answers, item_id).await?;
            if held_now < confirmed {
                break;
            }
            confirmed = held_now;
            if confirmed >= total {
                break;
            }
        }
        if confirmed >= total {
            tracing::debug!(item_id, bytes = total, "instance file uploaded");
            return Ok(summary(&record));
        }
        tracing::info!(
            item_id,
            held = confirmed,
            total,
            "hub holds less than sent; resuming"
        );
    }
    Err(UploadError::Link(format!(
        "item {item_id}: the hub did not take the whole file after {MAX_OFFERS} offers"
    )))
}

fn summary(record: &InstanceRecord) -> Vec<u8> {
    serde_json::to_vec(&InstanceSummary {
        sop_class_uid: &record.sop_class_uid,
        sop_instance_uid: &record.sop_instance_uid,
        transfer_syntax: &record.transfer_syntax,
        calling_ae: &record.calling_ae,
        study_instance_uid: record.study_instance_uid.as_deref(),
        series_instance_uid: record.series_instance_uid.as_deref(),
        modality: record.modality.as_deref(),
        bytes: record.len,
    })
    .unwrap_or_default()
}

async fn send(uplink: &UplinkHandle, message: AgentToHub) -> Result<(), String> {
    uplink
        .send(message)
        .await
        .map_err(|_| "uplink stopped".to_owned())
}

async fn send_part(
    uplink: &UplinkHandle,
    item_id: i64,
    offset: u64,
    data: Vec<u8>,
) -> Result<(), String> {
    send(
        uplink,
        AgentToHub::BlobPart {
            item_id,
            offset,
            data: Payload(data),
        },
    )
    .await
}

/// The hub's next answer about `item_id`: the bytes it holds.
async fn answer(
    answers: &mut broadcast::Receiver<(i64, u64)>,
    item_id: i64,
) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        let received = tokio::time::timeout_at(deadline, answers.recv())
            .await
            .map_err(|_| {
                format!(
                    "the hub did not answer about item {item_id}'s file within {} s",
                    ANSWER_TIMEOUT.as_secs()
                )
            })?;
        match received {
            Ok((id, held)) if id == item_id => return Ok(held),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return Err("uplink stopped".into()),
        }
    }
}
