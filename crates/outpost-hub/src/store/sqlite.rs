//! The embedded store: one SQLite file in the hub's data folder (WAL, synchronous=FULL,
//! because the hub acknowledges items to agents only after they are stored).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    AccessRecord, AgentRecord, DownMessage, InventoryUpdate, JobChange, JobChunk, JobRecord,
    MessageFilter, MirrorState, MirroredLine, NewMessage, RolloutRecord, StaffRecord, Store,
    StoredMessage, TokenRefusal,
};
use crate::HubError;

/// The SQLite backend.
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL, hostname TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL, revoked_at INTEGER, last_seen INTEGER, inventory TEXT);
CREATE TABLE IF NOT EXISTS messages (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL, item_id INTEGER NOT NULL,
    source TEXT NOT NULL, kind TEXT NOT NULL, msg_type TEXT, control_id TEXT,
    received_at INTEGER NOT NULL, stored_at INTEGER NOT NULL, payload BLOB NOT NULL,
    UNIQUE (agent_id, item_id));
CREATE INDEX IF NOT EXISTS messages_by_agent ON messages(agent_id, cursor);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL, revoked_at INTEGER);
CREATE TABLE IF NOT EXISTS downs (
    id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, sink TEXT NOT NULL, state TEXT NOT NULL,
    item_id INTEGER, error TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS downs_open ON downs(agent_id, state);
CREATE TABLE IF NOT EXISTS staff (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL, disabled_at INTEGER);
CREATE INDEX IF NOT EXISTS staff_by_token ON staff(token_hash);
CREATE TABLE IF NOT EXISTS hub_keys (name TEXT PRIMARY KEY, seed BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, staff TEXT NOT NULL, capability TEXT NOT NULL,
    max_concurrency INTEGER NOT NULL, error_threshold INTEGER, state TEXT NOT NULL,
    created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, rollout_id TEXT NOT NULL, agent_id TEXT NOT NULL,
    capability TEXT NOT NULL, staff TEXT NOT NULL, args TEXT NOT NULL, signed_job TEXT NOT NULL,
    signature TEXT NOT NULL, state TEXT NOT NULL, rule TEXT, reason TEXT, summary TEXT,
    digest TEXT, truncated INTEGER NOT NULL DEFAULT 0, approver TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_rollout ON jobs(rollout_id, state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_agent_state ON jobs(agent_id, state);
CREATE INDEX IF NOT EXISTS jobs_by_agent_time ON jobs(agent_id, created_at);
CREATE TABLE IF NOT EXISTS job_output (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS audit_mirror (
    agent_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL,
    problem TEXT, problem_at INTEGER);
CREATE TABLE IF NOT EXISTS audit_lines (
    agent_id TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL, line TEXT NOT NULL,
    received_at INTEGER NOT NULL, PRIMARY KEY (agent_id, seq));
CREATE TABLE IF NOT EXISTS access_log (
    at INTEGER NOT NULL, principal TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS access_log_by_time ON access_log(at);
CREATE TABLE IF NOT EXISTS uploads (
    agent_id TEXT NOT NULL, item_id INTEGER NOT NULL, total INTEGER NOT NULL,
    held INTEGER NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (agent_id, item_id));
CREATE TABLE IF NOT EXISTS upload_parts (
    agent_id TEXT NOT NULL, item_id INTEGER NOT NULL, part_offset INTEGER NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (agent_id, item_id, part_offset));
";

/// The final job states as an SQL list; `final_states_match_the_protocol` checks it against
/// `outpost_proto::JobState::is_final`. A macro so that `concat!` can build static SQL.
macro_rules! final_states {
    () => {
        "('done', 'failed', 'refused', 'denied', 'expired', 'cancelled', 'skipped')"
    };
}

/// The `jobs` columns in [`job_from_row`]'s order.
macro_rules! job_fields {
    () => {
        "id, rollout_id, agent_id, capability, staff, args, signed_job, signature, state, rule, \
         reason, summary, digest, truncated, approver, cancel_requested, created_at, expires_at, \
         updated_at"
    };
}

impl SqliteStore {
    /// Opens (creating) `hub.db` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, HubError> {
        let path = data_dir.join("hub.db");
        let sqlite = |source| HubError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sqlite)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        conn.execute_batch(SCHEMA).map_err(sqlite)?;
        Ok(Self {
            path,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, HubError> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(|_| HubError::StoreUnavailable)?;
            work(&mut conn).map_err(|source| HubError::Sqlite { path, source })
        })
        .await
        .map_err(|_| HubError::StoreUnavailable)?
    }
}

fn agent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRecord> {
    let inventory: Option<String> = r.get(7)?;
    Ok(AgentRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        public_key: r.get(2)?,
        hostname: r.get(3)?,
        enrolled_at_ms: r.get(4)?,
        revoked_at_ms: r.get(5)?,
        last_seen_ms: r.get(6)?,
        inventory: inventory.and_then(|text| serde_json::from_str(&text).ok()),
    })
}

fn down_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DownMessage> {
    Ok(DownMessage {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        sink: r.get(2)?,
        state: r.get(3)?,
        item_id: r.get(4)?,
        error: r.get(5)?,
        created_at_ms: r.get(6)?,
        updated_at_ms: r.get(7)?,
        payload: r.get(8)?,
    })
}

/// A `messages` row: the nine metadata columns, then the payload or NULL.
fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let payload: Option<Vec<u8>> = r.get(9)?;
    Ok(StoredMessage {
        cursor: r.get(0)?,
        agent_id: r.get(1)?,
        item_id: r.get(2)?,
        source: r.get(3)?,
        kind: r.get(4)?,
        msg_type: r.get(5)?,
        control_id: r.get(6)?,
        received_at_ms: r.get(7)?,
        stored_at_ms: r.get(8)?,
        payload_base64: payload.map(|p| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(p)
        }),
    })
}

fn staff_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StaffRecord> {
    Ok(StaffRecord {
        name: r.get(0)?,
        role: r.get(1)?,
        token_hash: r.get(2)?,
        created_at_ms: r.get(3)?,
        disabled_at_ms: r.get(4)?,
    })
}

fn rollout_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRecord> {
    Ok(RolloutRecord {
        id: r.get(0)?,
        staff: r.get(1)?,
        capability: r.get(2)?,
        max_concurrency: r.get(3)?,
        error_threshold: r.get(4)?,
        state: r.get(5)?,
        created_at_ms: r.get(6)?,
        updated_at_ms: r.get(7)?,
    })
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: r.get(0)?,
        rollout_id: r.get(1)?,
        agent_id: r.get(2)?,
        capability: r.get(3)?,
        staff: r.get(4)?,
        args: r.get(5)?,
        signed_job: r.get(6)?,
        signature: r.get(7)?,
        state: r.get(8)?,
        rule: r.get(9)?,
        reason: r.get(10)?,
        summary: r.get(11)?,
        digest: r.get(12)?,
        truncated: r.get(13)?,
        approver: r.get(14)?,
        cancel_requested: r.get(15)?,
        created_at_ms: r.get(16)?,
        expires_at_ms: r.get(17)?,
        updated_at_ms: r.get(18)?,
    })
}

fn mirrored_line_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MirroredLine> {
    Ok(MirroredLine {
        seq: r.get::<_, i64>(0)? as u64,
        hash: r.get(1)?,
        line: r.get(2)?,
        received_at_ms: r.get(3)?,
    })
}

/// Agent id lists can hold thousands of ids, more than SQLite's parameter limit allows as
/// `IN (?, ?, …)`; they go in as one JSON array read with `json_each`.
fn json_list(ids: &[String]) -> String {
    serde_json::Value::from(ids.to_vec()).to_string()
}

const AGENT_COLUMNS: &str = "SELECT id, name, public_key, hostname, enrolled_at, revoked_at, last_seen, inventory FROM agents";
const DOWN_COLUMNS: &str =
    "SELECT id, agent_id, sink, state, item_id, error, created_at, updated_at, payload FROM downs";

#[async_trait]
impl Store for SqliteStore {
    async fn create_token(
        &self,
        token_hash: &str,
        name: &str,
        expires_at_ms: i64,
    ) -> Result<(), HubError> {
        let (hash, name) = (token_hash.to_owned(), name.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO tokens (token_hash, name, expires_at) VALUES (?1, ?2, ?3)",
                params![hash, name, expires_at_ms],
            )
            .map(|_| ())
        })
        .await
    }

    async fn consume_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenRefusal>, HubError> {
        let hash = token_hash.to_owned();
        self.run(move |c| {
            let tx = c.transaction()?;
            let row: Option<(String, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT name, expires_at, used_at FROM tokens WHERE token_hash = ?1",
                    [&hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let verdict = match row {
                None => Err(TokenRefusal::Unknown),
                Some((_, _, Some(_))) => Err(TokenRefusal::Reused),
                Some((_, expires_at, None)) if expires_at <= now_ms => Err(TokenRefusal::Expired),
                Some((name, _, None)) => {
                    tx.execute(
                        "UPDATE tokens SET used_at = ?2 WHERE token_hash = ?1",
                        params![hash, now_ms],
                    )?;
                    Ok(name)
                }
            };
            tx.commit()?;
            Ok(verdict)
        })
        .await
    }

    async fn insert_agent(&self, agent: &AgentRecord) -> Result<(), HubError> {
        let agent = agent.clone();
        self.run(move |c| {
            c.execute(
                "INSERT INTO agents (id, name, public_key, hostname, enrolled_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![agent.id, agent.name, agent.public_key, agent.hostname, agent.enrolled_at_ms],
            )
            .map(|_| ())
        })
        .await
    }

    async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, HubError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.query_row(
                &format!("{AGENT_COLUMNS} WHERE id = ?1"),
                [id],
                agent_from_row,
            )
            .optional()
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, HubError> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!("{AGENT_COLUMNS} ORDER BY name, id"))?;
            let rows = stmt.query_map([], agent_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<bool, HubError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.execute(
                "UPDATE agents SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now_ms],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn update_inventories(&self, updates: &[InventoryUpdate]) -> Result<(), HubError> {
        let updates = updates.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE agents SET inventory = ?2, last_seen = ?3 WHERE id = ?1",
                )?;
                for u in &updates {
                    update.execute(params![u.agent_id, u.inventory.to_string(), u.seen_ms])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn insert_messages(
        &self,
        agent_id: &str,
        messages: &[NewMessage],
        now_ms: i64,
    ) -> Result<usize, HubError> {
        let (agent_id, messages) = (agent_id.to_owned(), messages.to_vec());
        self.run(move |c| {
            let tx = c.transaction()?;
            let mut inserted = 0;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO messages (agent_id, item_id, source, kind, msg_type, control_id, received_at, stored_at, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (agent_id, item_id) DO NOTHING",
                )?;
                for m in &messages {
                    inserted += insert.execute(params![
                        agent_id, m.item_id, m.source, m.kind, m.msg_type, m.control_id, m.received_at_ms, now_ms, m.payload
                    ])?;
                }
                tx.execute("UPDATE agents SET last_seen = ?2 WHERE id = ?1", params![agent_id, now_ms])?;
            }
            tx.commit()?;
            Ok(inserted)
        })
        .await
    }

    async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>, HubError> {
        let filter = filter.clone();
        self.run(move |c| {
            let type_prefix = filter.msg_type.as_ref().map(|t| format!("{t}^"));
            let mut stmt = c.prepare_cached(
                "SELECT cursor, agent_id, item_id, source, kind, msg_type, control_id, received_at, stored_at,
                        CASE WHEN ?6 THEN payload END
                 FROM messages
                 WHERE cursor > ?1 AND (?2 IS NULL OR agent_id = ?2) AND (?3 IS NULL OR source = ?3)
                   AND (?4 IS NULL OR msg_type = ?4 OR substr(msg_type, 1, length(?4) + 1) = ?5)
                 ORDER BY cursor LIMIT ?7",
            )?;
            let rows = stmt.query_map(
                params![filter.after, filter.agent_id, filter.source, filter.msg_type, type_prefix, filter.with_payload, filter.limit as i64],
                message_from_row,
            )?;
            rows.collect()
        })
        .await
    }

    async fn recent_messages(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HubError> {
        let agent_id = agent_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT cursor, agent_id, item_id, source, kind, msg_type, control_id, received_at, stored_at, NULL
                 FROM messages WHERE agent_id = ?1 ORDER BY cursor DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![agent_id, limit as i64], message_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn last_cursor(&self) -> Result<i64, HubError> {
        self.run(|c| {
            c.query_row("SELECT COALESCE(MAX(cursor), 0) FROM messages", [], |r| {
                r.get(0)
            })
        })
        .await
    }

    async fn create_api_key(
        &self,
        key_hash: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<(), HubError> {
        let (hash, name) = (key_hash.to_owned(), name.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO api_keys (key_hash, name, created_at) VALUES (?1, ?2, ?3)",
                params![hash, name, now_ms],
            )
            .map(|_| ())
        })
        .await
    }

    async fn api_key(&self, key_hash: &str) -> Result<Option<String>, HubError> {
        let hash = key_hash.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT name FROM api_keys WHERE key_hash = ?1 AND revoked_at IS NULL",
                [hash],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    async fn insert_down(&self, down: &DownMessage) -> Result<(), HubError> {
        let d = down.clone();
        self.run(move |c| {
            c.execute(
                "INSERT INTO downs (id, agent_id, sink, state, item_id, error, created_at, updated_at, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![d.id, d.agent_id, d.sink, d.state, d.item_id, d.error, d.created_at_ms, d.updated_at_ms, d.payload],
            )
            .map(|_| ())
        })
        .await
    }

    async fn down(&self, id: &str) -> Result<Option<DownMessage>, HubError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.query_row(
                &format!("{DOWN_COLUMNS} WHERE id = ?1"),
                [id],
                down_from_row,
            )
            .optional()
        })
        .await
    }

    async fn open_downs(&self, agent_id: &str) -> Result<Vec<DownMessage>, HubError> {
        let agent_id = agent_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare(&format!(
                "{DOWN_COLUMNS} WHERE agent_id = ?1 AND state IN ('accepted', 'queued') ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([agent_id], down_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn update_down(
        &self,
        id: &str,
        agent_id: &str,
        state: &str,
        item_id: Option<i64>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, HubError> {
        let (id, agent_id, state, error) = (
            id.to_owned(),
            agent_id.to_owned(),
            state.to_owned(),
            error.map(str::to_owned),
        );
        self.run(move |c| {
            c.execute(
                "UPDATE downs SET state = ?3, item_id = COALESCE(?4, item_id), error = ?5, updated_at = ?6
                 WHERE id = ?1 AND agent_id = ?2",
                params![id, agent_id, state, item_id, error, now_ms],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn insert_staff(&self, staff: &StaffRecord) -> Result<bool, HubError> {
        let s = staff.clone();
        self.run(move |c| {
            c.execute(
                "INSERT INTO staff (name, role, token_hash, created_at, disabled_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
                params![
                    s.name,
                    s.role,
                    s.token_hash,
                    s.created_at_ms,
                    s.disabled_at_ms
                ],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn staff_by_token(&self, token_hash: &str) -> Result<Option<StaffRecord>, HubError> {
        let hash = token_hash.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT name, role, token_hash, created_at, disabled_at FROM staff
                 WHERE token_hash = ?1 AND disabled_at IS NULL ORDER BY name LIMIT 1",
                [hash],
                staff_from_row,
            )
            .optional()
        })
        .await
    }

    async fn staff(&self) -> Result<Vec<StaffRecord>, HubError> {
        self.run(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, role, token_hash, created_at, disabled_at FROM staff ORDER BY name",
            )?;
            let rows = stmt.query_map([], staff_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn job_key_seed(&self, candidate: &[u8; 32]) -> Result<[u8; 32], HubError> {
        let candidate = *candidate;
        self.run(move |c| {
            // Insert-if-absent then read, rather than read-then-insert: another process on
            // the same file may store its candidate in between, and both must end up with one.
            c.execute(
                "INSERT INTO hub_keys (name, seed) VALUES ('job', ?1) ON CONFLICT (name) DO NOTHING",
                [&candidate[..]],
            )?;
            c.query_row("SELECT seed FROM hub_keys WHERE name = 'job'", [], |r| {
                r.get::<_, [u8; 32]>(0)
            })
        })
        .await
    }

    async fn insert_rollout(&self, rollout: &RolloutRecord) -> Result<(), HubError> {
        let r = rollout.clone();
        self.run(move |c| {
            c.execute(
                "INSERT INTO rollouts (id, staff, capability, max_concurrency, error_threshold, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![r.id, r.staff, r.capability, r.max_concurrency, r.error_threshold, r.state, r.created_at_ms, r.updated_at_ms],
            )
            .map(|_| ())
        })
        .await
    }

    async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, HubError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT id, staff, capability, max_concurrency, error_threshold, state, created_at, updated_at
                 FROM rollouts WHERE id = ?1",
                [id],
                rollout_from_row,
            )
            .optional()
        })
        .await
    }

    async fn running_rollouts(&self) -> Result<Vec<RolloutRecord>, HubError> {
        self.run(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, staff, capability, max_concurrency, error_threshold, state, created_at, updated_at
                 FROM rollouts WHERE state = 'running' ORDER BY created_at",
            )?;
            let rows = stmt.query_map([], rollout_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn set_rollout_state(&self, id: &str, state: &str, now_ms: i64) -> Result<(), HubError> {
        let (id, state) = (id.to_owned(), state.to_owned());
        self.run(move |c| {
            c.execute(
                "UPDATE rollouts SET state = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, state, now_ms],
            )
            .map(|_| ())
        })
        .await
    }

    async fn insert_jobs(&self, jobs: &[JobRecord]) -> Result<(), HubError> {
        let jobs = jobs.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(concat!(
                    "INSERT INTO jobs (",
                    job_fields!(),
                    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
                ))?;
                for j in &jobs {
                    insert.execute(params![
                        j.id, j.rollout_id, j.agent_id, j.capability, j.staff, j.args, j.signed_job,
                        j.signature, j.state, j.rule, j.reason, j.summary, j.digest, j.truncated,
                        j.approver, j.cancel_requested, j.created_at_ms, j.expires_at_ms, j.updated_at_ms
                    ])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, HubError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.query_row(
                concat!("SELECT ", job_fields!(), " FROM jobs WHERE id = ?1"),
                [id],
                job_from_row,
            )
            .optional()
        })
        .await
    }

    async fn rollout_jobs(&self, rollout_id: &str) -> Result<Vec<JobRecord>, HubError> {
        let rollout_id = rollout_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                job_fields!(),
                " FROM jobs WHERE rollout_id = ?1 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([rollout_id], job_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn recent_jobs(&self, agent_id: &str, limit: usize) -> Result<Vec<JobRecord>, HubError> {
        let agent_id = agent_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                job_fields!(),
                " FROM jobs WHERE agent_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![agent_id, limit as i64], job_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn jobs_to_send(
        &self,
        agent_ids: &[String],
        include_sent: bool,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, HubError> {
        let agent_ids = json_list(agent_ids);
        self.run(move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                job_fields!(),
                " FROM jobs
                 WHERE agent_id IN (SELECT value FROM json_each(?1))
                   AND (state = 'pending' OR (?2 AND state = 'sent'))
                   AND expires_at > ?3
                 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map(params![agent_ids, include_sent, now_ms], job_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn jobs_to_cancel(&self, agent_ids: &[String]) -> Result<Vec<JobRecord>, HubError> {
        let agent_ids = json_list(agent_ids);
        self.run(move |c| {
            let mut stmt = c.prepare_cached(concat!(
                "SELECT ",
                job_fields!(),
                " FROM jobs
                 WHERE agent_id IN (SELECT value FROM json_each(?1))
                   AND cancel_requested AND state NOT IN ",
                final_states!(),
                " ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([agent_ids], job_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn release_jobs(
        &self,
        rollout_id: &str,
        count: usize,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, HubError> {
        let rollout_id = rollout_id.to_owned();
        let mut released = self
            .run(move |c| {
                // One statement, so picking and moving cannot interleave with another
                // release on the same file.
                let mut stmt = c.prepare_cached(concat!(
                    "UPDATE jobs SET state = 'pending', updated_at = ?3
                     WHERE state = 'queued' AND id IN (
                         SELECT id FROM jobs WHERE rollout_id = ?1 AND state = 'queued'
                         ORDER BY created_at, id LIMIT ?2)
                     RETURNING ",
                    job_fields!()
                ))?;
                let rows =
                    stmt.query_map(params![rollout_id, count as i64, now_ms], job_from_row)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        // RETURNING gives no order.
        released.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(released)
    }

    async fn update_jobs(&self, changes: &[JobChange]) -> Result<(), HubError> {
        let changes = changes.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut update = tx.prepare_cached(concat!(
                    "UPDATE jobs SET state = ?2, rule = COALESCE(?3, rule), reason = COALESCE(?4, reason),
                         summary = COALESCE(?5, summary), digest = COALESCE(?6, digest),
                         truncated = COALESCE(?7, truncated), approver = COALESCE(?8, approver),
                         updated_at = ?9
                     WHERE id = ?1 AND agent_id = ?10 AND state NOT IN ",
                    final_states!()
                ))?;
                for ch in &changes {
                    update.execute(params![
                        ch.id, ch.state, ch.rule, ch.reason, ch.summary, ch.digest, ch.truncated,
                        ch.approver, ch.at_ms, ch.agent_id
                    ])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn request_cancel(&self, id: &str, now_ms: i64) -> Result<bool, HubError> {
        let id = id.to_owned();
        self.run(move |c| {
            c.execute(
                concat!(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ?2 WHERE id = ?1 AND state NOT IN ",
                    final_states!()
                ),
                params![id, now_ms],
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn append_job_output(&self, chunks: &[JobChunk]) -> Result<(), HubError> {
        let chunks = chunks.to_vec();
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO job_output (job_id, seq, data) VALUES (?1, ?2, ?3)
                     ON CONFLICT (job_id, seq) DO NOTHING",
                )?;
                for ch in &chunks {
                    insert.execute(params![ch.job_id, ch.seq, ch.data])?;
                }
            }
            tx.commit()
        })
        .await
    }

    async fn job_output(
        &self,
        job_id: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<JobChunk>, HubError> {
        let job_id = job_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT job_id, seq, data FROM job_output WHERE job_id = ?1 AND seq > ?2
                 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![job_id, after_seq, limit as i64], |r| {
                Ok(JobChunk {
                    job_id: r.get(0)?,
                    seq: r.get(1)?,
                    data: r.get(2)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn mirror_state(&self, agent_id: &str) -> Result<MirrorState, HubError> {
        let agent_id = agent_id.to_owned();
        self.run(move |c| {
            let state = c
                .query_row(
                    "SELECT last_seq, last_hash, problem, problem_at FROM audit_mirror WHERE agent_id = ?1",
                    [agent_id],
                    |r| {
                        Ok(MirrorState {
                            last_seq: r.get::<_, i64>(0)? as u64,
                            last_hash: r.get(1)?,
                            problem: r.get(2)?,
                            problem_at_ms: r.get(3)?,
                        })
                    },
                )
                .optional()?;
            Ok(state.unwrap_or_default())
        })
        .await
    }

    async fn append_audit_lines(
        &self,
        agent_id: &str,
        lines: &[MirroredLine],
    ) -> Result<(), HubError> {
        let Some(last) = lines.last().cloned() else {
            return Ok(());
        };
        let (agent_id, lines) = (agent_id.to_owned(), lines.to_vec());
        self.run(move |c| {
            let tx = c.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO audit_lines (agent_id, seq, hash, line, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (agent_id, seq) DO NOTHING",
                )?;
                for l in &lines {
                    // Sequence numbers are u64 on the wire; stored bit for bit as i64.
                    insert.execute(params![agent_id, l.seq as i64, l.hash, l.line, l.received_at_ms])?;
                }
                tx.execute(
                    "INSERT INTO audit_mirror (agent_id, last_seq, last_hash) VALUES (?1, ?2, ?3)
                     ON CONFLICT (agent_id) DO UPDATE SET last_seq = excluded.last_seq, last_hash = excluded.last_hash",
                    params![agent_id, last.seq as i64, last.hash],
                )?;
            }
            tx.commit()
        })
        .await
    }

    async fn set_mirror_problem(
        &self,
        agent_id: &str,
        problem: Option<&str>,
        now_ms: i64,
    ) -> Result<(), HubError> {
        let (agent_id, problem) = (agent_id.to_owned(), problem.map(str::to_owned));
        self.run(move |c| {
            match problem {
                Some(problem) => c.execute(
                    "INSERT INTO audit_mirror (agent_id, last_seq, last_hash, problem, problem_at)
                     VALUES (?1, 0, '', ?2, ?3)
                     ON CONFLICT (agent_id) DO UPDATE SET problem = excluded.problem, problem_at = excluded.problem_at",
                    params![agent_id, problem, now_ms],
                ),
                None => c.execute(
                    "UPDATE audit_mirror SET problem = NULL, problem_at = NULL WHERE agent_id = ?1",
                    [agent_id],
                ),
            }
            .map(|_| ())
        })
        .await
    }

    async fn audit_lines(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<MirroredLine>, HubError> {
        let agent_id = agent_id.to_owned();
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, hash, line, received_at FROM audit_lines WHERE agent_id = ?1
                 ORDER BY seq DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![agent_id, limit as i64], mirrored_line_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn record_access(&self, access: &AccessRecord) -> Result<(), HubError> {
        let a = access.clone();
        self.run(move |c| {
            c.execute(
                "INSERT INTO access_log (at, principal, action, target) VALUES (?1, ?2, ?3, ?4)",
                params![a.at_ms, a.principal, a.action, a.target],
            )
            .map(|_| ())
        })
        .await
    }

    async fn access_log(&self, limit: usize) -> Result<Vec<AccessRecord>, HubError> {
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT at, principal, action, target FROM access_log
                 ORDER BY at DESC, rowid DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |r| {
                Ok(AccessRecord {
                    at_ms: r.get(0)?,
                    principal: r.get(1)?,
                    action: r.get(2)?,
                    target: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn listen_jobs(&self) -> Result<Option<tokio::sync::mpsc::Receiver<String>>, HubError> {
        Ok(None)
    }

    async fn blob_begin(&self, agent_id: &str, item_id: i64, total: u64) -> Result<u64, HubError> {
        let agent_id = agent_id.to_owned();
        let now = crate::now_ms();
        self.run(move |c| {
            // IMMEDIATE: read and write under one write lock, also against another store
            // (another process) on the same file.
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<(u64, u64)> = tx
                .query_row(
                    "SELECT held, total FROM uploads WHERE agent_id = ?1 AND item_id = ?2",
                    params![agent_id, item_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let held = match found {
                Some((held, stored_total)) if stored_total == total => {
                    tx.execute(
                        "UPDATE uploads SET updated_at = ?3 WHERE agent_id = ?1 AND item_id = ?2",
                        params![agent_id, item_id, now],
                    )?;
                    held
                }
                Some(_) => {
                    // Another file under the same item id: start over.
                    tx.execute(
                        "DELETE FROM upload_parts WHERE agent_id = ?1 AND item_id = ?2",
                        params![agent_id, item_id],
                    )?;
                    tx.execute(
                        "UPDATE uploads SET total = ?3, held = 0, updated_at = ?4
                         WHERE agent_id = ?1 AND item_id = ?2",
                        params![agent_id, item_id, total, now],
                    )?;
                    0
                }
                None => {
                    tx.execute(
                        "INSERT INTO uploads (agent_id, item_id, total, held, updated_at)
                         VALUES (?1, ?2, ?3, 0, ?4)",
                        params![agent_id, item_id, total, now],
                    )?;
                    0
                }
            };
            tx.commit()?;
            Ok(held)
        })
        .await
    }

    async fn blob_append(
        &self,
        agent_id: &str,
        item_id: i64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, HubError> {
        let (agent_id, data) = (agent_id.to_owned(), data.to_vec());
        let now = crate::now_ms();
        self.run(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found: Option<(u64, u64)> = tx
                .query_row(
                    "SELECT held, total FROM uploads WHERE agent_id = ?1 AND item_id = ?2",
                    params![agent_id, item_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((held, total)) = found else {
                return Ok(0);
            };
            let len = data.len() as u64;
            let fits = held.checked_add(len).is_some_and(|end| end <= total);
            if data.is_empty() || offset != held || !fits {
                return Ok(held);
            }
            // A part left at this offset cannot exist (parts go when an upload restarts, and
            // `held` only grows past stored parts); replacing it keeps the upload movable if
            // one ever did.
            tx.execute(
                "INSERT INTO upload_parts (agent_id, item_id, part_offset, data) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (agent_id, item_id, part_offset) DO UPDATE SET data = excluded.data",
                params![agent_id, item_id, offset, data],
            )?;
            tx.execute(
                "UPDATE uploads SET held = ?3, updated_at = ?4 WHERE agent_id = ?1 AND item_id = ?2",
                params![agent_id, item_id, held + len, now],
            )?;
            tx.commit()?;
            Ok(held + len)
        })
        .await
    }

    async fn blob_state(
        &self,
        agent_id: &str,
        item_id: i64,
    ) -> Result<Option<(u64, u64)>, HubError> {
        let agent_id = agent_id.to_owned();
        self.run(move |c| {
            c.query_row(
                "SELECT held, total FROM uploads WHERE agent_id = ?1 AND item_id = ?2",
                params![agent_id, item_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .await
    }

    async fn blob_parts(
        &self,
        agent_id: &str,
        item_id: i64,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, HubError> {
        let agent_id = agent_id.to_owned();
        // Offsets are stored as INTEGER (i64); none is larger than that.
        let from_offset = i64::try_from(from_offset).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT part_offset, data FROM upload_parts
                 WHERE agent_id = ?1 AND item_id = ?2 AND part_offset >= ?3
                 ORDER BY part_offset LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![agent_id, item_id, from_offset, limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn final_states_match_the_protocol() {
        let names = [
            "queued",
            "pending",
            "sent",
            "awaiting_approval",
            "running",
            "done",
            "failed",
            "refused",
            "denied",
            "expired",
            "cancelled",
            "skipped",
        ];
        for name in names {
            let state = outpost_proto::JobState::from_name(name).unwrap();
            let listed = final_states!().contains(&format!("'{name}'"));
            assert_eq!(listed, state.is_final(), "{name}");
        }
    }
}
