//! What every polling source shares (SQLite, Firebird `mode = "poll"`): the state file of
//! known keys and watermarks, and the insert/update/snapshot/delete decision.
//!
//! Each look at a table starts from its [`TableLook`] (loaded from the state file): a row
//! whose key was never seen is an `insert`, a known one an `update` (with only the key in
//! `before`), and on the table's first look every row is a `snapshot`. After the rows, the
//! table's present keys are handed in: a known key that is gone is a `delete`. What the
//! look found is recorded in a [`Pending`] and written to the state file only by
//! [`apply`], which the source calls from `committed`, so a batch that was not made
//! durable is found again by the next look.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::{ChangeEvent, Op, Position, Row, SqlError};

/// The state file's name inside the source's state folder.
pub const STATE_FILE: &str = "poll-state.db";

/// What committing a batch changes in the state file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pending {
    pub(crate) position: String,
    pub(crate) tables: Vec<TableChange>,
}

impl Pending {
    /// Whether a batch is worth handing out: it has events, or a table was looked at for
    /// the first time (an empty table still has its first look to record).
    pub(crate) fn worth_a_batch(&self, events: &[ChangeEvent]) -> bool {
        !events.is_empty() || self.tables.iter().any(|t| t.first)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TableChange {
    table: String,
    watermark: Option<SqlValue>,
    /// The table was looked at for the first time.
    first: bool,
    added: Vec<String>,
    removed: Vec<String>,
}

/// Opens (or creates) the state file, readable by the agent alone.
pub(crate) fn open_state(path: &Path) -> Result<Connection, SqlError> {
    let fail = |err: rusqlite::Error| state_error(path, err);
    let db = Connection::open(path).map_err(fail)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS watermark (tbl TEXT PRIMARY KEY, value);
         CREATE TABLE IF NOT EXISTS keys (tbl TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (tbl, key)) WITHOUT ROWID;",
    )
    .map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Keys may be patient numbers: the file is the agent's alone.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(db)
}

/// Creates the state folder and the state file.
pub(crate) fn create_state(state_dir: &Path, state_path: &Path) -> Result<(), SqlError> {
    std::fs::create_dir_all(state_dir).map_err(|err| SqlError::State {
        path: state_dir.to_owned(),
        message: err.to_string(),
    })?;
    open_state(state_path).map(drop)
}

fn state_error(path: &Path, err: rusqlite::Error) -> SqlError {
    SqlError::State {
        path: path.to_owned(),
        message: err.to_string(),
    }
}

/// A key as the state file stores it.
pub(crate) fn key_text(key: &Row) -> String {
    serde_json::to_string(key).unwrap_or_default()
}

/// One look at one table: what the state file knew, and what this look found.
pub(crate) struct TableLook {
    source: String,
    table: String,
    first: bool,
    last: Option<SqlValue>,
    known: HashSet<String>,
    change: TableChange,
}

impl TableLook {
    /// What the state file knows of `table` (as configured).
    pub(crate) fn load(
        state: &Connection,
        state_path: &Path,
        source: &str,
        table: &str,
    ) -> Result<TableLook, SqlError> {
        let state_err = |err: rusqlite::Error| state_error(state_path, err);
        // Outer None: never looked at; inner None: looked at, was empty.
        let seen: Option<Option<SqlValue>> = state
            .query_row("SELECT value FROM watermark WHERE tbl = ?1", [table], |r| {
                r.get(0)
            })
            .optional()
            .map_err(state_err)?;
        let first = seen.is_none();
        let last = seen.flatten().filter(|v| *v != SqlValue::Null);
        let known: HashSet<String> = {
            let mut stmt = state
                .prepare("SELECT key FROM keys WHERE tbl = ?1")
                .map_err(state_err)?;
            let rows = stmt
                .query_map([table], |r| r.get::<_, String>(0))
                .map_err(state_err)?;
            rows.collect::<Result<_, _>>().map_err(state_err)?
        };
        Ok(TableLook {
            source: source.to_owned(),
            table: table.to_owned(),
            first,
            last: last.clone(),
            known,
            change: TableChange {
                table: table.to_owned(),
                watermark: None,
                first,
                added: Vec::new(),
                removed: Vec::new(),
            },
        })
    }

    /// The last committed watermark; `None` on a first look (read every row) or while the
    /// table has been empty.
    pub(crate) fn last(&self) -> Option<&SqlValue> {
        self.last.as_ref()
    }

    /// Whether this is the table's first look (every row is a `snapshot`, and there is no
    /// delete check).
    pub(crate) fn is_first(&self) -> bool {
        self.first
    }

    /// A row read above the watermark (in watermark, key order): its event. `position` is
    /// the watermark as the event shows it; `watermark` as the state file keeps it (`None`
    /// for a NULL watermark, which does not move it).
    pub(crate) fn row(
        &mut self,
        key: Row,
        after: Row,
        watermark: Option<SqlValue>,
        position: Option<String>,
    ) -> ChangeEvent {
        let text = key_text(&key);
        let op = if self.first {
            Op::Snapshot
        } else if self.known.contains(&text) {
            Op::Update
        } else {
            Op::Insert
        };
        if self.known.insert(text.clone()) {
            self.change.added.push(text);
        }
        if let Some(watermark) = watermark {
            self.change.watermark = Some(watermark);
        }
        ChangeEvent {
            source: self.source.clone(),
            table: self.table.clone(),
            op,
            key: key.clone(),
            before: (op == Op::Update).then_some(key),
            after: Some(after),
            position,
            tx: None,
            commit_time: None,
            id: None,
        }
    }

    /// The delete check, given every key the table holds now (as [`key_text`]): a
    /// `delete` (with only the key) for each known key that is gone, in key-text order.
    pub(crate) fn deletes(&mut self, present: &HashSet<String>) -> Vec<ChangeEvent> {
        let mut gone: Vec<String> = self.known.difference(present).cloned().collect();
        gone.sort();
        let mut events = Vec::with_capacity(gone.len());
        for text in gone {
            let key: Row = serde_json::from_str(&text).unwrap_or_default();
            events.push(ChangeEvent {
                source: self.source.clone(),
                table: self.table.clone(),
                op: Op::Delete,
                key: key.clone(),
                before: Some(key),
                after: None,
                position: None,
                tx: None,
                commit_time: None,
                id: None,
            });
            self.known.remove(&text);
            self.change.removed.push(text);
        }
        events
    }

    /// Ends the look: records the table's watermark (shown by `show`) in `position` and
    /// its change in `pending`.
    pub(crate) fn finish(
        mut self,
        position: &mut BTreeMap<String, Value>,
        pending: &mut Pending,
        show: impl Fn(&SqlValue) -> String,
    ) {
        let watermark = self.change.watermark.take().or(self.last);
        position.insert(
            self.table.clone(),
            watermark
                .as_ref()
                .map_or(Value::Null, |w| Value::String(show(w))),
        );
        self.change.watermark = watermark;
        pending.tables.push(self.change);
    }
}

/// The position of a look: each table's watermark, as JSON.
pub(crate) fn position_text(position: &BTreeMap<String, Value>) -> String {
    serde_json::to_string(position).unwrap_or_default()
}

/// Writes what a committed batch changed to the state file, in one transaction.
pub(crate) fn apply(state_path: &Path, pending: &Pending) -> Result<(), SqlError> {
    let state_err = |err: rusqlite::Error| state_error(state_path, err);
    let mut state = open_state(state_path)?;
    let tx = state.transaction().map_err(state_err)?;
    for change in &pending.tables {
        if change.watermark.is_some() || change.first {
            let watermark = change.watermark.clone().unwrap_or(SqlValue::Null);
            tx.execute(
                "INSERT INTO watermark (tbl, value) VALUES (?1, ?2)
                 ON CONFLICT (tbl) DO UPDATE SET value = excluded.value",
                params![change.table, watermark],
            )
            .map_err(state_err)?;
        }
        for key in &change.added {
            tx.execute(
                "INSERT OR IGNORE INTO keys (tbl, key) VALUES (?1, ?2)",
                params![change.table, key],
            )
            .map_err(state_err)?;
        }
        for key in &change.removed {
            tx.execute(
                "DELETE FROM keys WHERE tbl = ?1 AND key = ?2",
                params![change.table, key],
            )
            .map_err(state_err)?;
        }
    }
    tx.commit().map_err(state_err)
}

/// `committed` for a polling source: checks that `position` is the one handed out last
/// and writes its changes to the state file.
pub(crate) async fn commit(
    pending: &mut Option<Pending>,
    state_path: &Path,
    position: &Position,
) -> Result<(), SqlError> {
    let Some(taken) = pending.take() else {
        return Ok(());
    };
    if taken.position != position.0 {
        return Err(SqlError::Position(
            "committed a position this source did not hand out last".into(),
        ));
    }
    let state_path = state_path.to_owned();
    blocking(move || apply(&state_path, &taken)).await
}

/// Runs `f` on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SqlError> + Send + 'static,
) -> Result<T, SqlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| SqlError::Task(err.to_string()))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn key(n: i64) -> Row {
        let mut row = Row::new();
        row.insert("id".into(), json!(n));
        row
    }

    fn look(state: &Connection, path: &Path) -> TableLook {
        TableLook::load(state, path, "src", "t").unwrap()
    }

    #[test]
    fn first_look_is_a_snapshot_then_inserts_updates_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let state = open_state(&path).unwrap();

        let mut first = look(&state, &path);
        assert!(first.is_first() && first.last().is_none());
        let event = first.row(key(1), key(1), Some(SqlValue::Integer(5)), None);
        assert_eq!((event.op, event.before), (Op::Snapshot, None));
        let mut position = BTreeMap::new();
        let mut pending = Pending::default();
        first.finish(&mut position, &mut pending, |_| "5".into());
        assert!(pending.worth_a_batch(&[]));
        // Not committed: the next look is a first look again.
        assert!(look(&state, &path).is_first());
        apply(&path, &pending).unwrap();

        let mut next = look(&state, &path);
        assert_eq!(next.last(), Some(&SqlValue::Integer(5)));
        let update = next.row(key(1), key(1), Some(SqlValue::Integer(6)), None);
        assert_eq!(update.op, Op::Update);
        assert_eq!(update.before, Some(key(1)));
        assert_eq!(next.row(key(2), key(2), None, None).op, Op::Insert);
        let present: HashSet<String> = [key_text(&key(2))].into_iter().collect();
        let deletes = next.deletes(&present);
        assert_eq!(deletes.len(), 1);
        assert_eq!((deletes[0].op, &deletes[0].key), (Op::Delete, &key(1)));
        let mut pending = Pending::default();
        next.finish(&mut BTreeMap::new(), &mut pending, |_| String::new());
        apply(&path, &pending).unwrap();

        let after = look(&state, &path);
        assert_eq!(after.last(), Some(&SqlValue::Integer(6)));
        assert_eq!(
            after.known,
            [key_text(&key(2))].into_iter().collect::<HashSet<_>>()
        );
    }
}
