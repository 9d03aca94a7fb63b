//! PostgreSQL change capture: logical decoding with the built-in `pgoutput` plugin, read
//! through the SQL functions `pg_logical_slot_peek_binary_changes` and
//! `pg_replication_slot_advance`, after a consistent, chunked, resumable snapshot.
//!
//! Why the SQL functions rather than the streaming replication protocol: they run on an
//! ordinary connection (no `replication=database` connection, which tokio-postgres does
//! not speak), *peek* leaves the slot where it is until we say so, and advancing it is one
//! explicit call made only after the caller has made the events durable. The cost is that
//! each read decodes again from the slot's confirmed position, so the slot is advanced
//! after every durable batch and reads are bounded by `max_changes`.
//!
//! First start:
//! 1. the publication `outpost_<source>` (for the configured tables) and the logical slot
//!    `outpost_<source>` are created if missing;
//! 2. the snapshot runs in one `REPEATABLE READ` transaction whose `pg_current_snapshot()`
//!    is recorded in the position; tables are read in key order, `chunk_rows` at a time,
//!    and each chunk is a batch whose position names the last key read, so a restart
//!    resumes after it;
//! 3. the stream then starts at the slot's position, which is older than the snapshot (the
//!    slot was created first). A streamed transaction whose xid the snapshot already saw
//!    as committed (below `xmin`, or below `xmax` and not in the in-progress list) is
//!    skipped: its rows are in the snapshot. Every other transaction committed after the
//!    slot's consistent point, so it is streamed. Nothing is missed and nothing is doubled.
//!
//! A snapshot resumed after a restart runs in a new transaction (the old one is gone);
//! the skip rule keeps the *first* snapshot, so changes made between the two snapshots to
//! rows not yet read appear in the later chunks and again in the stream, in order: a
//! consumer applying events in order ends in the right state.
//!
//! Heartbeat: before each read the WAL flush position is taken and passed as `upto_lsn`;
//! when the read returned fewer rows than asked (so it reached that position), the batch's
//! position is that WAL position even if no captured table changed. The caller commits it
//! like any other (at most once per `heartbeat` when nothing was captured), so a quiet
//! database whose other tables are busy never makes the slot hold WAL without bound.
//!
//! `before`: PostgreSQL logs old row values only as the table's REPLICA IDENTITY says.
//! With the default (the primary key), `before` holds the key columns on update and delete;
//! with `REPLICA IDENTITY FULL` it holds the whole old row. A table without a primary key
//! or replica identity cannot publish updates and deletes at all (PostgreSQL refuses them),
//! so captured tables need one.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::{Client, NoTls};

use crate::event::{pg_epoch_micros_to_rfc3339, pg_text_to_json};
use crate::ident::{pg_object_name, quote, split_qualified};
use crate::pgoutput::{self, format_lsn, parse_lsn, Datum, Message, OldKind};
mod snapshot;

use crate::{Batch, ChangeEvent, ChangeSource, Op, Position, Row, SourceConfig, SqlError};

/// How long an idle stream waits between reads of the slot, at most: the wait starts at
/// [`BUSY_POLL`] after a read that found changes and doubles with each empty one, so a busy
/// database's changes are picked up within milliseconds and a quiet one is asked five
/// times a second.
const IDLE_POLL: Duration = Duration::from_millis(200);
const BUSY_POLL: Duration = Duration::from_millis(5);

/// A table as found in the database.
#[derive(Debug, Clone)]
struct PgTable {
    /// As written in the config (and in events).
    config_name: String,
    schema: String,
    name: String,
    /// Captured columns: name, type OID, SQL type (`format_type`).
    columns: Vec<(String, u32, String)>,
    key: Vec<String>,
}

impl PgTable {
    fn quoted(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
    fn captures(&self, column: &str) -> bool {
        self.columns.iter().any(|(c, _, _)| c == column)
    }
}

/// `xmin:xmax:xip,…` of `pg_current_snapshot()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotXids {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl SnapshotXids {
    /// Parses the text form.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(SnapshotXids { xmin, xmax, xip })
    }

    /// Whether a transaction with this 32-bit xid had committed (or aborted) when the
    /// snapshot was taken, i.e. its effects are in the snapshot.
    pub fn saw(&self, xid: u32) -> bool {
        // Widen the 32-bit xid to the epoch nearest to xmax.
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax.saturating_add(1 << 31) && full >= 1 << 32 {
            full -= 1 << 32;
        } else if full.saturating_add(1 << 31) < self.xmax {
            full += 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// What the position string holds (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The slot this position belongs to; a recreated slot means a new snapshot.
    slot: String,
    /// The first snapshot's `pg_current_snapshot()`; absent before it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    /// Snapshot phase: the table being read (index into the config's tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<usize>,
    /// Snapshot phase: the last key read in that table (text forms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<Vec<String>>,
    /// Stream phase: the slot may be advanced to here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lsn: Option<String>,
}

enum Phase {
    Snapshot {
        table: usize,
        after: Option<Vec<String>>,
        /// The snapshot transaction is open on the connection, and the WAL position it
        /// was taken at.
        open_at: Option<String>,
        /// Reads chunks ahead inside that transaction.
        reader: Option<snapshot::Reader>,
    },
    Stream,
}

/// A relation as the stream described it.
struct Relation {
    /// Index into `tables`, when captured.
    table: Option<usize>,
    columns: Vec<pgoutput::Column>,
}

/// A PostgreSQL source.
pub struct PgSource {
    name: String,
    /// Shared with the snapshot reader while the snapshot runs.
    client: Arc<Client>,
    connection: tokio::task::JoinHandle<()>,
    tables: Vec<PgTable>,
    slot: String,
    publication: String,
    snapshot: Option<SnapshotXids>,
    snapshot_text: Option<String>,
    phase: Phase,
    relations: HashMap<u32, Relation>,
    /// The slot's confirmed position as far as we know.
    confirmed: u64,
    chunk_rows: u32,
    /// Each table's estimated rows, taken when the snapshot began (for progress reports
    /// while the connection is busy with it).
    snapshot_estimates: Vec<(String, u64)>,
    max_changes: u32,
    heartbeat: Duration,
    last_yield: Instant,
    /// The next wait after a read that found nothing.
    idle_wait: Duration,
}

impl Drop for PgSource {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PgSource {
    /// Connects, creates the publication and the slot if missing, and prepares to resume
    /// from `resume` (or to take a snapshot).
    pub async fn open(
        name: &str,
        config: &SourceConfig,
        resume: Option<Position>,
    ) -> Result<PgSource, SqlError> {
        let (client, connection) = connect(config).await?;
        let tables = resolve_tables(&client, name, config).await?;
        let slot = config.slot.clone().unwrap_or_else(|| pg_object_name(name));
        let publication = config
            .publication
            .clone()
            .unwrap_or_else(|| pg_object_name(name));
        ensure_publication(&client, &publication, &tables).await?;
        let created = ensure_slot(&client, &slot).await?;
        let confirmed = slot_confirmed(&client, &slot).await?;

        let stored = match resume {
            Some(Position(text)) => Some(
                serde_json::from_str::<Stored>(&text)
                    .map_err(|err| SqlError::Position(err.to_string()))?,
            ),
            None => None,
        };
        let stored = match stored {
            Some(stored) if created || stored.slot != slot => {
                tracing::warn!(slot, "the replication slot is new: taking a new snapshot");
                None
            }
            other => other,
        };
        let mut source = PgSource {
            name: name.to_owned(),
            client: Arc::new(client),
            connection,
            tables,
            slot,
            publication,
            snapshot: None,
            snapshot_text: None,
            phase: Phase::Snapshot {
                table: 0,
                after: None,
                open_at: None,
                reader: None,
            },
            relations: HashMap::new(),
            confirmed,
            chunk_rows: config.chunk_rows,
            snapshot_estimates: Vec::new(),
            max_changes: config.max_changes,
            heartbeat: config.heartbeat,
            last_yield: Instant::now(),
            idle_wait: BUSY_POLL,
        };
        if let Some(stored) = stored {
            if let Some(text) = &stored.snapshot {
                source.snapshot = Some(
                    SnapshotXids::parse(text)
                        .ok_or_else(|| SqlError::Position(format!("snapshot {text:?}")))?,
                );
                source.snapshot_text = Some(text.clone());
            }
            match stored.table {
                Some(table) if source.snapshot.is_some() => {
                    source.phase = Phase::Snapshot {
                        table,
                        after: stored.after,
                        open_at: None,
                        reader: None,
                    };
                    tracing::info!(table, "resuming the snapshot");
                }
                Some(_) => {}
                None => {
                    source.phase = Phase::Stream;
                    // The caller made events durable up to here, but the slot may not have
                    // heard (a crash between the two): move it on now, so nothing repeats.
                    if let Some(lsn) = stored.lsn.as_deref().and_then(parse_lsn) {
                        source.advance(lsn).await?;
                    }
                }
            }
        }
        Ok(source)
    }

    fn position(
        &self,
        table: Option<usize>,
        after: Option<Vec<String>>,
        lsn: Option<u64>,
    ) -> Position {
        let stored = Stored {
            slot: self.slot.clone(),
            snapshot: self.snapshot_text.clone(),
            table,
            after,
            lsn: lsn.map(format_lsn),
        };
        Position(serde_json::to_string(&stored).unwrap_or_default())
    }

    async fn advance(&mut self, lsn: u64) -> Result<(), SqlError> {
        if lsn <= self.confirmed {
            return Ok(());
        }
        self.client
            .query(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text",
                &[&self.slot, &format_lsn(lsn)],
            )
            .await
            .map_err(|err| SqlError::pg(format!("advance slot {}", self.slot), err))?;
        self.confirmed = lsn;
        Ok(())
    }

    /// One snapshot chunk (or the switch to streaming).
    async fn snapshot_batch(&mut self) -> Result<Batch, SqlError> {
        let Phase::Snapshot {
            table,
            after,
            open_at,
            reader,
        } = &mut self.phase
        else {
            return Ok(Batch {
                encoded: None,
                events: Vec::new(),
                position: self.position(None, None, None),
            });
        };
        if open_at.is_none() {
            self.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|err| SqlError::pg("begin the snapshot", err))?;
            let row = self
                .client
                .query_one(
                    "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text",
                    &[],
                )
                .await
                .map_err(|err| SqlError::pg("take the snapshot", err))?;
            let text: String = row.get(0);
            let lsn: String = row.get(1);
            if self.snapshot.is_none() {
                self.snapshot = Some(
                    SnapshotXids::parse(&text)
                        .ok_or_else(|| SqlError::Decode(format!("snapshot {text:?}")))?,
                );
                self.snapshot_text = Some(text);
            }
            tracing::info!(tables = self.tables.len(), "snapshot started");
            *open_at = Some(lsn);
            self.snapshot_estimates = estimate_rows(&self.client, &self.tables).await?;
        }
        let running = match reader {
            Some(running) => running,
            None => reader.insert(snapshot::Reader::start(
                self.client.clone(),
                &self.name,
                &self.tables,
                *table,
                after.take(),
                self.chunk_rows,
                open_at.as_deref().unwrap_or_default(),
            )),
        };
        match running.next().await? {
            snapshot::Read::Chunk {
                encoded,
                table: resume_table,
                after: resume_after,
            } => {
                *table = resume_table;
                Ok(Batch {
                    encoded: Some(encoded),
                    events: Vec::new(),
                    position: self.position(Some(resume_table), resume_after, None),
                })
            }
            snapshot::Read::Done => {
                self.phase = Phase::Stream;
                self.client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(|err| SqlError::pg("end the snapshot", err))?;
                tracing::info!("snapshot done; streaming");
                Ok(Batch {
                    encoded: None,
                    events: Vec::new(),
                    position: self.position(None, None, None),
                })
            }
        }
    }

    /// Reads the slot until there are events, or a heartbeat is due.
    async fn stream_batch(&mut self) -> Result<Batch, SqlError> {
        loop {
            let upto: String = self
                .client
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await
                .map_err(|err| SqlError::pg("read the WAL position", err))?
                .get(0);
            let upto = parse_lsn(&upto)
                .ok_or_else(|| SqlError::Decode(format!("WAL position {upto:?}")))?;
            let limit = i32::try_from(self.max_changes).unwrap_or(i32::MAX);
            let rows = self
                .client
                .query(
                    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(\
                     $1, $2::text::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)",
                    &[&self.slot, &format_lsn(upto), &limit, &self.publication],
                )
                .await
                .map_err(|err| SqlError::pg(format!("read slot {}", self.slot), err))?;
            let complete = rows.len() < self.max_changes as usize;
            let mut decoded = Vec::with_capacity(rows.len());
            for row in &rows {
                let lsn: String = row.get(0);
                let data: Vec<u8> = row.get(1);
                decoded.push((lsn, pgoutput::decode(&data)?));
            }
            let (events, last_commit) = self.events_of(decoded)?;
            let lsn = if complete {
                Some(last_commit.unwrap_or(0).max(upto))
            } else {
                last_commit
            };
            if !events.is_empty() {
                self.last_yield = Instant::now();
                self.idle_wait = BUSY_POLL;
                return Ok(Batch {
                    encoded: None,
                    events,
                    position: self.position(None, None, lsn),
                });
            }
            let moved = lsn.is_some_and(|lsn| lsn > self.confirmed);
            // Skipped transactions are committed at once, so they are not read again.
            if moved && (!rows.is_empty() || self.last_yield.elapsed() >= self.heartbeat) {
                self.last_yield = Instant::now();
                return Ok(Batch {
                    encoded: None,
                    events,
                    position: self.position(None, None, lsn),
                });
            }
            tokio::time::sleep(self.idle_wait).await;
            self.idle_wait = (self.idle_wait * 2).min(IDLE_POLL);
        }
    }

    /// Turns decoded messages into events of whole, committed transactions the snapshot
    /// did not see; returns them and the end LSN of the last commit.
    fn events_of(
        &mut self,
        messages: Vec<(String, Message)>,
    ) -> Result<(Vec<ChangeEvent>, Option<u64>), SqlError> {
        let mut events = Vec::new();
        let mut last_commit = None;
        let mut current: Option<(u32, i64, Vec<ChangeEvent>)> = None;
        for (lsn, message) in messages {
            match message {
                Message::Begin {
                    commit_time, xid, ..
                } => current = Some((xid, commit_time, Vec::new())),
                Message::Commit { end_lsn, .. } => {
                    last_commit = Some(end_lsn);
                    let Some((xid, _, mut tx_events)) = current.take() else {
                        continue;
                    };
                    if self.snapshot.as_ref().is_some_and(|s| s.saw(xid)) {
                        tracing::debug!(xid, "skipping a transaction the snapshot saw");
                        continue;
                    }
                    for (index, event) in tx_events.iter_mut().enumerate() {
                        event.id = Some(format!("{}:{index}", format_lsn(end_lsn)));
                    }
                    events.append(&mut tx_events);
                }
                Message::Relation {
                    oid,
                    namespace,
                    name,
                    columns,
                    ..
                } => {
                    let table = self
                        .tables
                        .iter()
                        .position(|t| t.schema == namespace && t.name == name);
                    if let Some(spec) = table.and_then(|i| self.tables.get(i)) {
                        self.check_columns(spec, self.relations.get(&oid), &columns)?;
                    }
                    self.relations.insert(oid, Relation { table, columns });
                }
                Message::Insert { oid, new } => {
                    if let Some(event) = self.row_event(oid, Op::Insert, None, Some(new), &lsn)? {
                        push(&mut current, event);
                    }
                }
                Message::Update { oid, old, new } => {
                    if let Some(event) = self.row_event(oid, Op::Update, old, Some(new), &lsn)? {
                        push(&mut current, event);
                    }
                }
                Message::Delete { oid, old } => {
                    if let Some(event) = self.row_event(oid, Op::Delete, Some(old), None, &lsn)? {
                        push(&mut current, event);
                    }
                }
                Message::Truncate { oids, .. } => {
                    for oid in oids {
                        let Some(table) = self.captured(oid) else {
                            continue;
                        };
                        let event = ChangeEvent {
                            source: self.name.clone(),
                            table: table.config_name.clone(),
                            op: Op::Truncate,
                            key: Row::new(),
                            before: None,
                            after: None,
                            position: Some(lsn.clone()),
                            tx: None,
                            commit_time: None,
                            id: None,
                        };
                        push(&mut current, event);
                    }
                }
                Message::Origin { .. } | Message::Type { .. } | Message::Other(_) => {}
            }
        }
        Ok((events, last_commit))
    }

    /// A captured column missing from the stream's description of its table was dropped
    /// (or renamed) while the agent ran: said once per change of the description. Events go
    /// on with the remaining columns; a key column gone is an error (rows could no longer
    /// be told apart), and the source stops with it until the config is fixed.
    fn check_columns(
        &self,
        spec: &PgTable,
        previous: Option<&Relation>,
        columns: &[pgoutput::Column],
    ) -> Result<(), SqlError> {
        let missing = |columns: &[pgoutput::Column]| -> Vec<String> {
            spec.columns
                .iter()
                .map(|(c, _, _)| c)
                .filter(|c| !columns.iter().any(|col| &col.name == *c))
                .cloned()
                .collect()
        };
        let now = missing(columns);
        if now.is_empty() || previous.is_some_and(|p| missing(&p.columns) == now) {
            return Ok(());
        }
        if let Some(key) = now.iter().find(|c| spec.key.contains(c)) {
            return Err(SqlError::Table {
                table: spec.config_name.clone(),
                message: format!(
                    "key column {key:?} was dropped or renamed; fix the table's `key` in the config"
                ),
            });
        }
        tracing::warn!(
            table = %spec.config_name,
            columns = ?now,
            "captured columns were dropped or renamed: events go on without them"
        );
        Ok(())
    }

    fn captured(&self, oid: u32) -> Option<&PgTable> {
        let index = self.relations.get(&oid)?.table?;
        self.tables.get(index)
    }

    fn row_event(
        &self,
        oid: u32,
        op: Op,
        old: Option<(OldKind, Vec<Datum>)>,
        new: Option<Vec<Datum>>,
        lsn: &str,
    ) -> Result<Option<ChangeEvent>, SqlError> {
        let Some(relation) = self.relations.get(&oid) else {
            return Err(SqlError::Decode(format!(
                "a change of relation {oid} came before its description"
            )));
        };
        let Some(table) = relation.table.and_then(|i| self.tables.get(i)) else {
            return Ok(None);
        };
        let to_row = |datums: &[Datum], only_keys: bool| {
            let mut row = Row::new();
            for (column, datum) in relation.columns.iter().zip(datums) {
                if !table.captures(&column.name) || (only_keys && !column.is_key) {
                    continue;
                }
                let value = match datum {
                    Datum::Null => Value::Null,
                    // Not sent: the value did not change. Left out rather than guessed.
                    Datum::UnchangedToast => continue,
                    Datum::Text(text) => pg_text_to_json(column.type_oid, text),
                    Datum::Binary(bytes) => Value::String(hex::encode(bytes)),
                };
                row.insert(column.name.clone(), value);
            }
            row
        };
        let after = new.as_deref().map(|datums| to_row(datums, false));
        let before = match (&old, &after) {
            (Some((OldKind::Full, datums)), _) => Some(to_row(datums, false)),
            (Some((OldKind::Key, datums)), _) => Some(to_row(datums, true)),
            // Update without an old tuple: the key did not change; that much is known.
            (None, Some(after)) if op == Op::Update => Some(key_of(&table.key, after)),
            (None, _) => None,
        };
        let key = match (&after, &before) {
            (Some(after), _) => key_of(&table.key, after),
            (None, Some(before)) => key_of(&table.key, before),
            (None, None) => Row::new(),
        };
        Ok(Some(ChangeEvent {
            source: self.name.clone(),
            table: table.config_name.clone(),
            op,
            key,
            before,
            after,
            position: Some(lsn.to_owned()),
            tx: None,
            commit_time: None,
            id: None,
        }))
    }
}

/// Adds an event to the open transaction, stamping its xid and commit time.
fn push(current: &mut Option<(u32, i64, Vec<ChangeEvent>)>, mut event: ChangeEvent) {
    if let Some((xid, commit_time, events)) = current {
        event.tx = Some(xid.to_string());
        event.commit_time = pg_epoch_micros_to_rfc3339(*commit_time);
        events.push(event);
    }
}

fn key_of(key: &[String], row: &Row) -> Row {
    key.iter()
        .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

#[async_trait::async_trait]
impl ChangeSource for PgSource {
    /// During the snapshot `committed` does nothing (the slot moves only in the stream).
    fn reads_ahead(&self) -> bool {
        matches!(self.phase, Phase::Snapshot { .. })
    }

    async fn next_batch(&mut self) -> Result<Batch, SqlError> {
        if self.connection.is_finished() {
            return Err(SqlError::db(
                "read changes",
                "the connection to the database was lost",
            ));
        }
        match self.phase {
            Phase::Snapshot { .. } => self.snapshot_batch().await,
            Phase::Stream => self.stream_batch().await,
        }
    }

    async fn committed(&mut self, position: &Position) -> Result<(), SqlError> {
        let stored: Stored =
            serde_json::from_str(&position.0).map_err(|err| SqlError::Position(err.to_string()))?;
        if let Some(lsn) = stored.lsn.as_deref().and_then(parse_lsn) {
            self.advance(lsn).await?;
        }
        Ok(())
    }

    /// WAL bytes the slot's confirmed position is behind the server's, and during the
    /// snapshot each table's estimated rows (`reltuples`, or the statistics' live-row count
    /// for a table never analysed).
    async fn progress(&mut self) -> Result<crate::Progress, SqlError> {
        if let Phase::Snapshot {
            reader: Some(_), ..
        } = &self.phase
        {
            // The connection is streaming the snapshot to the reader, which waits for the
            // caller to take its chunks: a query now would wait behind the snapshot's rows
            // for ever. The estimates taken when the snapshot began serve instead.
            return Ok(crate::Progress {
                bytes_behind: None,
                snapshot_estimates: self.snapshot_estimates.clone(),
                snapshotting: true,
            });
        }
        let behind: Option<i64> = self
            .client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .map_err(|err| SqlError::pg("read the slot's lag", err))?
            .and_then(|row| row.get(0));
        let snapshotting = matches!(self.phase, Phase::Snapshot { .. });
        let snapshot_estimates = if snapshotting {
            estimate_rows(&self.client, &self.tables).await?
        } else {
            Vec::new()
        };
        Ok(crate::Progress {
            bytes_behind: behind.map(|b| b.max(0) as u64),
            snapshot_estimates,
            snapshotting,
        })
    }
}

/// Each table's estimated rows (`reltuples`, or the statistics' live-row count for a table
/// never analysed).
async fn estimate_rows(
    client: &Client,
    tables: &[PgTable],
) -> Result<Vec<(String, u64)>, SqlError> {
    let mut estimates = Vec::with_capacity(tables.len());
    for table in tables {
        let row = client
            .query_opt(
                "SELECT GREATEST(c.reltuples::bigint, COALESCE(s.n_live_tup, 0)) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(|err| SqlError::pg("estimate table rows", err))?;
        let rows: i64 = row.map(|r| r.get(0)).unwrap_or(0);
        estimates.push((table.config_name.clone(), rows.max(0) as u64));
    }
    Ok(estimates)
}

async fn connect(config: &SourceConfig) -> Result<(Client, tokio::task::JoinHandle<()>), SqlError> {
    let (client, task) = pg_connect(&config.url, config.password()?.as_deref(), "outpost").await?;
    // Text forms the event mapping relies on.
    client
        .batch_execute(
            "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET extra_float_digits = 3; \
             SET bytea_output = 'hex'; SET IntervalStyle = 'iso_8601'",
        )
        .await
        .map_err(|err| SqlError::pg("set up the session", err))?;
    Ok((client, task))
}

/// Connects to `url` (with `password` if given), within 10 s and without TLS; the returned
/// task drives the connection and ends with it. Errors name the URL without its password.
pub(crate) async fn pg_connect(
    url: &str,
    password: Option<&str>,
    application: &str,
) -> Result<(Client, tokio::task::JoinHandle<()>), SqlError> {
    let shown = crate::redact_url(url);
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|_| SqlError::Connect {
        url: shown.clone(),
        message: "not a valid PostgreSQL URL".into(),
    })?;
    if let Some(password) = password {
        pg.password(password);
    }
    pg.connect_timeout(Duration::from_secs(10));
    pg.application_name(application);
    let (client, connection) = pg.connect(NoTls).await.map_err(|err| SqlError::Connect {
        url: shown,
        message: crate::error::pg_message(&err),
    })?;
    let application = application.to_owned();
    let task = tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, application, "database connection ended");
        }
    });
    Ok((client, task))
}

async fn resolve_tables(
    client: &Client,
    source: &str,
    config: &SourceConfig,
) -> Result<Vec<PgTable>, SqlError> {
    let mut tables = Vec::new();
    for table in &config.tables {
        let (schema, name) = split_qualified(&table.name);
        let schema = schema.unwrap_or("public");
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::oid, format_type(a.atttypid, a.atttypmod), \
                 a.attnotnull \
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&schema, &name],
            )
            .await
            .map_err(|err| SqlError::pg(format!("look up table {}", table.name), err))?;
        if rows.is_empty() {
            return Err(SqlError::Table {
                table: table.name.clone(),
                message: format!("does not exist in schema {schema:?}, or has no columns"),
            });
        }
        let all: Vec<(String, u32, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        for column in table.key.iter().chain(table.columns.iter().flatten()) {
            if !all.iter().any(|(c, _, _)| c == column) {
                return Err(SqlError::Table {
                    table: table.name.clone(),
                    message: format!("has no column {column:?}"),
                });
            }
        }
        // The snapshot resumes after the last key read (`(k…) > ($…)`), which a NULL
        // never satisfies, and a NULL key names no row in an event.
        let nullable: HashSet<String> = rows
            .iter()
            .filter(|r| !r.get::<_, bool>(3))
            .map(|r| r.get(0))
            .collect();
        SqlError::refuse_nullable_key(source, &table.name, &table.key, |c| nullable.contains(c))?;
        let wanted: Option<HashSet<&String>> = table
            .columns
            .as_ref()
            .map(|cols| cols.iter().chain(table.key.iter()).collect());
        let columns = all
            .into_iter()
            .filter(|(c, _, _)| wanted.as_ref().is_none_or(|w| w.contains(c)))
            .collect();
        tables.push(PgTable {
            config_name: table.name.clone(),
            schema: schema.to_owned(),
            name: name.to_owned(),
            columns,
            key: table.key.clone(),
        });
    }
    Ok(tables)
}

async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[PgTable],
) -> Result<(), SqlError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|err| SqlError::pg("look up the publication", err))?
        .is_some();
    let list = |tables: &[&PgTable]| {
        tables
            .iter()
            .map(|t| t.quoted())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !exists {
        let all: Vec<&PgTable> = tables.iter().collect();
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote(publication),
            list(&all)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|err| SqlError::pg(format!("create publication {publication}"), err))?;
        tracing::info!(publication, "publication created");
        return Ok(());
    }
    let present = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|err| SqlError::pg("look up the publication's tables", err))?;
    let present: HashSet<(String, String)> = present.iter().map(|r| (r.get(0), r.get(1))).collect();
    let missing: Vec<&PgTable> = tables
        .iter()
        .filter(|t| !present.contains(&(t.schema.clone(), t.name.clone())))
        .collect();
    if !missing.is_empty() {
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote(publication),
            list(&missing)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|err| SqlError::pg(format!("add tables to publication {publication}"), err))?;
    }
    Ok(())
}

/// Creates the slot if missing; says whether it did.
async fn ensure_slot(client: &Client, slot: &str) -> Result<bool, SqlError> {
    let exists = client
        .query_opt(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(|err| SqlError::pg("look up the replication slot", err))?;
    let elsewhere = client
        .query_opt(
            "SELECT database::text FROM pg_replication_slots WHERE slot_name = $1 AND database IS DISTINCT FROM current_database()",
            &[&slot],
        )
        .await
        .map_err(|err| SqlError::pg("look up the replication slot", err))?;
    if let Some(row) = elsewhere {
        let database: Option<String> = row.get(0);
        return Err(SqlError::Config(format!(
            "replication slot {slot} belongs to database {:?}; slot names are shared by the whole server, so set `slot` to another name",
            database.unwrap_or_default()
        )));
    }
    match exists {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            if plugin.as_deref() != Some("pgoutput") {
                return Err(SqlError::Config(format!(
                    "replication slot {slot} exists with plugin {plugin:?}; expected pgoutput"
                )));
            }
            Ok(false)
        }
        None => {
            client
                .query(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
                .map_err(|err| SqlError::pg(format!("create replication slot {slot}"), err))?;
            tracing::info!(slot, "replication slot created");
            Ok(true)
        }
    }
}

async fn slot_confirmed(client: &Client, slot: &str) -> Result<u64, SqlError> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|err| SqlError::pg("read the slot's position", err))?;
    let text: Option<String> = row.get(0);
    Ok(text.as_deref().and_then(parse_lsn).unwrap_or(0))
}

/// The next `limit` rows after `after` in key order, every column as text, then the key
/// columns again as text (for the resume point).
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_snapshot_rule_skips_exactly_what_it_saw() {
        let snap = SnapshotXids::parse("100:105:101,103").unwrap();
        assert!(snap.saw(99), "committed before xmin");
        assert!(snap.saw(100));
        assert!(!snap.saw(101), "in progress");
        assert!(snap.saw(102));
        assert!(!snap.saw(103), "in progress");
        assert!(snap.saw(104));
        assert!(!snap.saw(105), "started after");
        assert!(!snap.saw(5000));
        let empty = SnapshotXids::parse("7:7:").unwrap();
        assert!(empty.saw(6) && !empty.saw(7));
        // Second epoch: xid 3 is 2^32 + 3.
        let wrapped =
            SnapshotXids::parse(&format!("{}:{}:", (1u64 << 32) + 2, (1u64 << 32) + 5)).unwrap();
        assert!(wrapped.saw(1) && !wrapped.saw(6) && wrapped.saw(u32::MAX));
    }
}
