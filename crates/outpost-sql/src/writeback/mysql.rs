//! Write-back to MariaDB/MySQL (`mysql://` or `mariadb://`): `?` binds (a repeated `:name`
//! is bound again), values bound by their JSON type through the binary protocol, one
//! `START TRANSACTION` … `COMMIT` per call. Written and tested against MariaDB 10.11.
//!
//! # The session
//!
//! The connection is the capture's (`crate::mysql::options_from`/`connect`: `utf8mb4`,
//! the password from the sink's `password_file`/`password_env`), then set up so that the
//! statement means what its author read:
//!
//! - `sql_mode = STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION`,
//!   whatever the server's default: a value that does not fit its column (too long, not a
//!   date, not a number, NULL into NOT NULL) is refused rather than truncated or zeroed
//!   with a warning, and strings are read as [`scan`] reads them (`"…"` is a string,
//!   backslashes escape; no `ANSI_QUOTES`, no `NO_BACKSLASH_ESCAPES`);
//! - `time_zone` back to the server's own (the capture's connection uses UTC), so that
//!   `NOW()` and a string written into a `TIMESTAMP` mean what they mean to the practice
//!   management system's own connections;
//! - `innodb_lock_wait_timeout = 20` and, on MariaDB, `max_statement_time = 20`: a statement
//!   stuck behind the practice's locks gives up (nothing written) and may be retried.
//!
//! # Values
//!
//! Integers as `BIGINT` (or unsigned above `i64::MAX`), other numbers as `DOUBLE`
//! (pass exact decimals as strings, `"12.50"`), strings as strings, booleans as 1/0, null as
//! NULL. The server converts each to the column's type under the strict mode above. A
//! `DATETIME` has no time zone (Open Dental keeps the practice's local time in it) and takes
//! `"2024-06-01 09:00:00"` or `"2024-06-01T09:00:00"`; an RFC 3339 string with a zone
//! (`"2024-06-01T09:00:00Z"`) is refused (1292). An operation that takes UTC instants says
//! so in its SQL: `CONVERT_TZ(STR_TO_DATE(:start, '%Y-%m-%dT%H:%i:%sZ'), '+00:00',
//! @@time_zone)` (add `.%f` before the `Z` for fractions of a second).
//!
//! Returned rows (MariaDB's `INSERT … RETURNING`, `DELETE … RETURNING`, or a `SELECT`) come
//! back with the change events' value mapping, except `TIMESTAMP` columns, which are in the
//! server's time zone here and so come back without an offset, like `DATETIME`. A statement
//! that returns no rows but generates an `AUTO_INCREMENT` key (MySQL has no `RETURNING`)
//! returns one row, `{"last_insert_id": 42}` (for a multi-row insert, the first row's key).
//!
//! # Placeholders
//!
//! The shared placeholder scan (`placeholders.rs`) reads a statement with MariaDB's rules
//! ([`Lexing::mysql`]): `#` starts a comment, `--` does only when followed by a space or
//! control character, `"…"` is a string with backslash escapes, `/* */` does not nest and
//! `$` never quotes. So a `:name` inside a string or comment (a `# note: it's :b` too) is
//! text, never bound. [`scan`] reads the statement again, written apart from the shared
//! scan as MariaDB's lexer works, and a statement on which the two disagree about any
//! placeholder is refused when the config is loaded (a safety net, in case either is wrong).
//! Executable comments (`/*! */`, `/*M! */`) and optimizer hints (`/*+ */`) are refused:
//! they are code to the server but comments to a scanner. `::` is refused (it is a
//! PostgreSQL cast, and `mysql_async` would take `::x` for its own named parameter).
//!
//! # Errors
//!
//! A refusal's `code` is the server's error number (`"1062"`). Refusals about the values
//! (duplicate key 1062, foreign key 1451/1452, NOT NULL 1048, too long 1406, bad value
//! 1292/1366/1411, out of range 1264, a syntax or permission error) are the call's result and
//! replayed for its key; the value MariaDB quotes in 1062/1292/1366/1411 messages is left out
//! (the caller has it; logs and the ledger need not). Refusals about the moment (deadlock
//! 1213, lock wait timeout 1205, statement timeout 1969/3024, too many connections, out of
//! memory or disk) are not recorded, and a lost connection is `Unavailable`.
//!
//! # A crash in the middle
//!
//! MariaDB has nothing like PostgreSQL's `txid_status`: once a connection is gone, no query
//! says whether its last transaction committed. XA transactions (`XA PREPARE`, `XA RECOVER`)
//! were considered and not used: `XA RECOVER` lists only prepared transactions, so a
//! transaction missing from it may have committed or rolled back (the main crash window, a
//! lost COMMIT, stays unknown); a prepared transaction left by a crashed agent keeps its row
//! locks, and so blocks the practice's own software, until someone resolves it; and on MySQL
//! 8 `XA RECOVER` needs an admin privilege a write-back user should not have.
//!
//! So [`Session::begin`] returns the connection id as a marker that only says "the statement
//! may have reached the server": it is recorded before the statement is sent, so a `started`
//! row without it means nothing was sent and the call runs again, while a row with it is
//! always refused as "outcome unknown, check the database" ([`Fate::Unknown`]).
//!
//! MyISAM tables (older Open Dental installations) have no transactions: a statement on
//! them is written when it runs, not at COMMIT, and a refused multi-row statement may have
//! written its first rows. Write into InnoDB tables.

use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Params, Value as MyValue};
use serde_json::{Map, Value};

use super::placeholders::{BindStyle, Lexing, Parsed};
use super::{Dialect, ExecError, Executed, Fate, Session};
use crate::mysql::value::{to_json, Kind};

/// The session's `sql_mode` (see the module docs).
const SQL_MODE: &str = "STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION";

/// How long one statement may wait for a lock, or run (MariaDB), in seconds.
const STATEMENT_TIMEOUT_SECS: u32 = 20;

/// The column name of the row that carries a generated key.
const LAST_INSERT_ID: &str = "last_insert_id";

/// Errors about the moment, not the values: a retry with the same key runs again.
const TRANSIENT: &[u16] = &[
    1021, // disk full
    1037, // out of memory
    1038, // out of sort memory
    1040, // too many connections
    1041, // out of memory
    1114, // table is full
    1203, // max_user_connections
    1205, // lock wait timeout
    1213, // deadlock
    1226, // user resource limit
    1317, // query interrupted
    1969, // max_statement_time exceeded (MariaDB)
    3024, // max_execution_time exceeded (MySQL)
];

/// Errors that mean the connection (or the server) went away: whether a COMMIT took is
/// unknown.
const CONNECTION_LOST: &[u16] = &[
    1053, // server shutdown in progress
    1152, // aborted connection
    1158, // network read error
    1159, // network read timeout
    1160, // network write error
    1161, // network write timeout
    1180, // error during COMMIT
    1184, // aborted new connection
    1927, // connection killed (MariaDB)
    2006, // server has gone away
    2013, // lost connection during query
    4031, // disconnected for inactivity (MySQL)
];

/// Errors whose message quotes the offending value.
const QUOTES_VALUE: &[u16] = &[1062, 1292, 1366, 1411];

/// MariaDB or MySQL, reached by URL (and a password from the sink's settings).
pub struct MySql {
    /// The URL as configured (`mysql://` or `mariadb://`).
    pub url: String,
    /// From `password_file` or `password_env`.
    pub password: Option<String>,
}

#[async_trait::async_trait]
impl Dialect for MySql {
    fn name(&self) -> &'static str {
        "mariadb"
    }

    fn bind_style(&self) -> BindStyle {
        BindStyle::Question
    }

    fn lexing(&self) -> Lexing {
        Lexing::mysql()
    }

    fn has_markers(&self) -> bool {
        true
    }

    fn check_statement(&self, sql: &str, parsed: &Parsed) -> Result<(), String> {
        agree(sql, parsed)
    }

    async fn connect(&self) -> Result<Box<dyn Session>, ExecError> {
        let unavailable = |err: crate::SqlError| ExecError::Unavailable(err.to_string());
        let opts =
            crate::mysql::options_from(&self.url, self.password.clone()).map_err(unavailable)?;
        let mut conn = crate::mysql::connect(&opts, &self.url)
            .await
            .map_err(unavailable)?;
        // A session that cannot be set up is not used: its strings or strictness would not
        // be the documented ones.
        let setup = |err: mysql_async::Error| {
            ExecError::Unavailable(format!("set up the session: {}", describe(&err)))
        };
        let version: Option<String> = conn.query_first("SELECT VERSION()").await.map_err(setup)?;
        let mariadb = version.is_some_and(|v| v.to_ascii_lowercase().contains("mariadb"));
        conn.query_drop(session_setup(mariadb))
            .await
            .map_err(setup)?;
        Ok(Box::new(MySession {
            marker: format!("mariadb connection {}", conn.id()),
            conn,
            broken: false,
        }))
    }
}

/// The `SET` statement run once per connection.
fn session_setup(mariadb: bool) -> String {
    let mut sql = format!(
        "SET SESSION sql_mode = '{SQL_MODE}', SESSION time_zone = @@GLOBAL.time_zone, \
         SESSION innodb_lock_wait_timeout = {STATEMENT_TIMEOUT_SECS}"
    );
    if mariadb {
        sql.push_str(&format!(
            ", SESSION max_statement_time = {STATEMENT_TIMEOUT_SECS}"
        ));
    }
    sql
}

struct MySession {
    conn: Conn,
    marker: String,
    broken: bool,
}

impl MySession {
    /// Classifies a failure and remembers a broken connection.
    fn fail(&mut self, err: &mysql_async::Error) -> ExecError {
        let classified = classify(err);
        if matches!(classified, ExecError::Unavailable(_)) {
            self.broken = true;
        }
        classified
    }

    async fn simple(&mut self, sql: &str) -> Result<(), ExecError> {
        match self.conn.query_drop(sql).await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.fail(&err)),
        }
    }
}

/// What one statement gave back, before decoding.
struct Raw {
    columns: Arc<[Column]>,
    rows: Vec<mysql_async::Row>,
    affected: u64,
    last_insert_id: Option<u64>,
}

async fn run(conn: &mut Conn, sql: &str, values: Vec<MyValue>) -> mysql_async::Result<Raw> {
    // Positional even when empty: the driver then refuses (rather than binds) anything it
    // would take for a named parameter of its own.
    let mut result = conn.exec_iter(sql, Params::Positional(values)).await?;
    let columns = result.columns().unwrap_or_else(|| Arc::from(Vec::new()));
    let rows: Vec<mysql_async::Row> = result.collect().await?;
    let affected = result.affected_rows();
    let last_insert_id = result.last_insert_id();
    // A procedure's further result sets would keep the connection busy.
    result.drop_result().await?;
    Ok(Raw {
        columns,
        rows,
        affected,
        last_insert_id,
    })
}

#[async_trait::async_trait]
impl Session for MySession {
    async fn begin(&mut self) -> Result<Option<String>, ExecError> {
        self.simple("START TRANSACTION").await?;
        Ok(Some(self.marker.clone()))
    }

    async fn execute(&mut self, sql: &str, values: &[Value]) -> Result<Executed, ExecError> {
        let values = values.iter().map(to_mysql).collect();
        let raw = match run(&mut self.conn, sql, values).await {
            Ok(raw) => raw,
            Err(err) => return Err(self.fail(&err)),
        };
        Ok(executed(raw))
    }

    async fn commit(&mut self) -> Result<(), ExecError> {
        self.simple("COMMIT").await
    }

    async fn rollback(&mut self) {
        if let Err(err) = self.simple("ROLLBACK").await {
            tracing::debug!(error = ?err, "rollback failed (the connection is dropped)");
        }
    }

    async fn fate(&mut self, _marker: &str) -> Result<Fate, ExecError> {
        Ok(Fate::Unknown)
    }

    fn is_usable(&self) -> bool {
        !self.broken
    }
}

fn executed(raw: Raw) -> Executed {
    if raw.columns.is_empty() {
        let returned = match raw.last_insert_id {
            Some(id) if id != 0 => {
                let mut row = Map::new();
                row.insert(LAST_INSERT_ID.to_owned(), Value::from(id));
                vec![row]
            }
            _ => Vec::new(),
        };
        return Executed {
            rows_affected: raw.affected,
            returned,
        };
    }
    let kinds: Vec<Kind> = raw.columns.iter().map(kind_of).collect();
    let returned: Vec<Map<String, Value>> = raw
        .rows
        .iter()
        .map(|row| {
            raw.columns
                .iter()
                .zip(&kinds)
                .enumerate()
                .map(|(i, (column, kind))| {
                    let value = row.as_ref(i).map_or(Value::Null, |v| to_json(kind, v));
                    (column.name_str().into_owned(), value)
                })
                .collect()
        })
        .collect();
    // With RETURNING, the server's count comes after the rows, and may be 0.
    let rows_affected = if raw.affected == 0 {
        returned.len() as u64
    } else {
        raw.affected
    };
    Executed {
        rows_affected,
        returned,
    }
}

/// A result column's value mapping, from its wire type.
fn kind_of(column: &Column) -> Kind {
    use mysql_async::consts::{ColumnFlags, ColumnType as T};
    let unsigned = column.flags().contains(ColumnFlags::UNSIGNED_FLAG);
    let int = |bits| Kind::Int { unsigned, bits };
    // 63: the `binary` character set, i.e. bytes rather than text.
    let binary = column.character_set() == 63;
    match column.column_type() {
        T::MYSQL_TYPE_TINY => int(8),
        T::MYSQL_TYPE_SHORT => int(16),
        T::MYSQL_TYPE_INT24 => int(24),
        T::MYSQL_TYPE_LONG => int(32),
        T::MYSQL_TYPE_LONGLONG => int(64),
        T::MYSQL_TYPE_YEAR => Kind::Year,
        T::MYSQL_TYPE_FLOAT | T::MYSQL_TYPE_DOUBLE => Kind::Float,
        T::MYSQL_TYPE_DECIMAL | T::MYSQL_TYPE_NEWDECIMAL => Kind::Decimal,
        T::MYSQL_TYPE_DATE | T::MYSQL_TYPE_NEWDATE => Kind::Date,
        // The session is in the server's time zone, not UTC: a TIMESTAMP comes back as the
        // wall-clock time it shows there, without an offset.
        T::MYSQL_TYPE_DATETIME
        | T::MYSQL_TYPE_DATETIME2
        | T::MYSQL_TYPE_TIMESTAMP
        | T::MYSQL_TYPE_TIMESTAMP2 => Kind::DateTime,
        T::MYSQL_TYPE_TIME | T::MYSQL_TYPE_TIME2 => Kind::Time,
        T::MYSQL_TYPE_BIT => Kind::Bit,
        T::MYSQL_TYPE_GEOMETRY => Kind::Binary { pad: None },
        T::MYSQL_TYPE_JSON => Kind::Text { latin1: false },
        _ if binary => Kind::Binary { pad: None },
        // `SET NAMES utf8mb4`: the server sends text columns as UTF-8.
        _ => Kind::Text { latin1: false },
    }
}

fn to_mysql(value: &Value) -> MyValue {
    match value {
        Value::Null => MyValue::NULL,
        Value::Bool(b) => MyValue::Int(i64::from(*b)),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => MyValue::Int(i),
            (None, Some(u)) => MyValue::UInt(u),
            (None, None) => MyValue::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => MyValue::Bytes(s.as_bytes().to_vec()),
        // Refused before this point; sent as JSON text if ever reached.
        other => MyValue::Bytes(other.to_string().into_bytes()),
    }
}

/// An error from the server, the driver or the connection.
fn classify(err: &mysql_async::Error) -> ExecError {
    use mysql_async::{DriverError, Error};
    match err {
        Error::Server(server) if CONNECTION_LOST.contains(&server.code) => {
            ExecError::Unavailable(format!("{} ({})", server.message, server.code))
        }
        Error::Server(server) => ExecError::Refused {
            code: server.code.to_string(),
            message: without_value(server.code, &server.message),
            transient: TRANSIENT.contains(&server.code),
        },
        Error::Driver(
            DriverError::Params(_)
            | DriverError::MixedParams
            | DriverError::StmtParamsMismatch { .. }
            | DriverError::StmtParamsNumberExceedsLimit { .. }
            | DriverError::FromValue { .. }
            | DriverError::FromRow { .. },
        ) => ExecError::Invalid(format!(
            "the driver refused the statement's parameters: {err} (check the operation's quotes and comments)"
        )),
        Error::Driver(_) | Error::Io(_) | Error::Other(_) | Error::Url(_) => {
            ExecError::Unavailable(err.to_string())
        }
    }
}

fn describe(err: &mysql_async::Error) -> String {
    match classify(err) {
        ExecError::Refused { code, message, .. } => format!("{code}: {message}"),
        ExecError::Unavailable(message) | ExecError::Invalid(message) => message,
    }
}

/// The server's message without the value it quotes (`Duplicate entry 'O'Brien' for key
/// 'lname'` → `Duplicate entry '…' for key 'lname'`): the value may be patient data, and
/// MariaDB does not escape quotes inside it, so the quoted run ends at the last `' for `.
fn without_value(code: u16, message: &str) -> String {
    if !QUOTES_VALUE.contains(&code) {
        return message.to_owned();
    }
    let Some(open) = message.find('\'') else {
        return message.to_owned();
    };
    let close = message
        .rfind("' for ")
        .filter(|&close| close > open)
        .or_else(|| message.rfind('\'').filter(|&close| close > open));
    match close {
        Some(close) => format!("{}'…{}", &message[..open], &message[close..]),
        None => message.to_owned(),
    }
}

/// Refuses a statement unless MariaDB reads it as the shared placeholder scan did.
fn agree(sql: &str, parsed: &Parsed) -> Result<(), String> {
    let (rendered, occurrences) = scan(sql)?;
    let (shared, order) = parsed.render(BindStyle::Question);
    let shared_names: Vec<&str> = order
        .iter()
        .map(|&i| parsed.names().get(i).map_or("", String::as_str))
        .collect();
    if rendered == shared && occurrences == shared_names {
        return Ok(());
    }
    Err(
        "MariaDB reads this statement's quotes or comments differently from the placeholder \
         scan, so where its values go is not certain; write comments as /* … */ and keep \
         quotes and colons out of them"
            .into(),
    )
}

/// Reads `sql` as MariaDB's lexer does with the session's `sql_mode`: the statement with
/// each `:name` placeholder as `?`, and the names in order of occurrence.
fn scan(sql: &str) -> Result<(String, Vec<String>), String> {
    let chars: Vec<char> = sql.chars().collect();
    let n = chars.len();
    let mut out = String::with_capacity(sql.len());
    let mut names = Vec::new();
    let mut i = 0;
    while i < n {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\'' | '"' | '`' => {
                let end = quoted_end(&chars, i).ok_or_else(|| {
                    if c == '`' {
                        "unterminated quoted identifier in the statement".to_owned()
                    } else {
                        "unterminated string in the statement".to_owned()
                    }
                })?;
                out.extend(&chars[i..end]);
                i = end;
            }
            '#' => i = line_end(&chars, i, &mut out),
            // MariaDB looks at the next byte (`my_isspace`, `my_iscntrl`): ASCII only, and the
            // end of the statement counts as a control character.
            '-' if next == Some('-')
                && chars
                    .get(i + 2)
                    .is_none_or(|&c| c == ' ' || c.is_ascii_control()) =>
            {
                i = line_end(&chars, i, &mut out);
            }
            '/' if next == Some('*') => {
                let rest: String = chars[i + 2..].iter().take(2).collect();
                if rest.starts_with('!') || rest.starts_with('+') || rest == "M!" {
                    return Err(
                        "executable comments (/*! */, /*M! */) and optimizer hints (/*+ */) are not taken in write-back statements"
                            .into(),
                    );
                }
                let close = (i + 2..n.saturating_sub(1))
                    .find(|&j| chars[j] == '*' && chars[j + 1] == '/')
                    .ok_or("unterminated comment in the statement")?;
                out.extend(&chars[i..close + 2]);
                i = close + 2;
            }
            '?' => {
                return Err(
                    "found the positional parameter \"?\"; use named placeholders like :patnum"
                        .into(),
                )
            }
            ':' if next == Some(':') => {
                return Err(
                    "`::` is not MariaDB syntax (a PostgreSQL cast?); write CAST(:value AS type)"
                        .into(),
                )
            }
            ':' if next.is_some_and(|c| c.is_alphabetic() || c == '_') => {
                let end = chars[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_alphanumeric() || c == '_' || c == '$'))
                    .map_or(n, |p| i + 1 + p);
                names.push(chars[i + 1..end].iter().collect());
                out.push('?');
                i = end;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok((out, names))
}

/// Copies a line comment (through its newline); returns where the scan goes on.
fn line_end(chars: &[char], start: usize, out: &mut String) -> usize {
    let end = chars[start..]
        .iter()
        .position(|&c| c == '\n')
        .map_or(chars.len(), |p| start + p + 1);
    out.extend(&chars[start..end]);
    end
}

/// The index just past the quote closing the run that starts at `start`: a doubled quote
/// is part of the run, and inside strings (not `` `identifiers` ``) a backslash escapes the
/// next character.
fn quoted_end(chars: &[char], start: usize) -> Option<usize> {
    let quote = *chars.get(start)?;
    super::placeholders::quoted_end(chars, start, quote, quote != '`')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn check(sql: &str) -> Result<(String, Vec<String>), String> {
        let parsed = Parsed::parse(sql, Lexing::mysql()).map_err(|err| err.to_string())?;
        parsed
            .check_positional(BindStyle::Question)
            .map_err(|err| err.to_string())?;
        agree(sql, &parsed)?;
        let (rendered, order) = parsed.render(BindStyle::Question);
        Ok((
            rendered,
            order.iter().map(|&i| parsed.names()[i].clone()).collect(),
        ))
    }

    #[test]
    fn placeholders_become_question_marks_bound_per_occurrence() {
        let (sql, names) = check(
            "INSERT INTO appointment (PatNum, AptDateTime, Note) VALUES (:patnum, :start, :note) \
             ON DUPLICATE KEY UPDATE Note = :note",
        )
        .unwrap();
        assert_eq!(
            sql,
            "INSERT INTO appointment (PatNum, AptDateTime, Note) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE Note = ?"
        );
        assert_eq!(names, ["patnum", "start", "note", "note"]);
    }

    #[test]
    fn colons_in_mariadb_strings_identifiers_and_comments_are_text() {
        let (sql, names) = check(
            "SELECT ':no', 'it''s :no', 'a\\' :no', \":no\", \"say \"\":no\"\"\", `c:no`, `a``:no` \
             -- :no\n, /* :no */ :yes, @v := 1, \
             CONVERT_TZ(STR_TO_DATE(:start, '%Y-%m-%dT%H:%i:%sZ'), '+00:00', @@time_zone)",
        )
        .unwrap();
        assert_eq!(names, ["yes", "start"]);
        assert!(sql.contains("/* :no */ ?, @v := 1"), "{sql}");
        assert!(
            sql.contains("STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%sZ')"),
            "{sql}"
        );
    }

    #[test]
    fn mariadb_comments_and_strings_are_read_as_mariadb_reads_them() {
        // `#` starts a comment: quotes and colons in it are text, not placeholders.
        let (sql, names) = check("UPDATE t SET a = 1 # set :b\nWHERE id = :id").unwrap();
        assert_eq!(names, ["id"]);
        assert_eq!(sql, "UPDATE t SET a = 1 # set :b\nWHERE id = ?");
        let (_, names) =
            check("UPDATE t SET a = :a # it's \"the\" note: :b\nWHERE id = :id").unwrap();
        assert_eq!(names, ["a", "id"]);
        let (_, names) = check("UPDATE t SET a = :a # plain note\nWHERE id = :id").unwrap();
        assert_eq!(names, ["a", "id"]);
        // `--` without a space is minus minus: `:x` is code.
        assert_eq!(
            check("SELECT 1--:x").unwrap(),
            ("SELECT 1--?".into(), vec!["x".into()])
        );
        assert_eq!(check("SELECT 1 -- :x\n, :y").unwrap().1, ["y"]);
        // A backslash-escaped double quote keeps MariaDB inside the string.
        assert!(check("SELECT \"a\\\" :x\"").unwrap().1.is_empty());
        // MariaDB's comments do not nest: the first `*/` ends one.
        assert_eq!(scan("SELECT /* a /* b */ :x").unwrap().1, ["x"]);
        assert_eq!(check("SELECT /* a /* b */ :x */").unwrap().1, ["x"]);
        // `$` never quotes.
        assert_eq!(check("SELECT $$ :x $$").unwrap().1, ["x"]);
    }

    #[test]
    fn statements_mariadb_reads_differently_are_refused() {
        // The disagreement check stays as a safety net: a scan with other rules (here the
        // standard ones, where `#` is code) is refused.
        for sql in [
            "UPDATE t SET a = 1 # set :b\nWHERE id = :id",
            "SELECT 1--:x",
            "SELECT \"a\\\" :x\\\" b\"",
            "SELECT /* a /* b */ :x */",
            "SELECT $$ :x $$",
        ] {
            let standard = Parsed::parse(sql, Lexing::default()).unwrap();
            let err = agree(sql, &standard).unwrap_err();
            assert!(err.contains("differently"), "{sql}: {err}");
        }
        for refused in [
            "SELECT /*! :x */ 1",
            "SELECT /*M!100500 1 */",
            "SELECT /*+ hint */ :x",
            "SELECT :a::int",
            "SELECT 'open",
            "SELECT \"open",
            "SELECT `open",
            "SELECT /* open",
            "SELECT ? FROM t",
            "SELECT 1 --? ",
        ] {
            assert!(check(refused).is_err(), "{refused}");
        }
        // `?` in a string or comment is text; outside it is refused by the scan even if
        // the shared scan missed it.
        assert!(check("SELECT '?', :a").is_ok());
        assert!(check("SELECT 1 # ?\n, :a").is_ok());
        assert!(scan("SELECT 1 -- ?\n").is_ok());
        assert!(scan("SELECT 1 --? ").is_err());
        // MariaDB reads `--` before a non-ASCII space as minus minus, like the shared scan.
        assert_eq!(check("SELECT 1 --\u{a0}:x").unwrap().1, ["x"]);
    }

    #[test]
    fn values_bind_by_json_type() {
        assert_eq!(to_mysql(&json!(null)), MyValue::NULL);
        assert_eq!(to_mysql(&json!(true)), MyValue::Int(1));
        assert_eq!(to_mysql(&json!(false)), MyValue::Int(0));
        assert_eq!(to_mysql(&json!(-42)), MyValue::Int(-42));
        assert_eq!(to_mysql(&json!(u64::MAX)), MyValue::UInt(u64::MAX));
        assert_eq!(to_mysql(&json!(1.5)), MyValue::Double(1.5));
        assert_eq!(
            to_mysql(&json!("O'Brien \\' 山田")),
            MyValue::Bytes("O'Brien \\' 山田".as_bytes().to_vec())
        );
    }

    fn server(code: u16, message: &str) -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError {
            code,
            message: message.into(),
            state: "HY000".into(),
        })
    }

    #[test]
    fn errors_map_to_refusals_retries_and_lost_connections() {
        for code in [1062, 1451, 1452, 1048, 1406, 1292, 1366, 1064, 1142] {
            assert!(
                matches!(classify(&server(code, "x")), ExecError::Refused { transient: false, code: c, .. } if c == code.to_string()),
                "{code}"
            );
        }
        for code in [1213, 1205, 1969, 3024, 1040] {
            assert!(
                matches!(
                    classify(&server(code, "x")),
                    ExecError::Refused {
                        transient: true,
                        ..
                    }
                ),
                "{code}"
            );
        }
        for code in [1053, 1927, 2013, 1180] {
            assert!(
                matches!(classify(&server(code, "x")), ExecError::Unavailable(_)),
                "{code}"
            );
        }
        let io = mysql_async::Error::Io(mysql_async::IoError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert!(matches!(classify(&io), ExecError::Unavailable(_)));
        let closed = mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed);
        assert!(matches!(classify(&closed), ExecError::Unavailable(_)));
        let mixed = mysql_async::Error::Driver(mysql_async::DriverError::MixedParams);
        assert!(matches!(classify(&mixed), ExecError::Invalid(_)));
    }

    #[test]
    fn quoted_values_are_left_out_of_messages() {
        assert_eq!(
            without_value(1062, "Duplicate entry 'O'Brien-1' for key 'lname'"),
            "Duplicate entry '…' for key 'lname'"
        );
        assert_eq!(
            without_value(
                1292,
                "Incorrect datetime value: '2024-06-01T09:00:00Z' for column `db`.`t`.`d` at row 1"
            ),
            "Incorrect datetime value: '…' for column `db`.`t`.`d` at row 1"
        );
        assert_eq!(
            without_value(
                1411,
                "Incorrect datetime value: 'x' for function str_to_date"
            ),
            "Incorrect datetime value: '…' for function str_to_date"
        );
        assert_eq!(
            without_value(1292, "Truncated incorrect DOUBLE value: 'abc'"),
            "Truncated incorrect DOUBLE value: '…'"
        );
        let fk = "Cannot add or update a child row: a foreign key constraint fails (`db`.`appointment`, CONSTRAINT `fk` FOREIGN KEY (`patnum`) REFERENCES `patient` (`patnum`))";
        assert_eq!(without_value(1452, fk), fk);
    }

    #[test]
    fn a_generated_key_comes_back_as_a_row() {
        let raw = Raw {
            columns: Arc::from(Vec::new()),
            rows: Vec::new(),
            affected: 1,
            last_insert_id: Some(42),
        };
        let executed = executed(raw);
        assert_eq!(executed.rows_affected, 1);
        assert_eq!(
            executed.returned,
            vec![json!({"last_insert_id": 42}).as_object().unwrap().clone()]
        );
        let raw = Raw {
            columns: Arc::from(Vec::new()),
            rows: Vec::new(),
            affected: 3,
            last_insert_id: Some(0),
        };
        assert!(executed_returned_is_empty(raw));
    }

    fn executed_returned_is_empty(raw: Raw) -> bool {
        executed(raw).returned.is_empty()
    }

    /// A real MariaDB: values, the documented datetime forms, generated keys, strict
    /// refusals, and the crash rule (a row without a marker runs again, one with a marker
    /// is refused).
    #[tokio::test]
    async fn calls_on_a_live_mariadb_follow_the_crash_rule() {
        use super::super::ledger::Ledger;
        use super::super::{canonical_request, CallOutcome, PlainSealer, Sealer, SinkConfig};
        use super::super::{Writer, LEDGER_FILE};
        use outpost_testkit::mariadb::{skip_mariadb_tests, MariaDb};

        if skip_mariadb_tests("calls_on_a_live_mariadb_follow_the_crash_rule") {
            return;
        }
        let db = MariaDb::create();
        db.sql(
            "CREATE TABLE patient (patnum BIGINT PRIMARY KEY, lname VARCHAR(40) NOT NULL UNIQUE,
                                   active BOOLEAN, balance DOUBLE) ENGINE=InnoDB;
             CREATE TABLE appointment (aptnum INT AUTO_INCREMENT PRIMARY KEY,
                                       patnum BIGINT NOT NULL REFERENCES patient (patnum),
                                       start DATETIME NOT NULL, UNIQUE (patnum, start)) ENGINE=InnoDB;
             INSERT INTO patient VALUES (1, 'Müller', 1, 0);",
        );
        let url = db.url();
        let user = url["mysql://".len()..]
            .split(':')
            .next()
            .unwrap()
            .to_owned();
        db.sql(&format!(
            "GRANT INSERT, UPDATE, DELETE ON `{}`.* TO '{user}'@'127.0.0.1'",
            db.name()
        ));
        let operations = [
            (
                "add",
                "INSERT INTO patient VALUES (:patnum, :lname, :active, :balance) RETURNING patnum, lname, active, balance",
            ),
            ("book", "INSERT INTO appointment (patnum, start) VALUES (:patnum, :start)"),
            (
                "book_utc",
                "INSERT INTO appointment (patnum, start) VALUES (:patnum, CONVERT_TZ(STR_TO_DATE(:start, '%Y-%m-%dT%H:%i:%sZ'), '+00:00', @@time_zone))",
            ),
        ];
        let config = SinkConfig {
            url: url.clone(),
            password_file: None,
            password_env: None,
            operations: operations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            keep_days: 30,
        };
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let values = |v: Value| v.as_object().unwrap().clone();

        let evil = values(
            json!({"patnum": 2, "lname": "O'Brien \\' '); DROP TABLE patient; -- 山田", "active": true, "balance": 1.5}),
        );
        let request =
            |op: &str, v: &Map<String, Value>| PlainSealer.digest(&canonical_request(op, v));
        let booked = values(json!({"patnum": 1, "start": "2024-06-01 09:00:00"}));
        {
            // Crashes simulated by writing ledger rows by hand: one before BEGIN, one after.
            let ledger = Ledger::open(&state.join(LEDGER_FILE)).unwrap();
            ledger.start("never-begun", &request("add", &evil)).unwrap();
            let id = ledger.start("begun", &request("book", &booked)).unwrap();
            ledger.begun(id, "mariadb connection 7").unwrap();
        }
        let writer = Writer::open("w", &config, dir.path(), &state, Arc::new(PlainSealer))
            .await
            .unwrap();

        let added = writer.call("add", &evil, "never-begun").await;
        let CallOutcome::Done {
            rows_affected: 1,
            returned,
            replayed: false,
        } = &added
        else {
            panic!("{added:?}")
        };
        assert_eq!(
            Value::Object(returned[0].clone()),
            json!({"patnum": 2, "lname": evil["lname"], "active": 1, "balance": 1.5})
        );
        // Compared as hex: the client's batch output escapes backslashes.
        assert_eq!(
            db.sql("SELECT HEX(lname) FROM patient WHERE patnum = 2"),
            hex::encode_upper(evil["lname"].as_str().unwrap())
        );

        let unknown = writer.call("book", &booked, "begun").await;
        assert!(
            matches!(&unknown, CallOutcome::OutcomeUnknown(m) if m.contains("check the database")),
            "{unknown:?}"
        );
        assert_eq!(db.sql("SELECT count(*) FROM appointment"), "0");

        let first = writer.call("book", &booked, "b1").await;
        let CallOutcome::Done { returned, .. } = &first else {
            panic!("{first:?}")
        };
        let id = returned[0]["last_insert_id"].as_u64().unwrap();
        assert!(id > 0, "{first:?}");
        let utc = writer
            .call(
                "book_utc",
                &values(json!({"patnum": 1, "start": "2024-06-01T10:00:00Z"})),
                "b2",
            )
            .await;
        assert!(
            matches!(
                utc,
                CallOutcome::Done {
                    rows_affected: 1,
                    ..
                }
            ),
            "{utc:?}"
        );
        let zoned = writer
            .call(
                "book",
                &values(json!({"patnum": 1, "start": "2024-06-01T11:00:00Z"})),
                "b3",
            )
            .await;
        assert!(
            matches!(&zoned, CallOutcome::Refused { code, message, .. } if code == "1292" && !message.contains("11:00")),
            "{zoned:?}"
        );
        let twice = writer.call("book", &booked, "b4").await;
        assert!(
            matches!(&twice, CallOutcome::Refused { code, message, .. } if code == "1062" && !message.contains("09:00")),
            "{twice:?}"
        );
        let long =
            values(json!({"patnum": 3, "lname": "x".repeat(41), "active": null, "balance": null}));
        let too_long = writer.call("add", &long, "p3").await;
        assert!(
            matches!(&too_long, CallOutcome::Refused { code, .. } if code == "1406"),
            "{too_long:?}"
        );
        assert_eq!(
            db.sql("SELECT aptnum, start FROM appointment ORDER BY aptnum"),
            format!("{id}\t2024-06-01 09:00:00\n{}\t2024-06-01 10:00:00", id + 1)
        );
    }

    #[test]
    fn the_session_is_strict_and_bounded() {
        let sql = session_setup(true);
        assert!(sql.contains("STRICT_ALL_TABLES") && sql.contains("max_statement_time = 20"));
        assert!(!sql.contains("ANSI_QUOTES") && !sql.contains("NO_BACKSLASH_ESCAPES"));
        assert!(!session_setup(false).contains("max_statement_time"));
    }
}
