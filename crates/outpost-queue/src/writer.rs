//! The queue's single writer thread and the operations it applies.
//!
//! Every change to the queue file goes through this thread. It takes whatever commands are
//! waiting (up to a batch limit) and applies them in one transaction: that is group commit,
//! so under load one fsync covers many items instead of one each. If a batch fails, each
//! command is retried alone so that one bad command cannot fail its neighbours, and no
//! reply ever claims a write that was rolled back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_core::{ConnectorName, ItemId};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use crate::schema::{DEAD, DELIVERED, PENDING};
use crate::{now_ms, FailureOutcome, Keys, NewItem, QueueError, RetryPolicy, SourceState};

/// A change to apply, with where to send its result.
pub(crate) struct Command {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Outcome, QueueError>>,
}

/// The changes the writer knows.
pub(crate) enum Op {
    Append {
        item: NewItem,
        rejected_reason: Option<String>,
    },
    /// Items and a source's resume state, all in one transaction or none.
    AppendWithState {
        items: Vec<NewItem>,
        state: Option<SourceState>,
    },
    MarkDelivered {
        sink: ConnectorName,
        ids: Vec<ItemId>,
    },
    MarkFailed {
        sink: ConnectorName,
        id: ItemId,
        error: String,
        policy: RetryPolicy,
        is_permanent: bool,
    },
    /// Removes a source's state.
    ForgetState {
        name: String,
    },
    RetryDead {
        sink: Option<ConnectorName>,
        id: Option<ItemId>,
    },
    PurgeChunk {
        settled_before_ms: i64,
        limit: usize,
    },
    VacuumChunk {
        pages: u32,
    },
    /// Runs outside any transaction (SQLite refuses checkpoints inside one).
    Checkpoint,
    /// Finishes what is queued, checkpoints and stops the thread.
    Close,
}

/// What an operation returns.
pub(crate) enum Outcome {
    Appended(ItemId),
    AppendedAll(Vec<ItemId>),
    Done,
    Failed(FailureOutcome),
    Count(usize),
}

/// The writer's fixed settings.
pub(crate) struct WriterConfig {
    pub data_dir: PathBuf,
    pub db_path: PathBuf,
    pub min_free_disk_bytes: u64,
    pub reserve_bytes: u64,
    pub max_batch: usize,
}

/// Runs on its own thread until `Close` arrives or every sender is dropped.
pub(crate) fn run(
    mut conn: Connection,
    keys: Arc<Keys>,
    config: WriterConfig,
    mut commands: mpsc::Receiver<Command>,
    appended: watch::Sender<u64>,
) {
    let mut writer = match Writer::new(&conn, keys, config) {
        Ok(writer) => writer,
        Err(err) => {
            tracing::error!(error = %err, "queue writer could not start");
            return;
        }
    };
    let mut held_back: Option<Command> = None;
    loop {
        let first = match held_back.take() {
            Some(cmd) => cmd,
            None => match commands.blocking_recv() {
                Some(cmd) => cmd,
                None => break,
            },
        };
        if first.op.is_standalone() {
            let is_close = matches!(first.op, Op::Close);
            writer.apply_standalone(&conn, first);
            if is_close {
                break;
            }
            continue;
        }
        let mut batch = vec![first];
        while batch.len() < writer.config.max_batch {
            match commands.try_recv() {
                Ok(cmd) if cmd.op.is_standalone() => {
                    held_back = Some(cmd);
                    break;
                }
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let has_append = batch.iter().any(|c| c.op.is_append());
        writer.apply_batch(&mut conn, batch);
        if writer.is_out_of_space {
            // On a full disk the WAL must not grow: checkpoint after every batch so the
            // next one reuses the WAL from its start instead of appending to it.
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
        if has_append {
            appended.send_modify(|generation| *generation += 1);
        }
    }
    // Whoever is still waiting learns the queue closed.
    commands.close();
    while let Ok(cmd) = commands.try_recv() {
        let _ = cmd.reply.send(Err(QueueError::Closed));
    }
}

impl Op {
    fn is_append(&self) -> bool {
        matches!(self, Op::Append { .. } | Op::AppendWithState { .. })
    }

    fn is_standalone(&self) -> bool {
        matches!(self, Op::Checkpoint | Op::Close)
    }
}

struct Writer {
    keys: Arc<Keys>,
    config: WriterConfig,
    next_id: i64,
    disk: DiskGauge,
    reserve: Reserve,
    /// Set when the disk filled up and the reserve was given up so that deliveries can
    /// still be recorded; intake stays refused until the reserve can be made again.
    is_out_of_space: bool,
}

impl Writer {
    fn new(conn: &Connection, keys: Arc<Keys>, config: WriterConfig) -> Result<Self, QueueError> {
        let sqlite = |source| QueueError::Sqlite {
            path: config.db_path.clone(),
            source,
        };
        // AUTOINCREMENT's sequence survives deletes, so ids are never reused after a purge.
        let last_seq: i64 = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'items'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sqlite)?
            .unwrap_or(0);
        let last_row: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM items", [], |r| r.get(0))
            .map_err(sqlite)?;
        let disk = DiskGauge::new(config.data_dir.clone(), config.min_free_disk_bytes);
        let reserve = Reserve {
            path: config.data_dir.join(crate::RESERVE_FILE),
            bytes: config.reserve_bytes,
        };
        let is_out_of_space = match reserve.ensure() {
            Ok(()) => false,
            Err(err) => {
                tracing::error!(path = %reserve.path.display(), error = %err, "cannot create the disk space reserve; intake paused until there is room");
                true
            }
        };
        Ok(Self {
            keys,
            next_id: last_seq.max(last_row) + 1,
            disk,
            reserve,
            is_out_of_space,
            config,
        })
    }

    fn apply_batch(&mut self, conn: &mut Connection, batch: Vec<Command>) {
        if batch.len() > 1 {
            match self.try_batch(conn, &batch) {
                Ok(outcomes) => {
                    for (cmd, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = cmd.reply.send(outcome);
                    }
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, commands = batch.len(), "batch failed; applying its commands one by one");
                }
            }
        }
        for cmd in batch {
            let mut outcome = self.try_alone(conn, &cmd);
            if matches!(outcome, Err(QueueError::DiskFull { .. })) && self.give_up_reserve() {
                // Room for bookkeeping again; intake stays refused while out of space.
                outcome = self.try_alone(conn, &cmd);
            }
            let _ = cmd.reply.send(outcome);
        }
    }

    fn try_alone(&mut self, conn: &mut Connection, cmd: &Command) -> Result<Outcome, QueueError> {
        match self.try_batch(conn, std::slice::from_ref(cmd)) {
            Ok(mut outcomes) => outcomes.pop().unwrap_or(Err(QueueError::Closed)),
            Err(err) => Err(self.storage_error(err)),
        }
    }

    /// Deletes the reserve file so that marking items delivered (which frees space) can
    /// still be committed on a full disk. Returns whether there was a reserve to give up.
    fn give_up_reserve(&mut self) -> bool {
        let had_reserve = self.reserve.release();
        if had_reserve {
            tracing::error!(
                data_dir = %self.config.data_dir.display(),
                reserve_bytes = self.reserve.bytes,
                "disk full: released the space reserve so deliveries can still be recorded; intake paused until space is freed"
            );
        }
        self.is_out_of_space = true;
        had_reserve
    }

    /// Whether an append may proceed: not while out of space (until the reserve can be
    /// made again with room to spare), nor below the free-space floor.
    fn intake_room(&mut self) -> Result<(), LowDisk> {
        if self.is_out_of_space {
            let available_bytes = self.disk.available().unwrap_or(0);
            let required_bytes = self
                .config
                .min_free_disk_bytes
                .saturating_add(self.reserve.bytes.saturating_mul(2));
            if available_bytes < required_bytes {
                return Err(LowDisk {
                    available_bytes,
                    required_bytes,
                });
            }
            match self.reserve.ensure() {
                Ok(()) => {
                    self.is_out_of_space = false;
                    tracing::info!(available_bytes, "disk space recovered; intake resumed");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot recreate the disk space reserve");
                    return Err(LowDisk {
                        available_bytes,
                        required_bytes,
                    });
                }
            }
        }
        self.disk.check()
    }

    /// Applies every command in one transaction. An `Err` means nothing was committed.
    fn try_batch(
        &mut self,
        conn: &mut Connection,
        batch: &[Command],
    ) -> rusqlite::Result<Vec<Result<Outcome, QueueError>>> {
        let has_room = if batch.iter().any(|c| c.op.is_append()) {
            self.intake_room()
        } else {
            Ok(())
        };
        // IMMEDIATE takes the write lock up front (waiting in the busy handler if another
        // process, such as `outpost queue retry`, holds it). A deferred transaction that
        // reads first cannot wait: upgrading to a writer after another commit fails at once
        // with "database is locked".
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for cmd in batch {
            outcomes.push(self.apply_one(&tx, &cmd.op, &has_room)?);
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn disk_full(&self, low: &LowDisk) -> QueueError {
        QueueError::DiskFull {
            path: self.config.data_dir.clone(),
            available_bytes: low.available_bytes,
            required_bytes: low.required_bytes,
        }
    }

    /// Inserts one item and its deliveries (none for a rejected item); returns its id.
    fn insert_item(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        item: &NewItem,
        rejected_reason: Option<&str>,
        now: i64,
    ) -> rusqlite::Result<ItemId> {
        let id = ItemId(self.next_id);
        self.next_id += 1;
        let (sealed, nonce, codec) = crate::codec::seal_item(&self.keys, id, &item.payload);
        let digest = item.subject.as_deref().map(|s| self.keys.subject_digest(s));
        tx.prepare_cached(
            "INSERT INTO items (id, source, kind, received_at, msg_type, control_id,
                subject_digest, rejected_reason, nonce, payload, payload_bytes, external_ref, codec)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?
        .execute(params![
            id.0,
            item.source.as_str(),
            item.kind.as_str(),
            now,
            item.msg_type,
            item.control_id,
            digest,
            rejected_reason,
            &nonce[..],
            sealed,
            item.payload.len() as i64,
            item.external_ref,
            codec,
        ])?;
        if rejected_reason.is_none() {
            let mut insert = tx.prepare_cached(
                "INSERT INTO deliveries (item_id, sink, state, updated_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for sink in &item.sinks {
                insert.execute(params![id.0, sink.as_str(), PENDING, now])?;
            }
        }
        Ok(id)
    }

    fn apply_one(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        op: &Op,
        has_room: &Result<(), LowDisk>,
    ) -> rusqlite::Result<Result<Outcome, QueueError>> {
        let now = now_ms();
        match op {
            Op::Append {
                item,
                rejected_reason,
            } => {
                if let Err(low) = has_room {
                    return Ok(Err(self.disk_full(low)));
                }
                let id = self.insert_item(tx, item, rejected_reason.as_deref(), now)?;
                Ok(Ok(Outcome::Appended(id)))
            }
            Op::AppendWithState { items, state } => {
                // A state alone (a heartbeat) is a few bytes, and keeping it moving lets
                // the database let go of its log: only items wait for room.
                if let (Err(low), false) = (has_room, items.is_empty()) {
                    return Ok(Err(self.disk_full(low)));
                }
                if let Some(state) = state {
                    let stored: Option<(Vec<u8>, Vec<u8>)> = tx
                        .prepare_cached("SELECT nonce, value FROM source_state WHERE name = ?1")?
                        .query_row([&state.name], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    let stored = match stored {
                        Some((nonce, sealed)) => {
                            match crate::open_state(&self.keys, &state.name, &nonce, &sealed) {
                                Ok(value) => Some(value),
                                Err(err) => return Ok(Err(err)),
                            }
                        }
                        None => None,
                    };
                    if stored != state.expected {
                        return Ok(Err(QueueError::StateMoved {
                            name: state.name.clone(),
                        }));
                    }
                }
                let mut ids = Vec::with_capacity(items.len());
                for item in items {
                    ids.push(self.insert_item(tx, item, None, now)?);
                }
                if let Some(state) = state {
                    // Sealed like a payload: a resume position may hold key values.
                    let (sealed, nonce) = self
                        .keys
                        .seal_bound(&crate::state_context(&state.name), state.value.as_bytes());
                    tx.prepare_cached(
                        "INSERT INTO source_state (name, nonce, value, updated_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (name) DO UPDATE SET nonce = excluded.nonce,
                             value = excluded.value, updated_at = excluded.updated_at",
                    )?
                    .execute(params![state.name, &nonce[..], sealed, now])?;
                }
                Ok(Ok(Outcome::AppendedAll(ids)))
            }
            Op::MarkDelivered { sink, ids } => {
                let mut update = tx.prepare_cached(
                    "UPDATE deliveries SET state = ?3, attempts = attempts + 1, last_error = NULL, updated_at = ?4
                     WHERE item_id = ?1 AND sink = ?2",
                )?;
                for id in ids {
                    if update.execute(params![id.0, sink.as_str(), DELIVERED, now])? == 0 {
                        return Ok(Err(QueueError::NoSuchDelivery {
                            id: *id,
                            sink: sink.to_string(),
                        }));
                    }
                }
                Ok(Ok(Outcome::Done))
            }
            Op::MarkFailed {
                sink,
                id,
                error,
                policy,
                is_permanent,
            } => {
                let attempts: Option<u32> = tx
                    .prepare_cached(
                        "SELECT attempts FROM deliveries WHERE item_id = ?1 AND sink = ?2",
                    )?
                    .query_row(params![id.0, sink.as_str()], |r| r.get(0))
                    .optional()?;
                let Some(attempts) = attempts.map(|a| a.saturating_add(1)) else {
                    return Ok(Err(QueueError::NoSuchDelivery {
                        id: *id,
                        sink: sink.to_string(),
                    }));
                };
                let is_exhausted = policy.max_attempts.is_some_and(|max| attempts >= max);
                let (state, outcome, next_at) = if *is_permanent || is_exhausted {
                    (DEAD, FailureOutcome::DeadLettered { attempts }, now)
                } else {
                    let delay = policy.backoff(attempts);
                    (
                        PENDING,
                        FailureOutcome::RetryAfter { attempts, delay },
                        now + delay.as_millis() as i64,
                    )
                };
                tx.prepare_cached(
                    "UPDATE deliveries SET state = ?3, attempts = ?4, next_attempt_at = ?5, last_error = ?6, updated_at = ?7
                     WHERE item_id = ?1 AND sink = ?2",
                )?
                .execute(params![id.0, sink.as_str(), state, attempts, next_at, error, now])?;
                Ok(Ok(Outcome::Failed(outcome)))
            }
            Op::ForgetState { name } => {
                let removed = tx
                    .prepare_cached("DELETE FROM source_state WHERE name = ?1")?
                    .execute([name])?;
                Ok(Ok(Outcome::Count(removed)))
            }
            Op::RetryDead { sink, id } => {
                let changed = tx
                    .prepare_cached(
                        "UPDATE deliveries SET state = ?1, attempts = 0, next_attempt_at = 0, updated_at = ?2
                         WHERE state = ?3 AND (?4 IS NULL OR sink = ?4) AND (?5 IS NULL OR item_id = ?5)",
                    )?
                    .execute(params![PENDING, now, DEAD, sink.as_ref().map(|s| s.as_str()), id.map(|i| i.0)])?;
                Ok(Ok(Outcome::Count(changed)))
            }
            Op::PurgeChunk {
                settled_before_ms,
                limit,
            } => {
                // An item goes once it is old enough and every delivery of it was delivered
                // long enough ago; pending and dead deliveries keep it.
                let ids: Vec<i64> = tx
                    .prepare_cached(
                        "SELECT i.id FROM items i
                         WHERE i.received_at < ?1
                           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.item_id = i.id
                                           AND (d.state != ?2 OR d.updated_at >= ?1))
                         ORDER BY i.id LIMIT ?3",
                    )?
                    .query_map(params![settled_before_ms, DELIVERED, *limit as i64], |r| {
                        r.get(0)
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let mut delete_deliveries =
                    tx.prepare_cached("DELETE FROM deliveries WHERE item_id = ?1")?;
                let mut delete_item = tx.prepare_cached("DELETE FROM items WHERE id = ?1")?;
                for id in &ids {
                    delete_deliveries.execute([id])?;
                    delete_item.execute([id])?;
                }
                Ok(Ok(Outcome::Count(ids.len())))
            }
            Op::VacuumChunk { pages } => {
                let free_before: i64 = tx.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
                tx.execute_batch(&format!("PRAGMA incremental_vacuum({pages})"))?;
                let free_after: i64 = tx.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
                Ok(Ok(Outcome::Count(
                    (free_before - free_after).max(0) as usize
                )))
            }
            Op::Checkpoint | Op::Close => Ok(Ok(Outcome::Done)),
        }
    }

    fn apply_standalone(&mut self, conn: &Connection, cmd: Command) {
        // TRUNCATE resets the WAL file to zero bytes, so a drained queue is small on disk.
        let outcome = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map(|()| Outcome::Done)
            .map_err(|err| self.storage_error(err));
        let _ = cmd.reply.send(outcome);
    }

    /// Turns a SQLite failure into the error a caller can act on: a full disk is named as such.
    fn storage_error(&mut self, err: rusqlite::Error) -> QueueError {
        let is_full =
            matches!(&err, rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::DiskFull);
        if is_full {
            let available_bytes = self.disk.available().unwrap_or(0);
            return QueueError::DiskFull {
                path: self.config.data_dir.clone(),
                available_bytes,
                required_bytes: self.config.min_free_disk_bytes,
            };
        }
        QueueError::Sqlite {
            path: self.config.db_path.clone(),
            source: err,
        }
    }
}

/// A file of real (not sparse) zeros, deleted when the disk fills up so that the queue
/// can still record deliveries, the only thing that frees space.
struct Reserve {
    path: PathBuf,
    bytes: u64,
}

impl Reserve {
    fn ensure(&self) -> std::io::Result<()> {
        use std::io::Write;
        if self.bytes == 0 || std::fs::metadata(&self.path).is_ok_and(|m| m.len() == self.bytes) {
            return Ok(());
        }
        let result = (|| {
            let mut file = std::fs::File::create(&self.path)?;
            let chunk = vec![0u8; 64 * 1024];
            let mut written = 0u64;
            while written < self.bytes {
                let n = chunk.len().min((self.bytes - written) as usize);
                file.write_all(&chunk[..n])?;
                written += n as u64;
            }
            file.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        result
    }

    fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }
}

/// Free space below the floor: what was seen and what is required.
#[derive(Debug, Clone, Copy)]
struct LowDisk {
    available_bytes: u64,
    required_bytes: u64,
}

/// Watches free space under the data directory. Intake stops below the floor, well before
/// SQLite would hit a full disk mid-write.
struct DiskGauge {
    dir: PathBuf,
    floor: u64,
    last_check: Option<(Instant, Result<(), LowDisk>)>,
}

impl DiskGauge {
    fn new(dir: PathBuf, floor: u64) -> Self {
        Self {
            dir,
            floor,
            last_check: None,
        }
    }

    /// Ok, or how far below the floor the disk is. Re-reads at most every 250 ms; statvfs is cheap but
    /// group commit may call this thousands of times a second.
    fn check(&mut self) -> Result<(), LowDisk> {
        if let Some((at, verdict)) = &self.last_check {
            if at.elapsed() < Duration::from_millis(250) {
                return *verdict;
            }
        }
        let verdict = match self.available() {
            Ok(available) if available < self.floor => Err(LowDisk {
                available_bytes: available,
                required_bytes: self.floor,
            }),
            Ok(_) => Ok(()),
            Err(err) => {
                tracing::warn!(dir = %self.dir.display(), error = %err, "cannot read free disk space");
                Ok(())
            }
        };
        self.last_check = Some((Instant::now(), verdict));
        verdict
    }

    fn available(&self) -> std::io::Result<u64> {
        available_space(&self.dir)
    }
}

/// Free bytes for unprivileged writers on the file system holding `dir`.
pub(crate) fn available_space(dir: &Path) -> std::io::Result<u64> {
    fs4::available_space(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_attempts: None,
        };
        for _ in 0..100 {
            let first = policy.backoff(1);
            assert!(
                first >= Duration::from_millis(500) && first <= Duration::from_secs(1),
                "{first:?}"
            );
            let fourth = policy.backoff(4);
            assert!(
                fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8),
                "{fourth:?}"
            );
            let late = policy.backoff(40);
            assert!(
                late >= Duration::from_secs(30) && late <= Duration::from_secs(60),
                "{late:?}"
            );
        }
    }
}
