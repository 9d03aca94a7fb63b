//! Errors from opening, appending to and reading an audit log.

use std::path::PathBuf;

/// Why the audit log could not be opened, appended to or read. Each message names the
/// file; none quotes an entry's content.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be opened, read, written or synced.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The log file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another [`AuditLog`](crate::AuditLog)) has the log open.
    #[error("audit log {}: already open for writing elsewhere", path.display())]
    Locked {
        /// The log file.
        path: PathBuf,
    },
    /// The log's first or last entries are not a sound place to continue the chain from.
    #[error("audit log {}: {reason}; run `outpost audit verify` on it", path.display())]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The log's first entry records another key than the one the agent signs with.
    #[error("audit log {}: was started with public key {recorded}, not this agent's key {ours}", path.display())]
    KeyMismatch {
        /// The log file.
        path: PathBuf,
        /// The key in the log's first entry.
        recorded: String,
        /// The key given to `open`.
        ours: String,
    },
    /// The log belongs to another agent.
    #[error("audit log {}: belongs to agent {recorded:?}, not {ours:?}", path.display())]
    AgentMismatch {
        /// The log file.
        path: PathBuf,
        /// The `agent_id` in the log's first entry.
        recorded: String,
        /// The `agent_id` given to `open`.
        ours: String,
    },
    /// The agent id given to `open` is empty.
    #[error("audit log {}: agent id is empty", path.display())]
    EmptyAgentId {
        /// The log file.
        path: PathBuf,
    },
    /// An entry would encode to a line longer than the log allows.
    #[error("audit log {}: entry {event:?} is {bytes} bytes, more than the {limit} a line may have", path.display())]
    EntryTooLarge {
        /// The log file.
        path: PathBuf,
        /// The entry's event.
        event: String,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The caller asked to append an event only the log itself writes.
    #[error("audit log {}: event {event:?} is written by the log itself", path.display())]
    ReservedEvent {
        /// The log file.
        path: PathBuf,
        /// The event.
        event: String,
    },
    /// The caller asked to append an entry with an empty event.
    #[error("audit log {}: entry has no event", path.display())]
    EmptyEvent {
        /// The log file.
        path: PathBuf,
    },
    /// An entry could not be encoded as JSON.
    #[error("audit log {}: encoding entry {event:?}: {source}", path.display())]
    Encode {
        /// The log file.
        path: PathBuf,
        /// The entry's event.
        event: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// A line of the log could not be read as text.
    #[error("audit log {}: line {line}: {reason}", path.display())]
    Unreadable {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Why.
        reason: String,
    },
    /// An earlier append failed part-way and the partial line could not be removed, so
    /// appending more would break the chain; reopen the log to repair it.
    #[error("audit log {}: an earlier write failed and could not be undone; reopen the log", path.display())]
    Poisoned {
        /// The log file.
        path: PathBuf,
    },
}
