//! Signed jobs: what the hub asks an agent to do on behalf of a named staff member.
//!
//! The hub serialises a [`JobSpec`] to JSON once and signs those exact bytes (prefixed by
//! [`JOB_SIGNING_CONTEXT`]) with its job key; the agent verifies the signature over the
//! bytes it received before it parses anything else, so no re-serialisation can change
//! what was signed. The agent learns the job key's public half at enrollment and pins it.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain separation: a job signature can never be mistaken for any other signature.
pub const JOB_SIGNING_CONTEXT: &[u8] = b"outpost job v1\0";

/// The largest signed job text an agent reads (arguments included): 1 MiB.
pub const MAX_JOB_BYTES: usize = 1024 * 1024;

/// A job as the hub signs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique id of the job.
    pub job_id: String,
    /// The only agent that may run it.
    pub agent_id: String,
    /// The capability, e.g. `health` or `files.read`.
    pub capability: String,
    /// The capability's arguments (an object).
    pub args: serde_json::Value,
    /// The staff member who asked.
    pub staff: String,
    /// When the hub signed it (unix ms).
    pub issued_at_ms: i64,
    /// After this the agent refuses it (unix ms).
    pub expires_at_ms: i64,
    /// 16 random bytes, hex: the agent refuses a nonce it has seen before.
    pub nonce: String,
}

impl JobSpec {
    /// Lowercase hex SHA-256 of the arguments' JSON, for audit entries (the arguments
    /// themselves may hold PHI, the digest does not).
    pub fn args_digest(&self) -> String {
        hex::encode(Sha256::digest(self.args.to_string().as_bytes()))
    }
}

/// A job and its signature as they travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedJob {
    /// The [`JobSpec`] JSON, exactly as signed.
    pub job: String,
    /// Ed25519 signature over [`JOB_SIGNING_CONTEXT`] + `job`, hex.
    pub signature: String,
}

/// Signs a job with the hub's job key.
pub fn sign_job(spec: &JobSpec, key: &SigningKey) -> SignedJob {
    let job = crate::encode(spec);
    let signature = hex::encode(key.sign(&signing_bytes(&job)).to_bytes());
    SignedJob { job, signature }
}

/// Why a signed job was not accepted as coming from the hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobSignatureError {
    /// No signature at all.
    #[error("the job carries no signature")]
    Missing,
    /// The signature is not 64 bytes of hex.
    #[error("the job's signature is not 64 bytes of hex")]
    Malformed,
    /// The signature does not verify with the pinned job key.
    #[error("the job's signature does not verify with the hub job key pinned at enrollment")]
    Invalid,
    /// Larger than [`MAX_JOB_BYTES`].
    #[error("the job is {0} bytes; at most {MAX_JOB_BYTES} are accepted")]
    TooLarge(usize),
    /// Signed, but not a job this agent understands.
    #[error("the signed job is not readable: {0}")]
    Unreadable(String),
}

/// Checks the signature over the exact bytes received, then parses the job.
pub fn verify_job(signed: &SignedJob, key: &VerifyingKey) -> Result<JobSpec, JobSignatureError> {
    if signed.job.len() > MAX_JOB_BYTES {
        return Err(JobSignatureError::TooLarge(signed.job.len()));
    }
    if signed.signature.is_empty() {
        return Err(JobSignatureError::Missing);
    }
    let bytes: [u8; 64] = hex::decode(&signed.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(JobSignatureError::Malformed)?;
    key.verify(&signing_bytes(&signed.job), &Signature::from_bytes(&bytes))
        .map_err(|_| JobSignatureError::Invalid)?;
    serde_json::from_str(&signed.job).map_err(|err| JobSignatureError::Unreadable(err.to_string()))
}

/// The claimed job id of a job that may not verify, for reporting a refusal; bounded and
/// never trusted for anything else.
pub fn claimed_job_id(job: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Claimed {
        job_id: String,
    }
    let claimed: Claimed = serde_json::from_str(job).ok()?;
    let id: String = claimed.job_id.chars().take(64).collect();
    Some(id)
}

fn signing_bytes(job: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(JOB_SIGNING_CONTEXT.len() + job.len());
    bytes.extend_from_slice(JOB_SIGNING_CONTEXT);
    bytes.extend_from_slice(job.as_bytes());
    bytes
}

/// Where a job stands. The agent reports the states from `awaiting_approval` on; the hub
/// adds the ones before and around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Hub: part of a rollout, not released yet (concurrency limit).
    Queued,
    /// Hub: released, waiting for the agent's session.
    Pending,
    /// Hub: sent down the agent's session.
    Sent,
    /// Agent: waiting for a local approval.
    AwaitingApproval,
    /// Agent: running.
    Running,
    /// Agent: finished successfully.
    Done,
    /// Agent: the capability failed.
    Failed,
    /// Agent: refused by a check or the policy (`rule` says which).
    Refused,
    /// Agent: a local approver said no.
    Denied,
    /// Agent or hub: expired before it could run.
    Expired,
    /// Agent: cancelled while running or waiting.
    Cancelled,
    /// Hub: never sent, because the rollout halted at its error threshold.
    Skipped,
}

impl JobState {
    /// Whether nothing more will happen to the job.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done
                | Self::Failed
                | Self::Refused
                | Self::Denied
                | Self::Expired
                | Self::Cancelled
                | Self::Skipped
        )
    }

    /// Whether the job ended without doing what was asked (counts toward a rollout's
    /// error threshold).
    pub fn is_failure(self) -> bool {
        self.is_final() && !matches!(self, Self::Done | Self::Skipped)
    }

    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }

    /// Parses [`JobState::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Pending,
            Self::Sent,
            Self::AwaitingApproval,
            Self::Running,
            Self::Done,
            Self::Failed,
            Self::Refused,
            Self::Denied,
            Self::Expired,
            Self::Cancelled,
            Self::Skipped,
        ]
        .into_iter()
        .find(|state| state.as_str() == name)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            job_id: "job-1".into(),
            agent_id: "agent-1".into(),
            capability: "health".into(),
            args: serde_json::json!({}),
            staff: "alice".into(),
            issued_at_ms: 1,
            expires_at_ms: 2,
            nonce: "00".repeat(16),
        }
    }

    #[test]
    fn a_signed_job_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = sign_job(&spec(), &key);
        assert_eq!(verify_job(&signed, &key.verifying_key()).unwrap(), spec());
        let edited = SignedJob {
            job: signed.job.replace("health", "files.write"),
            ..signed.clone()
        };
        assert_eq!(
            verify_job(&edited, &key.verifying_key()),
            Err(JobSignatureError::Invalid)
        );
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            verify_job(&signed, &other.verifying_key()),
            Err(JobSignatureError::Invalid)
        );
        let unsigned = SignedJob {
            signature: String::new(),
            ..signed.clone()
        };
        assert_eq!(
            verify_job(&unsigned, &key.verifying_key()),
            Err(JobSignatureError::Missing)
        );
        let garbled = SignedJob {
            signature: "zz".into(),
            ..signed
        };
        assert_eq!(
            verify_job(&garbled, &key.verifying_key()),
            Err(JobSignatureError::Malformed)
        );
    }

    #[test]
    fn states_round_trip_by_name() {
        for name in ["queued", "awaiting_approval", "done", "skipped"] {
            assert_eq!(JobState::from_name(name).unwrap().as_str(), name);
        }
        assert!(JobState::from_name("exploded").is_none());
        assert!(JobState::Refused.is_failure());
        assert!(!JobState::Done.is_failure());
        assert!(!JobState::Running.is_final());
    }
}
