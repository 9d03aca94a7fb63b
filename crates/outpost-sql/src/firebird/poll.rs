//! Firebird `mode = "poll"`: the fallback where triggers may not be installed. Nothing is
//! created in the database; the source only reads.
//!
//! Every `interval`, in one read-only `SNAPSHOT` transaction, each table is read for rows
//! whose watermark column (a `TIMESTAMP`, or a growing integer such as a generator-fed
//! column) is above the last one committed, ordered by watermark, then key; then the
//! table's keys are listed for the delete check. The decision (first look `snapshot`, new
//! key `insert`, known key `update` with only the key in `before`, vanished key `delete`)
//! and the state file of known keys and watermarks are the SQLite poller's (`poll.rs`):
//! the state changes only in `committed`, so a batch not made durable is found again.
//!
//! Values are read and mapped exactly as the trigger capture's snapshot reads them
//! (`value.rs`). The watermark is kept as Firebird's own text form of the value and bound
//! back as text, so nothing is lost to a conversion.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rsfbclient_core::SqlType;
use rsfbclient_rust::TrHandle;
use rusqlite::types::Value as SqlValue;
use serde_json::Value;

use super::conn::{column_i64, column_text, FbConn, TxKind};
use super::ddl::{self, FbColumn, FbTable};
use super::value::{text_to_json, to_json, FbKind};
use super::{connect, key_of, select_list};
use crate::ident::quote;
use crate::poll::{blocking, create_state, key_text, open_state, Pending, TableLook};
use crate::{Batch, ChangeEvent, ChangeSource, Position, Row, SourceConfig, SqlError};

/// A captured table and its watermark column.
#[derive(Debug, Clone)]
struct PollTable {
    table: FbTable,
    watermark: FbColumn,
}

/// A polling Firebird source.
pub struct FbPoll {
    name: String,
    config: SourceConfig,
    conn: Option<FbConn>,
    tables: Arc<Vec<PollTable>>,
    state_path: PathBuf,
    interval: Duration,
    pending: Option<Pending>,
}

impl FbPoll {
    /// Connects, checks the tables and their watermark columns, and opens (or creates) the
    /// state file in `state_dir`. Installs nothing in the database.
    pub async fn open(
        name: &str,
        config: &SourceConfig,
        state_dir: &Path,
    ) -> Result<FbPoll, SqlError> {
        let state_path = state_dir.join(crate::poll::STATE_FILE);
        let (dir, path) = (state_dir.to_owned(), state_path.clone());
        blocking(move || create_state(&dir, &path)).await?;
        let checked = config.clone();
        let source_name = name.to_owned();
        let (conn, tables) = blocking(move || {
            let mut conn = connect(&checked)?;
            let tables = conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
                let tables = ddl::resolve_tables(conn, tr, &checked)?;
                ddl::refuse_nullable_keys(conn, tr, &source_name, &checked, &tables)?;
                let mut out = Vec::with_capacity(tables.len());
                for (table, configured) in tables.into_iter().zip(&checked.tables) {
                    let wanted = configured
                        .watermark
                        .as_ref()
                        .or(checked.watermark.as_ref())
                        .ok_or_else(|| {
                            SqlError::Config(format!(
                                "tables: mode = \"poll\" needs a watermark column (for table {:?}, or `watermark` for all)",
                                table.config_name
                            ))
                        })?;
                    let watermark = watermark_column(conn, tr, &table, wanted)?;
                    out.push(PollTable { table, watermark });
                }
                Ok(out)
            });
            match tables {
                Ok(tables) => Ok((conn, tables)),
                Err(err) => {
                    conn.close();
                    Err(err)
                }
            }
        })
        .await?;
        Ok(FbPoll {
            name: name.to_owned(),
            config: config.clone(),
            conn: Some(conn),
            tables: Arc::new(tables),
            state_path,
            interval: config.interval,
            pending: None,
        })
    }

    /// One look, on the connection (reconnecting if an earlier look lost it).
    async fn look(&mut self) -> Result<(Vec<ChangeEvent>, Pending), SqlError> {
        let conn = self.conn.take();
        let (name, config, state_path, tables) = (
            self.name.clone(),
            self.config.clone(),
            self.state_path.clone(),
            self.tables.clone(),
        );
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(conn) => conn,
                None => match connect(&config) {
                    Ok(conn) => conn,
                    Err(err) => return (None, Err(err)),
                },
            };
            let result = look(&name, &mut conn, &state_path, &tables);
            (Some(conn), result)
        })
        .await
        .map_err(|err| SqlError::Task(err.to_string()))?;
        match (conn, &result) {
            (Some(conn), Ok(_)) => self.conn = Some(conn),
            // The connection may be broken: start over with a new one next time.
            (Some(conn), Err(_)) => conn.close(),
            (None, _) => {}
        }
        result
    }
}

#[async_trait::async_trait]
impl ChangeSource for FbPoll {
    async fn next_batch(&mut self) -> Result<Batch, SqlError> {
        loop {
            let (events, pending) = self.look().await?;
            if !pending.worth_a_batch(&events) {
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

impl Drop for FbPoll {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close();
        }
    }
}

/// Looks up the watermark column `wanted` of `table` (it need not be a captured column)
/// and checks that it can grow: an integer, exact decimal, `DATE` or `TIMESTAMP`.
fn watermark_column(
    conn: &mut FbConn,
    tr: &mut TrHandle,
    table: &FbTable,
    wanted: &str,
) -> Result<FbColumn, SqlError> {
    let rows = conn.query(
        tr,
        "SELECT TRIM(rf.RDB$FIELD_NAME), f.RDB$FIELD_TYPE, COALESCE(f.RDB$FIELD_SUB_TYPE, 0), \
         COALESCE(f.RDB$FIELD_SCALE, 0), COALESCE(f.RDB$CHARACTER_SET_ID, 0) \
         FROM RDB$RELATION_FIELDS rf JOIN RDB$FIELDS f ON f.RDB$FIELD_NAME = rf.RDB$FIELD_SOURCE \
         WHERE rf.RDB$RELATION_NAME = ? ORDER BY rf.RDB$FIELD_POSITION",
        vec![SqlType::Text(table.relation.clone())],
        &format!("look up the columns of table {}", table.config_name),
    )?;
    let mut found = Vec::new();
    for row in &rows {
        let text = |i: usize| row.get(i).and_then(column_text).and_then(Result::ok);
        let int = |i: usize| row.get(i).and_then(column_i64).unwrap_or(0);
        let Some(name) = text(0) else { continue };
        if ddl::names(wanted, &name) {
            found.push((name, FbKind::from_rdb(int(1), int(2), int(3), int(4))));
        }
    }
    let (name, kind) = found
        .iter()
        .find(|(name, _)| name == wanted)
        .or_else(|| found.first())
        .cloned()
        .ok_or_else(|| SqlError::Table {
            table: table.config_name.clone(),
            message: format!("has no watermark column {wanted:?}"),
        })?;
    match kind {
        Some(kind @ (FbKind::Int | FbKind::Decimal | FbKind::Date | FbKind::Timestamp)) => {
            Ok(FbColumn {
                event_name: ddl::event_name(&name),
                name,
                kind,
            })
        }
        other => Err(SqlError::Table {
            table: table.config_name.clone(),
            message: format!(
                "watermark column {wanted:?} is {}; expected a TIMESTAMP or a growing integer",
                other.map_or_else(|| "of an unreadable type".to_owned(), |k| format!("{k:?}"))
            ),
        }),
    }
}

/// A watermark (Firebird's text form) as events and positions show it.
fn shown(kind: FbKind, text: &str) -> String {
    match text_to_json(kind, text) {
        Value::String(text) => text,
        other => other.to_string(),
    }
}

/// One look at every table, in one snapshot: the events and what committing them changes.
fn look(
    name: &str,
    conn: &mut FbConn,
    state_path: &Path,
    tables: &[PollTable],
) -> Result<(Vec<ChangeEvent>, Pending), SqlError> {
    let state = open_state(state_path)?;
    conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
        let mut events = Vec::new();
        let mut pending = Pending::default();
        let mut position = BTreeMap::new();
        for spec in tables {
            let table = &spec.table;
            let context = format!("read table {}", table.config_name);
            let mut look = TableLook::load(&state, state_path, name, &table.config_name)?;
            let wm = quote(&spec.watermark.name);
            let keys: Vec<String> = table
                .key
                .iter()
                .filter_map(|&i| table.columns.get(i))
                .map(|c| quote(&c.name))
                .collect();
            let mut select = select_list(table);
            select.push(spec.watermark.kind.select_expr(&wm));
            let mut sql = format!("SELECT {} FROM {}", select.join(", "), table.quoted());
            let mut params = Vec::new();
            if let Some(last) = look.last() {
                let SqlValue::Text(last) = last else {
                    return Err(SqlError::State {
                        path: state_path.to_owned(),
                        message: format!(
                            "the watermark of table {} is not Firebird's (the state folder belongs to another source?)",
                            table.config_name
                        ),
                    });
                };
                sql.push_str(&format!(" WHERE {wm} > ?"));
                params.push(SqlType::Text(last.clone()));
            }
            sql.push_str(&format!(" ORDER BY {wm}, {}", keys.join(", ")));
            let rows = conn.query(tr, &sql, params, &context)?;
            let count = table.columns.len();
            for row in &rows {
                let mut after = Row::new();
                for (column, value) in table.columns.iter().zip(row.iter().take(count)) {
                    after.insert(column.event_name.clone(), to_json(column.kind, column_text(value)));
                }
                let watermark = row.get(count).and_then(column_text).and_then(Result::ok);
                let position = watermark
                    .as_deref()
                    .map(|text| shown(spec.watermark.kind, text));
                let key = key_of(table, &after);
                events.push(look.row(key, after, watermark.map(SqlValue::Text), position));
            }
            if !look.is_first() {
                let key_columns: Vec<&FbColumn> = table
                    .key
                    .iter()
                    .filter_map(|&i| table.columns.get(i))
                    .collect();
                let select: Vec<String> = key_columns
                    .iter()
                    .map(|c| c.kind.select_expr(&quote(&c.name)))
                    .collect();
                let sql = format!("SELECT {} FROM {}", select.join(", "), table.quoted());
                let rows = conn.query(tr, &sql, Vec::new(), &context)?;
                let mut present = HashSet::with_capacity(rows.len());
                for row in &rows {
                    let key: Row = key_columns
                        .iter()
                        .zip(row)
                        .map(|(c, value)| (c.event_name.clone(), to_json(c.kind, column_text(value))))
                        .collect();
                    present.insert(key_text(&key));
                }
                events.extend(look.deletes(&present));
            }
            let kind = spec.watermark.kind;
            look.finish(&mut position, &mut pending, |w| match w {
                SqlValue::Text(text) => shown(kind, text),
                _ => String::new(),
            });
        }
        pending.position = crate::poll::position_text(&position);
        Ok((events, pending))
    })
}
