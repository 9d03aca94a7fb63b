//! DICOM: a storage SCP source (modalities send studies to it) and a C-STORE SCU sink (it
//! forwards them to a PACS). The protocol lives in `outpost-dicom`; this is where it meets
//! the queue: each instance is written, encrypted, to a blob as it arrives, and only once
//! the blob is on disk and its record committed to the queue does the modality hear
//! "success".

mod batch;
mod sink;
mod source;
mod stow;

use std::time::Duration;

use outpost_queue::blob::BlobRef;
use serde::{Deserialize, Serialize};

pub use sink::run_sink;
pub use source::{bind_source, run_source};
pub use stow::run_sink as run_stow_sink;

use super::mllp::{ConnectAddr, ListenAddr};

/// `[[source]] kind = "dicom"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The address and port to listen on, e.g. `"127.0.0.1:11112"`.
    pub listen: ListenAddr,
    /// Our AE title: associations calling another are rejected.
    pub ae_title: String,
    /// Calling AE titles allowed to send; absent: any.
    #[serde(default)]
    pub allowed_callers: Option<Vec<String>>,
    /// Largest PDU we accept.
    #[serde(default = "default_max_pdu")]
    pub max_pdu: u32,
    /// Associations served at once.
    #[serde(default = "default_max_associations")]
    pub max_associations: usize,
    /// Largest instance accepted, in MiB.
    #[serde(default = "default_max_instance_mb")]
    pub max_instance_mb: u64,
    /// A peer silent this long mid-association is dropped.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

/// `[[sink]] kind = "dicom"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The PACS `host:port`.
    pub connect: ConnectAddr,
    /// The PACS's (called) AE title.
    pub ae_title: String,
    /// Our (calling) AE title.
    #[serde(default = "default_calling_ae")]
    pub calling_ae_title: String,
    /// Instances sent per association, at most.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Largest PDU we propose.
    #[serde(default = "default_max_pdu")]
    pub max_pdu: u32,
    /// Network timeout.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Refusals by the PACS before an instance becomes a dead letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: Option<u32>,
    /// The first backoff after a failure, doubling up to `retry_max_secs`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// The longest backoff.
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
    /// Forward a study only once no instance of it has arrived for this long; absent:
    /// forward instances as they come.
    #[serde(default)]
    pub study_quiet_secs: Option<u64>,
}

impl SinkConfig {
    fn retry_policy(&self) -> outpost_queue::RetryPolicy {
        outpost_queue::RetryPolicy {
            initial_backoff: Duration::from_millis(self.retry_initial_ms),
            max_backoff: Duration::from_secs(self.retry_max_secs),
            max_attempts: self.max_attempts,
        }
    }
}

/// `[[sink]] kind = "stow"`: DICOMweb STOW-RS, one request per study batch.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StowSinkConfig {
    /// The `/studies` resource, e.g. `"http://127.0.0.1:8042/dicom-web/studies"`.
    pub url: String,
    /// Sent as `Authorization: Bearer …`.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// HTTP basic authentication user (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// HTTP basic authentication password.
    #[serde(default)]
    pub password: Option<String>,
    /// Instances per request, at most.
    #[serde(default = "default_stow_batch")]
    pub batch: usize,
    /// Request timeout; must allow for the largest batch.
    #[serde(default = "default_stow_timeout_secs")]
    pub timeout_secs: u64,
    /// Forward a study only once no instance of it has arrived for this long.
    #[serde(default)]
    pub study_quiet_secs: Option<u64>,
    /// Refusals before an instance becomes a dead letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: Option<u32>,
    /// The first backoff after a failure, doubling up to `retry_max_secs`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// The longest backoff.
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
}

impl std::fmt::Debug for StowSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StowSinkConfig")
            .field("url", &self.url)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "***"))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("batch", &self.batch)
            .field("study_quiet_secs", &self.study_quiet_secs)
            .finish_non_exhaustive()
    }
}

impl StowSinkConfig {
    fn retry_policy(&self) -> outpost_queue::RetryPolicy {
        outpost_queue::RetryPolicy {
            initial_backoff: Duration::from_millis(self.retry_initial_ms),
            max_backoff: Duration::from_secs(self.retry_max_secs),
            max_attempts: self.max_attempts,
        }
    }
}

fn default_stow_batch() -> usize {
    50
}
fn default_stow_timeout_secs() -> u64 {
    300
}
fn default_max_pdu() -> u32 {
    64 * 1024
}
fn default_max_associations() -> usize {
    16
}
fn default_max_instance_mb() -> u64 {
    4096
}
fn default_timeout_secs() -> u64 {
    60
}
fn default_calling_ae() -> String {
    "OUTPOST".into()
}
fn default_batch() -> usize {
    64
}
fn default_max_attempts() -> Option<u32> {
    Some(10)
}
fn default_retry_initial_ms() -> u64 {
    1000
}
fn default_retry_max_secs() -> u64 {
    300
}

/// What the queue keeps for one instance (sealed like every payload): where its
/// encrypted blob is and what it is. The blob holds the instance as a Part-10 file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The blob's file name.
    pub blob: String,
    /// The blob's key, hex.
    pub key: String,
    /// The Part-10 file's length.
    pub len: u64,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// The transfer syntax it arrived in (and is forwarded in).
    pub transfer_syntax: String,
    /// Who sent it.
    pub calling_ae: String,
    /// Study Instance UID, when the data set had one.
    #[serde(default)]
    pub study_instance_uid: Option<String>,
    /// Series Instance UID.
    #[serde(default)]
    pub series_instance_uid: Option<String>,
    /// Modality.
    #[serde(default)]
    pub modality: Option<String>,
}

impl InstanceRecord {
    /// The blob reference.
    pub fn blob_ref(&self) -> Option<BlobRef> {
        Some(BlobRef {
            name: self.blob.clone(),
            key: hex::decode(&self.key).ok()?.try_into().ok()?,
            len: self.len,
        })
    }
}
