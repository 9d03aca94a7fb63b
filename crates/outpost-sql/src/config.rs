//! `[[source]] kind = "sql"`: the database, its tables, the capture mode and credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::redact_url;
use crate::SqlError;

/// A SQL source's settings, as written in the agent's TOML (without `name` and `kind`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `postgres://user[:password]@host:port/db` or `sqlite:PATH`. A password here works
    /// but `password_file` or `password_env` keep it out of the config.
    pub url: String,
    /// The tables to capture.
    pub tables: Vec<TableConfig>,
    /// `cdc` (the database's change log; PostgreSQL) or `poll` (watermark column; SQLite).
    #[serde(default)]
    pub mode: Mode,
    /// Poll mode: how often to look for changes, e.g. `"5s"`, `"500ms"` or seconds.
    #[serde(default = "default_interval", deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Poll mode: the column that grows on every insert and update (a timestamp or a
    /// counter), unless a table names its own.
    #[serde(default)]
    pub watermark: Option<String>,
    /// A file holding the password (its mode must not give group or others access).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// CDC: how long captured tables may stay quiet before the replication slot is moved
    /// up to the current WAL position anyway, so that it never holds WAL without bound.
    #[serde(default = "default_heartbeat", deserialize_with = "de_duration")]
    pub heartbeat: Duration,
    /// Snapshot rows per batch (MariaDB, Firebird: per query too); PostgreSQL reads each
    /// table in one query and cuts its snapshot items at this many events or 2 MiB.
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: u32,
    /// CDC: changes asked of the slot per read; a batch always ends at a commit.
    #[serde(default = "default_max_changes")]
    pub max_changes: u32,
    /// CDC: the replication slot's name; default `outpost_<source name>`.
    #[serde(default)]
    pub slot: Option<String>,
    /// CDC: the publication's name; default `outpost_<source name>`.
    #[serde(default)]
    pub publication: Option<String>,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &redact_url(&self.url))
            .field("tables", &self.tables)
            .field("mode", &self.mode)
            .field("interval", &self.interval)
            .field("watermark", &self.watermark)
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

/// One captured table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `table` or `schema.table`.
    pub name: String,
    /// The columns that identify a row (normally the primary key). Each must be NOT NULL
    /// in the database: the source refuses to start otherwise.
    pub key: Vec<String>,
    /// Only these columns (the key columns are always included); absent: all.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Poll mode: this table's watermark column, instead of the source's.
    #[serde(default)]
    pub watermark: Option<String>,
}

/// How changes are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The database's own change log (PostgreSQL logical decoding).
    #[default]
    Cdc,
    /// Rows whose watermark grew since the last look, plus a delete check.
    Poll,
}

/// Which database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite:PATH`.
    Sqlite(PathBuf),
    /// `mysql://` or `mariadb://` (binlog change capture).
    MySql,
    /// `firebird://user:password@host:port//path/db.fdb` (trigger capture).
    Firebird,
    /// `sqlserver://` or `mssql://` (change tracking).
    SqlServer,
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_chunk_rows() -> u32 {
    10_000
}
fn default_max_changes() -> u32 {
    2000
}

/// `"500ms"`, `"5s"`, `"2m"`, or a number of seconds.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(secs) => Ok(Duration::from_secs(secs)),
        Raw::Text(text) => parse_duration(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a duration like \"500ms\", \"5s\" or \"2m\", found {text:?}"
            ))
        }),
    }
}

/// Parses `"500ms"`, `"5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

impl SourceConfig {
    /// Which database the URL names; `base` anchors a relative SQLite path.
    pub fn target(&self, base: &Path) -> Result<Target, SqlError> {
        if self.url.starts_with("postgres://") || self.url.starts_with("postgresql://") {
            Ok(Target::Postgres)
        } else if self.url.starts_with("mysql://") || self.url.starts_with("mariadb://") {
            Ok(Target::MySql)
        } else if self.url.starts_with("firebird://") {
            Ok(Target::Firebird)
        } else if self.url.starts_with("sqlserver://") || self.url.starts_with("mssql://") {
            Ok(Target::SqlServer)
        } else if let Some(path) = self.url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            let path = PathBuf::from(path);
            Ok(Target::Sqlite(if path.is_absolute() {
                path
            } else {
                base.join(path)
            }))
        } else {
            let scheme = self.url.split(':').next().unwrap_or_default();
            Err(SqlError::Config(format!(
                "url: expected postgres://…, mysql://… (or mariadb://…), firebird://…, sqlserver://… or sqlite:PATH, found a {scheme:?} URL"
            )))
        }
    }

    /// Checks what can be checked without connecting: URL scheme, mode, key columns,
    /// watermarks. `base` is the config file's folder.
    pub fn validate(&self, base: &Path) -> Result<(), SqlError> {
        let target = self.target(base)?;
        if self.tables.is_empty() {
            return Err(SqlError::Config(
                "tables: expected at least one table, like { name = \"patient\", key = [\"patnum\"] }".into(),
            ));
        }
        for (index, table) in self.tables.iter().enumerate() {
            if table.name.trim().is_empty() || table.name.split('.').count() > 2 {
                return Err(SqlError::Config(format!(
                    "tables[{index}].name: expected \"table\" or \"schema.table\", found {:?}",
                    table.name
                )));
            }
            if table.key.is_empty() {
                return Err(SqlError::Config(format!(
                    "tables[{index}].key: expected at least one key column for table {:?}",
                    table.name
                )));
            }
            if self.mode == Mode::Poll && table.watermark.is_none() && self.watermark.is_none() {
                return Err(SqlError::Config(format!(
                    "tables[{index}].watermark: mode = \"poll\" needs a watermark column (for table {:?}, or `watermark` for all)",
                    table.name
                )));
            }
        }
        match (&target, self.mode) {
            (Target::Sqlite(_), Mode::Cdc) => Err(SqlError::Config(
                "mode: SQLite has no change log; use mode = \"poll\" with a watermark column".into(),
            )),
            (Target::MySql, Mode::Poll) => Err(SqlError::Config(
                "mode: for MariaDB/MySQL use mode = \"cdc\" (the binlog); \"poll\" is for SQLite".into(),
            )),
            (Target::SqlServer, Mode::Poll) => Err(SqlError::Config(
                "mode: for SQL Server use mode = \"cdc\" (change tracking)".into(),
            )),
            (Target::Firebird, _) if self.tables.iter().any(|t| t.name.contains('.')) => {
                Err(SqlError::Config(
                    "tables: Firebird has no schemas; name tables without a \"schema.\" prefix"
                        .into(),
                ))
            }
            (Target::Postgres, Mode::Poll) => Err(SqlError::Config(
                "mode: for PostgreSQL use mode = \"cdc\" (logical decoding); \"poll\" is for SQLite".into(),
            )),
            _ => Ok(()),
        }?;
        if self.chunk_rows == 0 {
            return Err(SqlError::Config("chunk_rows: expected at least 1".into()));
        }
        if self.max_changes == 0 {
            return Err(SqlError::Config("max_changes: expected at least 1".into()));
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(SqlError::Config(
                "password_env: expected either password_file or password_env, not both".into(),
            ));
        }
        Ok(())
    }

    /// The password from `password_file` or `password_env`, if either is set.
    pub fn password(&self) -> Result<Option<String>, SqlError> {
        if let Some(path) = &self.password_file {
            return read_password_file(path).map(Some);
        }
        if let Some(var) = &self.password_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|_| SqlError::PasswordEnv(var.clone()));
        }
        Ok(None)
    }
}

/// Reads a password file, refusing one that group or others may read.
pub fn read_password_file(path: &Path) -> Result<String, SqlError> {
    let fail = |message: String| SqlError::PasswordFile {
        path: path.to_owned(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|err| fail(err.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "mode {mode:04o} lets group or others read it; run `chmod 600` on it"
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(|err| fail(err.to_string()))?;
    let password = text.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err(fail("it is empty".into()));
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(text: &str) -> SourceConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn the_issue_shape_parses_and_validates() {
        let config = parse(
            r#"url = "postgres://outpost:secret@127.0.0.1:5433/pms"
               mode = "cdc"
               tables = [ { name = "patient", key = ["patnum"] },
                          { name = "appointment", key = ["aptnum"] } ]"#,
        );
        config.validate(Path::new(".")).unwrap();
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn poll_needs_a_watermark_and_sqlite_needs_poll() {
        let config = parse(
            r#"url = "sqlite:pms.db"
            mode = "poll"
            tables = [ { name = "patient", key = ["patnum"] } ]"#,
        );
        let err = config.validate(Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("watermark"), "{err}");
        let config = parse(
            r#"url = "sqlite:pms.db"
            tables = [ { name = "patient", key = ["patnum"] } ]"#,
        );
        let err = config.validate(Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("poll"), "{err}");
        let config = parse(
            r#"url = "oracle://u:pw@h/db"
            tables = [ { name = "patient", key = ["patnum"] } ]"#,
        );
        let err = config.validate(Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("oracle") && !err.contains("pw"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn password_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_password_file(&path).unwrap_err().to_string();
        assert!(err.contains("0644") && !err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password_file(&path).unwrap(), "s3cret");
    }
}
