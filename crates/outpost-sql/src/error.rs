//! Errors of change capture. Messages name the source, table or file concerned, never a
//! row value, and never a password: URLs are redacted before they reach an error.

use std::path::PathBuf;

/// A failure of a SQL source.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The config is unusable (bad URL scheme, missing key columns...).
    #[error("{0}")]
    Config(String),
    /// The password file cannot be used.
    #[error("password_file {}: {message}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The environment variable named by `password_env` is not set.
    #[error("password_env {0}: not set in the agent's environment")]
    PasswordEnv(String),
    /// Connecting to the database failed.
    #[error("connect to {url}: {message}")]
    Connect {
        /// The redacted URL.
        url: String,
        /// What the database or the network said.
        message: String,
    },
    /// A statement failed.
    #[error("{context}: {message}")]
    Database {
        /// What was being done (never the values involved).
        context: String,
        /// What the database said.
        message: String,
    },
    /// A configured table is not there, or lacks a configured column.
    #[error("table {table}: {message}")]
    Table {
        /// The table, as configured.
        table: String,
        /// What is missing.
        message: String,
    },
    /// A value or message from the database that cannot be read (the logical decoding
    /// stream, a binary column value, a stored event).
    #[error("decode: {0}")]
    Decode(String),
    /// The MariaDB/MySQL binlog stream had something this reader cannot use, or the server
    /// is not set up for change capture.
    #[error("binlog: {0}")]
    Binlog(String),
    /// A stored position cannot be read back.
    #[error("stored position is not valid: {0}")]
    Position(String),
    /// The state file of a polling source failed.
    #[error("state file {}: {message}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A blocking task was lost (the runtime is shutting down).
    #[error("background task stopped: {0}")]
    Task(String),
}

impl SqlError {
    /// A database error with what was being done.
    pub(crate) fn db(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        SqlError::Database {
            context: context.into(),
            message: err.to_string(),
        }
    }

    /// A PostgreSQL error with what was being done, with the server's own message (which
    /// names objects, never row values).
    pub(crate) fn pg(context: impl Into<String>, err: tokio_postgres::Error) -> Self {
        SqlError::Database {
            context: context.into(),
            message: pg_message(&err),
        }
    }
}

/// The server's message of a PostgreSQL error (tokio-postgres prints only "db error").
pub(crate) fn pg_message(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; other text unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://outpost:secret@127.0.0.1:5433/pms"),
            "postgres://outpost:***@127.0.0.1:5433/pms"
        );
        assert_eq!(
            redact_url("postgres://a:p@ss@h/db?x=1"),
            "postgres://a:***@h/db?x=1"
        );
        assert_eq!(
            redact_url("postgres://outpost@h/db"),
            "postgres://outpost@h/db"
        );
        assert_eq!(redact_url("sqlite:/tmp/x.db"), "sqlite:/tmp/x.db");
    }
}
