//! The agent's end of the hub session.
//!
//! [`enroll`] makes the agent's Ed25519 key pair on the box (the private key never leaves
//! it) and registers the public key with a one-time token. [`Uplink::start`] then keeps one
//! outbound TLS WebSocket open, proving possession of the key on every session, reconnecting
//! with backoff and jitter for as long as it takes. Over it, [`UplinkHandle::send_items`]
//! sends queue items and resolves once the hub has stored them; heartbeats carry the
//! inventory and take priority over items so a backlog never starves them; messages the hub
//! sends down arrive on a channel.

#![forbid(unsafe_code)]

mod credentials;
mod session;

use std::time::Duration;

pub use credentials::{
    client_tls, enroll, hostname, Credentials, CREDENTIALS_FILE, HUB_CA_FILE, KEY_FILE,
};
use futures::future::BoxFuture;
use outpost_proto::{AgentToHub, Inventory, UpItem};
pub use session::Uplink;
use tokio::sync::{mpsc, oneshot, watch};

/// What can go wrong on the agent's side of the hub link.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// A credential file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The agent has not enrolled yet.
    #[error("not enrolled with a hub (no {path}): run `outpost agent enroll --hub URL --token TOKEN --config FILE`")]
    NotEnrolled {
        /// The missing file.
        path: String,
    },
    /// Already enrolled.
    #[error("already enrolled as agent {agent_id} (remove {path} to enroll again)")]
    AlreadyEnrolled {
        /// The existing id.
        agent_id: String,
        /// The credentials file.
        path: String,
    },
    /// A credential file is damaged.
    #[error("{path}: {problem}")]
    BadCredentials {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// TLS setup failed (CA file, roots).
    #[error("tls: {0}")]
    Tls(String),
    /// The hub refused the enrollment.
    #[error("hub refused the enrollment: {code}: {message}")]
    EnrollRefused {
        /// The hub's error code.
        code: String,
        /// The hub's explanation.
        message: String,
    },
    /// The hub could not be reached or answered oddly.
    #[error("hub {url}: {problem}")]
    Hub {
        /// The URL.
        url: String,
        /// What happened.
        problem: String,
    },
    /// The session ended before the hub acknowledged.
    #[error("hub session lost before the items were acknowledged")]
    SessionLost,
}

/// Builds the inventory for a heartbeat.
pub type InventorySource = std::sync::Arc<dyn Fn() -> BoxFuture<'static, Inventory> + Send + Sync>;

/// A message the hub wants put on one of the agent's sinks.
#[derive(Debug)]
pub struct DownRequest {
    /// The hub's id for it.
    pub down_id: String,
    /// The agent's sink.
    pub sink: String,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// What the hub sends the agent, besides acknowledgements.
#[derive(Debug)]
pub enum Inbound {
    /// A message for one of the agent's sinks.
    Down(DownRequest),
    /// A signed job, not yet checked.
    Job {
        /// The hub's delivery id, echoed in every update.
        dispatch_id: String,
        /// The job and its signature, as received.
        job: outpost_proto::SignedJob,
    },
    /// Stop a job.
    CancelJob {
        /// The delivery to stop.
        dispatch_id: String,
    },
    /// The hub's audit mirror holds entries up to `after_seq`; send the rest.
    AuditWanted {
        /// The last entry the hub holds.
        after_seq: u64,
        /// The session that asked.
        session: u64,
    },
    /// Run a SQL sink's operation (write-back); answer with [`AgentToHub::SqlResult`].
    SqlCall(outpost_proto::SqlCall),
    /// A session ended (whatever was being sent on it must be sent again).
    SessionEnded {
        /// The session number from [`LinkState::Up`].
        session: u64,
    },
}

/// Whether the session is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected; the last reason.
    Down(String),
    /// Authenticated; the number increases with each new session.
    Up(u64),
}

/// The agent's handle on the uplink; cheap to clone.
#[derive(Clone)]
pub struct UplinkHandle {
    pub(crate) data: mpsc::Sender<DataRequest>,
    pub(crate) control: mpsc::Sender<AgentToHub>,
    pub(crate) state: watch::Receiver<LinkState>,
    pub(crate) blob_have: tokio::sync::broadcast::Sender<(i64, u64)>,
    pub(crate) audit: mpsc::Sender<(u64, Vec<String>)>,
}

pub(crate) struct DataRequest {
    pub items: Vec<UpItem>,
    pub session: u64,
    pub stored: oneshot::Sender<Result<(), UplinkError>>,
}

impl UplinkHandle {
    /// Waits until a session is up and returns its number.
    pub async fn wait_connected(&self) -> u64 {
        let mut state = self.state.clone();
        loop {
            if let LinkState::Up(session) = *state.borrow_and_update() {
                return session;
            }
            if state.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The current link state.
    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// Sends a batch on session `session`; the returned receiver resolves once the hub has
    /// stored every item (or with an error if that session ends first). Batches are sent
    /// in the order given, so a caller may keep several in flight.
    pub async fn send_items(
        &self,
        session: u64,
        items: Vec<UpItem>,
    ) -> oneshot::Receiver<Result<(), UplinkError>> {
        let (stored, receiver) = oneshot::channel();
        if let Err(mpsc::error::SendError(request)) = self
            .data
            .send(DataRequest {
                items,
                session,
                stored,
            })
            .await
        {
            let _ = request.stored.send(Err(UplinkError::SessionLost));
        }
        receiver
    }

    /// Sends a message to the hub, waiting while the link is busy; fails only when the
    /// uplink has stopped. A message queued while no session is up is sent on the next one.
    pub async fn send(&self, message: AgentToHub) -> Result<(), UplinkError> {
        self.control
            .send(message)
            .await
            .map_err(|_| UplinkError::SessionLost)
    }

    /// Sends audit log lines on session `session` only: lines queued for a session that has
    /// ended are dropped, since the hub's next session asks again from where its copy ends
    /// (sent late, they would look like a gap).
    pub async fn send_audit(&self, session: u64, lines: Vec<String>) -> Result<(), UplinkError> {
        self.audit
            .send((session, lines))
            .await
            .map_err(|_| UplinkError::SessionLost)
    }

    /// The hub's answers about uploads of items' files: (item id, bytes held).
    pub fn blob_answers(&self) -> tokio::sync::broadcast::Receiver<(i64, u64)> {
        self.blob_have.subscribe()
    }

    /// Reports what became of a message the hub sent down (queued, delivered, dead).
    /// Never waits: while the hub is unreachable reports may be dropped, and the hub asks
    /// again for every unfinished message when the next session starts.
    pub async fn report_down(
        &self,
        down_id: &str,
        state: &str,
        item_id: Option<i64>,
        error: Option<String>,
    ) {
        let message = AgentToHub::DownState {
            down_id: down_id.to_owned(),
            state: state.to_owned(),
            item_id,
            error,
        };
        if self.control.try_send(message).is_err() {
            tracing::debug!(down_id, "hub link busy or down; the hub will ask again");
        }
    }
}

/// How long to wait for the hub to acknowledge a batch before giving up on the session.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(60);
