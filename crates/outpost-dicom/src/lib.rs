//! DICOM networking for the Outpost gateway, as bytes and protocol only (no queue, no
//! config files): a storage SCP that streams each incoming instance into an
//! [`InstanceStore`] and answers success only once the store has made it durable, a
//! C-ECHO/C-STORE SCU that sends an instance's data set in its own transfer syntax, a
//! STOW-RS client, and Part-10 file framing.
//!
//! Built on dicom-rs (`dicom-ul` for associations and PDUs, `dicom-object` for command
//! sets and file meta). P-DATA for outgoing data sets is framed here: dicom-ul 0.10.1's
//! data writer can report a zero-byte write when its buffer is exactly full, which
//! `write_all` treats as an error.

#![forbid(unsafe_code)]

pub mod command;
mod error;
pub mod part10;
mod pdata;
pub mod scp;
pub mod scu;
pub mod stow;

use std::net::SocketAddr;

use async_trait::async_trait;

pub use error::DicomError;
pub use part10::{attributes_from_dataset_prefix, part10_header, read_part10_meta, Part10Meta};
pub use scp::{bind, serve, ScpConfig};
pub use scu::{classify_status, echo, OutgoingInstance, ScuConfig, StatusClass, StoreAssociation};
pub use stow::{StowAuth, StowClient, StowFailure, StowOutcome, StowPart};

/// Why a C-STORE was not stored: the DIMSE status to answer with and a comment for the
/// sender and the log (never patient data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// The DIMSE status, e.g. `0xA700` (out of resources).
    pub code: u16,
    /// Why, in words.
    pub comment: String,
}

/// DIMSE status codes the gateway uses.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (disk full, queue refusing intake).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATASET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
}

/// One instance arriving by C-STORE, as its command announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingInstance {
    /// The sender's AE title.
    pub calling_ae: String,
    /// The AE title it called (ours).
    pub called_ae: String,
    /// The sender's address.
    pub peer: SocketAddr,
    /// Affected SOP Class UID.
    pub sop_class_uid: String,
    /// Affected SOP Instance UID.
    pub sop_instance_uid: String,
    /// The negotiated transfer syntax of the data set bytes.
    pub transfer_syntax: String,
}

/// Attributes read from the start of a data set (never the pixel data), for routing,
/// study assembly and display.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceAttributes {
    /// (0008,0016), as found in the data set.
    pub sop_class_uid: Option<String>,
    /// (0008,0018), as found in the data set.
    pub sop_instance_uid: Option<String>,
    /// (0008,0060).
    pub modality: Option<String>,
    /// (0020,000D).
    pub study_instance_uid: Option<String>,
    /// (0020,000E).
    pub series_instance_uid: Option<String>,
}

/// Where a storage SCP puts incoming instances.
#[async_trait]
pub trait InstanceStore: Send + Sync + 'static {
    /// The writer for one instance.
    type Writer: InstanceWriter;

    /// A C-STORE command arrived; refusing answers it with the status given (the data set
    /// that follows is read and dropped).
    async fn begin(&self, instance: &IncomingInstance) -> Result<Self::Writer, StoreStatus>;
}

/// Receives one instance as a Part-10 file: preamble and file meta first (written by the
/// SCP from the command and the negotiated transfer syntax), then the data set bytes as
/// they arrive, unchanged.
#[async_trait]
pub trait InstanceWriter: Send + 'static {
    /// The next bytes of the file.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreStatus>;

    /// Everything arrived: make it durable. Only after this returns `Ok` does the SCP
    /// answer success.
    async fn commit(self, attributes: InstanceAttributes) -> Result<(), StoreStatus>;

    /// The association broke or the instance was refused: discard what was written.
    async fn abort(self);
}
