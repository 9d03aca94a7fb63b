//! The change event: one JSON schema for every database (documented in
//! `docs/change-events.md`), and the mapping of database values onto JSON.
//!
//! Values keep their meaning: integers are JSON numbers, decimals are strings (no loss),
//! timestamps are RFC 3339, dates `YYYY-MM-DD`, binary is base64, text is UTF-8, booleans
//! are booleans and NULL is null.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// Column name → value.
pub type Row = Map<String, Value>;

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The row as the initial snapshot saw it.
    Snapshot,
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row (`after` is null).
    Delete,
    /// The whole table was emptied (`TRUNCATE`); `key`, `before` and `after` are empty.
    Truncate,
}

impl Op {
    /// The name used in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// One change of one row, as the agent queues it (one event per queue item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The source's name in the agent config.
    pub source: String,
    /// The table as named in the config.
    pub table: String,
    /// What happened.
    pub op: Op,
    /// The configured key columns → their values.
    pub key: Row,
    /// The row before the change, as far as the database provides it (PostgreSQL: every
    /// column only with `REPLICA IDENTITY FULL`, else the key columns); null for
    /// snapshot and insert events.
    pub before: Option<Row>,
    /// The row after the change; null for delete.
    pub after: Option<Row>,
    /// The database's own position of the change (PostgreSQL: the LSN of its WAL
    /// record; SQLite: the watermark value).
    pub position: Option<String>,
    /// The transaction id, as a string; null where the database gives none.
    pub tx: Option<String>,
    /// When the transaction committed (RFC 3339, UTC); null for snapshot events.
    pub commit_time: Option<String>,
    /// A stable id of this event across restarts, when the database gives one (PostgreSQL:
    /// `<commit LSN>:<index in transaction>`); lets the agent drop a repeat of an event it
    /// already queued. Not part of the JSON.
    #[serde(skip)]
    pub id: Option<String>,
}

/// How a PostgreSQL type OID's text form maps onto JSON.
pub fn pg_text_to_json(type_oid: u32, text: &str) -> Value {
    match type_oid {
        // int2, int4, int8, oid, xid
        21 | 23 | 20 | 26 | 28 => text
            .parse::<i64>()
            .map(|n| Value::Number(n.into()))
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        // float4, float8: numbers when finite; NaN and infinities stay strings
        700 | 701 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.to_owned())),
        // bool
        16 => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            other => Value::String(other.to_owned()),
        },
        // bytea, hex output
        17 => match text.strip_prefix("\\x").map(hex::decode) {
            Some(Ok(bytes)) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            _ => Value::String(text.to_owned()),
        },
        // timestamp (no zone): ISO 8601 local date-time, no offset (none is known)
        1114 => Value::String(iso_timestamp(text, false)),
        // timestamptz (the session runs in UTC)
        1184 => Value::String(iso_timestamp(text, true)),
        // numeric, money, date, text and everything else: the text form as it is
        _ => Value::String(text.to_owned()),
    }
}

/// `2024-03-05 14:30:00.25+00` → `2024-03-05T14:30:00.25Z`; `+05:30` stays, `+05` becomes
/// `+05:00`. Infinity and BC values are left as PostgreSQL wrote them.
fn iso_timestamp(text: &str, zoned: bool) -> String {
    if text.len() < 19
        || text.ends_with(" BC")
        || !text.as_bytes()[..4].iter().all(u8::is_ascii_digit)
    {
        return text.to_owned();
    }
    let mut out = text.replacen(' ', "T", 1);
    if zoned {
        // The offset starts at the last '+' or '-' after the time.
        if let Some(at) = out[19..].rfind(['+', '-']).map(|i| i + 19) {
            let offset = out[at..].to_owned();
            out.truncate(at);
            match offset.as_str() {
                "+00" | "+00:00" | "-00" => out.push('Z'),
                o if o.len() == 3 => {
                    out.push_str(o);
                    out.push_str(":00");
                }
                o => out.push_str(o),
            }
        }
    }
    out
}

/// A SQLite value as JSON: integers as numbers, reals as numbers, text as text, blobs as
/// base64.
pub fn sqlite_to_json(value: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) => Value::Number(n.into()),
        ValueRef::Real(f) => Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        ValueRef::Text(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
        ValueRef::Blob(bytes) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

/// PostgreSQL's timestamps count microseconds from 2000-01-01 UTC; as RFC 3339.
pub fn pg_epoch_micros_to_rfc3339(micros: i64) -> Option<String> {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    let nanos = (PG_EPOCH_UNIX_SECS as i128) * 1_000_000_000 + (micros as i128) * 1000;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
    at.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn postgres_values_keep_their_meaning() {
        assert_eq!(pg_text_to_json(23, "42"), json!(42));
        assert_eq!(
            pg_text_to_json(20, "-9007199254740993"),
            json!(-9007199254740993i64)
        );
        assert_eq!(
            pg_text_to_json(1700, "12345678901234567890.000001"),
            json!("12345678901234567890.000001")
        );
        assert_eq!(pg_text_to_json(701, "1.5"), json!(1.5));
        assert_eq!(pg_text_to_json(701, "NaN"), json!("NaN"));
        assert_eq!(pg_text_to_json(16, "t"), json!(true));
        assert_eq!(pg_text_to_json(16, "f"), json!(false));
        assert_eq!(pg_text_to_json(17, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(pg_text_to_json(1082, "2024-02-29"), json!("2024-02-29"));
        assert_eq!(
            pg_text_to_json(25, "Zoë Ångström 山田"),
            json!("Zoë Ångström 山田")
        );
        assert_eq!(
            pg_text_to_json(1114, "2024-03-05 14:30:00.25"),
            json!("2024-03-05T14:30:00.25")
        );
        assert_eq!(
            pg_text_to_json(1184, "2024-03-05 14:30:00+00"),
            json!("2024-03-05T14:30:00Z")
        );
        assert_eq!(
            pg_text_to_json(1184, "2024-03-05 14:30:00.5+05:30"),
            json!("2024-03-05T14:30:00.5+05:30")
        );
        assert_eq!(
            pg_text_to_json(1184, "2024-03-05 14:30:00-08"),
            json!("2024-03-05T14:30:00-08:00")
        );
        assert_eq!(pg_text_to_json(1184, "infinity"), json!("infinity"));
    }

    #[test]
    fn commit_times_are_rfc3339() {
        assert_eq!(
            pg_epoch_micros_to_rfc3339(0).unwrap(),
            "2000-01-01T00:00:00Z"
        );
        assert_eq!(
            pg_epoch_micros_to_rfc3339(1_500_000).unwrap(),
            "2000-01-01T00:00:01.5Z"
        );
    }

    #[test]
    fn events_serialize_to_the_documented_shape() {
        let mut key = Row::new();
        key.insert("patnum".into(), json!(7));
        let event = ChangeEvent {
            source: "pms".into(),
            table: "patient".into(),
            op: Op::Delete,
            key: key.clone(),
            before: Some(key),
            after: None,
            position: Some("0/16B3748".into()),
            tx: Some("751".into()),
            commit_time: Some("2024-03-05T14:30:00Z".into()),
            id: Some("ignored".into()),
        };
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(
            value,
            json!({"source": "pms", "table": "patient", "op": "delete", "key": {"patnum": 7},
                   "before": {"patnum": 7}, "after": null, "position": "0/16B3748",
                   "tx": "751", "commit_time": "2024-03-05T14:30:00Z"})
        );
    }
}
