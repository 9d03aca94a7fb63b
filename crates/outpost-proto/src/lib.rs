//! The agent <-> hub wire protocol: JSON messages over one WebSocket, plus the enrollment
//! request. Versioned by [`PROTOCOL_VERSION`]; fields are added with defaults, never renamed
//! or removed within a version.
//!
//! A session: the hub sends [`HubToAgent::Challenge`]; the agent answers
//! [`AgentToHub::Hello`] with an Ed25519 signature over [`session_proof`]; the hub checks it
//! against the key registered at enrollment and answers [`HubToAgent::Welcome`] or
//! [`HubToAgent::Refused`]. Then items flow up in batches, each acknowledged by id once
//! stored, and heartbeats carry the agent's inventory.

#![forbid(unsafe_code)]

mod job;

pub use job::{
    claimed_job_id, sign_job, verify_job, JobSignatureError, JobSpec, JobState, SignedJob,
    JOB_SIGNING_CONTEXT, MAX_JOB_BYTES,
};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest WebSocket message either side accepts.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Hub to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubToAgent {
    /// First message of a session: prove possession of your key by signing this nonce.
    Challenge {
        /// 32 random bytes, hex.
        nonce: String,
        /// The hub's protocol version.
        protocol: u32,
    },
    /// The session is authenticated.
    Welcome {
        /// How often to send a heartbeat.
        heartbeat_secs: u64,
        /// The hub's clock (unix ms), for the agent's clock-skew report.
        hub_time_ms: i64,
    },
    /// The session is refused; the connection closes after this.
    Refused {
        /// Why, for the agent's log.
        reason: String,
    },
    /// These items are stored at the hub (new or already there); the agent may mark them
    /// delivered.
    Stored {
        /// Item ids from [`AgentToHub::Items`].
        ids: Vec<i64>,
    },
    /// Put this message on the named sink of the agent (the way down).
    Deliver {
        /// The hub's id for it, which the agent uses to deduplicate and report back.
        down_id: String,
        /// The agent's sink.
        sink: String,
        /// The message bytes.
        payload: Payload,
    },
    /// Run this signed job (the agent checks it and its policy first).
    Job {
        /// The hub's id for this delivery, echoed in every update; a job the hub stores
        /// under another id than its signed `job_id` is still reported under this one.
        dispatch_id: String,
        /// The [`JobSpec`] JSON, exactly as signed.
        job: String,
        /// Ed25519 signature over [`JOB_SIGNING_CONTEXT`] + `job`, hex.
        signature: String,
    },
    /// Stop a job that is running or waiting for approval.
    CancelJob {
        /// The delivery to cancel.
        dispatch_id: String,
    },
    /// Send your audit log entries after this sequence number (0: from the start).
    AuditWanted {
        /// The last entry the hub's mirror holds.
        after_seq: u64,
    },
    /// How much of an item's file the hub holds (the answer to every
    /// [`AgentToHub::BlobOffer`] and [`AgentToHub::BlobPart`]); the agent goes on from
    /// there, so an upload broken by a lost session resumes where it stopped.
    BlobHave {
        /// The agent's item id.
        item_id: i64,
        /// Bytes held.
        offset: u64,
    },
    /// Run one of a SQL sink's configured operations (write-back). Carries an operation
    /// name and values only, never SQL text; the agent answers [`AgentToHub::SqlResult`].
    SqlCall(SqlCall),
}

/// Agent to hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentToHub {
    /// Answer to the challenge.
    Hello {
        /// The id assigned at enrollment.
        agent_id: String,
        /// The agent's protocol version.
        protocol: u32,
        /// The agent's software version.
        version: String,
        /// Ed25519 signature over [`session_proof`], hex.
        signature: String,
    },
    /// Health and inventory, every heartbeat period.
    Heartbeat {
        /// What the agent is and how it is doing.
        inventory: Box<Inventory>,
    },
    /// Queue items for the hub, in queue order.
    Items {
        /// The batch.
        items: Vec<UpItem>,
    },
    /// What became of a [`HubToAgent::Deliver`].
    DownState {
        /// The hub's id.
        down_id: String,
        /// `queued` (in the agent's queue), `delivered`, `dead` or `refused`.
        state: String,
        /// The agent's queue item id, once queued.
        #[serde(default)]
        item_id: Option<i64>,
        /// Why it failed, if it did.
        #[serde(default)]
        error: Option<String>,
    },
    /// A job changed state.
    JobUpdate(JobUpdate),
    /// Part of a job's result, in order.
    JobOutput {
        /// From [`HubToAgent::Job`].
        dispatch_id: String,
        /// 1, 2, 3… per job.
        seq: u64,
        /// The text (JSON lines for structured results).
        data: String,
    },
    /// Audit log lines, exactly as written, in order.
    AuditLines {
        /// The lines, without newlines.
        lines: Vec<String>,
    },
    /// An item's file (a DICOM instance) is about to be uploaded: how much does the hub hold?
    BlobOffer {
        /// The agent's item id.
        item_id: i64,
        /// The file's length.
        total: u64,
    },
    /// Part of an item's file, at `offset`. The item itself follows in
    /// [`AgentToHub::Items`] once the hub holds the whole file.
    BlobPart {
        /// The agent's item id.
        item_id: i64,
        /// Where the part starts.
        offset: u64,
        /// The bytes (at most [`MAX_BLOB_PART`]).
        data: Payload,
    },
    /// What became of a [`HubToAgent::SqlCall`].
    SqlResult {
        /// From the call.
        call_id: String,
        /// The outcome.
        outcome: SqlOutcome,
    },
}

/// A write-back call: a SQL sink's operation, by name, with values that the agent binds
/// as parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqlCall {
    /// The hub's id for this call, echoed in [`AgentToHub::SqlResult`].
    pub call_id: String,
    /// The agent's `kind = "sql"` sink.
    pub sink: String,
    /// One of the sink's configured operations.
    pub operation: String,
    /// Placeholder name → value (number, string, boolean or null).
    pub values: serde_json::Map<String, serde_json::Value>,
    /// The caller's key: a call repeated with the same key writes once.
    pub idempotency_key: String,
}

/// What became of a write-back call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SqlOutcome {
    /// The statement ran and committed.
    Done {
        /// Rows inserted, updated or deleted.
        rows_affected: u64,
        /// Rows the statement returned (`RETURNING`), column → value.
        returned: Vec<serde_json::Map<String, serde_json::Value>>,
        /// The stored result of an earlier call with the same key; nothing was written now.
        #[serde(default)]
        replayed: bool,
    },
    /// The database refused the statement (constraint, type…); nothing was written.
    DatabaseError {
        /// SQLSTATE (PostgreSQL) or the result code's name (SQLite).
        code: String,
        /// The database's message.
        message: String,
        /// The stored result of an earlier call with the same key.
        #[serde(default)]
        replayed: bool,
    },
    /// The agent has no SQL sink of that name.
    UnknownSink {
        /// Why, naming the sinks it has.
        message: String,
    },
    /// The sink has no operation of that name.
    UnknownOperation {
        /// Why, naming the operations it has.
        message: String,
        /// The operations the sink's config defines.
        known: Vec<String>,
    },
    /// The values do not fit the statement; nothing ran.
    InvalidValues {
        /// What is missing, unknown or of the wrong type.
        message: String,
    },
    /// The idempotency key was used before with another operation or other values.
    KeyReused {
        /// Why.
        message: String,
    },
    /// An earlier attempt with this key may have written; it is not run again.
    OutcomeUnknown {
        /// What is known.
        message: String,
    },
    /// The database could not be reached; nothing was written; retry with the same key.
    Unavailable {
        /// Why.
        message: String,
    },
}

/// The largest part of an item's file sent in one [`AgentToHub::BlobPart`].
pub const MAX_BLOB_PART: usize = 1024 * 1024;

/// A job's new state, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobUpdate {
    /// From [`HubToAgent::Job`].
    pub dispatch_id: String,
    /// The job id as signed, when the job could be read.
    #[serde(default)]
    pub job_id: Option<String>,
    /// The new state.
    pub state: JobState,
    /// The policy rule or check that decided it (`signature`, `expiry`, `replay`,
    /// `agent-id`, `allow.health`, `default-deny`…).
    #[serde(default)]
    pub rule: Option<String>,
    /// Why, for people.
    #[serde(default)]
    pub reason: Option<String>,
    /// A short, PHI-free summary of the result.
    #[serde(default)]
    pub summary: Option<String>,
    /// SHA-256 of the whole output, hex.
    #[serde(default)]
    pub digest: Option<String>,
    /// Whether the output was cut at the size limit.
    #[serde(default)]
    pub truncated: bool,
    /// Who approved or denied it locally.
    #[serde(default)]
    pub approver: Option<String>,
}

/// One queue item travelling up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpItem {
    /// The agent's item id: unique and growing per agent, the hub's deduplication key.
    pub id: i64,
    /// The source connector that received it.
    pub source: String,
    /// `hl7`, later `dicom`, `change`, `file`.
    pub kind: String,
    /// HL7: MSH-9.
    #[serde(default)]
    pub msg_type: Option<String>,
    /// HL7: MSH-10.
    #[serde(default)]
    pub control_id: Option<String>,
    /// When the agent received it (unix ms).
    pub received_at_ms: i64,
    /// The bytes.
    pub payload: Payload,
}

/// Bytes carried as base64 in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(pub Vec<u8>);

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Payload)
            .map_err(|_| serde::de::Error::custom("payload is not valid base64"))
    }
}

/// The agent's report of itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Host name.
    pub hostname: String,
    /// Operating system and architecture.
    pub os: String,
    /// Outpost version.
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// The agent's clock (unix ms) when it sent this.
    pub agent_time_ms: i64,
    /// Every source and sink.
    pub connectors: Vec<ConnectorReport>,
    /// Queue depth per sink.
    pub queues: Vec<QueueReport>,
    /// Items refused at intake and kept.
    pub rejected: u64,
    /// Free bytes on the data disk.
    #[serde(default)]
    pub disk_free_bytes: Option<u64>,
    /// Bytes the queue occupies.
    pub queue_bytes: u64,
}

/// One connector in an inventory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorReport {
    /// Its name.
    pub name: String,
    /// `source` or `sink`.
    pub role: String,
    /// Its kind, e.g. `mllp`.
    pub kind: String,
    /// `starting`, `running`, `backing off`, `stopped`.
    pub state: String,
    /// The last error seen.
    #[serde(default)]
    pub last_error: Option<String>,
    /// A one-line state of its own, e.g. a SQL source's lag and snapshot progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Items handled since start.
    pub items: u64,
    /// Failures since start.
    pub failures: u64,
}

/// One sink's queue in an inventory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueReport {
    /// The sink.
    pub sink: String,
    /// Waiting.
    pub pending: u64,
    /// Waiting after a failure.
    pub retrying: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest waiting item (ms).
    #[serde(default)]
    pub oldest_pending_ms: Option<i64>,
}

/// `POST /api/v1/enroll`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The one-time token.
    pub token: String,
    /// The agent's Ed25519 public key, hex.
    pub public_key: String,
    /// Host name, for the fleet list.
    pub hostname: String,
    /// Outpost version.
    pub version: String,
}

/// The hub's answer to a successful enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The agent's id from now on.
    pub agent_id: String,
    /// The site name given when the token was made.
    pub name: String,
    /// The hub's job key (Ed25519 public key, hex): the agent pins it and accepts jobs
    /// signed by it only.
    #[serde(default)]
    pub job_key: String,
}

/// An error body: what every failing hub endpoint returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `token_reused`.
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

/// The bytes an agent signs to open a session. Binding the agent id stops a signature
/// being replayed for another agent; the nonce is fresh per session.
pub fn session_proof(nonce_hex: &str, agent_id: &str) -> Vec<u8> {
    let mut proof = b"outpost session v1\0".to_vec();
    proof.extend_from_slice(nonce_hex.as_bytes());
    proof.push(0);
    proof.extend_from_slice(agent_id.as_bytes());
    proof
}

/// A wire message that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid protocol message: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

/// Reads a message (JSON text).
pub fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, DecodeError> {
    Ok(serde_json::from_str(text)?)
}

/// Writes a message (JSON text).
pub fn encode<T: Serialize>(message: &T) -> String {
    // Serialising these plain data types to a String cannot fail (no maps with non-string
    // keys, no failing Serialize impls).
    serde_json::to_string(message)
        .unwrap_or_else(|_| unreachable!("protocol types always serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_with_binary_payloads() {
        let message = AgentToHub::Items {
            items: vec![UpItem {
                id: 7,
                source: "lab-in".into(),
                kind: "hl7".into(),
                msg_type: Some("ORU^R01".into()),
                control_id: Some("MSG1".into()),
                received_at_ms: 1,
                payload: Payload(vec![0, 0x0b, 0xe9, b'|']),
            }],
        };
        let text = encode(&message);
        assert!(text.contains("\"type\":\"items\""), "{text}");
        assert_eq!(decode::<AgentToHub>(&text).unwrap(), message);
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        assert!(decode::<HubToAgent>("{\"type\":\"format_disk\"}").is_err());
        assert!(decode::<HubToAgent>("not json").is_err());
        let bad_payload =
            "{\"type\":\"deliver\",\"down_id\":\"d1\",\"sink\":\"s\",\"payload\":\"***\"}";
        assert!(decode::<HubToAgent>(bad_payload)
            .unwrap_err()
            .to_string()
            .contains("base64"));
    }

    #[test]
    fn sql_calls_and_results_round_trip() {
        let mut values = serde_json::Map::new();
        values.insert("note".into(), "O'Brien; --".into());
        values.insert("patnum".into(), 7.into());
        let call = HubToAgent::SqlCall(SqlCall {
            call_id: "sql_1".into(),
            sink: "pms-write".into(),
            operation: "create_appointment".into(),
            values,
            idempotency_key: "k1".into(),
        });
        let text = encode(&call);
        assert!(text.contains("\"type\":\"sql_call\""), "{text}");
        assert_eq!(decode::<HubToAgent>(&text).unwrap(), call);
        let result = AgentToHub::SqlResult {
            call_id: "sql_1".into(),
            outcome: SqlOutcome::DatabaseError {
                code: "23505".into(),
                message: "duplicate key".into(),
                replayed: false,
            },
        };
        let text = encode(&result);
        assert!(text.contains("\"status\":\"database_error\""), "{text}");
        assert_eq!(decode::<AgentToHub>(&text).unwrap(), result);
    }

    #[test]
    fn the_session_proof_binds_nonce_and_agent() {
        assert_ne!(
            session_proof("aa", "agent-1"),
            session_proof("aa", "agent-2")
        );
        assert_ne!(
            session_proof("aa", "agent-1"),
            session_proof("ab", "agent-1")
        );
    }
}
