//! The agent's tamper-evident audit log.
//!
//! An append-only file of JSON Lines. Each entry carries `seq` (1, 2, 3… with no gaps),
//! the hash of the line before it (`prev`), and the agent's Ed25519 signature over the
//! line without its `sig` member; the first entry (`log.opened`) records the agent's
//! public key. An example line (wrapped here):
//!
//! ```text
//! {"seq":4,"time_ms":1767225600000,"agent_id":"clinic-7","event":"job.decided",
//!  "staff":"alice@vendor","job_id":"j-42","capability":"files.read","args_digest":"9f2c…",
//!  "decision":"refused","rule":"files.read.roots","prev":"5d1e…","sig":"c3a9…"}
//! ```
//!
//! - [`AuditLog`] is the agent's writer: each [`AuditLog::append`] is one write and an
//!   fsync, before the action it describes starts. Opening repairs a torn last line and
//!   records the repair.
//! - [`verify()`] checks a whole file and names the first bad line: edited (signature),
//!   removed (seq gap), reordered (seq out of order), cut short, or another agent's.
//! - [`Mirror`] is the hub's check on entries as they arrive: gaps, forks, bad signatures
//!   and broken chains.
//!
//! Invariant: every byte of a line is either covered by its signature or is the signature,
//! and every line's hash is in the next line's `prev`; so no single edit goes unnoticed.
//! Removing entries from the end of the file is the one change a lone log cannot show;
//! the hub's mirror, which already holds them, can.
//!
//! This crate depends on no other Outpost crate, so the hub can verify mirrored logs.

#![forbid(unsafe_code)]

mod entry;
mod error;
mod lines;
mod log;
mod mirror;
mod verify;

pub use entry::{
    events, line_hash, parse_public_key, AuditEntry, Decision, GENESIS_PREV, MAX_LINE_BYTES,
};
pub use error::AuditError;
pub use lines::LogLines;
pub use log::{AppendedEntry, AuditLog};
pub use mirror::{Accepted, Mirror, MirrorProblem};
pub use verify::{verify, KeySource, Problem, ProblemKind, VerifyReport};
