//! Agent errors: config problems name the file and key; runtime problems name the connector.

use std::path::PathBuf;

/// A config file that cannot be used. The message names the file, the key and what was
/// expected, so the practice's IT can fix it without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a key of the wrong shape.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Names the key and what was expected.
        message: String,
    },
}

/// A failure while running the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] outpost_queue::QueueError),
    /// The hub link could not be set up (not enrolled, enrollment refused, bad CA file).
    #[error(transparent)]
    Uplink(#[from] outpost_uplink::UplinkError),
    /// The audit log could not be opened or written.
    #[error(transparent)]
    Audit(#[from] outpost_audit::AuditError),
    /// The approvals file could not be opened.
    #[error(transparent)]
    Approvals(#[from] crate::jobs::approvals::ApprovalError),
    /// A connector could not start.
    #[error("{kind} \"{name}\": {message}")]
    Connector {
        /// `source` or `sink`.
        kind: &'static str,
        /// The connector.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// A failure inside one running connector; the supervisor logs it and restarts the connector.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Binding the listen address failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("accept on {addr}: {source}")]
    Accept {
        /// The address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] outpost_queue::QueueError),
    /// Something the connector needs is not there.
    #[error("{0}")]
    Unavailable(String),
}
