//! The embedded store: one SQLite file in the hub's data folder (WAL, synchronous=FULL,
//! because the hub acknowledges items to agents only after they are stored).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    AgentRecord, DownMessage, InventoryUpdate, MessageFilter, NewMessage, Store, StoredMessage,
    TokenRefusal,
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
";

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
}
