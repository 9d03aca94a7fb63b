//! `Mirror`: the hub's check on an agent's audit entries as they arrive.

use ed25519_dalek::VerifyingKey;

use crate::entry::{parse_line, GENESIS_PREV, MAX_LINE_BYTES};
use crate::verify::{check_genesis_shape, line_fault_problem, ProblemKind};

/// Follows one agent's log on the hub, one line at a time as received, and says when the
/// stream has a gap, a fork, a bad signature or a broken chain. It keeps only the last
/// seq and hash; the hub stores the lines themselves.
///
/// A refused line changes nothing, so after a gap the hub can ask for the missing entries
/// and feed them in order.
#[derive(Debug, Clone)]
pub struct Mirror {
    key: VerifyingKey,
    agent_id: Option<String>,
    last_seq: u64,
    last_hash: String,
}

/// What [`Mirror::accept`] did with a good line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// The line continues the chain; store it.
    Appended {
        /// Its seq.
        seq: u64,
        /// Its hash.
        hash: String,
    },
    /// The line is the one last accepted, sent again (e.g. after a reconnect).
    Duplicate {
        /// Its seq.
        seq: u64,
    },
}

/// Why [`Mirror::accept`] refused a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorProblem {
    /// The line is not a well-formed entry.
    #[error("not an audit entry: {message}")]
    Malformed {
        /// What kind of damage.
        kind: ProblemKind,
        /// In words.
        message: String,
    },
    /// The signature does not verify with the agent's enrolled key.
    #[error("seq {seq}: signature does not verify with the agent's key")]
    BadSignature {
        /// The seq the line claims.
        seq: u64,
    },
    /// The entry names another agent.
    #[error("seq {seq}: entry is for agent {found:?}, not {expected:?}")]
    WrongAgent {
        /// The seq.
        seq: u64,
        /// The agent this mirror follows.
        expected: String,
        /// The agent the entry names.
        found: String,
    },
    /// The first entry is not a `log.opened` recording the enrolled key.
    #[error("seq 1: {message}")]
    BadGenesis {
        /// In words.
        message: String,
    },
    /// Entries are missing between the last one accepted and this one.
    #[error("gap: expected seq {expected}, received seq {received} (seqs {expected} to {} missing)", received - 1)]
    Gap {
        /// The seq the mirror waits for.
        expected: u64,
        /// The seq that arrived.
        received: u64,
    },
    /// Same seq as the last accepted entry, different content: the agent's log was
    /// rewritten.
    #[error("fork at seq {seq}: the hub holds hash {held}, the agent sent {received}")]
    Fork {
        /// The seq.
        seq: u64,
        /// Hash of the line the hub holds.
        held: String,
        /// Hash of the line just received.
        received: String,
    },
    /// The entry's `prev` is not the hash of the entry the hub holds before it: the
    /// agent's log was rewritten at or before that entry.
    #[error("seq {seq}: prev does not match the hash of seq {} the hub holds (the agent's log was rewritten at or before it)", seq - 1)]
    BrokenChain {
        /// The seq.
        seq: u64,
    },
    /// An entry older than the last one accepted; compare it with the stored copy.
    #[error("seq {seq} is older than the last accepted seq {last_seq}")]
    Stale {
        /// The seq.
        seq: u64,
        /// The last seq accepted.
        last_seq: u64,
    },
}

impl Mirror {
    /// A mirror of a new log: the first line it accepts must be the `log.opened` entry,
    /// recording `public_key`.
    pub fn new(public_key: VerifyingKey) -> Self {
        Mirror {
            key: public_key,
            agent_id: None,
            last_seq: 0,
            last_hash: GENESIS_PREV.to_owned(),
        }
    }

    /// A mirror that already holds entries up to `last_seq`, whose line hashes to
    /// `last_hash`.
    pub fn resume(public_key: VerifyingKey, last_seq: u64, last_hash: &str) -> Self {
        Mirror {
            key: public_key,
            agent_id: None,
            last_seq,
            last_hash: last_hash.to_owned(),
        }
    }

    /// Also requires every entry to name `agent_id` (otherwise the first entry's
    /// `agent_id` is required from then on; the key alone ties a resumed mirror to its
    /// agent).
    pub fn expect_agent(mut self, agent_id: &str) -> Self {
        self.agent_id = Some(agent_id.to_owned());
        self
    }

    /// The seq of the last accepted entry (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Hash of the last accepted line.
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// Checks one line (a trailing newline is ignored) and, if it continues the chain,
    /// advances to it.
    pub fn accept(&mut self, line: &str) -> Result<Accepted, MirrorProblem> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.len() > MAX_LINE_BYTES {
            return Err(MirrorProblem::Malformed {
                kind: ProblemKind::LineTooLong,
                message: format!("the line is longer than {MAX_LINE_BYTES} bytes"),
            });
        }
        let parsed = parse_line(line.as_bytes()).map_err(|(fault, detail)| {
            let problem = line_fault_problem(0, fault, &detail);
            MirrorProblem::Malformed {
                kind: problem.kind,
                message: problem.message,
            }
        })?;
        let seq = parsed.entry.seq;
        if !parsed.is_signed_by(&self.key) {
            return Err(MirrorProblem::BadSignature { seq });
        }
        if let Some(expected) = &self.agent_id {
            if *expected != parsed.entry.agent_id {
                return Err(MirrorProblem::WrongAgent {
                    seq,
                    expected: expected.clone(),
                    found: parsed.entry.agent_id,
                });
            }
        }
        let expected = self.last_seq + 1;
        if seq > expected {
            return Err(MirrorProblem::Gap {
                expected,
                received: seq,
            });
        }
        if seq < expected {
            return match (seq == self.last_seq, parsed.hash == self.last_hash) {
                (true, true) => Ok(Accepted::Duplicate { seq }),
                (true, false) => Err(MirrorProblem::Fork {
                    seq,
                    held: self.last_hash.clone(),
                    received: parsed.hash,
                }),
                (false, _) => Err(MirrorProblem::Stale {
                    seq,
                    last_seq: self.last_seq,
                }),
            };
        }
        if seq == 1 {
            self.check_genesis(&parsed)?;
        } else if parsed.entry.prev != self.last_hash {
            return Err(MirrorProblem::BrokenChain { seq });
        }
        if self.agent_id.is_none() {
            self.agent_id = Some(parsed.entry.agent_id);
        }
        self.last_seq = seq;
        self.last_hash.clone_from(&parsed.hash);
        Ok(Accepted::Appended {
            seq,
            hash: parsed.hash,
        })
    }

    fn check_genesis(&self, parsed: &crate::entry::ParsedLine) -> Result<(), MirrorProblem> {
        check_genesis_shape(parsed).map_err(|message| MirrorProblem::BadGenesis { message })?;
        let enrolled = hex::encode(self.key.as_bytes());
        if parsed.entry.public_key.as_deref() != Some(enrolled.as_str()) {
            return Err(MirrorProblem::BadGenesis {
                message: "the first entry does not record the agent's enrolled key".to_owned(),
            });
        }
        Ok(())
    }
}
