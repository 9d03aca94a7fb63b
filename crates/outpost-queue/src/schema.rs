//! The queue file's schema and connection settings.

use rusqlite::Connection;

/// Bumped when the schema changes; `open` refuses files from a newer version.
pub const SCHEMA_VERSION: i64 = 2;

/// Delivery states as stored.
pub const PENDING: i64 = 0;
/// Delivered: the sink's peer acknowledged it.
pub const DELIVERED: i64 = 1;
/// Dead letter: gave up after the configured attempts, or a permanent error.
pub const DEAD: i64 = 2;

/// Settings every connection needs. `synchronous = FULL` makes each commit durable in WAL
/// mode; group commit (many items per transaction) is what keeps that affordable.
pub fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // `auto_vacuum = INCREMENTAL` only takes on a file with no tables yet (and before WAL
    // mode writes the header); on an existing file this is a no-op. It is what lets purge
    // hand freed pages back to the file system.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // After a checkpoint the WAL is cut back to this size instead of staying at its peak.
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    conn.pragma_update(None, "cache_size", -2048)?; // 2 MiB: the agent should stay small
    Ok(())
}

/// The file's schema version (0: a new file).
pub fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Creates the tables on a new file, or upgrades an older one. It runs under the write
/// lock and looks again once it holds it, so two processes opening one file at once
/// (an agent and `outpost queue`) cannot both upgrade it.
pub fn create(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if version(&tx)? >= SCHEMA_VERSION {
        return Ok(());
    }
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS items (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            source          TEXT NOT NULL,
            kind            TEXT NOT NULL,
            received_at     INTEGER NOT NULL,   -- unix milliseconds
            msg_type        TEXT,               -- e.g. MSH-9; never patient data
            control_id      TEXT,               -- e.g. MSH-10; never patient data
            subject_digest  BLOB,               -- keyed digest of the patient id (PID-3)
            external_ref    TEXT,               -- the sender's id for it when not HL7 (a hub message id)
            rejected_reason TEXT,               -- set when intake refused the item
            nonce           BLOB NOT NULL,
            payload         BLOB NOT NULL,      -- sealed
            payload_bytes   INTEGER NOT NULL,   -- plaintext length
            codec           INTEGER NOT NULL DEFAULT 0  -- 0 as given, 1 zstd (then sealed)
        );
        CREATE INDEX IF NOT EXISTS items_by_received ON items(received_at);
        CREATE INDEX IF NOT EXISTS items_by_control_id ON items(control_id);
        CREATE INDEX IF NOT EXISTS items_by_subject ON items(subject_digest);
        CREATE UNIQUE INDEX IF NOT EXISTS items_by_external_ref ON items(external_ref) WHERE external_ref IS NOT NULL;
        CREATE TABLE IF NOT EXISTS deliveries (
            item_id         INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
            sink            TEXT NOT NULL,
            state           INTEGER NOT NULL,
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER NOT NULL DEFAULT 0,
            last_error      TEXT,
            updated_at      INTEGER NOT NULL,
            PRIMARY KEY (item_id, sink)
        ) WITHOUT ROWID;
        -- The per-sink cursor: the lowest pending item id of a sink.
        CREATE INDEX IF NOT EXISTS deliveries_cursor ON deliveries(sink, state, item_id);
        -- Version 2: where each source resumes, committed with the items it queued.
        CREATE TABLE IF NOT EXISTS source_state (
            name            TEXT PRIMARY KEY,
            nonce           BLOB NOT NULL,
            value           BLOB NOT NULL,      -- sealed
            updated_at      INTEGER NOT NULL
        ) WITHOUT ROWID;",
    )?;
    // Version 1 files: their items table has no codec column (all payloads as given).
    let has_codec = tx
        .prepare("SELECT 1 FROM pragma_table_info('items') WHERE name = 'codec'")?
        .exists([])?;
    if !has_codec {
        tx.execute_batch("ALTER TABLE items ADD COLUMN codec INTEGER NOT NULL DEFAULT 0")?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}
