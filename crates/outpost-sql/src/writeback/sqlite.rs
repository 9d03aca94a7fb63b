//! Write-back to SQLite: `?N` binds, values bound by their JSON type (integers as
//! INTEGER, other numbers as REAL, strings as TEXT, booleans as 1/0, null as NULL),
//! `BEGIN IMMEDIATE` … `COMMIT`, foreign keys enforced. SQLite has no transaction id that
//! outlives a crash, so there is no marker: an unfinished call's outcome stays unknown.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value};

use super::placeholders::BindStyle;
use super::{Dialect, ExecError, Executed, Fate, Session};
use crate::event::sqlite_to_json;

/// A SQLite database file (which must exist).
pub struct Sqlite {
    /// The database file.
    pub path: PathBuf,
}

#[async_trait::async_trait]
impl Dialect for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn bind_style(&self) -> BindStyle {
        BindStyle::QuestionNumbered
    }

    fn has_markers(&self) -> bool {
        false
    }

    async fn connect(&self) -> Result<Box<dyn Session>, ExecError> {
        let path = self.path.clone();
        let db = blocking(move || {
            let db = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|err| ExecError::Unavailable(format!("open {}: {err}", path.display())))?;
            db.busy_timeout(Duration::from_secs(5)).map_err(classify)?;
            db.execute_batch("PRAGMA foreign_keys = ON")
                .map_err(classify)?;
            Ok(db)
        })
        .await?;
        Ok(Box::new(SqliteSession {
            db: Arc::new(Mutex::new(db)),
        }))
    }
}

struct SqliteSession {
    db: Arc<Mutex<Connection>>,
}

impl SqliteSession {
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, ExecError> + Send + 'static,
    ) -> Result<T, ExecError> {
        let db = self.db.clone();
        blocking(move || {
            let db = db
                .lock()
                .map_err(|_| ExecError::Unavailable("the connection was poisoned".into()))?;
            work(&db)
        })
        .await
    }
}

#[async_trait::async_trait]
impl Session for SqliteSession {
    async fn begin(&mut self) -> Result<Option<String>, ExecError> {
        self.with(|db| db.execute_batch("BEGIN IMMEDIATE").map_err(classify))
            .await?;
        Ok(None)
    }

    async fn execute(&mut self, sql: &str, values: &[Value]) -> Result<Executed, ExecError> {
        let sql = sql.to_owned();
        let values: Vec<SqlValue> = values.iter().map(to_sqlite).collect();
        self.with(move |db| {
            let mut statement = db.prepare(&sql).map_err(classify)?;
            let names: Vec<String> = statement
                .column_names()
                .into_iter()
                .map(str::to_owned)
                .collect();
            let read_only = statement.readonly();
            let mut rows = statement
                .query(rusqlite::params_from_iter(values.iter()))
                .map_err(classify)?;
            let mut returned = Vec::new();
            while let Some(row) = rows.next().map_err(classify)? {
                let mut out = Map::new();
                for (i, name) in names.iter().enumerate() {
                    let value = row.get_ref(i).map_err(classify)?;
                    out.insert(name.clone(), sqlite_to_json(value));
                }
                returned.push(out);
            }
            drop(rows);
            let rows_affected = if read_only { 0 } else { db.changes() };
            Ok(Executed {
                rows_affected,
                returned,
            })
        })
        .await
    }

    async fn commit(&mut self) -> Result<(), ExecError> {
        self.with(|db| db.execute_batch("COMMIT").map_err(classify))
            .await
    }

    async fn rollback(&mut self) {
        let _ = self
            .with(|db| {
                if !db.is_autocommit() {
                    db.execute_batch("ROLLBACK").map_err(classify)?;
                }
                Ok(())
            })
            .await;
    }

    async fn fate(&mut self, _marker: &str) -> Result<Fate, ExecError> {
        Ok(Fate::Unknown)
    }

    fn is_usable(&self) -> bool {
        true
    }
}

fn to_sqlite(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        // Refused before this point; stored as JSON text if ever reached.
        other => SqlValue::Text(other.to_string()),
    }
}

fn classify(err: rusqlite::Error) -> ExecError {
    match &err {
        rusqlite::Error::SqliteFailure(failure, message) => {
            let code = code_name(failure.extended_code);
            let transient = matches!(
                failure.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            );
            ExecError::Refused {
                code,
                message: message.clone().unwrap_or_else(|| failure.to_string()),
                transient,
            }
        }
        rusqlite::Error::SqlInputError { msg, .. } => ExecError::Refused {
            code: "SQLITE_ERROR".into(),
            message: msg.clone(),
            transient: false,
        },
        other => ExecError::Invalid(other.to_string()),
    }
}

/// SQLite's result-code names for the codes a write-back meets; others by number.
fn code_name(extended: i32) -> String {
    let name = match extended {
        1 => "SQLITE_ERROR",
        5 => "SQLITE_BUSY",
        6 => "SQLITE_LOCKED",
        8 => "SQLITE_READONLY",
        13 => "SQLITE_FULL",
        19 => "SQLITE_CONSTRAINT",
        20 => "SQLITE_MISMATCH",
        23 => "SQLITE_AUTH",
        275 => "SQLITE_CONSTRAINT_CHECK",
        787 => "SQLITE_CONSTRAINT_FOREIGNKEY",
        1299 => "SQLITE_CONSTRAINT_NOTNULL",
        1555 => "SQLITE_CONSTRAINT_PRIMARYKEY",
        2067 => "SQLITE_CONSTRAINT_UNIQUE",
        2579 => "SQLITE_CONSTRAINT_ROWID",
        other => return format!("SQLITE_{other}"),
    };
    name.to_owned()
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ExecError> + Send + 'static,
) -> Result<T, ExecError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ExecError::Unavailable(format!("background task stopped: {err}")))?
}
