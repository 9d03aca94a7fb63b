//! Every connector kind the agent can run. A connector is a config type plus the task it
//! becomes. Adding a kind means one folder here and one variant in [`SourceKind`] or
//! [`SinkKind`]; the compiler then points at each `match` that needs an arm.

pub mod dicom;
pub mod hub;
pub mod jsonl;
pub mod mllp;
pub mod sql;
pub mod sqlsink;

use std::net::SocketAddr;
use std::sync::Arc;

use outpost_core::ConnectorName;
use outpost_queue::Queue;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::health::Health;
use crate::watch::DeliveryWatch;

/// Every source kind.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// HL7 v2 over MLLP, listening.
    Mllp(mllp::SourceConfig),
    /// DICOM storage SCP, listening.
    Dicom(dicom::SourceConfig),
    /// Change events out of a database (boxed: the largest config by far).
    Sql(Box<sql::SourceConfig>),
}

/// Every sink kind.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// HL7 v2 over MLLP, connecting out.
    Mllp(mllp::SinkConfig),
    /// The vendor's hub, over the agent's uplink session.
    Hub(hub::SinkConfig),
    /// A PACS, by DICOM C-STORE.
    Dicom(dicom::SinkConfig),
    /// A DICOMweb server, by STOW-RS.
    Stow(dicom::StowSinkConfig),
    /// A file of JSON lines.
    Jsonl(jsonl::SinkConfig),
    /// Write-back into a database, called by the hub by operation name (boxed: large).
    Sql(Box<sqlsink::SinkConfig>),
}

impl SourceKind {
    /// The kind's name as written in the config.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Mllp(_) => "mllp",
            Self::Dicom(_) => "dicom",
            Self::Sql(_) => "sql",
        }
    }

    /// The local address this source listens on, if it listens.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Mllp(config) => Some(config.listen.0),
            Self::Dicom(config) => Some(config.listen.0),
            Self::Sql(_) => None,
        }
    }

    /// Whether the source answers its sender only after delivery downstream.
    pub fn acks_on_delivery(&self) -> bool {
        match self {
            Self::Mllp(config) => config.ack == mllp::AckMode::OnDelivery,
            Self::Dicom(_) | Self::Sql(_) => false,
        }
    }
}

impl SinkKind {
    /// The kind's name as written in the config.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Mllp(_) => "mllp",
            Self::Hub(_) => "hub",
            Self::Dicom(_) => "dicom",
            Self::Stow(_) => "stow",
            Self::Jsonl(_) => "jsonl",
            Self::Sql(_) => "sql",
        }
    }

    /// Whether the sink's peer answers with an acknowledgement a source can pass back.
    pub fn returns_acks(&self) -> bool {
        match self {
            Self::Mllp(_) => true,
            Self::Hub(_) | Self::Dicom(_) | Self::Stow(_) | Self::Jsonl(_) | Self::Sql(_) => false,
        }
    }
}

/// What a running source needs.
#[derive(Clone)]
pub struct SourceContext {
    /// The source's name.
    pub name: ConnectorName,
    /// Where items go; `append` returns only after the commit.
    pub queue: Queue,
    /// Routes: which sinks an item goes to.
    pub config: Arc<AgentConfig>,
    /// Outcomes of deliveries, for sources that acknowledge on delivery.
    pub deliveries: DeliveryWatch,
    /// Connector state for health reports.
    pub health: Health,
    /// Cancelled when the agent stops or the connector is restarted.
    pub shutdown: CancellationToken,
}

/// What a running sink needs.
#[derive(Clone)]
pub struct SinkContext {
    /// The sink's name.
    pub name: ConnectorName,
    /// Where items come from; the sink records each outcome in it.
    pub queue: Queue,
    /// Sources that acknowledge on delivery: only their outcomes are reported.
    pub ack_on_delivery_sources: Vec<ConnectorName>,
    /// Outcomes of deliveries, for sources that acknowledge on delivery.
    pub deliveries: DeliveryWatch,
    /// Connector state for health reports.
    pub health: Health,
    /// Cancelled when the agent stops or the connector is restarted.
    pub shutdown: CancellationToken,
    /// The hub session, when the agent has one: hub sinks send through it, and every sink
    /// reports the fate of messages that came down from the hub.
    pub uplink: Option<outpost_uplink::UplinkHandle>,
    /// The agent's data directory (blobs live under it).
    pub data_dir: std::path::PathBuf,
}
