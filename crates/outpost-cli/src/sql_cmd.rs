//! `outpost sql grants|check|status`: the least-privilege script for each SQL source and
//! write-back sink of an agent config, a check of what the configured users really may
//! do, and each source's snapshot progress and lag.
//!
//! The config is read as plain TOML here (only `[[source]]`/`[[sink]]` entries of
//! `kind = "sql"` and `data_dir`), so a config the agent would refuse for another reason
//! still gets its script. Passwords are never printed: scripts carry a placeholder, and
//! URLs are shown redacted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use outpost_queue::Queue;
use outpost_sql::check::{self, CheckReport, Needs, Severity};
use outpost_sql::grants::{self, Dialect, SinkNeeds, SourceNeeds};
use outpost_sql::ident::{pg_object_name, quote, split_qualified};
use outpost_sql::{redact_url, SourceConfig};

/// What to do with the SQL connectors of a config.
#[derive(Subcommand)]
pub enum SqlAction {
    /// Print the least-privilege CREATE USER / GRANT script for each SQL source and sink.
    Grants {
        /// Only this source or sink.
        #[arg(long)]
        source: Option<String>,
    },
    /// Connect as each configured user and report missing and excess grants; exits
    /// non-zero when anything is wrong.
    Check {
        /// Only this source or sink.
        #[arg(long)]
        source: Option<String>,
    },
    /// Each PostgreSQL source's snapshot progress (a progress bar per table) and WAL lag,
    /// from the database and the agent's stored position.
    Status {
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Keep updating until every snapshot is done.
        #[arg(long)]
        follow: bool,
    },
    /// Forget where a SQL source stopped, so it takes a new snapshot: the way out when
    /// the database no longer holds the changes after the stored position (binlog
    /// purged, change tracking cleaned up). A running agent restarts the source.
    Reset {
        /// The source's name.
        source: String,
    },
}

/// One `[[source]] kind = "sql"`.
struct Source {
    name: String,
    config: SourceConfig,
}

/// One `[[sink]] kind = "sql"`, read defensively: url, password settings, operations.
struct Sink {
    name: String,
    url: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    operations: Vec<(String, String)>,
}

impl Sink {
    fn password(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.password_file {
            return Ok(Some(outpost_sql::config::read_password_file(path)?));
        }
        if let Some(var) = &self.password_env {
            return Ok(Some(std::env::var(var).with_context(|| {
                format!("sink {}: password_env {var}: not set", self.name)
            })?));
        }
        Ok(None)
    }
}

/// The SQL parts of an agent config.
struct SqlConfig {
    base: PathBuf,
    data_dir: PathBuf,
    sources: Vec<Source>,
    sinks: Vec<Sink>,
}

fn load(path: &Path, only: Option<&str>) -> anyhow::Result<SqlConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let anchor = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let data_dir = anchor(PathBuf::from(
        doc.get("data_dir")
            .and_then(|v| v.as_str())
            .unwrap_or("outpost-data"),
    ));
    let entries = |key: &str| -> Vec<toml::Table> {
        doc.get(key)
            .and_then(|v| v.as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_table().cloned())
                    .filter(|t| t.get("kind").and_then(|k| k.as_str()) == Some("sql"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let name_of = |t: &toml::Table| {
        t.get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let wanted = |name: &str| only.is_none_or(|only| only == name);
    let mut sources = Vec::new();
    for (index, mut table) in entries("source").into_iter().enumerate() {
        let name = name_of(&table);
        if !wanted(&name) {
            continue;
        }
        table.remove("name");
        table.remove("kind");
        let mut config: SourceConfig = toml::Value::Table(table).try_into().map_err(|err| {
            anyhow::anyhow!("{}: source[{index}] ({name}): {err}", path.display())
        })?;
        config.password_file = config.password_file.map(anchor);
        sources.push(Source { name, config });
    }
    let mut sinks = Vec::new();
    for (index, table) in entries("sink").into_iter().enumerate() {
        let name = name_of(&table);
        if !wanted(&name) {
            continue;
        }
        let url = table
            .get("url")
            .and_then(|v| v.as_str())
            .with_context(|| {
                format!(
                    "{}: sink[{index}] ({name}): url: expected a string",
                    path.display()
                )
            })?
            .to_owned();
        let mut operations = Vec::new();
        if let Some(ops) = table.get("operations").and_then(|v| v.as_table()) {
            for (op, value) in ops {
                let sql = match value {
                    toml::Value::String(sql) => Some(sql.clone()),
                    toml::Value::Table(t) => ["sql", "statement", "query"]
                        .iter()
                        .find_map(|k| t.get(*k).and_then(|v| v.as_str()).map(str::to_owned)),
                    _ => None,
                };
                let sql = sql.with_context(|| {
                    format!(
                        "{}: sink {name}: operations.{op}: expected the statement as a string",
                        path.display()
                    )
                })?;
                operations.push((op.clone(), sql));
            }
        }
        sinks.push(Sink {
            name,
            url,
            password_file: table
                .get("password_file")
                .and_then(|v| v.as_str())
                .map(|p| anchor(PathBuf::from(p))),
            password_env: table
                .get("password_env")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            operations,
        });
    }
    if sources.is_empty() && sinks.is_empty() {
        match only {
            Some(only) => bail!("{}: no SQL source or sink named {only:?}", path.display()),
            None => bail!(
                "{}: no [[source]] or [[sink]] with kind = \"sql\"",
                path.display()
            ),
        }
    }
    Ok(SqlConfig {
        base,
        data_dir,
        sources,
        sinks,
    })
}

fn sink_needs(sink: &Sink) -> anyhow::Result<SinkNeeds> {
    Ok(SinkNeeds::of_operations(
        &sink.name,
        &sink.url,
        sink.operations
            .iter()
            .map(|(op, sql)| (op.as_str(), sql.as_str())),
    )?)
}

/// Runs one `outpost sql …` action.
pub async fn run(config_path: &Path, action: SqlAction) -> anyhow::Result<()> {
    match action {
        SqlAction::Grants { source } => {
            let config = load(config_path, source.as_deref())?;
            print!("{}", grants_text(&config)?);
            Ok(())
        }
        SqlAction::Check { source } => {
            let config = load(config_path, source.as_deref())?;
            check_all(&config).await
        }
        SqlAction::Status { source, follow } => {
            let config = load(config_path, source.as_deref())?;
            status(&config, follow).await
        }
        SqlAction::Reset { source } => {
            let config = load(config_path, Some(&source))?;
            if config.sources.is_empty() {
                anyhow::bail!(
                    "{}: no [[source]] with kind = \"sql\" and name = {source:?}",
                    config_path.display()
                );
            }
            reset(&config.data_dir, &source).await
        }
    }
}

/// Removes the position stored for `source` (in the queue, and an older version's file).
async fn reset(data_dir: &Path, source: &str) -> anyhow::Result<()> {
    let in_queue = match Queue::open_existing(data_dir) {
        Ok(queue) => {
            let forgotten = queue.forget_source_state(&format!("sql:{source}")).await;
            queue.close().await?;
            forgotten?
        }
        Err(outpost_queue::QueueError::Missing { .. }) => false,
        Err(err) => return Err(err.into()),
    };
    let legacy = data_dir.join("sql").join(source).join("position");
    let in_file = match std::fs::remove_file(&legacy) {
        Ok(()) => true,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(err).with_context(|| format!("remove {}", legacy.display())),
    };
    if in_queue || in_file {
        println!("source {source}: stored position forgotten; it takes a new snapshot when it next starts (a running agent restarts it at its next batch)");
    } else {
        println!("source {source}: no stored position (it takes a snapshot when it starts)");
    }
    Ok(())
}

fn grants_text(config: &SqlConfig) -> anyhow::Result<String> {
    let mut out = String::new();
    for source in &config.sources {
        let needs = SourceNeeds::of_config(&source.name, &source.config)?;
        let mut needs = needs;
        if needs.dialect == Dialect::Sqlite {
            if let Some(path) = check::sqlite_path(&source.config.url, &config.base) {
                needs.account.database = path.display().to_string();
            }
        }
        out.push_str(&grants::source_script(&needs));
        out.push('\n');
    }
    for sink in &config.sinks {
        out.push_str(&grants::sink_script(&sink_needs(sink)?));
        out.push('\n');
    }
    Ok(out)
}

/// Same database and user: one account, whose needs are the union.
fn same_account(a: &grants::Account, b: &grants::Account, da: Dialect, db: Dialect) -> bool {
    da == db && a.user == b.user && a.database == b.database && a.host == b.host
}

async fn check_all(config: &SqlConfig) -> anyhow::Result<()> {
    let sinks: Vec<(&Sink, SinkNeeds)> = config
        .sinks
        .iter()
        .map(|s| Ok((s, sink_needs(s)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut problems = 0usize;
    let mut checked_sinks = Vec::new();
    for source in &config.sources {
        let needs = SourceNeeds::of_config(&source.name, &source.config)?;
        let mut all = Needs::source(&needs);
        for (sink, sink_needs) in &sinks {
            if same_account(
                &needs.account,
                &sink_needs.account,
                needs.dialect,
                sink_needs.dialect,
            ) {
                all.writes.extend(sink_needs.tables.iter());
                checked_sinks.push(sink.name.clone());
            }
        }
        let title = format!(
            "source {} ({}, user {} on {})",
            source.name,
            needs.dialect.label(),
            quote(&needs.account.user),
            redact_url(&source.config.url)
        );
        let report = match needs.dialect {
            Dialect::Postgres => {
                let password = source.config.password()?;
                check::check_postgres(&source.config.url, password, &all)
                    .await
                    .with_context(|| format!("source {}", source.name))
            }
            Dialect::MariaDb => {
                let password = source.config.password()?;
                check::check_mysql(&source.config.url, password, &all)
                    .await
                    .with_context(|| format!("source {}", source.name))
            }
            Dialect::Firebird => {
                let password = source.config.password()?;
                let triggers = source.config.mode != outpost_sql::Mode::Poll;
                check::check_firebird(&source.config.url, password, &all, triggers)
                    .await
                    .with_context(|| format!("source {}", source.name))
            }
            Dialect::Sqlite => Ok(check::sqlite_path(&source.config.url, &config.base)
                .map(|path| check::check_sqlite(&path, &all))
                .unwrap_or_default()),
            other => Err(anyhow::anyhow!(
                "source {}: checking {} grants is not implemented yet; apply `outpost sql grants` and compare by hand",
                source.name,
                other.label()
            )),
        };
        problems += print_report(&title, report);
    }
    for (sink, needs) in &sinks {
        if checked_sinks.contains(&sink.name) {
            continue;
        }
        let title = format!(
            "sink {} ({}, user {} on {})",
            sink.name,
            needs.dialect.label(),
            quote(&needs.account.user),
            redact_url(&sink.url)
        );
        let all = Needs::sink(needs);
        let report = match needs.dialect {
            Dialect::Postgres => match sink.password() {
                Ok(password) => check::check_postgres(&sink.url, password, &all)
                    .await
                    .with_context(|| format!("sink {}", sink.name)),
                Err(err) => Err(err),
            },
            Dialect::MariaDb => match sink.password() {
                Ok(password) => check::check_mysql(&sink.url, password, &all)
                    .await
                    .with_context(|| format!("sink {}", sink.name)),
                Err(err) => Err(err),
            },
            Dialect::Firebird => match sink.password() {
                Ok(password) => check::check_firebird(&sink.url, password, &all, false)
                    .await
                    .with_context(|| format!("sink {}", sink.name)),
                Err(err) => Err(err),
            },
            Dialect::Sqlite => Ok(check::sqlite_path(&sink.url, &config.base)
                .map(|path| check::check_sqlite(&path, &all))
                .unwrap_or_default()),
            other => Err(anyhow::anyhow!(
                "sink {}: checking {} grants is not implemented yet",
                sink.name,
                other.label()
            )),
        };
        problems += print_report(&title, report);
    }
    if problems > 0 {
        bail!("{problems} grant problem(s): see above; `outpost sql grants` prints what is needed");
    }
    println!("every SQL user has exactly the grants its config needs");
    Ok(())
}

/// Prints a report; returns the number of problems (an unreachable database is one).
fn print_report(title: &str, report: anyhow::Result<CheckReport>) -> usize {
    println!("{title}:");
    match report {
        Ok(report) => {
            for finding in &report.findings {
                println!("  {} {}", finding.severity.label(), finding.what);
            }
            report
                .findings
                .iter()
                .filter(|f| f.severity != Severity::Ok)
                .count()
        }
        Err(err) => {
            println!("  ERROR   {}", crate::describe(&err));
            1
        }
    }
}

/// The position the agent stored for `source` (in its queue, or in the file older versions
/// kept), if any.
async fn stored_position(queue: Option<&Queue>, data_dir: &Path, source: &str) -> Option<String> {
    if let Some(queue) = queue {
        if let Ok(Some(text)) = queue.source_state(&format!("sql:{source}")).await {
            return Some(text);
        }
    }
    std::fs::read_to_string(data_dir.join("sql").join(source).join("position")).ok()
}

/// The snapshot position in a stored position: table index and last key, if still
/// snapshotting.
fn stored_snapshot(position: Option<&str>) -> Option<(usize, Option<Vec<String>>)> {
    let value: serde_json::Value = serde_json::from_str(position?.trim()).ok()?;
    let table = usize::try_from(value.get("table")?.as_u64()?).ok()?;
    let after = value.get("after").and_then(|a| {
        a.as_array()?
            .iter()
            .map(|k| k.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
    });
    Some((table, after))
}

async fn pg_connect(config: &SourceConfig) -> anyhow::Result<tokio_postgres::Client> {
    let mut pg = tokio_postgres::Config::from_str(&config.url)
        .map_err(|_| anyhow::anyhow!("{}: not a valid PostgreSQL URL", redact_url(&config.url)))?;
    if let Some(password) = config.password()? {
        pg.password(password);
    }
    pg.connect_timeout(Duration::from_secs(10));
    pg.application_name("outpost sql status");
    let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(|err| {
        anyhow::anyhow!("connect to {}: {}", redact_url(&config.url), pg_text(&err))
    })?;
    tokio::spawn(connection);
    Ok(client)
}

fn pg_text(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => err.to_string(),
    }
}

/// Estimated rows of each configured table, and rows at or before the stored key of the
/// table being read.
async fn snapshot_figures(
    client: &tokio_postgres::Client,
    config: &SourceConfig,
    stored: Option<&(usize, Option<Vec<String>>)>,
) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    for (index, table) in config.tables.iter().enumerate() {
        let (schema, name) = split_qualified(&table.name);
        let schema = schema.unwrap_or("public");
        let estimate: i64 = client
            .query_opt(
                "SELECT GREATEST(c.reltuples::bigint, COALESCE(s.n_live_tup, 0)) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &name],
            )
            .await
            .map_err(|err| anyhow::anyhow!("estimate rows of {}: {}", table.name, pg_text(&err)))?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let estimate = estimate.max(0) as u64;
        let done = match stored {
            None => estimate,
            Some((current, _)) if index < *current => estimate,
            Some((current, _)) if index > *current => 0,
            Some((_, None)) => 0,
            Some((_, Some(after))) => {
                let mut casts = Vec::new();
                for (i, key) in table.key.iter().enumerate() {
                    let ty: String = client
                        .query_one(
                            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                             JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                             WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3",
                            &[&schema, &name, key],
                        )
                        .await
                        .map_err(|err| anyhow::anyhow!("look up {}.{key}: {}", table.name, pg_text(&err)))?
                        .get(0);
                    casts.push(format!("${}::text::{ty}", i + 1));
                }
                let keys: Vec<String> = table.key.iter().map(|k| quote(k)).collect();
                let sql = format!(
                    "SELECT count(*) FROM {}.{} WHERE ({}) <= ({})",
                    quote(schema),
                    quote(name),
                    keys.join(", "),
                    casts.join(", ")
                );
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = after
                    .iter()
                    .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let count: i64 = client
                    .query_one(&sql, &params)
                    .await
                    .map_err(|err| {
                        anyhow::anyhow!("count rows of {}: {}", table.name, pg_text(&err))
                    })?
                    .get(0);
                count.max(0) as u64
            }
        };
        out.push((table.name.clone(), done, estimate.max(done)));
    }
    Ok(out)
}

async fn wal_behind(client: &tokio_postgres::Client, slot: &str) -> anyhow::Result<Option<i64>> {
    Ok(client
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|err| anyhow::anyhow!("read slot {slot}: {}", pg_text(&err)))?
        .and_then(|r| r.get(0)))
}

async fn status(config: &SqlConfig, follow: bool) -> anyhow::Result<()> {
    for source in &config.sources {
        if Dialect::of_url(&source.config.url) != Some(Dialect::Postgres) {
            println!("source {}: status is shown for PostgreSQL sources only (see the agent's health report)", source.name);
            continue;
        }
        let client = pg_connect(&source.config)
            .await
            .with_context(|| format!("source {}", source.name))?;
        let slot = source
            .config
            .slot
            .clone()
            .unwrap_or_else(|| pg_object_name(&source.name));
        // The agent may not have made its queue yet: then nothing is stored.
        let queue = Queue::open_existing(&config.data_dir).ok();
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>16} [{bar:40}] {pos}/{len} rows {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
        loop {
            let position = stored_position(queue.as_ref(), &config.data_dir, &source.name).await;
            let has_position = position.is_some();
            let stored = stored_snapshot(position.as_deref());
            let snapshotting = stored.is_some() || !has_position;
            let figures = if snapshotting {
                let pending = (!has_position).then_some((0usize, None));
                snapshot_figures(
                    &client,
                    &source.config,
                    stored.as_ref().or(pending.as_ref()),
                )
                .await?
            } else {
                Vec::new()
            };
            for (table, done, total) in &figures {
                let bar = bars.entry(table.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(*total));
                    bar.set_style(style.clone());
                    bar.set_prefix(table.clone());
                    bar
                });
                bar.set_length(*total);
                bar.set_position(*done);
            }
            if !snapshotting || !follow {
                for bar in bars.values() {
                    bar.abandon();
                }
                let behind = wal_behind(&client, &slot).await?;
                let phase = match (has_position, snapshotting) {
                    (false, _) => "not started (no stored position)",
                    (true, true) => "snapshot running",
                    (true, false) => "streaming",
                };
                println!(
                    "source {}: {phase}; slot {slot}: {}",
                    source.name,
                    behind.map_or("not created yet".to_owned(), |b| format!(
                        "{b} WAL bytes behind"
                    ))
                );
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sinks_are_read_defensively_and_filtered_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            r#"data_dir = "d"
[[source]]
name = "pms"
kind = "sql"
url = "postgres://reader:secret@127.0.0.1/pms"
tables = [ { name = "patient", key = ["patnum"] } ]
[[sink]]
name = "pms_write"
kind = "sql"
url = "postgres://writer@127.0.0.1/pms"
operations = { book = "INSERT INTO appointment (patnum) VALUES (:p)", other = { sql = "DELETE FROM appointment WHERE aptnum = :id" } }
[[sink]]
name = "events"
kind = "jsonl"
path = "e.jsonl"
"#,
        )
        .unwrap();
        let config = load(&path, None).unwrap();
        assert_eq!((config.sources.len(), config.sinks.len()), (1, 1));
        let text = grants_text(&config).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains("GRANT DELETE ON TABLE \"appointment\" TO \"writer\";"),
            "{text}"
        );
        let only = load(&path, Some("pms_write")).unwrap();
        assert_eq!((only.sources.len(), only.sinks.len()), (0, 1));
        assert!(load(&path, Some("nope")).is_err());
    }
}
