//! The Firebird URL and a blocking connection over the pure-Rust wire protocol
//! (`rsfbclient-rust`: no `libfbclient` needed; Srp/Srp256 authentication, so Firebird 3
//! with `WireCrypt = Enabled` or `Disabled`; a server with `WireCrypt = Required` refuses it).
//!
//! Every call blocks: the source runs them in `spawn_blocking`, moving the connection in
//! and out (see `FbSource::with_conn`).

use rsfbclient_core::charset::UTF_8;
use rsfbclient_core::{
    Column, Dialect, FbError, FirebirdClientDbOps, FirebirdClientSqlOps, FreeStmtOp, SqlType,
    TrDataAccessMode, TrIsolationLevel, TrLockResolution, TrOp, TrRecordVersion,
    TransactionConfiguration,
};
use rsfbclient_rust::{DbHandle, RustFbClient, RustFbClientAttachmentConfig, TrHandle};

use crate::SqlError;

/// The default port of a Firebird server.
pub const DEFAULT_PORT: u16 = 3050;

/// `firebird://user[:password]@host[:port]/DATABASE`, taken apart.
///
/// `DATABASE` is everything after the first `/` following the host, percent-decoded, and
/// is handed to the server as it is: an absolute path on the server (so a Unix path gives
/// two slashes, `firebird://u@127.0.0.1:3050//var/lib/op/OP.FDB`), a Windows path
/// (`firebird://u@127.0.0.1:3050/C:/OP/Data/OP.FDB`) or an alias from the server's
/// `databases.conf` (`firebird://u@127.0.0.1/op`).
#[derive(Clone, PartialEq, Eq)]
pub struct FbUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port (3050 unless given).
    pub port: u16,
    /// The database path or alias, as the server should see it.
    pub database: String,
    /// User name.
    pub user: String,
    /// Password from the URL, if any.
    pub password: Option<String>,
}

impl std::fmt::Debug for FbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FbUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl FbUrl {
    /// Parses a `firebird://` URL; errors never repeat the password.
    pub fn parse(url: &str) -> Result<FbUrl, SqlError> {
        let bad = |why: &str| {
            SqlError::Config(format!(
                "url {}: {why}; expected firebird://user:password@host:port//absolute/path/db.fdb (or /C:/path/DB.FDB, or /alias)",
                crate::redact_url(url)
            ))
        };
        let rest = url
            .strip_prefix("firebird://")
            .ok_or_else(|| bad("not a firebird:// URL"))?;
        let slash = rest.find('/').ok_or_else(|| bad("no database path"))?;
        let (authority, path) = rest.split_at(slash);
        let database = percent_decode(&path[1..]).ok_or_else(|| bad("bad %-escape in the path"))?;
        if database.is_empty() {
            return Err(bad("no database path"));
        }
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (
                    percent_decode(u).ok_or_else(|| bad("bad %-escape in the user"))?,
                    Some(percent_decode(p).ok_or_else(|| bad("bad %-escape in the password"))?),
                ),
                None => (
                    percent_decode(info).ok_or_else(|| bad("bad %-escape in the user"))?,
                    None,
                ),
            },
            None => (String::new(), None),
        };
        if user.is_empty() {
            return Err(bad("no user name"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (
                host.to_owned(),
                port.parse::<u16>().map_err(|_| bad("bad port"))?,
            ),
            _ => (hostport.to_owned(), DEFAULT_PORT),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(FbUrl {
            host,
            port,
            database,
            user,
            password,
        })
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The message of a Firebird error (the server's text names objects, never row values).
pub(crate) fn fb_message(err: &FbError) -> String {
    match err {
        FbError::Sql { msg, code } => format!("{} (SQLCODE {code})", msg.replace('\n', "; ")),
        other => other.to_string(),
    }
}

/// A database error with what was being done.
pub(crate) fn fb_err(context: impl Into<String>) -> impl FnOnce(FbError) -> SqlError {
    let context = context.into();
    move |err| SqlError::Database {
        context,
        message: fb_message(&err),
    }
}

/// Transaction kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxKind {
    /// `SNAPSHOT` (concurrency), read only: one consistent view of the database.
    SnapshotRead,
    /// `READ COMMITTED`, read-write, waiting on locks: DDL, trims.
    Write,
}

/// One attachment to a database.
pub(crate) struct FbConn {
    client: RustFbClient,
    db: DbHandle,
    /// The snapshot transaction held open across snapshot chunks.
    pub(crate) snapshot: Option<TrHandle>,
}

impl FbConn {
    /// Connects and attaches (character set UTF8, dialect 3).
    pub(crate) fn connect(
        url: &FbUrl,
        password: Option<&str>,
        redacted: &str,
    ) -> Result<FbConn, SqlError> {
        let mut client = RustFbClient::new(UTF_8);
        let config = RustFbClientAttachmentConfig {
            host: url.host.clone(),
            port: url.port,
            db_name: url.database.clone(),
            user: url.user.clone(),
            pass: password
                .map(str::to_owned)
                .or_else(|| url.password.clone())
                .unwrap_or_default(),
            role_name: None,
        };
        let db = client
            .attach_database(&config, Dialect::D3, false)
            .map_err(|err| SqlError::Connect {
                url: redacted.to_owned(),
                message: fb_message(&err),
            })?;
        Ok(FbConn {
            client,
            db,
            snapshot: None,
        })
    }

    /// Starts a transaction.
    pub(crate) fn begin(&mut self, kind: TxKind) -> Result<TrHandle, SqlError> {
        let confs = match kind {
            TxKind::SnapshotRead => TransactionConfiguration {
                data_access: TrDataAccessMode::ReadOnly,
                isolation: TrIsolationLevel::Concurrency,
                lock_resolution: TrLockResolution::Wait(None),
            },
            TxKind::Write => TransactionConfiguration {
                data_access: TrDataAccessMode::ReadWrite,
                isolation: TrIsolationLevel::ReadCommited(TrRecordVersion::RecordVersion),
                lock_resolution: TrLockResolution::Wait(Some(30)),
            },
        };
        self.client
            .begin_transaction(&mut self.db, confs)
            .map_err(fb_err("begin a transaction"))
    }

    /// Commits.
    pub(crate) fn commit(&mut self, tr: &mut TrHandle) -> Result<(), SqlError> {
        self.client
            .transaction_operation(tr, TrOp::Commit)
            .map_err(fb_err("commit"))
    }

    /// Rolls back, ignoring errors (the transaction is being abandoned).
    pub(crate) fn rollback(&mut self, tr: &mut TrHandle) {
        let _ = self.client.transaction_operation(tr, TrOp::Rollback);
    }

    /// Runs a statement without parameters or rows (DDL).
    pub(crate) fn exec_immediate(
        &mut self,
        tr: &mut TrHandle,
        sql: &str,
        context: &str,
    ) -> Result<(), SqlError> {
        self.client
            .exec_immediate(&mut self.db, tr, Dialect::D3, sql)
            .map_err(fb_err(context))
    }

    /// Runs a statement with bound parameters; returns the rows it yields.
    pub(crate) fn query(
        &mut self,
        tr: &mut TrHandle,
        sql: &str,
        params: Vec<SqlType>,
        context: &str,
    ) -> Result<Vec<Vec<Column>>, SqlError> {
        let (_, mut stmt) = self
            .client
            .prepare_statement(&mut self.db, tr, Dialect::D3, sql)
            .map_err(fb_err(context))?;
        let result = (|| {
            self.client
                .execute(&mut self.db, tr, &mut stmt, params)
                .map_err(fb_err(context))?;
            let mut rows = Vec::new();
            while let Some(row) = self
                .client
                .fetch(&mut self.db, tr, &mut stmt)
                .map_err(fb_err(context))?
            {
                rows.push(row);
            }
            Ok(rows)
        })();
        let _ = self.client.free_statement(&mut stmt, FreeStmtOp::Drop);
        result
    }

    /// Runs a statement with bound parameters that yields no rows; returns the rows affected.
    pub(crate) fn execute(
        &mut self,
        tr: &mut TrHandle,
        sql: &str,
        params: Vec<SqlType>,
        context: &str,
    ) -> Result<usize, SqlError> {
        let (_, mut stmt) = self
            .client
            .prepare_statement(&mut self.db, tr, Dialect::D3, sql)
            .map_err(fb_err(context))?;
        let result = self
            .client
            .execute(&mut self.db, tr, &mut stmt, params)
            .map_err(fb_err(context));
        let _ = self.client.free_statement(&mut stmt, FreeStmtOp::Drop);
        result
    }

    /// Runs `f` in a new transaction of `kind`, committing on success and rolling back on
    /// failure.
    pub(crate) fn in_tx<T>(
        &mut self,
        kind: TxKind,
        f: impl FnOnce(&mut FbConn, &mut TrHandle) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        let mut tr = self.begin(kind)?;
        match f(self, &mut tr) {
            Ok(value) => {
                self.commit(&mut tr)?;
                Ok(value)
            }
            Err(err) => {
                self.rollback(&mut tr);
                Err(err)
            }
        }
    }

    /// Detaches, ignoring errors.
    pub(crate) fn close(mut self) {
        if let Some(mut tr) = self.snapshot.take() {
            self.rollback(&mut tr);
        }
        let _ = self.client.detach_database(&mut self.db);
    }
}

/// A column's value as text (`None` for NULL); binary values as their bytes in `Err`.
pub(crate) fn column_text(column: &Column) -> Option<Result<String, Vec<u8>>> {
    match &column.value {
        SqlType::Null => None,
        SqlType::Text(text) => Some(Ok(text.clone())),
        SqlType::Integer(n) => Some(Ok(n.to_string())),
        SqlType::Int128(n) => Some(Ok(n.to_string())),
        SqlType::Floating(f) => Some(Ok(f.to_string())),
        SqlType::Timestamp(ts) => Some(Ok(ts.to_string())),
        SqlType::Boolean(b) => Some(Ok(if *b { "TRUE" } else { "FALSE" }.to_owned())),
        SqlType::Binary(bytes) => Some(Err(bytes.clone())),
    }
}

/// A column's value as an integer.
pub(crate) fn column_i64(column: &Column) -> Option<i64> {
    match &column.value {
        SqlType::Integer(n) => Some(*n),
        SqlType::Text(text) => text.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn urls_parse() {
        let url =
            FbUrl::parse("firebird://outpost:s%40cret@127.0.0.1:3051//srv/db/pms.fdb").unwrap();
        assert_eq!(url.host, "127.0.0.1");
        assert_eq!(url.port, 3051);
        assert_eq!(url.database, "/srv/db/pms.fdb");
        assert_eq!(url.user, "outpost");
        assert_eq!(url.password.as_deref(), Some("s@cret"));
        assert!(!format!("{url:?}").contains("cret"));
        let url = FbUrl::parse("firebird://SYSDBA@localhost/C:/OP/Data/OP.FDB").unwrap();
        assert_eq!(
            (url.port, url.database.as_str()),
            (3050, "C:/OP/Data/OP.FDB")
        );
        assert_eq!(url.password, None);
        let url = FbUrl::parse("firebird://u:p@h:1/op").unwrap();
        assert_eq!(url.database, "op");
        for bad in [
            "firebird://u:secret@h:1",
            "firebird://u:secret@h:x/db",
            "firebird://:secret@h/db",
            "postgres://u:secret@h/db",
        ] {
            let err = FbUrl::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{err}");
        }
    }
}
