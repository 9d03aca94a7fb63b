//! The PostgreSQL store, for several hub processes sharing one database
//! (`database = "postgres://user:pass@host:5432/db"` in the hub's config).
//!
//! It behaves exactly like the SQLite store; `tests/store_conformance.rs` runs one set of
//! behaviour tests against both.
//!
//! - **Pool:** `deadpool-postgres`, at most [`POOL_SIZE`] connections. It already does what a
//!   hand-made pool (connections behind a semaphore) would have to grow: a connection that the
//!   server closed (restart, failover, idle kill) is dropped and replaced at checkout instead
//!   of failing every later query, creating and waiting have timeouts, and each connection keeps
//!   its prepared statements (`prepare_cached`).
//! - **Schema:** versioned migrations ([`MIGRATIONS`]) applied at open in one transaction that
//!   first takes `pg_advisory_xact_lock`, so hub processes starting together apply each version
//!   once; `schema_migrations` records them. A database migrated by a newer hub is refused.
//! - **Cursor order:** `messages.cursor` is an identity column, and every insert transaction
//!   takes one advisory lock before drawing cursors. Writers therefore commit in cursor order,
//!   and a reader that has seen cursor N has also seen every smaller cursor, as with SQLite's
//!   single writer. Without the lock, a transaction holding cursor 7 could commit after one
//!   holding cursor 8, and a reader already past 8 would never see 7. Cursors may have gaps
//!   (a skipped duplicate or a rollback still uses up a sequence value); they only grow.
//! - **Inventory** is stored as TEXT, not JSONB: JSONB refuses the `\u0000` escape that
//!   serde_json writes and SQLite stores, so a heartbeat SQLite accepts would fail here.
//! - **No TLS to the database (yet):** connections use `NoTls`, so the database should be on
//!   loopback or a private network; a URL asking for `sslmode=require` fails to connect.
//!
//! Errors and logs name the database only by its URL with the password redacted, and carry
//! PostgreSQL's error code and message but never its DETAIL, which can quote row values.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{
    AgentRecord, DownMessage, InventoryUpdate, MessageFilter, NewMessage, Store, StoredMessage,
    TokenRefusal,
};
use crate::{secrets, HubError};

/// At most this many connections per hub process.
pub const POOL_SIZE: usize = 16;
/// Connecting to the server, when the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for a free pooled connection (like SQLite's busy timeout).
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// One store call, end to end, including waiting for locks.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serialises schema migrations across hub processes (`pg_advisory_xact_lock` key).
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401;
/// Serialises message inserts so commits happen in cursor order (see the module doc).
const MESSAGES_LOCK: i64 = 0x6f75_7470_6f73_7402;

/// The schema, one entry per version, applied in order and never edited once released:
/// a change is a new version.
pub const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "
CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, expires_at BIGINT NOT NULL, used_at BIGINT);
CREATE TABLE agents (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL, hostname TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL, revoked_at BIGINT, last_seen BIGINT, inventory TEXT);
CREATE TABLE messages (
    cursor BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, agent_id TEXT NOT NULL,
    item_id BIGINT NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL, msg_type TEXT,
    control_id TEXT, received_at BIGINT NOT NULL, stored_at BIGINT NOT NULL,
    payload BYTEA NOT NULL, UNIQUE (agent_id, item_id));
CREATE INDEX messages_by_agent ON messages (agent_id, cursor);
CREATE TABLE api_keys (
    key_hash TEXT PRIMARY KEY, name TEXT NOT NULL, created_at BIGINT NOT NULL, revoked_at BIGINT);
CREATE TABLE downs (
    id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, sink TEXT NOT NULL, state TEXT NOT NULL,
    item_id BIGINT, error TEXT, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
    payload BYTEA NOT NULL);
CREATE INDEX downs_open ON downs (agent_id, state);
",
)];

/// The PostgreSQL backend: a pool of plain-TCP connections (`NoTls`; no TLS to the database
/// yet, see the module doc).
pub struct PostgresStore {
    pool: Pool,
    /// The URL with its password redacted, for errors and logs.
    target: String,
}

impl PostgresStore {
    /// Connects to `url` and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, HubError> {
        let target = secrets::redact_url(url);
        let failed = |operation, detail| HubError::Postgres {
            target: target.clone(),
            operation,
            detail,
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|err| failed("parse url", describe(&Failure::Db(err))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("outpost-hub");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| failed("build pool", err.to_string()))?;
        let store = Self {
            pool,
            target: target.clone(),
        };
        let version = store.run("migrate", store.migrate()).await?;
        tracing::info!(database = %target, schema_version = version, "hub store: postgresql");
        Ok(store)
    }

    /// Applies the migrations this database lacks; returns the schema version.
    async fn migrate(&self) -> Result<i32, Failure> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
        let current: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await?
            .try_get(0)?;
        let latest = MIGRATIONS.last().map_or(0, |(version, _)| *version);
        if current > latest {
            return Err(Failure::Schema(format!(
                "the database is at schema version {current}, newer than this hub knows ({latest}); \
                 upgrade this hub"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &crate::now_ms()],
            )
            .await?;
            tracing::info!(database = %self.target, version, "schema migration applied");
        }
        tx.commit().await?;
        Ok(latest)
    }

    /// Runs one store call with a deadline, turning failures into `HubError::Postgres`.
    async fn run<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, HubError> {
        let detail = match tokio::time::timeout(OPERATION_TIMEOUT, work).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(failure)) => describe(&failure),
            Err(_) => format!(
                "no answer within {} s (dropped; a transaction is rolled back)",
                OPERATION_TIMEOUT.as_secs()
            ),
        };
        Err(HubError::Postgres {
            target: self.target.clone(),
            operation,
            detail,
        })
    }
}

/// Why a call failed, before it is described for `HubError`.
enum Failure {
    Db(tokio_postgres::Error),
    Pool(PoolError),
    Schema(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(err: tokio_postgres::Error) -> Self {
        Self::Db(err)
    }
}

impl From<PoolError> for Failure {
    fn from(err: PoolError) -> Self {
        Self::Pool(err)
    }
}

/// A one-line description that is safe to log: the server's code and message, never its
/// DETAIL or HINT (which can quote row values), and never the connection URL.
fn describe(failure: &Failure) -> String {
    let err = match failure {
        Failure::Db(err) => err,
        Failure::Pool(PoolError::Backend(err)) => err,
        Failure::Pool(PoolError::Timeout(kind)) => {
            return format!("connection pool timed out ({kind:?})").to_lowercase()
        }
        Failure::Pool(other) => return format!("connection pool: {other}"),
        Failure::Schema(text) => return text.clone(),
    };
    if let Some(db) = err.as_db_error() {
        return format!(
            "{} {}: {}",
            db.code().code(),
            db.severity().to_lowercase(),
            db.message()
        );
    }
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

fn agent_from_row(r: &Row) -> Result<AgentRecord, tokio_postgres::Error> {
    let inventory: Option<String> = r.try_get(7)?;
    Ok(AgentRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        public_key: r.try_get(2)?,
        hostname: r.try_get(3)?,
        enrolled_at_ms: r.try_get(4)?,
        revoked_at_ms: r.try_get(5)?,
        last_seen_ms: r.try_get(6)?,
        inventory: inventory.and_then(|text| serde_json::from_str(&text).ok()),
    })
}

fn down_from_row(r: &Row) -> Result<DownMessage, tokio_postgres::Error> {
    Ok(DownMessage {
        id: r.try_get(0)?,
        agent_id: r.try_get(1)?,
        sink: r.try_get(2)?,
        state: r.try_get(3)?,
        item_id: r.try_get(4)?,
        error: r.try_get(5)?,
        created_at_ms: r.try_get(6)?,
        updated_at_ms: r.try_get(7)?,
        payload: r.try_get(8)?,
    })
}

/// Columns 0..=8 of `messages` plus, optionally, the payload as column 9.
fn message_from_row(r: &Row, has_payload: bool) -> Result<StoredMessage, tokio_postgres::Error> {
    let payload: Option<Vec<u8>> = if has_payload { r.try_get(9)? } else { None };
    Ok(StoredMessage {
        cursor: r.try_get(0)?,
        agent_id: r.try_get(1)?,
        item_id: r.try_get(2)?,
        source: r.try_get(3)?,
        kind: r.try_get(4)?,
        msg_type: r.try_get(5)?,
        control_id: r.try_get(6)?,
        received_at_ms: r.try_get(7)?,
        stored_at_ms: r.try_get(8)?,
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
impl Store for PostgresStore {
    async fn create_token(
        &self,
        token_hash: &str,
        name: &str,
        expires_at_ms: i64,
    ) -> Result<(), HubError> {
        self.run("create_token", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO tokens (token_hash, name, expires_at) VALUES ($1, $2, $3)",
                )
                .await?;
            client
                .execute(&stmt, &[&token_hash, &name, &expires_at_ms])
                .await?;
            Ok(())
        })
        .await
    }

    async fn consume_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenRefusal>, HubError> {
        self.run("consume_token", async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // FOR UPDATE: a concurrent consumer waits here, then reads the committed `used_at`
            // and gets `Reused`.
            let row = tx
                .query_opt(
                    "SELECT name, expires_at, used_at FROM tokens WHERE token_hash = $1 FOR UPDATE",
                    &[&token_hash],
                )
                .await?;
            let row = match row {
                Some(r) => Some((
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, i64>(1)?,
                    r.try_get::<_, Option<i64>>(2)?,
                )),
                None => None,
            };
            let verdict = match row {
                None => Err(TokenRefusal::Unknown),
                Some((_, _, Some(_))) => Err(TokenRefusal::Reused),
                Some((_, expires_at, None)) if expires_at <= now_ms => Err(TokenRefusal::Expired),
                Some((name, _, None)) => {
                    tx.execute(
                        "UPDATE tokens SET used_at = $2 WHERE token_hash = $1",
                        &[&token_hash, &now_ms],
                    )
                    .await?;
                    Ok(name)
                }
            };
            tx.commit().await?;
            Ok(verdict)
        })
        .await
    }

    async fn insert_agent(&self, agent: &AgentRecord) -> Result<(), HubError> {
        self.run("insert_agent", async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "INSERT INTO agents (id, name, public_key, hostname, enrolled_at) VALUES ($1, $2, $3, $4, $5)",
                    &[&agent.id, &agent.name, &agent.public_key, &agent.hostname, &agent.enrolled_at_ms],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, HubError> {
        self.run("agent", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(&format!("{AGENT_COLUMNS} WHERE id = $1"))
                .await?;
            match client.query_opt(&stmt, &[&id]).await? {
                Some(row) => Ok(Some(agent_from_row(&row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, HubError> {
        // `COLLATE "C"` compares bytes, as SQLite's default BINARY collation does, whatever
        // collation the database was created with.
        self.run("agents", async {
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    &format!("{AGENT_COLUMNS} ORDER BY name COLLATE \"C\", id COLLATE \"C\""),
                    &[],
                )
                .await?;
            Ok(rows.iter().map(agent_from_row).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<bool, HubError> {
        self.run("revoke_agent", async {
            let client = self.pool.get().await?;
            let changed = client
                .execute(
                    "UPDATE agents SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    &[&id, &now_ms],
                )
                .await?;
            Ok(changed > 0)
        })
        .await
    }

    async fn update_inventories(&self, updates: &[InventoryUpdate]) -> Result<(), HubError> {
        self.run("update_inventories", async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let stmt = tx
                .prepare_cached("UPDATE agents SET inventory = $2, last_seen = $3 WHERE id = $1")
                .await?;
            for u in updates {
                let inventory = u.inventory.to_string();
                tx.execute(&stmt, &[&u.agent_id, &inventory, &u.seen_ms])
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn insert_messages(
        &self,
        agent_id: &str,
        messages: &[NewMessage],
        now_ms: i64,
    ) -> Result<usize, HubError> {
        self.run("insert_messages", async {
            let mut client = self.pool.get().await?;
            let insert = client
                .prepare_cached(
                    "INSERT INTO messages (agent_id, item_id, source, kind, msg_type, control_id, received_at, stored_at, payload)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (agent_id, item_id) DO NOTHING",
                )
                .await?;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MESSAGES_LOCK])
                .await?;
            // Sent together (tokio-postgres pipelines them in order): one round trip per
            // batch rather than per message, and cursors follow the batch's order.
            let counts = futures::future::try_join_all(messages.iter().map(|m| {
                let params: [&(dyn ToSql + Sync); 9] = [
                        &agent_id,
                        &m.item_id,
                        &m.source,
                        &m.kind,
                        &m.msg_type,
                        &m.control_id,
                        &m.received_at_ms,
                        &now_ms,
                        &m.payload,
                    ];
                tx.execute_raw(&insert, params)
            }))
            .await?;
            tx.execute(
                "UPDATE agents SET last_seen = $2 WHERE id = $1",
                &[&agent_id, &now_ms],
            )
            .await?;
            tx.commit().await?;
            Ok(counts.iter().sum::<u64>() as usize)
        })
        .await
    }

    async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>, HubError> {
        // `msg_type` matches by component, like the agent's routes: equal, or followed by `^`.
        // starts_with compares literally and case-sensitively.
        self.run("messages", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT cursor, agent_id, item_id, source, kind, msg_type, control_id, received_at, stored_at,
                            CASE WHEN $6::boolean THEN payload END
                     FROM messages
                     WHERE cursor > $1
                       AND ($2::text IS NULL OR agent_id = $2)
                       AND ($3::text IS NULL OR source = $3)
                       AND ($4::text IS NULL OR msg_type = $4 OR starts_with(msg_type, $4 || '^'))
                     ORDER BY cursor LIMIT $5",
                )
                .await?;
            let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    &stmt,
                    &[
                        &filter.after,
                        &filter.agent_id,
                        &filter.source,
                        &filter.msg_type,
                        &limit,
                        &filter.with_payload,
                    ],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| message_from_row(r, true))
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn recent_messages(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HubError> {
        self.run("recent_messages", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT cursor, agent_id, item_id, source, kind, msg_type, control_id, received_at, stored_at
                     FROM messages WHERE agent_id = $1 ORDER BY cursor DESC LIMIT $2",
                )
                .await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client.query(&stmt, &[&agent_id, &limit]).await?;
            Ok(rows
                .iter()
                .map(|r| message_from_row(r, false))
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn last_cursor(&self) -> Result<i64, HubError> {
        self.run("last_cursor", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached("SELECT COALESCE(MAX(cursor), 0) FROM messages")
                .await?;
            Ok(client.query_one(&stmt, &[]).await?.try_get(0)?)
        })
        .await
    }

    async fn create_api_key(
        &self,
        key_hash: &str,
        name: &str,
        now_ms: i64,
    ) -> Result<(), HubError> {
        self.run("create_api_key", async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "INSERT INTO api_keys (key_hash, name, created_at) VALUES ($1, $2, $3)",
                    &[&key_hash, &name, &now_ms],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn api_key(&self, key_hash: &str) -> Result<Option<String>, HubError> {
        self.run("api_key", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT name FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                )
                .await?;
            match client.query_opt(&stmt, &[&key_hash]).await? {
                Some(row) => Ok(Some(row.try_get(0)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn insert_down(&self, d: &DownMessage) -> Result<(), HubError> {
        self.run("insert_down", async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "INSERT INTO downs (id, agent_id, sink, state, item_id, error, created_at, updated_at, payload)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[&d.id, &d.agent_id, &d.sink, &d.state, &d.item_id, &d.error, &d.created_at_ms, &d.updated_at_ms, &d.payload],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn down(&self, id: &str) -> Result<Option<DownMessage>, HubError> {
        self.run("down", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(&format!("{DOWN_COLUMNS} WHERE id = $1"))
                .await?;
            match client.query_opt(&stmt, &[&id]).await? {
                Some(row) => Ok(Some(down_from_row(&row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn open_downs(&self, agent_id: &str) -> Result<Vec<DownMessage>, HubError> {
        self.run("open_downs", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "{DOWN_COLUMNS} WHERE agent_id = $1 AND state IN ('accepted', 'queued') ORDER BY created_at, id COLLATE \"C\""
                ))
                .await?;
            let rows = client.query(&stmt, &[&agent_id]).await?;
            Ok(rows
                .iter()
                .map(down_from_row)
                .collect::<Result<_, _>>()?)
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
        self.run("update_down", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "UPDATE downs SET state = $3, item_id = COALESCE($4, item_id), error = $5, updated_at = $6
                     WHERE id = $1 AND agent_id = $2",
                )
                .await?;
            let changed = client
                .execute(&stmt, &[&id, &agent_id, &state, &item_id, &error, &now_ms])
                .await?;
            Ok(changed > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_connection_names_the_database_without_its_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let url = format!("postgres://hub:s3cret-pw@127.0.0.1:{port}/hub?connect_timeout=2");
        let err = match PostgresStore::open(&url).await {
            Ok(_) => panic!("nothing listens on 127.0.0.1:{port}, yet the store opened"),
            Err(err) => err.to_string(),
        };
        assert!(
            !err.contains("s3cret-pw") && err.contains("hub:***@127.0.0.1"),
            "error should name the redacted URL only: {err}"
        );
    }

    #[tokio::test]
    async fn a_malformed_url_is_refused_without_echoing_it() {
        let err = match PostgresStore::open("postgres://hub:s3cret-pw@127.0.0.1:notaport/hub").await
        {
            Ok(_) => panic!("a URL with a non-numeric port opened"),
            Err(err) => err.to_string(),
        };
        assert!(
            !err.contains("s3cret-pw") && err.contains("parse url"),
            "{err}"
        );
    }
}
