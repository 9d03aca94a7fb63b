//! The captured tables as the catalog describes them, and the change table, function and
//! triggers the agent installs (only when asked: `outpost sql install-triggers`).
//!
//! What is installed:
//!
//! - sequence `OUTPOST_CHANGE_SEQ`: change ids, in the order changes were made;
//! - table `OUTPOST_CHANGES` (`ID`, `TX` = `CURRENT_TRANSACTION`, `TBL`, `OP` `I`/`U`/`D`,
//!   `CHANGED_AT`, `OLD_ROW`, `NEW_ROW`): one row per row change. `OLD_ROW` and `NEW_ROW`
//!   are JSON objects (`BLOB SUB_TYPE TEXT`, UTF-8) built by the trigger, column name →
//!   the value's SQL text form (`CAST(x AS VARCHAR(64))` for numbers, dates, times,
//!   timestamps and booleans; text as it is, JSON-escaped) or null. Text forms rather than
//!   JSON numbers: Firebird 3 has no JSON type, and the text of a `NUMERIC(18,4)` or a
//!   `TIMESTAMP` is exact, so the agent maps it to JSON with the column's type exactly as
//!   it maps a snapshot row (see `value.rs`);
//! - table `OUTPOST_CHANGE_BLOBS` (`CHANGE_ID`, `COL`, `SIDE` `O`/`N`, `VAL`): binary
//!   values (`BLOB` other than text, `OCTETS` strings), copied as they are, since PSQL has
//!   no base64; deleted with their change (`ON DELETE CASCADE`);
//! - function `OUTPOST_JSON_TEXT`: escapes text for a JSON string (`\`, `"` and control
//!   characters);
//! - per captured table, one `AFTER INSERT OR UPDATE OR DELETE` trigger,
//!   `OUTPOST_T_<table>`, at position 32000 (after the application's own triggers),
//!   writing the old row (update, delete) and the new row (insert, update) of the
//!   configured columns;
//! - `GRANT`s of exactly those objects to each trigger, so the application's users need
//!   no rights on them.
//!
//! Re-running is safe: objects that exist are not created again, and the function and
//! triggers are `CREATE OR ALTER`ed (run it again after adding columns to a table).

use std::fmt::Write as _;

use rsfbclient_core::SqlType;
use rsfbclient_rust::TrHandle;

use super::conn::{column_i64, column_text, FbConn, TxKind};
use super::value::FbKind;
use crate::ident::quote;
use crate::{SourceConfig, SqlError};

/// The sequence of change ids.
pub const SEQUENCE: &str = "OUTPOST_CHANGE_SEQ";
/// The change table.
pub const CHANGE_TABLE: &str = "OUTPOST_CHANGES";
/// Binary values of changes.
pub const BLOB_TABLE: &str = "OUTPOST_CHANGE_BLOBS";
/// The JSON escaping function.
pub const ESCAPE_FN: &str = "OUTPOST_JSON_TEXT";

/// A captured column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FbColumn {
    /// As stored in the catalog (`PATNUM`, or `"MixedCase"` without the quotes).
    pub name: String,
    /// As it appears in events: a name stored in upper case (an unquoted identifier, which
    /// SQL treats case-insensitively) in lower case, like PostgreSQL folds it; any other as
    /// stored.
    pub event_name: String,
    /// Its type.
    pub kind: FbKind,
}

/// A captured table as found in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FbTable {
    /// As written in the config (and in events).
    pub config_name: String,
    /// As stored in the catalog.
    pub relation: String,
    /// Captured columns, in the table's order.
    pub columns: Vec<FbColumn>,
    /// Indexes into `columns` of the key columns, in the configured order.
    pub key: Vec<usize>,
}

impl FbTable {
    /// The quoted table name.
    pub fn quoted(&self) -> String {
        quote(&self.relation)
    }

    /// The trigger's name: `OUTPOST_T_<table>`, or, when that is longer than Firebird 3's
    /// 31 characters or the name is not plain, a shortened name with a hash.
    pub fn trigger_name(&self) -> String {
        trigger_name(&self.relation)
    }
}

/// See [`FbTable::trigger_name`].
pub fn trigger_name(relation: &str) -> String {
    let plain = relation
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'$');
    let name = format!("OUTPOST_T_{relation}");
    if plain && name.len() <= 31 {
        return name;
    }
    // FNV-1a, stable across versions and platforms.
    let mut hash: u32 = 0x811c_9dc5;
    for b in relation.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let stem: String = relation
        .chars()
        .map(|c| {
            let c = c.to_ascii_uppercase();
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(12)
        .collect();
    format!("OUTPOST_T_{stem}_{hash:08X}")
}

/// How a stored name appears in events (see [`FbColumn::event_name`]).
pub fn event_name(stored: &str) -> String {
    let unquoted = stored.starts_with(|c: char| c.is_ascii_uppercase())
        && stored
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'$');
    if unquoted {
        stored.to_ascii_lowercase()
    } else {
        stored.to_owned()
    }
}

/// Whether a name from the config names the stored name: exactly, or case-insensitively
/// when the stored name is an unquoted (upper-case) identifier.
pub(crate) fn names(config: &str, stored: &str) -> bool {
    config == stored || (event_name(stored) != stored && config.to_ascii_uppercase() == stored)
}

/// Looks up every configured table and its columns.
pub(crate) fn resolve_tables(
    conn: &mut FbConn,
    tr: &mut TrHandle,
    config: &SourceConfig,
) -> Result<Vec<FbTable>, SqlError> {
    let mut tables = Vec::with_capacity(config.tables.len());
    for table in &config.tables {
        let candidates = conn.query(
            tr,
            "SELECT TRIM(RDB$RELATION_NAME) FROM RDB$RELATIONS \
             WHERE COALESCE(RDB$SYSTEM_FLAG, 0) = 0 AND RDB$VIEW_BLR IS NULL \
             AND (RDB$RELATION_NAME = ? OR RDB$RELATION_NAME = ?)",
            vec![
                SqlType::Text(table.name.clone()),
                SqlType::Text(table.name.to_ascii_uppercase()),
            ],
            &format!("look up table {}", table.name),
        )?;
        let found: Vec<String> = candidates
            .iter()
            .filter_map(|row| row.first().and_then(column_text).and_then(Result::ok))
            .collect();
        let relation = found
            .iter()
            .find(|r| **r == table.name)
            .or_else(|| found.iter().find(|r| names(&table.name, r)))
            .cloned()
            .ok_or_else(|| SqlError::Table {
                table: table.name.clone(),
                message: "does not exist (or is a view or a system table)".into(),
            })?;
        let rows = conn.query(
            tr,
            "SELECT TRIM(rf.RDB$FIELD_NAME), f.RDB$FIELD_TYPE, COALESCE(f.RDB$FIELD_SUB_TYPE, 0), \
             COALESCE(f.RDB$FIELD_SCALE, 0), COALESCE(f.RDB$CHARACTER_SET_ID, 0) \
             FROM RDB$RELATION_FIELDS rf JOIN RDB$FIELDS f ON f.RDB$FIELD_NAME = rf.RDB$FIELD_SOURCE \
             WHERE rf.RDB$RELATION_NAME = ? ORDER BY rf.RDB$FIELD_POSITION",
            vec![SqlType::Text(relation.clone())],
            &format!("look up the columns of table {}", table.name),
        )?;
        let mut all = Vec::with_capacity(rows.len());
        for row in &rows {
            let text = |i: usize| row.get(i).and_then(column_text).and_then(Result::ok);
            let int = |i: usize| row.get(i).and_then(column_i64).unwrap_or(0);
            let Some(name) = text(0) else { continue };
            let kind = FbKind::from_rdb(int(1), int(2), int(3), int(4)).ok_or_else(|| {
                SqlError::Table {
                    table: table.name.clone(),
                    message: format!(
                        "column {name:?} has a type this agent cannot read (RDB$FIELD_TYPE {})",
                        int(1)
                    ),
                }
            })?;
            all.push(FbColumn {
                event_name: event_name(&name),
                name,
                kind,
            });
        }
        let find = |wanted: &str| all.iter().position(|c| names(wanted, &c.name));
        for column in table.key.iter().chain(table.columns.iter().flatten()) {
            if find(column).is_none() {
                return Err(SqlError::Table {
                    table: table.name.clone(),
                    message: format!("has no column {column:?}"),
                });
            }
        }
        let keep: Vec<bool> = all
            .iter()
            .map(|c| {
                table.columns.as_ref().is_none_or(|cols| {
                    cols.iter()
                        .chain(table.key.iter())
                        .any(|wanted| names(wanted, &c.name))
                })
            })
            .collect();
        let columns: Vec<FbColumn> = all
            .into_iter()
            .zip(keep)
            .filter_map(|(c, keep)| keep.then_some(c))
            .collect();
        let mut key = Vec::with_capacity(table.key.len());
        for wanted in &table.key {
            let index = columns
                .iter()
                .position(|c| names(wanted, &c.name))
                .ok_or_else(|| SqlError::Table {
                    table: table.name.clone(),
                    message: format!("has no column {wanted:?}"),
                })?;
            if columns[index].kind == FbKind::TextBlob || columns[index].kind == FbKind::Binary {
                return Err(SqlError::Table {
                    table: table.name.clone(),
                    message: format!("key column {wanted:?} is a BLOB; a key must be comparable"),
                });
            }
            key.push(index);
        }
        tables.push(FbTable {
            config_name: table.name.clone(),
            relation,
            columns,
            key,
        });
    }
    Ok(tables)
}

/// Refuses a key column of `tables` (as [`resolve_tables`] found `config`'s) that the
/// catalog does not declare NOT NULL, on the column or on its domain: the snapshot resumes
/// after the last key read (`k > ?`), which a NULL never satisfies, and a NULL key names no
/// row in an event. `source` names the source in the error.
pub(crate) fn refuse_nullable_keys(
    conn: &mut FbConn,
    tr: &mut TrHandle,
    source: &str,
    config: &SourceConfig,
    tables: &[FbTable],
) -> Result<(), SqlError> {
    for (table, configured) in tables.iter().zip(&config.tables) {
        let nullable = nullable_columns(conn, tr, &table.relation)?;
        // `table.key` holds the columns `configured.key` resolved to, in the same order.
        let stored: Vec<(&String, &str)> = configured
            .key
            .iter()
            .zip(&table.key)
            .filter_map(|(wanted, &i)| Some((wanted, table.columns.get(i)?.name.as_str())))
            .collect();
        SqlError::refuse_nullable_key(source, &table.config_name, &configured.key, |wanted| {
            stored
                .iter()
                .any(|(w, name)| *w == wanted && nullable.iter().any(|n| n == name))
        })?;
    }
    Ok(())
}

/// The columns of `relation` (as stored) that may hold NULL: neither the column nor its
/// domain is declared NOT NULL.
pub(crate) fn nullable_columns(
    conn: &mut FbConn,
    tr: &mut TrHandle,
    relation: &str,
) -> Result<Vec<String>, SqlError> {
    let rows = conn.query(
        tr,
        "SELECT TRIM(rf.RDB$FIELD_NAME) FROM RDB$RELATION_FIELDS rf \
         JOIN RDB$FIELDS f ON f.RDB$FIELD_NAME = rf.RDB$FIELD_SOURCE \
         WHERE rf.RDB$RELATION_NAME = ? \
         AND COALESCE(rf.RDB$NULL_FLAG, 0) = 0 AND COALESCE(f.RDB$NULL_FLAG, 0) = 0",
        vec![SqlType::Text(relation.to_owned())],
        &format!("look up the nullable columns of table {relation}"),
    )?;
    Ok(rows
        .iter()
        .filter_map(|row| row.first().and_then(column_text).and_then(Result::ok))
        .collect())
}

/// Which of the shared objects exist already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Installed {
    /// `OUTPOST_CHANGE_SEQ`.
    pub sequence: bool,
    /// `OUTPOST_CHANGES`.
    pub change_table: bool,
    /// `OUTPOST_CHANGE_BLOBS`.
    pub blob_table: bool,
}

/// Looks up the shared objects.
pub(crate) fn installed(conn: &mut FbConn, tr: &mut TrHandle) -> Result<Installed, SqlError> {
    let count = |conn: &mut FbConn, tr: &mut TrHandle, sql: &str, name: &str| {
        conn.query(
            tr,
            sql,
            vec![SqlType::Text(name.to_owned())],
            "look up the change capture objects",
        )
        .map(|rows| !rows.is_empty())
    };
    Ok(Installed {
        sequence: count(
            conn,
            tr,
            "SELECT 1 FROM RDB$GENERATORS WHERE RDB$GENERATOR_NAME = ?",
            SEQUENCE,
        )?,
        change_table: count(
            conn,
            tr,
            "SELECT 1 FROM RDB$RELATIONS WHERE RDB$RELATION_NAME = ?",
            CHANGE_TABLE,
        )?,
        blob_table: count(
            conn,
            tr,
            "SELECT 1 FROM RDB$RELATIONS WHERE RDB$RELATION_NAME = ?",
            BLOB_TABLE,
        )?,
    })
}

/// The tables whose capture trigger is missing or inactive.
pub(crate) fn missing_triggers(
    conn: &mut FbConn,
    tr: &mut TrHandle,
    tables: &[FbTable],
) -> Result<Vec<String>, SqlError> {
    let mut missing = Vec::new();
    for table in tables {
        let rows = conn.query(
            tr,
            "SELECT 1 FROM RDB$TRIGGERS WHERE RDB$TRIGGER_NAME = ? AND RDB$RELATION_NAME = ? \
             AND COALESCE(RDB$TRIGGER_INACTIVE, 0) = 0",
            vec![
                SqlType::Text(table.trigger_name()),
                SqlType::Text(table.relation.clone()),
            ],
            "look up the capture triggers",
        )?;
        if rows.is_empty() {
            missing.push(table.config_name.clone());
        }
    }
    Ok(missing)
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The statements that install capture for `tables`, each one on its own (no terminator).
pub fn install_statements(tables: &[FbTable], installed: Installed) -> Vec<String> {
    let mut out = Vec::new();
    if !installed.sequence {
        out.push(format!("CREATE SEQUENCE {SEQUENCE}"));
    }
    if !installed.change_table {
        out.push(format!(
            "CREATE TABLE {CHANGE_TABLE} (\n  \
               ID BIGINT NOT NULL PRIMARY KEY,\n  \
               TX BIGINT NOT NULL,\n  \
               TBL VARCHAR(63) CHARACTER SET UTF8 NOT NULL,\n  \
               OP CHAR(1) NOT NULL,\n  \
               CHANGED_AT TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL,\n  \
               OLD_ROW BLOB SUB_TYPE TEXT CHARACTER SET UTF8,\n  \
               NEW_ROW BLOB SUB_TYPE TEXT CHARACTER SET UTF8\n)"
        ));
        out.push(format!(
            "CREATE INDEX OUTPOST_CHANGES_TX ON {CHANGE_TABLE} (TX)"
        ));
    }
    if !installed.blob_table {
        out.push(format!(
            "CREATE TABLE {BLOB_TABLE} (\n  \
               CHANGE_ID BIGINT NOT NULL REFERENCES {CHANGE_TABLE} (ID) ON DELETE CASCADE,\n  \
               COL VARCHAR(63) CHARACTER SET UTF8 NOT NULL,\n  \
               SIDE CHAR(1) NOT NULL,\n  \
               VAL BLOB SUB_TYPE BINARY\n)"
        ));
    }
    out.push(format!(
        "CREATE OR ALTER FUNCTION {ESCAPE_FN} (S BLOB SUB_TYPE TEXT CHARACTER SET UTF8)\n\
         RETURNS BLOB SUB_TYPE TEXT CHARACTER SET UTF8\n\
         AS\n  \
           DECLARE I SMALLINT = 1;\n\
         BEGIN\n  \
           IF (S IS NULL) THEN RETURN NULL;\n  \
           S = REPLACE(S, '\\', '\\\\');\n  \
           S = REPLACE(S, '\"', '\\\"');\n  \
           WHILE (I < 32) DO\n  \
           BEGIN\n    \
             IF (POSITION(ASCII_CHAR(I) IN S) > 0) THEN\n      \
               S = REPLACE(S, ASCII_CHAR(I), '\\u00' || SUBSTRING('0123456789abcdef' FROM BIN_SHR(I, 4) + 1 FOR 1) || SUBSTRING('0123456789abcdef' FROM BIN_AND(I, 15) + 1 FOR 1));\n    \
             I = I + 1;\n  \
           END\n  \
           RETURN S;\n\
         END"
    ));
    for table in tables {
        out.push(trigger(table));
    }
    for table in tables {
        let trigger = quote(&table.trigger_name());
        out.push(format!(
            "GRANT USAGE ON SEQUENCE {SEQUENCE} TO TRIGGER {trigger}"
        ));
        out.push(format!(
            "GRANT INSERT ON {CHANGE_TABLE} TO TRIGGER {trigger}"
        ));
        out.push(format!("GRANT INSERT ON {BLOB_TABLE} TO TRIGGER {trigger}"));
        out.push(format!(
            "GRANT EXECUTE ON FUNCTION {ESCAPE_FN} TO TRIGGER {trigger}"
        ));
    }
    out
}

/// The JSON object of the row `side` (`OLD` or `NEW`), as a PSQL expression.
fn row_json(table: &FbTable, side: &str) -> String {
    let mut parts = Vec::new();
    let mut first = true;
    for column in table.columns.iter().filter(|c| c.kind != FbKind::Binary) {
        let key = serde_json::to_string(&column.event_name).unwrap_or_default();
        let prefix = if first { "{" } else { "," };
        first = false;
        parts.push(literal(&format!("{prefix}{key}:")));
        let value = format!("{side}.{}", quote(&column.name));
        let text = match column.kind {
            FbKind::Text | FbKind::TextBlob => format!("{ESCAPE_FN}({value})"),
            kind => kind.select_expr(&value),
        };
        parts.push(format!("COALESCE('\"' || {text} || '\"', 'null')"));
    }
    if first {
        return "'{}'".into();
    }
    parts.push("'}'".into());
    parts.join("\n      || ")
}

/// The capture trigger of one table.
fn trigger(table: &FbTable) -> String {
    let mut sql = String::new();
    let _ = write!(
        sql,
        "CREATE OR ALTER TRIGGER {} FOR {}\n\
         ACTIVE AFTER INSERT OR UPDATE OR DELETE POSITION 32000\n\
         AS\n  \
           DECLARE CHANGE_ID BIGINT;\n  \
           DECLARE OLD_ROW BLOB SUB_TYPE TEXT CHARACTER SET UTF8;\n  \
           DECLARE NEW_ROW BLOB SUB_TYPE TEXT CHARACTER SET UTF8;\n\
         BEGIN\n  \
           CHANGE_ID = NEXT VALUE FOR {SEQUENCE};\n  \
           IF (NOT INSERTING) THEN\n    \
             OLD_ROW = {};\n  \
           IF (NOT DELETING) THEN\n    \
             NEW_ROW = {};\n  \
           INSERT INTO {CHANGE_TABLE} (ID, TX, TBL, OP, OLD_ROW, NEW_ROW)\n    \
             VALUES (:CHANGE_ID, CURRENT_TRANSACTION, {}, \
         CASE WHEN INSERTING THEN 'I' WHEN UPDATING THEN 'U' ELSE 'D' END, :OLD_ROW, :NEW_ROW);\n",
        quote(&table.trigger_name()),
        table.quoted(),
        row_json(table, "OLD"),
        row_json(table, "NEW"),
        literal(&table.relation),
    );
    for column in table.columns.iter().filter(|c| c.kind == FbKind::Binary) {
        for (side, code, guard) in [("OLD", "O", "INSERTING"), ("NEW", "N", "DELETING")] {
            let value = format!("{side}.{}", quote(&column.name));
            let _ = write!(
                sql,
                "  IF (NOT {guard} AND {value} IS NOT NULL) THEN\n    \
                   INSERT INTO {BLOB_TABLE} (CHANGE_ID, COL, SIDE, VAL) VALUES (:CHANGE_ID, {}, '{code}', {});\n",
                literal(&column.event_name),
                FbKind::Binary.select_expr(&value),
            );
        }
    }
    sql.push_str("END");
    sql
}

/// The statements as one script for `isql` (PSQL bodies between `SET TERM ^ ;` and
/// `SET TERM ; ^`), with a header saying what it does.
pub fn render_script(tables: &[FbTable], installed: Installed) -> String {
    let mut out = String::new();
    out.push_str(
        "-- Outpost change capture for Firebird, printed by `outpost sql install-triggers --print`.\n\
         -- It creates a change table that triggers on the captured tables fill, and grants those\n\
         -- triggers exactly what they use. Outpost reads the change table in id order and\n\
         -- deletes the rows it has made durable. Nothing else is changed.\n",
    );
    let _ = writeln!(
        out,
        "-- Captured tables: {}\n",
        tables
            .iter()
            .map(|t| t.relation.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut psql = false;
    for statement in install_statements(tables, installed) {
        let is_psql = statement.starts_with("CREATE OR ALTER FUNCTION")
            || statement.starts_with("CREATE OR ALTER TRIGGER");
        if is_psql && !psql {
            out.push_str("SET TERM ^ ;\n\n");
            psql = true;
        } else if !is_psql && psql {
            out.push_str("SET TERM ; ^\n\n");
            psql = false;
        }
        out.push_str(&statement);
        out.push_str(if psql { " ^\n\n" } else { ";\n\n" });
    }
    if psql {
        out.push_str("SET TERM ; ^\n\n");
    }
    out.push_str("COMMIT;\n");
    out
}

/// Connects, reads the tables and prints the script that [`install`] would run.
pub(crate) fn script_for(conn: &mut FbConn, config: &SourceConfig) -> Result<String, SqlError> {
    conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
        let tables = resolve_tables(conn, tr, config)?;
        let installed = installed(conn, tr)?;
        Ok(render_script(&tables, installed))
    })
}

/// Runs the install statements, each in its own transaction (Firebird needs DDL
/// committed before a later statement can use the object). Returns the statements run.
pub(crate) fn install_on(
    conn: &mut FbConn,
    config: &SourceConfig,
) -> Result<Vec<String>, SqlError> {
    let (tables, installed) = conn.in_tx(TxKind::SnapshotRead, |conn, tr| {
        Ok((resolve_tables(conn, tr, config)?, installed(conn, tr)?))
    })?;
    let statements = install_statements(&tables, installed);
    for statement in &statements {
        let first_line = statement.lines().next().unwrap_or_default().to_owned();
        conn.in_tx(TxKind::Write, |conn, tr| {
            conn.exec_immediate(tr, statement, &format!("install: {first_line}"))
        })?;
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn patient() -> FbTable {
        let col = |name: &str, kind| FbColumn {
            name: name.into(),
            event_name: event_name(name),
            kind,
        };
        FbTable {
            config_name: "patient".into(),
            relation: "PATIENT".into(),
            columns: vec![
                col("PATNUM", FbKind::Int),
                col("LName", FbKind::Text),
                col("BALANCE", FbKind::Decimal),
                col("PHOTO", FbKind::Binary),
            ],
            key: vec![0],
        }
    }

    #[test]
    fn names_fold_like_unquoted_identifiers() {
        assert_eq!(event_name("PATNUM"), "patnum");
        assert_eq!(event_name("LName"), "LName");
        assert_eq!(event_name("first name"), "first name");
        assert!(names("patnum", "PATNUM"));
        assert!(names("LName", "LName"));
        assert!(!names("lname", "LName"));
        assert_eq!(trigger_name("PATIENT"), "OUTPOST_T_PATIENT");
        let long = trigger_name("APPOINTMENT_HISTORY_ARCHIVE_X");
        assert!(long.len() <= 31 && long.starts_with("OUTPOST_T_"), "{long}");
        assert_ne!(long, trigger_name("APPOINTMENT_HISTORY_ARCHIVE_Y"));
        assert!(trigger_name("pat\"ient").len() <= 31);
    }

    #[test]
    fn the_script_quotes_names_and_builds_json_in_the_trigger() {
        let script = render_script(&[patient()], Installed::default());
        assert!(script.contains("CREATE TABLE OUTPOST_CHANGES"), "{script}");
        assert!(script.contains("CREATE OR ALTER TRIGGER \"OUTPOST_T_PATIENT\" FOR \"PATIENT\""));
        assert!(script.contains("'{\"patnum\":'"), "{script}");
        assert!(script.contains("CAST(NEW.\"BALANCE\" AS VARCHAR(64))"));
        assert!(script.contains("OUTPOST_JSON_TEXT(OLD.\"LName\")"));
        assert!(script.contains("INSERT INTO OUTPOST_CHANGE_BLOBS"));
        assert!(
            script.contains("GRANT INSERT ON OUTPOST_CHANGES TO TRIGGER \"OUTPOST_T_PATIENT\";")
        );
        assert!(script.contains("SET TERM ^ ;") && script.contains("SET TERM ; ^"));
        let again = render_script(
            &[patient()],
            Installed {
                sequence: true,
                change_table: true,
                blob_table: true,
            },
        );
        assert!(!again.contains("CREATE TABLE") && !again.contains("CREATE SEQUENCE"));
        assert!(again.contains("CREATE OR ALTER TRIGGER"));
    }
}
