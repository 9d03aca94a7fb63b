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
use rusqlite::{params, Connection, OpenFlags};
use serde_json::Value;

use crate::event::sqlite_to_json;
use crate::ident::{quote, quote_qualified, split_qualified};
use crate::poll::{blocking, create_state, key_text, open_state, Pending, TableLook};
use crate::{Batch, ChangeEvent, ChangeSource, Position, Row, SourceConfig, SqlError};

/// The state file's name inside the source's state folder.
pub use crate::poll::STATE_FILE;

#[derive(Debug, Clone)]
struct PollTable {
    config_name: String,
    key: Vec<String>,
    columns: Option<Vec<String>>,
    watermark: String,
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
        let (db_path, state_path, state_dir, tables, source_name) = (
            source.db_path.clone(),
            source.state_path.clone(),
            state_dir.to_owned(),
            source.tables.clone(),
            name.to_owned(),
        );
        blocking(move || {
            create_state(&state_dir, &state_path)?;
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
                // A NULL key names no row: the delete check and the state file of known
                // keys could not tell such rows apart.
                let nullable = nullable_columns(&db, table)?;
                SqlError::refuse_nullable_key(&source_name, &table.config_name, &table.key, |c| {
                    nullable.contains(c)
                })?;
            }
            Ok(())
        })
        .await?;
        Ok(source)
    }
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

/// The columns of `table` that may hold NULL. A column declared NOT NULL may not, and
/// neither may the rowid alias (an `INTEGER PRIMARY KEY` of a rowid table, even without
/// NOT NULL); any other PRIMARY KEY column of a rowid table may, as SQLite keeps a
/// historical quirk (a WITHOUT ROWID table's PRIMARY KEY columns report NOT NULL).
fn nullable_columns(db: &Connection, table: &PollTable) -> Result<HashSet<String>, SqlError> {
    let (schema, name) = split_qualified(&table.config_name);
    let failed = |err: rusqlite::Error| SqlError::Table {
        table: table.config_name.clone(),
        message: format!("read the column definitions: {err}"),
    };
    let mut stmt = db
        .prepare("SELECT name, \"notnull\", pk FROM pragma_table_info(?1, ?2)")
        .map_err(failed)?;
    let columns: Vec<(String, bool, i64)> = stmt
        .query_map(params![name, schema], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .map_err(failed)?
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    // Every PRIMARY KEY but the rowid alias is backed by an index of origin `pk`.
    let pk_index: bool = db
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_index_list(?1, ?2) WHERE origin = 'pk')",
            params![name, schema],
            |row| row.get(0),
        )
        .map_err(failed)?;
    let pk_columns = columns.iter().filter(|(_, _, pk)| *pk > 0).count();
    let rowid_alias = !pk_index && pk_columns == 1;
    Ok(columns
        .into_iter()
        .filter(|(_, not_null, pk)| {
            let is_rowid = rowid_alias && *pk > 0;
            !(*not_null || is_rowid)
        })
        .map(|(name, _, _)| name)
        .collect())
}

/// One look at every table: the events and what committing them changes.
fn poll(
    name: &str,
    db_path: &Path,
    state_path: &Path,
    tables: &[PollTable],
) -> Result<(Vec<ChangeEvent>, Pending), SqlError> {
    let state = open_state(state_path)?;
    let mut db = open_source(db_path)?;
    let tx = db
        .transaction()
        .map_err(|err| SqlError::db("begin a read", err))?;
    let mut events = Vec::new();
    let mut pending = Pending::default();
    let mut position = BTreeMap::new();
    for table in tables {
        let mut look = TableLook::load(&state, state_path, name, &table.config_name)?;
        let read_err =
            |err: rusqlite::Error| SqlError::db(format!("read table {}", table.config_name), err);
        let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
        let wm = quote(&table.watermark);
        let mut sql = format!("SELECT * FROM {}", quote_qualified(&table.config_name));
        if look.last().is_some() {
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
        let mut rows = match look.last() {
            Some(last) => stmt.query(params![last]),
            None => stmt.query([]),
        }
        .map_err(read_err)?;
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
            let shown = watermark_text(&watermark);
            events.push(look.row(key, after, Some(watermark), Some(shown)));
        }
        drop(rows);
        drop(stmt);
        if !look.is_first() {
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
                present.insert(key_text(&key));
            }
            events.extend(look.deletes(&present));
        }
        look.finish(&mut position, &mut pending, watermark_text);
    }
    pending.position = crate::poll::position_text(&position);
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
            if !pending.worth_a_batch(&events) {
                // Nothing changed: a table seen for the first time and empty still has
                // nothing to record; look again later.
                tokio::time::sleep(self.interval).await;
                continue;
            }
            let position = Position(pending.position.clone());
            self.pending = Some(pending);
            return Ok(Batch {
                encoded: None,
                events,
                position,
            });
        }
    }

    async fn committed(&mut self, position: &Position) -> Result<(), SqlError> {
        crate::poll::commit(&mut self.pending, &self.state_path, position).await
    }
}
