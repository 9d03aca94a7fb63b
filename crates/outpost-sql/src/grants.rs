//! `outpost sql grants`: the least-privilege script a practice's IT runs to give the agent
//! exactly what its config needs, and no more: `SELECT` on the captured tables and columns,
//! the dialect's replication right for change capture, and `INSERT`/`UPDATE`/`DELETE` on
//! exactly the columns the write-back operations name.
//!
//! Pure functions: nothing here connects to a database. The password is always the
//! placeholder [`PASSWORD_PLACEHOLDER`]; a password in the config is never printed.
//!
//! Write-back operations are read from their SQL text ([`parse_statement`]): the target
//! table, the columns written, and the columns read by `WHERE`/`RETURNING`/`SET`
//! expressions (PostgreSQL and MariaDB both want `SELECT` on those).

use std::collections::BTreeSet;

use crate::ident::{pg_object_name, quote, quote_mssql, quote_mysql, split_qualified};
use crate::{SourceConfig, SqlError};

/// What stands for the password in every script; the administrator replaces it.
pub const PASSWORD_PLACEHOLDER: &str = "<choose a password>";

/// The user the scripts name when the URL names none.
pub const DEFAULT_USER: &str = "outpost";

/// The change tables the Firebird triggers write to (read and trimmed by the agent); the
/// same names as `firebird::ddl`.
pub const FIREBIRD_CHANGE_TABLES: [&str; 2] = ["OUTPOST_CHANGES", "OUTPOST_CHANGE_BLOBS"];

/// A database product, as a URL's scheme names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `postgres://`, `postgresql://`.
    Postgres,
    /// `mysql://`, `mariadb://`.
    MariaDb,
    /// `sqlite:PATH`.
    Sqlite,
    /// `firebird://`.
    Firebird,
    /// `sqlserver://`, `mssql://`.
    SqlServer,
}

impl Dialect {
    /// The dialect a URL names, if it is one of ours.
    pub fn of_url(url: &str) -> Option<Dialect> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MariaDb),
            "sqlite" => Some(Dialect::Sqlite),
            "firebird" => Some(Dialect::Firebird),
            "sqlserver" | "mssql" => Some(Dialect::SqlServer),
            _ => None,
        }
    }

    /// A name for people.
    pub fn label(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::MariaDb => "MariaDB/MySQL",
            Dialect::Sqlite => "SQLite",
            Dialect::Firebird => "Firebird",
            Dialect::SqlServer => "SQL Server",
        }
    }

    /// Quotes one identifier the way this dialect does.
    pub fn quote(self, ident: &str) -> String {
        match self {
            Dialect::MariaDb => quote_mysql(ident),
            Dialect::SqlServer => quote_mssql(ident),
            // A plain name is written bare, as Firebird folds it (to upper case), so a
            // config's `patient` finds the catalog's `PATIENT`; any other name is quoted.
            Dialect::Firebird => firebird_user(ident),
            Dialect::Postgres | Dialect::Sqlite => quote(ident),
        }
    }

    /// Quotes `schema.table` or `table`, filling in `default_schema` when given.
    fn quote_table(self, name: &str, default_schema: Option<&str>) -> String {
        match (split_qualified(name), default_schema) {
            ((Some(schema), table), _) | ((None, table), Some(schema)) => {
                format!("{}.{}", self.quote(schema), self.quote(table))
            }
            ((None, table), None) => self.quote(table),
        }
    }
}

/// The parts of a database URL the scripts need (never the password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The user name, or [`DEFAULT_USER`] when the URL has none.
    pub user: String,
    /// Whether the URL named the user.
    pub user_given: bool,
    /// The database (PostgreSQL, MariaDB, SQL Server), the file (Firebird, SQLite).
    pub database: String,
    /// The host the URL connects to, if any.
    pub host: Option<String>,
}

impl Account {
    /// Reads user, host and database out of `scheme://user[:password]@host[:port]/db` or
    /// `sqlite:PATH`; the password is dropped on the spot.
    pub fn of_url(url: &str) -> Account {
        if let Some(path) = url.strip_prefix("sqlite:") {
            return Account {
                user: DEFAULT_USER.into(),
                user_given: false,
                database: path.strip_prefix("//").unwrap_or(path).to_owned(),
                host: None,
            };
        }
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash + 1..]),
            None => (rest, ""),
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let user = userinfo
            .map(|info| info.split(':').next().unwrap_or_default())
            .filter(|user| !user.is_empty())
            .map(percent_decode);
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport, |(host, _)| host)
            .trim_matches(['[', ']']);
        Account {
            user_given: user.is_some(),
            user: user.unwrap_or_else(|| DEFAULT_USER.into()),
            database: percent_decode(path),
            host: (!host.is_empty()).then(|| host.to_owned()),
        }
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One captured table: its name as configured and the columns to read (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadTable {
    /// `table` or `schema.table`.
    pub name: String,
    /// Key columns first, then the configured columns; `None` when the config reads all.
    pub columns: Option<Vec<String>>,
}

/// What a source needs.
#[derive(Debug, Clone)]
pub struct SourceNeeds {
    /// The source's name in the agent config.
    pub name: String,
    /// Its database.
    pub dialect: Dialect,
    /// Who connects, and to what.
    pub account: Account,
    /// The tables read.
    pub tables: Vec<ReadTable>,
    /// PostgreSQL: the publication the agent reads.
    pub publication: String,
    /// PostgreSQL: the replication slot the agent creates.
    pub slot: String,
}

impl SourceNeeds {
    /// What the source `name` configured by `config` needs.
    pub fn of_config(name: &str, config: &SourceConfig) -> Result<SourceNeeds, SqlError> {
        let dialect = Dialect::of_url(&config.url).ok_or_else(|| {
            SqlError::Config(format!(
                "source {name}: url: not a database URL this agent knows ({})",
                crate::redact_url(&config.url)
            ))
        })?;
        let tables = config
            .tables
            .iter()
            .map(|table| ReadTable {
                name: table.name.clone(),
                columns: table.columns.as_ref().map(|columns| {
                    let mut all = table.key.clone();
                    for column in columns {
                        if !all.contains(column) {
                            all.push(column.clone());
                        }
                    }
                    all
                }),
            })
            .collect();
        Ok(SourceNeeds {
            name: name.to_owned(),
            dialect,
            account: Account::of_url(&config.url),
            tables,
            publication: config
                .publication
                .clone()
                .unwrap_or_else(|| pg_object_name(name)),
            slot: config.slot.clone().unwrap_or_else(|| pg_object_name(name)),
        })
    }
}

/// What an operation's SQL does to its table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The verb.
    pub verb: Verb,
    /// The target table as written.
    pub table: String,
    /// Columns written (`INSERT` list, `SET` targets); `None`: an `INSERT` without a list,
    /// which writes every column.
    pub written: Option<BTreeSet<String>>,
    /// Columns read by `WHERE`, `RETURNING` and `SET` expressions.
    pub read: BTreeSet<String>,
}

/// The write a statement makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
}

/// What a write-back sink's operations need on one table, merged over its operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableWrites {
    /// The table as written in the SQL.
    pub table: String,
    /// `INSERT` on these columns; `Some(None)`: on the whole table.
    pub insert: Option<Option<BTreeSet<String>>>,
    /// `UPDATE` on these columns.
    pub update: BTreeSet<String>,
    /// `DELETE` on the table.
    pub delete: bool,
    /// `SELECT` on these columns (read by `WHERE`, `RETURNING`, `SET` expressions).
    pub select: BTreeSet<String>,
    /// The operations that touch the table, for the script's comments.
    pub operations: Vec<String>,
}

/// What a write-back sink needs.
#[derive(Debug, Clone)]
pub struct SinkNeeds {
    /// The sink's name in the agent config.
    pub name: String,
    /// Its database.
    pub dialect: Dialect,
    /// Who connects, and to what.
    pub account: Account,
    /// Per table, in the order first named.
    pub tables: Vec<TableWrites>,
}

impl SinkNeeds {
    /// Merges `(operation name, SQL)` pairs into per-table needs.
    pub fn of_operations<'a>(
        name: &str,
        url: &str,
        operations: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<SinkNeeds, SqlError> {
        let dialect = Dialect::of_url(url).ok_or_else(|| {
            SqlError::Config(format!(
                "sink {name}: url: not a database URL this agent knows ({})",
                crate::redact_url(url)
            ))
        })?;
        let mut tables: Vec<TableWrites> = Vec::new();
        for (operation, sql) in operations {
            let statement = parse_statement(sql).map_err(|message| {
                SqlError::Config(format!("sink {name}: operations.{operation}: {message}"))
            })?;
            let index = match tables.iter().position(|t| t.table == statement.table) {
                Some(index) => index,
                None => {
                    tables.push(TableWrites {
                        table: statement.table.clone(),
                        ..TableWrites::default()
                    });
                    tables.len() - 1
                }
            };
            let entry = &mut tables[index];
            entry.operations.push(operation.to_owned());
            entry.select.extend(statement.read.iter().cloned());
            match statement.verb {
                Verb::Insert => {
                    entry.insert = Some(match (entry.insert.take(), statement.written) {
                        (Some(None), _) | (_, None) => None,
                        (Some(Some(mut had)), Some(more)) => {
                            had.extend(more);
                            Some(had)
                        }
                        (None, Some(more)) => Some(more),
                    });
                }
                Verb::Update => entry.update.extend(statement.written.into_iter().flatten()),
                Verb::Delete => entry.delete = true,
            }
        }
        Ok(SinkNeeds {
            name: name.to_owned(),
            dialect,
            account: Account::of_url(url),
            tables,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    /// A quoted identifier, unquoted.
    Quoted(String),
    /// A `:name`, `$1`, `?` or `@name` parameter.
    Param,
    /// A string or number literal.
    Literal,
    Punct(char),
}

fn tokenize(sql: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let closing = |open: char| match open {
        '[' => ']',
        other => other,
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if c == '\'' {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("a string literal is not closed".into()),
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                    Some('\'') => break,
                    Some(_) => i += 1,
                }
            }
            i += 1;
            tokens.push(Token::Literal);
        } else if c == '"' || c == '`' || c == '[' {
            let close = closing(c);
            let mut ident = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("a quoted identifier is not closed".into()),
                    Some(&d) if d == close && chars.get(i + 1) == Some(&close) => {
                        ident.push(close);
                        i += 2;
                    }
                    Some(&d) if d == close => break,
                    Some(&d) => {
                        ident.push(d);
                        i += 1;
                    }
                }
            }
            i += 1;
            tokens.push(Token::Quoted(ident));
        } else if (c == ':' || c == '@' || c == '$')
            && chars
                .get(i + 1)
                .is_some_and(|d| d.is_alphanumeric() || *d == '_')
        {
            i += 1;
            while chars
                .get(i)
                .is_some_and(|d| d.is_alphanumeric() || *d == '_')
            {
                i += 1;
            }
            tokens.push(Token::Param);
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            // PostgreSQL cast `::type`: the type name is not a column.
            i += 2;
            while chars.get(i).is_some_and(|d| d.is_whitespace()) {
                i += 1;
            }
            while chars
                .get(i)
                .is_some_and(|d| d.is_alphanumeric() || *d == '_')
            {
                i += 1;
            }
        } else if c == '?' {
            i += 1;
            tokens.push(Token::Param);
        } else if c.is_ascii_digit() {
            while chars
                .get(i)
                .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.')
            {
                i += 1;
            }
            tokens.push(Token::Literal);
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while chars
                .get(i)
                .is_some_and(|d| d.is_alphanumeric() || *d == '_' || *d == '$')
            {
                i += 1;
            }
            tokens.push(Token::Word(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    Ok(tokens)
}

/// Words that are never column names in the statements we read.
const KEYWORDS: &[&str] = &[
    "all",
    "and",
    "as",
    "asc",
    "between",
    "by",
    "case",
    "cast",
    "coalesce",
    "collate",
    "conflict",
    "current_date",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "delete",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "escape",
    "exists",
    "false",
    "from",
    "ilike",
    "in",
    "insert",
    "interval",
    "into",
    "is",
    "like",
    "limit",
    "localtimestamp",
    "not",
    "nothing",
    "null",
    "nulls",
    "on",
    "or",
    "output",
    "returning",
    "select",
    "set",
    "similar",
    "then",
    "true",
    "unknown",
    "update",
    "using",
    "values",
    "when",
    "where",
    "inserted",
    "deleted",
    "excluded",
    "key",
    "duplicate",
];

fn is_keyword(word: &str) -> bool {
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word))
}

fn word_is(token: Option<&Token>, keyword: &str) -> bool {
    matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(keyword))
}

/// A possibly qualified name starting at `tokens[*i]`; returns it as `a.b` (unquoted).
fn name_at(tokens: &[Token], i: &mut usize) -> Option<String> {
    let mut parts = Vec::new();
    loop {
        match tokens.get(*i) {
            Some(Token::Word(w)) => parts.push(w.clone()),
            Some(Token::Quoted(q)) => parts.push(q.clone()),
            _ => return None,
        }
        *i += 1;
        if tokens.get(*i) == Some(&Token::Punct('.')) {
            *i += 1;
        } else {
            break;
        }
    }
    Some(parts.join("."))
}

/// Column names in an expression: identifiers that are not keywords, functions,
/// parameters or qualifiers (of `t.col`, only `col`).
fn columns_in(tokens: &[Token], out: &mut BTreeSet<String>) {
    for (index, token) in tokens.iter().enumerate() {
        let name = match token {
            Token::Word(w) if !is_keyword(w) => w,
            Token::Quoted(q) => q,
            _ => continue,
        };
        let next = tokens.get(index + 1);
        if next == Some(&Token::Punct('(')) || next == Some(&Token::Punct('.')) {
            continue;
        }
        out.insert(name.clone());
    }
}

/// Splits `tokens` on commas outside parentheses.
fn split_commas(tokens: &[Token]) -> Vec<&[Token]> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (index, token) in tokens.iter().enumerate() {
        match token {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') => depth -= 1,
            Token::Punct(',') if depth == 0 => {
                parts.push(&tokens[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&tokens[start..]);
    parts
}

/// Position of the first top-level `keyword` at or after `from`.
fn find_keyword(tokens: &[Token], from: usize, keyword: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (index, token) in tokens.iter().enumerate().skip(from) {
        match token {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') => depth -= 1,
            Token::Word(w) if depth == 0 && w.eq_ignore_ascii_case(keyword) => return Some(index),
            _ => {}
        }
    }
    None
}

/// Reads an `INSERT`, `UPDATE` or `DELETE`: its table, the columns it writes and the
/// columns it reads. Anything else is refused with a reason.
pub fn parse_statement(sql: &str) -> Result<Statement, String> {
    let mut tokens = tokenize(sql)?;
    while tokens.last() == Some(&Token::Punct(';')) {
        tokens.pop();
    }
    if tokens.contains(&Token::Punct(';')) {
        return Err("expected one statement, found several".into());
    }
    let mut i = 1;
    let first = tokens.first();
    let (verb, table) = if word_is(first, "insert") {
        if !word_is(tokens.get(i), "into") {
            return Err("expected INSERT INTO <table>".into());
        }
        i += 1;
        (Verb::Insert, name_at(&tokens, &mut i))
    } else if word_is(first, "update") {
        (Verb::Update, name_at(&tokens, &mut i))
    } else if word_is(first, "delete") {
        if word_is(tokens.get(i), "from") {
            i += 1;
        }
        (Verb::Delete, name_at(&tokens, &mut i))
    } else {
        return Err("expected INSERT, UPDATE or DELETE (grants are only written for those)".into());
    };
    let table = table.ok_or("expected a table name after the verb")?;
    let mut read = BTreeSet::new();
    let mut written = None;
    // Table alias (`UPDATE patient p SET …`): skip it.
    if matches!(tokens.get(i), Some(Token::Word(w)) if !is_keyword(w) || w.eq_ignore_ascii_case("as"))
    {
        if word_is(tokens.get(i), "as") {
            i += 1;
        }
        i += 1;
    }
    let returning = find_keyword(&tokens, i, "returning")
        .or_else(|| find_keyword(&tokens, i, "output"))
        .unwrap_or(tokens.len());
    columns_in(&tokens[returning.min(tokens.len())..], &mut read);
    match verb {
        Verb::Insert => {
            if tokens.get(i) == Some(&Token::Punct('(')) {
                let close = tokens[i..]
                    .iter()
                    .position(|t| *t == Token::Punct(')'))
                    .ok_or("the column list is not closed")?;
                let mut columns = BTreeSet::new();
                for part in split_commas(&tokens[i + 1..i + close]) {
                    let mut j = 0;
                    let column = name_at(part, &mut j).ok_or("expected a column name")?;
                    columns.insert(column);
                }
                written = Some(columns);
                i += close + 1;
            }
            // `ON CONFLICT (…) DO UPDATE SET a = …` / `ON DUPLICATE KEY UPDATE a = …`.
            if let Some(update) = find_keyword(&tokens, i, "update") {
                let end = find_keyword(&tokens, update, "where")
                    .unwrap_or(returning)
                    .min(returning);
                let start = if word_is(tokens.get(update + 1), "set") {
                    update + 2
                } else {
                    update + 1
                };
                let mut updated = BTreeSet::new();
                assignments(&tokens[start.min(end)..end], &mut updated, &mut read)?;
                columns_in(&tokens[end..returning], &mut read);
                return Ok(Statement {
                    verb,
                    table,
                    written,
                    read,
                })
                .map(|mut s| {
                    // The upsert also updates: report the columns as written too.
                    if let Some(written) = &mut s.written {
                        written.extend(updated);
                    }
                    s
                });
            }
            let values = find_keyword(&tokens, i, "values").unwrap_or(i);
            let select = find_keyword(&tokens, i, "select");
            if select.is_some() && find_keyword(&tokens, i, "values").is_none() {
                return Err("INSERT … SELECT reads other tables: write the grants by hand".into());
            }
            columns_in(&tokens[values.min(returning)..returning], &mut read);
        }
        Verb::Update => {
            if !word_is(tokens.get(i), "set") {
                return Err("expected UPDATE <table> SET …".into());
            }
            let where_at = find_keyword(&tokens, i, "where")
                .unwrap_or(returning)
                .min(returning);
            let from_at = find_keyword(&tokens, i, "from");
            if from_at.is_some_and(|f| f < where_at) {
                return Err("UPDATE … FROM reads other tables: write the grants by hand".into());
            }
            let mut updated = BTreeSet::new();
            assignments(&tokens[i + 1..where_at], &mut updated, &mut read)?;
            columns_in(&tokens[where_at..returning], &mut read);
            written = Some(updated);
        }
        Verb::Delete => {
            if find_keyword(&tokens, i, "using").is_some() {
                return Err("DELETE … USING reads other tables: write the grants by hand".into());
            }
            columns_in(&tokens[i.min(returning)..returning], &mut read);
        }
    }
    Ok(Statement {
        verb,
        table,
        written,
        read,
    })
}

/// `a = expr, b = expr`: targets into `written`, columns of the expressions into `read`.
fn assignments(
    tokens: &[Token],
    written: &mut BTreeSet<String>,
    read: &mut BTreeSet<String>,
) -> Result<(), String> {
    for part in split_commas(tokens) {
        if part.is_empty() {
            continue;
        }
        let mut j = 0;
        let target = name_at(part, &mut j).ok_or("expected `column = value` after SET")?;
        // `t.col = …`: the column is the last part.
        let column = target.rsplit('.').next().unwrap_or(&target).to_owned();
        written.insert(column);
        if part.get(j) != Some(&Token::Punct('=')) {
            return Err("expected `column = value` after SET".into());
        }
        columns_in(&part[j + 1..], read);
    }
    Ok(())
}

/// A SQL string literal: `'it''s'`.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A MariaDB account: `'user'@'host'`.
fn mysql_account(account: &Account) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{}'@'%'", escape(&account.user))
}

/// A Firebird name (user, table, column): bare and in upper case when it is a plain
/// identifier (as Firebird folds it), else quoted.
fn firebird_user(user: &str) -> String {
    if user.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && user.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
    {
        user.to_ascii_uppercase()
    } else {
        quote(user)
    }
}

fn column_list(dialect: Dialect, columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| dialect.quote(c))
        .collect::<Vec<_>>()
        .join(", ")
}

fn header(out: &mut String, role: &str, name: &str, dialect: Dialect, account: &Account) {
    out.push_str(&format!(
        "-- outpost sql grants: {role} \"{name}\" ({}, database {})\n",
        dialect.label(),
        if account.database.is_empty() {
            "(none in the URL)".to_owned()
        } else {
            format!("\"{}\"", account.database)
        }
    ));
    if dialect != Dialect::Sqlite {
        out.push_str(&format!(
            "-- Replace {PASSWORD_PLACEHOLDER} with a password of your own before running it; keep it out of the agent's config (password_file, 0600).\n"
        ));
        if !account.user_given {
            out.push_str(&format!(
                "-- The URL names no user: this script makes \"{DEFAULT_USER}\"; put it in the URL.\n"
            ));
        }
    }
}

/// The script for a source: user, `SELECT` on exactly the configured tables and columns, and
/// the replication right its capture needs.
pub fn source_script(needs: &SourceNeeds) -> String {
    let mut out = String::new();
    let d = needs.dialect;
    header(&mut out, "source", &needs.name, d, &needs.account);
    let user = &needs.account.user;
    match d {
        Dialect::Postgres => {
            let role = quote(user);
            out.push_str(
                "-- 1. As a superuser (or a role with CREATEROLE), anywhere on the server:\n",
            );
            out.push_str(&format!(
                "CREATE ROLE {role} LOGIN REPLICATION PASSWORD {};\n",
                literal(PASSWORD_PLACEHOLDER)
            ));
            out.push_str(&format!(
                "GRANT CONNECT ON DATABASE {} TO {role};\n",
                quote(&needs.account.database)
            ));
            out.push_str(&format!(
                "-- 2. In database {}, as the owner of the tables:\n",
                quote(&needs.account.database)
            ));
            let mut schemas = BTreeSet::new();
            for table in &needs.tables {
                schemas.insert(
                    split_qualified(&table.name)
                        .0
                        .unwrap_or("public")
                        .to_owned(),
                );
            }
            for schema in &schemas {
                out.push_str(&format!(
                    "GRANT USAGE ON SCHEMA {} TO {role};\n",
                    quote(schema)
                ));
            }
            for table in &needs.tables {
                grant_select(&mut out, d, table, &role, Some("public"));
            }
            let list = needs
                .tables
                .iter()
                .map(|t| d.quote_table(&t.name, Some("public")))
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "-- Only a table's owner may publish it, so the owner creates the publication the agent reads\n\
                 -- (it then belongs to the owner; the agent only reads through it):\n\
                 CREATE PUBLICATION {} FOR TABLE {list};\n",
                quote(&needs.publication)
            ));
            out.push_str("-- Optional, by the owner: whole old rows in `before` on update and delete (more WAL):\n");
            for table in &needs.tables {
                out.push_str(&format!(
                    "-- ALTER TABLE {} REPLICA IDENTITY FULL;\n",
                    d.quote_table(&table.name, Some("public"))
                ));
            }
            out.push_str(&format!(
                "-- The agent creates its replication slot {} itself (REPLICATION allows it);\n\
                 -- the server needs wal_level = logical and a free max_replication_slots entry.\n",
                quote(&needs.slot)
            ));
        }
        Dialect::MariaDb => {
            let account = mysql_account(&needs.account);
            out.push_str("-- As an administrator. '%' lets the user connect from anywhere: put the agent's address there.\n");
            out.push_str(&format!(
                "CREATE USER {account} IDENTIFIED BY {};\n",
                literal(PASSWORD_PLACEHOLDER)
            ));
            let db = d.quote(&needs.account.database);
            for table in &needs.tables {
                let (schema, name) = split_qualified(&table.name);
                let target = format!(
                    "{}.{}",
                    schema.map_or(db.clone(), |s| d.quote(s)),
                    d.quote(name)
                );
                match &table.columns {
                    Some(columns) => out.push_str(&format!(
                        "GRANT SELECT ({}) ON {target} TO {account};\n",
                        column_list(d, columns)
                    )),
                    None => out.push_str(&format!(
                        "GRANT SELECT ON {target} TO {account};  -- all columns: the config lists none\n"
                    )),
                }
            }
            out.push_str(&format!(
                "-- Reading the binary log (server-wide rights; they give no access to table data):\n\
                 GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO {account};\n\
                 -- On MySQL (not MariaDB) the snapshot also takes a brief FLUSH TABLES WITH READ LOCK:\n\
                 -- GRANT RELOAD ON *.* TO {account};\n\
                 -- The server needs log_bin on, binlog_format = ROW and binlog_row_image = FULL.\n"
            ));
        }
        Dialect::Sqlite => {
            let path = &needs.account.database;
            out.push_str(&format!(
                "-- SQLite has no users or grants: access is the file's. The agent only reads {path:?}.\n\
                 -- Give the agent's OS user read access and no write access, e.g. (as root):\n\
                 --   chgrp outpost {path:?} && chmod 640 {path:?}\n\
                 -- In WAL mode a reader also needs the -wal and -shm files to exist and be readable\n\
                 -- (they are while the application has the database open).\n"
            ));
        }
        Dialect::Firebird => {
            let fb_user = firebird_user(user);
            out.push_str("-- As SYSDBA (or a user with the RDB$ADMIN role):\n");
            out.push_str(&format!(
                "CREATE USER {fb_user} PASSWORD {};\n",
                literal(PASSWORD_PLACEHOLDER)
            ));
            out.push_str("-- Firebird grants SELECT per table, not per column:\n");
            for table in &needs.tables {
                out.push_str(&format!(
                    "GRANT SELECT ON TABLE {} TO USER {fb_user};",
                    d.quote_table(&table.name, None)
                ));
                if let Some(columns) = &table.columns {
                    out.push_str(&format!(
                        "  -- the agent reads only {}",
                        column_list(d, columns)
                    ));
                }
                out.push('\n');
            }
            out.push_str(
                "-- The change tables the triggers write (install them first: `outpost sql install-triggers`):\n\
                 -- the agent reads them and trims what it has queued.\n",
            );
            for table in FIREBIRD_CHANGE_TABLES {
                out.push_str(&format!(
                    "GRANT SELECT, DELETE ON TABLE {table} TO USER {fb_user};\n"
                ));
            }
        }
        Dialect::SqlServer => {
            let login = d.quote(user);
            let db = d.quote(&needs.account.database);
            out.push_str("-- 1. As a sysadmin:\n");
            out.push_str(&format!(
                "CREATE LOGIN {login} WITH PASSWORD = {};\n",
                literal(PASSWORD_PLACEHOLDER)
            ));
            out.push_str(&format!(
                "ALTER DATABASE {db} SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON);  -- skip if already on\n"
            ));
            out.push_str(&format!(
                "-- 2. In the database, as its owner:\nUSE {db};\n"
            ));
            out.push_str(&format!("CREATE USER {login} FOR LOGIN {login};\n"));
            for table in &needs.tables {
                let target = d.quote_table(&table.name, Some("dbo"));
                out.push_str(&format!(
                    "ALTER TABLE {target} ENABLE CHANGE_TRACKING;  -- skip if already on\n"
                ));
            }
            for table in &needs.tables {
                let target = d.quote_table(&table.name, Some("dbo"));
                match &table.columns {
                    Some(columns) => out.push_str(&format!(
                        "GRANT SELECT ON {target} ({}) TO {login};\n",
                        column_list(d, columns)
                    )),
                    None => out.push_str(&format!(
                        "GRANT SELECT ON {target} TO {login};  -- all columns: the config lists none\n"
                    )),
                }
                out.push_str(&format!(
                    "GRANT VIEW CHANGE TRACKING ON {target} TO {login};\n"
                ));
            }
        }
    }
    out
}

fn grant_select(
    out: &mut String,
    d: Dialect,
    table: &ReadTable,
    role: &str,
    default_schema: Option<&str>,
) {
    let target = d.quote_table(&table.name, default_schema);
    match &table.columns {
        Some(columns) => out.push_str(&format!(
            "GRANT SELECT ({}) ON TABLE {target} TO {role};\n",
            column_list(d, columns)
        )),
        None => out.push_str(&format!(
            "GRANT SELECT ON TABLE {target} TO {role};  -- all columns: the config lists none\n"
        )),
    }
}

/// The script for a write-back sink: user, and exactly the writes (and the reads they imply)
/// its operations make.
pub fn sink_script(needs: &SinkNeeds) -> String {
    let mut out = String::new();
    let d = needs.dialect;
    header(&mut out, "sink", &needs.name, d, &needs.account);
    let user = &needs.account.user;
    let set =
        |columns: &BTreeSet<String>| column_list(d, &columns.iter().cloned().collect::<Vec<_>>());
    let grantee = match d {
        Dialect::Postgres | Dialect::SqlServer => d.quote(user),
        Dialect::MariaDb => mysql_account(&needs.account),
        Dialect::Firebird => format!("USER {}", firebird_user(user)),
        Dialect::Sqlite => String::new(),
    };
    match d {
        Dialect::Postgres => {
            out.push_str(&format!(
                "CREATE ROLE {grantee} LOGIN PASSWORD {};  -- skip if the role exists (e.g. made for a source)\n\
                 GRANT CONNECT ON DATABASE {} TO {grantee};\n",
                literal(PASSWORD_PLACEHOLDER),
                quote(&needs.account.database)
            ));
            let schemas: BTreeSet<&str> = needs
                .tables
                .iter()
                .map(|t| split_qualified(&t.table).0.unwrap_or("public"))
                .collect();
            for schema in schemas {
                out.push_str(&format!("GRANT USAGE ON SCHEMA {} TO {grantee};\n", quote(schema)));
            }
        }
        Dialect::MariaDb => out.push_str(&format!(
            "CREATE USER {grantee} IDENTIFIED BY {};  -- skip if the user exists; put the agent's address for '%'\n",
            literal(PASSWORD_PLACEHOLDER)
        )),
        Dialect::Firebird => out.push_str(&format!(
            "CREATE USER {} PASSWORD {};  -- skip if the user exists\n",
            firebird_user(user),
            literal(PASSWORD_PLACEHOLDER)
        )),
        Dialect::SqlServer => out.push_str(&format!(
            "CREATE LOGIN {grantee} WITH PASSWORD = {};  -- skip if it exists\n\
             USE {};\nCREATE USER {grantee} FOR LOGIN {grantee};  -- skip if it exists\n",
            literal(PASSWORD_PLACEHOLDER),
            d.quote(&needs.account.database)
        )),
        Dialect::Sqlite => {}
    }
    for table in &needs.tables {
        out.push_str(&format!(
            "-- {}: operations {}\n",
            table.table,
            table.operations.join(", ")
        ));
        if d == Dialect::Sqlite {
            out.push_str(&format!(
                "-- SQLite has no grants: the agent's OS user needs write access to {:?} and its folder (journal files).\n",
                needs.account.database
            ));
            continue;
        }
        let target = match d {
            Dialect::MariaDb => {
                let (schema, name) = split_qualified(&table.table);
                format!(
                    "{}.{}",
                    d.quote(schema.unwrap_or(&needs.account.database)),
                    d.quote(name)
                )
            }
            _ => d.quote_table(&table.table, None),
        };
        let on = if d == Dialect::Postgres || d == Dialect::Firebird {
            format!("TABLE {target}")
        } else {
            target.clone()
        };
        // Column lists: PostgreSQL and MariaDB take them for INSERT, UPDATE and SELECT;
        // SQL Server for UPDATE and SELECT; Firebird for UPDATE only.
        let columns_for = |verb: &str, columns: &BTreeSet<String>| -> String {
            let column_level = match d {
                Dialect::Postgres | Dialect::MariaDb => true,
                Dialect::SqlServer => verb != "INSERT",
                Dialect::Firebird => verb == "UPDATE",
                Dialect::Sqlite => false,
            };
            match (column_level, d) {
                (false, _) => format!("GRANT {verb} ON {on} TO {grantee};\n"),
                (true, Dialect::SqlServer) => {
                    format!("GRANT {verb} ON {on} ({}) TO {grantee};\n", set(columns))
                }
                (true, _) => format!("GRANT {verb} ({}) ON {on} TO {grantee};\n", set(columns)),
            }
        };
        match &table.insert {
            Some(Some(columns)) => out.push_str(&columns_for("INSERT", columns)),
            Some(None) => out.push_str(&format!(
                "GRANT INSERT ON {on} TO {grantee};  -- an INSERT without a column list writes every column\n"
            )),
            None => {}
        }
        if !table.update.is_empty() {
            out.push_str(&columns_for("UPDATE", &table.update));
        }
        if table.delete {
            out.push_str(&format!("GRANT DELETE ON {on} TO {grantee};\n"));
        }
        if !table.select.is_empty() {
            out.push_str(
                &columns_for("SELECT", &table.select)
                    .replace(";\n", ";  -- read by WHERE, RETURNING or SET expressions\n"),
            );
        }
        if d == Dialect::Postgres && table.insert.is_some() {
            out.push_str(&format!(
                "-- If a column of {} takes its default from a sequence (serial): GRANT USAGE ON SEQUENCE <its sequence> TO {grantee};\n",
                table.table
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn pg_source() -> SourceConfig {
        toml::from_str(
            r#"url = "postgres://pms_reader:hunter2@127.0.0.1:5433/pms"
               tables = [ { name = "patient", key = ["patnum"], columns = ["lname", "birthdate"] },
                          { name = "sched.appointment", key = ["aptnum"] } ]"#,
        )
        .unwrap()
    }

    #[test]
    fn accounts_come_from_urls_without_the_password() {
        let a = Account::of_url("postgres://pms_reader:hunter2@127.0.0.1:5433/pms?sslmode=disable");
        assert_eq!(a.user, "pms_reader");
        assert!(a.user_given);
        assert_eq!(a.database, "pms");
        assert_eq!(a.host.as_deref(), Some("127.0.0.1"));
        let a = Account::of_url("mysql://127.0.0.1/opendental");
        assert_eq!((a.user.as_str(), a.user_given), ("outpost", false));
        let a = Account::of_url("sqlite:/var/lib/pms.db");
        assert_eq!(a.database, "/var/lib/pms.db");
        let a = Account::of_url("postgres://we%40ird:p@h/d%20b");
        assert_eq!((a.user.as_str(), a.database.as_str()), ("we@ird", "d b"));
    }

    #[test]
    fn postgres_source_script_is_exact() {
        let needs = SourceNeeds::of_config("pms", &pg_source()).unwrap();
        let script = source_script(&needs);
        assert!(!script.contains("hunter2"), "{script}");
        for line in [
            "CREATE ROLE \"pms_reader\" LOGIN REPLICATION PASSWORD '<choose a password>';",
            "GRANT CONNECT ON DATABASE \"pms\" TO \"pms_reader\";",
            "GRANT USAGE ON SCHEMA \"public\" TO \"pms_reader\";",
            "GRANT USAGE ON SCHEMA \"sched\" TO \"pms_reader\";",
            "GRANT SELECT (\"patnum\", \"lname\", \"birthdate\") ON TABLE \"public\".\"patient\" TO \"pms_reader\";",
            "GRANT SELECT ON TABLE \"sched\".\"appointment\" TO \"pms_reader\";  -- all columns: the config lists none",
            "CREATE PUBLICATION \"outpost_pms\" FOR TABLE \"public\".\"patient\", \"sched\".\"appointment\";",
            "-- ALTER TABLE \"public\".\"patient\" REPLICA IDENTITY FULL;",
        ] {
            assert!(script.lines().any(|l| l == line), "missing {line:?} in\n{script}");
        }
        assert!(!script.contains("SUPERUSER") && !script.contains("INSERT"));
    }

    #[test]
    fn other_dialects_quote_their_way() {
        let mut config = pg_source();
        config.url = "mysql://op:pw@10.0.0.5/opendental".into();
        let script = source_script(&SourceNeeds::of_config("od", &config).unwrap());
        assert!(
            script.contains("CREATE USER 'op'@'%' IDENTIFIED BY '<choose a password>';"),
            "{script}"
        );
        assert!(script.contains("GRANT SELECT (`patnum`, `lname`, `birthdate`) ON `opendental`.`patient` TO 'op'@'%';"), "{script}");
        assert!(script.contains("ON `sched`.`appointment`"), "{script}");
        assert!(script.contains("GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'op'@'%';"));
        assert!(!script.contains("pw"), "{script}");

        config.url = "sqlserver://op:pw@10.0.0.5:1433/Dentrix".into();
        let script = source_script(&SourceNeeds::of_config("dx", &config).unwrap());
        for line in [
            "CREATE LOGIN [op] WITH PASSWORD = '<choose a password>';",
            "ALTER DATABASE [Dentrix] SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON);  -- skip if already on",
            "ALTER TABLE [dbo].[patient] ENABLE CHANGE_TRACKING;  -- skip if already on",
            "GRANT SELECT ON [dbo].[patient] ([patnum], [lname], [birthdate]) TO [op];",
            "GRANT VIEW CHANGE TRACKING ON [sched].[appointment] TO [op];",
        ] {
            assert!(script.lines().any(|l| l == line), "missing {line:?} in\n{script}");
        }

        config.url = "firebird://sysdba:masterkey@127.0.0.1:3050/data/op.fdb".into();
        let script = source_script(&SourceNeeds::of_config("op", &config).unwrap());
        assert!(
            script.contains("CREATE USER SYSDBA PASSWORD '<choose a password>';"),
            "{script}"
        );
        assert!(
            script.contains("GRANT SELECT ON TABLE PATIENT TO USER SYSDBA;"),
            "{script}"
        );
        assert!(script.contains("GRANT SELECT, DELETE ON TABLE OUTPOST_CHANGES TO USER SYSDBA;"));
        assert!(!script.contains("masterkey"));

        config.url = "sqlite:/srv/pms.db".into();
        let script = source_script(&SourceNeeds::of_config("lite", &config).unwrap());
        assert!(
            script.contains("chmod 640") && !script.contains("GRANT"),
            "{script}"
        );
    }

    #[test]
    fn statements_name_their_table_and_columns() {
        let s = parse_statement(
            "INSERT INTO appointment (patnum, start_at, \"Note\") VALUES (:pat, :start, lower(:note)) RETURNING aptnum",
        )
        .unwrap();
        assert_eq!(s.verb, Verb::Insert);
        assert_eq!(s.table, "appointment");
        assert_eq!(s.written, Some(set(&["Note", "patnum", "start_at"])));
        assert_eq!(s.read, set(&["aptnum"]));

        let s = parse_statement(
            "UPDATE pms.appointment SET start_at = :start, note = note || ' (moved)' WHERE aptnum = :id AND status <> 'x;y';",
        )
        .unwrap();
        assert_eq!(s.table, "pms.appointment");
        assert_eq!(s.written, Some(set(&["note", "start_at"])));
        assert_eq!(s.read, set(&["aptnum", "note", "status"]));

        let s = parse_statement("DELETE FROM appointment WHERE aptnum = $1::int").unwrap();
        assert_eq!((s.verb, s.written.clone()), (Verb::Delete, None));
        assert_eq!(s.read, set(&["aptnum"]));

        let s = parse_statement("insert into t values (?, ?)").unwrap();
        assert_eq!(s.written, None);

        let s = parse_statement(
            "INSERT INTO t (a, b) VALUES (:a, :b) ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b",
        )
        .unwrap();
        assert_eq!(s.written, Some(set(&["a", "b"])));

        assert!(parse_statement("SELECT * FROM patient").is_err());
        assert!(parse_statement("DELETE FROM a; DROP TABLE b").is_err());
        assert!(parse_statement("UPDATE a SET x = 1 FROM b WHERE a.id = b.id").is_err());
    }

    #[test]
    fn sink_scripts_grant_exactly_the_writes() {
        let needs = SinkNeeds::of_operations(
            "pms_write",
            "postgres://writer:pw@127.0.0.1/pms",
            [
                (
                    "create_appointment",
                    "INSERT INTO appointment (patnum, start_at) VALUES (:pat, :start)",
                ),
                (
                    "move_appointment",
                    "UPDATE appointment SET start_at = :start WHERE aptnum = :id",
                ),
                (
                    "cancel_appointment",
                    "DELETE FROM appointment WHERE aptnum = :id",
                ),
            ],
        )
        .unwrap();
        let script = sink_script(&needs);
        for line in [
            "GRANT INSERT (\"patnum\", \"start_at\") ON TABLE \"appointment\" TO \"writer\";",
            "GRANT UPDATE (\"start_at\") ON TABLE \"appointment\" TO \"writer\";",
            "GRANT DELETE ON TABLE \"appointment\" TO \"writer\";",
            "GRANT SELECT (\"aptnum\") ON TABLE \"appointment\" TO \"writer\";  -- read by WHERE, RETURNING or SET expressions",
        ] {
            assert!(script.lines().any(|l| l == line), "missing {line:?} in\n{script}");
        }
        assert!(
            !script.contains("TRUNCATE") && !script.contains(":pw"),
            "{script}"
        );

        let needs = SinkNeeds::of_operations(
            "w",
            "mysql://writer:pw@127.0.0.1/od",
            [("a", "INSERT INTO appointment (PatNum) VALUES (:p)")],
        )
        .unwrap();
        assert!(sink_script(&needs)
            .contains("GRANT INSERT (`PatNum`) ON `od`.`appointment` TO 'writer'@'%';"));

        let err = SinkNeeds::of_operations("w", "postgres://h/db", [("bad", "SELECT 1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("operations.bad"), "{err}");
    }
}
