//! Change capture out of practice databases, as one JSON change-event schema
//! ([`ChangeEvent`], documented in `docs/change-events.md`).
//!
//! A [`ChangeSource`] yields ordered [`Batch`]es of events; each batch ends at a
//! transaction boundary and carries a resumable [`Position`]. The caller makes the events
//! durable (the agent appends them to its queue), stores the position, and only then calls
//! [`ChangeSource::committed`]; the PostgreSQL source advances its replication slot only
//! there, so the database keeps whatever the caller has not made durable.
//!
//! - `postgres.rs`: logical decoding with the built-in `pgoutput` plugin through the SQL
//!   functions, initial snapshot, heartbeat.
//! - `sqlite.rs`: polling on a watermark column, plus a delete check (`poll.rs`: the
//!   state file and insert/update/delete decision it shares with Firebird's poll mode).
//! - `mysql.rs`: MariaDB/MySQL binlog (row format) read as a replica, after a consistent
//!   snapshot at the binlog position it saw.
//!
//! Depends on no other Outpost crate: it knows nothing of the queue, routes or the hub.

#![forbid(unsafe_code)]

pub mod check;
pub mod config;
mod error;
pub mod event;
pub mod firebird;
pub mod grants;
pub mod ident;
pub mod mssql;
pub mod mysql;
pub mod pgbinary;
pub mod pgoutput;
mod poll;
pub mod postgres;
pub mod sqlite;
pub mod writeback;

use std::path::Path;

pub use config::{Mode, SourceConfig, TableConfig, Target};
pub use error::{redact_url, SqlError};
pub use event::{ChangeEvent, Op, Row};

/// Where a source stands, as an opaque string the caller stores and hands back on restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position(pub String);

/// Events up to a transaction boundary, and the position just after them.
#[derive(Debug, Clone)]
pub struct Batch {
    /// In commit order, and in order within each transaction. May be empty: a heartbeat
    /// that only moves the position on.
    pub events: Vec<ChangeEvent>,
    /// Snapshot rows already written as events (after `events`, in key order), for
    /// sources that read snapshots faster than events could be built one by one.
    pub encoded: Option<EncodedEvents>,
    /// Where to resume once these events are durable.
    pub position: Position,
}

impl Batch {
    /// Every event of the batch as values: `events`, then the encoded ones.
    pub fn all_events(&self) -> Result<Vec<ChangeEvent>, SqlError> {
        let mut all = self.events.clone();
        if let Some(encoded) = &self.encoded {
            all.extend(encoded.decode()?);
        }
        Ok(all)
    }
}

/// Change events of one table and operation, already encoded as newline-delimited JSON
/// (one [`ChangeEvent`] object per line, each line ending in `\n`). The agent queues such a
/// chunk as one item, so a snapshot of millions of rows is not millions of queue items.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvents {
    /// The table as named in the config.
    pub table: String,
    /// The operation of every event in the chunk.
    pub op: Op,
    /// How many events (lines).
    pub count: usize,
    /// The events, one JSON object per line.
    pub ndjson: Vec<u8>,
}

impl EncodedEvents {
    /// Encodes `events`, all of `table` and `op`, one per line.
    pub fn encode(table: &str, op: Op, events: &[ChangeEvent]) -> Result<Self, SqlError> {
        let mut ndjson = Vec::with_capacity(events.len() * 256);
        for event in events {
            serde_json::to_writer(&mut ndjson, event).map_err(|err| {
                SqlError::Decode(format!(
                    "a change event could not be written as JSON: {err}"
                ))
            })?;
            ndjson.push(b'\n');
        }
        Ok(EncodedEvents {
            table: table.to_owned(),
            op,
            count: events.len(),
            ndjson,
        })
    }

    /// Parses the events back into values (tests, and consumers that want values).
    pub fn decode(&self) -> Result<Vec<ChangeEvent>, SqlError> {
        self.ndjson
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| {
                serde_json::from_slice(line)
                    .map_err(|err| SqlError::Decode(format!("an encoded change event: {err}")))
            })
            .collect()
    }
}

/// A running change capture.
#[async_trait::async_trait]
pub trait ChangeSource: Send {
    /// Waits for the next batch. Cancel-safe in the sense that dropping the future loses
    /// nothing durable: the source re-reads from its last committed position.
    async fn next_batch(&mut self) -> Result<Batch, SqlError>;

    /// The caller has made every event up to `position` durable: the source may let the
    /// database forget them.
    async fn committed(&mut self, position: &Position) -> Result<(), SqlError>;

    /// Whether the next batch may be read before the caller has made the last one durable
    /// and called [`ChangeSource::committed`] (the caller then keeps a few batches in
    /// flight to its queue, in order). Only where `committed` changes nothing the next read
    /// depends on; the default is no.
    fn reads_ahead(&self) -> bool {
        false
    }

    /// How far behind the database the source is, where the database can tell (for health
    /// reports). Called between batches; the default knows nothing.
    async fn progress(&mut self) -> Result<Progress, SqlError> {
        Ok(Progress::default())
    }
}

/// What a source can say about its lag beyond the events themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// PostgreSQL: WAL bytes between the server's current position and the slot's
    /// confirmed one (`pg_wal_lsn_diff`).
    pub bytes_behind: Option<u64>,
    /// While a snapshot runs: each table (as configured) and its estimated rows
    /// (`pg_class.reltuples`, or a count).
    pub snapshot_estimates: Vec<(String, u64)>,
    /// Whether the initial snapshot is still running.
    pub snapshotting: bool,
}

/// Opens the source `name` described by `config`. `base` anchors relative paths (the
/// config file's folder); `state_dir` is this source's own folder for state files;
/// `resume` is the last position the caller stored, if any.
pub async fn open(
    name: &str,
    config: &SourceConfig,
    base: &Path,
    state_dir: &Path,
    resume: Option<Position>,
) -> Result<Box<dyn ChangeSource>, SqlError> {
    config.validate(base)?;
    match config.target(base)? {
        Target::Postgres => Ok(Box::new(
            postgres::PgSource::open(name, config, resume).await?,
        )),
        Target::MySql => Ok(Box::new(
            mysql::MySqlSource::open(name, config, resume).await?,
        )),
        Target::Sqlite(path) => Ok(Box::new(
            sqlite::SqlitePoll::open(name, config, &path, state_dir).await?,
        )),
        Target::Firebird if config.mode == Mode::Poll => Ok(Box::new(
            firebird::poll::FbPoll::open(name, config, state_dir).await?,
        )),
        Target::Firebird => Ok(Box::new(
            firebird::FbSource::open(name, config, resume).await?,
        )),
        Target::SqlServer => Ok(Box::new(mssql::MsSource::open(name, config, resume).await?)),
    }
}
