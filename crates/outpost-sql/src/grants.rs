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
    /// The configured key columns (`outpost sql check` wants them NOT NULL).
    pub key: Vec<String>,
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
                key: table.key.clone(),
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
    /// Columns read by `WHERE`, `RETURNING` and `SET` expressions and conflict targets.
    pub read: BTreeSet<String>,
    /// An `INSERT`'s upsert targets (`ON CONFLICT … DO UPDATE SET a = …`, `ON DUPLICATE
    /// KEY UPDATE a = …`): updated when the row exists.
    pub upserted: BTreeSet<String>,
    /// The columns a `RETURNING` (SQL Server: `OUTPUT`) clause names, also in `read`;
    /// `None`: no such clause.
    pub returned: Option<BTreeSet<String>>,
    /// `RETURNING *` or `t.*`: every column is read.
    pub returns_all: bool,
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
    /// `SELECT` on these columns (read by `WHERE`, `RETURNING`, `SET` expressions; on
    /// MariaDB also those an `INSERT … RETURNING` inserts and those an `ON DUPLICATE KEY
    /// UPDATE` sets).
    pub select: BTreeSet<String>,
    /// `SELECT` on the whole table (`RETURNING *`).
    pub select_all: bool,
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
            let statement = parse_statement_in(dialect, sql).map_err(|message| {
                SqlError::Config(format!("sink {name}: operations.{operation}: {message}"))
            })?;
            let needs = statement_needs(dialect, &statement);
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
            entry.insert = match (entry.insert.take(), needs.insert) {
                (had, None) => had,
                (None, more) => more,
                (Some(None), _) | (_, Some(None)) => Some(None),
                (Some(Some(mut had)), Some(Some(more))) => {
                    had.extend(more);
                    Some(Some(had))
                }
            };
            entry.update.extend(needs.update);
            entry.delete |= needs.delete;
            entry.select.extend(needs.select);
            entry.select_all |= needs.select_all;
        }
        Ok(SinkNeeds {
            name: name.to_owned(),
            dialect,
            account: Account::of_url(url),
            tables,
        })
    }
}

/// What one statement needs on its table, as `dialect` checks privileges.
fn statement_needs(dialect: Dialect, statement: &Statement) -> TableWrites {
    let mut needs = TableWrites {
        table: statement.table.clone(),
        select: statement.read.clone(),
        select_all: statement.returns_all,
        ..TableWrites::default()
    };
    match statement.verb {
        Verb::Insert => {
            needs.insert = Some(statement.written.clone());
            // PostgreSQL wants UPDATE on the targets of `DO UPDATE SET`.
            needs.update = statement.upserted.clone();
            if dialect == Dialect::MariaDb {
                mariadb_insert_needs(statement, &mut needs);
            }
        }
        Verb::Update => needs.update = statement.written.clone().unwrap_or_default(),
        Verb::Delete => needs.delete = true,
    }
    needs
}

/// MariaDB checks more than the statement's reads and writes for an `INSERT` (found on
/// MariaDB 10.11 with column grants; anything less is refused with error 1143):
///
/// - with `RETURNING`, INSERT and SELECT on every column it inserts or names in
///   `RETURNING` (even `RETURNING 1` wants SELECT on the inserted ones). `RETURNING *`
///   wants SELECT on the whole table and nothing more; an `INSERT` without a column list
///   (INSERT on the whole table) wants SELECT only on the columns `RETURNING` names;
/// - with `ON DUPLICATE KEY UPDATE`, UPDATE on the columns inserted (and returned) as well
///   as the ones set, and SELECT on the ones set.
fn mariadb_insert_needs(statement: &Statement, needs: &mut TableWrites) {
    let mut named = statement.written.clone().unwrap_or_default();
    if let Some(returned) = &statement.returned {
        named.extend(returned.iter().cloned());
        if let Some(Some(inserted)) = &mut needs.insert {
            inserted.extend(named.iter().cloned());
        }
        needs.select.extend(named.iter().cloned());
    }
    if !statement.upserted.is_empty() {
        needs.update.extend(named);
        needs.select.extend(statement.upserted.iter().cloned());
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    /// A quoted identifier, unquoted.
    Quoted(String),
    /// A `:name`, `$1`, `?` or `@name` parameter, or a `@@name`/`@@scope.name` system
    /// variable: never a column.
    Param,
    /// A string or number literal.
    Literal,
    Punct(char),
}

/// How a dialect's lexer reads quotes and comments, as far as telling a column from text
/// goes: a string read as an identifier would be granted as a column (and the grant then
/// fails), and a comment read as code would grant what it mentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lexer {
    /// MariaDB/MySQL in the write-back session's `sql_mode` (no `ANSI_QUOTES`, no
    /// `NO_BACKSLASH_ESCAPES`, see `writeback/mysql.rs`): `#` starts a comment, `--` does
    /// only before a space or control character, `"…"` is a string, a backslash escapes in
    /// strings, a `_charset` word before a string is its introducer, and `/*! */`
    /// comments are code.
    mysql: bool,
    /// `/* /* */ */` nests (PostgreSQL, SQL Server); elsewhere the first `*/` ends it.
    nested_comments: bool,
}

impl Lexer {
    fn of(dialect: Dialect) -> Lexer {
        Lexer {
            mysql: dialect == Dialect::MariaDb,
            nested_comments: matches!(dialect, Dialect::Postgres | Dialect::SqlServer),
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// The index just past the quote that closes the run opened at `start`: a doubled quote
/// is part of the run, and with `backslash` a backslash escapes the next character.
fn quoted_end(chars: &[char], start: usize, backslash: bool) -> Option<usize> {
    let quote = chars[start];
    let mut j = start + 1;
    while j < chars.len() {
        let c = chars[j];
        // An escaped character, or a doubled quote, stays in the run.
        if (backslash && c == '\\') || (c == quote && chars.get(j + 1) == Some(&quote)) {
            j += 2;
        } else if c == quote {
            return Some(j + 1);
        } else {
            j += 1;
        }
    }
    None
}

/// The end of a string literal starting at `start`.
fn string_end(chars: &[char], start: usize, backslash: bool) -> Result<usize, String> {
    quoted_end(chars, start, backslash).ok_or_else(|| "a string literal is not closed".into())
}

fn tokenize(sql: &str, lexer: Lexer) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let closing = |open: char| match open {
        '[' => ']',
        other => other,
    };
    let word_at = |i: usize| chars.get(i).is_some_and(|&d| is_word_char(d));
    // Past a run of word characters starting at `i`.
    let word_end = |mut i: usize| {
        while chars.get(i).is_some_and(|&d| is_word_char(d)) {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if (c == '-'
            && next == Some('-')
            // MariaDB reads `1--2` as 1 minus minus 2: only `-- ` starts a comment.
            && (!lexer.mysql
                || chars
                    .get(i + 2)
                    .is_none_or(|d| d.is_whitespace() || d.is_control())))
            || (c == '#' && lexer.mysql)
        {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            if lexer.mysql
                && (chars.get(i + 2) == Some(&'!')
                    || (chars.get(i + 2) == Some(&'M') && chars.get(i + 3) == Some(&'!')))
            {
                // The server runs what is inside; a scanner that skipped it would grant
                // less than the statement uses (and the write-back refuses them too).
                return Err("executable comments (/*! */, /*M! */) are not taken: write the statement without them".into());
            }
            let mut depth = 0usize;
            loop {
                match (chars.get(i), chars.get(i + 1)) {
                    (None, _) | (_, None) => return Err("a comment is not closed".into()),
                    (Some('/'), Some('*')) if depth == 0 || lexer.nested_comments => {
                        depth += 1;
                        i += 2;
                    }
                    (Some('*'), Some('/')) => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => i += 1,
                }
            }
        } else if c == '\'' || (c == '"' && lexer.mysql) {
            // In MariaDB's session `"…"` is a string like `'…'`, never an identifier.
            i = string_end(&chars, i, lexer.mysql)?;
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
        } else if c == '@' && next == Some('@') {
            // A system variable, `@@time_zone` or `@@session.time_zone`: its scope is not
            // a table and its name not a column.
            i = word_end(i + 2);
            if chars.get(i) == Some(&'.') && word_at(i + 1) {
                i = word_end(i + 1);
            }
            tokens.push(Token::Param);
        } else if c == '@' && lexer.mysql && next.is_some_and(|d| d == '\'' || d == '"' || d == '`')
        {
            // A user variable with a quoted name, `@'my var'` (a backslash escapes in the
            // string forms, not in the backquoted one).
            i = quoted_end(&chars, i + 1, next != Some('`'))
                .ok_or("a quoted variable name is not closed")?;
            tokens.push(Token::Param);
        } else if (c == ':' || c == '@' || c == '$')
            && next.is_some_and(|d| d.is_alphanumeric() || d == '_')
        {
            i += 1;
            while chars
                .get(i)
                .is_some_and(|d| d.is_alphanumeric() || *d == '_')
            {
                i += 1;
            }
            tokens.push(Token::Param);
        } else if c == ':' && next == Some(':') {
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
            i = word_end(i);
            let word: String = chars[start..i].iter().collect();
            if let Some(end) = prefixed_string(&chars, &word, i, lexer)? {
                // `E'…'`, `N'…'`, `X'…'`, `B'…'`, `_utf8mb4'…'`: the prefix is part of the
                // literal, not a column.
                i = end;
                tokens.push(Token::Literal);
            } else {
                tokens.push(Token::Word(word));
            }
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    Ok(tokens)
}

/// If `word` (ending at `end`) is the prefix of a string literal, the end of that literal.
fn prefixed_string(
    chars: &[char],
    word: &str,
    end: usize,
    lexer: Lexer,
) -> Result<Option<usize>, String> {
    let lower = word.to_ascii_lowercase();
    let quote_at = |at: usize| {
        chars
            .get(at)
            .is_some_and(|&q| q == '\'' || (q == '"' && lexer.mysql))
    };
    if matches!(lower.as_str(), "e" | "n" | "x" | "b") && quote_at(end) {
        // PostgreSQL's `E'…'` takes backslash escapes; MariaDB's strings all do.
        return string_end(chars, end, lexer.mysql || lower == "e").map(Some);
    }
    if lexer.mysql && lower.starts_with('_') && lower.len() > 1 {
        // A character set introducer, `_utf8mb4 'x'` (a space is allowed before the string).
        let mut at = end;
        while chars.get(at).is_some_and(|d| d.is_whitespace()) {
            at += 1;
        }
        if quote_at(at) {
            return string_end(chars, at, true).map(Some);
        }
    }
    Ok(None)
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
    "constraint",
    "order",
    // MariaDB's operators and niladic functions.
    "div",
    "mod",
    "xor",
    "regexp",
    "rlike",
    "localtime",
    "session_user",
    "utc_date",
    "utc_time",
    "utc_timestamp",
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
/// parameters or qualifiers (of `t.col`, only `col`), nor the names and types that follow
/// `AS` (an alias, `CAST(:v AS DATETIME)`), a constraint's name, or a unit
/// (`INTERVAL 1 DAY`, `EXTRACT(YEAR FROM …)`, `TIMESTAMPDIFF(MINUTE, …)`).
fn columns_in(tokens: &[Token], out: &mut BTreeSet<String>) {
    let mut after_as = false;
    for (index, token) in tokens.iter().enumerate() {
        let before = |back: usize| index.checked_sub(back).and_then(|at| tokens.get(at));
        let name = match token {
            Token::Word(w) if w.eq_ignore_ascii_case("as") => {
                after_as = true;
                continue;
            }
            // `AS timestamp with time zone`, `AS CHAR CHARACTER SET utf8mb4`, `AS "Alias"`:
            // every word up to the next other token names a type or an alias.
            Token::Word(_) | Token::Quoted(_) if after_as => continue,
            Token::Word(w) if !is_keyword(w) => w,
            Token::Quoted(q) => q,
            Token::Word(_) => continue,
            _ => {
                after_as = false;
                continue;
            }
        };
        let next = tokens.get(index + 1);
        if next == Some(&Token::Punct('(')) || next == Some(&Token::Punct('.')) {
            continue;
        }
        if word_is(before(1), "constraint") {
            continue;
        }
        if matches!(before(1), Some(Token::Literal | Token::Param))
            && word_is(before(2), "interval")
        {
            continue;
        }
        if before(1) == Some(&Token::Punct('('))
            && ["extract", "timestampdiff", "timestampadd"]
                .iter()
                .any(|f| word_is(before(2), f))
        {
            continue;
        }
        out.insert(name.clone());
    }
}

/// Whether a `RETURNING`/`OUTPUT` list has a `*` or `t.*` item: every column is read.
fn names_every_column(tokens: &[Token]) -> bool {
    tokens.iter().enumerate().any(|(index, token)| {
        *token == Token::Punct('*')
            && matches!(
                index.checked_sub(1).map(|at| &tokens[at]),
                None | Some(Token::Punct(',' | '.'))
            )
    })
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

/// Reads an `INSERT`, `UPDATE` or `DELETE` as PostgreSQL's lexer would: see
/// [`parse_statement_in`].
pub fn parse_statement(sql: &str) -> Result<Statement, String> {
    parse_statement_in(Dialect::Postgres, sql)
}

/// MariaDB's words between the verb and the table (`INSERT IGNORE INTO`, `DELETE QUICK
/// FROM`, `UPDATE LOW_PRIORITY t`).
const MYSQL_MODIFIERS: &[&str] = &[
    "low_priority",
    "delayed",
    "high_priority",
    "ignore",
    "quick",
];

/// Reads an `INSERT`, `UPDATE` or `DELETE` with `dialect`'s quotes and comments: its table,
/// the columns it writes and the columns it reads. Anything else is refused with a reason.
pub fn parse_statement_in(dialect: Dialect, sql: &str) -> Result<Statement, String> {
    let lexer = Lexer::of(dialect);
    let mut tokens = tokenize(sql, lexer)?;
    while tokens.last() == Some(&Token::Punct(';')) {
        tokens.pop();
    }
    if tokens.contains(&Token::Punct(';')) {
        return Err("expected one statement, found several".into());
    }
    let mut i = 1;
    if lexer.mysql {
        while MYSQL_MODIFIERS.iter().any(|m| word_is(tokens.get(i), m)) {
            i += 1;
        }
    }
    let first = tokens.first();
    let (verb, table) = if word_is(first, "insert") {
        if word_is(tokens.get(i), "into") {
            i += 1;
        } else if !lexer.mysql {
            // MariaDB takes `INSERT t …`; the others want INTO.
            return Err("expected INSERT INTO <table>".into());
        }
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
    let mut upserted = BTreeSet::new();
    // Table alias (`UPDATE patient p SET …`): skip it.
    if matches!(tokens.get(i), Some(Token::Word(w)) if !is_keyword(w) || w.eq_ignore_ascii_case("as"))
    {
        if word_is(tokens.get(i), "as") {
            i += 1;
        }
        i += 1;
    }
    let returning_at =
        find_keyword(&tokens, i, "returning").or_else(|| find_keyword(&tokens, i, "output"));
    let returning = returning_at.unwrap_or(tokens.len());
    // What RETURNING names is kept apart: MariaDB checks more than SELECT on it.
    let (returned, returns_all) = match returning_at {
        Some(at) => {
            let list = &tokens[(at + 1).min(tokens.len())..];
            let mut columns = BTreeSet::new();
            columns_in(list, &mut columns);
            read.extend(columns.iter().cloned());
            (Some(columns), names_every_column(list))
        }
        None => (None, false),
    };
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
            } else if lexer.mysql && word_is(tokens.get(i), "set") {
                // MariaDB's `INSERT INTO t SET a = :a, b = :b`: the targets are its column
                // list.
                let end = find_keyword(&tokens, i, "on")
                    .unwrap_or(returning)
                    .min(returning);
                let mut columns = BTreeSet::new();
                assignments(&tokens[i + 1..end.max(i + 1)], &mut columns, &mut read)?;
                written = Some(columns);
                i = end;
            }
            // `ON CONFLICT (…) DO UPDATE SET a = … [WHERE …]` / `ON DUPLICATE KEY UPDATE
            // a = …`: the values and the conflict target are read, the targets updated
            // when the row exists.
            let update = find_keyword(&tokens, i, "update").filter(|&u| u < returning);
            let values_end = update.unwrap_or(returning);
            // (`VALUES(b)` after the UPDATE is MariaDB's function, not the row list.)
            let values = find_keyword(&tokens, i, "values").filter(|&v| v < values_end);
            if values.is_none() && find_keyword(&tokens, i, "select").is_some() {
                return Err("INSERT … SELECT reads other tables: write the grants by hand".into());
            }
            columns_in(
                &tokens[values.unwrap_or(i).min(values_end)..values_end],
                &mut read,
            );
            if let Some(update) = update {
                let end = find_keyword(&tokens, update, "where")
                    .unwrap_or(returning)
                    .min(returning);
                let start = if word_is(tokens.get(update + 1), "set") {
                    update + 2
                } else {
                    update + 1
                };
                assignments(&tokens[start.min(end)..end], &mut upserted, &mut read)?;
                columns_in(&tokens[end..returning], &mut read);
            }
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
        upserted,
        returned,
        returns_all,
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
        if table.select_all {
            out.push_str(&format!(
                "GRANT SELECT ON {on} TO {grantee};  -- RETURNING * reads every column\n"
            ));
        } else if !table.select.is_empty() {
            let why = if d == Dialect::MariaDb {
                ";  -- read by WHERE, RETURNING or SET expressions; MariaDB also checks the columns of an INSERT … RETURNING or ON DUPLICATE KEY UPDATE\n"
            } else {
                ";  -- read by WHERE, RETURNING or SET expressions\n"
            };
            out.push_str(&columns_for("SELECT", &table.select).replace(";\n", why));
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
        assert_eq!(s.upserted, set(&["b"]));
        // The conflict target is read (PostgreSQL wants SELECT on it), EXCLUDED.b too.
        assert_eq!(s.read, set(&["a", "b"]));
        assert_eq!(s.returned, None);

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

    /// The script's lines for one MariaDB sink with `operations`, on database `od`.
    fn mariadb_script(operations: &[(&str, &str)]) -> String {
        let needs = SinkNeeds::of_operations(
            "w",
            "mysql://writer:pw@127.0.0.1/od",
            operations.iter().copied(),
        )
        .unwrap();
        sink_script(&needs)
    }

    fn has_line(script: &str, line: &str) {
        assert!(
            script
                .lines()
                .any(|l| l == line || l.starts_with(&format!("{line}  --"))),
            "missing {line:?} in\n{script}"
        );
    }

    #[test]
    fn mariadb_insert_returning_wants_insert_and_select_on_both_lists() {
        let sql = "INSERT INTO appointment (PatNum, AptDateTime, Note) VALUES (:patnum, :start, :note) RETURNING AptNum, AptDateTime, Note";
        let script = mariadb_script(&[("book", sql)]);
        has_line(
            &script,
            "GRANT INSERT (`AptDateTime`, `AptNum`, `Note`, `PatNum`) ON `od`.`appointment` TO 'writer'@'%';",
        );
        has_line(
            &script,
            "GRANT SELECT (`AptDateTime`, `AptNum`, `Note`, `PatNum`) ON `od`.`appointment` TO 'writer'@'%';",
        );
        // PostgreSQL checks only what the statement writes and reads.
        let needs =
            SinkNeeds::of_operations("w", "postgres://writer@h/pms", [("book", sql)]).unwrap();
        let pg = sink_script(&needs);
        has_line(
            &pg,
            "GRANT INSERT (\"AptDateTime\", \"Note\", \"PatNum\") ON TABLE \"appointment\" TO \"writer\";",
        );
        has_line(
            &pg,
            "GRANT SELECT (\"AptDateTime\", \"AptNum\", \"Note\") ON TABLE \"appointment\" TO \"writer\";",
        );
        // Even a RETURNING that names no column wants SELECT on the inserted ones; without
        // RETURNING, nothing is read.
        let script = mariadb_script(&[("a", "INSERT INTO t (a, b) VALUES (:a, :b) RETURNING 1")]);
        has_line(
            &script,
            "GRANT SELECT (`a`, `b`) ON `od`.`t` TO 'writer'@'%';",
        );
        let script = mariadb_script(&[("a", "INSERT INTO t SET a = :a, b = :b RETURNING c")]);
        has_line(
            &script,
            "GRANT INSERT (`a`, `b`, `c`) ON `od`.`t` TO 'writer'@'%';",
        );
        has_line(
            &script,
            "GRANT SELECT (`a`, `b`, `c`) ON `od`.`t` TO 'writer'@'%';",
        );
        let script = mariadb_script(&[("a", "INSERT INTO t (a, b) VALUES (:a, :b)")]);
        assert!(!script.contains("GRANT SELECT"), "{script}");
    }

    #[test]
    fn mariadb_insert_without_a_column_list_returning() {
        // INSERT on the whole table covers the returned columns; MariaDB 10.11 then wants
        // SELECT on the returned columns only (checked on the server: no table-level
        // SELECT needed).
        let script = mariadb_script(&[(
            "add",
            "INSERT INTO patient VALUES (:patnum, :lname, :fname) RETURNING PatNum, LName",
        )]);
        has_line(&script, "GRANT INSERT ON `od`.`patient` TO 'writer'@'%';");
        has_line(
            &script,
            "GRANT SELECT (`LName`, `PatNum`) ON `od`.`patient` TO 'writer'@'%';",
        );
        assert!(
            !script.contains("GRANT SELECT ON `od`.`patient`"),
            "{script}"
        );
        // A later operation with a column list keeps the whole-table INSERT.
        let script = mariadb_script(&[
            (
                "add",
                "INSERT INTO patient VALUES (:p, :l) RETURNING PatNum",
            ),
            (
                "add2",
                "INSERT INTO patient (PatNum) VALUES (:p) RETURNING LName",
            ),
        ]);
        has_line(&script, "GRANT INSERT ON `od`.`patient` TO 'writer'@'%';");
        has_line(
            &script,
            "GRANT SELECT (`LName`, `PatNum`) ON `od`.`patient` TO 'writer'@'%';",
        );
    }

    #[test]
    fn returning_star_wants_select_on_the_whole_table() {
        for url in ["mysql://writer@h/od", "postgres://writer@h/od"] {
            let needs = SinkNeeds::of_operations(
                "w",
                url,
                [("add", "INSERT INTO t (a) VALUES (:a) RETURNING t.*, a * 2")],
            )
            .unwrap();
            assert!(needs.tables[0].select_all, "{url}");
            let script = sink_script(&needs);
            assert!(
                script.contains("GRANT SELECT ON ")
                    && script.contains("-- RETURNING * reads every column"),
                "{script}"
            );
        }
        let s = parse_statement("DELETE FROM t WHERE id = :id RETURNING *").unwrap();
        assert!(s.returns_all);
        let s = parse_statement("UPDATE t SET a = b * 2 WHERE id = :id RETURNING a * 2").unwrap();
        assert!(!s.returns_all);
    }

    #[test]
    fn upserts_want_update_on_what_they_set() {
        let needs = SinkNeeds::of_operations(
            "w",
            "postgres://writer@h/pms",
            [(
                "upsert",
                "INSERT INTO t (id, a) VALUES (:id, :a) ON CONFLICT (id) DO UPDATE SET b = EXCLUDED.b WHERE t.c > 1",
            )],
        )
        .unwrap();
        let t = &needs.tables[0];
        assert_eq!(t.insert, Some(Some(set(&["a", "id"]))));
        assert_eq!(t.update, set(&["b"]));
        assert_eq!(t.select, set(&["b", "c", "id"]));
        // MariaDB: UPDATE on the inserted columns too, SELECT on the ones set.
        let script = mariadb_script(&[(
            "upsert",
            "INSERT INTO appointment (PatNum, AptDateTime, Note) VALUES (:p, :s, :n) ON DUPLICATE KEY UPDATE Note = VALUES(Note)",
        )]);
        has_line(
            &script,
            "GRANT INSERT (`AptDateTime`, `Note`, `PatNum`) ON `od`.`appointment` TO 'writer'@'%';",
        );
        has_line(
            &script,
            "GRANT UPDATE (`AptDateTime`, `Note`, `PatNum`) ON `od`.`appointment` TO 'writer'@'%';",
        );
        has_line(
            &script,
            "GRANT SELECT (`Note`) ON `od`.`appointment` TO 'writer'@'%';",
        );
        let script = mariadb_script(&[(
            "upsert",
            "INSERT INTO t VALUES (:id, :b) ON DUPLICATE KEY UPDATE b = 3 RETURNING id",
        )]);
        has_line(&script, "GRANT INSERT ON `od`.`t` TO 'writer'@'%';");
        has_line(
            &script,
            "GRANT UPDATE (`b`, `id`) ON `od`.`t` TO 'writer'@'%';",
        );
        has_line(
            &script,
            "GRANT SELECT (`b`, `id`) ON `od`.`t` TO 'writer'@'%';",
        );
    }

    #[test]
    fn system_variables_are_not_columns() {
        for dialect in [Dialect::MariaDb, Dialect::Postgres, Dialect::SqlServer] {
            let s = parse_statement_in(
                dialect,
                "INSERT INTO appointment (start) VALUES (CONVERT_TZ(:start, '+00:00', @@session.time_zone)) \
                 RETURNING @@time_zone, @@GLOBAL.time_zone, @v, @@identity",
            )
            .unwrap();
            assert_eq!(s.written, Some(set(&["start"])), "{dialect:?}");
            assert_eq!(s.read, BTreeSet::new(), "{dialect:?}");
        }
        let s = parse_statement_in(
            Dialect::MariaDb,
            "UPDATE t SET a = @`my var`, b = @'x''y' WHERE id = @@session.sql_mode",
        )
        .unwrap();
        assert_eq!((s.written, s.read), (Some(set(&["a", "b"])), set(&["id"])));
    }

    #[test]
    fn mariadb_comments_are_not_read() {
        let s = parse_statement_in(
            Dialect::MariaDb,
            "UPDATE t SET a = :a # and b = c, it's done\nWHERE id = :id -- d = e\n",
        )
        .unwrap();
        assert_eq!(s.written, Some(set(&["a"])));
        assert_eq!(s.read, set(&["id"]));
        // `--` without a space is minus minus, not a comment.
        let s =
            parse_statement_in(Dialect::MariaDb, "UPDATE t SET a = 1--b\nWHERE id = :id").unwrap();
        assert_eq!(s.read, set(&["b", "id"]));
        // Comments do not nest in MariaDB; they do in PostgreSQL.
        let s = parse_statement_in(
            Dialect::MariaDb,
            "UPDATE t SET a = /* x /* y */ b WHERE id = 1",
        )
        .unwrap();
        assert_eq!(s.read, set(&["b", "id"]));
        let s = parse_statement_in(
            Dialect::Postgres,
            "UPDATE t SET a = /* x /* y */ b */ c WHERE id = 1",
        )
        .unwrap();
        assert_eq!(s.read, set(&["c", "id"]));
        // Executable comments are code to MariaDB.
        for sql in [
            "UPDATE t SET a = 1 /*! , b = 2 */ WHERE id = :id",
            "UPDATE t SET a = 1 /*M!100500 , b = 2 */ WHERE id = :id",
        ] {
            let err = parse_statement_in(Dialect::MariaDb, sql).unwrap_err();
            assert!(err.contains("executable comments"), "{err}");
        }
        assert!(parse_statement_in(Dialect::MariaDb, "UPDATE t SET a = 1 /* open").is_err());
    }

    #[test]
    fn backslash_escaped_quotes_stay_in_their_string() {
        let sql = "UPDATE t SET note = 'it\\'s, x = y' WHERE id = :id";
        let s = parse_statement_in(Dialect::MariaDb, sql).unwrap();
        assert_eq!(s.written, Some(set(&["note"])));
        assert_eq!(s.read, set(&["id"]));
        // In standard SQL the backslash is a character: that string ends early, and the
        // rest leaves a quote open.
        assert!(parse_statement(sql).is_err());
        // PostgreSQL's E'…' strings take backslash escapes; the E is not a column.
        let s = parse_statement("UPDATE t SET note = E'it\\'s, x = y' WHERE id = :id").unwrap();
        assert_eq!(s.read, set(&["id"]));
        // An escaped backslash ends before the quote.
        let s = parse_statement_in(Dialect::MariaDb, "UPDATE t SET a = 'x\\\\', b = c").unwrap();
        assert_eq!((s.written, s.read), (Some(set(&["a", "b"])), set(&["c"])));
        // Prefixed strings and introducers are literals.
        let s = parse_statement_in(
            Dialect::MariaDb,
            "UPDATE t SET a = _utf8mb4 'x', b = _binary\"y\", c = X'4F', d = N'z' WHERE id = :id",
        )
        .unwrap();
        assert_eq!(s.read, set(&["id"]));
    }

    #[test]
    fn double_quotes_are_strings_in_mariadb_and_names_elsewhere() {
        let sql = "UPDATE t SET note = \"done \\\" \"\" here\" WHERE id = :id";
        let s = parse_statement_in(Dialect::MariaDb, sql).unwrap();
        assert_eq!(s.read, set(&["id"]));
        let s = parse_statement_in(
            Dialect::MariaDb,
            "UPDATE t SET note = \"done\" WHERE id = :id",
        )
        .unwrap();
        assert_eq!(s.read, set(&["id"]));
        let s = parse_statement_in(
            Dialect::Postgres,
            "UPDATE t SET note = \"done\" WHERE id = :id",
        )
        .unwrap();
        assert_eq!(s.read, set(&["done", "id"]));
        // Through the sink: the string is no granted column.
        let script = mariadb_script(&[("a", "INSERT INTO t (a) VALUES (\"x\") RETURNING id")]);
        assert!(!script.contains("`x`"), "{script}");
        // A MariaDB table name is never a string.
        assert!(parse_statement_in(Dialect::MariaDb, "UPDATE \"t\" SET a = 1").is_err());
        let s = parse_statement_in(Dialect::MariaDb, "UPDATE `my t` SET `a b` = 1").unwrap();
        assert_eq!((s.table.as_str(), s.written), ("my t", Some(set(&["a b"]))));
    }

    #[test]
    fn types_aliases_and_units_are_not_columns() {
        let s = parse_statement_in(
            Dialect::MariaDb,
            "INSERT IGNORE INTO appointment (start, n) VALUES (CAST(:s AS DATETIME), CAST(:n AS CHAR CHARACTER SET utf8mb4)) \
             RETURNING aptnum AS id, start + INTERVAL 1 DAY, EXTRACT(YEAR FROM start), TIMESTAMPDIFF(MINUTE, start, NOW()), n DIV 2",
        )
        .unwrap();
        assert_eq!(s.table, "appointment");
        assert_eq!(s.returned, Some(set(&["aptnum", "n", "start"])));
        let s = parse_statement(
            "UPDATE t SET a = CAST(:a AS timestamp with time zone) WHERE id = :id RETURNING a AS \"A\"",
        )
        .unwrap();
        assert_eq!(s.read, set(&["a", "id"]));
        let s = parse_statement(
            "INSERT INTO t (id, a) VALUES (:id, :a) ON CONFLICT ON CONSTRAINT t_pkey DO NOTHING",
        )
        .unwrap();
        assert_eq!(s.read, BTreeSet::new());
        let s = parse_statement_in(
            Dialect::MariaDb,
            "DELETE LOW_PRIORITY FROM t WHERE id = :id ORDER BY id LIMIT 1",
        )
        .unwrap();
        assert_eq!((s.table.as_str(), s.read), ("t", set(&["id"])));
    }
}
