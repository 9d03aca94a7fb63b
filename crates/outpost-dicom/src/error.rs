//! The crate's error type. Messages name the peer, AE title and UID involved and what went
//! wrong; they never carry patient data (no data set attribute values besides UIDs).

use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong in DICOM networking, Part-10 framing or STOW-RS.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    /// A configuration value is unusable.
    #[error("dicom config: {reason}")]
    Config {
        /// What is wrong with which field.
        reason: String,
    },

    /// The SCP could not bind its listening socket.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },

    /// A DIMSE command set could not be encoded or decoded.
    #[error("command set: {reason}")]
    Command {
        /// Which field or step failed.
        reason: String,
    },

    /// A Part-10 file meta group could not be built or read.
    #[error("part-10 file meta: {reason}")]
    Part10 {
        /// Which step failed, naming the SOP instance when known.
        reason: String,
    },

    /// Connecting to a peer or negotiating the association failed.
    #[error("association with {called_ae} at {address} as {calling_ae}: {reason}")]
    Connect {
        /// host:port of the peer.
        address: String,
        /// The AE title called.
        called_ae: String,
        /// Our AE title.
        calling_ae: String,
        /// Why, including the full cause chain.
        reason: String,
    },

    /// The peer rejected the association (A-ASSOCIATE-RJ).
    #[error("{called_ae} at {address} rejected the association from {calling_ae}: {reason}")]
    Rejected {
        /// host:port of the peer.
        address: String,
        /// The AE title called.
        called_ae: String,
        /// Our AE title.
        calling_ae: String,
        /// Result, source and reason as the peer gave them.
        reason: String,
    },

    /// The peer did not accept a presentation context needed for an instance.
    #[error(
        "{called_ae} at {address} did not accept sop class {sop_class_uid} in transfer syntax {transfer_syntax}"
    )]
    NotAccepted {
        /// host:port of the peer.
        address: String,
        /// The AE title called.
        called_ae: String,
        /// The abstract syntax (or several, comma-separated, when none was accepted).
        sop_class_uid: String,
        /// The transfer syntax (or several, comma-separated).
        transfer_syntax: String,
    },

    /// An established association failed while sending or receiving.
    #[error("association with {called_ae} at {address}: {reason}")]
    Association {
        /// host:port of the peer.
        address: String,
        /// The peer's AE title.
        called_ae: String,
        /// What failed, naming the SOP instance when one was in flight.
        reason: String,
    },

    /// The peer did not answer in time.
    #[error("association with {called_ae} at {address}: no answer to {what} within {after:?}")]
    Timeout {
        /// host:port of the peer.
        address: String,
        /// The peer's AE title.
        called_ae: String,
        /// What was waited for, naming the SOP instance when one was in flight.
        what: String,
        /// The configured timeout.
        after: Duration,
    },

    /// The data set given for an outgoing instance could not be read in full.
    #[error("data set of sop instance {sop_instance_uid}: {reason}")]
    Dataset {
        /// The instance being sent.
        sop_instance_uid: String,
        /// Why (short read, IO error).
        reason: String,
    },

    /// An HTTP request for STOW-RS failed before a response arrived.
    #[error("stow-rs to {url}: {reason}")]
    Http {
        /// The endpoint (never with credentials).
        url: String,
        /// Why, including the cause chain.
        reason: String,
        /// Whether trying again later may succeed (connection errors, timeouts).
        is_transient: bool,
    },
}

impl DicomError {
    /// Whether trying the same operation later may succeed: connection failures, timeouts,
    /// broken associations and transient rejections, as opposed to configuration errors,
    /// refused contexts and unreadable input.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Association { .. } | Self::Timeout { .. } => true,
            // A-ASSOCIATE-RJ result 2 is "rejected-transient".
            Self::Rejected { reason, .. } => reason.contains("transient"),
            Self::Http { is_transient, .. } => *is_transient,
            Self::Config { .. }
            | Self::Bind { .. }
            | Self::Command { .. }
            | Self::Part10 { .. }
            | Self::NotAccepted { .. }
            | Self::Dataset { .. } => false,
        }
    }
}

/// Renders an error and its whole `source()` chain as one line (`a: b: c`), because
/// dicom-rs errors put the useful detail in their sources.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}
