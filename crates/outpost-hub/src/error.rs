//! Hub errors. API handlers turn them into JSON `{code, message}` through `ApiError`.

use std::path::PathBuf;

/// A hub failure.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The SQLite store failed.
    #[error("hub store {}: {source}", path.display())]
    Sqlite {
        /// The store file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The PostgreSQL store failed. Only the URL with its password redacted is kept, and the
    /// detail holds PostgreSQL's code and message but never its DETAIL (which can quote row
    /// values), so the error is safe to log.
    #[error("hub store {target}: {operation}: {detail}")]
    Postgres {
        /// The database URL, password redacted.
        target: String,
        /// What the store was doing (`migrate`, `insert_messages`, ...).
        operation: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The store's worker went away.
    #[error("hub store unavailable")]
    StoreUnavailable,
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// TLS material could not be made or loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The config is wrong; the message names file and key.
    #[error("{0}")]
    Config(String),
    /// An agent broke the protocol; its session is closed (it resends on the next one).
    #[error("protocol: {0}")]
    Protocol(String),
    /// Binding the listen address failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}
