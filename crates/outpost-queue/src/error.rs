//! Everything that can go wrong in the queue, each with the context that identifies it.

use std::path::PathBuf;

use outpost_core::ItemId;

/// A queue failure. Messages name files, sinks and item ids, never payload content.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The data directory could not be created or read.
    #[error("data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be created or read.
    #[error("key file {}: {source}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The key file exists but does not hold a key.
    #[error("key file {}: expected exactly 32 bytes, found {found}", path.display())]
    KeyLength {
        /// The key file.
        path: PathBuf,
        /// Its length.
        found: u64,
    },
    /// Inspection was asked for a queue that does not exist.
    #[error("no queue at {} (has the agent run with this data_dir?)", path.display())]
    Missing {
        /// Where the queue file was expected.
        path: PathBuf,
    },
    /// SQLite failed.
    #[error("queue file {}: {source}", path.display())]
    Sqlite {
        /// The queue file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The queue file's schema version is not this outpost's.
    #[error("queue file {}: schema version {found} is {detail}", path.display())]
    Version {
        /// The queue file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Newer or older, and what to do.
        detail: &'static str,
    },
    /// The disk holding the queue is (nearly) full; intake stops until space is freed.
    #[error("disk full: {available_bytes} bytes free under {}, at least {required_bytes} required; intake paused", path.display())]
    DiskFull {
        /// The data directory.
        path: PathBuf,
        /// Free bytes seen.
        available_bytes: u64,
        /// The configured floor.
        required_bytes: u64,
    },
    /// A payload failed authentication: wrong key or an altered file.
    #[error("item {id}: payload cannot be unsealed (wrong key or altered queue file)")]
    Unseal {
        /// The item.
        id: ItemId,
    },
    /// The item or delivery named does not exist.
    #[error("item {id} has no delivery to sink {sink:?}")]
    NoSuchDelivery {
        /// The item.
        id: ItemId,
        /// The sink.
        sink: String,
    },
    /// The writer thread has stopped (the queue is closing).
    #[error("queue is closed")]
    Closed,
    /// A source's stored state is not the one its batch expected: an earlier batch failed,
    /// or the state was reset. Nothing of the batch was written.
    #[error("source state {name:?} is not the one this batch follows (an earlier batch failed or the state was reset); batch refused, the source must restart from the stored state")]
    StateMoved {
        /// The state's name.
        name: String,
    },
    /// A source's stored state fails authentication or is not text.
    #[error("source state {name:?} cannot be unsealed (wrong key or altered queue file)")]
    StateUnreadable {
        /// The state's name.
        name: String,
    },
    /// A stored value could not be read back.
    #[error("item {id}: stored {what} is invalid")]
    Corrupt {
        /// The item.
        id: ItemId,
        /// Which column.
        what: &'static str,
    },
}
