//! `:name` placeholders in a configured statement, turned into the dialect's bind syntax.
//!
//! The statement is scanned once, as the database's lexer would ([`Lexing`] says how):
//! text inside `'…'` strings (with `''`, and backslash escapes in PostgreSQL `E'…'`
//! strings or where the dialect treats backslashes as escapes), `"…"` and `` `…` ``
//! quoted identifiers (MySQL: `"…"` strings), PostgreSQL `$tag$…$tag$` dollar quoting,
//! `-- …` line comments (MySQL: only before a space or control character, and `# …` too)
//! and `/* … */` block comments (nested, as PostgreSQL allows; MySQL's end at the first
//! `*/`) is copied unchanged. Outside them, `::` (a PostgreSQL cast) is copied unchanged,
//! and `:name` (a letter or `_`, then letters, digits or `_`) is a placeholder. A `:`
//! followed by anything else is copied unchanged, so `a[1:2]` and `x := 1` are left
//! alone; `arr[lo:hi]` must be written `arr[lo : hi]`.
//!
//! Raw positional markers (`$1`, and `?` where the dialect binds with `?`) are refused:
//! values reach a statement only through named placeholders.

use std::collections::BTreeSet;

/// How a dialect writes bind parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindStyle {
    /// `$1`, `$2`… one number per distinct name (PostgreSQL).
    Dollar,
    /// `?1`, `?2`… one number per distinct name (SQLite).
    QuestionNumbered,
    /// `?` per occurrence; a repeated name is bound again (MySQL/MariaDB).
    Question,
}

/// How the statement's strings and comments are read: a placeholder is found only where
/// the database would see code, so that no value is bound inside a string or comment, and
/// none is left unbound in code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexing {
    /// A backslash escapes the next character inside every `'…'` string (and `"…"`
    /// string, with `double_quoted_strings`), as MySQL's default `sql_mode` has it, not
    /// only inside PostgreSQL `E'…'` strings.
    pub backslash_escapes: bool,
    /// `"…"` is a string (MySQL without `ANSI_QUOTES`), not a quoted identifier.
    pub double_quoted_strings: bool,
    /// `#` starts a comment to the end of the line (MySQL).
    pub hash_comments: bool,
    /// `--` starts a comment only before a space, a control character or the end of the
    /// statement (MySQL: `1--1` is one minus minus one); otherwise `--` always does.
    pub dash_comments_need_space: bool,
    /// `/* /* */ */` nests (PostgreSQL); otherwise the first `*/` ends a comment (MySQL).
    pub nested_comments: bool,
    /// `$$…$$` and `$tag$…$tag$` quote (PostgreSQL); otherwise `$` is an ordinary
    /// character (MySQL, where it may be part of a name).
    pub dollar_quotes: bool,
}

impl Lexing {
    /// PostgreSQL's rules, also used where no dialect differs in a way that matters
    /// (standard strings, nested comments, dollar quoting).
    pub const fn standard() -> Lexing {
        Lexing {
            backslash_escapes: false,
            double_quoted_strings: false,
            hash_comments: false,
            dash_comments_need_space: false,
            nested_comments: true,
            dollar_quotes: true,
        }
    }

    /// MariaDB/MySQL with the write-back session's `sql_mode` (no `ANSI_QUOTES`, no
    /// `NO_BACKSLASH_ESCAPES`; see `writeback/mysql.rs`).
    pub const fn mysql() -> Lexing {
        Lexing {
            backslash_escapes: true,
            double_quoted_strings: true,
            hash_comments: true,
            dash_comments_need_space: true,
            nested_comments: false,
            dollar_quotes: false,
        }
    }
}

impl Default for Lexing {
    /// [`Lexing::standard`]: what the scan did before dialects could say otherwise.
    fn default() -> Lexing {
        Lexing::standard()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(String),
}

/// A statement with its placeholders found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pieces: Vec<Piece>,
    /// Distinct placeholder names, in order of first appearance.
    names: Vec<String>,
    /// Raw positional markers found outside quotes (`$1`, `?`), for the dialect to refuse.
    positional: Vec<String>,
}

/// What is wrong with a statement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceholderError {
    /// A string, quoted identifier, dollar quote or comment is not closed.
    #[error("unterminated {0} in the statement")]
    Unterminated(&'static str),
    /// A positional marker instead of a `:name` placeholder.
    #[error("found the positional parameter {0:?}; use named placeholders like :patnum")]
    Positional(String),
}

impl Parsed {
    /// Scans `sql`.
    pub fn parse(sql: &str, lexing: Lexing) -> Result<Parsed, PlaceholderError> {
        let chars: Vec<char> = sql.chars().collect();
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut names: Vec<String> = Vec::new();
        let mut positional = Vec::new();
        let mut i = 0;
        let n = chars.len();
        while i < n {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            match c {
                '\'' => {
                    // E'…' (PostgreSQL escape string): the E was already copied.
                    let escape_string = lexing.backslash_escapes
                        || (i > 0
                            && matches!(chars[i - 1], 'e' | 'E')
                            && (i < 2 || !is_ident_char(chars[i - 2])));
                    let end = quoted_end(&chars, i, '\'', escape_string)
                        .ok_or(PlaceholderError::Unterminated("string"))?;
                    text.extend(&chars[i..end]);
                    i = end;
                }
                '"' if lexing.double_quoted_strings => {
                    let end = quoted_end(&chars, i, c, lexing.backslash_escapes)
                        .ok_or(PlaceholderError::Unterminated("string"))?;
                    text.extend(&chars[i..end]);
                    i = end;
                }
                '"' | '`' => {
                    let end = quoted_end(&chars, i, c, false)
                        .ok_or(PlaceholderError::Unterminated("quoted identifier"))?;
                    text.extend(&chars[i..end]);
                    i = end;
                }
                '#' if lexing.hash_comments => i = line_comment(&chars, i, &mut text),
                '-' if next == Some('-')
                    && (!lexing.dash_comments_need_space
                        || chars
                            .get(i + 2)
                            .is_none_or(|&c| c == ' ' || c.is_ascii_control())) =>
                {
                    i = line_comment(&chars, i, &mut text);
                }
                '/' if next == Some('*') => {
                    let mut depth = 0usize;
                    let mut j = i;
                    loop {
                        if j + 1 >= n {
                            return Err(PlaceholderError::Unterminated("comment"));
                        }
                        let opens = chars[j] == '/' && chars[j + 1] == '*';
                        if opens && (depth == 0 || lexing.nested_comments) {
                            depth += 1;
                            j += 2;
                        } else if chars[j] == '*' && chars[j + 1] == '/' {
                            depth -= 1;
                            j += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            j += 1;
                        }
                    }
                    text.extend(&chars[i..j]);
                    i = j;
                }
                '$' if next.is_some_and(|d| d.is_ascii_digit())
                    && (i == 0 || !is_ident_char(chars[i - 1])) =>
                {
                    let end = chars[i + 1..]
                        .iter()
                        .position(|c| !c.is_ascii_digit())
                        .map_or(n, |p| i + 1 + p);
                    positional.push(chars[i..end].iter().collect());
                    text.extend(&chars[i..end]);
                    i = end;
                }
                '$' if lexing.dollar_quotes && (i == 0 || !is_ident_char(chars[i - 1])) => {
                    // A dollar quote: `$$` or `$tag$` (tag: an identifier).
                    match dollar_tag(&chars, i) {
                        Some(tag_end) => {
                            let tag: Vec<char> = chars[i..tag_end].to_vec();
                            let close = find_seq(&chars, tag_end, &tag)
                                .ok_or(PlaceholderError::Unterminated("dollar-quoted string"))?;
                            let end = close + tag.len();
                            text.extend(&chars[i..end]);
                            i = end;
                        }
                        None => {
                            text.push(c);
                            i += 1;
                        }
                    }
                }
                '?' => {
                    positional.push("?".to_owned());
                    text.push(c);
                    i += 1;
                }
                ':' if next == Some(':') => {
                    text.push_str("::");
                    i += 2;
                }
                ':' if next.is_some_and(|c| c.is_alphabetic() || c == '_') => {
                    let end = chars[i + 1..]
                        .iter()
                        .position(|&c| !is_ident_char(c))
                        .map_or(n, |p| i + 1 + p);
                    let name: String = chars[i + 1..end].iter().collect();
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    if !names.contains(&name) {
                        names.push(name.clone());
                    }
                    pieces.push(Piece::Param(name));
                    i = end;
                }
                _ => {
                    text.push(c);
                    i += 1;
                }
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Parsed {
            pieces,
            names,
            positional,
        })
    }

    /// The distinct placeholder names, in order of first appearance.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Raw positional markers found outside quotes (`$1`, `?`).
    pub fn positional(&self) -> &[String] {
        &self.positional
    }

    /// Refuses raw positional markers the dialect would take as parameters: `$N`
    /// always, `?` where the dialect binds with `?` (in PostgreSQL `?` is a JSON operator).
    pub fn check_positional(&self, style: BindStyle) -> Result<(), PlaceholderError> {
        match self
            .positional
            .iter()
            .find(|p| p.starts_with('$') || style != BindStyle::Dollar)
        {
            Some(marker) => Err(PlaceholderError::Positional(marker.clone())),
            None => Ok(()),
        }
    }

    /// The statement in the dialect's syntax, and for each bind position the index (into
    /// [`Parsed::names`]) of the value it takes.
    pub fn render(&self, style: BindStyle) -> (String, Vec<usize>) {
        let mut sql = String::new();
        let mut order = Vec::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => sql.push_str(text),
                Piece::Param(name) => {
                    let index = self.names.iter().position(|n| n == name).unwrap_or(0);
                    match style {
                        BindStyle::Dollar => sql.push_str(&format!("${}", index + 1)),
                        BindStyle::QuestionNumbered => sql.push_str(&format!("?{}", index + 1)),
                        BindStyle::Question => {
                            sql.push('?');
                            order.push(index);
                        }
                    }
                }
            }
        }
        if style != BindStyle::Question {
            order = (0..self.names.len()).collect();
        }
        (sql, order)
    }

    /// Checks a call's values against the placeholders: every placeholder supplied,
    /// nothing else given.
    pub fn check_values<'a>(
        &self,
        given: impl Iterator<Item = &'a String>,
    ) -> Result<(), ValuesMismatch> {
        let given: BTreeSet<&str> = given.map(String::as_str).collect();
        let wanted: BTreeSet<&str> = self.names.iter().map(String::as_str).collect();
        let missing: Vec<String> = wanted.difference(&given).map(|s| s.to_string()).collect();
        let unknown: Vec<String> = given.difference(&wanted).map(|s| s.to_string()).collect();
        if missing.is_empty() && unknown.is_empty() {
            Ok(())
        } else {
            Err(ValuesMismatch { missing, unknown })
        }
    }
}

/// Values that do not match a statement's placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValuesMismatch {
    /// Placeholders without a value.
    pub missing: Vec<String>,
    /// Values without a placeholder.
    pub unknown: Vec<String>,
}

impl std::fmt::Display for ValuesMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing values for {}", self.missing.join(", ")));
        }
        if !self.unknown.is_empty() {
            parts.push(format!(
                "unknown values {} (the statement has no such placeholder)",
                self.unknown.join(", ")
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Copies a line comment (through its newline) into `text`; returns where the scan goes on.
fn line_comment(chars: &[char], start: usize, text: &mut String) -> usize {
    let end = chars[start..]
        .iter()
        .position(|&c| c == '\n')
        .map_or(chars.len(), |p| start + p + 1);
    text.extend(&chars[start..end]);
    end
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// The index just past the closing quote of a quoted run starting at `start`; a doubled
/// quote is part of the run.
pub(crate) fn quoted_end(
    chars: &[char],
    start: usize,
    quote: char,
    backslash: bool,
) -> Option<usize> {
    let mut j = start + 1;
    while j < chars.len() {
        let c = chars[j];
        if backslash && c == '\\' {
            j += 2;
            continue;
        }
        if c == quote {
            if chars.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return Some(j + 1);
        }
        j += 1;
    }
    None
}

/// At a `$`: the end of a dollar-quote opening tag (`$$` or `$tag$`), if it is one.
fn dollar_tag(chars: &[char], start: usize) -> Option<usize> {
    let mut j = start + 1;
    while j < chars.len() {
        let c = chars[j];
        if c == '$' {
            return Some(j + 1);
        }
        let ok = if j == start + 1 {
            c.is_alphabetic() || c == '_'
        } else {
            c.is_alphanumeric() || c == '_'
        };
        if !ok {
            return None;
        }
        j += 1;
    }
    None
}

fn find_seq(chars: &[char], from: usize, seq: &[char]) -> Option<usize> {
    (from..chars.len()).find(|&j| chars[j..].starts_with(seq))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn pg(sql: &str) -> (String, Vec<String>) {
        let parsed = Parsed::parse(sql, Lexing::default()).unwrap();
        parsed.check_positional(BindStyle::Dollar).unwrap();
        (parsed.render(BindStyle::Dollar).0, parsed.names().to_vec())
    }

    #[test]
    fn placeholders_become_numbered_binds() {
        let (sql, names) = pg(
            "INSERT INTO appointment (patnum, start_at, note) VALUES (:patnum, :start_at, :note) RETURNING aptnum",
        );
        assert_eq!(
            sql,
            "INSERT INTO appointment (patnum, start_at, note) VALUES ($1, $2, $3) RETURNING aptnum"
        );
        assert_eq!(names, ["patnum", "start_at", "note"]);
        let parsed = Parsed::parse("SELECT :a, :b", Lexing::default()).unwrap();
        assert_eq!(
            parsed.render(BindStyle::QuestionNumbered).0,
            "SELECT ?1, ?2"
        );
    }

    #[test]
    fn colons_inside_strings_identifiers_and_comments_are_text() {
        let (sql, names) = pg(
            "SELECT ':not', 'it''s :no', E'\\' :no', \"col:no\", `b:no` -- :no\n, /* :no /* :nested */ */ :yes",
        );
        assert_eq!(names, ["yes"]);
        assert!(sql.ends_with("*/ $1"), "{sql}");
        assert!(
            sql.contains("'it''s :no'") && sql.contains("-- :no\n"),
            "{sql}"
        );
        let (sql, names) = pg("DO $body$ BEGIN x := :no; END $body$; SELECT $$:no$$, :p");
        assert_eq!(names, ["p"]);
        assert_eq!(
            sql,
            "DO $body$ BEGIN x := :no; END $body$; SELECT $$:no$$, $1"
        );
    }

    #[test]
    fn casts_and_slices_are_not_placeholders() {
        let (sql, names) = pg(
            "UPDATE a SET start_at = :start::timestamptz, n = x::int, s = arr[1:2] WHERE id = :id",
        );
        assert_eq!(
            sql,
            "UPDATE a SET start_at = $1::timestamptz, n = x::int, s = arr[1:2] WHERE id = $2"
        );
        assert_eq!(names, ["start", "id"]);
    }

    #[test]
    fn repeated_names_bind_once_or_again_by_dialect() {
        let parsed = Parsed::parse(
            "UPDATE t SET a = :v, b = :w WHERE a <> :v",
            Lexing::default(),
        )
        .unwrap();
        assert_eq!(parsed.names(), ["v", "w"]);
        assert_eq!(
            parsed.render(BindStyle::Dollar),
            (
                "UPDATE t SET a = $1, b = $2 WHERE a <> $1".into(),
                vec![0, 1]
            )
        );
        assert_eq!(
            parsed.render(BindStyle::QuestionNumbered).0,
            "UPDATE t SET a = ?1, b = ?2 WHERE a <> ?1"
        );
        assert_eq!(
            parsed.render(BindStyle::Question),
            (
                "UPDATE t SET a = ?, b = ? WHERE a <> ?".into(),
                vec![0, 1, 0]
            )
        );
    }

    #[test]
    fn missing_and_unknown_values_are_named() {
        let parsed = Parsed::parse("INSERT INTO t VALUES (:a, :b, :a)", Lexing::default()).unwrap();
        let given = ["a".to_owned(), "c".to_owned()];
        let err = parsed.check_values(given.iter()).unwrap_err();
        assert_eq!(err.missing, ["b"]);
        assert_eq!(err.unknown, ["c"]);
        assert!(err.to_string().contains("missing values for b"), "{err}");
        let given = ["b".to_owned(), "a".to_owned()];
        parsed.check_values(given.iter()).unwrap();
    }

    #[test]
    fn positional_markers_and_unterminated_text_are_refused() {
        let parsed = Parsed::parse("SELECT $1, :a", Lexing::default()).unwrap();
        assert!(parsed.check_positional(BindStyle::Dollar).is_err());
        // `?` is a jsonb operator in PostgreSQL, a parameter in SQLite.
        let parsed = Parsed::parse("SELECT data ? 'k' FROM t", Lexing::default()).unwrap();
        parsed.check_positional(BindStyle::Dollar).unwrap();
        assert!(parsed
            .check_positional(BindStyle::QuestionNumbered)
            .is_err());
        // `'?'` inside a string is text.
        let parsed = Parsed::parse("SELECT '?', :a", Lexing::default()).unwrap();
        parsed.check_positional(BindStyle::Question).unwrap();
        // Identifiers may contain `$` (PostgreSQL); `a$1` is not a marker.
        let parsed = Parsed::parse("SELECT a$1 FROM t", Lexing::default()).unwrap();
        parsed.check_positional(BindStyle::Dollar).unwrap();
        assert_eq!(
            Parsed::parse("SELECT 'open", Lexing::default()),
            Err(PlaceholderError::Unterminated("string"))
        );
        assert!(Parsed::parse("SELECT /* open", Lexing::default()).is_err());
        assert!(Parsed::parse("SELECT $x$ open", Lexing::default()).is_err());
    }

    #[test]
    fn backslash_escapes_follow_the_dialect() {
        // In standard SQL a backslash is an ordinary character: the string ends at the quote.
        let parsed = Parsed::parse("SELECT 'a\\', :b", Lexing::default()).unwrap();
        assert_eq!(parsed.names(), ["b"]);
        // With backslash escapes (MySQL), the same quote is escaped, and :b is inside.
        let parsed = Parsed::parse("SELECT 'a\\', :b'", Lexing::mysql()).unwrap();
        assert!(parsed.names().is_empty());
    }

    fn mysql(sql: &str) -> (String, Vec<String>) {
        let parsed = Parsed::parse(sql, Lexing::mysql()).unwrap();
        let (rendered, order) = parsed.render(BindStyle::Question);
        let names = order.iter().map(|&i| parsed.names()[i].clone()).collect();
        (rendered, names)
    }

    #[test]
    fn mysql_comments_and_strings_follow_mysql() {
        // `#` comments, also holding quotes and colons.
        let (sql, names) = mysql("UPDATE t SET a = :a # it's :b \"x\n WHERE id = :id");
        assert_eq!(names, ["a", "id"]);
        assert_eq!(sql, "UPDATE t SET a = ? # it's :b \"x\n WHERE id = ?");
        assert_eq!(mysql("SELECT :a # :b").1, ["a"]);
        // The standard scan reads `#` as code.
        let parsed = Parsed::parse("SELECT 1 # :b\n", Lexing::default()).unwrap();
        assert_eq!(parsed.names(), ["b"]);
        // `--` is a comment only before a space or control character (or the end).
        assert!(mysql("SELECT 1 -- :x\n, :y").1 == ["y"]);
        assert!(mysql("SELECT 1 --\t:x\n, :y").1 == ["y"]);
        assert!(mysql("SELECT 1 --").1.is_empty());
        assert_eq!(mysql("SELECT 1--:x").1, ["x"]);
        assert_eq!(mysql("SELECT 1--\u{a0}:x").1, ["x"]);
        // `"…"` is a string with backslash escapes and doubled quotes.
        assert!(mysql("SELECT \"a\\\" :x\"").1.is_empty());
        assert!(mysql("SELECT \"say \"\":x\"\"\", :y").1 == ["y"]);
        assert_eq!(
            Parsed::parse("SELECT \"open", Lexing::mysql()),
            Err(PlaceholderError::Unterminated("string"))
        );
        // Comments do not nest: the first `*/` ends one.
        assert_eq!(mysql("SELECT /* a /* b */ :x */").1, ["x"]);
        assert!(pg("SELECT /* a /* b */ :x */").1.is_empty());
        // No dollar quoting: `$` is part of a name.
        assert_eq!(mysql("SELECT $$:x$$, :y").1, ["x$$", "y"]);
        assert_eq!(mysql("SELECT $a$ :x $a$").1, ["x"]);
        // Backticks quote identifiers, without backslash escapes.
        assert!(mysql("SELECT `a\\`, :y").1 == ["y"]);
        assert_eq!(Lexing::default(), Lexing::standard());
    }
}
