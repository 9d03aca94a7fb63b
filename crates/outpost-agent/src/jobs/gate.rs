//! The checks before the policy: signature (with the job key pinned at enrollment), agent
//! id, expiry, and replay (each nonce remembered until its job expires).

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;
use outpost_proto::{verify_job, JobSpec, SignedJob};

/// A job may not be valid for longer than this: it bounds how long nonces are kept.
pub const MAX_JOB_LIFETIME_MS: i64 = 24 * 60 * 60 * 1000;

/// Why the gate refused a job: the rule (for the audit log) and a sentence.
#[derive(Debug, Clone, PartialEq)]
pub struct GateRefusal {
    /// `no-job-key`, `signature`, `agent-id`, `expiry` or `replay`.
    pub rule: &'static str,
    /// Why, without argument values.
    pub reason: String,
    /// The job, when its signature verified (refused for agent id, expiry or replay), so
    /// the audit entry can name its staff member and capability.
    pub job: Option<Box<JobSpec>>,
}

/// The gate of one agent.
pub struct Gate {
    agent_id: String,
    job_key: Option<VerifyingKey>,
    /// Nonces seen, with the expiry of their job.
    seen: HashMap<String, i64>,
}

impl Gate {
    /// A gate for `agent_id` trusting `job_key` (None: refuse every job).
    pub fn new(agent_id: &str, job_key: Option<VerifyingKey>) -> Gate {
        Gate {
            agent_id: agent_id.to_owned(),
            job_key,
            seen: HashMap::new(),
        }
    }

    /// Remembers a nonce seen before this process started (from the audit log).
    pub fn remember(&mut self, nonce: &str, expires_at_ms: i64) {
        self.seen.insert(nonce.to_owned(), expires_at_ms);
    }

    /// Checks a job. A signed job that passes has its nonce remembered, so the same job
    /// delivered again is refused as a replay.
    pub fn check(&mut self, signed: &SignedJob, now_ms: i64) -> Result<JobSpec, GateRefusal> {
        let Some(key) = &self.job_key else {
            return Err(GateRefusal {
                rule: "no-job-key",
                reason: "this agent has no hub job key pinned (enrolled with a hub that had none); enroll again".into(),
                job: None,
            });
        };
        let spec = verify_job(signed, key).map_err(|err| GateRefusal {
            rule: "signature",
            reason: err.to_string(),
            job: None,
        })?;
        let refuse = |rule: &'static str, reason: String| GateRefusal {
            rule,
            reason,
            job: Some(Box::new(spec.clone())),
        };
        // They are shown to the practice's approver and written to the audit log: no
        // control characters that could redraw a terminal line, and a bounded length.
        for (field, value) in [("job_id", &spec.job_id), ("staff", &spec.staff)] {
            if value.is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
                return Err(refuse(
                    "job-fields",
                    format!("the job's {field} is empty, longer than 128 bytes or holds control characters"),
                ));
            }
        }
        if spec.agent_id != self.agent_id {
            return Err(refuse(
                "agent-id",
                format!(
                    "the job is for agent {:?}, this is agent {:?}",
                    bounded(&spec.agent_id),
                    self.agent_id
                ),
            ));
        }
        if spec.expires_at_ms <= now_ms {
            return Err(refuse(
                "expiry",
                format!(
                    "the job expired {} s ago",
                    (now_ms - spec.expires_at_ms) / 1000
                ),
            ));
        }
        if spec.expires_at_ms - now_ms > MAX_JOB_LIFETIME_MS {
            return Err(refuse(
                "expiry",
                "the job expires more than 24 h from now; jobs must be short-lived".into(),
            ));
        }
        if spec.nonce.len() < 16 || spec.nonce.len() > 128 {
            return Err(refuse(
                "replay",
                "the job's nonce is not 16 to 128 characters".into(),
            ));
        }
        if self
            .seen
            .get(&spec.nonce)
            .is_some_and(|&expires| expires > now_ms)
        {
            return Err(refuse(
                "replay",
                format!(
                    "job {:?} was received before (same nonce): a replay",
                    bounded(&spec.job_id)
                ),
            ));
        }
        self.seen.insert(spec.nonce.clone(), spec.expires_at_ms);
        Ok(spec)
    }

    /// Forgets nonces of expired jobs (they are refused for expiry anyway).
    pub fn prune(&mut self, now_ms: i64) {
        self.seen.retain(|_, expires| *expires > now_ms);
    }
}

fn bounded(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ed25519_dalek::SigningKey;

    fn job(agent: &str, expires_at_ms: i64, nonce: &str) -> JobSpec {
        JobSpec {
            job_id: "j1".into(),
            agent_id: agent.into(),
            capability: "health".into(),
            args: serde_json::json!({}),
            staff: "alice".into(),
            issued_at_ms: 0,
            expires_at_ms,
            nonce: nonce.into(),
        }
    }

    #[test]
    fn each_check_refuses_with_its_rule() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut gate = Gate::new("a1", Some(key.verifying_key()));
        let nonce = "ab".repeat(16);
        let good = outpost_proto::sign_job(&job("a1", 10_000, &nonce), &key);
        assert!(gate.check(&good, 1_000).is_ok());
        assert_eq!(gate.check(&good, 1_000).unwrap_err().rule, "replay");

        let other_agent = outpost_proto::sign_job(&job("a2", 10_000, &"cd".repeat(16)), &key);
        assert_eq!(
            gate.check(&other_agent, 1_000).unwrap_err().rule,
            "agent-id"
        );
        let expired = outpost_proto::sign_job(&job("a1", 500, &"ef".repeat(16)), &key);
        assert_eq!(gate.check(&expired, 1_000).unwrap_err().rule, "expiry");
        let forged = outpost_proto::sign_job(
            &job("a1", 10_000, &"01".repeat(16)),
            &SigningKey::from_bytes(&[2; 32]),
        );
        assert_eq!(gate.check(&forged, 1_000).unwrap_err().rule, "signature");
        let mut no_key = Gate::new("a1", None);
        assert_eq!(no_key.check(&good, 1_000).unwrap_err().rule, "no-job-key");
    }

    #[test]
    fn remembered_nonces_survive_until_expiry() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let nonce = "ab".repeat(16);
        let signed = outpost_proto::sign_job(&job("a1", 10_000, &nonce), &key);
        let mut gate = Gate::new("a1", Some(key.verifying_key()));
        gate.remember(&nonce, 10_000);
        assert_eq!(gate.check(&signed, 1_000).unwrap_err().rule, "replay");
        gate.prune(20_000);
        assert!(gate.seen.is_empty());
    }
}
