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
    /// A configured key column allows NULL: a NULL key identifies no row, and a snapshot
    /// resumed after a NULL key would skip or repeat rows.
    #[error(
        "source {source_name}: table {table:?}: key column {column:?} allows NULL; a key must \
         identify each row: choose NOT NULL columns (such as the primary key) in tables[].key, \
         or add NOT NULL to the column"
    )]
    NullableKey {
        /// The source, as named in the agent config.
        source_name: String,
        /// The table, as configured.
        table: String,
        /// The key column, as configured.
        column: String,
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

    /// Refuses the first of `key` (a table's configured key columns) that `allows_null`
    /// says the catalog does not declare NOT NULL.
    pub(crate) fn refuse_nullable_key<'a>(
        source: &str,
        table: &str,
        key: impl IntoIterator<Item = &'a String>,
        allows_null: impl Fn(&str) -> bool,
    ) -> Result<(), SqlError> {
        match key.into_iter().find(|column| allows_null(column)) {
            Some(column) => Err(SqlError::NullableKey {
                source_name: source.to_owned(),
                table: table.to_owned(),
                column: column.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A NULL in a key column read from a table whose key was checked NOT NULL at start
    /// (the column was altered since): stops rather than resume from a made-up key.
    pub(crate) fn null_key(table: &str, column: &str) -> Self {
        SqlError::Table {
            table: table.to_owned(),
            message: format!(
                "a row has NULL in key column {column:?}, which was NOT NULL when the source \
                 started (altered since?); a key must identify each row: add NOT NULL to the \
                 column or choose other key columns"
            ),
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
    use super::{redact_url, SqlError};

    #[test]
    fn a_nullable_key_column_is_refused_by_name() {
        let key = vec!["patnum".to_owned(), "chartno".to_owned()];
        let err = SqlError::refuse_nullable_key("pms", "patient", &key, |c| c == "chartno")
            .err()
            .map(|err| err.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "source pms: table \"patient\": key column \"chartno\" allows NULL; a key must \
                 identify each row: choose NOT NULL columns (such as the primary key) in \
                 tables[].key, or add NOT NULL to the column"
            )
        );
        assert!(SqlError::refuse_nullable_key("pms", "patient", &key, |_| false).is_ok());
    }

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
