//! One audit entry: its fields, its line encoding, its signature and its hash.
//!
//! A line is the entry's JSON with its fields in declaration order and `sig` last. The
//! signed bytes are exactly the line with its final `,"sig":"…"` member removed, i.e. the
//! same JSON without `sig`. Verification works on those raw bytes rather than on a
//! re-serialisation, so every byte of a line is covered by the signature (or is the
//! signature), and a newer agent may add fields an older verifier does not know.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest line (without its newline) the log writes or reads: 1 MiB.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// The `prev` of the first entry: 64 zeros, as no entry comes before it.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Event names the agent and hub write. `event` is a free string, so this list is a
/// convenience, not a closed set: a new event needs no format change.
pub mod events {
    /// The first entry of every log; it records the agent's public key.
    pub const LOG_OPENED: &str = "log.opened";
    /// Written on open after an unfinished last line was cut off.
    pub const AUDIT_REPAIRED: &str = "audit.repaired";
    /// A job arrived from the hub.
    pub const JOB_REQUESTED: &str = "job.requested";
    /// The agent decided on a job (see `decision` and `rule`).
    pub const JOB_DECIDED: &str = "job.decided";
    /// A waiting job was approved locally (see `approver`).
    pub const JOB_APPROVED: &str = "job.approved";
    /// A waiting job was denied locally (see `approver`).
    pub const JOB_DENIED: &str = "job.denied";
    /// A job is about to start; written before it does.
    pub const JOB_STARTED: &str = "job.started";
    /// A job ended (see `result_summary` and `result_digest`).
    pub const JOB_FINISHED: &str = "job.finished";
    /// The policy file changed (its digest in `detail`).
    pub const POLICY_CHANGED: &str = "policy.changed";
    /// The agent configuration changed.
    pub const CONFIG_CHANGED: &str = "config.changed";
    /// A staff member looked at PHI (on the hub).
    pub const PHI_VIEWED: &str = "phi.viewed";
}

/// The agent's decision on a job, as recorded in a `job.decided` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The policy allows the job now.
    Allowed,
    /// The policy refuses the job (`rule` says which rule).
    Refused,
    /// The job waits for a local approval.
    AwaitingApproval,
}

/// One entry of the audit log. Field order here is the order on the line.
///
/// Callers build one with [`AuditEntry::new`] and struct update syntax;
/// [`AuditLog::append`](crate::AuditLog::append) fills `seq`, `time_ms`, `agent_id`,
/// `public_key`, `prev` and `sig` itself.
///
/// ```
/// use outpost_audit::{AuditEntry, Decision, events};
/// let entry = AuditEntry {
///     staff: Some("alice@vendor".into()),
///     job_id: Some("job-42".into()),
///     capability: Some("health".into()),
///     decision: Some(Decision::Allowed),
///     rule: Some("allow.health".into()),
///     ..AuditEntry::new(events::JOB_DECIDED)
/// };
/// assert_eq!(entry.event, "job.decided");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log: 1, 2, 3… with no gaps.
    pub seq: u64,
    /// Wall-clock time of writing, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The agent whose log this is; the same on every line.
    pub agent_id: String,
    /// What happened, e.g. `job.requested` (see [`events`]).
    pub event: String,
    /// The agent's Ed25519 public key, lowercase hex; only on the first entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The staff member who asked, approved or looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff: Option<String>,
    /// The job this entry is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The job's capability, e.g. `files.read`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// Digest of the job's arguments (never the arguments: they may hold PHI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_digest: Option<String>,
    /// The agent's decision on the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// The policy rule behind the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Who approved or denied a waiting job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// A short, PHI-free summary of the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_summary: Option<String>,
    /// Digest of the full result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_digest: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Lowercase hex SHA-256 of the previous line's bytes (without its newline), or
    /// [`GENESIS_PREV`] on the first entry.
    pub prev: String,
    /// Lowercase hex Ed25519 signature over the line without this member. Always last.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sig: String,
}

impl AuditEntry {
    /// An entry for `event` with every optional field empty.
    pub fn new(event: impl Into<String>) -> Self {
        AuditEntry {
            event: event.into(),
            ..AuditEntry::default()
        }
    }
}

/// The tail every line ends with: `,"sig":"` + 128 hex digits + `"}`.
const SIG_PREFIX: &[u8] = b",\"sig\":\"";
const SIG_HEX_LEN: usize = 128;
const SIG_TAIL_LEN: usize = SIG_PREFIX.len() + SIG_HEX_LEN + 2;

/// Encodes `entry` as a signed line (no newline). `entry.sig` is ignored and replaced.
pub(crate) fn encode_line(
    entry: &AuditEntry,
    key: &SigningKey,
) -> Result<String, serde_json::Error> {
    let unsigned = AuditEntry {
        sig: String::new(),
        ..entry.clone()
    };
    let body = serde_json::to_string(&unsigned)?;
    let signature = key.sign(body.as_bytes());
    let mut line = String::with_capacity(body.len() + SIG_TAIL_LEN);
    // `body` ends with the object's closing brace; the signature goes in just before it.
    line.push_str(&body[..body.len() - 1]);
    line.push_str(",\"sig\":\"");
    line.push_str(&hex::encode(signature.to_bytes()));
    line.push_str("\"}");
    Ok(line)
}

/// Lowercase hex SHA-256 of a line's bytes (without its newline): the next entry's `prev`.
pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// A line that parsed as an entry and has a well-formed signature member.
#[derive(Debug)]
pub(crate) struct ParsedLine {
    pub entry: AuditEntry,
    pub signature: Signature,
    /// The bytes the signature covers: the line without its `sig` member.
    pub signed: Vec<u8>,
    /// [`line_hash`] of the line.
    pub hash: String,
}

/// Why a line is not a well-formed entry (before any chain or signature check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineFault {
    NotJson,
    Truncated,
    BadEntry,
    NoSignature,
}

/// Parses one line (without its newline) into an entry and the bytes its signature covers.
pub(crate) fn parse_line(line: &[u8]) -> Result<ParsedLine, (LineFault, String)> {
    let entry: AuditEntry = serde_json::from_slice(line).map_err(|e| {
        let fault = match e.classify() {
            serde_json::error::Category::Eof => LineFault::Truncated,
            serde_json::error::Category::Data => LineFault::BadEntry,
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                LineFault::NotJson
            }
        };
        (fault, e.to_string())
    })?;
    let Some(split) = line.len().checked_sub(SIG_TAIL_LEN) else {
        return Err(no_signature());
    };
    let (head, tail) = line.split_at(split);
    let hex_part = &tail[SIG_PREFIX.len()..SIG_PREFIX.len() + SIG_HEX_LEN];
    if !tail.starts_with(SIG_PREFIX) || !tail.ends_with(b"\"}") || hex_part != entry.sig.as_bytes()
    {
        return Err(no_signature());
    }
    let bytes = decode_lower_hex::<64>(hex_part).ok_or_else(no_signature)?;
    let mut signed = Vec::with_capacity(head.len() + 1);
    signed.extend_from_slice(head);
    signed.push(b'}');
    Ok(ParsedLine {
        entry,
        signature: Signature::from_bytes(&bytes),
        signed,
        hash: line_hash(line),
    })
}

fn no_signature() -> (LineFault, String) {
    (
        LineFault::NoSignature,
        "the line does not end with a `sig` member of 128 lowercase hex digits".to_owned(),
    )
}

impl ParsedLine {
    /// Whether the signature verifies with `key` (strict: no malleable signatures).
    pub fn is_signed_by(&self, key: &VerifyingKey) -> bool {
        key.verify_strict(&self.signed, &self.signature).is_ok()
    }
}

/// Parses a lowercase-hex Ed25519 public key, as recorded in the first entry.
pub fn parse_public_key(text: &str) -> Option<VerifyingKey> {
    let bytes = decode_lower_hex::<32>(text.as_bytes())?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Decodes exactly `N` bytes of lowercase hex. Uppercase is refused: `A` and `a` differ by
/// one bit, and a signature that still verified after that flip would let an edit of the
/// last line's `sig` go unnoticed.
fn decode_lower_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn sample() -> AuditEntry {
        AuditEntry {
            seq: 3,
            time_ms: 1_700_000_000_000,
            agent_id: "agent-1".into(),
            staff: Some("alice".into()),
            decision: Some(Decision::AwaitingApproval),
            prev: GENESIS_PREV.into(),
            ..AuditEntry::new(events::JOB_DECIDED)
        }
    }

    #[test]
    fn encoded_line_parses_back_to_the_same_entry_and_verifies() {
        let line = encode_line(&sample(), &key()).unwrap();
        let parsed = parse_line(line.as_bytes()).unwrap();
        assert_eq!(
            parsed.entry,
            AuditEntry {
                sig: parsed.entry.sig.clone(),
                ..sample()
            }
        );
        assert!(parsed.is_signed_by(&key().verifying_key()));
        assert!(line.ends_with(&format!(",\"sig\":\"{}\"}}", parsed.entry.sig)));
        assert!(line.contains("\"decision\":\"awaiting_approval\""));
    }

    #[test]
    fn signed_bytes_are_the_json_without_sig() {
        let line = encode_line(&sample(), &key()).unwrap();
        let parsed = parse_line(line.as_bytes()).unwrap();
        let unsigned = serde_json::to_string(&sample()).unwrap();
        assert_eq!(parsed.signed, unsigned.as_bytes());
    }

    #[test]
    fn uppercase_signature_hex_is_refused() {
        let line = encode_line(&sample(), &key()).unwrap();
        let at = line.len() - 3;
        let mut upper = line.clone().into_bytes();
        // Force a letter at the end of the hex and uppercase it.
        upper[at] = b'A';
        let (fault, _) = parse_line(&upper).unwrap_err();
        assert_eq!(fault, LineFault::NoSignature);
    }

    #[test]
    fn a_cut_line_is_classified_as_truncated() {
        let line = encode_line(&sample(), &key()).unwrap();
        let (fault, _) = parse_line(&line.as_bytes()[..40]).unwrap_err();
        assert_eq!(fault, LineFault::Truncated);
    }
}
