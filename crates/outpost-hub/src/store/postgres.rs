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
//! - **Job notifications:** writes that give an agent new work (pending jobs, cancel
//!   requests) run `pg_notify('outpost_jobs', agent id)` in their transaction, so the hub
//!   process holding that agent's session hears of it on commit; [`Store::listen_jobs`] keeps
//!   one dedicated connection (outside the pool) on `LISTEN outpost_jobs` and reconnects when
//!   it is lost. A notification missed meanwhile is caught by the hub's periodic sweep.
//! - **Job output** is stored as BYTEA, not TEXT: a capability's output may contain U+0000,
//!   which PostgreSQL TEXT refuses and SQLite stores.
//! - **No TLS to the database (yet):** connections use `NoTls`, so the database should be on
//!   loopback or a private network; a URL asking for `sslmode=require` fails to connect.
//!
//! Errors and logs name the database only by its URL with the password redacted, and carry
//! PostgreSQL's error code and message but never its DETAIL, which can quote row values.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row};

use super::{
    AccessRecord, AgentRecord, DownMessage, InventoryUpdate, JobChange, JobChunk, JobRecord,
    MessageFilter, MirrorState, MirroredLine, NewMessage, RolloutRecord, StaffRecord, Store,
    StoredMessage, TokenRefusal,
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

/// The channel job notifications travel on (`LISTEN`/`pg_notify`).
const JOBS_CHANNEL: &str = "outpost_jobs";
/// Agent ids waiting for the hub in [`Store::listen_jobs`]'s channel; more are dropped (the
/// hub's periodic sweep finds their jobs anyway).
const NOTIFY_QUEUE: usize = 1024;
/// First wait before reconnecting the notification connection, doubled up to the cap.
const LISTEN_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between reconnection attempts.
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(10);
/// How often the notification connection is checked: a connection whose peer vanished
/// without closing it (failover, a dropped NAT entry) would otherwise wait silently forever.
const LISTEN_PING_INTERVAL: Duration = Duration::from_secs(30);

/// Serialises schema migrations across hub processes (`pg_advisory_xact_lock` key).
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401;
/// Serialises message inserts so commits happen in cursor order (see the module doc).
const MESSAGES_LOCK: i64 = 0x6f75_7470_6f73_7402;

/// The schema, one entry per version, applied in order and never edited once released:
/// a change is a new version.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
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
    ),
    (
        2,
        "
CREATE TABLE staff (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL, disabled_at BIGINT);
CREATE INDEX staff_by_token ON staff (token_hash);
CREATE TABLE hub_keys (name TEXT PRIMARY KEY, seed BYTEA NOT NULL);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY, staff TEXT NOT NULL, capability TEXT NOT NULL,
    max_concurrency BIGINT NOT NULL, error_threshold BIGINT, state TEXT NOT NULL,
    created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, rollout_id TEXT NOT NULL, agent_id TEXT NOT NULL,
    capability TEXT NOT NULL, staff TEXT NOT NULL, args TEXT NOT NULL, signed_job TEXT NOT NULL,
    signature TEXT NOT NULL, state TEXT NOT NULL, rule TEXT, reason TEXT, summary TEXT,
    digest TEXT, truncated BOOLEAN NOT NULL DEFAULT FALSE, approver TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE, created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, updated_at BIGINT NOT NULL);
CREATE INDEX jobs_by_rollout ON jobs (rollout_id, state, created_at);
CREATE INDEX jobs_by_agent_state ON jobs (agent_id, state);
CREATE INDEX jobs_by_agent_time ON jobs (agent_id, created_at);
CREATE TABLE job_output (
    job_id TEXT NOT NULL, seq BIGINT NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (job_id, seq));
CREATE TABLE audit_mirror (
    agent_id TEXT PRIMARY KEY, last_seq BIGINT NOT NULL, last_hash TEXT NOT NULL,
    problem TEXT, problem_at BIGINT);
CREATE TABLE audit_lines (
    agent_id TEXT NOT NULL, seq BIGINT NOT NULL, hash TEXT NOT NULL, line TEXT NOT NULL,
    received_at BIGINT NOT NULL, PRIMARY KEY (agent_id, seq));
CREATE TABLE access_log (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at BIGINT NOT NULL,
    principal TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL);
CREATE INDEX access_log_by_time ON access_log (at);
",
    ),
    (
        3,
        "
CREATE TABLE uploads (
    agent_id TEXT NOT NULL, item_id BIGINT NOT NULL, total BIGINT NOT NULL,
    held BIGINT NOT NULL, updated_at BIGINT NOT NULL, PRIMARY KEY (agent_id, item_id));
CREATE TABLE upload_parts (
    agent_id TEXT NOT NULL, item_id BIGINT NOT NULL, part_offset BIGINT NOT NULL,
    data BYTEA NOT NULL, PRIMARY KEY (agent_id, item_id, part_offset));
",
    ),
];

/// The PostgreSQL backend: a pool of plain-TCP connections (`NoTls`; no TLS to the database
/// yet, see the module doc).
pub struct PostgresStore {
    pool: Pool,
    /// The pool's connection settings, for the dedicated notification connection.
    config: tokio_postgres::Config,
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
            config.clone(),
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
            config,
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
    /// An argument the database cannot hold: what.
    Invalid(String),
    /// The notification connection was lost: why.
    Lost(String),
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
        Failure::Schema(text) | Failure::Invalid(text) => return text.clone(),
        Failure::Lost(text) => return text.clone(),
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

fn staff_from_row(r: &Row) -> Result<StaffRecord, tokio_postgres::Error> {
    Ok(StaffRecord {
        name: r.try_get(0)?,
        role: r.try_get(1)?,
        token_hash: r.try_get(2)?,
        created_at_ms: r.try_get(3)?,
        disabled_at_ms: r.try_get(4)?,
    })
}

/// A u32 kept in a BIGINT column; only ever written from a u32.
fn to_u32(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn rollout_from_row(r: &Row) -> Result<RolloutRecord, tokio_postgres::Error> {
    Ok(RolloutRecord {
        id: r.try_get(0)?,
        staff: r.try_get(1)?,
        capability: r.try_get(2)?,
        max_concurrency: to_u32(r.try_get(3)?),
        error_threshold: r.try_get::<_, Option<i64>>(4)?.map(to_u32),
        state: r.try_get(5)?,
        created_at_ms: r.try_get(6)?,
        updated_at_ms: r.try_get(7)?,
    })
}

fn job_from_row(r: &Row) -> Result<JobRecord, tokio_postgres::Error> {
    Ok(JobRecord {
        id: r.try_get(0)?,
        rollout_id: r.try_get(1)?,
        agent_id: r.try_get(2)?,
        capability: r.try_get(3)?,
        staff: r.try_get(4)?,
        args: r.try_get(5)?,
        signed_job: r.try_get(6)?,
        signature: r.try_get(7)?,
        state: r.try_get(8)?,
        rule: r.try_get(9)?,
        reason: r.try_get(10)?,
        summary: r.try_get(11)?,
        digest: r.try_get(12)?,
        truncated: r.try_get(13)?,
        approver: r.try_get(14)?,
        cancel_requested: r.try_get(15)?,
        created_at_ms: r.try_get(16)?,
        expires_at_ms: r.try_get(17)?,
        updated_at_ms: r.try_get(18)?,
    })
}

fn jobs_from_rows(rows: &[Row]) -> Result<Vec<JobRecord>, tokio_postgres::Error> {
    rows.iter().map(job_from_row).collect()
}

fn mirrored_line_from_row(r: &Row) -> Result<MirroredLine, tokio_postgres::Error> {
    Ok(MirroredLine {
        seq: r.try_get::<_, i64>(0)? as u64,
        hash: r.try_get(1)?,
        line: r.try_get(2)?,
        received_at_ms: r.try_get(3)?,
    })
}

/// Tells every hub process (their [`Store::listen_jobs`]) that these agents have new work;
/// delivered when `tx` commits, and not at all if it rolls back.
async fn notify_agents<'a>(
    tx: &tokio_postgres::Transaction<'_>,
    agent_ids: impl IntoIterator<Item = &'a str>,
) -> Result<(), tokio_postgres::Error> {
    let distinct: BTreeSet<&str> = agent_ids.into_iter().collect();
    for agent_id in distinct {
        tx.execute("SELECT pg_notify($1, $2)", &[&JOBS_CHANNEL, &agent_id])
            .await?;
    }
    Ok(())
}

/// The dedicated notification connection: its client (for pings) and its messages.
struct Listener {
    client: Client,
    messages: BoxStream<'static, Result<AsyncMessage, tokio_postgres::Error>>,
}

/// Connects outside the pool and subscribes to [`JOBS_CHANNEL`]. Notifications that arrive
/// before `LISTEN` has answered are forwarded too.
async fn listen(
    config: &tokio_postgres::Config,
    sink: &mpsc::Sender<String>,
) -> Result<Listener, Failure> {
    let (client, mut connection) = config.connect(NoTls).await?;
    // Polling the connection's messages is also what drives its I/O, so the client's
    // queries only make progress while this stream is polled.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
    {
        let sql = format!("LISTEN {JOBS_CHANNEL}");
        let subscribe = client.batch_execute(&sql);
        tokio::pin!(subscribe);
        loop {
            tokio::select! {
                done = &mut subscribe => {
                    done?;
                    break;
                }
                message = messages.next() => match message {
                    Some(Ok(message)) => forward(sink, message),
                    Some(Err(err)) => return Err(err.into()),
                    None => return Err(closed()),
                },
            }
        }
    }
    Ok(Listener { client, messages })
}

fn closed() -> Failure {
    Failure::Lost("the server closed the connection".to_owned())
}

/// Passes a notification's agent id to the hub; drops it when the hub is behind.
fn forward(sink: &mpsc::Sender<String>, message: AsyncMessage) {
    let AsyncMessage::Notification(note) = message else {
        return;
    };
    if note.channel() != JOBS_CHANNEL {
        return;
    }
    if let Err(mpsc::error::TrySendError::Full(agent_id)) = sink.try_send(note.payload().to_owned())
    {
        tracing::debug!(
            agent_id,
            "job notification dropped: the hub is behind (its sweep will find the jobs)"
        );
    }
}

/// Forwards notifications until the connection fails (returns why) or the receiver is gone
/// (returns `None`).
async fn pump(listener: &mut Listener, sink: &mpsc::Sender<String>) -> Option<Failure> {
    let mut ticker = tokio::time::interval(LISTEN_PING_INTERVAL);
    ticker.reset();
    let mut ping: Option<BoxFuture<'_, Result<(), tokio_postgres::Error>>> = None;
    loop {
        tokio::select! {
            _ = sink.closed() => return None,
            message = listener.messages.next() => match message {
                Some(Ok(message)) => forward(sink, message),
                Some(Err(err)) => return Some(err.into()),
                None => return Some(closed()),
            },
            _ = ticker.tick() => {
                if ping.is_some() {
                    return Some(Failure::Lost(format!(
                        "no answer to a ping within {} s",
                        LISTEN_PING_INTERVAL.as_secs()
                    )));
                }
                ping = Some(Box::pin(listener.client.batch_execute("SELECT 1")));
            }
            Some(answer) = futures::future::OptionFuture::from(ping.as_mut()) => {
                ping = None;
                if let Err(err) = answer {
                    return Some(err.into());
                }
            }
        }
    }
}

/// The notification task: forwards, reconnects with backoff when the connection is lost,
/// and ends when the receiver is dropped.
async fn keep_listening(
    config: tokio_postgres::Config,
    target: String,
    sink: mpsc::Sender<String>,
    mut listener: Listener,
) {
    loop {
        let Some(failure) = pump(&mut listener, &sink).await else {
            return;
        };
        tracing::warn!(
            database = %target,
            detail = %describe(&failure),
            "job notification connection lost; reconnecting"
        );
        let mut delay = LISTEN_RETRY_FIRST;
        listener = loop {
            tokio::select! {
                _ = sink.closed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let attempt = tokio::time::timeout(OPERATION_TIMEOUT, listen(&config, &sink)).await;
            match attempt {
                Ok(Ok(listener)) => {
                    tracing::info!(database = %target, "job notification connection restored");
                    break listener;
                }
                Ok(Err(failure)) => tracing::warn!(
                    database = %target,
                    detail = %describe(&failure),
                    "job notification connection: reconnecting failed"
                ),
                Err(_) => tracing::warn!(
                    database = %target,
                    "job notification connection: reconnecting timed out"
                ),
            }
            delay = (delay * 2).min(LISTEN_RETRY_MAX);
        };
    }
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

    async fn insert_staff(&self, s: &StaffRecord) -> Result<bool, HubError> {
        self.run("insert_staff", async {
            let client = self.pool.get().await?;
            let inserted = client
                .execute(
                    "INSERT INTO staff (name, role, token_hash, created_at, disabled_at)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                    &[
                        &s.name,
                        &s.role,
                        &s.token_hash,
                        &s.created_at_ms,
                        &s.disabled_at_ms,
                    ],
                )
                .await?;
            Ok(inserted > 0)
        })
        .await
    }

    async fn staff_by_token(&self, token_hash: &str) -> Result<Option<StaffRecord>, HubError> {
        self.run("staff_by_token", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT name, role, token_hash, created_at, disabled_at FROM staff
                     WHERE token_hash = $1 AND disabled_at IS NULL ORDER BY name COLLATE \"C\" LIMIT 1",
                )
                .await?;
            match client.query_opt(&stmt, &[&token_hash]).await? {
                Some(row) => Ok(Some(staff_from_row(&row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn staff(&self) -> Result<Vec<StaffRecord>, HubError> {
        self.run("staff", async {
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    "SELECT name, role, token_hash, created_at, disabled_at FROM staff
                     ORDER BY name COLLATE \"C\"",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(staff_from_row).collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn job_key_seed(&self, candidate: &[u8; 32]) -> Result<[u8; 32], HubError> {
        self.run("job_key_seed", async {
            let client = self.pool.get().await?;
            // Insert-if-absent then read: a concurrent inserter makes ON CONFLICT wait for its
            // commit, so every process reads the one seed that won.
            client
                .execute(
                    "INSERT INTO hub_keys (name, seed) VALUES ('job', $1) ON CONFLICT (name) DO NOTHING",
                    &[&candidate.as_slice()],
                )
                .await?;
            let seed: Vec<u8> = client
                .query_one("SELECT seed FROM hub_keys WHERE name = 'job'", &[])
                .await?
                .try_get(0)?;
            let len = seed.len();
            <[u8; 32]>::try_from(seed).map_err(|_| {
                Failure::Schema(format!("the stored job key seed is {len} bytes, not 32"))
            })
        })
        .await
    }

    async fn insert_rollout(&self, r: &RolloutRecord) -> Result<(), HubError> {
        self.run("insert_rollout", async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "INSERT INTO rollouts (id, staff, capability, max_concurrency, error_threshold, state, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &r.id,
                        &r.staff,
                        &r.capability,
                        &i64::from(r.max_concurrency),
                        &r.error_threshold.map(i64::from),
                        &r.state,
                        &r.created_at_ms,
                        &r.updated_at_ms,
                    ],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, HubError> {
        self.run("rollout", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, staff, capability, max_concurrency, error_threshold, state, created_at, updated_at
                     FROM rollouts WHERE id = $1",
                )
                .await?;
            match client.query_opt(&stmt, &[&id]).await? {
                Some(row) => Ok(Some(rollout_from_row(&row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn running_rollouts(&self) -> Result<Vec<RolloutRecord>, HubError> {
        self.run("running_rollouts", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT id, staff, capability, max_concurrency, error_threshold, state, created_at, updated_at
                     FROM rollouts WHERE state = 'running' ORDER BY created_at",
                )
                .await?;
            let rows = client.query(&stmt, &[]).await?;
            Ok(rows
                .iter()
                .map(rollout_from_row)
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn set_rollout_state(&self, id: &str, state: &str, now_ms: i64) -> Result<(), HubError> {
        self.run("set_rollout_state", async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "UPDATE rollouts SET state = $2, updated_at = $3 WHERE id = $1",
                    &[&id, &state, &now_ms],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn insert_jobs(&self, jobs: &[JobRecord]) -> Result<(), HubError> {
        self.run("insert_jobs", async {
            let mut client = self.pool.get().await?;
            let insert = client
                .prepare_cached(concat!(
                    "INSERT INTO jobs (",
                    job_fields!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
                ))
                .await?;
            let tx = client.transaction().await?;
            // Pipelined, as in insert_messages: a rollout can make thousands of jobs at once.
            futures::future::try_join_all(jobs.iter().map(|j| {
                let params: [&(dyn ToSql + Sync); 19] = [
                    &j.id,
                    &j.rollout_id,
                    &j.agent_id,
                    &j.capability,
                    &j.staff,
                    &j.args,
                    &j.signed_job,
                    &j.signature,
                    &j.state,
                    &j.rule,
                    &j.reason,
                    &j.summary,
                    &j.digest,
                    &j.truncated,
                    &j.approver,
                    &j.cancel_requested,
                    &j.created_at_ms,
                    &j.expires_at_ms,
                    &j.updated_at_ms,
                ];
                tx.execute_raw(&insert, params)
            }))
            .await?;
            notify_agents(
                &tx,
                jobs.iter()
                    .filter(|j| j.state == "pending")
                    .map(|j| j.agent_id.as_str()),
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, HubError> {
        self.run("job", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(concat!(
                    "SELECT ",
                    job_fields!(),
                    " FROM jobs WHERE id = $1"
                ))
                .await?;
            match client.query_opt(&stmt, &[&id]).await? {
                Some(row) => Ok(Some(job_from_row(&row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn rollout_jobs(&self, rollout_id: &str) -> Result<Vec<JobRecord>, HubError> {
        self.run("rollout_jobs", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(concat!(
                    "SELECT ",
                    job_fields!(),
                    " FROM jobs WHERE rollout_id = $1 ORDER BY created_at, id COLLATE \"C\""
                ))
                .await?;
            Ok(jobs_from_rows(&client.query(&stmt, &[&rollout_id]).await?)?)
        })
        .await
    }

    async fn recent_jobs(&self, agent_id: &str, limit: usize) -> Result<Vec<JobRecord>, HubError> {
        self.run("recent_jobs", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(concat!(
                    "SELECT ",
                    job_fields!(),
                    " FROM jobs WHERE agent_id = $1
                     ORDER BY created_at DESC, id COLLATE \"C\" DESC LIMIT $2"
                ))
                .await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            Ok(jobs_from_rows(
                &client.query(&stmt, &[&agent_id, &limit]).await?,
            )?)
        })
        .await
    }

    async fn jobs_to_send(
        &self,
        agent_ids: &[String],
        include_sent: bool,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, HubError> {
        self.run("jobs_to_send", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(concat!(
                    "SELECT ",
                    job_fields!(),
                    " FROM jobs
                     WHERE agent_id = ANY($1)
                       AND (state = 'pending' OR ($2::boolean AND state = 'sent'))
                       AND expires_at > $3
                     ORDER BY created_at, id COLLATE \"C\""
                ))
                .await?;
            let rows = client
                .query(&stmt, &[&agent_ids, &include_sent, &now_ms])
                .await?;
            Ok(jobs_from_rows(&rows)?)
        })
        .await
    }

    async fn jobs_to_cancel(&self, agent_ids: &[String]) -> Result<Vec<JobRecord>, HubError> {
        self.run("jobs_to_cancel", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(concat!(
                    "SELECT ",
                    job_fields!(),
                    " FROM jobs
                     WHERE agent_id = ANY($1) AND cancel_requested AND state NOT IN ",
                    final_states!(),
                    " ORDER BY created_at, id COLLATE \"C\""
                ))
                .await?;
            Ok(jobs_from_rows(&client.query(&stmt, &[&agent_ids]).await?)?)
        })
        .await
    }

    async fn release_jobs(
        &self,
        rollout_id: &str,
        count: usize,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, HubError> {
        self.run("release_jobs", async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // SKIP LOCKED: two hub processes releasing at once take different jobs instead of
            // one waiting for the other and then releasing the same ones twice. The pick is a
            // materialised CTE, not `id IN (SELECT … LIMIT n)`: the planner may run such a
            // subquery more than once per statement, and with SKIP LOCKED each run can pick
            // other rows, releasing more than `count` (seen here: 3 jobs for a count of 2).
            let stmt = tx
                .prepare_cached(concat!(
                    "WITH picked AS MATERIALIZED (
                         SELECT id AS picked_id FROM jobs WHERE rollout_id = $1 AND state = 'queued'
                         ORDER BY created_at, id COLLATE \"C\" LIMIT $2
                         FOR UPDATE SKIP LOCKED)
                     UPDATE jobs SET state = 'pending', updated_at = $3
                     FROM picked WHERE id = picked_id AND state = 'queued'
                     RETURNING ",
                    job_fields!()
                ))
                .await?;
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            let rows = tx.query(&stmt, &[&rollout_id, &count, &now_ms]).await?;
            let mut released = jobs_from_rows(&rows)?;
            notify_agents(&tx, released.iter().map(|j| j.agent_id.as_str())).await?;
            tx.commit().await?;
            // RETURNING gives no order.
            released.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
            Ok(released)
        })
        .await
    }

    async fn update_jobs(&self, changes: &[JobChange]) -> Result<(), HubError> {
        self.run("update_jobs", async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let update = tx
                .prepare_cached(concat!(
                    "UPDATE jobs SET state = $2, rule = COALESCE($3, rule), reason = COALESCE($4, reason),
                         summary = COALESCE($5, summary), digest = COALESCE($6, digest),
                         truncated = COALESCE($7::boolean, truncated), approver = COALESCE($8, approver),
                         updated_at = $9
                     WHERE id = $1 AND agent_id = $10 AND state NOT IN ",
                    final_states!()
                ))
                .await?;
            // One at a time, in order: two changes to one job must apply in the order given.
            for ch in changes {
                tx.execute(
                    &update,
                    &[
                        &ch.id,
                        &ch.state,
                        &ch.rule,
                        &ch.reason,
                        &ch.summary,
                        &ch.digest,
                        &ch.truncated,
                        &ch.approver,
                        &ch.at_ms,
                        &ch.agent_id,
                    ],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn request_cancel(&self, id: &str, now_ms: i64) -> Result<bool, HubError> {
        self.run("request_cancel", async {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let row = tx
                .query_opt(
                    concat!(
                        "UPDATE jobs SET cancel_requested = TRUE, updated_at = $2
                         WHERE id = $1 AND state NOT IN ",
                        final_states!(),
                        " RETURNING agent_id"
                    ),
                    &[&id, &now_ms],
                )
                .await?;
            let agent_id: Option<String> = match row {
                Some(row) => Some(row.try_get(0)?),
                None => None,
            };
            notify_agents(&tx, agent_id.as_deref()).await?;
            tx.commit().await?;
            Ok(agent_id.is_some())
        })
        .await
    }

    async fn append_job_output(&self, chunks: &[JobChunk]) -> Result<(), HubError> {
        self.run("append_job_output", async {
            let mut client = self.pool.get().await?;
            let insert = client
                .prepare_cached(
                    "INSERT INTO job_output (job_id, seq, data) VALUES ($1, $2, $3)
                     ON CONFLICT (job_id, seq) DO NOTHING",
                )
                .await?;
            let tx = client.transaction().await?;
            let data: Vec<&[u8]> = chunks.iter().map(|ch| ch.data.as_bytes()).collect();
            futures::future::try_join_all(chunks.iter().zip(&data).map(|(ch, data)| {
                let params: [&(dyn ToSql + Sync); 3] = [&ch.job_id, &ch.seq, data];
                tx.execute_raw(&insert, params)
            }))
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn job_output(
        &self,
        job_id: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<JobChunk>, HubError> {
        self.run("job_output", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT job_id, seq, data FROM job_output WHERE job_id = $1 AND seq > $2
                     ORDER BY seq LIMIT $3",
                )
                .await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client.query(&stmt, &[&job_id, &after_seq, &limit]).await?;
            rows.iter()
                .map(|r| {
                    let data: Vec<u8> = r.try_get(2)?;
                    Ok(JobChunk {
                        job_id: r.try_get(0)?,
                        seq: r.try_get(1)?,
                        // Written from a String, so always valid UTF-8.
                        data: String::from_utf8_lossy(&data).into_owned(),
                    })
                })
                .collect()
        })
        .await
    }

    async fn mirror_state(&self, agent_id: &str) -> Result<MirrorState, HubError> {
        self.run("mirror_state", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT last_seq, last_hash, problem, problem_at FROM audit_mirror WHERE agent_id = $1",
                )
                .await?;
            match client.query_opt(&stmt, &[&agent_id]).await? {
                Some(r) => Ok(MirrorState {
                    last_seq: r.try_get::<_, i64>(0)? as u64,
                    last_hash: r.try_get(1)?,
                    problem: r.try_get(2)?,
                    problem_at_ms: r.try_get(3)?,
                }),
                None => Ok(MirrorState::default()),
            }
        })
        .await
    }

    async fn append_audit_lines(
        &self,
        agent_id: &str,
        lines: &[MirroredLine],
    ) -> Result<(), HubError> {
        let Some(last) = lines.last() else {
            return Ok(());
        };
        self.run("append_audit_lines", async {
            let mut client = self.pool.get().await?;
            let insert = client
                .prepare_cached(
                    "INSERT INTO audit_lines (agent_id, seq, hash, line, received_at)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (agent_id, seq) DO NOTHING",
                )
                .await?;
            let tx = client.transaction().await?;
            // Sequence numbers are u64 on the wire; stored bit for bit as i64.
            let seqs: Vec<i64> = lines.iter().map(|l| l.seq as i64).collect();
            futures::future::try_join_all(lines.iter().zip(&seqs).map(|(l, seq)| {
                let params: [&(dyn ToSql + Sync); 5] =
                    [&agent_id, seq, &l.hash, &l.line, &l.received_at_ms];
                tx.execute_raw(&insert, params)
            }))
            .await?;
            tx.execute(
                "INSERT INTO audit_mirror (agent_id, last_seq, last_hash) VALUES ($1, $2, $3)
                 ON CONFLICT (agent_id) DO UPDATE SET last_seq = EXCLUDED.last_seq, last_hash = EXCLUDED.last_hash",
                &[&agent_id, &(last.seq as i64), &last.hash],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn set_mirror_problem(
        &self,
        agent_id: &str,
        problem: Option<&str>,
        now_ms: i64,
    ) -> Result<(), HubError> {
        self.run("set_mirror_problem", async {
            let client = self.pool.get().await?;
            match problem {
                Some(problem) => client
                    .execute(
                        "INSERT INTO audit_mirror (agent_id, last_seq, last_hash, problem, problem_at)
                         VALUES ($1, 0, '', $2, $3)
                         ON CONFLICT (agent_id) DO UPDATE SET problem = EXCLUDED.problem, problem_at = EXCLUDED.problem_at",
                        &[&agent_id, &problem, &now_ms],
                    )
                    .await?,
                None => client
                    .execute(
                        "UPDATE audit_mirror SET problem = NULL, problem_at = NULL WHERE agent_id = $1",
                        &[&agent_id],
                    )
                    .await?,
            };
            Ok(())
        })
        .await
    }

    async fn audit_lines(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<MirroredLine>, HubError> {
        self.run("audit_lines", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT seq, hash, line, received_at FROM audit_lines WHERE agent_id = $1
                     ORDER BY seq DESC LIMIT $2",
                )
                .await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client.query(&stmt, &[&agent_id, &limit]).await?;
            Ok(rows
                .iter()
                .map(mirrored_line_from_row)
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    async fn record_access(&self, a: &AccessRecord) -> Result<(), HubError> {
        self.run("record_access", async {
            let client = self.pool.get().await?;
            client
                .execute(
                    "INSERT INTO access_log (at, principal, action, target) VALUES ($1, $2, $3, $4)",
                    &[&a.at_ms, &a.principal, &a.action, &a.target],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn access_log(&self, limit: usize) -> Result<Vec<AccessRecord>, HubError> {
        self.run("access_log", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT at, principal, action, target FROM access_log
                     ORDER BY at DESC, id DESC LIMIT $1",
                )
                .await?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client.query(&stmt, &[&limit]).await?;
            rows.iter()
                .map(|r| {
                    Ok(AccessRecord {
                        at_ms: r.try_get(0)?,
                        principal: r.try_get(1)?,
                        action: r.try_get(2)?,
                        target: r.try_get(3)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn listen_jobs(&self) -> Result<Option<mpsc::Receiver<String>>, HubError> {
        let (sink, receiver) = mpsc::channel(NOTIFY_QUEUE);
        // The first connection is made here so that a caller hears of a database it cannot
        // reach; later losses are retried in the background.
        let listener = self.run("listen_jobs", listen(&self.config, &sink)).await?;
        tokio::spawn(keep_listening(
            self.config.clone(),
            self.target.clone(),
            sink,
            listener,
        ));
        Ok(Some(receiver))
    }

    async fn blob_begin(&self, agent_id: &str, item_id: i64, total: u64) -> Result<u64, HubError> {
        self.run("blob_begin", async {
            let total = i64::try_from(total).map_err(|_| {
                Failure::Invalid(format!("an upload of {total} bytes is too large to store"))
            })?;
            let now = crate::now_ms();
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // Insert-if-absent, then lock the row: a concurrent begin or append of the same
            // upload (from any hub process) waits for this transaction.
            tx.execute(
                "INSERT INTO uploads (agent_id, item_id, total, held, updated_at)
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT (agent_id, item_id) DO NOTHING",
                &[&agent_id, &item_id, &total, &now],
            )
            .await?;
            let row = tx
                .query_one(
                    "SELECT held, total FROM uploads WHERE agent_id = $1 AND item_id = $2 FOR UPDATE",
                    &[&agent_id, &item_id],
                )
                .await?;
            let (held, stored_total): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let held = if stored_total == total {
                tx.execute(
                    "UPDATE uploads SET updated_at = $3 WHERE agent_id = $1 AND item_id = $2",
                    &[&agent_id, &item_id, &now],
                )
                .await?;
                held
            } else {
                // Another file under the same item id: start over.
                tx.execute(
                    "DELETE FROM upload_parts WHERE agent_id = $1 AND item_id = $2",
                    &[&agent_id, &item_id],
                )
                .await?;
                tx.execute(
                    "UPDATE uploads SET total = $3, held = 0, updated_at = $4
                     WHERE agent_id = $1 AND item_id = $2",
                    &[&agent_id, &item_id, &total, &now],
                )
                .await?;
                0
            };
            tx.commit().await?;
            Ok(held as u64)
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
        self.run("blob_append", async {
            let now = crate::now_ms();
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            // FOR UPDATE: a concurrent append to the same upload waits here, then reads the
            // committed `held` and finds its offset stale.
            let row = tx
                .query_opt(
                    "SELECT held, total FROM uploads WHERE agent_id = $1 AND item_id = $2 FOR UPDATE",
                    &[&agent_id, &item_id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(0);
            };
            let (held, total): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            // An offset or length beyond i64 can never match or fit.
            let at_held = i64::try_from(offset).is_ok_and(|offset| offset == held);
            let end = i64::try_from(data.len())
                .ok()
                .and_then(|len| held.checked_add(len))
                .filter(|end| *end <= total);
            let end = match end {
                Some(end) if at_held && !data.is_empty() => end,
                _ => return Ok(held as u64),
            };
            // No part can be stored at `held` yet (a restart removes the parts, and `held` only
            // moves past stored ones); should one be, it is replaced rather than wedging the
            // upload on a conflict.
            tx.execute(
                "INSERT INTO upload_parts (agent_id, item_id, part_offset, data) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (agent_id, item_id, part_offset) DO UPDATE SET data = EXCLUDED.data",
                &[&agent_id, &item_id, &held, &data],
            )
            .await?;
            tx.execute(
                "UPDATE uploads SET held = $3, updated_at = $4 WHERE agent_id = $1 AND item_id = $2",
                &[&agent_id, &item_id, &end, &now],
            )
            .await?;
            tx.commit().await?;
            Ok(end as u64)
        })
        .await
    }

    async fn blob_state(
        &self,
        agent_id: &str,
        item_id: i64,
    ) -> Result<Option<(u64, u64)>, HubError> {
        self.run("blob_state", async {
            let client = self.pool.get().await?;
            let row = client
                .query_opt(
                    "SELECT held, total FROM uploads WHERE agent_id = $1 AND item_id = $2",
                    &[&agent_id, &item_id],
                )
                .await?;
            match row {
                Some(r) => Ok(Some((
                    r.try_get::<_, i64>(0)? as u64,
                    r.try_get::<_, i64>(1)? as u64,
                ))),
                None => Ok(None),
            }
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
        self.run("blob_parts", async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT part_offset, data FROM upload_parts
                     WHERE agent_id = $1 AND item_id = $2 AND part_offset >= $3
                     ORDER BY part_offset LIMIT $4",
                )
                .await?;
            // Offsets are stored as BIGINT; none is larger than that.
            let from_offset = i64::try_from(from_offset).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(&stmt, &[&agent_id, &item_id, &from_offset, &limit])
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<_, i64>(0)? as u64, r.try_get(1)?)))
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
