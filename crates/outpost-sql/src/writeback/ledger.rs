//! The idempotency ledger: one small SQLite file per SQL sink
//! (`<data_dir>/sql/<sink>/idempotency.db`) with one row per idempotency key.
//!
//! A row goes `started` (written, fsync'd, before the statement runs), then `begun` with
//! the database's transaction marker where the dialect has one (PostgreSQL's xid, written
//! before COMMIT is sent), then `done` with the result (sealed). A call that wrote nothing
//! (the database could not be reached, or refused the statement for a passing reason such
//! as a deadlock) removes its row so that a retry runs again.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::SqlError;

/// One key's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The row id (the sealing context of `result`).
    pub id: i64,
    /// Digest of the operation and values the key was first used with.
    pub request: Vec<u8>,
    /// `started`, `begun` or `done`.
    pub state: String,
    /// The database's transaction marker, once `begun`.
    pub marker: Option<String>,
    /// The stored result (sealed), once `done`.
    pub result: Option<Vec<u8>>,
}

/// The ledger file, opened per use (calls on one sink run one at a time).
pub struct Ledger {
    path: PathBuf,
    db: Connection,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Ledger {
    /// Opens (or creates) the ledger file.
    pub fn open(path: &Path) -> Result<Ledger, SqlError> {
        let fail = |err: rusqlite::Error| SqlError::State {
            path: path.to_owned(),
            message: err.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|err| SqlError::State {
                path: dir.to_owned(),
                message: err.to_string(),
            })?;
        }
        let db = Connection::open(path).map_err(fail)?;
        restrict_mode(path);
        db.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(fail)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS calls (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 key TEXT NOT NULL UNIQUE,
                 request BLOB NOT NULL,
                 state TEXT NOT NULL,
                 marker TEXT,
                 result BLOB,
                 started_ms INTEGER NOT NULL,
                 finished_ms INTEGER
             );",
        )
        .map_err(fail)?;
        Ok(Ledger {
            path: path.to_owned(),
            db,
        })
    }

    fn fail(&self, err: rusqlite::Error) -> SqlError {
        SqlError::State {
            path: self.path.clone(),
            message: err.to_string(),
        }
    }

    /// The row of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Entry>, SqlError> {
        self.db
            .query_row(
                "SELECT id, request, state, marker, result FROM calls WHERE key = ?1",
                params![key],
                |row| {
                    Ok(Entry {
                        id: row.get(0)?,
                        request: row.get(1)?,
                        state: row.get(2)?,
                        marker: row.get(3)?,
                        result: row.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(|err| self.fail(err))
    }

    /// Records that `key` is about to run; returns the row id.
    pub fn start(&self, key: &str, request: &[u8]) -> Result<i64, SqlError> {
        self.db
            .execute(
                "INSERT INTO calls (key, request, state, started_ms) VALUES (?1, ?2, 'started', ?3)",
                params![key, request, now_ms()],
            )
            .map_err(|err| self.fail(err))?;
        Ok(self.db.last_insert_rowid())
    }

    /// Records the database's transaction marker, before COMMIT is sent.
    pub fn begun(&self, id: i64, marker: &str) -> Result<(), SqlError> {
        self.db
            .execute(
                "UPDATE calls SET state = 'begun', marker = ?2 WHERE id = ?1",
                params![id, marker],
            )
            .map_err(|err| self.fail(err))
            .map(|_| ())
    }

    /// Records the result.
    pub fn finish(&self, id: i64, result: &[u8]) -> Result<(), SqlError> {
        self.db
            .execute(
                "UPDATE calls SET state = 'done', result = ?2, finished_ms = ?3 WHERE id = ?1",
                params![id, result, now_ms()],
            )
            .map_err(|err| self.fail(err))
            .map(|_| ())
    }

    /// Removes a row whose call wrote nothing, so a retry runs again.
    pub fn forget(&self, id: i64) -> Result<(), SqlError> {
        self.db
            .execute("DELETE FROM calls WHERE id = ?1", params![id])
            .map_err(|err| self.fail(err))
            .map(|_| ())
    }

    /// Removes finished rows older than `max_age_ms`; unfinished ones stay (their outcome
    /// is for a person to settle). Returns how many went.
    pub fn purge(&self, max_age_ms: i64) -> Result<usize, SqlError> {
        self.db
            .execute(
                "DELETE FROM calls WHERE state = 'done' AND finished_ms < ?1",
                params![now_ms().saturating_sub(max_age_ms)],
            )
            .map_err(|err| self.fail(err))
    }
}

#[cfg(unix)]
fn restrict_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_mode(_path: &Path) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_key_goes_started_begun_done_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sql/pms-write/idempotency.db");
        let ledger = Ledger::open(&path).unwrap();
        let id = ledger.start("k1", b"req").unwrap();
        assert!(ledger.start("k1", b"req").is_err(), "a key is taken once");
        ledger.begun(id, "1234").unwrap();
        ledger.finish(id, b"result").unwrap();
        drop(ledger);
        let ledger = Ledger::open(&path).unwrap();
        let entry = ledger.get("k1").unwrap().unwrap();
        assert_eq!(entry.state, "done");
        assert_eq!(entry.marker.as_deref(), Some("1234"));
        assert_eq!(entry.result.as_deref(), Some(&b"result"[..]));
        let other = ledger.start("k2", b"req").unwrap();
        ledger.forget(other).unwrap();
        assert_eq!(ledger.get("k2").unwrap(), None);
    }
}
