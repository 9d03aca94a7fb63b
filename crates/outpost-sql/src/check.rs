//! `outpost sql check`: connects as the configured user and compares what it may do with
//! what the config needs ([`crate::grants`]): missing grants (per table, column and
//! replication right) and excess ones (superuser, role or database creation, ownership of
//! captured tables, writes no operation needs).
//!
//! PostgreSQL asks the server itself (`pg_roles`, `has_table_privilege`,
//! `has_column_privilege`, `pg_has_role`); SQLite looks at the file. Other dialects are
//! reported as not checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::error::pg_message;
use crate::grants::{Dialect, ReadTable, SinkNeeds, SourceNeeds, TableWrites};
use crate::ident::{quote, split_qualified};
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
    for writes in &needs.writes {
        let (schema, name) = split_qualified(&writes.table);
        // A table the source also reads was checked (writes included) above.
        let read_too = needs.source.is_some_and(|s| {
            s.tables.iter().any(|t| {
                let (ts, tn) = split_qualified(&t.name);
                tn == name && ts.unwrap_or("public") == schema.unwrap_or("public")
            })
        });
        if !read_too {
            check_pg_writes(&client, writes, needs, &quoted_user, &mut report).await?;
        }
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
    let extra: Vec<String> = select
        .iter()
        .filter(|(c, ok)| *ok && !wanted.contains(c))
        .map(|(c, _)| c.clone())
        .collect();
    let writes = needs.writes_to(schema, name);
    let extra: Vec<String> = extra
        .into_iter()
        .filter(|c| !writes.iter().any(|w| w.select.contains(c)))
        .collect();
    if !extra.is_empty() {
        report.push(
            Severity::Excess,
            format!(
                "SELECT on columns of {qualified} not captured: {}",
                names(&extra)
            ),
        );
    }
    check_pg_write_excess(client, oid, &qualified, &writes, user, report).await
}

/// Flags writes on a table beyond what `writes` need.
async fn check_pg_write_excess(
    client: &Client,
    oid: u32,
    qualified: &str,
    writes: &[&TableWrites],
    user: &str,
    report: &mut CheckReport,
) -> Result<(), SqlError> {
    for privilege in ["INSERT", "UPDATE"] {
        let allowed: Option<BTreeSet<String>> = match privilege {
            "INSERT" => {
                let mut all = BTreeSet::new();
                for w in writes {
                    match &w.insert {
                        Some(None) => return Ok(()),
                        Some(Some(columns)) => all.extend(columns.iter().cloned()),
                        None => {}
                    }
                }
                Some(all)
            }
            _ => Some(
                writes
                    .iter()
                    .flat_map(|w| w.update.iter().cloned())
                    .collect(),
            ),
        };
        let allowed = allowed.unwrap_or_default();
        let extra: Vec<String> = pg_column_privileges(client, oid, privilege)
            .await?
            .into_iter()
            .filter(|(c, ok)| *ok && !allowed.contains(c))
            .map(|(c, _)| c)
            .collect();
        if !extra.is_empty() {
            report.push(
                Severity::Excess,
                format!(
                    "{privilege} ({}) on {qualified}, which nothing in the config writes (REVOKE {privilege} ON TABLE {qualified} FROM {user};)",
                    names(&extra)
                ),
            );
        }
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

async fn check_pg_writes(
    client: &Client,
    writes: &TableWrites,
    needs: &Needs<'_>,
    user: &str,
    report: &mut CheckReport,
) -> Result<(), SqlError> {
    let (schema, name) = split_qualified(&writes.table);
    let schema = schema.unwrap_or("public");
    let qualified = format!("{}.{}", quote(schema), quote(name));
    let Some((oid, owns)) = pg_table(client, schema, name).await? else {
        report.push(
            Severity::Missing,
            format!(
                "table {qualified} (written by {}) does not exist",
                writes.operations.join(", ")
            ),
        );
        return Ok(());
    };
    if owns {
        report.push(
            Severity::Excess,
            format!("owns {qualified} (or is a member of its owner)"),
        );
    }
    let mut want: Vec<(&str, Option<Vec<String>>)> = Vec::new();
    match &writes.insert {
        Some(Some(columns)) => want.push(("INSERT", Some(columns.iter().cloned().collect()))),
        Some(None) => want.push(("INSERT", None)),
        None => {}
    }
    if !writes.update.is_empty() {
        want.push(("UPDATE", Some(writes.update.iter().cloned().collect())));
    }
    if !writes.select.is_empty() {
        want.push(("SELECT", Some(writes.select.iter().cloned().collect())));
    }
    for (privilege, columns) in want {
        let have = pg_column_privileges(client, oid, privilege).await?;
        let columns = columns.unwrap_or_else(|| have.iter().map(|(c, _)| c.clone()).collect());
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
    let all = needs.writes_to(schema, name);
    check_pg_write_excess(client, oid, &qualified, &all, user, report).await
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

/// Whether `check` can look at this dialect yet.
pub fn supported(dialect: Dialect) -> bool {
    matches!(dialect, Dialect::Postgres | Dialect::Sqlite)
}

async fn connect(url: &str, password: Option<String>) -> Result<Client, SqlError> {
    let shown = redact_url(url);
    let mut config = tokio_postgres::Config::from_str(url).map_err(|_| SqlError::Connect {
        url: shown.clone(),
        message: "not a valid PostgreSQL URL".into(),
    })?;
    if let Some(password) = password {
        config.password(password);
    }
    config.connect_timeout(Duration::from_secs(10));
    config.application_name("outpost sql check");
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|err| SqlError::Connect {
            url: shown,
            message: pg_message(&err),
        })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "check connection ended");
        }
    });
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
}
