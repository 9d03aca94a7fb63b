//! Write-back: `[[sink]] kind = "sql"`, named statements the practice's config defines,
//! called by name with values that are always bound parameters. Nothing here accepts SQL
//! text from a caller: a call names an operation and gives values.
//!
//! - `placeholders.rs`: `:name` placeholders → the dialect's binds (`$1`, `?1`, `?`).
//! - `ledger.rs`: the idempotency ledger (`idempotency.db` in the sink's state folder).
//! - one module per dialect (`pg.rs`, `sqlite.rs`, `mysql.rs`) implementing [`Dialect`] and
//!   [`Session`]; adding a database is one module and one arm in [`dialect_for`].
//!
//! # Values
//!
//! JSON numbers, strings, booleans and null; arrays and objects are refused. PostgreSQL
//! receives each value in its text format and converts it to the type it infers for the
//! parameter (as it would a quoted literal, but the value never becomes SQL text): a
//! timestamp is an RFC 3339 string (`"2024-06-01T09:00:00Z"`) and needs no cast where the
//! column is a timestamp, and a cast (`:start_at::timestamptz`) where the type cannot be
//! inferred. SQLite binds by JSON type (integer, real, text, 1/0, NULL) and stores RFC 3339
//! strings as text. MariaDB/MySQL binds by JSON type too, in a strict `sql_mode`; a
//! `DATETIME` takes `"2024-06-01 09:00:00"`, and an RFC 3339 string with a zone needs a
//! conversion in the statement (see `mysql.rs`). Returned rows come back with the change
//! events' value mapping.
//!
//! # Idempotency, and a crash in the middle
//!
//! Calls on one sink run one at a time. For each call, under its idempotency key:
//!
//! 1. the ledger row is written `started` (fsync'd) before anything reaches the database;
//! 2. a transaction is opened; where the dialect has a durable transaction id
//!    (PostgreSQL's `txid_current()`), it is written to the row (`begun`, fsync'd) before
//!    COMMIT is sent;
//! 3. the statement runs and COMMIT is sent;
//! 4. the result is written to the row (`done`), sealed with the agent's key.
//!
//! A retry with the same key and a `done` row returns the stored result and touches
//! nothing. A crash (or a lost connection during COMMIT) between 3 and 4 leaves a row
//! without a result, and the database may or may not hold the write. Running the statement
//! again could write twice, so we do not: on PostgreSQL the row's xid is looked up with
//! `txid_status` — `aborted` means nothing was written and the call runs again,
//! `committed` means it was written and the retry is refused as already done (its rows
//! were not recorded), anything else is refused as "outcome unknown, check the database".
//! A `started` row without an xid on PostgreSQL was never committed (COMMIT is only sent
//! after the xid is recorded), so the call runs again. On SQLite, which has no such id,
//! any unfinished row is refused as "outcome unknown". MariaDB has no such id either; its
//! marker (the connection id, recorded before the statement is sent) only tells a row whose
//! statement never reached the server, which runs again, from one whose may have, which
//! is refused as "outcome unknown" (see `mysql.rs`). Refusing a retry is the safer
//! failure: a person can check and use a new key; a double booking cannot be undone by
//! the software that made it.
//!
//! A statement the database refuses (a constraint, a type error) wrote nothing; the
//! refusal is the call's result and is replayed for the same key (use a new key after
//! fixing the values). Refusals that are about the moment, not the values (deadlock,
//! serialization failure, lock or statement timeout, the database unreachable), are not
//! recorded, so a retry with the same key runs again.

pub mod ledger;
pub mod mysql;
pub mod pg;
pub mod placeholders;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::redact_url;
use crate::{Row, SqlError};
use ledger::Ledger;
use placeholders::{BindStyle, Lexing, Parsed};

/// The ledger's file name in the sink's state folder.
pub const LEDGER_FILE: &str = "idempotency.db";

/// The longest idempotency key taken.
pub const MAX_KEY_LEN: usize = 200;

/// `[[sink]] kind = "sql"`, as written in the agent's TOML (without `name` and `kind`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `postgres://user@host:port/db`, `mysql://user@host:port/db` (or `mariadb://`) or
    /// `sqlite:PATH`.
    pub url: String,
    /// A file holding the password (its mode must not give group or others access).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Operation name → statement with `:name` placeholders.
    pub operations: BTreeMap<String, String>,
    /// Days a finished call's key and result are kept (a retry after that runs again).
    #[serde(default = "default_keep_days")]
    pub keep_days: u32,
}

fn default_keep_days() -> u32 {
    30
}

impl std::fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkConfig")
            .field("url", &redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("operations", &self.operations.keys().collect::<Vec<_>>())
            .field("keep_days", &self.keep_days)
            .finish()
    }
}

impl SinkConfig {
    /// The dialect the URL names (no connection yet). `base` anchors a relative SQLite
    /// path.
    pub fn dialect(&self, base: &Path) -> Result<Box<dyn Dialect>, SqlError> {
        dialect_for(&self.url, self.password()?, base)
    }

    /// Checks what can be checked without connecting. Errors start with the key they are
    /// about (`url: …`, `operations.create_appointment: …`).
    pub fn validate(&self, base: &Path) -> Result<(), SqlError> {
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(SqlError::Config(
                "password_env: expected either password_file or password_env, not both".into(),
            ));
        }
        let dialect = dialect_for(&self.url, None, base)?;
        if self.operations.is_empty() {
            return Err(SqlError::Config(
                "operations: expected at least one, like create_appointment = \"INSERT INTO appointment (patnum) VALUES (:patnum)\"".into(),
            ));
        }
        for (name, sql) in &self.operations {
            if !valid_operation_name(name) {
                return Err(SqlError::Config(format!(
                    "operations.{name}: expected a name of letters, digits, `_`, `-` or `.` (at most 64)"
                )));
            }
            prepare(sql, dialect.as_ref())
                .map_err(|message| SqlError::Config(format!("operations.{name}: {message}")))?;
        }
        Ok(())
    }

    /// The password from `password_file` or `password_env`, if either is set.
    pub fn password(&self) -> Result<Option<String>, SqlError> {
        if let Some(path) = &self.password_file {
            return crate::config::read_password_file(path).map(Some);
        }
        if let Some(var) = &self.password_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|_| SqlError::PasswordEnv(var.clone()));
        }
        Ok(None)
    }
}

/// Whether `name` may name an operation (it travels in a URL path).
pub fn valid_operation_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// The dialect of a URL: `postgres://`/`postgresql://`, `mysql://`/`mariadb://` or
/// `sqlite:PATH`.
pub fn dialect_for(
    url: &str,
    password: Option<String>,
    base: &Path,
) -> Result<Box<dyn Dialect>, SqlError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Box::new(pg::Postgres {
            url: url.to_owned(),
            password,
        }))
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        Ok(Box::new(mysql::MySql {
            url: url.to_owned(),
            password,
        }))
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
        Ok(Box::new(sqlite::Sqlite {
            path: if path.is_absolute() {
                path
            } else {
                base.join(path)
            },
        }))
    } else {
        let scheme = url.split(':').next().unwrap_or_default();
        Err(SqlError::Config(format!(
            "url: expected postgres://…, mysql://… or sqlite:PATH for a SQL sink, found a {scheme:?} URL"
        )))
    }
}

/// A statement ready for one dialect.
#[derive(Debug, Clone)]
struct Prepared {
    sql: String,
    names: Vec<String>,
    parsed: Parsed,
    /// For each bind position, the index into `names`.
    order: Vec<usize>,
}

fn prepare(sql: &str, dialect: &dyn Dialect) -> Result<Prepared, String> {
    let style = dialect.bind_style();
    let parsed = Parsed::parse(sql, dialect.lexing()).map_err(|err| err.to_string())?;
    parsed
        .check_positional(style)
        .map_err(|err| err.to_string())?;
    if sql.trim().is_empty() {
        return Err("expected a statement, found an empty string".into());
    }
    dialect.check_statement(sql, &parsed)?;
    let (rendered, order) = parsed.render(style);
    Ok(Prepared {
        sql: rendered,
        names: parsed.names().to_vec(),
        parsed,
        order,
    })
}

/// One database dialect: how it binds and how to reach it.
#[async_trait::async_trait]
pub trait Dialect: Send + Sync {
    /// For logs and errors.
    fn name(&self) -> &'static str;
    /// How statements bind values.
    fn bind_style(&self) -> BindStyle;
    /// How the dialect reads strings.
    fn lexing(&self) -> Lexing {
        Lexing::default()
    }
    /// Whether [`Session::begin`] returns a transaction marker whose fate can be asked
    /// after a crash (the answer may be [`Fate::Unknown`]), recorded before the statement
    /// is sent: a row without one never reached the database.
    fn has_markers(&self) -> bool;
    /// Refuses a statement the database would read differently from [`Parsed`] (its own
    /// quoting or comment rules), so that no value is bound where the config's author did
    /// not put a placeholder.
    fn check_statement(&self, _sql: &str, _parsed: &Parsed) -> Result<(), String> {
        Ok(())
    }
    /// Opens a connection.
    async fn connect(&self) -> Result<Box<dyn Session>, ExecError>;
}

/// A connection of one dialect.
#[async_trait::async_trait]
pub trait Session: Send {
    /// Opens a transaction; returns its durable marker, if the dialect has one.
    async fn begin(&mut self) -> Result<Option<String>, ExecError>;
    /// Runs a rendered statement with its values in bind order.
    async fn execute(&mut self, sql: &str, values: &[Value]) -> Result<Executed, ExecError>;
    /// Commits the open transaction.
    async fn commit(&mut self) -> Result<(), ExecError>;
    /// Rolls the open transaction back (errors only mean the connection is gone).
    async fn rollback(&mut self);
    /// What became of the transaction with this marker.
    async fn fate(&mut self, marker: &str) -> Result<Fate, ExecError>;
    /// False once the connection is known to be broken.
    fn is_usable(&self) -> bool;
}

/// What a statement did.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed {
    /// Rows inserted, updated or deleted.
    pub rows_affected: u64,
    /// Rows the statement returned (`RETURNING`), as JSON.
    pub returned: Vec<Row>,
}

/// What became of an earlier transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It committed.
    Committed,
    /// It rolled back (or never reached the database).
    Aborted,
    /// Still running, or too old to tell.
    Unknown,
}

/// A failure of one step against the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecError {
    /// The database refused; the transaction wrote nothing.
    Refused {
        /// SQLSTATE (PostgreSQL), the result code's name (SQLite) or the error number
        /// (MariaDB/MySQL).
        code: String,
        /// The database's message (never its detail, which may quote row values).
        message: String,
        /// About the moment (deadlock, timeout, busy), not the values: worth a retry.
        transient: bool,
    },
    /// The database could not be reached, or the connection broke.
    Unavailable(String),
    /// A value or a returned column does not fit.
    Invalid(String),
}

/// Seals stored results and digests requests, with the agent's key (the agent passes its
/// queue key), so the ledger holds no patient data in clear.
pub trait Sealer: Send + Sync {
    /// Seals `plain`, bound to `context` (the ledger row).
    fn seal(&self, context: i64, plain: &[u8]) -> Vec<u8>;
    /// Opens what [`Sealer::seal`] made for the same `context`.
    fn open(&self, context: i64, sealed: &[u8]) -> Option<Vec<u8>>;
    /// A keyed digest of a request (operation and values).
    fn digest(&self, request: &[u8]) -> Vec<u8>;
}

/// Keeps everything in clear: for tests and tools, never for an agent.
pub struct PlainSealer;

impl Sealer for PlainSealer {
    fn seal(&self, _context: i64, plain: &[u8]) -> Vec<u8> {
        plain.to_vec()
    }
    fn open(&self, _context: i64, sealed: &[u8]) -> Option<Vec<u8>> {
        Some(sealed.to_vec())
    }
    fn digest(&self, request: &[u8]) -> Vec<u8> {
        request.to_vec()
    }
}

/// What became of a call.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    /// The statement ran and committed (now, or the first time for a replay).
    Done {
        /// Rows inserted, updated or deleted.
        rows_affected: u64,
        /// Rows returned (`RETURNING`).
        returned: Vec<Row>,
        /// This is the stored result of an earlier call with the same key.
        replayed: bool,
    },
    /// The database refused the statement; nothing was written.
    Refused {
        /// SQLSTATE, the SQLite result code's name or the MariaDB/MySQL error number.
        code: String,
        /// The database's message.
        message: String,
        /// This is the stored result of an earlier call with the same key.
        replayed: bool,
    },
    /// The sink has no such operation.
    UnknownOperation {
        /// The name asked for.
        operation: String,
        /// The operations the config defines.
        known: Vec<String>,
    },
    /// The values do not fit the statement (missing, unknown, wrong type); nothing ran.
    InvalidValues(String),
    /// The key was used before with another operation or other values.
    KeyReused(String),
    /// An earlier call with this key may or may not have written; it is not run again.
    OutcomeUnknown(String),
    /// The database could not be reached; nothing was written; retry with the same key.
    Unavailable(String),
}

/// The part of an outcome the ledger keeps.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Stored {
    Done {
        rows_affected: u64,
        returned: Vec<Row>,
    },
    Refused {
        code: String,
        message: String,
    },
}

/// A SQL sink: its operations, its connection and its ledger.
pub struct Writer {
    name: String,
    operations: BTreeMap<String, Prepared>,
    dialect: Box<dyn Dialect>,
    session: tokio::sync::Mutex<Option<Box<dyn Session>>>,
    ledger: Arc<Mutex<Ledger>>,
    sealer: Arc<dyn Sealer>,
    keep_ms: i64,
}

impl Writer {
    /// Checks the config and opens the ledger in `state_dir`; connects on the first call.
    pub async fn open(
        name: &str,
        config: &SinkConfig,
        base: &Path,
        state_dir: &Path,
        sealer: Arc<dyn Sealer>,
    ) -> Result<Writer, SqlError> {
        config.validate(base)?;
        let dialect = config.dialect(base)?;
        let mut operations = BTreeMap::new();
        for (op, sql) in &config.operations {
            let prepared = prepare(sql, dialect.as_ref())
                .map_err(|message| SqlError::Config(format!("operations.{op}: {message}")))?;
            operations.insert(op.clone(), prepared);
        }
        let path = state_dir.join(LEDGER_FILE);
        let ledger = tokio::task::spawn_blocking(move || Ledger::open(&path))
            .await
            .map_err(|err| SqlError::Task(err.to_string()))??;
        let writer = Writer {
            name: name.to_owned(),
            operations,
            dialect,
            session: tokio::sync::Mutex::new(None),
            ledger: Arc::new(Mutex::new(ledger)),
            sealer,
            keep_ms: i64::from(config.keep_days).saturating_mul(86_400_000),
        };
        let keep = writer.keep_ms;
        match writer.ledger_op(move |l| l.purge(keep)).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(
                sink = name,
                purged,
                "forgot idempotency keys past keep_days"
            ),
            Err(err) => {
                tracing::warn!(sink = name, error = %err, "cannot purge the idempotency ledger")
            }
        }
        Ok(writer)
    }

    /// The operations the config defines.
    pub fn operations(&self) -> Vec<String> {
        self.operations.keys().cloned().collect()
    }

    async fn ledger_op<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Ledger) -> Result<T, SqlError> + Send + 'static,
    ) -> Result<T, SqlError> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || {
            let ledger = ledger
                .lock()
                .map_err(|_| SqlError::Task("the ledger lock was poisoned".into()))?;
            work(&ledger)
        })
        .await
        .map_err(|err| SqlError::Task(err.to_string()))?
    }

    /// Runs `operation` with `values` once per `key` (see the module docs).
    pub async fn call(
        &self,
        operation: &str,
        values: &Map<String, Value>,
        key: &str,
    ) -> CallOutcome {
        let Some(op) = self.operations.get(operation) else {
            return CallOutcome::UnknownOperation {
                operation: operation.to_owned(),
                known: self.operations(),
            };
        };
        if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
            return CallOutcome::InvalidValues(format!(
                "idempotency_key: expected 1 to {MAX_KEY_LEN} characters without control characters"
            ));
        }
        if let Err(mismatch) = op.parsed.check_values(values.keys()) {
            return CallOutcome::InvalidValues(format!("operation {operation:?}: {mismatch}"));
        }
        for (name, value) in values {
            if matches!(value, Value::Array(_) | Value::Object(_)) {
                return CallOutcome::InvalidValues(format!(
                    "value {name:?}: expected a number, string, boolean or null, found an {}",
                    if value.is_array() { "array" } else { "object" }
                ));
            }
        }
        let binds: Vec<Value> = op
            .order
            .iter()
            .map(|&i| values.get(&op.names[i]).cloned().unwrap_or(Value::Null))
            .collect();
        let request = self.sealer.digest(&canonical_request(operation, values));

        // One call at a time per sink: a second call with the same key waits here and then
        // finds the first one's result.
        let mut session = self.session.lock().await;
        let owned_key = key.to_owned();
        let entry = match self.ledger_op(move |l| l.get(&owned_key)).await {
            Ok(entry) => entry,
            Err(err) => return self.local_failure(err),
        };
        if let Some(entry) = entry {
            if entry.request != request {
                return CallOutcome::KeyReused(format!(
                    "idempotency key {key:?} was already used for another operation or other values; use a new key"
                ));
            }
            match self.settle(&mut session, &entry, key).await {
                Some(outcome) => return outcome,
                None => {
                    // The earlier attempt wrote nothing: run the call afresh.
                    let id = entry.id;
                    if let Err(err) = self.ledger_op(move |l| l.forget(id)).await {
                        return self.local_failure(err);
                    }
                }
            }
        }
        self.run(&mut session, op, &binds, key, request).await
    }

    /// What to answer for a key that already has a row; `None` when the earlier attempt
    /// is known to have written nothing.
    async fn settle(
        &self,
        session: &mut Option<Box<dyn Session>>,
        entry: &ledger::Entry,
        key: &str,
    ) -> Option<CallOutcome> {
        if entry.state == "done" {
            let stored = entry
                .result
                .as_deref()
                .and_then(|sealed| self.sealer.open(entry.id, sealed))
                .and_then(|plain| serde_json::from_slice::<Stored>(&plain).ok());
            return Some(match stored {
                Some(Stored::Done {
                    rows_affected,
                    returned,
                }) => CallOutcome::Done {
                    rows_affected,
                    returned,
                    replayed: true,
                },
                Some(Stored::Refused { code, message }) => CallOutcome::Refused {
                    code,
                    message,
                    replayed: true,
                },
                None => CallOutcome::OutcomeUnknown(format!(
                    "idempotency key {key:?}: the call completed, but its stored result cannot be read (was the agent's key replaced?); it is not run again"
                )),
            });
        }
        let unknown = || {
            CallOutcome::OutcomeUnknown(format!(
                "idempotency key {key:?}: an earlier attempt was interrupted and may or may not have written; outcome unknown, check the database (sink {:?}); it is not run again",
                self.name
            ))
        };
        match (&entry.marker, self.dialect.has_markers()) {
            // COMMIT is sent only after the marker is recorded: no marker, no commit.
            (None, true) => None,
            (None, false) => Some(unknown()),
            (Some(marker), _) => {
                let fate = match self.connected(session).await {
                    Ok(connection) => connection.fate(marker).await,
                    Err(err) => Err(err),
                };
                match fate {
                    Ok(Fate::Aborted) => None,
                    Ok(Fate::Committed) => Some(CallOutcome::OutcomeUnknown(format!(
                        "idempotency key {key:?}: an earlier attempt committed (transaction {marker}) but the agent stopped before recording its result; it is not run again"
                    ))),
                    Ok(Fate::Unknown) => Some(unknown()),
                    Err(err) => {
                        *session = None;
                        Some(CallOutcome::Unavailable(format!(
                            "cannot ask the database about an earlier attempt: {}",
                            describe(&err)
                        )))
                    }
                }
            }
        }
    }

    /// A connected session, reconnecting if the last one broke.
    async fn connected<'a>(
        &self,
        session: &'a mut Option<Box<dyn Session>>,
    ) -> Result<&'a mut Box<dyn Session>, ExecError> {
        if session.as_ref().is_some_and(|s| !s.is_usable()) {
            *session = None;
        }
        if session.is_none() {
            *session = Some(self.dialect.connect().await?);
        }
        session
            .as_mut()
            .ok_or_else(|| ExecError::Unavailable("no connection".into()))
    }

    async fn run(
        &self,
        session: &mut Option<Box<dyn Session>>,
        op: &Prepared,
        binds: &[Value],
        key: &str,
        request: Vec<u8>,
    ) -> CallOutcome {
        let owned_key = key.to_owned();
        let id = match self.ledger_op(move |l| l.start(&owned_key, &request)).await {
            Ok(id) => id,
            Err(err) => return self.local_failure(err),
        };
        // Nothing reached the database yet: forget the row, report, let a retry run.
        let nothing_written = |outcome: CallOutcome| async move {
            if let Err(err) = self.ledger_op(move |l| l.forget(id)).await {
                tracing::error!(sink = %self.name, error = %err, "cannot clear an idempotency key after a call that wrote nothing; a retry will be refused as outcome unknown");
            }
            outcome
        };
        // A reused connection may have gone stale: one fresh attempt.
        let mut marker = None;
        let mut begun = false;
        for attempt in 0..2 {
            let connection = match self.connected(session).await {
                Ok(connection) => connection,
                Err(err) => return nothing_written(unavailable(&err)).await,
            };
            match connection.begin().await {
                Ok(m) => {
                    marker = m;
                    begun = true;
                    break;
                }
                Err(err) => {
                    *session = None;
                    if attempt == 1 || !matches!(err, ExecError::Unavailable(_)) {
                        return nothing_written(unavailable(&err)).await;
                    }
                }
            }
        }
        let Some(connection) = session.as_mut().filter(|_| begun) else {
            return nothing_written(CallOutcome::Unavailable("no connection".into())).await;
        };
        if let Some(marker) = marker {
            if let Err(err) = self.ledger_op(move |l| l.begun(id, &marker)).await {
                connection.rollback().await;
                return nothing_written(self.local_failure(err)).await;
            }
        }
        let executed = match connection.execute(&op.sql, binds).await {
            Ok(executed) => executed,
            Err(err) => {
                connection.rollback().await;
                if matches!(err, ExecError::Unavailable(_)) {
                    *session = None;
                }
                return self.refused(id, err).await;
            }
        };
        match connection.commit().await {
            Ok(()) => {}
            Err(ExecError::Unavailable(message)) => {
                *session = None;
                tracing::error!(sink = %self.name, error = %message, "connection lost during COMMIT; the call's outcome is unknown");
                return CallOutcome::OutcomeUnknown(format!(
                    "the connection to the database was lost during COMMIT; outcome unknown, check the database (sink {:?}); a retry with this key is settled from the database where it can tell, else refused",
                    self.name
                ));
            }
            Err(err) => {
                connection.rollback().await;
                return self.refused(id, err).await;
            }
        }
        let stored = Stored::Done {
            rows_affected: executed.rows_affected,
            returned: executed.returned.clone(),
        };
        self.record(id, &stored).await;
        CallOutcome::Done {
            rows_affected: executed.rows_affected,
            returned: executed.returned,
            replayed: false,
        }
    }

    /// A statement that failed and wrote nothing: the database's refusal is recorded as
    /// the result (unless it was about the moment); other failures clear the row.
    async fn refused(&self, id: i64, err: ExecError) -> CallOutcome {
        let outcome = match &err {
            ExecError::Refused {
                code,
                message,
                transient,
            } => {
                let outcome = CallOutcome::Refused {
                    code: code.clone(),
                    message: message.clone(),
                    replayed: false,
                };
                if !transient {
                    self.record(
                        id,
                        &Stored::Refused {
                            code: code.clone(),
                            message: message.clone(),
                        },
                    )
                    .await;
                    return outcome;
                }
                outcome
            }
            ExecError::Invalid(message) => CallOutcome::InvalidValues(message.clone()),
            ExecError::Unavailable(_) => unavailable(&err),
        };
        if let Err(err) = self.ledger_op(move |l| l.forget(id)).await {
            tracing::error!(sink = %self.name, error = %err, "cannot clear an idempotency key after a call that wrote nothing");
        }
        outcome
    }

    async fn record(&self, id: i64, stored: &Stored) {
        let plain = serde_json::to_vec(stored).unwrap_or_default();
        let sealed = self.sealer.seal(id, &plain);
        if let Err(err) = self.ledger_op(move |l| l.finish(id, &sealed)).await {
            // The call's outcome is known now and returned; a retry finds the row
            // unfinished and is settled from the database or refused as unknown.
            tracing::error!(sink = %self.name, error = %err, "cannot record a call's result in the idempotency ledger");
        }
    }

    fn local_failure(&self, err: SqlError) -> CallOutcome {
        tracing::error!(sink = %self.name, error = %err, "idempotency ledger unavailable; call not run");
        CallOutcome::Unavailable(format!(
            "the agent cannot use its idempotency ledger for sink {:?}; nothing was run",
            self.name
        ))
    }
}

fn describe(err: &ExecError) -> String {
    match err {
        ExecError::Refused { code, message, .. } => format!("{code}: {message}"),
        ExecError::Unavailable(message) | ExecError::Invalid(message) => message.clone(),
    }
}

fn unavailable(err: &ExecError) -> CallOutcome {
    match err {
        ExecError::Refused {
            code,
            message,
            transient: false,
        } => CallOutcome::Refused {
            code: code.clone(),
            message: message.clone(),
            replayed: false,
        },
        other => CallOutcome::Unavailable(format!("database unavailable: {}", describe(other))),
    }
}

/// The operation and its values in one canonical byte form (keys sorted), for the digest.
fn canonical_request(operation: &str, values: &Map<String, Value>) -> Vec<u8> {
    let sorted: BTreeMap<&String, &Value> = values.iter().collect();
    serde_json::to_vec(&(operation, sorted)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn config(url: &str, ops: &[(&str, &str)]) -> SinkConfig {
        SinkConfig {
            url: url.into(),
            password_file: None,
            password_env: None,
            operations: ops
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            keep_days: 30,
        }
    }

    fn values(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn bad_operations_name_the_key() {
        let base = Path::new(".");
        let err = config("sqlite:x.db", &[("make", "INSERT INTO t VALUES (?)")])
            .validate(base)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("operations.make: ") && err.contains("\"?\""),
            "{err}"
        );
        let err = config("sqlserver://u:pw@h/db", &[("a", "SELECT 1")])
            .validate(base)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("url: ") && !err.contains("pw"), "{err}");
        let err = config("sqlite:x.db", &[("no spaces", "SELECT 1")])
            .validate(base)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("operations.no spaces"), "{err}");
        let config = config("postgres://u:secret@h/db", &[("a", "SELECT :x::int")]);
        config.validate(base).unwrap();
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[tokio::test]
    async fn sqlite_calls_run_once_per_key_and_store_values_literally() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pms.db");
        {
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(
                "CREATE TABLE patient (patnum INTEGER PRIMARY KEY, lname TEXT NOT NULL UNIQUE, active INTEGER, balance REAL)",
            )
            .unwrap();
        }
        let config = config(
            &format!("sqlite:{}", db.display()),
            &[(
                "add",
                "INSERT INTO patient (lname, active, balance) VALUES (:lname, :active, :balance) RETURNING patnum, lname",
            )],
        );
        let writer = Writer::open(
            "pms-write",
            &config,
            dir.path(),
            &dir.path().join("state"),
            Arc::new(PlainSealer),
        )
        .await
        .unwrap();
        let evil = "'); DROP TABLE patient; --";
        let v = values(json!({"lname": evil, "active": true, "balance": 1.5}));
        let first = writer.call("add", &v, "k1").await;
        let CallOutcome::Done {
            rows_affected: 1,
            returned,
            replayed: false,
        } = &first
        else {
            panic!("{first:?}")
        };
        assert_eq!(returned[0]["lname"], json!(evil));
        let again = writer.call("add", &v, "k1").await;
        assert!(
            matches!(&again, CallOutcome::Done { replayed: true, returned: r, .. } if r == returned),
            "{again:?}"
        );
        let other = values(json!({"lname": "x", "active": true, "balance": 1}));
        assert!(matches!(
            writer.call("add", &other, "k1").await,
            CallOutcome::KeyReused(_)
        ));
        let dup = writer.call("add", &v, "k2").await;
        assert!(
            matches!(&dup, CallOutcome::Refused { code, replayed: false, .. } if code == "SQLITE_CONSTRAINT_UNIQUE"),
            "{dup:?}"
        );
        let missing = writer
            .call("add", &values(json!({"lname": "y"})), "k3")
            .await;
        assert!(
            matches!(&missing, CallOutcome::InvalidValues(m) if m.contains("active") && m.contains("balance")),
            "{missing:?}"
        );
        let unknown = writer.call("drop_everything", &v, "k4").await;
        assert!(
            matches!(&unknown, CallOutcome::UnknownOperation { known, .. } if known == &["add"]),
            "{unknown:?}"
        );
        let conn = rusqlite::Connection::open(&db).unwrap();
        let count: i64 = conn
            .query_row("SELECT count(*) FROM patient", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 1, "one row for two calls with one key");
    }

    /// A crash after `begun` on PostgreSQL is settled from the database: an aborted
    /// transaction runs again, a committed one is refused, never run twice.
    #[tokio::test]
    async fn interrupted_postgres_calls_are_settled_by_the_transaction_fate() {
        if outpost_testkit::skip_postgres_tests(
            "interrupted_postgres_calls_are_settled_by_the_transaction_fate",
        ) {
            return;
        }
        let pg = outpost_testkit::PgDatabase::create();
        pg.psql("CREATE TABLE t (v text)");
        let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let xid = |rollback: bool| {
            let client = &client;
            async move {
                client.batch_execute("BEGIN").await.unwrap();
                let xid: String = client
                    .query_one("SELECT txid_current()::text", &[])
                    .await
                    .unwrap()
                    .get(0);
                client
                    .batch_execute(if rollback {
                        "INSERT INTO t VALUES ('lost'); ROLLBACK"
                    } else {
                        "INSERT INTO t VALUES ('a'); COMMIT"
                    })
                    .await
                    .unwrap();
                xid
            }
        };
        let aborted = xid(true).await;
        let committed = xid(false).await;

        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let v = values(json!({"v": "a"}));
        let request = PlainSealer.digest(&canonical_request("add", &v));
        {
            let ledger = Ledger::open(&state.join(LEDGER_FILE)).unwrap();
            let id = ledger.start("rolled-back", &request).unwrap();
            ledger.begun(id, &aborted).unwrap();
            let id = ledger.start("committed", &request).unwrap();
            ledger.begun(id, &committed).unwrap();
            ledger.start("never-begun", &request).unwrap();
        }
        let config = config(&pg.url(), &[("add", "INSERT INTO t VALUES (:v)")]);
        let writer = Writer::open("w", &config, dir.path(), &state, Arc::new(PlainSealer))
            .await
            .unwrap();
        let count = || async {
            let row = client
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        };
        assert_eq!(count().await, 1);

        let outcome = writer.call("add", &v, "committed").await;
        assert!(
            matches!(&outcome, CallOutcome::OutcomeUnknown(m) if m.contains("committed")),
            "{outcome:?}"
        );
        assert_eq!(count().await, 1, "a committed attempt is not run again");

        let outcome = writer.call("add", &v, "rolled-back").await;
        assert!(
            matches!(
                outcome,
                CallOutcome::Done {
                    rows_affected: 1,
                    replayed: false,
                    ..
                }
            ),
            "{outcome:?}"
        );
        assert_eq!(count().await, 2, "a rolled-back attempt runs again");

        let outcome = writer.call("add", &v, "never-begun").await;
        assert!(
            matches!(
                outcome,
                CallOutcome::Done {
                    replayed: false,
                    ..
                }
            ),
            "{outcome:?}"
        );
        let outcome = writer.call("add", &v, "never-begun").await;
        assert!(
            matches!(outcome, CallOutcome::Done { replayed: true, .. }),
            "{outcome:?}"
        );
        assert_eq!(count().await, 3);
    }

    #[tokio::test]
    async fn an_interrupted_sqlite_call_is_refused_as_outcome_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pms.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t (v TEXT)")
            .unwrap();
        let config = config(
            &format!("sqlite:{}", db.display()),
            &[("add", "INSERT INTO t VALUES (:v)")],
        );
        let state = dir.path().join("state");
        let v = values(json!({"v": "a"}));
        // A crash after `started` was written: simulated by writing the row by hand.
        let request = PlainSealer.digest(&canonical_request("add", &v));
        Ledger::open(&state.join(LEDGER_FILE))
            .unwrap()
            .start("k1", &request)
            .unwrap();
        let writer = Writer::open("w", &config, dir.path(), &state, Arc::new(PlainSealer))
            .await
            .unwrap();
        let outcome = writer.call("add", &v, "k1").await;
        assert!(
            matches!(&outcome, CallOutcome::OutcomeUnknown(m) if m.contains("check the database")),
            "{outcome:?}"
        );
    }
}
