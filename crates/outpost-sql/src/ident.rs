//! SQL identifiers from the config (table and column names) are always quoted, never
//! spliced raw; values are always bound parameters.

/// `pat"ient` → `"pat""ient"` (PostgreSQL, SQLite and Firebird dialect 3 alike; Firebird
/// names are resolved against the catalog first, see `firebird/ddl.rs`).
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `schema.table` or `table`, split once on the first dot.
pub fn split_qualified(name: &str) -> (Option<&str>, &str) {
    match name.split_once('.') {
        Some((schema, table)) => (Some(schema), table),
        None => (None, name),
    }
}

/// `"schema"."table"` or `"table"`.
pub fn quote_qualified(name: &str) -> String {
    match split_qualified(name) {
        (Some(schema), table) => format!("{}.{}", quote(schema), quote(table)),
        (None, table) => quote(table),
    }
}

/// `` pat`ient `` → `` `pat``ient` `` (MySQL and MariaDB).
pub fn quote_mysql(ident: &str) -> String {
    format!("`{}`", ident.replace('`', "``"))
}

/// `pat]ient` → `[pat]]ient]` (SQL Server).
pub fn quote_mssql(ident: &str) -> String {
    format!("[{}]", ident.replace(']', "]]"))
}

/// Makes a PostgreSQL name out of a connector name: `outpost_` and the name in lower
/// case with anything but `a-z 0-9 _` as `_`, cut to 63 bytes.
pub fn pg_object_name(connector: &str) -> String {
    let mut name: String = format!("outpost_{connector}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote("patient"), "\"patient\"");
        assert_eq!(
            quote("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
        assert_eq!(quote_qualified("pms.patient"), "\"pms\".\"patient\"");
        assert_eq!(pg_object_name("PMS-main.1"), "outpost_pms_main_1");
        assert_eq!(quote_mysql("a`b"), "`a``b`");
        assert_eq!(quote_mssql("a]b"), "[a]]b]");
    }
}
