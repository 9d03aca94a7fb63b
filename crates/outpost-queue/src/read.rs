//! Read-side queries: the sink cursor, statistics, dead letters and message search. They
//! run on a read-only connection, so they never wait on the writer (WAL readers see the
//! last commit).

use std::time::Duration;

use outpost_core::{ConnectorName, ItemId, ItemKind};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::codec;
use crate::schema::{DEAD, DELIVERED, PENDING};
use crate::{now_ms, Keys, Lease, NextDelivery, Queue, QueueError};

/// Counts for one sink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// The sink.
    pub sink: String,
    /// Waiting to be delivered (including those backing off).
    pub pending: u64,
    /// Pending items that have failed at least once.
    pub retrying: u64,
    /// Dead letters.
    pub dead: u64,
    /// Delivered and still within retention.
    pub delivered: u64,
    /// Age of the oldest pending item, in milliseconds.
    pub oldest_pending_ms: Option<i64>,
}

/// The whole queue at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// One entry per sink that has deliveries.
    pub sinks: Vec<SinkStats>,
    /// Items refused at intake and kept for inspection.
    pub rejected: u64,
    /// Items stored.
    pub items: u64,
}

/// A delivery that gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The item.
    pub id: ItemId,
    /// The sink that gave up.
    pub sink: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// As appended.
    pub msg_type: Option<String>,
    /// As appended.
    pub control_id: Option<String>,
    /// When the item arrived (unix ms).
    pub received_at_ms: i64,
}

/// One sink's view of a stored item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The sink.
    pub sink: String,
    /// `pending`, `delivered` or `dead`.
    pub state: &'static str,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// A stored item with its unsealed payload.
#[derive(Debug, Clone)]
pub struct StoredItem {
    /// The item.
    pub id: ItemId,
    /// The source that received it.
    pub source: String,
    /// What it carries.
    pub kind: ItemKind,
    /// When it arrived (unix ms).
    pub received_at_ms: i64,
    /// As appended.
    pub msg_type: Option<String>,
    /// As appended.
    pub control_id: Option<String>,
    /// Why intake refused it, if it did.
    pub rejected_reason: Option<String>,
    /// Where it is going or went.
    pub deliveries: Vec<DeliveryInfo>,
    /// The unsealed payload.
    pub payload: Vec<u8>,
}

/// What to look for among stored items. Every given criterion must match.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// Message type; `ORU^R01` also matches `ORU^R01^ORU_R01`, `ORU` matches every ORU.
    pub msg_type: Option<String>,
    /// Exact control id.
    pub control_id: Option<String>,
    /// Exact patient identifier (compared through its keyed digest).
    pub subject: Option<String>,
    /// Bytes anywhere in the payload, ASCII case-insensitive.
    pub text: Option<String>,
    /// Received at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Received before (unix ms).
    pub until_ms: Option<i64>,
    /// At most this many results, newest first.
    pub limit: usize,
    /// Include items refused at intake.
    pub include_rejected: bool,
    /// Only items of this kind.
    pub kind: Option<ItemKind>,
}

impl Queue {
    /// The next delivery for `sink`: its oldest pending item. Strict order: when the oldest
    /// is backing off, nothing behind it is handed out.
    pub async fn next_delivery(&self, sink: &ConnectorName) -> Result<NextDelivery, QueueError> {
        let (mut leases, backoff) = self.ready_after(sink, ItemId(0), 1, usize::MAX).await?;
        Ok(match (leases.pop(), backoff) {
            (Some(lease), _) => NextDelivery::Ready(lease),
            (None, Some(wait)) => NextDelivery::Backoff(wait),
            (None, None) => NextDelivery::Idle,
        })
    }

    /// Up to `limit` pending items of `sink` after item `after`, in order, holding at most
    /// `max_bytes` of payload (but always at least one item), stopping at the first one
    /// that is backing off (whose remaining wait is returned). Lets a sink keep
    /// several batches in flight without waiting for each to be marked.
    pub async fn ready_after(
        &self,
        sink: &ConnectorName,
        after: ItemId,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Lease>, Option<Duration>), QueueError> {
        let sink = sink.clone();
        let sqlite = self.sqlite_error();
        self.read(move |conn, keys| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT d.item_id, d.attempts, d.next_attempt_at, i.kind, i.msg_type, i.control_id, i.nonce, i.payload,
                            i.source, i.received_at, i.external_ref, i.payload_bytes, i.codec
                     FROM deliveries d JOIN items i ON i.id = d.item_id
                     WHERE d.sink = ?1 AND d.state = ?2 AND d.item_id > ?3 ORDER BY d.item_id LIMIT ?4",
                )
                .map_err(&sqlite)?;
            let mut rows = stmt.query(params![sink.as_str(), PENDING, after.0, limit as i64]).map_err(&sqlite)?;
            let now = now_ms();
            let mut leases = Vec::new();
            let mut bytes = 0usize;
            while let Some(r) = rows.next().map_err(&sqlite)? {
                let id = ItemId(r.get(0).map_err(&sqlite)?);
                // Checked before unsealing, so a run of large items never sits in memory
                // at once; the first item is always taken.
                let size: i64 = r.get(11).map_err(&sqlite)?;
                bytes = bytes.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
                if !leases.is_empty() && bytes > max_bytes {
                    break;
                }
                let next_attempt_at: i64 = r.get(2).map_err(&sqlite)?;
                if next_attempt_at > now {
                    return Ok((leases, Some(Duration::from_millis((next_attempt_at - now) as u64))));
                }
                let kind: String = r.get(3).map_err(&sqlite)?;
                let nonce: Vec<u8> = r.get(6).map_err(&sqlite)?;
                let sealed: Vec<u8> = r.get(7).map_err(&sqlite)?;
                let codec: i64 = r.get(12).map_err(&sqlite)?;
                let payload = codec::open_item(keys, id, codec, size, &nonce, &sealed)?;
                leases.push(Lease {
                    id,
                    source: r.get(8).map_err(&sqlite)?,
                    kind: kind.parse().map_err(|_| QueueError::Corrupt { id, what: "kind" })?,
                    attempts: r.get(1).map_err(&sqlite)?,
                    msg_type: r.get(4).map_err(&sqlite)?,
                    control_id: r.get(5).map_err(&sqlite)?,
                    received_at_ms: r.get(9).map_err(&sqlite)?,
                    external_ref: r.get(10).map_err(&sqlite)?,
                    payload,
                });
            }
            Ok((leases, None))
        })
        .await
    }

    /// The item that arrived with this external reference (e.g. a hub message id), and
    /// its delivery to its sink, if any.
    pub async fn find_by_external_ref(
        &self,
        external_ref: &str,
    ) -> Result<Option<(ItemId, Option<DeliveryInfo>)>, QueueError> {
        let external_ref = external_ref.to_owned();
        let sqlite = self.sqlite_error();
        self.read(move |conn, _| {
            let id: Option<i64> = conn
                .query_row(
                    "SELECT id FROM items WHERE external_ref = ?1",
                    [&external_ref],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&sqlite)?;
            let Some(id) = id else { return Ok(None) };
            let delivery = conn
                .query_row(
                    "SELECT sink, state, attempts, last_error FROM deliveries WHERE item_id = ?1",
                    [id],
                    |r| {
                        Ok(DeliveryInfo {
                            sink: r.get(0)?,
                            state: state_name(r.get(1)?),
                            attempts: r.get(2)?,
                            last_error: r.get(3)?,
                        })
                    },
                )
                .optional()
                .map_err(&sqlite)?;
            Ok(Some((ItemId(id), delivery)))
        })
        .await
    }

    /// Counts per sink, rejected items and total items.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let sqlite = self.sqlite_error();
        self.read(move |conn, _| {
            let now = now_ms();
            let mut stats = QueueStats::default();
            let mut stmt = conn
                .prepare_cached(
                    "SELECT sink, state, COUNT(*), SUM(attempts > 0), MIN(CASE WHEN state = ?1 THEN item_id END)
                     FROM deliveries GROUP BY sink, state ORDER BY sink",
                )
                .map_err(&sqlite)?;
            let rows = stmt
                .query_map([PENDING], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, u64>(2)?, r.get::<_, u64>(3)?, r.get::<_, Option<i64>>(4)?))
                })
                .map_err(&sqlite)?;
            for row in rows {
                let (sink, state, count, retrying, oldest_pending_id) = row.map_err(&sqlite)?;
                if stats.sinks.last().map(|s| &s.sink) != Some(&sink) {
                    stats.sinks.push(SinkStats { sink, ..SinkStats::default() });
                }
                let Some(entry) = stats.sinks.last_mut() else { continue };
                match state {
                    PENDING => {
                        entry.pending = count;
                        entry.retrying = retrying;
                        if let Some(id) = oldest_pending_id {
                            let received: Option<i64> = conn
                                .query_row("SELECT received_at FROM items WHERE id = ?1", [id], |r| r.get(0))
                                .optional()
                                .map_err(&sqlite)?;
                            entry.oldest_pending_ms = received.map(|at| (now - at).max(0));
                        }
                    }
                    DELIVERED => entry.delivered = count,
                    DEAD => entry.dead = count,
                    _ => {}
                }
            }
            stats.rejected = conn
                .query_row("SELECT COUNT(*) FROM items WHERE rejected_reason IS NOT NULL", [], |r| r.get(0))
                .map_err(&sqlite)?;
            stats.items = conn.query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0)).map_err(&sqlite)?;
            Ok(stats)
        })
        .await
    }

    /// Dead letters, oldest first, for one sink or all.
    pub async fn dead_letters(
        &self,
        sink: Option<&ConnectorName>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, QueueError> {
        let sink = sink.map(|s| s.to_string());
        let sqlite = self.sqlite_error();
        self.read(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT d.item_id, d.sink, d.attempts, d.last_error, i.msg_type, i.control_id, i.received_at
                     FROM deliveries d JOIN items i ON i.id = d.item_id
                     WHERE d.state = ?1 AND (?2 IS NULL OR d.sink = ?2) ORDER BY d.item_id LIMIT ?3",
                )
                .map_err(&sqlite)?;
            let rows = stmt
                .query_map(params![DEAD, sink, limit as i64], |r| {
                    Ok(DeadLetter {
                        id: ItemId(r.get(0)?),
                        sink: r.get(1)?,
                        attempts: r.get(2)?,
                        last_error: r.get(3)?,
                        msg_type: r.get(4)?,
                        control_id: r.get(5)?,
                        received_at_ms: r.get(6)?,
                    })
                })
                .map_err(&sqlite)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sqlite)
        })
        .await
    }

    /// One item with its payload and deliveries.
    pub async fn get(&self, id: ItemId) -> Result<Option<StoredItem>, QueueError> {
        let sqlite = self.sqlite_error();
        self.read(move |conn, keys| {
            let row = conn
                .prepare_cached(&format!("{ITEM_COLUMNS} WHERE id = ?1"))
                .and_then(|mut stmt| stmt.query_row([id.0], sealed_item).optional())
                .map_err(&sqlite)?;
            row.map(|sealed| sealed.open(conn, keys, &sqlite))
                .transpose()
        })
        .await
    }

    /// Stored items (in transit, delivered within retention, and optionally rejected)
    /// matching `query`, newest first. Free text is matched after unsealing, so a text
    /// search reads every item in the time range: give a range on a busy queue.
    pub async fn search(&self, query: SearchQuery) -> Result<Vec<StoredItem>, QueueError> {
        let sqlite = self.sqlite_error();
        self.read(move |conn, keys| {
            let subject_digest = query
                .subject
                .as_ref()
                .map(|s| keys.subject_digest(s.as_bytes()));
            let type_prefix = query.msg_type.as_ref().map(|t| format!("{t}^%"));
            let needle = query
                .text
                .as_ref()
                .map(|t| t.to_ascii_lowercase().into_bytes());
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{ITEM_COLUMNS}
                     WHERE (?1 IS NULL OR msg_type = ?1 OR msg_type LIKE ?2)
                       AND (?3 IS NULL OR control_id = ?3)
                       AND (?4 IS NULL OR subject_digest = ?4)
                       AND (?5 IS NULL OR received_at >= ?5)
                       AND (?6 IS NULL OR received_at < ?6)
                       AND (?7 OR rejected_reason IS NULL)
                       AND (?8 IS NULL OR kind = ?8)
                     ORDER BY id DESC"
                ))
                .map_err(&sqlite)?;
            let mut rows = stmt
                .query(params![
                    query.msg_type,
                    type_prefix,
                    query.control_id,
                    subject_digest,
                    query.since_ms,
                    query.until_ms,
                    query.include_rejected,
                    query.kind.map(ItemKind::as_str)
                ])
                .map_err(&sqlite)?;
            let mut found = Vec::new();
            while let Some(row) = rows.next().map_err(&sqlite)? {
                if found.len() >= query.limit {
                    break;
                }
                let item = sealed_item(row)
                    .map_err(&sqlite)?
                    .open(conn, keys, &sqlite)?;
                let is_match = needle
                    .as_ref()
                    .is_none_or(|needle| contains_ignore_ascii_case(&item.payload, needle));
                if is_match {
                    found.push(item);
                }
            }
            Ok(found)
        })
        .await
    }
}

const ITEM_COLUMNS: &str =
    "SELECT id, source, kind, received_at, msg_type, control_id, rejected_reason, nonce, payload,
            codec, payload_bytes FROM items";

struct SealedItem {
    id: ItemId,
    source: String,
    kind: String,
    received_at_ms: i64,
    msg_type: Option<String>,
    control_id: Option<String>,
    rejected_reason: Option<String>,
    nonce: Vec<u8>,
    sealed: Vec<u8>,
    codec: i64,
    payload_bytes: i64,
}

fn sealed_item(r: &Row<'_>) -> rusqlite::Result<SealedItem> {
    Ok(SealedItem {
        id: ItemId(r.get(0)?),
        source: r.get(1)?,
        kind: r.get(2)?,
        received_at_ms: r.get(3)?,
        msg_type: r.get(4)?,
        control_id: r.get(5)?,
        rejected_reason: r.get(6)?,
        nonce: r.get(7)?,
        sealed: r.get(8)?,
        codec: r.get(9)?,
        payload_bytes: r.get(10)?,
    })
}

impl SealedItem {
    fn open(
        self,
        conn: &Connection,
        keys: &Keys,
        sqlite: &impl Fn(rusqlite::Error) -> QueueError,
    ) -> Result<StoredItem, QueueError> {
        let id = self.id;
        let payload = codec::open_item(
            keys,
            id,
            self.codec,
            self.payload_bytes,
            &self.nonce,
            &self.sealed,
        )?;
        let kind = self
            .kind
            .parse()
            .map_err(|_| QueueError::Corrupt { id, what: "kind" })?;
        let mut stmt = conn
            .prepare_cached("SELECT sink, state, attempts, last_error FROM deliveries WHERE item_id = ?1 ORDER BY sink")
            .map_err(sqlite)?;
        let deliveries = stmt
            .query_map([id.0], |r| {
                Ok(DeliveryInfo {
                    sink: r.get(0)?,
                    state: state_name(r.get(1)?),
                    attempts: r.get(2)?,
                    last_error: r.get(3)?,
                })
            })
            .map_err(sqlite)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sqlite)?;
        Ok(StoredItem {
            id,
            source: self.source,
            kind,
            received_at_ms: self.received_at_ms,
            msg_type: self.msg_type,
            control_id: self.control_id,
            rejected_reason: self.rejected_reason,
            deliveries,
            payload,
        })
    }
}

fn state_name(state: i64) -> &'static str {
    match state {
        PENDING => "pending",
        DELIVERED => "delivered",
        _ => "dead",
    }
}

fn contains_ignore_ascii_case(haystack: &[u8], lowercase_needle: &[u8]) -> bool {
    if lowercase_needle.is_empty() {
        return true;
    }
    haystack.windows(lowercase_needle.len()).any(|window| {
        window
            .iter()
            .zip(lowercase_needle)
            .all(|(a, b)| a.to_ascii_lowercase() == *b)
    })
}
