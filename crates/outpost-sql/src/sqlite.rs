//! SQLite: polling on a watermark column, plus a delete check.
//!
//! Every `interval`, in one read transaction, each table is read for rows whose watermark
//! is above the last one committed (ordered by watermark, then key): a key not seen before
//! is an `insert`, a known one an `update`; on the first look every row is a `snapshot`.
//! Then the table's keys are listed: a known key that is gone is a `delete` (with only the
//! key: the row is no longer there to read).
//!
//! The known keys and each table's watermark live in this source's state file
//! (`poll-state.db` in its state folder) and change only in `committed`, so a batch that
//! was not made durable is found again by the next look.
//!
//! Limits: the watermark must grow with every insert and update (a row written later with
//! a watermark equal to or below the last one seen is missed); the delete check reads
//! every key of every table on each look.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::Value;

use crate::event::sqlite_to_json;
use crate::ident::{quote, quote_qualified};
use crate::{Batch, ChangeEvent, ChangeSource, Op, Position, Row, SourceConfig, SqlError};

/// The state file's name inside the source's state folder.
pub const STATE_FILE: &str = "poll-state.db";

#[derive(Debug, Clone)]
struct PollTable {
    config_name: String,
    key: Vec<String>,
    columns: Option<Vec<String>>,
    watermark: String,
}

/// What committing a batch changes in the state file.
#[derive(Debug, Clone, Default)]
struct Pending {
    position: String,
    tables: Vec<TableChange>,
}

#[derive(Debug, Clone)]
struct TableChange {
    table: String,
    watermark: Option<SqlValue>,
    /// The table was looked at for the first time.
    first: bool,
    added: Vec<String>,
    removed: Vec<String>,
}

/// A polling SQLite source.
pub struct SqlitePoll {
    name: String,
    db_path: PathBuf,
    state_path: PathBuf,
    tables: Vec<PollTable>,
    interval: Duration,
    pending: Option<Pending>,
}

impl SqlitePoll {
    /// Checks the database file and the tables, and opens (or creates) the state file.
    pub async fn open(
        name: &str,
        config: &SourceConfig,
        db_path: &Path,
        state_dir: &Path,
    ) -> Result<SqlitePoll, SqlError> {
        let tables: Vec<PollTable> = config
            .tables
            .iter()
            .map(|t| PollTable {
                config_name: t.name.clone(),
                key: t.key.clone(),
                columns: t.columns.clone(),
                watermark: t
                    .watermark
                    .clone()
                    .or_else(|| config.watermark.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let source = SqlitePoll {
            name: name.to_owned(),
            db_path: db_path.to_owned(),
            state_path: state_dir.join(STATE_FILE),
            tables,
            interval: config.interval,
            pending: None,
        };
        let (db_path, state_path, state_dir, tables) = (
            source.db_path.clone(),
            source.state_path.clone(),
            state_dir.to_owned(),
            source.tables.clone(),
        );
        blocking(move || {
            std::fs::create_dir_all(&state_dir).map_err(|err| SqlError::State {
                path: state_dir.clone(),
                message: err.to_string(),
            })?;
            open_state(&state_path)?;
            let db = open_source(&db_path)?;
            for table in &tables {
                let columns = table_columns(&db, table)?;
                for column in table
                    .key
                    .iter()
                    .chain(std::iter::once(&table.watermark))
                    .chain(table.columns.iter().flatten())
                {
                    if !columns.contains(column) {
                        return Err(SqlError::Table {
                            table: table.config_name.clone(),
                            message: format!("has no column {column:?}"),
                        });
                    }
                }
            }
            Ok(())
        })
        .await?;
        Ok(source)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SqlError> + Send + 'static,
) -> Result<T, SqlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| SqlError::Task(err.to_string()))?
}

fn open_source(path: &Path) -> Result<Connection, SqlError> {
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|err| SqlError::Connect {
        url: format!("sqlite:{}", path.display()),
        message: err.to_string(),
    })?;
    db.busy_timeout(Duration::from_secs(10))
        .map_err(|err| SqlError::db("set the busy timeout", err))?;
    Ok(db)
}

fn open_state(path: &Path) -> Result<Connection, SqlError> {
    let fail = |err: rusqlite::Error| SqlError::State {
        path: path.to_owned(),
        message: err.to_string(),
    };
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

fn table_columns(db: &Connection, table: &PollTable) -> Result<HashSet<String>, SqlError> {
    let sql = format!(
        "SELECT * FROM {} LIMIT 0",
        quote_qualified(&table.config_name)
    );
    let stmt = db.prepare(&sql).map_err(|err| SqlError::Table {
        table: table.config_name.clone(),
        message: err.to_string(),
    })?;
    Ok(stmt.column_names().into_iter().map(str::to_owned).collect())
}

/// One look at every table: the events and what committing them changes.
fn poll(
    name: &str,
    db_path: &Path,
    state_path: &Path,
    tables: &[PollTable],
) -> Result<(Vec<ChangeEvent>, Pending), SqlError> {
    let state = open_state(state_path)?;
    let state_err = |err: rusqlite::Error| SqlError::State {
        path: state_path.to_owned(),
        message: err.to_string(),
    };
    let mut db = open_source(db_path)?;
    let tx = db
        .transaction()
        .map_err(|err| SqlError::db("begin a read", err))?;
    let mut events = Vec::new();
    let mut pending = Pending::default();
    let mut position = BTreeMap::new();
    for table in tables {
        // Outer None: never looked at; inner None: looked at, was empty.
        let seen: Option<Option<SqlValue>> = state
            .query_row(
                "SELECT value FROM watermark WHERE tbl = ?1",
                [&table.config_name],
                |r| r.get(0),
            )
            .optional()
            .map_err(state_err)?;
        let first = seen.is_none();
        let last = seen.flatten().filter(|v| *v != SqlValue::Null);
        let mut known: HashSet<String> = {
            let mut stmt = state
                .prepare("SELECT key FROM keys WHERE tbl = ?1")
                .map_err(state_err)?;
            let rows = stmt
                .query_map([&table.config_name], |r| r.get::<_, String>(0))
                .map_err(state_err)?;
            rows.collect::<Result<_, _>>().map_err(state_err)?
        };
        let read_err =
            |err: rusqlite::Error| SqlError::db(format!("read table {}", table.config_name), err);
        let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
        let wm = quote(&table.watermark);
        let mut sql = format!("SELECT * FROM {}", quote_qualified(&table.config_name));
        if last.is_some() {
            sql.push_str(&format!(" WHERE {wm} > ?1"));
        }
        sql.push_str(&format!(" ORDER BY {wm}, {}", keys.join(", ")));
        let mut stmt = tx.prepare(&sql).map_err(read_err)?;
        let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        let wm_index = names
            .iter()
            .position(|n| n == &table.watermark)
            .ok_or_else(|| SqlError::Table {
                table: table.config_name.clone(),
                message: format!("has no column {:?}", table.watermark),
            })?;
        let mut rows = match &last {
            Some(last) => stmt.query(params![last]),
            None => stmt.query([]),
        }
        .map_err(read_err)?;
        let mut change = TableChange {
            table: table.config_name.clone(),
            watermark: None,
            first,
            added: Vec::new(),
            removed: Vec::new(),
        };
        while let Some(row) = rows.next().map_err(read_err)? {
            let mut after = Row::new();
            for (i, column) in names.iter().enumerate() {
                let wanted = table
                    .columns
                    .as_ref()
                    .is_none_or(|cols| cols.contains(column) || table.key.contains(column));
                if wanted {
                    let value = row.get_ref(i).map_err(read_err)?;
                    after.insert(column.clone(), sqlite_to_json(value));
                }
            }
            let watermark: SqlValue = row.get(wm_index).map_err(read_err)?;
            let key: Row = table
                .key
                .iter()
                .map(|k| (k.clone(), after.get(k).cloned().unwrap_or(Value::Null)))
                .collect();
            let key_text = serde_json::to_string(&key).unwrap_or_default();
            let op = if first {
                Op::Snapshot
            } else if known.contains(&key_text) {
                Op::Update
            } else {
                Op::Insert
            };
            if known.insert(key_text.clone()) {
                change.added.push(key_text);
            }
            events.push(ChangeEvent {
                source: name.to_owned(),
                table: table.config_name.clone(),
                op,
                key: key.clone(),
                before: (op == Op::Update).then_some(key),
                after: Some(after),
                position: Some(watermark_text(&watermark)),
                tx: None,
                commit_time: None,
                id: None,
            });
            change.watermark = Some(watermark);
        }
        drop(rows);
        drop(stmt);
        if !first {
            let sql = format!(
                "SELECT {} FROM {}",
                keys.join(", "),
                quote_qualified(&table.config_name)
            );
            let mut stmt = tx.prepare(&sql).map_err(read_err)?;
            let mut rows = stmt.query([]).map_err(read_err)?;
            let mut present = HashSet::new();
            while let Some(row) = rows.next().map_err(read_err)? {
                let mut key = Row::new();
                for (i, k) in table.key.iter().enumerate() {
                    key.insert(k.clone(), sqlite_to_json(row.get_ref(i).map_err(read_err)?));
                }
                present.insert(serde_json::to_string(&key).unwrap_or_default());
            }
            let mut gone: Vec<&String> = known.difference(&present).collect();
            gone.sort();
            for key_text in gone {
                let key: Row = serde_json::from_str(key_text).unwrap_or_default();
                events.push(ChangeEvent {
                    source: name.to_owned(),
                    table: table.config_name.clone(),
                    op: Op::Delete,
                    key: key.clone(),
                    before: Some(key),
                    after: None,
                    position: None,
                    tx: None,
                    commit_time: None,
                    id: None,
                });
                change.removed.push(key_text.clone());
            }
        }
        let watermark = change.watermark.clone().or(last);
        change.watermark = watermark.clone();
        position.insert(
            table.config_name.clone(),
            watermark
                .as_ref()
                .map_or(Value::Null, |w| Value::String(watermark_text(w))),
        );
        pending.tables.push(change);
    }
    pending.position = serde_json::to_string(&position).unwrap_or_default();
    Ok((events, pending))
}

fn watermark_text(value: &SqlValue) -> String {
    match value {
        SqlValue::Null => String::new(),
        SqlValue::Integer(n) => n.to_string(),
        SqlValue::Real(f) => f.to_string(),
        SqlValue::Text(t) => t.clone(),
        SqlValue::Blob(b) => hex::encode(b),
    }
}

fn apply(state_path: &Path, pending: &Pending) -> Result<(), SqlError> {
    let state_err = |err: rusqlite::Error| SqlError::State {
        path: state_path.to_owned(),
        message: err.to_string(),
    };
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

#[async_trait::async_trait]
impl ChangeSource for SqlitePoll {
    async fn next_batch(&mut self) -> Result<Batch, SqlError> {
        loop {
            let (name, db_path, state_path, tables) = (
                self.name.clone(),
                self.db_path.clone(),
                self.state_path.clone(),
                self.tables.clone(),
            );
            let (events, pending) =
                blocking(move || poll(&name, &db_path, &state_path, &tables)).await?;
            if events.is_empty() && !pending.tables.iter().any(|t| t.first) {
                // Nothing changed: a table seen for the first time and empty still has
                // nothing to record; look again later.
                tokio::time::sleep(self.interval).await;
                continue;
            }
            let position = Position(pending.position.clone());
            self.pending = Some(pending);
            return Ok(Batch { events, position });
        }
    }

    async fn committed(&mut self, position: &Position) -> Result<(), SqlError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        if pending.position != position.0 {
            return Err(SqlError::Position(
                "committed a position this source did not hand out last".into(),
            ));
        }
        let state_path = self.state_path.clone();
        blocking(move || apply(&state_path, &pending)).await
    }
}
