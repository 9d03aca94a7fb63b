//! Loading and checking the policy file.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use toml::{Table, Value};

use crate::{Capability, MaintenanceWindow, PolicyError};

/// The largest policy file read; a real one is a few hundred bytes.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;

/// A loaded, checked policy. It has no `Serialize` on purpose: the policy never leaves the
/// agent (see the crate docs).
#[derive(Debug, Clone)]
pub struct Policy {
    /// The file it came from, for messages.
    path: PathBuf,
    /// SHA-256 of the file's bytes, lowercase hex.
    digest: String,
    /// Whether every job waits for a local approval.
    access: Access,
    /// Where `"window"` grants may run.
    window: Option<MaintenanceWindow>,
    /// One slot per [`Capability`], by [`Capability::index`]; `None` is refused.
    grants: [Option<Grant>; Capability::ALL.len()],
}

/// The policy's `access` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Grants written `true` run without waiting (the default when `access` is absent).
    Unattended,
    /// Every allowed job waits for a local approval.
    Approval,
}

/// What the policy allows for one capability.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The capability this grant is for.
    capability: Capability,
    /// The grant's key, `allow."files.read"`: the rule of an allowed decision.
    key: String,
    /// The rule reported when this grant asks for approval.
    approval_rule: String,
    /// Every job for this capability waits for a local approval.
    is_approval_only: bool,
    /// Jobs run only inside the maintenance window.
    is_window_only: bool,
    /// `files.*`: the folders jobs may reach; empty for other capabilities.
    roots: Vec<PathBuf>,
    /// `sql.query`: the tables, columns and row limit.
    sql: Option<SqlGrant>,
}

impl Grant {
    /// The capability this grant is for.
    pub fn capability(&self) -> Capability {
        self.capability
    }

    /// Whether every job for this capability waits for a local approval, whatever `access`
    /// says.
    pub fn is_approval_only(&self) -> bool {
        self.is_approval_only
    }

    /// Whether jobs may run only inside the maintenance window.
    pub fn is_window_only(&self) -> bool {
        self.is_window_only
    }

    /// For `files.*`, the roots to pass to [`crate::resolve_under_roots`] again right
    /// before the job touches the file; empty for other capabilities.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// For `sql.query`, the tables, columns and row limit.
    pub fn sql(&self) -> Option<&SqlGrant> {
        self.sql.as_ref()
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn approval_rule(&self) -> &str {
        &self.approval_rule
    }
}

/// The `sql.query` grant: which tables and columns a query may name, and its row limit.
#[derive(Debug, Clone)]
pub struct SqlGrant {
    /// Table name (as the policy spells it) to allowed columns.
    tables: BTreeMap<String, Columns>,
    /// The largest `limit` a query may ask for.
    max_rows: u64,
}

impl SqlGrant {
    /// The allowed columns of `table`, or `None` if the table is not listed. Names match
    /// exactly as the policy spells them.
    pub fn columns(&self, table: &str) -> Option<&Columns> {
        self.tables.get(table)
    }

    /// The largest number of rows a query may return.
    pub fn max_rows(&self) -> u64 {
        self.max_rows
    }

    /// Whether a query may name `column` of `table`: also for filters and ordering, so the
    /// query runner can check those against the same list.
    pub fn allows_column(&self, table: &str, column: &str) -> bool {
        match self.tables.get(table) {
            Some(Columns::All) => is_sql_identifier(column, false),
            Some(Columns::Listed(columns)) => columns.iter().any(|c| c == column),
            None => false,
        }
    }
}

/// The columns of one table that a query may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Columns {
    /// `"*"`: every column. Requested names must still be plain identifiers.
    All,
    /// Only these, exactly as spelled.
    Listed(Vec<String>),
}

impl Policy {
    /// Reads and checks the policy file at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let read_error = |source| PolicyError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        // Read one byte past the limit so an oversized file is noticed without reading it all.
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if len > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                path: path.to_owned(),
                bytes: len,
                limit: MAX_POLICY_BYTES,
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| PolicyError::NotUtf8 {
            path: path.to_owned(),
        })?;
        Policy::parse(&text, path)
    }

    /// Checks policy `text`; `path` is only used in error messages and [`Policy::path`].
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let cx = Context { path };
        let table: Table = text.parse().map_err(|err| cx.syntax(text, &err))?;

        let mut access = Access::Unattended;
        let mut window = None;
        let mut grants: [Option<Grant>; Capability::ALL.len()] = Default::default();
        for (key, value) in &table {
            match key.as_str() {
                "access" => access = parse_access(&cx, value)?,
                "maintenance_window" => window = Some(parse_window(&cx, value)?),
                "allow" => {
                    let allow = value
                        .as_table()
                        .ok_or_else(|| cx.invalid("allow", "a table of capabilities"))?;
                    grants = parse_allow(&cx, allow)?;
                }
                other => {
                    return Err(cx.unknown(
                        quote_key(other),
                        "not a policy key (known: access, maintenance_window, allow)",
                    ))
                }
            }
        }
        if window.is_none() {
            if let Some(grant) = grants.iter().flatten().find(|g| g.is_window_only) {
                return Err(cx.invalid(
                    &grant.key,
                    "a top-level `maintenance_window` to go with \"window\"",
                ));
            }
        }
        Ok(Policy {
            path: path.to_owned(),
            digest: hex::encode(Sha256::digest(text.as_bytes())),
            access,
            window,
            grants,
        })
    }

    /// SHA-256 of the file's bytes, lowercase hex, for the audit log's `policy.changed`
    /// entries.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }

    /// The file this policy came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The policy's `access` setting.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The maintenance window, if the policy names one.
    pub fn maintenance_window(&self) -> Option<&MaintenanceWindow> {
        self.window.as_ref()
    }

    /// What the policy allows for `capability`; `None` means refused.
    pub fn grant(&self, capability: Capability) -> Option<&Grant> {
        self.grants[capability.index()].as_ref()
    }
}

/// The file name for messages, and helpers that build errors naming it.
struct Context<'a> {
    path: &'a Path,
}

impl Context<'_> {
    fn invalid(&self, key: &str, expected: &str) -> PolicyError {
        PolicyError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            expected: expected.to_owned(),
        }
    }

    fn unknown(&self, key: String, what: &str) -> PolicyError {
        PolicyError::UnknownKey {
            path: self.path.to_owned(),
            key,
            what: what.to_owned(),
        }
    }

    fn syntax(&self, text: &str, err: &toml::de::Error) -> PolicyError {
        let offset = err.span().map_or(0, |span| span.start).min(text.len());
        let before = text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .map_or(0, |last| last.chars().count())
            + 1;
        PolicyError::Syntax {
            path: self.path.to_owned(),
            line,
            column,
            message: err.message().trim_end_matches('\n').to_owned(),
        }
    }
}

fn parse_access(cx: &Context<'_>, value: &Value) -> Result<Access, PolicyError> {
    match value.as_str() {
        Some("unattended") => Ok(Access::Unattended),
        Some("approval") => Ok(Access::Approval),
        _ => Err(cx.invalid("access", "\"unattended\" or \"approval\"")),
    }
}

fn parse_window(cx: &Context<'_>, value: &Value) -> Result<MaintenanceWindow, PolicyError> {
    const FORMAT: &str = "a window like \"Sun 01:00-04:00 America/New_York\" (days Mon..Sun, \
                          a range like Mon-Fri or a list like Sat,Sun; HH:MM-HH:MM; an IANA \
                          time zone or UTC)";
    let text = value
        .as_str()
        .ok_or_else(|| cx.invalid("maintenance_window", FORMAT))?;
    MaintenanceWindow::parse(text)
        .map_err(|detail| cx.invalid("maintenance_window", &format!("{FORMAT}: {detail}")))
}

fn parse_allow(
    cx: &Context<'_>,
    allow: &Table,
) -> Result<[Option<Grant>; Capability::ALL.len()], PolicyError> {
    let mut grants: [Option<Grant>; Capability::ALL.len()] = Default::default();
    for (name, value) in allow {
        let Some(capability) = Capability::from_name(name) else {
            return Err(unknown_capability(cx, name, value));
        };
        grants[capability.index()] = parse_grant(cx, capability, value)?;
    }
    Ok(grants)
}

fn unknown_capability(cx: &Context<'_>, name: &str, value: &Value) -> PolicyError {
    let known: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
    let mut what = format!("unknown capability (known: {})", known.join(", "));
    // `files.read = …` unquoted under [allow] is a nested table `files` in TOML.
    if let Some(inner) = value.as_table() {
        if let Some(dotted) = inner
            .keys()
            .map(|sub| format!("{name}.{sub}"))
            .find(|dotted| Capability::from_name(dotted).is_some())
        {
            what.push_str(&format!("; a dotted name must be quoted: \"{dotted}\" = …"));
        }
    }
    cx.unknown(format!("allow.{}", quote_key(name)), &what)
}

fn parse_grant(
    cx: &Context<'_>,
    capability: Capability,
    value: &Value,
) -> Result<Option<Grant>, PolicyError> {
    let key = capability.policy_key();
    let mut grant = Grant {
        capability,
        approval_rule: key.clone(),
        key,
        is_approval_only: false,
        is_window_only: false,
        roots: Vec::new(),
        sql: None,
    };
    let needs_table = capability.is_files() || capability == Capability::SqlQuery;
    match value {
        Value::Boolean(false) => return Ok(None),
        Value::Boolean(true) | Value::String(_) if needs_table => {
            return Err(cx.invalid(&grant.key, table_expected(capability)))
        }
        Value::Boolean(true) => {}
        Value::String(s) if s == "approval" => grant.is_approval_only = true,
        Value::String(s) if s == "window" && capability != Capability::Shell => {
            grant.is_window_only = true;
        }
        Value::Table(table) => parse_grant_table(cx, &mut grant, table)?,
        _ if capability == Capability::Shell => {
            return Err(cx.invalid(
                &grant.key,
                "true, false or \"approval\" (shell is always approval-only)",
            ))
        }
        _ => {
            return Err(cx.invalid(
                &grant.key,
                "true, false, \"approval\", \"window\" or a table",
            ))
        }
    }
    if capability == Capability::Shell {
        if grant.is_window_only {
            return Err(cx.invalid(
                &grant.key,
                "true, false or \"approval\" (shell is always approval-only)",
            ));
        }
        // Enabling shell never makes it unattended.
        grant.is_approval_only = true;
    }
    Ok(Some(grant))
}

fn table_expected(capability: Capability) -> &'static str {
    if capability == Capability::SqlQuery {
        "a table with `tables` and `max_rows`"
    } else {
        "a table with `roots`, a list of absolute paths"
    }
}

fn parse_grant_table(
    cx: &Context<'_>,
    grant: &mut Grant,
    table: &Table,
) -> Result<(), PolicyError> {
    let capability = grant.capability;
    let mut tables = None;
    let mut max_rows = None;
    let mut has_roots = false;
    for (name, value) in table {
        let key = format!("{}.{}", grant.key, quote_key(name));
        match name.as_str() {
            "approval" => {
                grant.is_approval_only = value
                    .as_bool()
                    .ok_or_else(|| cx.invalid(&key, "true or false"))?;
                grant.approval_rule.clone_from(&key);
            }
            "window" => {
                grant.is_window_only = value
                    .as_bool()
                    .ok_or_else(|| cx.invalid(&key, "true or false"))?;
            }
            "roots" if capability.is_files() => {
                grant.roots = parse_roots(cx, &key, value)?;
                has_roots = true;
            }
            "tables" if capability == Capability::SqlQuery => {
                tables = Some(parse_tables(cx, &key, value)?);
            }
            "max_rows" if capability == Capability::SqlQuery => {
                max_rows = Some(
                    value
                        .as_integer()
                        .and_then(|n| u64::try_from(n).ok())
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| cx.invalid(&key, "a whole number of rows, at least 1"))?,
                );
            }
            _ => {
                let known = match capability {
                    c if c.is_files() => "approval, window, roots",
                    Capability::SqlQuery => "approval, window, tables, max_rows",
                    _ => "approval, window",
                };
                return Err(cx.unknown(
                    key,
                    &format!("not a key of this capability (known: {known})"),
                ));
            }
        }
    }
    if capability.is_files() && !has_roots {
        return Err(cx.invalid(&format!("{}.roots", grant.key), "a list of absolute paths"));
    }
    if capability == Capability::SqlQuery {
        let tables = tables.ok_or_else(|| {
            cx.invalid(
                &format!("{}.tables", grant.key),
                "a table of table names, each a list of column names or \"*\"",
            )
        })?;
        let max_rows = max_rows.ok_or_else(|| {
            cx.invalid(
                &format!("{}.max_rows", grant.key),
                "a whole number of rows, at least 1",
            )
        })?;
        grant.sql = Some(SqlGrant { tables, max_rows });
    }
    if capability == Capability::Shell
        && table.get("approval").and_then(Value::as_bool) == Some(false)
    {
        return Err(cx.invalid(
            &format!("{}.approval", grant.key),
            "true (shell is always approval-only)",
        ));
    }
    Ok(())
}

fn parse_roots(cx: &Context<'_>, key: &str, value: &Value) -> Result<Vec<PathBuf>, PolicyError> {
    let expected = || cx.invalid(key, "a list of absolute paths");
    let list = value.as_array().ok_or_else(expected)?;
    if list.is_empty() {
        return Err(expected());
    }
    list.iter()
        .map(|item| {
            item.as_str()
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .ok_or_else(expected)
        })
        .collect()
}

fn parse_tables(
    cx: &Context<'_>,
    key: &str,
    value: &Value,
) -> Result<BTreeMap<String, Columns>, PolicyError> {
    let table = value.as_table().ok_or_else(|| {
        cx.invalid(
            key,
            "a table of table names, each a list of column names or \"*\"",
        )
    })?;
    let mut tables = BTreeMap::new();
    for (name, columns) in table {
        let table_key = format!("{key}.{}", quote_key(name));
        if !is_sql_identifier(name, true) {
            return Err(cx.invalid(
                &table_key,
                "a table name made of letters, digits and `_` (optionally `schema.table`)",
            ));
        }
        let expected = "a list of column names (letters, digits and `_`) or \"*\"";
        let columns = match columns {
            Value::String(s) if s == "*" => Columns::All,
            Value::Array(items) if !items.is_empty() => Columns::Listed(
                items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .filter(|c| is_sql_identifier(c, false))
                            .map(str::to_owned)
                            .ok_or_else(|| cx.invalid(&table_key, expected))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(cx.invalid(&table_key, expected)),
        };
        tables.insert(name.clone(), columns);
    }
    if tables.is_empty() {
        return Err(cx.invalid(key, "at least one table"));
    }
    Ok(tables)
}

/// A plain SQL identifier: ASCII letters, digits and `_`, not starting with a digit, at most
/// 128 characters; with `allow_schema`, up to one `schema.` prefix. Anything else could
/// smuggle SQL into a statement built from it.
pub(crate) fn is_sql_identifier(name: &str, allow_schema: bool) -> bool {
    let plain = |part: &str| {
        let mut chars = part.chars();
        part.len() <= 128
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match name.split_once('.') {
        Some((schema, table)) if allow_schema => plain(schema) && plain(table),
        Some(_) => false,
        None => plain(name),
    }
}

/// A key as TOML would need it written: bare if it can be, else quoted.
fn quote_key(key: &str) -> String {
    let is_bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if is_bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}
