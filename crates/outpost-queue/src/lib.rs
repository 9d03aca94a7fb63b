//! Durable, encrypted store-and-forward queue on one SQLite file (WAL mode).
//!
//! Sources [`Queue::append`] items and may acknowledge their peer once that returns: the
//! item is then on disk. Each item carries one delivery per sink; a sink takes its oldest
//! pending delivery ([`Queue::next_delivery`]), and records the result with
//! [`Queue::mark_delivered`] or [`Queue::mark_failed`] (retry with backoff, or dead letter).
//! Payloads are sealed with a key kept in its own file ([`Keys`]). Delivered items are
//! purged after their retention and the freed pages are handed back to the file system.

#![forbid(unsafe_code)]

pub mod blob;
mod blob_file;
mod codec;
mod error;
mod read;
mod schema;
mod seal;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_core::{ConnectorName, ItemId, ItemKind};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

pub use error::QueueError;
pub use read::{DeadLetter, DeliveryInfo, QueueStats, SearchQuery, SinkStats, StoredItem};
pub use seal::Keys;
use writer::{Command, Op, Outcome};

/// The queue file's name inside the data directory.
pub const QUEUE_FILE: &str = "queue.db";
/// The key file's name inside the data directory.
pub const KEY_FILE: &str = "queue.key";
/// Disk space held back for the day the disk fills up (see `QueueOptions::reserve_bytes`).
pub const RESERVE_FILE: &str = "queue.reserve";

/// Settings with defaults that suit a practice server.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Intake stops while less than this is free on the data directory's disk.
    pub min_free_disk_bytes: u64,
    /// Space kept in a reserve file and given up when the disk fills anyway (another
    /// program filled it), so deliveries can still be recorded and the queue drained.
    pub reserve_bytes: u64,
    /// The most commands one transaction (one fsync) may carry.
    pub max_batch: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            min_free_disk_bytes: 64 * 1024 * 1024,
            reserve_bytes: 8 * 1024 * 1024,
            max_batch: 1024,
        }
    }
}

/// An item to append.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// The source that received it.
    pub source: ConnectorName,
    /// What it carries.
    pub kind: ItemKind,
    /// A type label safe to store in clear (HL7: MSH-9, e.g. `ORU^R01`).
    pub msg_type: Option<String>,
    /// The sender's id for it, safe to store in clear (HL7: MSH-10).
    pub control_id: Option<String>,
    /// The patient identifier (HL7: PID-3), stored only as a keyed digest for look-ups.
    pub subject: Option<Vec<u8>>,
    /// Another system's id for this item (a hub message id), unique when set.
    pub external_ref: Option<String>,
    /// The bytes to deliver, sealed before they reach the disk.
    pub payload: Vec<u8>,
    /// The sinks it must reach.
    pub sinks: Vec<ConnectorName>,
}

/// A source's resume state (a database position), stored under the source's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// Whose state: a name the source chooses (`sql:<source>`).
    pub name: String,
    /// The state the source believes is stored: the one it started from, then the one its
    /// previous batch recorded (`None`: nothing recorded yet). When the stored state
    /// differs, the whole batch is refused with [`QueueError::StateMoved`]: a batch that
    /// failed must never be passed over by a later one recording a position beyond it.
    pub expected: Option<String>,
    /// The state, opaque to the queue; sealed on disk.
    pub value: String,
}

/// Items handed to the queue's writer by [`Queue::enqueue_with_state`], not yet known to be
/// committed.
pub struct Appending(oneshot::Receiver<Result<Outcome, QueueError>>);

impl Appending {
    /// Waits until the items and the state are committed; returns the items' ids.
    pub async fn committed(self) -> Result<Vec<ItemId>, QueueError> {
        match self.0.await.map_err(|_| QueueError::Closed)?? {
            Outcome::AppendedAll(ids) => Ok(ids),
            _ => Err(QueueError::Closed),
        }
    }
}

/// The sealing context of a source's state: bound to its name, so one source's state
/// cannot be passed off as another's. (Item contexts are 8 or 24 bytes of numbers; this
/// one is longer, so the two never coincide.)
pub(crate) fn state_context(name: &str) -> Vec<u8> {
    let mut context = b"outpost source state\0".to_vec();
    context.extend_from_slice(name.as_bytes());
    context
}

/// Opens a sealed source state.
pub(crate) fn open_state(
    keys: &Keys,
    name: &str,
    nonce: &[u8],
    sealed: &[u8],
) -> Result<String, QueueError> {
    let plain = keys
        .open_bound(&state_context(name), nonce, sealed)
        .ok_or_else(|| QueueError::StateUnreadable {
            name: name.to_owned(),
        })?;
    String::from_utf8(plain).map_err(|_| QueueError::StateUnreadable {
        name: name.to_owned(),
    })
}

/// What opening does with a queue file older than this version.
enum Upgrade {
    /// Create the tables (new file) or upgrade it (the agent).
    Create,
    /// Refuse with [`QueueError::Version`] (inspection tools).
    Refuse,
}

/// How a sink retries a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay after the first failure; it doubles each time.
    pub initial_backoff: Duration,
    /// The longest delay between attempts.
    pub max_backoff: Duration,
    /// Attempts before the item becomes a dead letter; `None` retries for ever, which keeps
    /// strict order (a later item never overtakes a failing one).
    pub max_attempts: Option<u32>,
}

impl RetryPolicy {
    /// The delay before attempt `attempts + 1`: capped exponential backoff with "equal
    /// jitter" (half fixed, half random), so many failing peers do not retry in lockstep.
    pub fn backoff(&self, attempts: u32) -> Duration {
        use rand::Rng;
        let exponent = attempts.saturating_sub(1).min(30);
        let full = self
            .initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        let half = full / 2;
        let jitter_ms = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }
}

/// What happened to a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// It will be tried again after `delay`.
    RetryAfter {
        /// Attempts so far.
        attempts: u32,
        /// Backoff with jitter before the next attempt.
        delay: Duration,
    },
    /// It is now a dead letter, kept with its last error until retried by hand.
    DeadLettered {
        /// Attempts made.
        attempts: u32,
    },
}

/// One item handed to a sink for delivery.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The item.
    pub id: ItemId,
    /// The source that received it.
    pub source: String,
    /// What it carries.
    pub kind: ItemKind,
    /// Failed attempts so far.
    pub attempts: u32,
    /// As appended.
    pub msg_type: Option<String>,
    /// As appended.
    pub control_id: Option<String>,
    /// When the item arrived (unix ms).
    pub received_at_ms: i64,
    /// As appended.
    pub external_ref: Option<String>,
    /// The unsealed payload.
    pub payload: Vec<u8>,
}

/// A sink's next step.
#[derive(Debug)]
pub enum NextDelivery {
    /// Deliver this now.
    Ready(Lease),
    /// The head item is backing off; nothing may overtake it. Ask again after this long.
    Backoff(Duration),
    /// Nothing pending.
    Idle,
}

/// What a purge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Items removed.
    pub items: usize,
    /// Pages handed back to the file system.
    pub pages_freed: usize,
}

/// A handle to the queue; cheap to clone. All clones share one writer thread.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    db_path: PathBuf,
    commands: mpsc::Sender<Command>,
    reader: Arc<Mutex<Connection>>,
    keys: Arc<Keys>,
    appended: watch::Receiver<u64>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Queue {
    /// Opens the queue in `data_dir`, creating the directory, key file and queue file on
    /// first start. Blocking: call it at start-up or from `spawn_blocking`.
    pub fn open(data_dir: &Path, options: QueueOptions) -> Result<Self, QueueError> {
        std::fs::create_dir_all(data_dir).map_err(|source| QueueError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let keys = Keys::load_or_create(&data_dir.join(KEY_FILE))?;
        Self::start(data_dir, keys, options, Upgrade::Create)
    }

    /// Opens an existing queue for inspection tools; never creates anything.
    pub fn open_existing(data_dir: &Path) -> Result<Self, QueueError> {
        let db_path = data_dir.join(QUEUE_FILE);
        if !db_path.exists() {
            return Err(QueueError::Missing { path: db_path });
        }
        let keys = Keys::load(&data_dir.join(KEY_FILE))?;
        Self::start(
            data_dir,
            keys,
            QueueOptions {
                min_free_disk_bytes: 0,
                reserve_bytes: 0,
                ..QueueOptions::default()
            },
            Upgrade::Refuse,
        )
    }

    fn start(
        data_dir: &Path,
        keys: Keys,
        options: QueueOptions,
        upgrade: Upgrade,
    ) -> Result<Self, QueueError> {
        let db_path = data_dir.join(QUEUE_FILE);
        let sqlite = |source| QueueError::Sqlite {
            path: db_path.clone(),
            source,
        };
        let mut writer_conn = Connection::open(&db_path).map_err(sqlite)?;
        schema::configure(&writer_conn).map_err(sqlite)?;
        let version = schema::version(&writer_conn).map_err(sqlite)?;
        if version > schema::SCHEMA_VERSION {
            return Err(QueueError::Version {
                path: db_path.clone(),
                found: version,
                detail: "newer than this outpost understands; use the outpost that wrote it",
            });
        }
        // Only a new (or older) file is written here: an inspection tool opening the queue
        // beside a running agent must not take the write lock just to look, nor upgrade
        // the file under an agent of the version before.
        if version < schema::SCHEMA_VERSION {
            match upgrade {
                Upgrade::Create => schema::create(&mut writer_conn).map_err(sqlite)?,
                Upgrade::Refuse => {
                    return Err(QueueError::Version {
                        path: db_path.clone(),
                        found: version,
                        detail: "older than this outpost; start the agent of this version once to upgrade it",
                    })
                }
            }
        }
        let reader = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        reader
            .busy_timeout(Duration::from_secs(10))
            .map_err(sqlite)?;

        let keys = Arc::new(keys);
        let (commands, receiver) = mpsc::channel(4096);
        let (appended_tx, appended) = watch::channel(0);
        let config = writer::WriterConfig {
            data_dir: data_dir.to_owned(),
            db_path: db_path.clone(),
            min_free_disk_bytes: options.min_free_disk_bytes,
            reserve_bytes: options.reserve_bytes,
            max_batch: options.max_batch.max(1),
        };
        let writer_keys = keys.clone();
        let writer_thread = std::thread::Builder::new()
            .name("outpost-queue".into())
            .spawn(move || writer::run(writer_conn, writer_keys, config, receiver, appended_tx))
            .map_err(|source| QueueError::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_owned(),
                db_path,
                commands,
                reader: Arc::new(Mutex::new(reader)),
                keys,
                appended,
                writer_thread: Mutex::new(Some(writer_thread)),
            }),
        })
    }

    /// The queue file.
    pub fn path(&self) -> &Path {
        &self.inner.db_path
    }

    /// Appends an item for delivery to its sinks. Returns once the item is committed to
    /// disk: only then may a source acknowledge its peer.
    pub async fn append(&self, item: NewItem) -> Result<ItemId, QueueError> {
        match self
            .submit(Op::Append {
                item,
                rejected_reason: None,
            })
            .await?
        {
            Outcome::Appended(id) => Ok(id),
            _ => Err(QueueError::Closed),
        }
    }

    /// Appends `items` and records `state`, in one transaction: after a crash either all of
    /// them are in the queue and the state says so, or none is and the state is the one
    /// before. A source that resumes from its state therefore neither loses nor repeats
    /// what it queued. Returns the items' ids, in order.
    pub async fn append_with_state(
        &self,
        items: Vec<NewItem>,
        state: Option<SourceState>,
    ) -> Result<Vec<ItemId>, QueueError> {
        self.enqueue_with_state(items, state)
            .await?
            .committed()
            .await
    }

    /// [`Queue::append_with_state`] in two steps: this hands the items to the writer (calls
    /// are taken in the order made), and [`Appending::committed`] waits for the commit. A
    /// source can so keep a few batches in flight; they commit in order, often several in
    /// one transaction.
    pub async fn enqueue_with_state(
        &self,
        items: Vec<NewItem>,
        state: Option<SourceState>,
    ) -> Result<Appending, QueueError> {
        let (reply, outcome) = oneshot::channel();
        self.inner
            .commands
            .send(Command {
                op: Op::AppendWithState { items, state },
                reply,
            })
            .await
            .map_err(|_| QueueError::Closed)?;
        Ok(Appending(outcome))
    }

    /// The state last recorded under `name` by [`Queue::append_with_state`].
    pub async fn source_state(&self, name: &str) -> Result<Option<String>, QueueError> {
        let name = name.to_owned();
        let sqlite = self.sqlite_error();
        self.read(move |conn, keys| {
            let row: Option<(Vec<u8>, Vec<u8>)> = conn
                .query_row(
                    "SELECT nonce, value FROM source_state WHERE name = ?1",
                    [&name],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(sqlite)?;
            row.map(|(nonce, sealed)| open_state(keys, &name, &nonce, &sealed))
                .transpose()
        })
        .await
    }

    /// Forgets the state recorded under `name`, so the source starts over (a new
    /// snapshot) the next time it opens; a running source notices at its next batch,
    /// which is refused, and restarts. Returns whether there was a state to forget.
    pub async fn forget_source_state(&self, name: &str) -> Result<bool, QueueError> {
        match self
            .submit(Op::ForgetState {
                name: name.to_owned(),
            })
            .await?
        {
            Outcome::Count(n) => Ok(n > 0),
            _ => Err(QueueError::Closed),
        }
    }

    /// Keeps an item that intake refused (malformed, no route) for inspection; it has no
    /// deliveries and is purged after the retention like delivered items.
    pub async fn append_rejected(
        &self,
        item: NewItem,
        reason: String,
    ) -> Result<ItemId, QueueError> {
        match self
            .submit(Op::Append {
                item,
                rejected_reason: Some(reason),
            })
            .await?
        {
            Outcome::Appended(id) => Ok(id),
            _ => Err(QueueError::Closed),
        }
    }

    /// Records that `sink` delivered item `id`.
    pub async fn mark_delivered(&self, sink: &ConnectorName, id: ItemId) -> Result<(), QueueError> {
        self.mark_delivered_many(sink, vec![id]).await
    }

    /// Records that `sink` delivered all of `ids`, in one transaction.
    pub async fn mark_delivered_many(
        &self,
        sink: &ConnectorName,
        ids: Vec<ItemId>,
    ) -> Result<(), QueueError> {
        let op = Op::MarkDelivered {
            sink: sink.clone(),
            ids,
        };
        self.submit(op).await.map(|_| ())
    }

    /// Records a failed attempt. A permanent failure, or one past `policy.max_attempts`,
    /// makes the delivery a dead letter; otherwise it backs off.
    pub async fn mark_failed(
        &self,
        sink: &ConnectorName,
        id: ItemId,
        error: &str,
        policy: RetryPolicy,
        is_permanent: bool,
    ) -> Result<FailureOutcome, QueueError> {
        let op = Op::MarkFailed {
            sink: sink.clone(),
            id,
            error: error.to_owned(),
            policy,
            is_permanent,
        };
        match self.submit(op).await? {
            Outcome::Failed(outcome) => Ok(outcome),
            _ => Err(QueueError::Closed),
        }
    }

    /// Puts dead letters back to pending, all of them or those of one sink or one item.
    /// Returns how many.
    pub async fn retry_dead(
        &self,
        sink: Option<&ConnectorName>,
        id: Option<ItemId>,
    ) -> Result<usize, QueueError> {
        match self
            .submit(Op::RetryDead {
                sink: sink.cloned(),
                id,
            })
            .await?
        {
            Outcome::Count(n) => Ok(n),
            _ => Err(QueueError::Closed),
        }
    }

    /// Removes items settled (every delivery done, or rejected) before `retention` ago, then
    /// hands the freed pages back to the file system and truncates the WAL. Works in small
    /// chunks so that intake is never held up for long.
    pub async fn purge(&self, retention: Duration) -> Result<PurgeReport, QueueError> {
        let settled_before_ms = now_ms() - retention.as_millis() as i64;
        let mut report = PurgeReport::default();
        loop {
            match self
                .submit(Op::PurgeChunk {
                    settled_before_ms,
                    limit: 2000,
                })
                .await?
            {
                Outcome::Count(0) => break,
                Outcome::Count(n) => report.items += n,
                _ => return Err(QueueError::Closed),
            }
        }
        loop {
            match self.submit(Op::VacuumChunk { pages: 2048 }).await? {
                Outcome::Count(0) => break,
                Outcome::Count(n) => report.pages_freed += n,
                _ => return Err(QueueError::Closed),
            }
        }
        self.submit(Op::Checkpoint).await?;
        Ok(report)
    }

    /// Waits until something is appended (in this process) after `seen`, or `timeout`
    /// passes. Returns the new generation to pass next time.
    pub async fn wait_for_append(&self, seen: u64, timeout: Duration) -> u64 {
        let mut appended = self.inner.appended.clone();
        let _ = tokio::time::timeout(timeout, appended.wait_for(|generation| *generation != seen))
            .await;
        let generation = *appended.borrow();
        generation
    }

    /// The current append generation, for [`Queue::wait_for_append`].
    pub fn append_generation(&self) -> u64 {
        *self.inner.appended.borrow()
    }

    /// Finishes queued writes, checkpoints and stops the writer thread. Later calls on any
    /// clone fail with [`QueueError::Closed`].
    pub async fn close(&self) -> Result<(), QueueError> {
        let result = self.submit(Op::Checkpoint).await.map(|_| ());
        let _ = self.submit(Op::Close).await;
        let handle = self
            .inner
            .writer_thread
            .lock()
            .ok()
            .and_then(|mut slot| slot.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }

    async fn submit(&self, op: Op) -> Result<Outcome, QueueError> {
        let (reply, outcome) = oneshot::channel();
        self.inner
            .commands
            .send(Command { op, reply })
            .await
            .map_err(|_| QueueError::Closed)?;
        outcome.await.map_err(|_| QueueError::Closed)?
    }

    /// Runs a read on the reader connection off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection, &Keys) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let reader = self.inner.reader.clone();
        let keys = self.inner.keys.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().map_err(|_| QueueError::Closed)?;
            query(&conn, &keys)
        })
        .await
        .map_err(|_| QueueError::Closed)?
    }

    fn sqlite_error(&self) -> impl Fn(rusqlite::Error) -> QueueError + Send + Clone + 'static {
        let path = self.inner.db_path.clone();
        move |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        }
    }

    /// Bytes the queue occupies on disk (queue file plus WAL).
    pub fn disk_bytes(&self) -> u64 {
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let wal = self.inner.db_path.with_extension("db-wal");
        size(self.inner.db_path.clone()) + size(wal)
    }

    /// Free bytes on the data directory's disk.
    pub fn disk_free_bytes(&self) -> Option<u64> {
        writer::available_space(&self.inner.data_dir).ok()
    }
}

/// Milliseconds since the Unix epoch, the queue's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
