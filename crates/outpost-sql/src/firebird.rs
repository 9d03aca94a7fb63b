//! Firebird change capture (Office Practicum's database): Firebird keeps no change log
//! a client can read, so the agent installs, only when asked, a change table and one
//! trigger per captured table (`ddl.rs`; `outpost sql install-triggers --print` shows the
//! script first), then reads and trims that table.
//!
//! URL: `firebird://user:password@host:port//absolute/path/db.fdb` (the database is the
//! URL path after the first `/`: an absolute server path, `C:/…` on Windows, or an alias
//! from `databases.conf`; see [`FbUrl`]). `mode = "cdc"` is the trigger capture below;
//! `mode = "poll"` is the fallback that installs nothing: a watermark column plus a delete
//! check, like SQLite's (`poll.rs`).
//!
//! Stream: every 200 ms a read-only `SNAPSHOT` transaction lists the transactions
//! (`TX` = `CURRENT_TRANSACTION` of the writer) that have rows in `OUTPOST_CHANGES` for the
//! captured tables. A snapshot transaction sees a writer's rows all or none, so each
//! listed transaction is complete. Transactions are emitted in the order of their last
//! change id, one batch each: a transaction that waited for another's row lock changes
//! that row after the other committed, so its last id is the greater one; commit order is
//! kept wherever two transactions touched the same row. A batch's position names its
//! transaction and last change id; `committed` deletes exactly that transaction's rows
//! (`TX = t AND ID <= last`), never a range of ids, so a slow transaction with lower ids
//! that commits later is still read. The change table only ever holds what the agent has
//! not yet made durable.
//!
//! Initial snapshot: the triggers must be installed first (the source refuses to start
//! otherwise). On a first start the source
//! 1. deletes the change rows of the captured tables that are already committed (their
//!    effects are in the snapshot about to be taken);
//! 2. starts one `SNAPSHOT` (concurrency) transaction and, in it, lists the transactions
//!    that still have change rows it can see: they committed between step 1 and the
//!    snapshot, so their effects are in the snapshot. That list (`seen`) is kept in the
//!    position;
//! 3. reads each table in key order, `chunk_rows` at a time, one batch per chunk whose
//!    position names the last key read.
//!
//! The rule afterwards: a change row whose `TX` is in `seen` is skipped (and trimmed); any
//! other was made by a transaction the snapshot did not see (in flight when it started,
//! or later), so it is streamed. A transaction is either wholly visible to a snapshot or
//! not at all, so nothing is missed and nothing is applied twice. A snapshot resumed after
//! a restart runs in a new transaction and keeps the first `seen`: rows changed in between
//! show in the rest of the snapshot and again in the stream, in order (as for PostgreSQL).
//!
//! Values: see `value.rs`; `before` is the whole old row (the trigger has it), `commit_time`
//! is null (Firebird 3 does not expose it), `tx` is the writer's transaction number.

pub(crate) mod conn;
pub mod ddl;
pub mod poll;
pub mod value;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rsfbclient_core::SqlType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use conn::FbUrl;
use conn::{column_i64, column_text, FbConn, TxKind};
use ddl::{FbTable, BLOB_TABLE, CHANGE_TABLE};
use value::{to_json, FbKind};

use crate::ident::quote;
use crate::{Batch, ChangeEvent, ChangeSource, Mode, Op, Position, Row, SourceConfig, SqlError};

/// How long an idle stream waits between reads of the change table.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// What the position string holds (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    /// `snapshot` or `stream`.
    phase: String,
    /// Transactions whose changes the first snapshot already holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<i64>,
    /// Snapshot: the table being read (index into the config's tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<usize>,
    /// Snapshot: the last key read in that table (text forms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<Vec<String>>,
    /// Stream: `(transaction, last change id)` whose change rows may be deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    trim: Vec<(i64, i64)>,
    /// Stream: the last change id of the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<i64>,
}

enum Phase {
    Snapshot {
        table: usize,
        after: Option<Vec<String>>,
        /// No position was stored: the snapshot starts from scratch (step 1 runs).
        fresh: bool,
    },
    Stream,
}

/// A Firebird trigger-capture source.
pub struct FbSource {
    name: String,
    conn: Option<FbConn>,
    tables: Arc<Vec<FbTable>>,
    phase: Phase,
    seen: HashSet<i64>,
    /// Batches read and not yet handed out.
    ready: std::collections::VecDeque<Batch>,
    chunk_rows: u32,
    max_changes: u32,
}

impl FbSource {
    /// Connects, checks the tables and the installed capture, and prepares to resume from
    /// `resume` (or to take a snapshot).
    pub async fn open(
        name: &str,
        config: &SourceConfig,
        resume: Option<Position>,
    ) -> Result<FbSource, SqlError> {
        if config.mode == Mode::Poll {
            return Err(SqlError::Config(
                "mode: \"poll\" is opened by `firebird::poll::FbPoll` (as `outpost_sql::open` does); `FbSource` is the trigger capture".into(),
            ));
        }
        let stored = match resume {
            Some(Position(text)) => Some(
                serde_json::from_str::<Stored>(&text)
                    .map_err(|err| SqlError::Position(err.to_string()))?,
            ),
            None => None,
        };
        let (chunk_rows, max_changes) = (config.chunk_rows, config.max_changes);
        let config = config.clone();
        let source_name = name.to_owned();
        let (conn, tables) = blocking(move || {
            let mut conn = connect(&config)?;
            let checked = conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
                let tables = ddl::resolve_tables(conn, tr, &config)?;
                ddl::refuse_nullable_keys(conn, tr, &source_name, &config, &tables)?;
                let installed = ddl::installed(conn, tr)?;
                if !(installed.sequence && installed.change_table && installed.blob_table) {
                    return Err(SqlError::Config(format!(
                        "source {source_name}: the change table {CHANGE_TABLE} is not installed; run `outpost sql install-triggers --config FILE --source {source_name}` (add --print to read the script first)"
                    )));
                }
                let missing = ddl::missing_triggers(conn, tr, &tables)?;
                if !missing.is_empty() {
                    return Err(SqlError::Config(format!(
                        "source {source_name}: no active capture trigger on table(s) {}; run `outpost sql install-triggers --config FILE --source {source_name}`",
                        missing.join(", ")
                    )));
                }
                Ok(tables)
            });
            match checked {
                Ok(tables) => Ok((conn, tables)),
                Err(err) => {
                    conn.close();
                    Err(err)
                }
            }
        })
        .await?;
        let mut source = FbSource {
            name: name.to_owned(),
            conn: Some(conn),
            tables: Arc::new(tables),
            phase: Phase::Snapshot {
                table: 0,
                after: None,
                fresh: true,
            },
            seen: HashSet::new(),
            ready: std::collections::VecDeque::new(),
            chunk_rows,
            max_changes,
        };
        if let Some(stored) = stored {
            source.seen = stored.seen.iter().copied().collect();
            match (stored.phase.as_str(), stored.table) {
                ("snapshot", Some(table)) => {
                    tracing::info!(table, "resuming the snapshot");
                    source.phase = Phase::Snapshot {
                        table,
                        after: stored.after,
                        fresh: false,
                    };
                }
                ("stream", _) => {
                    source.phase = Phase::Stream;
                    // Made durable by the caller, perhaps not yet trimmed (a crash between
                    // the two): trim now.
                    source.trim(stored.trim).await?;
                }
                (other, _) => {
                    return Err(SqlError::Position(format!(
                        "unknown Firebird phase {other:?}"
                    )))
                }
            }
        }
        Ok(source)
    }

    /// Runs `f` on the connection on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut FbConn) -> Result<T, SqlError> + Send + 'static,
    ) -> Result<T, SqlError> {
        let mut conn = self.conn.take().ok_or_else(|| {
            SqlError::db("read changes", "the connection to the database was lost")
        })?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut conn);
            (conn, result)
        })
        .await
        .map_err(|err| SqlError::Task(err.to_string()))?;
        self.conn = Some(conn);
        result
    }

    fn position(&self, stored: Stored) -> Position {
        let mut seen: Vec<i64> = self.seen.iter().copied().collect();
        seen.sort_unstable();
        let stored = Stored { seen, ..stored };
        Position(serde_json::to_string(&stored).unwrap_or_default())
    }

    async fn trim(&mut self, trim: Vec<(i64, i64)>) -> Result<(), SqlError> {
        if trim.is_empty() {
            return Ok(());
        }
        self.with_conn(move |conn| {
            conn.in_tx(TxKind::Write, |conn, tr| {
                for (tx, last) in trim {
                    conn.execute(
                        tr,
                        &format!("DELETE FROM {CHANGE_TABLE} WHERE TX = ? AND ID <= ?"),
                        vec![SqlType::Integer(tx), SqlType::Integer(last)],
                        "trim the change table",
                    )?;
                }
                Ok(())
            })
        })
        .await
    }

    /// One snapshot chunk (or the switch to streaming).
    async fn snapshot_batch(&mut self) -> Result<Batch, SqlError> {
        loop {
            let Phase::Snapshot {
                table,
                after,
                fresh,
            } = &mut self.phase
            else {
                return Ok(Batch {
                    encoded: None,
                    events: Vec::new(),
                    position: self.position(Stored {
                        phase: "stream".into(),
                        ..Stored::default()
                    }),
                });
            };
            let (index, key_after, is_fresh) = (*table, after.clone(), *fresh);
            *fresh = false;
            let tables = self.tables.clone();
            let chunk_rows = self.chunk_rows;
            let (seen, rows) = self
                .with_conn(move |conn| {
                    let mut seen = None;
                    if conn.snapshot.is_none() {
                        let names = relation_params(&tables);
                        if is_fresh {
                            conn.in_tx(TxKind::Write, |conn, tr| {
                                conn.execute(
                                    tr,
                                    &format!(
                                        "DELETE FROM {CHANGE_TABLE} WHERE TBL IN ({})",
                                        marks(names.len())
                                    ),
                                    names.clone(),
                                    "clear the change table before the snapshot",
                                )
                            })?;
                        }
                        let mut tr = conn.begin(TxKind::SnapshotRead)?;
                        if is_fresh {
                            let rows = conn.query(
                                &mut tr,
                                &format!(
                                    "SELECT DISTINCT TX FROM {CHANGE_TABLE} WHERE TBL IN ({})",
                                    marks(names.len())
                                ),
                                names,
                                "list the transactions the snapshot sees",
                            );
                            match rows {
                                Ok(rows) => {
                                    seen = Some(
                                        rows.iter()
                                            .filter_map(|r| r.first().and_then(column_i64))
                                            .collect::<Vec<i64>>(),
                                    )
                                }
                                Err(err) => {
                                    conn.rollback(&mut tr);
                                    return Err(err);
                                }
                            }
                        }
                        conn.snapshot = Some(tr);
                        tracing::info!(tables = tables.len(), "snapshot started");
                    }
                    let Some(spec) = tables.get(index) else {
                        if let Some(mut tr) = conn.snapshot.take() {
                            conn.commit(&mut tr)?;
                        }
                        return Ok((seen, None));
                    };
                    let rows = read_chunk(conn, spec, key_after.as_deref(), chunk_rows)?;
                    Ok((seen, Some(rows)))
                })
                .await?;
            if let Some(seen) = seen {
                self.seen = seen.into_iter().collect();
            }
            let Some(rows) = rows else {
                self.phase = Phase::Stream;
                tracing::info!("snapshot done; streaming");
                return Ok(Batch {
                    encoded: None,
                    events: Vec::new(),
                    position: self.position(Stored {
                        phase: "stream".into(),
                        ..Stored::default()
                    }),
                });
            };
            let spec = &self.tables[index];
            let full = rows.len() >= self.chunk_rows as usize;
            let mut events = Vec::with_capacity(rows.len());
            let mut last_key = None;
            for row in rows {
                let mut after_row = Row::new();
                let mut texts: Vec<Option<String>> = Vec::with_capacity(row.len());
                for (column, value) in spec.columns.iter().zip(row) {
                    texts.push(value.as_ref().and_then(|v| v.as_ref().ok().cloned()));
                    after_row.insert(column.event_name.clone(), to_json(column.kind, value));
                }
                last_key = Some(
                    spec.key
                        .iter()
                        .map(|&i| {
                            // Resuming after a made-up key would skip or repeat rows.
                            texts.get(i).cloned().flatten().ok_or_else(|| {
                                let column = spec.columns.get(i).map_or("", |c| &c.event_name);
                                SqlError::null_key(&spec.config_name, column)
                            })
                        })
                        .collect::<Result<Vec<String>, SqlError>>()?,
                );
                events.push(ChangeEvent {
                    source: self.name.clone(),
                    table: spec.config_name.clone(),
                    op: Op::Snapshot,
                    key: key_of(spec, &after_row),
                    before: None,
                    after: Some(after_row),
                    position: None,
                    tx: None,
                    commit_time: None,
                    id: None,
                });
            }
            let (next_table, next_after) = if full {
                (index, last_key)
            } else {
                (index + 1, None)
            };
            if let Phase::Snapshot { table, after, .. } = &mut self.phase {
                *table = next_table;
                *after = next_after.clone();
            }
            if events.is_empty() {
                continue;
            }
            return Ok(Batch {
                encoded: None,
                events,
                position: self.position(Stored {
                    phase: "snapshot".into(),
                    table: Some(next_table),
                    after: next_after,
                    ..Stored::default()
                }),
            });
        }
    }

    /// Reads whole transactions from the change table into `ready`.
    async fn read_changes(&mut self) -> Result<(), SqlError> {
        let tables = self.tables.clone();
        let max_changes = self.max_changes as usize;
        let changes = self
            .with_conn(move |conn| {
                conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
                    read_transactions(conn, tr, &tables, max_changes)
                })
            })
            .await?;
        let mut skipped = Vec::new();
        let mut any_seen = false;
        for change_tx in changes {
            let trim = (change_tx.tx, change_tx.last_id);
            if self.seen.contains(&change_tx.tx) {
                any_seen = true;
                skipped.push(trim);
                continue;
            }
            let mut events = Vec::with_capacity(change_tx.rows.len());
            for row in change_tx.rows {
                events.push(self.change_event(row)?);
            }
            let mut trims = std::mem::take(&mut skipped);
            trims.push(trim);
            let position = self.position(Stored {
                phase: "stream".into(),
                trim: trims,
                id: Some(change_tx.last_id),
                ..Stored::default()
            });
            self.ready.push_back(Batch {
                encoded: None,
                events,
                position,
            });
        }
        if !skipped.is_empty() {
            let position = self.position(Stored {
                phase: "stream".into(),
                trim: skipped,
                ..Stored::default()
            });
            self.ready.push_back(Batch {
                encoded: None,
                events: Vec::new(),
                position,
            });
        }
        if !any_seen && !self.seen.is_empty() {
            // Every change the snapshot saw has been skipped and trimmed.
            self.seen.clear();
        }
        Ok(())
    }

    fn change_event(&self, row: ChangeRow) -> Result<ChangeEvent, SqlError> {
        let spec = self
            .tables
            .iter()
            .find(|t| t.relation == row.table)
            .ok_or_else(|| {
                SqlError::Decode(format!("a change of uncaptured table {}", row.table))
            })?;
        let op = match row.op.as_str() {
            "I" => Op::Insert,
            "U" => Op::Update,
            "D" => Op::Delete,
            other => {
                return Err(SqlError::Decode(format!(
                    "change {} has op {other:?}",
                    row.id
                )))
            }
        };
        let decode = |json: &Option<String>, side: &str| -> Result<Option<Row>, SqlError> {
            let Some(json) = json else { return Ok(None) };
            let raw: serde_json::Map<String, Value> =
                serde_json::from_str(json).map_err(|err| {
                    SqlError::Decode(format!("change {}: the trigger's JSON: {err}", row.id))
                })?;
            let mut out = Row::new();
            for column in &spec.columns {
                if column.kind == FbKind::Binary {
                    let value = row
                        .blobs
                        .get(&(side.to_owned(), column.event_name.clone()))
                        .map_or(Value::Null, |bytes| {
                            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                        });
                    out.insert(column.event_name.clone(), value);
                    continue;
                }
                match raw.get(&column.event_name) {
                    Some(Value::String(text)) => {
                        out.insert(
                            column.event_name.clone(),
                            value::text_to_json(column.kind, text),
                        );
                    }
                    Some(_) => {
                        out.insert(column.event_name.clone(), Value::Null);
                    }
                    // Not in the trigger (a column added since it was installed).
                    None => {}
                }
            }
            Ok(Some(out))
        };
        let before = decode(&row.old_row, "O")?;
        let after = decode(&row.new_row, "N")?;
        let key = match (&after, &before) {
            (Some(after), _) => key_of(spec, after),
            (None, Some(before)) => key_of(spec, before),
            (None, None) => Row::new(),
        };
        Ok(ChangeEvent {
            source: self.name.clone(),
            table: spec.config_name.clone(),
            op,
            key,
            before,
            after,
            position: Some(row.id.to_string()),
            tx: Some(row.tx.to_string()),
            commit_time: None,
            id: Some(format!("fb:{}:{}", row.tx, row.id)),
        })
    }
}

#[async_trait::async_trait]
impl ChangeSource for FbSource {
    async fn next_batch(&mut self) -> Result<Batch, SqlError> {
        if matches!(self.phase, Phase::Snapshot { .. }) {
            return self.snapshot_batch().await;
        }
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Ok(batch);
            }
            self.read_changes().await?;
            if self.ready.is_empty() {
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }

    async fn committed(&mut self, position: &Position) -> Result<(), SqlError> {
        let stored: Stored =
            serde_json::from_str(&position.0).map_err(|err| SqlError::Position(err.to_string()))?;
        self.trim(stored.trim).await
    }
}

impl Drop for FbSource {
    fn drop(&mut self) {
        // Closing the socket ends the attachment; the server rolls back what was open.
        self.conn.take();
    }
}

/// Connects with the config's URL and password.
fn connect(config: &SourceConfig) -> Result<FbConn, SqlError> {
    let url = FbUrl::parse(&config.url)?;
    let password = config.password()?;
    FbConn::connect(&url, password.as_deref(), &crate::redact_url(&config.url))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SqlError> + Send + 'static,
) -> Result<T, SqlError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| SqlError::Task(err.to_string()))?
}

/// The script that would install capture for `config`'s tables (connects to read the
/// catalog: triggers name every captured column). Objects already there are not created
/// again.
pub async fn install_script(config: &SourceConfig) -> Result<String, SqlError> {
    let config = config.clone();
    blocking(move || {
        let mut conn = connect(&config)?;
        let script = ddl::script_for(&mut conn, &config);
        conn.close();
        script
    })
    .await
}

/// Installs capture for `config`'s tables (what [`install_script`] prints); returns the
/// statements run.
pub async fn install(config: &SourceConfig) -> Result<Vec<String>, SqlError> {
    let config = config.clone();
    blocking(move || {
        let mut conn = connect(&config)?;
        let done = ddl::install_on(&mut conn, &config);
        conn.close();
        done
    })
    .await
}

fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn relation_params(tables: &[FbTable]) -> Vec<SqlType> {
    tables
        .iter()
        .map(|t| SqlType::Text(t.relation.clone()))
        .collect()
}

fn key_of(table: &FbTable, row: &Row) -> Row {
    table
        .key
        .iter()
        .filter_map(|&i| table.columns.get(i))
        .map(|c| {
            (
                c.event_name.clone(),
                row.get(&c.event_name).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

type Values = Vec<Option<Result<String, Vec<u8>>>>;

/// The expressions that read a table's captured columns, in order, so that
/// [`value::to_json`] maps them (the snapshot's and the poll mode's reads).
fn select_list(table: &FbTable) -> Vec<String> {
    table
        .columns
        .iter()
        .map(|c| c.kind.select_expr(&quote(&c.name)))
        .collect()
}

/// The next `limit` rows after `after` in key order, inside the open snapshot.
fn read_chunk(
    conn: &mut FbConn,
    table: &FbTable,
    after: Option<&[String]>,
    limit: u32,
) -> Result<Vec<Values>, SqlError> {
    let select = select_list(table);
    let keys: Vec<String> = table
        .key
        .iter()
        .filter_map(|&i| table.columns.get(i))
        .map(|c| quote(&c.name))
        .collect();
    let mut sql = format!("SELECT {} FROM {}", select.join(", "), table.quoted());
    let mut params = Vec::new();
    if let Some(after) = after {
        // (k1 > ?) OR (k1 = ? AND k2 > ?) OR …: Firebird 3 has no row-value comparison.
        let mut ors = Vec::new();
        for i in 0..keys.len().min(after.len()) {
            let mut ands = Vec::new();
            for (j, key) in keys.iter().enumerate().take(i) {
                ands.push(format!("{key} = ?"));
                params.push(SqlType::Text(after[j].clone()));
            }
            ands.push(format!("{} > ?", keys[i]));
            params.push(SqlType::Text(after[i].clone()));
            ors.push(format!("({})", ands.join(" AND ")));
        }
        sql.push_str(&format!(" WHERE {}", ors.join(" OR ")));
    }
    sql.push_str(&format!(" ORDER BY {} ROWS {limit}", keys.join(", ")));
    let mut tr = conn
        .snapshot
        .take()
        .ok_or_else(|| SqlError::db("read the snapshot", "the snapshot transaction is not open"))?;
    let rows = conn.query(
        &mut tr,
        &sql,
        params,
        &format!("read table {}", table.config_name),
    );
    conn.snapshot = Some(tr);
    Ok(rows?
        .iter()
        .map(|row| row.iter().map(column_text).collect())
        .collect())
}

/// One row of `OUTPOST_CHANGES`, with its binary values.
struct ChangeRow {
    id: i64,
    tx: i64,
    table: String,
    op: String,
    old_row: Option<String>,
    new_row: Option<String>,
    /// `(side, column)` → bytes.
    blobs: HashMap<(String, String), Vec<u8>>,
}

/// The changes of one writer transaction.
struct ChangeTx {
    tx: i64,
    last_id: i64,
    rows: Vec<ChangeRow>,
}

/// Whole transactions from the change table, in the order of their last change id, up
/// to about `max_changes` rows (at least one transaction).
fn read_transactions(
    conn: &mut FbConn,
    tr: &mut rsfbclient_rust::TrHandle,
    tables: &[FbTable],
    max_changes: usize,
) -> Result<Vec<ChangeTx>, SqlError> {
    let names = relation_params(tables);
    let listed = conn.query(
        tr,
        &format!(
            "SELECT TX, MAX(ID), COUNT(*) FROM {CHANGE_TABLE} WHERE TBL IN ({}) GROUP BY TX ORDER BY 2",
            marks(names.len())
        ),
        names.clone(),
        "list the changed transactions",
    )?;
    let mut chosen: Vec<(i64, i64)> = Vec::new();
    let mut total = 0usize;
    for row in &listed {
        let (Some(tx), Some(last), Some(count)) = (
            row.first().and_then(column_i64),
            row.get(1).and_then(column_i64),
            row.get(2).and_then(column_i64),
        ) else {
            continue;
        };
        let count = usize::try_from(count).unwrap_or(0);
        if !chosen.is_empty() && total + count > max_changes {
            break;
        }
        total += count;
        chosen.push((tx, last));
    }
    let Some(upto) = chosen.iter().map(|(_, last)| *last).max() else {
        return Ok(Vec::new());
    };
    let wanted: HashSet<i64> = chosen.iter().map(|(tx, _)| *tx).collect();
    let mut params = vec![SqlType::Integer(upto)];
    params.extend(names);
    let rows = conn.query(
        tr,
        &format!(
            "SELECT ID, TX, TRIM(TBL), OP, OLD_ROW, NEW_ROW FROM {CHANGE_TABLE} \
             WHERE ID <= ? AND TBL IN ({}) ORDER BY ID",
            marks(tables.len())
        ),
        params,
        "read the change table",
    )?;
    let mut by_tx: HashMap<i64, Vec<ChangeRow>> = HashMap::new();
    let mut min_id = i64::MAX;
    for row in &rows {
        let text = |i: usize| row.get(i).and_then(column_text).and_then(Result::ok);
        let (Some(id), Some(tx)) = (
            row.first().and_then(column_i64),
            row.get(1).and_then(column_i64),
        ) else {
            continue;
        };
        if !wanted.contains(&tx) {
            continue;
        }
        min_id = min_id.min(id);
        by_tx.entry(tx).or_default().push(ChangeRow {
            id,
            tx,
            table: text(2).unwrap_or_default(),
            op: text(3).unwrap_or_default(),
            old_row: text(4),
            new_row: text(5),
            blobs: HashMap::new(),
        });
    }
    if tables
        .iter()
        .any(|t| t.columns.iter().any(|c| c.kind == FbKind::Binary))
        && min_id <= upto
    {
        let blobs = conn.query(
            tr,
            &format!(
                "SELECT CHANGE_ID, TRIM(COL), SIDE, VAL FROM {BLOB_TABLE} WHERE CHANGE_ID BETWEEN ? AND ?"
            ),
            vec![SqlType::Integer(min_id), SqlType::Integer(upto)],
            "read the change table's binary values",
        )?;
        let mut index: HashMap<i64, &mut ChangeRow> = HashMap::new();
        for rows in by_tx.values_mut() {
            for row in rows.iter_mut() {
                index.insert(row.id, row);
            }
        }
        for blob in &blobs {
            let text = |i: usize| blob.get(i).and_then(column_text).and_then(Result::ok);
            let Some(id) = blob.first().and_then(column_i64) else {
                continue;
            };
            let Some(row) = index.get_mut(&id) else {
                continue;
            };
            let bytes = match blob.get(3).and_then(column_text) {
                Some(Err(bytes)) => bytes,
                Some(Ok(text)) => text.into_bytes(),
                None => continue,
            };
            row.blobs.insert(
                (text(2).unwrap_or_default(), text(1).unwrap_or_default()),
                bytes,
            );
        }
    }
    Ok(chosen
        .into_iter()
        .map(|(tx, last_id)| ChangeTx {
            tx,
            last_id,
            rows: by_tx.remove(&tx).unwrap_or_default(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn positions_round_trip() {
        let stored = Stored {
            phase: "stream".into(),
            seen: vec![7, 9],
            trim: vec![(12, 40)],
            id: Some(40),
            ..Stored::default()
        };
        let text = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            text,
            r#"{"phase":"stream","seen":[7,9],"trim":[[12,40]],"id":40}"#
        );
        let back: Stored = serde_json::from_str(&text).unwrap();
        assert_eq!(back.trim, vec![(12, 40)]);
    }
}
