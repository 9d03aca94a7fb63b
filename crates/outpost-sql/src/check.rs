//! `outpost sql check`: connects as the configured user and compares what it may do with
//! what the config needs ([`crate::grants`]): missing grants (per table, column and
//! replication right) and excess ones (superuser, role or database creation, ownership of
//! captured tables, writes no operation needs).
//!
//! PostgreSQL asks the server itself (`pg_roles`, `has_table_privilege`,
//! `has_column_privilege`, `pg_has_role`); MariaDB/MySQL reads the account's own rows of
//! `information_schema` (`USER_PRIVILEGES`, `SCHEMA_PRIVILEGES`, `TABLE_PRIVILEGES`,
//! `COLUMN_PRIVILEGES`); Firebird reads `RDB$USER_PRIVILEGES` (the user's rows and those of
//! the roles granted to it) and `RDB$RELATIONS`; SQLite looks at the file. Other dialects
//! are reported as not checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use crate::firebird::conn::{column_text, FbConn, TxKind};
use crate::grants::{Dialect, ReadTable, SinkNeeds, SourceNeeds, TableWrites};
use crate::ident::{quote, quote_mysql, split_qualified};
use crate::{redact_url, SqlError};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Something the agent needs and lacks.
    Missing,
    /// Something the agent has and does not need.
    Excess,
    /// As it should be.
    Ok,
}

impl Severity {
    /// A fixed-width word for the report.
    pub fn label(self) -> &'static str {
        match self {
            Severity::Missing => "MISSING",
            Severity::Excess => "EXCESS ",
            Severity::Ok => "ok     ",
        }
    }
}

/// One line of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Missing, excess or fine.
    pub severity: Severity,
    /// What, naming the table, column or right (never a value or a password).
    pub what: String,
}

/// What was found for one source or sink.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Every finding, in the order checked.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    fn push(&mut self, severity: Severity, what: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            what: what.into(),
        });
    }

    /// Whether nothing is missing and nothing is in excess.
    pub fn is_clean(&self) -> bool {
        self.findings.iter().all(|f| f.severity == Severity::Ok)
    }
}

/// What one connection (one URL) must be able to do: read for a source, write for sinks on
/// the same account.
#[derive(Debug, Clone, Default)]
pub struct Needs<'a> {
    /// The source, if this account captures.
    pub source: Option<&'a SourceNeeds>,
    /// Writes of the sinks using this account.
    pub writes: Vec<&'a TableWrites>,
}

impl<'a> Needs<'a> {
    /// A source's needs.
    pub fn source(source: &'a SourceNeeds) -> Self {
        Needs {
            source: Some(source),
            writes: Vec::new(),
        }
    }

    /// A sink's needs.
    pub fn sink(sink: &'a SinkNeeds) -> Self {
        Needs {
            source: None,
            writes: sink.tables.iter().collect(),
        }
    }

    fn writes_to(&self, schema: &str, table: &str) -> Vec<&'a TableWrites> {
        self.writes
            .iter()
            .copied()
            .filter(|w| {
                let (s, t) = split_qualified(&w.table);
                t == table && s.unwrap_or("public") == schema
            })
            .collect()
    }
}

/// Checks a PostgreSQL account: `url` (its password, if any, or `password`) against `needs`.
pub async fn check_postgres(
    url: &str,
    password: Option<String>,
    needs: &Needs<'_>,
) -> Result<CheckReport, SqlError> {
    let client = connect(url, password).await?;
    let mut report = CheckReport::default();
    let q = |context: &'static str| move |err| SqlError::pg(context, err);

    let role = client
        .query_one(
            "SELECT current_user::text, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q("read the role's attributes"))?;
    let user: String = role.get(0);
    let quoted_user = quote(&user);
    let (is_super, createrole, createdb, bypassrls, replication): (bool, bool, bool, bool, bool) = (
        role.get(1),
        role.get(2),
        role.get(3),
        role.get(4),
        role.get(5),
    );
    for (has, attribute) in [
        (is_super, "SUPERUSER"),
        (createrole, "CREATEROLE"),
        (createdb, "CREATEDB"),
        (bypassrls, "BYPASSRLS"),
    ] {
        if has {
            report.push(
                Severity::Excess,
                format!(
                    "role {quoted_user} has {attribute} (ALTER ROLE {quoted_user} NO{attribute};)"
                ),
            );
        }
    }
    match (needs.source.is_some(), replication || is_super) {
        (true, true) => report.push(Severity::Ok, "REPLICATION (logical decoding)"),
        (true, false) => report.push(
            Severity::Missing,
            format!("REPLICATION, needed to read the replication slot (ALTER ROLE {quoted_user} REPLICATION;)"),
        ),
        (false, _) if replication => report.push(
            Severity::Excess,
            format!("REPLICATION: a write-back sink does not read the WAL (ALTER ROLE {quoted_user} NOREPLICATION;)"),
        ),
        (false, _) => {}
    }
    let broad = client
        .query(
            "SELECT r FROM unnest(ARRAY['pg_read_all_data', 'pg_write_all_data', 'pg_read_server_files', \
             'pg_write_server_files', 'pg_execute_server_program']) AS r \
             WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) AND pg_has_role(r, 'MEMBER') \
             AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(q("read the role's memberships"))?;
    for row in broad {
        let role: String = row.get(0);
        report.push(
            Severity::Excess,
            format!("member of {role} (REVOKE {role} FROM {quoted_user};)"),
        );
    }
    let db = client
        .query_one(
            "SELECT current_database()::text, pg_has_role(datdba, 'MEMBER'), \
             has_database_privilege(current_database(), 'CREATE') \
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .map_err(q("read the database's privileges"))?;
    let (database, owns_db, create_db): (String, bool, bool) = (db.get(0), db.get(1), db.get(2));
    if owns_db && !is_super {
        report.push(
            Severity::Excess,
            format!(
                "owns database {} (or is a member of its owner)",
                quote(&database)
            ),
        );
    }
    if create_db && !owns_db && !is_super {
        report.push(
            Severity::Excess,
            format!(
                "CREATE on database {} (REVOKE CREATE ON DATABASE {} FROM {quoted_user};)",
                quote(&database),
                quote(&database)
            ),
        );
    }

    if let Some(source) = needs.source {
        for table in &source.tables {
            check_pg_read(&client, table, needs, &quoted_user, &mut report).await?;
        }
        check_pg_publication(&client, source, &mut report).await?;
    }
    for (index, writes) in needs.writes.iter().enumerate() {
        let (schema, name) = split_qualified(&writes.table);
        let schema = schema.unwrap_or("public");
        // A table the source also reads had its ownership and excess grants checked (every
        // write on it included) above, and a table written by several sinks on this
        // account is checked for them once; what each write needs is checked either way.
        let read_too = needs.source.is_some_and(|s| {
            s.tables.iter().any(|t| {
                let (ts, tn) = split_qualified(&t.name);
                tn == name && ts.unwrap_or("public") == schema
            })
        });
        let first = needs
            .writes
            .iter()
            .position(|w| {
                let (ws, wn) = split_qualified(&w.table);
                wn == name && ws.unwrap_or("public") == schema
            })
            .is_some_and(|first| first == index);
        let excess = !read_too && first;
        check_pg_writes(&client, writes, needs, &quoted_user, excess, &mut report).await?;
    }
    Ok(report)
}

/// The table's oid and whether the user owns it; `None` when it does not exist.
async fn pg_table(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Option<(u32, bool)>, SqlError> {
    let row = client
        .query_opt(
            "SELECT c.oid, pg_has_role(c.relowner, 'MEMBER') FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &name],
        )
        .await
        .map_err(|err| SqlError::pg(format!("look up table {schema}.{name}"), err))?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// Columns of `oid` and whether the user has `privilege` on each.
async fn pg_column_privileges(
    client: &Client,
    oid: u32,
    privilege: &str,
) -> Result<Vec<(String, bool)>, SqlError> {
    let rows = client
        .query(
            "SELECT attname::text, has_column_privilege($1::oid, attnum, $2) FROM pg_attribute \
             WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid, &privilege],
        )
        .await
        .map_err(|err| SqlError::pg("read column privileges", err))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

async fn pg_table_privilege(client: &Client, oid: u32, privilege: &str) -> Result<bool, SqlError> {
    client
        .query_one(
            "SELECT has_table_privilege($1::oid, $2)",
            &[&oid, &privilege],
        )
        .await
        .map(|row| row.get(0))
        .map_err(|err| SqlError::pg("read table privileges", err))
}

fn names(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn check_pg_read(
    client: &Client,
    table: &ReadTable,
    needs: &Needs<'_>,
    user: &str,
    report: &mut CheckReport,
) -> Result<(), SqlError> {
    let (schema, name) = split_qualified(&table.name);
    let schema = schema.unwrap_or("public");
    let qualified = format!("{}.{}", quote(schema), quote(name));
    let Some((oid, owns)) = pg_table(client, schema, name).await? else {
        report.push(
            Severity::Missing,
            format!("table {qualified} does not exist (or the user cannot see its schema)"),
        );
        return Ok(());
    };
    if owns {
        report.push(
            Severity::Excess,
            format!(
                "owns {qualified} (or is a member of its owner): an owner may alter or drop it"
            ),
        );
    }
    let select = pg_column_privileges(client, oid, "SELECT").await?;
    let wanted: Vec<String> = match &table.columns {
        Some(columns) => columns.clone(),
        None => select.iter().map(|(c, _)| c.clone()).collect(),
    };
    let lacking: Vec<String> = wanted
        .iter()
        .filter(|c| !select.iter().any(|(s, ok)| s == *c && *ok))
        .cloned()
        .collect();
    if lacking.is_empty() {
        report.push(
            Severity::Ok,
            format!("SELECT on {qualified} ({})", names(&wanted)),
        );
    } else {
        report.push(
            Severity::Missing,
            format!(
                "SELECT ({}) on {qualified} (GRANT SELECT ({}) ON TABLE {qualified} TO {user};)",
                names(&lacking),
                names(&lacking)
            ),
        );
    }
    let nullable = client
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::oid AND attnum > 0 \
             AND NOT attisdropped AND NOT attnotnull AND attname::text = ANY($2::text[]) \
             ORDER BY attnum",
            &[&oid, &table.key],
        )
        .await
        .map_err(|err| SqlError::pg("read the key columns' definitions", err))?;
    for row in nullable {
        let column: String = row.get(0);
        let fix = format!(
            "ALTER TABLE {qualified} ALTER COLUMN {} SET NOT NULL;",
            quote(&column)
        );
        push_nullable_key(report, &quote(&column), &qualified, Some(&fix));
    }
    let writes = needs.writes_to(schema, name);
    check_pg_write_excess(
        client,
        oid,
        &qualified,
        &writes,
        Some(&wanted),
        user,
        report,
    )
    .await
}

/// Reports a configured key column that allows NULL: a NULL key identifies no row, and
/// the snapshot, resumed after the last key read, would skip or repeat rows (the source
/// refuses to start). `fix`: the statement that adds NOT NULL, where it is that simple.
fn push_nullable_key(report: &mut CheckReport, column: &str, on: &str, fix: Option<&str>) {
    report.push(
        Severity::Missing,
        format!(
            "NOT NULL on key column {column} of {on}: it allows NULL, and a key must identify \
             each row (choose NOT NULL columns, such as the primary key, in tables[].key, or add \
             NOT NULL to the column{})",
            fix.map(|fix| format!(": {fix}")).unwrap_or_default()
        ),
    );
}

/// How much of a table a privilege is wanted on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PgWant {
    /// These columns: column-level grants do.
    Columns(Vec<String>),
    /// Every column the table has now (an `INSERT` without a column list): column-level
    /// grants on each do, as PostgreSQL checks the columns inserted.
    EveryColumn,
    /// The table-level privilege: `RETURNING *` reads every column, also those added
    /// later, so `outpost sql grants` prints `GRANT SELECT ON TABLE`.
    Table,
}

/// What one table's writes need, privilege by privilege (DELETE apart: it has no columns).
fn pg_write_wants(writes: &TableWrites) -> Vec<(&'static str, PgWant)> {
    let mut want = Vec::new();
    match &writes.insert {
        Some(Some(columns)) => {
            want.push(("INSERT", PgWant::Columns(columns.iter().cloned().collect())))
        }
        Some(None) => want.push(("INSERT", PgWant::EveryColumn)),
        None => {}
    }
    // The targets of an `ON CONFLICT … DO UPDATE SET` are in `update` too.
    if !writes.update.is_empty() {
        want.push((
            "UPDATE",
            PgWant::Columns(writes.update.iter().cloned().collect()),
        ));
    }
    if writes.select_all {
        want.push(("SELECT", PgWant::Table));
    } else if !writes.select.is_empty() {
        want.push((
            "SELECT",
            PgWant::Columns(writes.select.iter().cloned().collect()),
        ));
    }
    want
}

/// The columns on which `writes` need `privilege` (INSERT, UPDATE or SELECT), for telling
/// excess grants; `None`: every column (an `INSERT` without a column list, `RETURNING *`).
fn pg_allowed(writes: &[&TableWrites], privilege: &str) -> Option<BTreeSet<String>> {
    let mut allowed = BTreeSet::new();
    for w in writes {
        match privilege {
            "INSERT" => match &w.insert {
                Some(None) => return None,
                Some(Some(columns)) => allowed.extend(columns.iter().cloned()),
                None => {}
            },
            "UPDATE" => allowed.extend(w.update.iter().cloned()),
            "SELECT" if w.select_all => return None,
            "SELECT" => allowed.extend(w.select.iter().cloned()),
            _ => {}
        }
    }
    Some(allowed)
}

/// Flags privileges on a table beyond what `writes` (and, when the source reads the table,
/// its `read` columns) need.
async fn check_pg_write_excess(
    client: &Client,
    oid: u32,
    qualified: &str,
    writes: &[&TableWrites],
    read: Option<&[String]>,
    user: &str,
    report: &mut CheckReport,
) -> Result<(), SqlError> {
    for privilege in ["INSERT", "UPDATE", "SELECT"] {
        let Some(mut allowed) = pg_allowed(writes, privilege) else {
            continue;
        };
        let writes_need = allowed.clone();
        if privilege == "SELECT" {
            allowed.extend(read.unwrap_or_default().iter().cloned());
        }
        let extra: Vec<String> = pg_column_privileges(client, oid, privilege)
            .await?
            .into_iter()
            .filter(|(c, ok)| *ok && !allowed.contains(c))
            .map(|(c, _)| c)
            .collect();
        if extra.is_empty() {
            continue;
        }
        let what = match (privilege, read) {
            // The source's own wording: the reads are the reason for the table here.
            ("SELECT", Some(_)) => format!(
                "SELECT on columns of {qualified} not captured: {}",
                names(&extra)
            ),
            _ => {
                // REVOKE on the table also takes the column grants, so the needed
                // columns are granted again.
                let again = if writes_need.is_empty() {
                    String::new()
                } else {
                    let needed: Vec<String> = writes_need.into_iter().collect();
                    format!(
                        " GRANT {privilege} ({}) ON TABLE {qualified} TO {user};",
                        names(&needed)
                    )
                };
                let verb = if privilege == "SELECT" {
                    "reads"
                } else {
                    "writes"
                };
                format!(
                    "{privilege} ({}) on {qualified}, which nothing in the config {verb} (REVOKE {privilege} ON TABLE {qualified} FROM {user};{again})",
                    names(&extra)
                )
            }
        };
        report.push(Severity::Excess, what);
    }
    let delete_needed = writes.iter().any(|w| w.delete);
    for privilege in ["DELETE", "TRUNCATE", "TRIGGER", "REFERENCES"] {
        if privilege == "DELETE" && delete_needed {
            continue;
        }
        if pg_table_privilege(client, oid, privilege).await? {
            report.push(
                Severity::Excess,
                format!("{privilege} on {qualified} (REVOKE {privilege} ON TABLE {qualified} FROM {user};)"),
            );
        }
    }
    Ok(())
}

/// Checks what `writes` need on its table; `excess`: also the table's owner and
/// privileges beyond what every write on it (`needs`) needs.
async fn check_pg_writes(
    client: &Client,
    writes: &TableWrites,
    needs: &Needs<'_>,
    user: &str,
    excess: bool,
    report: &mut CheckReport,
) -> Result<(), SqlError> {
    let (schema, name) = split_qualified(&writes.table);
    let schema = schema.unwrap_or("public");
    let qualified = format!("{}.{}", quote(schema), quote(name));
    let Some((oid, owns)) = pg_table(client, schema, name).await? else {
        // Without `excess` the table was reported already (by the source or another sink).
        if excess {
            report.push(
                Severity::Missing,
                format!(
                    "table {qualified} (written by {}) does not exist",
                    writes.operations.join(", ")
                ),
            );
        }
        return Ok(());
    };
    if owns && excess {
        report.push(
            Severity::Excess,
            format!("owns {qualified} (or is a member of its owner)"),
        );
    }
    for (privilege, want) in pg_write_wants(writes) {
        let columns = match want {
            PgWant::Table => {
                if pg_table_privilege(client, oid, privilege).await? {
                    report.push(
                        Severity::Ok,
                        format!("{privilege} on {qualified} (the whole table, for RETURNING *)"),
                    );
                } else {
                    report.push(
                        Severity::Missing,
                        format!(
                            "{privilege} on {qualified}, the whole table: RETURNING * reads every column (GRANT {privilege} ON TABLE {qualified} TO {user};)"
                        ),
                    );
                }
                continue;
            }
            PgWant::EveryColumn => pg_column_privileges(client, oid, privilege)
                .await?
                .into_iter()
                .map(|(c, _)| c)
                .collect(),
            PgWant::Columns(columns) => columns,
        };
        let have = pg_column_privileges(client, oid, privilege).await?;
        let lacking: Vec<String> = columns
            .iter()
            .filter(|c| !have.iter().any(|(h, ok)| h == *c && *ok))
            .cloned()
            .collect();
        if lacking.is_empty() {
            report.push(
                Severity::Ok,
                format!("{privilege} ({}) on {qualified}", names(&columns)),
            );
        } else {
            report.push(
                Severity::Missing,
                format!(
                    "{privilege} ({}) on {qualified} (GRANT {privilege} ({}) ON TABLE {qualified} TO {user};)",
                    names(&lacking),
                    names(&lacking)
                ),
            );
        }
    }
    if writes.delete {
        if pg_table_privilege(client, oid, "DELETE").await? {
            report.push(Severity::Ok, format!("DELETE on {qualified}"));
        } else {
            report.push(
                Severity::Missing,
                format!("DELETE on {qualified} (GRANT DELETE ON TABLE {qualified} TO {user};)"),
            );
        }
    }
    if excess {
        let all = needs.writes_to(schema, name);
        check_pg_write_excess(client, oid, &qualified, &all, None, user, report).await?;
    }
    Ok(())
}

async fn check_pg_publication(
    client: &Client,
    source: &SourceNeeds,
    report: &mut CheckReport,
) -> Result<(), SqlError> {
    let publication = &source.publication;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(|err| SqlError::pg("look up the publication", err))?
        .is_some();
    if !exists {
        report.push(
            Severity::Missing,
            format!(
                "publication {} (the tables' owner creates it: see `outpost sql grants`)",
                quote(publication)
            ),
        );
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(|err| SqlError::pg("look up the publication's tables", err))?;
    let present: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let absent: Vec<String> = source
        .tables
        .iter()
        .filter(|t| {
            let (schema, name) = split_qualified(&t.name);
            !present
                .iter()
                .any(|(s, n)| s == schema.unwrap_or("public") && n == name)
        })
        .map(|t| t.name.clone())
        .collect();
    if absent.is_empty() {
        report.push(
            Severity::Ok,
            format!(
                "publication {} has every captured table",
                quote(publication)
            ),
        );
    } else {
        report.push(
            Severity::Missing,
            format!(
                "publication {} lacks {} (the owner runs ALTER PUBLICATION … ADD TABLE)",
                quote(publication),
                absent.join(", ")
            ),
        );
    }
    Ok(())
}

/// Checks a SQLite source: the file must be readable, and (the agent only reads it) not
/// writable by the agent's OS user.
pub fn check_sqlite(path: &Path, needs: &Needs<'_>) -> CheckReport {
    let mut report = CheckReport::default();
    let shown = path.display();
    match std::fs::File::open(path) {
        Ok(_) => report.push(Severity::Ok, format!("{shown} is readable")),
        Err(err) => report.push(Severity::Missing, format!("read access to {shown}: {err}")),
    }
    // Opening for writing changes nothing (no truncation, no write).
    let writable = std::fs::OpenOptions::new().write(true).open(path).is_ok();
    let needs_write = !needs.writes.is_empty();
    match (writable, needs_write) {
        (true, false) => report.push(
            Severity::Excess,
            format!("the agent's OS user can write {shown}; a source only reads it (chmod g-w,o-w, or another owner)"),
        ),
        (false, true) => report.push(Severity::Missing, format!("write access to {shown}")),
        (true, true) => report.push(Severity::Ok, format!("{shown} is writable")),
        (false, false) => report.push(Severity::Ok, format!("{shown} is not writable")),
    }
    report
}

/// The SQLite file of a `sqlite:PATH` URL, relative to `base`.
pub fn sqlite_path(url: &str, base: &Path) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite:")?;
    let path = PathBuf::from(path.strip_prefix("//").unwrap_or(path));
    Some(if path.is_absolute() {
        path
    } else {
        base.join(path)
    })
}

/// What a MariaDB account must be able to do on one table (merged over the source and the
/// sinks on the same account).
#[derive(Debug, Clone, Default)]
struct MyNeed {
    /// `None`: nothing; `Some(None)`: the whole table; `Some(Some(columns))`: these columns.
    select: Option<Option<BTreeSet<String>>>,
    insert: Option<Option<BTreeSet<String>>>,
    update: Option<Option<BTreeSet<String>>>,
    delete: bool,
}

fn want_more(want: &mut Option<Option<BTreeSet<String>>>, more: Option<BTreeSet<String>>) {
    *want = match (want.take(), more) {
        (Some(None), _) | (_, None) => Some(None),
        (Some(Some(mut had)), Some(more)) => {
            had.extend(more);
            Some(Some(had))
        }
        (None, Some(more)) => Some(Some(more)),
    };
}

fn lower(columns: impl IntoIterator<Item = impl AsRef<str>>) -> BTreeSet<String> {
    columns
        .into_iter()
        .map(|c| c.as_ref().to_lowercase())
        .collect()
}

/// Privileges the account holds, read from `information_schema` (its own rows only).
#[derive(Debug, Default)]
struct MyGrants {
    /// Server-wide (`ON *.*`): privilege, grantable.
    global: Vec<(String, bool)>,
    /// Database-wide (`ON db.*`): database, privilege, grantable.
    schema: Vec<(String, String, bool)>,
    /// Table: database, table, privilege, grantable.
    table: Vec<(String, String, String, bool)>,
    /// Column: database, table, column (lower case), privilege, grantable.
    column: Vec<(String, String, String, String, bool)>,
}

/// Server-wide privileges change capture needs; MariaDB 10.5+ calls REPLICATION CLIENT
/// BINLOG MONITOR.
const MY_REPLICATION: [&str; 3] = ["REPLICATION SLAVE", "REPLICATION CLIENT", "BINLOG MONITOR"];

impl MyGrants {
    /// Whether `privilege` on the whole of `db`.`table` is held (at any level above columns).
    fn whole(&self, privilege: &str, db: &str, table: &str) -> bool {
        self.global.iter().any(|(p, _)| p == privilege)
            || self
                .schema
                .iter()
                .any(|(s, p, _)| p == privilege && s == db)
            || self
                .table
                .iter()
                .any(|(s, t, p, _)| p == privilege && s == db && t == table)
    }

    /// Columns of `db`.`table` with a column-level `privilege`.
    fn columns(&self, privilege: &str, db: &str, table: &str) -> BTreeSet<String> {
        self.column
            .iter()
            .filter(|(s, t, _, p, _)| p == privilege && s == db && t == table)
            .map(|(_, _, c, _, _)| c.clone())
            .collect()
    }
}

fn my_err(context: &'static str) -> impl Fn(mysql_async::Error) -> SqlError {
    move |err| SqlError::db(context, err)
}

/// Checks a MariaDB/MySQL account: `url` (`mysql://` or `mariadb://`; its password, if any,
/// or `password`) against `needs`, from `information_schema`'s privilege tables.
pub async fn check_mysql(
    url: &str,
    password: Option<String>,
    needs: &Needs<'_>,
) -> Result<CheckReport, SqlError> {
    use mysql_async::prelude::Queryable;

    let mut conn = my_connect(url, password).await?;
    let mut report = CheckReport::default();
    let current: String = conn
        .query_first("SELECT CURRENT_USER()")
        .await
        .map_err(my_err("read the current user"))?
        .unwrap_or_default();
    let (user, host) = current.rsplit_once('@').unwrap_or((current.as_str(), "%"));
    let literal = |text: &str| format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"));
    let account = format!("{}@{}", literal(user), literal(host));
    let grantee = format!("'{user}'@'{host}'");
    let database = crate::grants::Account::of_url(url).database;

    let unescape = |s: String| s.replace('\\', "");
    let mut have = MyGrants::default();
    let rows: Vec<(String, String)> = conn
        .exec(
            "SELECT PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = ?",
            (grantee.clone(),),
        )
        .await
        .map_err(my_err("read the server-wide privileges"))?;
    have.global = rows
        .into_iter()
        .filter(|(p, _)| p != "USAGE")
        .map(|(p, g)| (p, g == "YES"))
        .collect();
    let rows: Vec<(String, String, String)> = conn
        .exec(
            "SELECT TABLE_SCHEMA, PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = ?",
            (grantee.clone(),),
        )
        .await
        .map_err(my_err("read the database privileges"))?;
    have.schema = rows
        .into_iter()
        .map(|(s, p, g)| (unescape(s), p, g == "YES"))
        .collect();
    let rows: Vec<(String, String, String, String)> = conn
        .exec(
            "SELECT TABLE_SCHEMA, TABLE_NAME, PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.TABLE_PRIVILEGES WHERE GRANTEE = ?",
            (grantee.clone(),),
        )
        .await
        .map_err(my_err("read the table privileges"))?;
    have.table = rows
        .into_iter()
        .map(|(s, t, p, g)| (s, t, p, g == "YES"))
        .collect();
    let rows: Vec<(String, String, String, String, String)> = conn
        .exec(
            "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.COLUMN_PRIVILEGES WHERE GRANTEE = ?",
            (grantee,),
        )
        .await
        .map_err(my_err("read the column privileges"))?;
    have.column = rows
        .into_iter()
        .map(|(s, t, c, p, g)| (s, t, c.to_lowercase(), p, g == "YES"))
        .collect();

    let wanted = my_wanted(needs, &database);

    // Server-wide.
    let global: BTreeSet<&str> = have.global.iter().map(|(p, _)| p.as_str()).collect();
    let others: Vec<&str> = have
        .global
        .iter()
        .map(|(p, _)| p.as_str())
        .filter(|p| !MY_REPLICATION.contains(p))
        .collect();
    let has_slave = global.contains("REPLICATION SLAVE");
    let has_client = global.contains("REPLICATION CLIENT") || global.contains("BINLOG MONITOR");
    if needs.source.is_some() {
        for (has, privilege, why) in [
            (has_slave, "REPLICATION SLAVE", "to read the binlog"),
            (has_client, "REPLICATION CLIENT", "to read binlog positions"),
        ] {
            if has {
                report.push(Severity::Ok, format!("{privilege} ON *.*"));
            } else {
                report.push(
                    Severity::Missing,
                    format!("{privilege}, needed {why} (GRANT {privilege} ON *.* TO {account};)"),
                );
            }
        }
    } else {
        for (has, privilege) in [
            (has_slave, "REPLICATION SLAVE"),
            (has_client, "REPLICATION CLIENT"),
        ] {
            if has {
                report.push(
                    Severity::Excess,
                    format!("{privilege} ON *.*: a write-back sink does not read the binlog (REVOKE {privilege} ON *.* FROM {account};)"),
                );
            }
        }
    }
    let dangerous: Vec<&str> = ["SUPER", "FILE", "PROCESS", "SHUTDOWN", "CREATE USER"]
        .into_iter()
        .filter(|p| global.contains(p))
        .collect();
    let all = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER",
    ]
    .iter()
    .all(|p| global.contains(p))
        && !dangerous.is_empty();
    if all {
        report.push(
            Severity::Excess,
            format!(
                "ALL PRIVILEGES ON *.* ({} server-wide privileges, among them {}) (REVOKE ALL PRIVILEGES, GRANT OPTION FROM {account}; then apply `outpost sql grants`)",
                have.global.len(),
                dangerous.join(", ")
            ),
        );
    } else if !others.is_empty() {
        report.push(
            Severity::Excess,
            format!(
                "{} ON *.*: server-wide, beyond the replication rights (REVOKE {} ON *.* FROM {account};)",
                others.join(", "),
                others.join(", ")
            ),
        );
    }
    if have.global.iter().any(|(_, g)| *g) {
        report.push(
            Severity::Excess,
            format!("GRANT OPTION ON *.* (REVOKE GRANT OPTION ON *.* FROM {account};)"),
        );
    }

    // Database-wide: every table of the database, captured or not.
    let mut schemas: Vec<&str> = have.schema.iter().map(|(s, _, _)| s.as_str()).collect();
    schemas.dedup();
    schemas.sort_unstable();
    schemas.dedup();
    for schema in schemas {
        let privileges: Vec<&str> = have
            .schema
            .iter()
            .filter(|(s, _, _)| s == schema)
            .map(|(_, p, _)| p.as_str())
            .collect();
        let on = format!("{}.*", quote_mysql(schema));
        report.push(
            Severity::Excess,
            format!(
                "{} ON {on}: every table of the database, not only the configured ones (REVOKE {} ON {on} FROM {account};)",
                privileges.join(", "),
                privileges.join(", ")
            ),
        );
        if have.schema.iter().any(|(s, _, g)| s == schema && *g) {
            report.push(
                Severity::Excess,
                format!("GRANT OPTION ON {on} (REVOKE GRANT OPTION ON {on} FROM {account};)"),
            );
        }
    }

    // Configured tables: what is missing, and table or column grants beyond the need.
    for ((db, table), need) in &wanted {
        let table_columns = my_table_columns(&mut conn, db, table).await?;
        my_table_report(
            &mut report,
            &have,
            (db.as_str(), table.as_str()),
            need,
            &table_columns,
            &account,
        );
    }

    // Tables the config does not name.
    let mut tables: Vec<(&str, &str)> = have
        .table
        .iter()
        .map(|(s, t, _, _)| (s.as_str(), t.as_str()))
        .chain(
            have.column
                .iter()
                .map(|(s, t, _, _, _)| (s.as_str(), t.as_str())),
        )
        .filter(|(s, t)| !wanted.iter().any(|((ws, wt), _)| ws == s && wt == t))
        .collect();
    tables.sort_unstable();
    tables.dedup();
    for (db, table) in tables {
        let on = format!("{}.{}", quote_mysql(db), quote_mysql(table));
        let mut fixes = Vec::new();
        let mut what = Vec::new();
        let whole: Vec<&str> = have
            .table
            .iter()
            .filter(|(s, t, _, _)| s == db && t == table)
            .map(|(_, _, p, _)| p.as_str())
            .collect();
        if !whole.is_empty() {
            let list = whole.join(", ");
            fixes.push(format!("REVOKE {list} ON {on} FROM {account};"));
            what.push(list);
        }
        let mut privileges: Vec<&str> = have
            .column
            .iter()
            .filter(|(s, t, _, _, _)| s == db && t == table)
            .map(|(_, _, _, p, _)| p.as_str())
            .collect();
        privileges.sort_unstable();
        privileges.dedup();
        for privilege in privileges {
            let columns = my_names(have.columns(privilege, db, table).iter());
            fixes.push(format!(
                "REVOKE {privilege} ({columns}) ON {on} FROM {account};"
            ));
            what.push(format!("{privilege} ({columns})"));
        }
        report.push(
            Severity::Excess,
            format!(
                "{} ON {on}, a table the config does not name ({})",
                what.join(", "),
                fixes.join(" ")
            ),
        );
    }
    // Key columns that allow NULL (names compared as MariaDB does, ignoring case).
    for table in needs.source.iter().flat_map(|source| &source.tables) {
        let (schema, name) = split_qualified(&table.name);
        let schema = schema.unwrap_or(&database);
        let nullable: Vec<String> = conn
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
                 AND TABLE_NAME = ? AND IS_NULLABLE <> 'NO' ORDER BY ORDINAL_POSITION",
                (schema, name),
            )
            .await
            .map_err(my_err("read the key columns' definitions"))?;
        let on = format!("{}.{}", quote_mysql(schema), quote_mysql(name));
        for column in nullable {
            if table.key.iter().any(|k| k.eq_ignore_ascii_case(&column)) {
                push_nullable_key(&mut report, &quote_mysql(&column), &on, None);
            }
        }
    }
    if let Err(err) = conn.disconnect().await {
        tracing::debug!(error = %err, "check connection ended");
    }
    Ok(report)
}

/// What the config needs of a MariaDB account, per (database, table), merged over the
/// source and the sinks on the account; `database`: the URL's, for unqualified names.
fn my_wanted(needs: &Needs<'_>, database: &str) -> Vec<((String, String), MyNeed)> {
    let mut wanted: Vec<((String, String), MyNeed)> = Vec::new();
    let mut need_of = |name: &str| -> usize {
        let (schema, table) = split_qualified(name);
        let key = (schema.unwrap_or(database).to_owned(), table.to_owned());
        match wanted.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                wanted.push((key, MyNeed::default()));
                wanted.len() - 1
            }
        }
    };
    let mut indexes = Vec::new();
    if let Some(source) = needs.source {
        for table in &source.tables {
            indexes.push((
                need_of(&table.name),
                Some(table.columns.clone().map(lower)),
                None,
            ));
        }
    }
    for writes in &needs.writes {
        indexes.push((need_of(&writes.table), None, Some(*writes)));
    }
    for (i, select, writes) in indexes {
        let need = &mut wanted[i].1;
        if let Some(select) = select {
            want_more(&mut need.select, select);
        }
        if let Some(w) = writes {
            // `RETURNING *` wants SELECT on the whole table (what `outpost sql grants`
            // prints); the columns named elsewhere are then covered.
            if w.select_all {
                want_more(&mut need.select, None);
            } else if !w.select.is_empty() {
                want_more(&mut need.select, Some(lower(&w.select)));
            }
            if let Some(insert) = &w.insert {
                want_more(&mut need.insert, insert.as_ref().map(lower));
            }
            // With `ON DUPLICATE KEY UPDATE`, `update` and `select` hold what MariaDB
            // checks for it (see `grants::mariadb_insert_needs`).
            if !w.update.is_empty() {
                want_more(&mut need.update, Some(lower(&w.update)));
            }
            need.delete |= w.delete;
        }
    }
    wanted
}

/// Compares what the account holds on one configured table (`table_columns`: the table's
/// columns, lower case) with what it needs: missing grants, and table- or column-level ones
/// beyond the need (server- and database-wide ones are reported apart).
fn my_table_report(
    report: &mut CheckReport,
    have: &MyGrants,
    (db, table): (&str, &str),
    need: &MyNeed,
    table_columns: &[String],
    account: &str,
) {
    let on = format!("{}.{}", quote_mysql(db), quote_mysql(table));
    for (privilege, want) in [
        ("SELECT", &need.select),
        ("INSERT", &need.insert),
        ("UPDATE", &need.update),
    ] {
        let whole = have.whole(privilege, db, table);
        let columns = have.columns(privilege, db, table);
        match want {
            Some(None) if whole => report.push(Severity::Ok, format!("{privilege} ON {on}")),
            Some(None) => report.push(
                Severity::Missing,
                format!("{privilege} ON {on} (or the table does not exist) (GRANT {privilege} ON {on} TO {account};)"),
            ),
            Some(Some(wanted)) => {
                let lacking: Vec<String> = if whole {
                    Vec::new()
                } else {
                    wanted.difference(&columns).cloned().collect()
                };
                let list = my_names(wanted.iter());
                if lacking.is_empty() {
                    report.push(Severity::Ok, format!("{privilege} ({list}) ON {on}"));
                } else {
                    let lacking = my_names(lacking.iter());
                    report.push(
                        Severity::Missing,
                        format!("{privilege} ({lacking}) ON {on} (GRANT {privilege} ({lacking}) ON {on} TO {account};)"),
                    );
                }
            }
            None => {}
        }
        // Table-level and column-level grants beyond the need (server- and
        // database-wide ones are reported above).
        let table_level = have
            .table
            .iter()
            .any(|(s, t, p, _)| p == privilege && s == db && t == table);
        let allowed: Option<&BTreeSet<String>> = match want {
            Some(None) => continue,
            Some(Some(wanted)) => Some(wanted),
            None => None,
        };
        if table_level {
            let extra: Vec<&String> = table_columns
                .iter()
                .filter(|c| !allowed.is_some_and(|a| a.contains(*c)))
                .collect();
            if allowed.is_none() {
                report.push(
                    Severity::Excess,
                    format!("{privilege} ON {on}, which nothing in the config needs (REVOKE {privilege} ON {on} FROM {account};)"),
                );
            } else if !extra.is_empty() || table_columns.is_empty() {
                let wanted = my_names(allowed.into_iter().flatten());
                report.push(
                    Severity::Excess,
                    format!(
                        "{privilege} on the whole of {on}, also on {} (REVOKE {privilege} ON {on} FROM {account}; GRANT {privilege} ({wanted}) ON {on} TO {account};)",
                        if extra.is_empty() { "columns the config does not name".to_owned() } else { my_names(extra.into_iter()) }
                    ),
                );
            }
        }
        let extra: Vec<String> = columns
            .iter()
            .filter(|c| !allowed.is_some_and(|a| a.contains(*c)))
            .cloned()
            .collect();
        if !extra.is_empty() {
            let extra = my_names(extra.iter());
            report.push(
                Severity::Excess,
                format!("{privilege} ({extra}) ON {on}, which nothing in the config needs (REVOKE {privilege} ({extra}) ON {on} FROM {account};)"),
            );
        }
    }
    if need.delete {
        if have.whole("DELETE", db, table) {
            report.push(Severity::Ok, format!("DELETE ON {on}"));
        } else {
            report.push(
                Severity::Missing,
                format!("DELETE ON {on} (GRANT DELETE ON {on} TO {account};)"),
            );
        }
    }
    let mut extra: Vec<&str> = have
        .table
        .iter()
        .filter(|(s, t, p, _)| {
            s == db
                && t == table
                && !matches!(p.as_str(), "SELECT" | "INSERT" | "UPDATE")
                && !(p == "DELETE" && need.delete)
        })
        .map(|(_, _, p, _)| p.as_str())
        .collect();
    extra.extend(
        have.column
            .iter()
            .filter(|(s, t, _, p, _)| s == db && t == table && p == "REFERENCES")
            .map(|_| "REFERENCES"),
    );
    extra.dedup();
    if !extra.is_empty() {
        let list = extra.join(", ");
        report.push(
            Severity::Excess,
            format!("{list} ON {on}, which nothing in the config needs (REVOKE {list} ON {on} FROM {account};)"),
        );
    }
    let grantable = have
        .table
        .iter()
        .any(|(s, t, _, g)| *g && s == db && t == table)
        || have
            .column
            .iter()
            .any(|(s, t, _, _, g)| *g && s == db && t == table);
    if grantable {
        report.push(
            Severity::Excess,
            format!("GRANT OPTION ON {on} (REVOKE GRANT OPTION ON {on} FROM {account};)"),
        );
    }
}

fn my_names<'a>(columns: impl Iterator<Item = &'a String>) -> String {
    columns
        .map(|c| quote_mysql(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The columns of `db`.`table` the account can see (lower case), in table order.
async fn my_table_columns(
    conn: &mut mysql_async::Conn,
    db: &str,
    table: &str,
) -> Result<Vec<String>, SqlError> {
    use mysql_async::prelude::Queryable;
    let rows: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(my_err("read the table's columns"))?;
    Ok(rows.into_iter().map(|c| c.to_lowercase()).collect())
}

/// Connects like the MariaDB source does: `mariadb://` read as `mysql://`, TCP only, the
/// password from the URL or `password`.
async fn my_connect(url: &str, password: Option<String>) -> Result<mysql_async::Conn, SqlError> {
    let opts = crate::mysql::options_from(url, password)?;
    crate::mysql::connect(&opts, url).await
}

/// One relation the Firebird account needs, and the privileges it needs on it.
#[derive(Debug, Clone)]
struct FbWant {
    /// The name as the config (or the trigger DDL) writes it.
    name: String,
    /// Privilege letters of `RDB$USER_PRIVILEGES` (`S`, `I`, `U`, `D`).
    privileges: BTreeSet<char>,
}

/// One row of `RDB$USER_PRIVILEGES` that applies to the account.
#[derive(Debug, Clone)]
struct FbGrant {
    /// `None`: granted to the user; `Some(role)`: through a role.
    role: Option<String>,
    privilege: char,
    relation: String,
    grant_option: bool,
}

fn fb_privilege_name(letter: char) -> &'static str {
    match letter {
        'S' => "SELECT",
        'I' => "INSERT",
        'U' => "UPDATE",
        'D' => "DELETE",
        'R' => "REFERENCES",
        'X' => "EXECUTE",
        'G' => "USAGE",
        'C' => "CREATE",
        'L' => "ALTER",
        'O' => "DROP",
        _ => "ALL",
    }
}

/// A Firebird name as a statement writes it: bare when it is a plain upper-case
/// identifier, else quoted.
fn fb_name(stored: &str) -> String {
    if stored
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && stored
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
    {
        stored.to_owned()
    } else {
        quote(stored)
    }
}

/// The relations a Firebird account needs and the privileges on each; `triggers`: the
/// source captures with the trigger change tables.
fn fb_wants(needs: &Needs<'_>, triggers: bool) -> Vec<FbWant> {
    let mut wants: Vec<FbWant> = Vec::new();
    let mut want = |name: &str, letters: &[char]| {
        let (_, name) = split_qualified(name);
        let index = match wants.iter().position(|w| w.name.eq_ignore_ascii_case(name)) {
            Some(i) => i,
            None => {
                wants.push(FbWant {
                    name: name.to_owned(),
                    privileges: BTreeSet::new(),
                });
                wants.len() - 1
            }
        };
        wants[index].privileges.extend(letters.iter().copied());
    };
    if let Some(source) = needs.source {
        for table in &source.tables {
            want(&table.name, &['S']);
        }
        if triggers {
            for table in crate::grants::FIREBIRD_CHANGE_TABLES {
                want(table, &['S', 'D']);
            }
        }
    }
    for writes in &needs.writes {
        let mut letters = Vec::new();
        if writes.insert.is_some() {
            letters.push('I');
        }
        if !writes.update.is_empty() {
            letters.push('U');
        }
        if writes.delete {
            letters.push('D');
        }
        // Firebird grants SELECT on whole tables only: `RETURNING *` wants nothing more.
        if !writes.select.is_empty() || writes.select_all {
            letters.push('S');
        }
        want(&writes.table, &letters);
    }
    wants
}

/// Checks a Firebird account: `url` (its password, if any, or `password`) against `needs`;
/// `triggers`: the source captures with the trigger change tables (`mode = "cdc"`).
pub async fn check_firebird(
    url: &str,
    password: Option<String>,
    needs: &Needs<'_>,
    triggers: bool,
) -> Result<CheckReport, SqlError> {
    let wants = fb_wants(needs, triggers);
    let keys: Vec<(String, Vec<String>)> = needs
        .source
        .iter()
        .flat_map(|source| &source.tables)
        .map(|table| (table.name.clone(), table.key.clone()))
        .collect();
    let parsed = crate::firebird::FbUrl::parse(url)?;
    let shown = redact_url(url);
    tokio::task::spawn_blocking(move || {
        check_firebird_blocking(&parsed, password, &shown, &wants, &keys)
    })
    .await
    .map_err(|err| SqlError::Task(err.to_string()))?
}

fn fb_text(column: Option<&rsfbclient_core::Column>) -> String {
    column
        .and_then(column_text)
        .and_then(Result::ok)
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

/// `keys`: each captured table (as configured) and its key columns.
fn check_firebird_blocking(
    url: &crate::firebird::FbUrl,
    password: Option<String>,
    shown: &str,
    wants: &[FbWant],
    keys: &[(String, Vec<String>)],
) -> Result<CheckReport, SqlError> {
    let mut conn = FbConn::connect(url, password.as_deref(), shown)?;
    let result = conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
        let user_rows = conn.query(
            tr,
            "SELECT CAST(CURRENT_USER AS VARCHAR(63)) FROM RDB$DATABASE",
            Vec::new(),
            "read the current user",
        )?;
        let grant_rows = conn.query(
            tr,
            "SELECT CAST(NULL AS VARCHAR(63)), TRIM(p.RDB$PRIVILEGE), TRIM(p.RDB$RELATION_NAME), \
             COALESCE(p.RDB$GRANT_OPTION, 0), p.RDB$OBJECT_TYPE \
             FROM RDB$USER_PRIVILEGES p WHERE p.RDB$USER = CURRENT_USER AND p.RDB$USER_TYPE = 8 \
             UNION ALL \
             SELECT TRIM(p.RDB$USER), TRIM(p.RDB$PRIVILEGE), TRIM(p.RDB$RELATION_NAME), \
             COALESCE(p.RDB$GRANT_OPTION, 0), p.RDB$OBJECT_TYPE \
             FROM RDB$USER_PRIVILEGES p WHERE p.RDB$USER_TYPE = 13 AND p.RDB$USER IN \
             (SELECT m.RDB$RELATION_NAME FROM RDB$USER_PRIVILEGES m WHERE m.RDB$USER = CURRENT_USER \
              AND m.RDB$USER_TYPE = 8 AND m.RDB$PRIVILEGE = 'M')",
            Vec::new(),
            "read the user's privileges",
        )?;
        let relation_rows = conn.query(
            tr,
            "SELECT TRIM(RDB$RELATION_NAME), TRIM(COALESCE(RDB$OWNER_NAME, '')) FROM RDB$RELATIONS \
             WHERE COALESCE(RDB$SYSTEM_FLAG, 0) = 0",
            Vec::new(),
            "read the tables",
        )?;
        // Key columns that allow NULL, as (relation, column) stored names; a table that is
        // not there is reported as missing below.
        let mut nullable_keys = Vec::new();
        for (table, key) in keys {
            let (_, table) = split_qualified(table);
            let stored: Vec<String> = relation_rows
                .iter()
                .map(|row| fb_text(row.first()))
                .collect();
            let Some(relation) = stored
                .iter()
                .find(|r| *r == table)
                .or_else(|| stored.iter().find(|r| crate::firebird::ddl::names(table, r)))
            else {
                continue;
            };
            let nullable = crate::firebird::ddl::nullable_columns(conn, tr, relation)?;
            for wanted in key {
                let column = nullable
                    .iter()
                    .find(|c| *c == wanted)
                    .or_else(|| nullable.iter().find(|c| crate::firebird::ddl::names(wanted, c)));
                if let Some(column) = column {
                    nullable_keys.push((relation.clone(), column.clone()));
                }
            }
        }
        Ok((user_rows, grant_rows, relation_rows, nullable_keys))
    });
    conn.close();
    let (user_rows, grant_rows, relation_rows, nullable_keys) = result?;
    let user = user_rows
        .first()
        .map(|row| fb_text(row.first()))
        .unwrap_or_else(|| url.user.to_ascii_uppercase());
    let grants: Vec<FbGrant> = grant_rows
        .iter()
        .map(|row| {
            let role = fb_text(row.first());
            FbGrant {
                role: (!role.is_empty()).then_some(role),
                privilege: fb_text(row.get(1)).chars().next().unwrap_or(' '),
                relation: fb_text(row.get(2)),
                grant_option: fb_text(row.get(3)) != "0",
            }
        })
        .collect();
    let relations: Vec<(String, String)> = relation_rows
        .iter()
        .map(|row| (fb_text(row.first()), fb_text(row.get(1))))
        .collect();
    let mut report = firebird_report(&user, &grants, &relations, wants);
    for (relation, column) in nullable_keys {
        let (column, on) = (fb_name(&column), fb_name(&relation));
        let fix = format!("ALTER TABLE {on} ALTER COLUMN {column} SET NOT NULL;");
        push_nullable_key(&mut report, &column, &on, Some(&fix));
    }
    Ok(report)
}

/// Compares what the account holds with what it needs.
fn firebird_report(
    user: &str,
    grants: &[FbGrant],
    relations: &[(String, String)],
    wants: &[FbWant],
) -> CheckReport {
    let mut report = CheckReport::default();
    let to = format!("USER {}", fb_name(user));
    let from_of = |grant: &FbGrant| match &grant.role {
        Some(role) => format!("ROLE {}", fb_name(role)),
        None => to.clone(),
    };
    let is_sysdba = user.eq_ignore_ascii_case("SYSDBA");
    if is_sysdba {
        report.push(
            Severity::Excess,
            "user SYSDBA may do anything in every database of the server (CREATE USER and GRANT as `outpost sql grants` prints, then put that user in the URL)",
        );
    }
    for grant in grants
        .iter()
        .filter(|g| g.privilege == 'M' && g.relation == "RDB$ADMIN")
    {
        report.push(
            Severity::Excess,
            format!(
                "holds the RDB$ADMIN role (REVOKE RDB$ADMIN FROM {};)",
                from_of(grant)
            ),
        );
    }
    // Resolves a config name to the stored relation.
    let stored = |name: &str| -> Option<&(String, String)> {
        relations
            .iter()
            .find(|(r, _)| crate::firebird::ddl::names(name, r))
    };
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for want in wants {
        let Some((relation, owner)) = stored(&want.name) else {
            report.push(
                Severity::Missing,
                format!(
                    "table {} does not exist",
                    fb_name(&want.name.to_ascii_uppercase())
                ),
            );
            continue;
        };
        named.insert(relation.as_str());
        let on = fb_name(relation);
        if !is_sysdba && owner == user {
            report.push(
                Severity::Excess,
                format!("owns {on}: an owner may alter or drop it (connect as a user of its own: apply `outpost sql grants`)"),
            );
        }
        let held: Vec<&FbGrant> = grants
            .iter()
            .filter(|g| &g.relation == relation && g.privilege != 'M')
            .collect();
        for letter in &want.privileges {
            let privilege = fb_privilege_name(*letter);
            if held.iter().any(|g| g.privilege == *letter) {
                report.push(Severity::Ok, format!("{privilege} ON {on}"));
            } else {
                report.push(
                    Severity::Missing,
                    format!("{privilege} ON {on} (GRANT {privilege} ON TABLE {on} TO {to};)"),
                );
            }
        }
        let mut extra: Vec<&FbGrant> = held
            .iter()
            .copied()
            .filter(|g| !want.privileges.contains(&g.privilege))
            .collect();
        extra.sort_by(|a, b| (a.privilege, &a.role).cmp(&(b.privilege, &b.role)));
        extra.dedup_by(|a, b| a.privilege == b.privilege && a.role == b.role);
        for grant in extra {
            let privilege = fb_privilege_name(grant.privilege);
            report.push(
                Severity::Excess,
                format!(
                    "{privilege} ON {on}{}, which nothing in the config needs (REVOKE {privilege} ON TABLE {on} FROM {};)",
                    grant.role.as_ref().map(|r| format!(" (through role {})", fb_name(r))).unwrap_or_default(),
                    from_of(grant)
                ),
            );
        }
        if held.iter().any(|g| g.grant_option) {
            report.push(
                Severity::Excess,
                format!(
                    "GRANT OPTION ON {on} (REVOKE GRANT OPTION FOR ALL ON TABLE {on} FROM {to};)"
                ),
            );
        }
    }
    // Tables and views the config does not name.
    let mut others: Vec<(&str, Option<&str>, char)> = grants
        .iter()
        .filter(|g| g.privilege != 'M' && !named.contains(g.relation.as_str()))
        .filter(|g| relations.iter().any(|(r, _)| r == &g.relation))
        .map(|g| (g.relation.as_str(), g.role.as_deref(), g.privilege))
        .collect();
    others.sort_unstable();
    others.dedup();
    let mut i = 0;
    while i < others.len() {
        let (relation, role) = (others[i].0, others[i].1);
        let mut list = Vec::new();
        while i < others.len() && others[i].0 == relation && others[i].1 == role {
            list.push(fb_privilege_name(others[i].2));
            i += 1;
        }
        list.dedup();
        let list = list.join(", ");
        let on = fb_name(relation);
        let from = match role {
            Some(role) => format!("ROLE {}", fb_name(role)),
            None => to.clone(),
        };
        report.push(
            Severity::Excess,
            format!("{list} ON {on}, a table the config does not name (REVOKE {list} ON TABLE {on} FROM {from};)"),
        );
    }
    report
}

/// Whether `check` can look at this dialect yet.
pub fn supported(dialect: Dialect) -> bool {
    matches!(
        dialect,
        Dialect::Postgres | Dialect::Sqlite | Dialect::MariaDb | Dialect::Firebird
    )
}

async fn connect(url: &str, password: Option<String>) -> Result<Client, SqlError> {
    let (client, _connection) =
        crate::postgres::pg_connect(url, password.as_deref(), "outpost sql check").await?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sqlite_files_writable_by_a_reader_are_excess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pms.db");
        std::fs::write(&path, b"").unwrap();
        let report = check_sqlite(&path, &Needs::default());
        assert!(!report.is_clean());
        assert!(report
            .findings
            .iter()
            .any(|f| f.severity == Severity::Excess));
        let missing = check_sqlite(&dir.path().join("absent.db"), &Needs::default());
        assert!(missing
            .findings
            .iter()
            .any(|f| f.severity == Severity::Missing));
        assert_eq!(
            sqlite_path("sqlite:pms.db", Path::new("/etc/outpost")),
            Some(PathBuf::from("/etc/outpost/pms.db"))
        );
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn sink(url: &str, operations: &[(&str, &str)]) -> SinkNeeds {
        SinkNeeds::of_operations("w", url, operations.iter().copied()).unwrap()
    }

    /// The `GRANT` lines of a printed script: privilege, its column list (`None`: the
    /// whole table) and the target between `ON` and `TO`, quotes dropped.
    fn printed_grants(script: &str) -> Vec<(String, Option<BTreeSet<String>>, String)> {
        let unquote = |s: &str| s.trim().trim_matches(|c| c == '`' || c == '"').to_owned();
        script
            .lines()
            .filter_map(|line| line.strip_prefix("GRANT "))
            .filter_map(|rest| {
                let (what, rest) = rest.split_once(" ON ")?;
                let (on, _) = rest.split_once(" TO ")?;
                let (privilege, columns) = match what.split_once(" (") {
                    Some((p, list)) => (
                        p,
                        Some(list.trim_end_matches(')').split(',').map(unquote).collect()),
                    ),
                    None => (what, None),
                };
                let on = on.trim_start_matches("TABLE ");
                let table = on.rsplit('.').next().map(unquote)?;
                Some((privilege.to_owned(), columns, table))
            })
            .collect()
    }

    /// A MariaDB account holding exactly what `outpost sql grants` prints for `needs`.
    fn mariadb_as_printed(needs: &SinkNeeds) -> MyGrants {
        let mut have = MyGrants::default();
        for (privilege, columns, table) in printed_grants(&crate::grants::sink_script(needs)) {
            match columns {
                None => have.table.push(("od".into(), table, privilege, false)),
                Some(columns) => have.column.extend(columns.into_iter().map(|c| {
                    (
                        "od".into(),
                        table.clone(),
                        c.to_lowercase(),
                        privilege.clone(),
                        false,
                    )
                })),
            }
        }
        have
    }

    fn mariadb_report(needs: &SinkNeeds, have: &MyGrants, columns: &[&str]) -> CheckReport {
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let mut report = CheckReport::default();
        for ((db, table), need) in my_wanted(&Needs::sink(needs), "od") {
            my_table_report(&mut report, have, (&db, &table), &need, &columns, "'w'@'%'");
        }
        report
    }

    #[test]
    fn mariadb_printed_grants_are_exactly_what_check_wants() {
        let columns = ["id", "a", "b", "n"];
        for operations in [
            // `RETURNING *`: SELECT on the whole table.
            &[("add", "INSERT INTO t (a) VALUES (:a) RETURNING *")][..],
            &[("drop", "DELETE FROM t WHERE id = :id RETURNING *")][..],
            // Upserts: UPDATE on the inserted and the set columns, SELECT on the set ones.
            &[(
                "put",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON DUPLICATE KEY UPDATE a = VALUES(a), n = n + 1",
            )][..],
            &[(
                "put",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON DUPLICATE KEY UPDATE b = :b RETURNING id",
            )][..],
            &[(
                "put",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON DUPLICATE KEY UPDATE b = :b RETURNING *",
            )][..],
            &[
                ("add", "INSERT INTO t VALUES (:id, :a, :b, :n) RETURNING id"),
                ("set", "UPDATE t SET b = :b WHERE id = :id"),
            ][..],
        ] {
            let needs = sink("mysql://w@h/od", operations);
            let have = mariadb_as_printed(&needs);
            let report = mariadb_report(&needs, &have, &columns);
            assert!(report.is_clean(), "{operations:?}: {:#?}", report.findings);
            assert!(!report.findings.is_empty(), "{operations:?}");
        }
        // The upsert's UPDATE and SELECT are needed, not excess.
        let needs = sink(
            "mysql://w@h/od",
            &[(
                "put",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON DUPLICATE KEY UPDATE b = :b",
            )],
        );
        let report = mariadb_report(&needs, &mariadb_as_printed(&needs), &columns);
        for line in [
            "UPDATE (`a`, `b`, `id`) ON `od`.`t`",
            "SELECT (`b`) ON `od`.`t`",
        ] {
            assert!(
                report
                    .findings
                    .iter()
                    .any(|f| f.severity == Severity::Ok && f.what.starts_with(line)),
                "{line}: {:#?}",
                report.findings
            );
        }
    }

    #[test]
    fn mariadb_returning_star_needs_the_table_level_select() {
        let star = sink(
            "mysql://w@h/od",
            &[("add", "INSERT INTO t (a) VALUES (:a) RETURNING *")],
        );
        let wanted = my_wanted(&Needs::sink(&star), "od");
        assert_eq!(wanted.len(), 1);
        assert_eq!(wanted[0].0, ("od".to_owned(), "t".to_owned()));
        assert_eq!(wanted[0].1.select, Some(None));
        let mut have = MyGrants::default();
        have.column
            .push(("od".into(), "t".into(), "a".into(), "INSERT".into(), false));
        have.column
            .push(("od".into(), "t".into(), "a".into(), "SELECT".into(), false));
        // Column-level SELECT is not enough.
        let report = mariadb_report(&star, &have, &["id", "a"]);
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.severity == Severity::Missing
                    && f.what.contains("GRANT SELECT ON `od`.`t` TO 'w'@'%';")),
            "{:#?}",
            report.findings
        );
        // The table-level one is needed, not excess.
        have.table
            .push(("od".into(), "t".into(), "SELECT".into(), false));
        let report = mariadb_report(&star, &have, &["id", "a"]);
        assert!(report.is_clean(), "{:#?}", report.findings);
        assert!(report.findings.contains(&Finding {
            severity: Severity::Ok,
            what: "SELECT ON `od`.`t`".into()
        }));
        // Without `RETURNING *` the same table-level SELECT is excess.
        let named = sink(
            "mysql://w@h/od",
            &[("add", "INSERT INTO t (a) VALUES (:a) RETURNING a")],
        );
        let report = mariadb_report(&named, &have, &["id", "a"]);
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.severity == Severity::Excess
                    && f.what
                        .starts_with("SELECT on the whole of `od`.`t`, also on `id`")),
            "{:#?}",
            report.findings
        );
        // A source reading some columns and a sink on the same account with `RETURNING *`.
        let source = SourceNeeds {
            name: "pms".into(),
            dialect: Dialect::MariaDb,
            account: crate::grants::Account::of_url("mysql://w@h/od"),
            tables: vec![ReadTable {
                name: "t".into(),
                columns: Some(vec!["id".into()]),
                key: vec!["id".into()],
            }],
            publication: String::new(),
            slot: String::new(),
        };
        let needs = Needs {
            source: Some(&source),
            writes: star.tables.iter().collect(),
        };
        let wanted = my_wanted(&needs, "od");
        assert_eq!(wanted.len(), 1);
        assert_eq!(wanted[0].1.select, Some(None));
    }

    #[test]
    fn postgres_returning_star_needs_the_table_level_select() {
        let needs = sink(
            "postgres://w@h/od",
            &[(
                "put",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON CONFLICT (id) DO UPDATE SET b = EXCLUDED.b RETURNING *",
            )],
        );
        let t = &needs.tables[0];
        assert_eq!(
            pg_write_wants(t),
            [
                ("INSERT", PgWant::Columns(vec!["a".into(), "id".into()])),
                // The upsert's target: needed, not excess.
                ("UPDATE", PgWant::Columns(vec!["b".into()])),
                ("SELECT", PgWant::Table),
            ]
        );
        assert_eq!(pg_allowed(&[t], "SELECT"), None);
        assert_eq!(pg_allowed(&[t], "UPDATE"), Some(set(&["b"])));
        assert_eq!(pg_allowed(&[t], "INSERT"), Some(set(&["a", "id"])));
        // Without `RETURNING *`: the columns read, no table-level SELECT.
        let needs = sink(
            "postgres://w@h/od",
            &[(
                "put",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON CONFLICT (id) DO UPDATE SET b = EXCLUDED.b RETURNING n",
            )],
        );
        let t = &needs.tables[0];
        assert!(matches!(
            pg_write_wants(t).last(),
            Some(("SELECT", PgWant::Columns(columns))) if columns.contains(&"n".to_owned())
        ));
        assert!(pg_allowed(&[t], "SELECT").is_some_and(|s| s.contains("n") && !s.contains("a")));
        // One operation's `RETURNING *` allows SELECT on every column for all of them;
        // an INSERT without a column list allows INSERT everywhere, and UPDATE is still
        // checked.
        let needs = sink(
            "postgres://w@h/od",
            &[
                ("add", "INSERT INTO t VALUES (:id, :a)"),
                ("set", "UPDATE t SET a = :a WHERE id = :id RETURNING *"),
            ],
        );
        let t = &needs.tables[0];
        assert_eq!(pg_write_wants(t)[0], ("INSERT", PgWant::EveryColumn));
        assert_eq!(pg_allowed(&[t], "INSERT"), None);
        assert_eq!(pg_allowed(&[t], "SELECT"), None);
        assert_eq!(pg_allowed(&[t], "UPDATE"), Some(set(&["a"])));
    }

    #[test]
    fn firebird_returning_star_needs_select() {
        let writes = TableWrites {
            table: "APPOINTMENT".into(),
            insert: Some(Some(set(&["APTNUM"]))),
            select_all: true,
            ..TableWrites::default()
        };
        let needs = Needs {
            source: None,
            writes: vec![&writes],
        };
        let wants = fb_wants(&needs, false);
        assert_eq!(wants.len(), 1);
        assert_eq!(wants[0].privileges, ['I', 'S'].into_iter().collect());
        let grant = |privilege| FbGrant {
            role: None,
            privilege,
            relation: "APPOINTMENT".into(),
            grant_option: false,
        };
        let relations = [("APPOINTMENT".to_owned(), "SYSDBA".to_owned())];
        let report = firebird_report("WRITER", &[grant('I'), grant('S')], &relations, &wants);
        assert!(report.is_clean(), "{:#?}", report.findings);
        let report = firebird_report("WRITER", &[grant('I')], &relations, &wants);
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.severity == Severity::Missing
                    && f.what.starts_with("SELECT ON APPOINTMENT")),
            "{:#?}",
            report.findings
        );
    }

    #[test]
    fn sqlite_writes_with_returning_star_want_a_writable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pms.db");
        std::fs::write(&path, b"").unwrap();
        let needs = sink(
            "sqlite:pms.db",
            &[("add", "INSERT INTO t (a) VALUES (:a) RETURNING *")],
        );
        assert!(needs.tables[0].select_all);
        let report = check_sqlite(&path, &Needs::sink(&needs));
        assert!(report.is_clean(), "{:#?}", report.findings);
    }
}
