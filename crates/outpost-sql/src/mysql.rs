//! MariaDB/MySQL change capture: the binlog (row format) read as a replica would, after a
//! consistent, chunked, resumable snapshot. Written and tested against MariaDB 10.11; the
//! MySQL paths (GTID events, `FLUSH TABLES WITH READ LOCK` for the snapshot position) follow
//! the protocol documentation but are not tested against a live MySQL.
//!
//! First start:
//! 1. the server is checked: `log_bin` on, `binlog_format = ROW` (and `binlog_row_image =
//!    FULL`, else a warning: `before` then holds what the server logged);
//! 2. the snapshot runs in one `START TRANSACTION WITH CONSISTENT SNAPSHOT`; on MariaDB the
//!    binlog position of exactly that snapshot is read from `SHOW STATUS LIKE
//!    'binlog_snapshot_%'`, with no global lock (on MySQL: a brief `FLUSH TABLES WITH READ
//!    LOCK` around the start and `SHOW MASTER STATUS`). Tables are read in key order,
//!    `chunk_rows` at a time; each chunk is a batch whose position names the snapshot's
//!    binlog position, the table and the last key read, so a restart resumes after it;
//! 3. the binlog is then read from the snapshot's position: every transaction committed
//!    before the snapshot lies before it and is in the snapshot, every later one lies after
//!    it and is streamed. Nothing is missed and nothing is doubled.
//!
//! A snapshot resumed after a restart runs in a new transaction; the stream still starts at
//! the *first* snapshot's position, so changes made between the two snapshots to rows not yet
//! read appear in the later chunks and again in the stream, in order: a consumer applying
//! events in order ends in the right state.
//!
//! Stream: `COM_BINLOG_DUMP` from `file:pos` with a server id of our own (derived from the
//! source name and database, see [`replica_server_id`]), `@master_heartbeat_period` = 1 s
//! (a silent connection is noticed) and, on MariaDB, `@mariadb_slave_capability = 4` so that
//! GTID events come as such. Only row events of the configured tables of the configured
//! database become change events; each transaction ends at its `XID` event (or a `COMMIT`
//! query for non-transactional tables, or the end of a DDL statement), which is the batch
//! boundary. The position after a transaction is its end in the binlog (`file:pos`), with the
//! MariaDB GTID (`domain-server-seq`) beside it; `tx` is the GTID (or the XID where there is
//! no GTID), `commit_time` the commit event's timestamp (whole seconds: the binlog has no
//! finer clock). Transactions of other tables move the position on without events; such a
//! position is handed out at most once per `heartbeat`, so a restart after a long quiet spell
//! does not re-read the binlog from long ago.
//!
//! Column names: the binlog carries none (unless `binlog_row_metadata = FULL`), so they come
//! from `information_schema.COLUMNS`, at start and again whenever a table map's column count
//! or types no longer match (an added or dropped column, reported in the log). A table map that
//! still does not match after that (binlog written before an `ALTER TABLE` that has since
//! run) stops the source with an error naming the table and both column counts.
//!
//! Stream events carry an id `<GTID or file:pos of the commit>:<n>`, so the agent does not
//! queue a transaction twice after a crash between queueing and storing the position.

pub mod value;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts, OptsBuilder, Params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::value::{binlog_to_json, to_json, KeyValue, Kind};
use crate::ident::{quote_mysql, split_qualified};
use crate::{
    Batch, ChangeEvent, ChangeSource, EncodedEvents, Op, Position, Row, SourceConfig, SqlError,
};

/// How long a binlog connection may stay silent (the server sends a heartbeat every second
/// when it has nothing else) before it is taken for dead.
const SILENCE: Duration = Duration::from_secs(30);

/// Events of several transactions handed out in one batch at most (see `gather_ready`).
const MAX_GATHERED_EVENTS: usize = 2000;
/// The heartbeat period asked of the server, in nanoseconds.
const SERVER_HEARTBEAT_NANOS: u64 = 1_000_000_000;
/// Connecting may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binlog event types used here by number (MariaDB's are unknown to `mysql_common`).
mod event_type {
    pub const QUERY: u8 = 2;
    pub const ROTATE: u8 = 4;
    pub const XID: u8 = 16;
    pub const TABLE_MAP: u8 = 19;
    pub const HEARTBEAT: u8 = 27;
    pub const MYSQL_GTID: u8 = 33;
    pub const MYSQL_ANONYMOUS_GTID: u8 = 34;
    pub const MARIADB_GTID: u8 = 162;
}

/// A captured column.
#[derive(Debug, Clone, PartialEq)]
struct Column {
    name: String,
    kind: Kind,
    /// Configured (all columns are read, so that positions line up with the binlog).
    captured: bool,
    /// `IS_NULLABLE` says YES.
    nullable: bool,
}

/// A table as found in the database.
#[derive(Debug, Clone)]
struct MyTable {
    /// As written in the config (and in events).
    config_name: String,
    database: String,
    name: String,
    /// Every column, in table order.
    columns: Vec<Column>,
    key: Vec<String>,
    /// The configured column list, if any (besides the key).
    wanted: Option<Vec<String>>,
}

impl MyTable {
    fn quoted(&self) -> String {
        format!(
            "{}.{}",
            quote_mysql(&self.database),
            quote_mysql(&self.name)
        )
    }
}

/// A binlog position: file and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinlogPos {
    /// `binlog.000042`.
    pub file: String,
    /// The offset in it.
    pub pos: u64,
}

impl BinlogPos {
    /// `binlog.000042:1234`.
    pub fn text(&self) -> String {
        format!("{}:{}", self.file, self.pos)
    }

    /// Parses `file:pos` (the file name may itself hold colons; the offset is after the last).
    pub fn parse(text: &str) -> Option<BinlogPos> {
        let (file, pos) = text.rsplit_once(':')?;
        if file.is_empty() {
            return None;
        }
        Some(BinlogPos {
            file: file.to_owned(),
            pos: pos.parse().ok()?,
        })
    }
}

/// What the position string holds (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    /// The first snapshot's binlog position (`file:pos`); the stream starts there after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    /// Snapshot phase: the table being read (index into the config's tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<usize>,
    /// Snapshot phase: the last key read in that table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<Vec<KeyValue>>,
    /// Stream phase: resume reading the binlog here (`file:pos`, a transaction boundary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    binlog: Option<String>,
    /// Stream phase: the GTID of the last transaction before `binlog`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gtid: Option<String>,
}

enum Phase {
    Snapshot {
        table: usize,
        after: Option<Vec<KeyValue>>,
        /// The snapshot transaction is open on the query connection.
        open: bool,
    },
    Stream,
}

/// The transaction the stream is in.
#[derive(Default)]
struct OpenTx {
    /// The stream is between a transaction's start and its commit.
    active: bool,
    gtid: Option<String>,
    events: Vec<ChangeEvent>,
}

/// A MariaDB/MySQL source.
pub struct MySqlSource {
    name: String,
    opts: Opts,
    /// The query connection (snapshot, metadata); absent while not needed.
    conn: Option<Conn>,
    mariadb: bool,
    tables: Vec<MyTable>,
    server_id: u32,
    phase: Phase,
    /// The first snapshot's binlog position.
    snapshot_at: Option<BinlogPos>,
    /// Where the stream stands: after the last whole transaction read.
    at: BinlogPos,
    /// The GTID of the last whole transaction read.
    gtid: Option<String>,
    /// The binlog file the stream is reading.
    file: String,
    stream: Option<BinlogStream>,
    /// Binlog table id → index into `tables` (`None`: not captured).
    table_ids: HashMap<u64, Option<usize>>,
    tx: OpenTx,
    chunk_rows: u32,
    heartbeat: Duration,
    last_yield: Instant,
    /// The position last handed out.
    yielded: Option<BinlogPos>,
}

impl MySqlSource {
    /// Connects, checks the server's binlog settings and the tables, and prepares to resume
    /// from `resume` (or to take a snapshot).
    pub async fn open(
        name: &str,
        config: &SourceConfig,
        resume: Option<Position>,
    ) -> Result<MySqlSource, SqlError> {
        let opts = options(config)?;
        let database = opts.db_name().map(str::to_owned).ok_or_else(|| {
            SqlError::Config(
                "url: expected the database in the path, like mysql://user@127.0.0.1:3306/pms"
                    .into(),
            )
        })?;
        let mut conn = connect(&opts, &config.url).await?;
        let mariadb = check_server(&mut conn).await?;
        let mut tables = Vec::with_capacity(config.tables.len());
        for table in &config.tables {
            let (db, name_only) = split_qualified(&table.name);
            let mut spec = MyTable {
                config_name: table.name.clone(),
                database: db.unwrap_or(&database).to_owned(),
                name: name_only.to_owned(),
                columns: Vec::new(),
                key: table.key.clone(),
                wanted: table.columns.clone(),
            };
            spec.columns = read_columns(&mut conn, &spec).await?;
            // The snapshot resumes after the last key read (`k > ?`), which a NULL never
            // satisfies, and a NULL key names no row in an event.
            SqlError::refuse_nullable_key(name, &spec.config_name, &spec.key, |key| {
                spec.columns.iter().any(|c| c.name == key && c.nullable)
            })?;
            tables.push(spec);
        }
        let server_own: u32 = conn
            .query_first::<u32, _>("SELECT @@server_id")
            .await
            .map_err(|err| my("read the server id", err))?
            .unwrap_or(0);
        let mut server_id = replica_server_id(name, &database);
        if server_id == server_own {
            server_id = server_id.wrapping_add(1).max(1);
        }

        let stored = match resume {
            Some(Position(text)) => Some(
                serde_json::from_str::<Stored>(&text)
                    .map_err(|err| SqlError::Position(err.to_string()))?,
            ),
            None => None,
        };
        let parse = |text: &str| {
            BinlogPos::parse(text).ok_or_else(|| SqlError::Position(format!("binlog {text:?}")))
        };
        let mut source = MySqlSource {
            name: name.to_owned(),
            opts,
            conn: Some(conn),
            mariadb,
            tables,
            server_id,
            phase: Phase::Snapshot {
                table: 0,
                after: None,
                open: false,
            },
            snapshot_at: None,
            at: BinlogPos {
                file: String::new(),
                pos: 4,
            },
            gtid: None,
            file: String::new(),
            stream: None,
            table_ids: HashMap::new(),
            tx: OpenTx::default(),
            chunk_rows: config.chunk_rows,
            heartbeat: config.heartbeat,
            last_yield: Instant::now(),
            yielded: None,
        };
        if let Some(stored) = stored {
            if let Some(text) = &stored.snapshot {
                source.snapshot_at = Some(parse(text)?);
            }
            match (stored.table, &stored.binlog) {
                (Some(table), _) if source.snapshot_at.is_some() => {
                    source.phase = Phase::Snapshot {
                        table,
                        after: stored.after,
                        open: false,
                    };
                    tracing::info!(table, "resuming the snapshot");
                }
                (_, Some(binlog)) => {
                    source.at = parse(binlog)?;
                    source.gtid = stored.gtid;
                    source.yielded = Some(source.at.clone());
                    source.phase = Phase::Stream;
                    tracing::info!(binlog = %source.at.text(), "resuming the binlog stream");
                }
                _ => {}
            }
        }
        if matches!(source.phase, Phase::Stream) {
            // Not needed until a table map changes.
            source.conn = None;
        }
        Ok(source)
    }

    fn position(&self, stored: Stored) -> Position {
        Position(serde_json::to_string(&stored).unwrap_or_default())
    }

    fn stream_position(&self) -> Position {
        self.position(Stored {
            snapshot: self.snapshot_at.as_ref().map(BinlogPos::text),
            binlog: Some(self.at.text()),
            gtid: self.gtid.clone(),
            ..Stored::default()
        })
    }

    async fn query_conn(&mut self) -> Result<&mut Conn, SqlError> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.opts, "").await?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| SqlError::db("connect", "no connection"))
    }

    /// One snapshot chunk; the last one also ends the snapshot transaction (so that it
    /// holds no metadata lock a moment longer) and switches to streaming.
    async fn snapshot_batch(&mut self) -> Result<Batch, SqlError> {
        let mut events = Vec::new();
        loop {
            let Phase::Snapshot { table, after, open } = &self.phase else {
                return Ok(Batch {
                    encoded: None,
                    events,
                    position: self.stream_position(),
                });
            };
            let (index, mut after_key, was_open) = (*table, after.clone(), *open);
            if index >= self.tables.len() {
                return self.end_snapshot(was_open, events).await;
            }
            if !was_open {
                let mariadb = self.mariadb;
                let conn = self.query_conn().await?;
                let at = begin_snapshot(conn, mariadb).await?;
                tracing::info!(binlog = %at.text(), tables = self.tables.len(), "snapshot started");
                if self.snapshot_at.is_none() {
                    self.snapshot_at = Some(at);
                }
                if let Phase::Snapshot { open, .. } = &mut self.phase {
                    *open = true;
                }
            }
            let at_text = self
                .snapshot_at
                .as_ref()
                .map(BinlogPos::text)
                .ok_or_else(|| SqlError::Binlog("the snapshot has no binlog position".into()))?;
            let Some(spec) = self.tables.get(index).cloned() else {
                continue;
            };
            let chunk_rows = self.chunk_rows;
            let conn = self.query_conn().await?;
            let rows = read_chunk(conn, &spec, after_key.as_deref(), chunk_rows).await?;
            let full = rows.len() >= chunk_rows as usize;
            for row in rows {
                let mut after_row = Row::new();
                for (i, column) in spec.columns.iter().enumerate() {
                    if !column.captured {
                        continue;
                    }
                    let value = row.as_ref(i).cloned().unwrap_or(mysql_async::Value::NULL);
                    after_row.insert(column.name.clone(), to_json(&column.kind, &value));
                }
                let key_values = spec
                    .key
                    .iter()
                    .map(|k| {
                        // Resuming after a made-up key would skip or repeat rows.
                        match spec
                            .columns
                            .iter()
                            .position(|c| &c.name == k)
                            .and_then(|i| row.as_ref(i))
                        {
                            None | Some(mysql_async::Value::NULL) => {
                                Err(SqlError::null_key(&spec.config_name, k))
                            }
                            Some(value) => Ok(KeyValue::from_value(value)),
                        }
                    })
                    .collect::<Result<Vec<KeyValue>, SqlError>>()?;
                events.push(ChangeEvent {
                    source: self.name.clone(),
                    table: spec.config_name.clone(),
                    op: Op::Snapshot,
                    key: key_of(&spec.key, &after_row),
                    before: None,
                    after: Some(after_row),
                    position: Some(at_text.clone()),
                    tx: None,
                    commit_time: None,
                    id: None,
                });
                after_key = Some(key_values);
            }
            let (next_table, next_after) = if full {
                (index, after_key)
            } else {
                (index + 1, None)
            };
            if let Phase::Snapshot { table, after, .. } = &mut self.phase {
                *table = next_table;
                after.clone_from(&next_after);
            }
            if events.is_empty() || next_table >= self.tables.len() {
                continue;
            }
            // One queue item for the chunk, not one per row.
            let encoded = EncodedEvents::encode(&spec.config_name, Op::Snapshot, &events)?;
            return Ok(Batch {
                encoded: Some(encoded),
                events: Vec::new(),
                position: self.position(Stored {
                    snapshot: Some(at_text),
                    table: Some(next_table),
                    after: next_after,
                    ..Stored::default()
                }),
            });
        }
    }

    /// Ends the snapshot transaction and switches to streaming from the first snapshot's
    /// position; `events` (the last chunk) go out with the stream's position.
    async fn end_snapshot(
        &mut self,
        open: bool,
        events: Vec<ChangeEvent>,
    ) -> Result<Batch, SqlError> {
        let snapshot_at = self
            .snapshot_at
            .clone()
            .ok_or_else(|| SqlError::Binlog("the snapshot has no binlog position".into()))?;
        if open {
            let conn = self.query_conn().await?;
            conn.query_drop("COMMIT")
                .await
                .map_err(|err| my("end the snapshot", err))?;
        }
        self.conn = None;
        self.phase = Phase::Stream;
        self.at = snapshot_at;
        self.file = self.at.file.clone();
        self.last_yield = Instant::now();
        self.yielded = Some(self.at.clone());
        tracing::info!(binlog = %self.at.text(), "snapshot done; streaming");
        Ok(Batch {
            encoded: None,
            events,
            position: self.stream_position(),
        })
    }

    /// Opens the binlog stream at `self.at`.
    async fn open_stream(&mut self) -> Result<(), SqlError> {
        let mut conn = connect(&self.opts, "").await?;
        let mut setup = vec![format!(
            "SET @master_heartbeat_period = {SERVER_HEARTBEAT_NANOS}"
        )];
        if self.mariadb {
            // GTID events as such (not rewritten into BEGIN queries).
            setup.push("SET @mariadb_slave_capability = 4".into());
        }
        for sql in setup {
            conn.query_drop(sql)
                .await
                .map_err(|err| my("set up the binlog connection", err))?;
        }
        let file = self.at.file.clone();
        let request = BinlogStreamRequest::new(self.server_id)
            .with_filename(file.as_bytes())
            .with_pos(self.at.pos);
        let stream = conn
            .get_binlog_stream(request)
            .await
            .map_err(|err| binlog_error(&self.name, &self.at, err))?;
        self.stream = Some(stream);
        self.file = self.at.file.clone();
        self.tx = OpenTx::default();
        self.table_ids.clear();
        tracing::info!(binlog = %self.at.text(), server_id = self.server_id, "binlog stream opened");
        Ok(())
    }

    /// Reads the binlog until a transaction with captured changes commits, or a heartbeat
    /// position is due.
    async fn stream_batch(&mut self) -> Result<Batch, SqlError> {
        if self.stream.is_none() {
            self.open_stream().await?;
        }
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Err(SqlError::Binlog("the binlog stream is not open".into()));
            };
            let next = match tokio::time::timeout(SILENCE, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    self.stream = None;
                    return Err(SqlError::Binlog(format!(
                        "no binlog event or heartbeat from the server for {} s",
                        SILENCE.as_secs()
                    )));
                }
            };
            let event = match next {
                Some(Ok(event)) => event,
                Some(Err(err)) => {
                    self.stream = None;
                    return Err(binlog_error(&self.name, &self.at, err));
                }
                None => {
                    self.stream = None;
                    return Err(SqlError::Binlog(
                        "the server ended the binlog stream".into(),
                    ));
                }
            };
            if let Some(batch) = self.handle(&event).await? {
                return self.gather_ready(batch).await;
            }
        }
    }

    /// Adds the transactions whose events have already arrived to `batch`, so that a busy
    /// server costs one queue commit per read rather than one per transaction. Stops at the
    /// first event not yet here; a transaction it began stays open for the next read.
    async fn gather_ready(&mut self, mut batch: Batch) -> Result<Batch, SqlError> {
        use futures::FutureExt;
        while batch.events.len() < MAX_GATHERED_EVENTS {
            let Some(stream) = self.stream.as_mut() else {
                break;
            };
            let event = match stream.next().now_or_never() {
                Some(Some(Ok(event))) => event,
                Some(Some(Err(err))) => {
                    // The batch so far ends at a commit; the next read reopens the stream
                    // there (and reports the error if it persists).
                    tracing::debug!(error = %err, "binlog stream failed after a batch; reopening on the next read");
                    self.stream = None;
                    break;
                }
                Some(None) => {
                    self.stream = None;
                    break;
                }
                None => break,
            };
            if let Some(more) = self.handle(&event).await? {
                batch.events.extend(more.events);
                batch.position = more.position;
            }
        }
        Ok(batch)
    }

    /// Handles one binlog event; returns a batch at a transaction boundary when one is due.
    async fn handle(
        &mut self,
        event: &mysql_async::binlog::events::Event,
    ) -> Result<Option<Batch>, SqlError> {
        let header = event.header();
        let kind = header.event_type_raw();
        let end = u64::from(header.log_pos());
        match kind {
            event_type::ROTATE => {
                // The server's first, made-up rotate (log_pos 0) names the file we asked
                // for, and is read before the checksum setting is known: skip it.
                if end != 0 {
                    if let Ok(Some(EventData::RotateEvent(rotate))) = event.read_data() {
                        self.file = rotate.name().into_owned();
                        if !self.tx.active {
                            self.at = BinlogPos {
                                file: self.file.clone(),
                                pos: rotate.position(),
                            };
                        }
                    }
                }
                Ok(None)
            }
            event_type::MARIADB_GTID => {
                let data = event.data();
                let standalone = data.get(12).is_some_and(|flags| flags & 1 != 0);
                let gtid = match (data.get(..8), data.get(8..12)) {
                    (Some(seq), Some(domain)) => {
                        let seq = u64::from_le_bytes(seq.try_into().unwrap_or([0; 8]));
                        let domain = u32::from_le_bytes(domain.try_into().unwrap_or([0; 4]));
                        Some(format!("{domain}-{}-{seq}", header.server_id()))
                    }
                    _ => None,
                };
                self.tx = OpenTx {
                    active: !standalone,
                    gtid,
                    events: Vec::new(),
                };
                Ok(None)
            }
            event_type::MYSQL_GTID | event_type::MYSQL_ANONYMOUS_GTID => {
                let gtid = match event.read_data() {
                    Ok(Some(EventData::GtidEvent(gtid))) => {
                        Some(format!("{}:{}", format_uuid(&gtid.sid()), gtid.gno()))
                    }
                    _ => None,
                };
                // BEGIN follows; a DDL statement does not open a transaction.
                self.tx = OpenTx {
                    active: false,
                    gtid,
                    events: Vec::new(),
                };
                Ok(None)
            }
            event_type::QUERY => {
                let query = match event.read_data() {
                    Ok(Some(EventData::QueryEvent(query))) => query.query().into_owned(),
                    _ => String::new(),
                };
                let statement = query.trim().to_ascii_uppercase();
                if statement == "BEGIN" {
                    self.tx.active = true;
                    Ok(None)
                } else if statement == "COMMIT" || !self.tx.active {
                    // A commit of non-transactional changes, or a statement of its own (DDL).
                    self.commit(end, header.timestamp(), None)
                } else if statement == "ROLLBACK" {
                    self.tx.events.clear();
                    self.commit(end, header.timestamp(), None)
                } else {
                    Ok(None)
                }
            }
            event_type::XID => {
                let xid = match event.read_data() {
                    Ok(Some(EventData::XidEvent(xid))) => Some(xid.xid),
                    _ => None,
                };
                self.commit(end, header.timestamp(), xid)
            }
            event_type::TABLE_MAP => {
                if let Ok(Some(EventData::TableMapEvent(tme))) = event.read_data() {
                    let database = tme.database_name().into_owned();
                    let table = tme.table_name().into_owned();
                    let index = self
                        .tables
                        .iter()
                        .position(|t| t.database == database && t.name == table);
                    if let Some(index) = index {
                        let count = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
                        self.check_table_map(index, count).await?;
                    }
                    self.table_ids.insert(tme.table_id(), index);
                }
                Ok(None)
            }
            event_type::HEARTBEAT => {
                // Nothing new; hand out a position moved by other tables' transactions.
                Ok(self.heartbeat_due().then(|| self.heartbeat_batch()))
            }
            _ => {
                if let Ok(Some(EventData::RowsEvent(rows))) = event.read_data() {
                    let start = end.saturating_sub(u64::from(header.event_size()));
                    self.rows_event(&rows, start)?;
                }
                Ok(None)
            }
        }
    }

    /// A transaction ended at `end` in the current file.
    fn commit(
        &mut self,
        end: u64,
        timestamp: u32,
        xid: Option<u64>,
    ) -> Result<Option<Batch>, SqlError> {
        let tx = std::mem::take(&mut self.tx);
        if end != 0 {
            self.at = BinlogPos {
                file: self.file.clone(),
                pos: end,
            };
        }
        if tx.gtid.is_some() {
            self.gtid.clone_from(&tx.gtid);
        }
        if tx.events.is_empty() {
            return Ok(self.heartbeat_due().then(|| self.heartbeat_batch()));
        }
        let tx_id = tx.gtid.clone().or_else(|| xid.map(|x| x.to_string()));
        let id_base = tx.gtid.clone().unwrap_or_else(|| self.at.text());
        let commit_time = commit_time(timestamp);
        let mut events = tx.events;
        for (index, event) in events.iter_mut().enumerate() {
            event.tx.clone_from(&tx_id);
            event.commit_time.clone_from(&commit_time);
            event.id = Some(format!("{id_base}:{index}"));
        }
        self.last_yield = Instant::now();
        self.yielded = Some(self.at.clone());
        Ok(Some(Batch {
            encoded: None,
            events,
            position: self.stream_position(),
        }))
    }

    fn heartbeat_due(&self) -> bool {
        !self.tx.active
            && self.yielded.as_ref() != Some(&self.at)
            && self.last_yield.elapsed() >= self.heartbeat
    }

    fn heartbeat_batch(&mut self) -> Batch {
        self.last_yield = Instant::now();
        self.yielded = Some(self.at.clone());
        Batch {
            encoded: None,
            events: Vec::new(),
            position: self.stream_position(),
        }
    }

    /// Re-reads a captured table's columns when a table map's column count no longer
    /// matches; fails when it still does not.
    async fn check_table_map(&mut self, index: usize, count: usize) -> Result<(), SqlError> {
        let Some(known) = self.tables.get(index).map(|t| t.columns.len()) else {
            return Ok(());
        };
        if known == count {
            return Ok(());
        }
        let Some(spec) = self.tables.get(index).cloned() else {
            return Ok(());
        };
        let conn = self.query_conn().await?;
        let mut fresh = read_columns(conn, &spec).await?;
        // Columns after the last one the user may read are hidden from it too (column
        // grants): with a column list configured, the binlog's count stands for them.
        if spec.wanted.is_some() && fresh.len() < count && known < count {
            while fresh.len() < count {
                fresh.push(hidden_column(fresh.len() + 1));
            }
        }
        let added: Vec<&str> = fresh
            .iter()
            .filter(|c| !is_hidden(c))
            .filter(|c| !spec.columns.iter().any(|o| o.name == c.name))
            .map(|c| c.name.as_str())
            .collect();
        let dropped: Vec<&str> = spec
            .columns
            .iter()
            .filter(|c| !fresh.iter().any(|n| n.name == c.name))
            .map(|c| c.name.as_str())
            .collect();
        if added.is_empty() && dropped.is_empty() {
            tracing::debug!(table = %spec.config_name, count, "columns the user may not read stand in for the rest of the binlog's");
        } else {
            tracing::warn!(
                table = %spec.config_name,
                ?added,
                ?dropped,
                "the table's columns changed; column names re-read from information_schema"
            );
        }
        if fresh.len() != count {
            return Err(SqlError::Table {
                table: spec.config_name.clone(),
                message: format!(
                    "the binlog at {} has {count} columns for it but the table now has {} \
                     (a column was added or dropped after this change was written); column names \
                     cannot be matched. Take a new snapshot to go on from the table as it is \
                     now: run `outpost sql reset {} --config FILE`",
                    self.at.text(),
                    fresh.len(),
                    self.name
                ),
            });
        }
        if let Some(table) = self.tables.get_mut(index) {
            table.columns = fresh;
        }
        Ok(())
    }

    /// Turns a rows event of a captured table into events of the open transaction.
    fn rows_event(&mut self, rows: &RowsEventData<'_>, start: u64) -> Result<(), SqlError> {
        let table_id = rows.table_id();
        let Some(Some(index)) = self.table_ids.get(&table_id).copied() else {
            return Ok(());
        };
        let Some(spec) = self.tables.get(index) else {
            return Ok(());
        };
        let Some(tme) = self.stream.as_ref().and_then(|s| s.get_tme(table_id)) else {
            return Err(SqlError::Binlog(format!(
                "a rows event of table {} came before its table map",
                spec.config_name
            )));
        };
        let op = match rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => Op::Insert,
            RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => Op::Update,
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => Op::Delete,
        };
        let before_columns: Vec<usize> = rows
            .columns_before_image()
            .map(|bits| bits.iter_ones().collect())
            .unwrap_or_default();
        let after_columns: Vec<usize> = rows
            .columns_after_image()
            .map(|bits| bits.iter_ones().collect())
            .unwrap_or_default();
        let position = BinlogPos {
            file: self.file.clone(),
            pos: start,
        }
        .text();
        let to_row = |image: &mysql_async::binlog::row::BinlogRow, columns: &[usize]| -> Row {
            let mut row = Row::new();
            for (slot, &column_index) in columns.iter().enumerate() {
                let Some(column) = spec.columns.get(column_index) else {
                    continue;
                };
                if !column.captured {
                    continue;
                }
                let Some(value) = image.as_ref(slot) else {
                    continue;
                };
                row.insert(column.name.clone(), binlog_to_json(&column.kind, value));
            }
            row
        };
        let mut events = Vec::new();
        for pair in rows.rows(tme) {
            let (before, after) = pair.map_err(|err| {
                SqlError::Binlog(format!(
                    "decode a row of table {} at {position}: {err}",
                    spec.config_name
                ))
            })?;
            let before = before.as_ref().map(|image| to_row(image, &before_columns));
            let after = after.as_ref().map(|image| to_row(image, &after_columns));
            let key = match (&after, &before) {
                (Some(after), _) if op != Op::Delete => key_of(&spec.key, after),
                (_, Some(before)) => key_of(&spec.key, before),
                (Some(after), None) => key_of(&spec.key, after),
                (None, None) => Row::new(),
            };
            events.push(ChangeEvent {
                source: self.name.clone(),
                table: spec.config_name.clone(),
                op,
                key,
                before,
                after,
                position: Some(position.clone()),
                tx: None,
                commit_time: None,
                id: None,
            });
        }
        self.tx.events.append(&mut events);
        Ok(())
    }
}

#[async_trait::async_trait]
impl ChangeSource for MySqlSource {
    /// `committed` does nothing here (a restart resumes from the stored position), so the
    /// snapshot's chunks may go to the queue while the next is read.
    fn reads_ahead(&self) -> bool {
        matches!(self.phase, Phase::Snapshot { .. })
    }

    async fn next_batch(&mut self) -> Result<Batch, SqlError> {
        match self.phase {
            Phase::Snapshot { .. } => self.snapshot_batch().await,
            Phase::Stream => self.stream_batch().await,
        }
    }

    /// The binlog keeps nothing for a replica (the server removes old files by age:
    /// `binlog_expire_logs_seconds`), so there is nothing to tell it.
    async fn committed(&mut self, _position: &Position) -> Result<(), SqlError> {
        Ok(())
    }
}

/// The server id this source reads the binlog under: stable for a source and database (so
/// the server ends a dead connection of ours when we come back), in `0x4000_0000..0x8000_0000`
/// (away from the small ids servers are usually given).
pub fn replica_server_id(source: &str, database: &str) -> u32 {
    // FNV-1a, stable across builds.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in format!("outpost:{source}:{database}").bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    0x4000_0000 | (hash & 0x3fff_ffff)
}

fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn commit_time(timestamp: u32) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(i64::from(timestamp))
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn key_of(key: &[String], row: &Row) -> Row {
    key.iter()
        .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// A MySQL error with what was being done; the server's message names objects, never values.
fn my(context: impl Into<String>, err: mysql_async::Error) -> SqlError {
    SqlError::db(context, err)
}

/// An error of the binlog stream, with advice for the ones that need a person.
fn binlog_error(source: &str, at: &BinlogPos, err: mysql_async::Error) -> SqlError {
    let text = err.to_string();
    if let mysql_async::Error::Server(server) = &err {
        if server.code == 1236 {
            return SqlError::Binlog(format!(
                "the server cannot send the binlog from {}: {} (the file may have been removed \
                 by binlog_expire_logs_seconds while the agent was away): run `outpost sql reset \
                 {source} --config FILE` to take a new snapshot",
                at.text(),
                server.message
            ));
        }
        if server.code == 1227 || server.code == 1045 {
            return SqlError::Binlog(format!(
                "{text} (the user needs REPLICATION SLAVE and REPLICATION CLIENT, see docs/change-events.md)"
            ));
        }
    }
    SqlError::Binlog(format!("read from {}: {text}", at.text()))
}

/// Connection options from the URL (`mariadb://` read as `mysql://`) and the password
/// settings; the session runs in UTC and `utf8mb4`.
fn options(config: &SourceConfig) -> Result<Opts, SqlError> {
    options_from(&config.url, config.password()?)
}

/// [`options`] for a URL and a password read elsewhere (`outpost sql check`).
pub(crate) fn options_from(url: &str, password: Option<String>) -> Result<Opts, SqlError> {
    let plain = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    };
    let opts = Opts::from_url(&plain).map_err(|err| SqlError::Connect {
        url: crate::redact_url(url),
        message: format!("not a valid mysql:// URL: {err}"),
    })?;
    let mut builder = OptsBuilder::from_opts(opts)
        .prefer_socket(false)
        .init(vec!["SET time_zone = '+00:00'", "SET NAMES utf8mb4"]);
    if let Some(password) = password {
        builder = builder.pass(Some(password));
    }
    Ok(Opts::from(builder))
}

/// Connects within `CONNECT_TIMEOUT`; errors name the URL without its password.
pub(crate) async fn connect(opts: &Opts, url: &str) -> Result<Conn, SqlError> {
    let shown = if url.is_empty() {
        format!(
            "mysql://{}@{}:{}/{}",
            opts.user().unwrap_or_default(),
            opts.ip_or_hostname(),
            opts.tcp_port(),
            opts.db_name().unwrap_or_default()
        )
    } else {
        crate::redact_url(url)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts.clone())).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(SqlError::Connect {
            url: shown,
            message: err.to_string(),
        }),
        Err(_) => Err(SqlError::Connect {
            url: shown,
            message: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// Checks that the binlog is on and in row format; says whether the server is MariaDB.
async fn check_server(conn: &mut Conn) -> Result<bool, SqlError> {
    #[allow(clippy::type_complexity)]
    let row: Option<(String, Option<String>, Option<String>, Option<String>)> = conn
        .query_first(
            "SELECT VERSION(), CAST(@@GLOBAL.log_bin AS CHAR), @@GLOBAL.binlog_format, \
             @@GLOBAL.binlog_row_image",
        )
        .await
        .map_err(|err| my("read the server's binlog settings", err))?;
    let Some((version, log_bin, format, image)) = row else {
        return Err(SqlError::Binlog(
            "the server's binlog settings could not be read".into(),
        ));
    };
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    if !matches!(log_bin.as_deref(), Some("1" | "ON")) {
        return Err(SqlError::Binlog(
            "the server's binary log is off: start it with log_bin (and binlog_format = ROW, a server_id)".into(),
        ));
    }
    if !format
        .as_deref()
        .is_some_and(|f| f.eq_ignore_ascii_case("ROW"))
    {
        return Err(SqlError::Binlog(format!(
            "binlog_format is {}; change capture needs ROW (SET GLOBAL binlog_format = 'ROW' and in the server's config)",
            format.unwrap_or_default()
        )));
    }
    if !image
        .as_deref()
        .is_some_and(|i| i.eq_ignore_ascii_case("FULL"))
    {
        tracing::warn!(
            binlog_row_image = image.as_deref().unwrap_or_default(),
            "binlog_row_image is not FULL: `before` holds only what the server logs (the key, for MINIMAL)"
        );
    }
    tracing::info!(version, "connected to the database");
    Ok(mariadb)
}

/// A table's columns from `information_schema.COLUMNS`, in table order.
async fn read_columns(conn: &mut Conn, table: &MyTable) -> Result<Vec<Column>, SqlError> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(String, String, String, Option<String>, Option<u64>, u64, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, CHARACTER_OCTET_LENGTH, \
             ORDINAL_POSITION, IS_NULLABLE \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (table.database.as_str(), table.name.as_str()),
        )
        .await
        .map_err(|err| my(format!("look up table {}", table.config_name), err))?;
    if rows.is_empty() {
        return Err(SqlError::Table {
            table: table.config_name.clone(),
            message: format!(
                "does not exist in database {:?}, or the user may not SELECT from it",
                table.database
            ),
        });
    }
    for column in table.key.iter().chain(table.wanted.iter().flatten()) {
        if !rows.iter().any(|(name, ..)| name == column) {
            return Err(SqlError::Table {
                table: table.config_name.clone(),
                message: format!("has no column {column:?}"),
            });
        }
    }
    // A user granted SELECT on some columns only (what `outpost sql grants` prints when the
    // config lists columns) does not see the others in information_schema, but the binlog
    // carries every column: hidden ones become uncaptured placeholders at their positions,
    // so the visible ones keep theirs.
    let mut columns = Vec::with_capacity(rows.len());
    for (name, data_type, column_type, charset, octets, ordinal, nullable) in rows {
        let ordinal = usize::try_from(ordinal).unwrap_or(usize::MAX);
        while columns.len() + 1 < ordinal {
            columns.push(hidden_column(columns.len() + 1));
        }
        let captured = table
            .wanted
            .as_ref()
            .is_none_or(|w| w.contains(&name) || table.key.contains(&name));
        columns.push(Column {
            kind: Kind::from_schema(&data_type, &column_type, charset.as_deref(), octets),
            name,
            captured,
            nullable: !nullable.eq_ignore_ascii_case("NO"),
        });
    }
    Ok(columns)
}

/// Whether a column is a stand-in for one the user may not read.
fn is_hidden(column: &Column) -> bool {
    !column.captured && column.name.starts_with('#')
}

/// A column the user may not read (column-level grants): never captured.
fn hidden_column(ordinal: usize) -> Column {
    Column {
        name: format!("#{ordinal}"),
        kind: Kind::Binary { pad: None },
        captured: false,
        nullable: true,
    }
}

/// Starts the snapshot transaction and returns the binlog position it corresponds to.
async fn begin_snapshot(conn: &mut Conn, mariadb: bool) -> Result<BinlogPos, SqlError> {
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(|err| my("begin the snapshot", err))?;
    if mariadb {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            .await
            .map_err(|err| my("begin the snapshot", err))?;
        let rows: Vec<(String, String)> = conn
            .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
            .await
            .map_err(|err| my("read the snapshot's binlog position", err))?;
        let get = |name: &str| {
            rows.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let file = get("binlog_snapshot_file").unwrap_or_default();
        let pos = get("binlog_snapshot_position").and_then(|p| p.parse().ok());
        match (file.is_empty(), pos) {
            (false, Some(pos)) => Ok(BinlogPos { file, pos }),
            _ => Err(SqlError::Binlog(
                "the server gave no binlog_snapshot_file/position for the snapshot".into(),
            )),
        }
    } else {
        // MySQL has no snapshot position: hold writes for as long as it takes to start the
        // transaction and read the position (needs RELOAD).
        conn.query_drop("FLUSH TABLES WITH READ LOCK")
            .await
            .map_err(|err| my("lock tables for the snapshot position (needs RELOAD)", err))?;
        let started = async {
            conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                .await
                .map_err(|err| my("begin the snapshot", err))?;
            let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
                Ok(row) => row,
                Err(_) => conn
                    .query_first("SHOW BINARY LOG STATUS")
                    .await
                    .map_err(|err| my("read the binlog position", err))?,
            };
            let row = row.ok_or_else(|| SqlError::Binlog("the binary log is off".into()))?;
            let file: Option<String> = row.get(0);
            let pos: Option<u64> = row.get(1);
            match (file, pos) {
                (Some(file), Some(pos)) => Ok(BinlogPos { file, pos }),
                _ => Err(SqlError::Binlog(
                    "SHOW MASTER STATUS gave no position".into(),
                )),
            }
        }
        .await;
        conn.query_drop("UNLOCK TABLES")
            .await
            .map_err(|err| my("unlock tables", err))?;
        started
    }
}

/// The next `limit` rows after `after` in key order, every column (binary protocol).
async fn read_chunk(
    conn: &mut Conn,
    table: &MyTable,
    after: Option<&[KeyValue]>,
    limit: u32,
) -> Result<Vec<mysql_async::Row>, SqlError> {
    // A column the user may not read is selected as NULL, so positions stay aligned.
    let select: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            if is_hidden(c) {
                "NULL".to_owned()
            } else {
                quote_mysql(&c.name)
            }
        })
        .collect();
    let keys: Vec<String> = table.key.iter().map(|k| quote_mysql(k)).collect();
    let mut sql = format!("SELECT {} FROM {}", select.join(", "), table.quoted());
    let mut params = Vec::new();
    if let Some(after) = after {
        // (a, b) > (x, y) written out, which every version's optimizer uses as a range:
        // a > x OR (a = x AND b > y)
        let mut alternatives = Vec::new();
        for i in 0..keys.len() {
            let mut terms = Vec::new();
            for (j, key) in keys.iter().enumerate().take(i) {
                terms.push(format!("{key} = ?"));
                params.push(
                    after
                        .get(j)
                        .map(KeyValue::to_value)
                        .unwrap_or(mysql_async::Value::NULL),
                );
            }
            terms.push(format!("{} > ?", keys[i]));
            params.push(
                after
                    .get(i)
                    .map(KeyValue::to_value)
                    .unwrap_or(mysql_async::Value::NULL),
            );
            alternatives.push(format!("({})", terms.join(" AND ")));
        }
        sql.push_str(&format!(" WHERE {}", alternatives.join(" OR ")));
    }
    sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", keys.join(", ")));
    let params = if params.is_empty() {
        Params::Empty
    } else {
        Params::Positional(params)
    };
    conn.exec(sql, params)
        .await
        .map_err(|err| my(format!("read table {}", table.config_name), err))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn binlog_positions_round_trip() {
        let pos = BinlogPos::parse("binlog.000042:1234").unwrap();
        assert_eq!(pos.file, "binlog.000042");
        assert_eq!(pos.pos, 1234);
        assert_eq!(pos.text(), "binlog.000042:1234");
        assert_eq!(BinlogPos::parse("a:b:7").unwrap().file, "a:b");
        assert!(BinlogPos::parse("binlog.000042").is_none());
        assert!(BinlogPos::parse(":7").is_none());
    }

    #[test]
    fn server_ids_are_stable_and_out_of_the_usual_range() {
        let a = replica_server_id("pms", "practice");
        assert_eq!(a, replica_server_id("pms", "practice"));
        assert_ne!(a, replica_server_id("pms", "other"));
        assert!((0x4000_0000..0x8000_0000).contains(&a));
    }

    #[test]
    fn stored_positions_are_compact_json() {
        let stored = Stored {
            binlog: Some("binlog.000001:1001".into()),
            gtid: Some("0-1-4".into()),
            ..Stored::default()
        };
        assert_eq!(
            serde_json::to_string(&stored).unwrap(),
            r#"{"binlog":"binlog.000001:1001","gtid":"0-1-4"}"#
        );
        let snapshot = Stored {
            snapshot: Some("binlog.000001:1001".into()),
            table: Some(1),
            after: Some(vec![KeyValue::Int(42)]),
            ..Stored::default()
        };
        assert_eq!(
            serde_json::to_string(&snapshot).unwrap(),
            r#"{"snapshot":"binlog.000001:1001","table":1,"after":[{"int":42}]}"#
        );
    }
}
