//! SQL Server change tracking (works on Express: no SQL Agent needed), through `tiberius`.
//!
//! **Untested against a live server**: there is no SQL Server in this project's test
//! environment. The query texts, URL and position parsing and value mapping are
//! unit-tested; the rest follows the documented behaviour of change tracking.
//!
//! Needs, on the database: `ALTER DATABASE … SET CHANGE_TRACKING = ON`,
//! `ALTER DATABASE … SET ALLOW_SNAPSHOT_ISOLATION ON`, and per captured table
//! `ALTER TABLE … ENABLE CHANGE_TRACKING` (a primary key is required by SQL Server).
//! TLS is not built in (kept out of the build: `tiberius` without a TLS feature), so the
//! server must accept unencrypted connections (`Force Encryption` off), as on a practice's
//! own LAN.
//!
//! URL: `sqlserver://user:password@host[:port]/database` (also `mssql://`; port 1433).
//!
//! Snapshot: one `SNAPSHOT` isolation transaction reads `CHANGE_TRACKING_CURRENT_VERSION()`
//! (V0) and then each table in key order, `chunk_rows` at a time; the stream starts after
//! V0. A snapshot resumed after a restart runs in a new transaction and keeps V0, so rows
//! changed in between show again in the stream (at least once, in order).
//!
//! Stream: every 200 ms, in one `SNAPSHOT` transaction, the current version V is read; if
//! it moved past the stored one, each table's `CHANGETABLE(CHANGES t, @last)` up to V is
//! read, joined to the table for the after-image, after checking
//! `CHANGE_TRACKING_MIN_VALID_VERSION` (a stored version older than that means the change
//! history was cleaned up: a clear error, re-snapshot needed). Change tracking gives the
//! *net* change per row since `@last` and the row as it is now, so `before` holds the key
//! only, `after` the current row (null once deleted), and several changes of one row
//! between two reads arrive as one. `tx` and `position` are `SYS_CHANGE_VERSION`.

use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use tiberius::{AuthMethod, Client, ColumnData, Config, EncryptionLevel};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use crate::ident::{quote_mssql, split_qualified};
use crate::{Batch, ChangeEvent, ChangeSource, Op, Position, Row, SourceConfig, SqlError};

const IDLE_POLL: Duration = Duration::from_millis(200);

/// `sqlserver://user:password@host:port/database`, taken apart.
#[derive(Clone, PartialEq, Eq)]
pub struct MsUrl {
    /// Host.
    pub host: String,
    /// Port (1433 unless given).
    pub port: u16,
    /// Database.
    pub database: String,
    /// SQL login.
    pub user: String,
    /// Password from the URL, if any.
    pub password: Option<String>,
}

impl std::fmt::Debug for MsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl MsUrl {
    /// Parses the URL; errors never repeat the password.
    pub fn parse(url: &str) -> Result<MsUrl, SqlError> {
        let bad = |why: &str| {
            SqlError::Config(format!(
                "url {}: {why}; expected sqlserver://user:password@host:port/database",
                crate::redact_url(url)
            ))
        };
        let rest = url
            .strip_prefix("sqlserver://")
            .or_else(|| url.strip_prefix("mssql://"))
            .ok_or_else(|| bad("not a sqlserver:// URL"))?;
        let (authority, database) = rest.split_once('/').ok_or_else(|| bad("no database"))?;
        let database = database.split('?').next().unwrap_or_default().to_owned();
        if database.is_empty() {
            return Err(bad("no database"));
        }
        let (userinfo, hostport) = authority.rsplit_once('@').ok_or_else(|| bad("no user"))?;
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u.to_owned(), Some(p.to_owned())),
            None => (userinfo.to_owned(), None),
        };
        if user.is_empty() {
            return Err(bad("no user"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), port.parse().map_err(|_| bad("bad port"))?),
            None => (hostport.to_owned(), 1433),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(MsUrl {
            host,
            port,
            database,
            user,
            password,
        })
    }
}

/// How a column is read and mapped, from `INFORMATION_SCHEMA.COLUMNS.DATA_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsKind {
    /// Integers, `bit`, floats, text, binary: read as they are.
    Plain,
    /// `decimal`, `numeric`: read as text (exact).
    Decimal,
    /// `money`, `smallmoney`: read as text with four decimals.
    Money,
    /// `date`, `time`, `datetime`, `datetime2`, `smalldatetime`: ISO 8601 text (style 126).
    DateTime,
    /// `datetimeoffset`: ISO 8601 with offset (style 127).
    DateTimeOffset,
    /// `uniqueidentifier`: text.
    Guid,
}

impl MsKind {
    /// From `DATA_TYPE`.
    pub fn from_type(data_type: &str) -> MsKind {
        match data_type.to_ascii_lowercase().as_str() {
            "decimal" | "numeric" => MsKind::Decimal,
            "money" | "smallmoney" => MsKind::Money,
            "date" | "time" | "datetime" | "datetime2" | "smalldatetime" => MsKind::DateTime,
            "datetimeoffset" => MsKind::DateTimeOffset,
            "uniqueidentifier" => MsKind::Guid,
            _ => MsKind::Plain,
        }
    }

    /// The select expression for `column` (already quoted, e.g. `t.[start_at]`).
    pub fn select_expr(self, column: &str) -> String {
        match self {
            MsKind::Plain => column.to_owned(),
            MsKind::Decimal | MsKind::Guid => format!("CONVERT(nvarchar(64), {column})"),
            MsKind::Money => format!("CONVERT(nvarchar(64), {column}, 2)"),
            MsKind::DateTime => format!("CONVERT(nvarchar(40), {column}, 126)"),
            MsKind::DateTimeOffset => format!("CONVERT(nvarchar(40), {column}, 127)"),
        }
    }
}

/// A value as JSON: integers and floats as numbers, `bit` as a boolean, text (and the text
/// forms of decimals and date-times) as strings, binary as base64.
pub fn column_to_json(data: &ColumnData<'_>) -> Value {
    let num = |n: Option<i64>| n.map_or(Value::Null, |n| Value::Number(n.into()));
    let float = |f: Option<f64>| {
        f.map_or(Value::Null, |f| {
            Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
        })
    };
    match data {
        ColumnData::U8(n) => num(n.map(i64::from)),
        ColumnData::I16(n) => num(n.map(i64::from)),
        ColumnData::I32(n) => num(n.map(i64::from)),
        ColumnData::I64(n) => num(*n),
        ColumnData::F32(f) => float(f.map(f64::from)),
        ColumnData::F64(f) => float(*f),
        ColumnData::Bit(b) => b.map_or(Value::Null, Value::Bool),
        ColumnData::String(s) => s
            .as_ref()
            .map_or(Value::Null, |s| Value::String(s.to_string())),
        ColumnData::Guid(g) => g.map_or(Value::Null, |g| Value::String(g.to_string())),
        ColumnData::Binary(b) => b.as_ref().map_or(Value::Null, |b| {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }),
        ColumnData::Numeric(n) => n.map_or(Value::Null, |n| Value::String(n.to_string())),
        ColumnData::Xml(x) => x
            .as_ref()
            .map_or(Value::Null, |x| Value::String(x.to_string())),
        // Date-times are converted to text in the query; these are not expected.
        other => Value::String(format!("{other:?}")),
    }
}

/// A captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsTable {
    /// As configured.
    pub config_name: String,
    /// Schema (`dbo` unless given).
    pub schema: String,
    /// Table.
    pub name: String,
    /// Captured columns and their kinds.
    pub columns: Vec<(String, MsKind)>,
    /// Key columns.
    pub key: Vec<String>,
}

impl MsTable {
    /// `[schema].[table]`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_mssql(&self.schema), quote_mssql(&self.name))
    }

    /// The changes after `@P1` up to `@P2`, with the current row: version, operation,
    /// the key columns from the change table, then every captured column of the row.
    pub fn changes_query(&self) -> String {
        let keys: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("ct.{}", quote_mssql(k)))
            .collect();
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|(c, kind)| kind.select_expr(&format!("t.{}", quote_mssql(c))))
            .collect();
        let join: Vec<String> = self
            .key
            .iter()
            .map(|k| format!("t.{0} = ct.{0}", quote_mssql(k)))
            .collect();
        format!(
            "SELECT ct.SYS_CHANGE_VERSION, ct.SYS_CHANGE_OPERATION, {}, {} \
             FROM CHANGETABLE(CHANGES {}, @P1) AS ct \
             LEFT JOIN {} AS t ON {} \
             WHERE ct.SYS_CHANGE_VERSION <= @P2 \
             ORDER BY ct.SYS_CHANGE_VERSION, {}",
            keys.join(", "),
            columns.join(", "),
            self.quoted(),
            self.quoted(),
            join.join(" AND "),
            keys.join(", ")
        )
    }

    /// The next `limit` rows in key order, after the key bound to `@P1…` when `after`.
    pub fn chunk_query(&self, after: bool, limit: u32) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|(c, kind)| kind.select_expr(&quote_mssql(c)))
            .collect();
        let keys: Vec<String> = self.key.iter().map(|k| quote_mssql(k)).collect();
        let mut sql = format!(
            "SELECT TOP ({limit}) {} FROM {}",
            columns.join(", "),
            self.quoted()
        );
        if after {
            let mut ors = Vec::new();
            let mut param = 1;
            for i in 0..keys.len() {
                let mut ands = Vec::new();
                for key in keys.iter().take(i) {
                    ands.push(format!("{key} = @P{param}"));
                    param += 1;
                }
                ands.push(format!("{} > @P{param}", keys[i]));
                param += 1;
                ors.push(format!("({})", ands.join(" AND ")));
            }
            sql.push_str(&format!(" WHERE {}", ors.join(" OR ")));
        }
        sql.push_str(&format!(" ORDER BY {}", keys.join(", ")));
        sql
    }
}

/// What the position string holds (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsPosition {
    /// `snapshot` or `stream`.
    pub phase: String,
    /// Snapshot: the version the first snapshot saw; stream: the last version read.
    pub version: i64,
    /// Snapshot: the table being read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<usize>,
    /// Snapshot: the last key read (text forms, bound as parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
}

impl MsPosition {
    /// Parses a stored position.
    pub fn parse(text: &str) -> Result<MsPosition, SqlError> {
        let position: MsPosition =
            serde_json::from_str(text).map_err(|err| SqlError::Position(err.to_string()))?;
        match position.phase.as_str() {
            "snapshot" if position.table.is_some() => Ok(position),
            "stream" => Ok(position),
            other => Err(SqlError::Position(format!(
                "unknown SQL Server phase {other:?}"
            ))),
        }
    }

    fn to_position(&self) -> Position {
        Position(serde_json::to_string(self).unwrap_or_default())
    }
}

type MsClient = Client<Compat<TcpStream>>;

fn ms_err(context: impl Into<String>) -> impl FnOnce(tiberius::error::Error) -> SqlError {
    let context = context.into();
    move |err| SqlError::Database {
        context,
        message: err.to_string(),
    }
}

/// A SQL Server change tracking source.
pub struct MsSource {
    name: String,
    client: MsClient,
    tables: Vec<MsTable>,
    position: MsPosition,
    /// The snapshot transaction is open.
    in_snapshot: bool,
    chunk_rows: u32,
}

impl MsSource {
    /// Connects, looks up the tables and prepares to resume from `resume`.
    pub async fn open(
        name: &str,
        config: &SourceConfig,
        resume: Option<Position>,
    ) -> Result<MsSource, SqlError> {
        let url = MsUrl::parse(&config.url)?;
        let redacted = crate::redact_url(&config.url);
        let password = config
            .password()?
            .or_else(|| url.password.clone())
            .unwrap_or_default();
        let mut tds = Config::new();
        tds.host(&url.host);
        tds.port(url.port);
        tds.database(&url.database);
        tds.application_name("outpost");
        tds.authentication(AuthMethod::sql_server(&url.user, password));
        tds.encryption(EncryptionLevel::NotSupported);
        let connect_err = |message: String| SqlError::Connect {
            url: redacted.clone(),
            message,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            TcpStream::connect((url.host.as_str(), url.port)),
        )
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|err| connect_err(err.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut client = Client::connect(tds, tcp.compat_write())
            .await
            .map_err(|err| connect_err(err.to_string()))?;
        let source = name;
        let mut tables = Vec::new();
        for table in &config.tables {
            let (schema, name) = split_qualified(&table.name);
            let schema = schema.unwrap_or("dbo");
            let rows = client
                .query(
                    "SELECT COLUMN_NAME, DATA_TYPE, IS_NULLABLE FROM INFORMATION_SCHEMA.COLUMNS \
                     WHERE TABLE_SCHEMA = @P1 AND TABLE_NAME = @P2 ORDER BY ORDINAL_POSITION",
                    &[&schema, &name],
                )
                .await
                .map_err(ms_err(format!("look up table {}", table.name)))?
                .into_first_result()
                .await
                .map_err(ms_err(format!("look up table {}", table.name)))?;
            let all: Vec<(String, MsKind)> = rows
                .iter()
                .filter_map(|r| {
                    let column: Option<&str> = r.get(0);
                    let data_type: Option<&str> = r.get(1);
                    Some((column?.to_owned(), MsKind::from_type(data_type?)))
                })
                .collect();
            if all.is_empty() {
                return Err(SqlError::Table {
                    table: table.name.clone(),
                    message: format!("does not exist in schema {schema:?}"),
                });
            }
            for column in table.key.iter().chain(table.columns.iter().flatten()) {
                if !all.iter().any(|(c, _)| c == column) {
                    return Err(SqlError::Table {
                        table: table.name.clone(),
                        message: format!("has no column {column:?}"),
                    });
                }
            }
            let nullable: Vec<String> = rows
                .iter()
                .filter(|r| allows_null(r.get(2)))
                .filter_map(|r| r.get::<&str, _>(0).map(str::to_owned))
                .collect();
            // The snapshot resumes after the last key read (`k > @P…`), which a NULL never
            // satisfies, and a NULL key names no row in an event.
            SqlError::refuse_nullable_key(source, &table.name, &table.key, |c| {
                nullable.iter().any(|n| n == c)
            })?;
            let columns = all
                .into_iter()
                .filter(|(c, _)| {
                    table
                        .columns
                        .as_ref()
                        .is_none_or(|cols| cols.contains(c) || table.key.contains(c))
                })
                .collect();
            tables.push(MsTable {
                config_name: table.name.clone(),
                schema: schema.to_owned(),
                name: name.to_owned(),
                columns,
                key: table.key.clone(),
            });
        }
        let position = match resume {
            Some(Position(text)) => MsPosition::parse(&text)?,
            None => MsPosition {
                phase: "snapshot".into(),
                version: -1,
                table: Some(0),
                after: None,
            },
        };
        Ok(MsSource {
            name: name.to_owned(),
            client,
            tables,
            position,
            in_snapshot: false,
            chunk_rows: config.chunk_rows,
        })
    }

    async fn batch_sql(&mut self, sql: &str, context: &str) -> Result<(), SqlError> {
        self.client
            .simple_query(sql)
            .await
            .map_err(ms_err(context))?
            .into_results()
            .await
            .map_err(ms_err(context))?;
        Ok(())
    }

    async fn current_version(&mut self) -> Result<i64, SqlError> {
        let row = self
            .client
            .query("SELECT CHANGE_TRACKING_CURRENT_VERSION()", &[])
            .await
            .map_err(ms_err("read the change tracking version"))?
            .into_row()
            .await
            .map_err(ms_err("read the change tracking version"))?;
        row.and_then(|r| r.get::<i64, _>(0)).ok_or_else(|| {
            SqlError::Config(
                "change tracking is not enabled on this database: ALTER DATABASE … SET CHANGE_TRACKING = ON".into(),
            )
        })
    }

    async fn snapshot_batch(&mut self) -> Result<Batch, SqlError> {
        loop {
            if !self.in_snapshot {
                self.batch_sql(
                    "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION",
                    "begin the snapshot",
                )
                .await?;
                self.in_snapshot = true;
                let version = self.current_version().await?;
                if self.position.version < 0 {
                    self.position.version = version;
                }
            }
            let index = self.position.table.unwrap_or(0);
            let Some(table) = self.tables.get(index).cloned() else {
                self.batch_sql("COMMIT", "end the snapshot").await?;
                self.in_snapshot = false;
                self.position = MsPosition {
                    phase: "stream".into(),
                    version: self.position.version,
                    table: None,
                    after: None,
                };
                return Ok(Batch {
                    encoded: None,
                    events: Vec::new(),
                    position: self.position.to_position(),
                });
            };
            let after = self.position.after.clone();
            let sql = table.chunk_query(after.is_some(), self.chunk_rows);
            let mut params: Vec<&dyn tiberius::ToSql> = Vec::new();
            let mut bound: Vec<String> = Vec::new();
            if let Some(after) = &after {
                for i in 0..table.key.len() {
                    for value in after.iter().take(i + 1) {
                        bound.push(value.clone());
                    }
                }
            }
            for value in &bound {
                params.push(value);
            }
            let rows = self
                .client
                .query(sql, &params)
                .await
                .map_err(ms_err(format!("read table {}", table.config_name)))?
                .into_first_result()
                .await
                .map_err(ms_err(format!("read table {}", table.config_name)))?;
            let full = rows.len() >= self.chunk_rows as usize;
            let mut events = Vec::with_capacity(rows.len());
            let mut last_key = None;
            for row in &rows {
                let mut after_row = Row::new();
                for ((column, _), (_, data)) in table.columns.iter().zip(row.cells()) {
                    after_row.insert(column.clone(), column_to_json(data));
                }
                last_key = Some(snapshot_key(&table, &after_row)?);
                events.push(ChangeEvent {
                    source: self.name.clone(),
                    table: table.config_name.clone(),
                    op: Op::Snapshot,
                    key: key_of(&table.key, &after_row),
                    before: None,
                    after: Some(after_row),
                    position: Some(self.position.version.to_string()),
                    tx: None,
                    commit_time: None,
                    id: None,
                });
            }
            if full {
                self.position.after = last_key;
            } else {
                self.position.table = Some(index + 1);
                self.position.after = None;
            }
            if !events.is_empty() {
                return Ok(Batch {
                    encoded: None,
                    events,
                    position: self.position.to_position(),
                });
            }
        }
    }

    async fn stream_batch(&mut self) -> Result<Batch, SqlError> {
        loop {
            self.batch_sql(
                "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION",
                "begin a read",
            )
            .await?;
            let read = self.read_changes().await;
            self.batch_sql("COMMIT", "end a read").await?;
            match read? {
                Some(batch) => return Ok(batch),
                None => tokio::time::sleep(IDLE_POLL).await,
            }
        }
    }

    async fn read_changes(&mut self) -> Result<Option<Batch>, SqlError> {
        let last = self.position.version;
        let current = self.current_version().await?;
        if current <= last {
            return Ok(None);
        }
        let mut events: Vec<(i64, ChangeEvent)> = Vec::new();
        for table in self.tables.clone() {
            let object = format!(
                "{}.{}",
                quote_mssql(&table.schema),
                quote_mssql(&table.name)
            );
            let min = self
                .client
                .query(
                    "SELECT CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(@P1))",
                    &[&object.as_str()],
                )
                .await
                .map_err(ms_err("read the minimum valid version"))?
                .into_row()
                .await
                .map_err(ms_err("read the minimum valid version"))?
                .and_then(|r| r.get::<i64, _>(0));
            check_min_valid(&self.name, &table.config_name, last, min)?;
            let rows = self
                .client
                .query(table.changes_query(), &[&last, &current])
                .await
                .map_err(ms_err(format!("read the changes of {}", table.config_name)))?
                .into_first_result()
                .await
                .map_err(ms_err(format!("read the changes of {}", table.config_name)))?;
            for row in &rows {
                let cells: Vec<Value> = row.cells().map(|(_, d)| column_to_json(d)).collect();
                let version = cells.first().and_then(Value::as_i64).unwrap_or(current);
                let op = match cells.get(1).and_then(Value::as_str) {
                    Some("I") => Op::Insert,
                    Some("U") => Op::Update,
                    _ => Op::Delete,
                };
                let key: Row = table
                    .key
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (k.clone(), cells.get(2 + i).cloned().unwrap_or(Value::Null)))
                    .collect();
                let offset = 2 + table.key.len();
                let mut after = Row::new();
                for (i, (column, _)) in table.columns.iter().enumerate() {
                    after.insert(
                        column.clone(),
                        cells.get(offset + i).cloned().unwrap_or(Value::Null),
                    );
                }
                // The LEFT JOIN found no row: it is gone (deleted since).
                let present = table
                    .key
                    .iter()
                    .all(|k| after.get(k).is_some_and(|v| !v.is_null()));
                let id = format!(
                    "ct:{version}:{}:{}",
                    table.config_name,
                    serde_json::to_string(&key).unwrap_or_default()
                );
                events.push((
                    version,
                    ChangeEvent {
                        source: self.name.clone(),
                        table: table.config_name.clone(),
                        op,
                        key: key.clone(),
                        before: (op != Op::Insert).then_some(key),
                        after: (op != Op::Delete && present).then_some(after),
                        position: Some(version.to_string()),
                        tx: Some(version.to_string()),
                        commit_time: None,
                        id: Some(id),
                    },
                ));
            }
        }
        events.sort_by_key(|(version, _)| *version);
        self.position.version = current;
        Ok(Some(Batch {
            encoded: None,
            events: events.into_iter().map(|(_, e)| e).collect(),
            position: self.position.to_position(),
        }))
    }
}

/// Whether `INFORMATION_SCHEMA.COLUMNS.IS_NULLABLE` lets a column hold NULL (anything but
/// `NO`: a column whose definition cannot be read is not taken for NOT NULL).
pub fn allows_null(is_nullable: Option<&str>) -> bool {
    !is_nullable.is_some_and(|text| text.trim().eq_ignore_ascii_case("NO"))
}

/// The resume point after a snapshot row: its key values as text (bound back as
/// parameters). A NULL there is an error: resuming after a made-up key would skip or
/// repeat rows, and the key columns were checked NOT NULL at start.
pub fn snapshot_key(table: &MsTable, row: &Row) -> Result<Vec<String>, SqlError> {
    table
        .key
        .iter()
        .map(|k| match row.get(k) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Null) | None => Err(SqlError::null_key(&table.config_name, k)),
            Some(other) => Ok(other.to_string()),
        })
        .collect()
}

/// Refuses to resume from a version change tracking has already cleaned up; `source`
/// names the source in the advice.
pub fn check_min_valid(
    source: &str,
    table: &str,
    last: i64,
    min: Option<i64>,
) -> Result<(), SqlError> {
    match min {
        None => Err(SqlError::Table {
            table: table.to_owned(),
            message: "change tracking is not enabled on this table: ALTER TABLE … ENABLE CHANGE_TRACKING".into(),
        }),
        Some(min) if last < min => Err(SqlError::Position(format!(
            "table {table}: the stored change tracking version {last} is older than the oldest one kept ({min}); changes were cleaned up: run `outpost sql reset {source} --config FILE` to take a new snapshot"
        ))),
        Some(_) => Ok(()),
    }
}

fn key_of(key: &[String], row: &Row) -> Row {
    key.iter()
        .map(|k| (k.clone(), row.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

#[async_trait::async_trait]
impl ChangeSource for MsSource {
    async fn next_batch(&mut self) -> Result<Batch, SqlError> {
        if self.position.phase == "snapshot" {
            self.snapshot_batch().await
        } else {
            self.stream_batch().await
        }
    }

    async fn committed(&mut self, _position: &Position) -> Result<(), SqlError> {
        // Change tracking keeps history for its retention period whatever we do.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn appointment() -> MsTable {
        MsTable {
            config_name: "appointment".into(),
            schema: "dbo".into(),
            name: "appoint]ment".into(),
            columns: vec![
                ("aptnum".into(), MsKind::Plain),
                ("start_at".into(), MsKind::DateTime),
                ("fee".into(), MsKind::Decimal),
            ],
            key: vec!["aptnum".into()],
        }
    }

    #[test]
    fn urls_parse_without_leaking_the_password() {
        let url = MsUrl::parse("sqlserver://outpost:s3cret@127.0.0.1:1434/pms").unwrap();
        assert_eq!(
            (
                url.host.as_str(),
                url.port,
                url.database.as_str(),
                url.user.as_str()
            ),
            ("127.0.0.1", 1434, "pms", "outpost")
        );
        assert_eq!(MsUrl::parse("mssql://sa@db/pms").unwrap().port, 1433);
        assert!(!format!("{url:?}").contains("s3cret"));
        let err = MsUrl::parse("sqlserver://u:s3cret@h:x/pms")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn change_queries_quote_names_and_bind_versions() {
        let sql = appointment().changes_query();
        assert!(
            sql.contains("CHANGETABLE(CHANGES [dbo].[appoint]]ment], @P1)"),
            "{sql}"
        );
        assert!(sql.contains("LEFT JOIN [dbo].[appoint]]ment] AS t ON t.[aptnum] = ct.[aptnum]"));
        assert!(sql.contains("CONVERT(nvarchar(40), t.[start_at], 126)"));
        assert!(sql.contains("WHERE ct.SYS_CHANGE_VERSION <= @P2"));
        let chunk = appointment().chunk_query(true, 500);
        assert_eq!(
            chunk,
            "SELECT TOP (500) [aptnum], CONVERT(nvarchar(40), [start_at], 126), CONVERT(nvarchar(64), [fee]) FROM [dbo].[appoint]]ment] WHERE ([aptnum] > @P1) ORDER BY [aptnum]"
        );
        let mut two = appointment();
        two.key.push("fee".into());
        assert!(two
            .chunk_query(true, 1)
            .contains("WHERE ([aptnum] > @P1) OR ([aptnum] = @P2 AND [fee] > @P3)"));
    }

    #[test]
    fn positions_parse_and_old_versions_are_refused() {
        let p = MsPosition::parse(r#"{"phase":"stream","version":42}"#).unwrap();
        assert_eq!(p.version, 42);
        let p = MsPosition::parse(r#"{"phase":"snapshot","version":7,"table":1,"after":["10"]}"#)
            .unwrap();
        assert_eq!(p.after, Some(vec!["10".into()]));
        assert!(MsPosition::parse(r#"{"phase":"nope","version":1}"#).is_err());
        assert!(MsPosition::parse("garbage").is_err());
        assert!(check_min_valid("pms", "t", 10, Some(5)).is_ok());
        let err = check_min_valid("pms", "t", 3, Some(5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run `outpost sql reset pms --config FILE` to take a new snapshot"),
            "{err}"
        );
        assert!(check_min_valid("pms", "t", 3, None).is_err());
    }

    #[test]
    fn nullable_key_columns_are_refused_and_null_keys_never_resume() {
        assert!(!allows_null(Some("NO")));
        assert!(allows_null(Some("YES")));
        assert!(allows_null(None));
        let mut row = Row::new();
        row.insert("aptnum".into(), json!(7));
        assert_eq!(snapshot_key(&appointment(), &row).unwrap(), vec!["7"]);
        row.insert("aptnum".into(), json!("A-7"));
        assert_eq!(snapshot_key(&appointment(), &row).unwrap(), vec!["A-7"]);
        row.insert("aptnum".into(), Value::Null);
        let err = snapshot_key(&appointment(), &row).unwrap_err().to_string();
        assert!(
            err.contains("appointment") && err.contains("\"aptnum\""),
            "{err}"
        );
        assert!(snapshot_key(&appointment(), &Row::new()).is_err());
    }

    #[test]
    fn values_keep_their_meaning() {
        assert_eq!(column_to_json(&ColumnData::I32(Some(7))), json!(7));
        assert_eq!(column_to_json(&ColumnData::I64(None)), json!(null));
        assert_eq!(column_to_json(&ColumnData::Bit(Some(true))), json!(true));
        assert_eq!(column_to_json(&ColumnData::F64(Some(1.5))), json!(1.5));
        assert_eq!(
            column_to_json(&ColumnData::String(Some("山田".into()))),
            json!("山田")
        );
        assert_eq!(
            column_to_json(&ColumnData::Binary(Some(vec![0u8, 255, 16].into()))),
            json!("AP8Q")
        );
        assert_eq!(MsKind::from_type("datetime2"), MsKind::DateTime);
        assert_eq!(MsKind::from_type("DECIMAL"), MsKind::Decimal);
        assert_eq!(MsKind::from_type("nvarchar"), MsKind::Plain);
    }
}
