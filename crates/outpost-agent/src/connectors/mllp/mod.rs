//! HL7 v2 over MLLP: a listening source and a connecting sink. This is where MLLP frames
//! (bytes, `outpost-mllp`) meet HL7 (`outpost-hl7`): frame in, parse, commit, then ACK.

mod sink;
mod source;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use sink::run_sink;
pub use source::{bind_source, run_source};

/// `[[source]] kind = "mllp"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The address and port to listen on, e.g. `"127.0.0.1:2575"`. Required: a listener
    /// never binds every interface unless the config says so.
    pub listen: ListenAddr,
    /// Frames longer than this are refused with `AR` and discarded as they arrive.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// A connection silent for this long is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Connections served at once; more wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// When the sender gets its ACK: `on_commit` (stored durably) or `on_delivery` (the
    /// downstream's own ACK, HL7's application acknowledgement).
    #[serde(default)]
    pub ack: AckMode,
    /// MSH-3 of ACKs for input too broken to take an application name from.
    #[serde(default = "default_sending_application")]
    pub sending_application: String,
}

/// `[[sink]] kind = "mllp"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The downstream `host:port`.
    pub connect: ConnectAddr,
    /// How long to wait for the TCP connection.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// How long to wait for the ACK of each message.
    #[serde(default = "default_ack_timeout_secs")]
    pub ack_timeout_secs: u64,
    /// Attempts before a message the downstream refuses becomes a dead letter. Absent:
    /// retry for ever, which keeps strict order.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// What a negative ACK (`AE`/`AR`) does: `retry` (with backoff, up to `max_attempts`)
    /// or `dead_letter` at once.
    #[serde(default)]
    pub on_negative_ack: NegativeAckPolicy,
    /// The first backoff after a failure, doubling up to `retry_max_secs`.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// The longest backoff.
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
    /// ACK frames longer than this are refused.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
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

/// When an MLLP source acknowledges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the message is committed to the queue.
    #[default]
    OnCommit,
    /// After the downstream acknowledged it; the sender gets the downstream's ACK.
    OnDelivery,
}

/// What a negative ACK from downstream does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeAckPolicy {
    /// Retry with backoff, up to `max_attempts`.
    #[default]
    Retry,
    /// Make it a dead letter at once.
    DeadLetter,
}

/// A listen address: an IP address and a port (no host names: a listener must say exactly
/// which interface it opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(ListenAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected an IP address and port like \"127.0.0.1:2575\" or \"[::1]:2575\", found {text:?}"
            ))
        })
    }
}

/// A `host:port` to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectAddr(pub String);

impl<'de> Deserialize<'de> for ConnectAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let has_port = text.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !has_port {
            return Err(serde::de::Error::custom(format!(
                "expected host:port like \"127.0.0.1:2576\", found {text:?}"
            )));
        }
        Ok(ConnectAddr(text))
    }
}

impl fmt::Display for ConnectAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn default_max_frame_bytes() -> usize {
    outpost_mllp::DEFAULT_MAX_FRAME_BYTES
}
fn default_idle_timeout_secs() -> u64 {
    300
}
fn default_max_connections() -> usize {
    64
}
fn default_sending_application() -> String {
    "OUTPOST".into()
}
fn default_connect_timeout_secs() -> u64 {
    10
}
fn default_ack_timeout_secs() -> u64 {
    30
}
fn default_retry_initial_ms() -> u64 {
    500
}
fn default_retry_max_secs() -> u64 {
    300
}

/// Current time as an HL7 timestamp in UTC with its offset, e.g. `20261123123456+0000`.
fn hl7_timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}+0000",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}
