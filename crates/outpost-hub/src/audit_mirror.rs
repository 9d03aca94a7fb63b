//! The hub's copy of each agent's audit log. On every session the agent resends its last
//! [`OVERLAP`] entries before the new ones, and the hub compares them with the copy it
//! holds, so an entry edited, removed or reordered on the agent after it was mirrored is
//! flagged on the agent's next connection; new entries go through
//! [`outpost_audit::Mirror`], which checks signature, sequence and chain.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use outpost_audit::{Accepted, Mirror};
use serde::Deserialize;

use crate::store::{AgentRecord, MirroredLine};
use crate::{now_ms, HubError, HubState};

/// How many already-mirrored entries the agent resends on each session for comparison.
pub const OVERLAP: u64 = 1000;

/// One session's receiver.
pub struct AuditReceiver {
    agent_id: String,
    mirror: Mirror,
    /// Hashes of the entries the hub holds in the overlap, by seq.
    held: BTreeMap<u64, String>,
    /// The next overlap entry expected from the agent.
    next_held: u64,
    /// A problem was found this session: ignore the rest until the next session.
    flagged: bool,
}

impl AuditReceiver {
    /// Loads where the mirror stands; returns the receiver and the seq to ask after.
    pub async fn start(
        state: &HubState,
        agent: &AgentRecord,
        key: VerifyingKey,
    ) -> Result<(AuditReceiver, u64), HubError> {
        let position = state.store.mirror_state(&agent.id).await?;
        let mirror = if position.last_seq == 0 {
            Mirror::new(key)
        } else {
            Mirror::resume(key, position.last_seq, &position.last_hash)
        }
        .expect_agent(&agent.id);
        let held: BTreeMap<u64, String> = state
            .store
            .audit_lines(&agent.id, OVERLAP as usize)
            .await?
            .into_iter()
            .map(|line| (line.seq, line.hash))
            .collect();
        let after = held
            .keys()
            .next()
            .map_or(position.last_seq, |first| first - 1);
        Ok((
            AuditReceiver {
                agent_id: agent.id.clone(),
                mirror,
                next_held: after + 1,
                held,
                flagged: false,
            },
            after,
        ))
    }

    /// Checks and stores a batch of lines.
    pub async fn receive(&mut self, state: &HubState, lines: Vec<String>) -> Result<(), HubError> {
        #[derive(Deserialize)]
        struct Seq {
            seq: u64,
        }
        if self.flagged {
            return Ok(());
        }
        let now = now_ms();
        let mut accepted = Vec::new();
        let mut problem = None;
        for line in lines {
            let seq = serde_json::from_str::<Seq>(&line).map(|s| s.seq).ok();
            match seq {
                Some(seq) if seq <= self.mirror.last_seq() && !self.held.is_empty() => {
                    if seq != self.next_held {
                        problem = Some(if seq > self.next_held {
                            format!("entry {} is missing from the agent's log (it sent seq {seq} next); the hub holds the original", self.next_held)
                        } else {
                            format!(
                                "the agent's log is out of order: seq {seq} came after seq {}",
                                self.next_held - 1
                            )
                        });
                        break;
                    }
                    let hash = outpost_audit::line_hash(line.as_bytes());
                    if self.held.get(&seq).is_some_and(|held| *held != hash) {
                        problem = Some(format!(
                            "entry {seq} on the agent differs from the copy the hub received: it was changed after it was written"
                        ));
                        break;
                    }
                    self.next_held += 1;
                }
                _ => {
                    if !self.held.is_empty() && self.next_held <= self.mirror.last_seq() {
                        problem = Some(format!(
                            "entries {} to {} are missing from the agent's log; the hub holds the originals",
                            self.next_held,
                            self.mirror.last_seq()
                        ));
                        break;
                    }
                    match self.mirror.accept(&line) {
                        Ok(Accepted::Appended { seq, hash }) => accepted.push(MirroredLine {
                            seq,
                            hash,
                            line,
                            received_at_ms: now,
                        }),
                        Ok(Accepted::Duplicate { .. }) => {}
                        Err(err) => {
                            problem = Some(err.to_string());
                            break;
                        }
                    }
                }
            }
        }
        if !accepted.is_empty() {
            state
                .store
                .append_audit_lines(&self.agent_id, &accepted)
                .await?;
        }
        if let Some(problem) = problem {
            self.flagged = true;
            tracing::error!(agent_id = %self.agent_id, problem, "audit mirror: the agent's log does not match");
            state
                .store
                .set_mirror_problem(&self.agent_id, Some(&problem), now)
                .await?;
        }
        Ok(())
    }
}
