//! MariaDB/MySQL values onto JSON, the same mapping as every other source (see
//! `docs/change-events.md`).
//!
//! The binlog does not say enough to map a value alone: `TEXT` and `BLOB` share a binlog type,
//! as do `VARCHAR` and `VARBINARY`, `ENUM` comes as its index, a `TIMESTAMP` as seconds since
//! the epoch and an unsigned integer as a signed one unless `binlog_row_metadata` says
//! otherwise. So each column's [`Kind`] is taken from `information_schema.COLUMNS`, and both
//! the snapshot (binary protocol, session time zone UTC, `utf8mb4`) and the binlog map through
//! it, giving the same JSON for the same stored value.

use base64::Engine;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::Value as MyValue;
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

/// How a column's values map onto JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `TINYINT` … `BIGINT`; `bits` is the storage width (for unsigned values the binlog
    /// gives as negative numbers).
    Int {
        /// `UNSIGNED`.
        unsigned: bool,
        /// 8, 16, 24, 32 or 64.
        bits: u32,
    },
    /// `FLOAT`, `DOUBLE`.
    Float,
    /// `DECIMAL`: a string, without loss.
    Decimal,
    /// `DATE`: `YYYY-MM-DD`.
    Date,
    /// `DATETIME`: ISO 8601 without an offset (the database records none).
    DateTime,
    /// `TIMESTAMP`: RFC 3339 in UTC.
    Timestamp,
    /// `TIME`: `[-]HH:MM:SS[.ffffff]` (hours may exceed 24).
    Time,
    /// `YEAR`: a number.
    Year,
    /// `BIT(n)`: a number.
    Bit,
    /// `BINARY`, `VARBINARY`, `BLOB`s and anything without a text form: base64. `BINARY(n)`
    /// values are padded with zero bytes to `n` (the binlog strips the padding).
    Binary {
        /// `BINARY(n)`: the length to pad to.
        pad: Option<usize>,
    },
    /// Text in the column's character set (`latin1` is decoded as such, everything else as
    /// UTF-8).
    Text {
        /// The column's character set is `latin1`.
        latin1: bool,
    },
    /// `ENUM('a','b')`: the binlog gives the index.
    Enum(Vec<String>),
    /// `SET('a','b')`: the binlog gives a bit mask.
    Set(Vec<String>),
}

impl Kind {
    /// From `information_schema.COLUMNS`: `DATA_TYPE`, `COLUMN_TYPE`, `CHARACTER_SET_NAME`
    /// and `CHARACTER_OCTET_LENGTH`.
    pub fn from_schema(
        data_type: &str,
        column_type: &str,
        charset: Option<&str>,
        octet_length: Option<u64>,
    ) -> Kind {
        let column_type_lower = column_type.to_ascii_lowercase();
        let unsigned = column_type_lower.contains("unsigned");
        let int = |bits| Kind::Int { unsigned, bits };
        match data_type.to_ascii_lowercase().as_str() {
            "tinyint" | "bool" | "boolean" => int(8),
            "smallint" => int(16),
            "mediumint" => int(24),
            "int" | "integer" => int(32),
            "bigint" => int(64),
            "float" | "double" | "real" | "double precision" => Kind::Float,
            "decimal" | "numeric" | "fixed" | "dec" => Kind::Decimal,
            "date" => Kind::Date,
            "datetime" => Kind::DateTime,
            "timestamp" => Kind::Timestamp,
            "time" => Kind::Time,
            "year" => Kind::Year,
            "bit" => Kind::Bit,
            "binary" => Kind::Binary {
                pad: octet_length.and_then(|n| usize::try_from(n).ok()),
            },
            "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry"
            | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
            | "multipolygon" | "geometrycollection" => Kind::Binary { pad: None },
            "enum" => Kind::Enum(parse_list(column_type)),
            "set" => Kind::Set(parse_list(column_type)),
            _ => match charset {
                // A character type with the binary character set is binary.
                Some("binary") => Kind::Binary { pad: None },
                Some(charset) => Kind::Text {
                    latin1: charset.eq_ignore_ascii_case("latin1"),
                },
                None => Kind::Text { latin1: false },
            },
        }
    }
}

/// `enum('a','it''s')` → `["a", "it's"]`.
fn parse_list(column_type: &str) -> Vec<String> {
    let Some(open) = column_type.find('(') else {
        return Vec::new();
    };
    let body = &column_type[open + 1..];
    let mut items = Vec::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut item = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    item.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(next) = chars.next() {
                        item.push(next);
                    }
                }
                other => item.push(other),
            }
        }
        items.push(item);
    }
    items
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(f.to_string()))
}

/// An `f32` by its shortest decimal form (`1.1`, not `1.100000023841858`).
fn float32(f: f32) -> Value {
    f.to_string()
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(f.to_string()))
}

/// `.25` for 250000 µs, nothing for 0.
fn fraction(micros: u32) -> String {
    if micros == 0 {
        return String::new();
    }
    let text = format!(".{micros:06}");
    text.trim_end_matches('0').to_owned()
}

fn date_text(y: u16, m: u8, d: u8) -> String {
    format!("{y:04}-{m:02}-{d:02}")
}

fn datetime_text(parts: (u16, u8, u8, u8, u8, u8, u32)) -> String {
    let (y, mo, d, h, mi, s, us) = parts;
    format!(
        "{}T{h:02}:{mi:02}:{s:02}{}",
        date_text(y, mo, d),
        fraction(us)
    )
}

fn text(bytes: &[u8], latin1: bool) -> String {
    if latin1 {
        bytes.iter().map(|&b| char::from(b)).collect()
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Seconds (and microseconds) since the epoch as RFC 3339 UTC; zero is MariaDB's zero
/// timestamp and stays `0000-00-00T00:00:00Z`.
fn epoch_text(secs: i64, micros: u32) -> String {
    if secs == 0 && micros == 0 {
        return "0000-00-00T00:00:00Z".to_owned();
    }
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(at) => {
            let parts = (
                u16::try_from(at.year()).unwrap_or(0),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second(),
                micros,
            );
            format!("{}Z", datetime_text(parts))
        }
        Err(_) => format!("{secs}.{micros:06}"),
    }
}

/// `"1709649000.500000"` (how the binlog gives a `TIMESTAMP(n)`) → seconds and µs.
fn parse_epoch(text: &str) -> Option<(i64, u32)> {
    let (secs, frac) = match text.split_once('.') {
        Some((secs, frac)) => (secs, frac),
        None => (text, ""),
    };
    let secs = secs.parse().ok()?;
    let micros = if frac.is_empty() {
        0
    } else {
        let padded = format!("{frac:0<6}");
        padded.get(..6)?.parse().ok()?
    };
    Some((secs, micros))
}

fn bits_number(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return b64(bytes);
    }
    let n = bytes.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
    Value::Number(n.into())
}

/// A value of a column of kind `kind`, as the snapshot read it (binary protocol), as JSON.
pub fn to_json(kind: &Kind, value: &MyValue) -> Value {
    convert(kind, value, false)
}

/// `binlog`: the value comes from the binlog (a `SET` as a bit mask, a `TIMESTAMP` as
/// seconds since the epoch).
fn convert(kind: &Kind, value: &MyValue, binlog: bool) -> Value {
    match (kind, value) {
        (_, MyValue::NULL) => Value::Null,
        (Kind::Int { unsigned, bits }, MyValue::Int(n)) => {
            if *unsigned && *n < 0 {
                // The binlog without signedness metadata reads unsigned columns as signed.
                let n = if *bits >= 64 {
                    *n as u64
                } else {
                    (*n + (1i64 << bits)) as u64
                };
                Value::Number(n.into())
            } else {
                Value::Number((*n).into())
            }
        }
        (Kind::Enum(names), MyValue::Int(n)) => usize::try_from(*n)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| names.get(i))
            .map(|name| Value::String(name.clone()))
            // Index 0 is MariaDB's empty "error" value.
            .unwrap_or_else(|| Value::String(String::new())),
        (Kind::Enum(names), MyValue::UInt(n)) => usize::try_from(*n)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| names.get(i))
            .map(|name| Value::String(name.clone()))
            .unwrap_or_else(|| Value::String(String::new())),
        (_, MyValue::Int(n)) => match kind {
            Kind::Timestamp => Value::String(epoch_text(*n, 0)),
            _ => Value::Number((*n).into()),
        },
        (_, MyValue::UInt(n)) => Value::Number((*n).into()),
        (_, MyValue::Float(f)) => float32(*f),
        (_, MyValue::Double(f)) => float(*f),
        (Kind::Date, MyValue::Date(y, m, d, ..)) => Value::String(date_text(*y, *m, *d)),
        (Kind::Timestamp, MyValue::Date(y, mo, d, h, mi, s, us)) => Value::String(format!(
            "{}Z",
            datetime_text((*y, *mo, *d, *h, *mi, *s, *us))
        )),
        (_, MyValue::Date(y, mo, d, h, mi, s, us)) => {
            Value::String(datetime_text((*y, *mo, *d, *h, *mi, *s, *us)))
        }
        (_, MyValue::Time(negative, days, h, m, s, us)) => {
            let hours = u32::from(*h) + days * 24;
            Value::String(format!(
                "{}{hours:02}:{m:02}:{s:02}{}",
                if *negative { "-" } else { "" },
                fraction(*us)
            ))
        }
        (kind, MyValue::Bytes(bytes)) => bytes_to_json(kind, bytes, binlog),
    }
}

fn bytes_to_json(kind: &Kind, bytes: &[u8], binlog: bool) -> Value {
    match kind {
        Kind::Binary { pad } => match pad {
            Some(n) if bytes.len() < *n => {
                let mut padded = bytes.to_vec();
                padded.resize(*n, 0);
                b64(&padded)
            }
            _ => b64(bytes),
        },
        Kind::Bit => bits_number(bytes),
        Kind::Int { .. } | Kind::Year => {
            let text = String::from_utf8_lossy(bytes);
            text.parse::<i64>()
                .map(|n| Value::Number(n.into()))
                .or_else(|_| text.parse::<u64>().map(|n| Value::Number(n.into())))
                .unwrap_or_else(|_| Value::String(text.into_owned()))
        }
        Kind::Float => {
            let text = String::from_utf8_lossy(bytes);
            text.parse::<f64>()
                .map(float)
                .unwrap_or_else(|_| Value::String(text.into_owned()))
        }
        Kind::Timestamp if binlog => {
            let text = String::from_utf8_lossy(bytes);
            match parse_epoch(&text) {
                Some((secs, micros)) => Value::String(epoch_text(secs, micros)),
                None => Value::String(text.into_owned()),
            }
        }
        Kind::Set(names) if binlog && bytes.len() <= 8 => {
            // The binlog's bit mask, little-endian.
            let mask = bytes
                .iter()
                .rev()
                .fold(0u64, |n, &b| (n << 8) | u64::from(b));
            let chosen: Vec<&str> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i < 64 && mask & (1u64 << i) != 0)
                .map(|(_, name)| name.as_str())
                .collect();
            Value::String(chosen.join(","))
        }
        Kind::Text { latin1 } => Value::String(text(bytes, *latin1)),
        _ => Value::String(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// A binlog value of a column of kind `kind` as JSON: the same JSON as [`to_json`] gives
/// for the same stored value.
pub fn binlog_to_json(kind: &Kind, value: &BinlogValue<'_>) -> Value {
    match value {
        BinlogValue::Value(value) => convert(kind, value, true),
        BinlogValue::Jsonb(jsonb) => match serde_json::Value::try_from(jsonb.clone()) {
            Ok(json) => Value::String(json.to_string()),
            Err(err) => Value::String(format!("(unreadable JSON: {err})")),
        },
        // Partial JSON updates (MySQL's binlog_row_value_options) are left out.
        BinlogValue::JsonDiff(_) => Value::Null,
    }
}

/// A key value as stored in a snapshot position, to resume after it (typed, so that the
/// comparison in `WHERE key > ?` is the column's own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyValue {
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    Uint(u64),
    /// A float.
    Float(f64),
    /// Text (also dates and decimals, in the server's own text form).
    Text(String),
    /// Bytes that are not UTF-8, base64.
    Bytes(String),
    /// NULL. The snapshot no longer stores one (key columns must be NOT NULL); kept so
    /// that a position stored by an older version still reads back.
    Null,
}

impl KeyValue {
    /// From a value the snapshot read.
    pub fn from_value(value: &MyValue) -> KeyValue {
        match value {
            MyValue::NULL => KeyValue::Null,
            MyValue::Int(n) => KeyValue::Int(*n),
            MyValue::UInt(n) => KeyValue::Uint(*n),
            MyValue::Float(f) => KeyValue::Float(f64::from(*f)),
            MyValue::Double(f) => KeyValue::Float(*f),
            MyValue::Bytes(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => KeyValue::Text(text.to_owned()),
                Err(_) => KeyValue::Bytes(base64::engine::general_purpose::STANDARD.encode(bytes)),
            },
            MyValue::Date(y, mo, d, h, mi, s, us) => KeyValue::Text(format!(
                "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"
            )),
            MyValue::Time(negative, days, h, m, s, us) => KeyValue::Text(format!(
                "{}{}:{m:02}:{s:02}.{us:06}",
                if *negative { "-" } else { "" },
                u32::from(*h) + days * 24
            )),
        }
    }

    /// As a bound parameter.
    pub fn to_value(&self) -> MyValue {
        match self {
            KeyValue::Int(n) => MyValue::Int(*n),
            KeyValue::Uint(n) => MyValue::UInt(*n),
            KeyValue::Float(f) => MyValue::Double(*f),
            KeyValue::Text(text) => MyValue::Bytes(text.as_bytes().to_vec()),
            KeyValue::Bytes(b64) => MyValue::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_default(),
            ),
            KeyValue::Null => MyValue::NULL,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn kind(data_type: &str, column_type: &str) -> Kind {
        Kind::from_schema(data_type, column_type, Some("utf8mb4"), Some(4))
    }

    #[test]
    fn kinds_come_from_the_schema() {
        assert_eq!(
            kind("int", "int(10) unsigned"),
            Kind::Int {
                unsigned: true,
                bits: 32
            }
        );
        assert_eq!(
            kind("enum", "enum('a','it''s')"),
            Kind::Enum(vec!["a".into(), "it's".into()])
        );
        assert_eq!(kind("binary", "binary(4)"), Kind::Binary { pad: Some(4) });
        assert_eq!(
            Kind::from_schema("varchar", "varchar(20)", Some("latin1"), None),
            Kind::Text { latin1: true }
        );
        assert_eq!(
            Kind::from_schema("varchar", "varchar(20)", Some("binary"), None),
            Kind::Binary { pad: None }
        );
    }

    #[test]
    fn values_keep_their_meaning() {
        let int = kind("int", "int(11)");
        assert_eq!(to_json(&int, &MyValue::Int(-7)), json!(-7));
        assert_eq!(to_json(&int, &MyValue::NULL), Value::Null);
        let tiny_unsigned = kind("tinyint", "tinyint(3) unsigned");
        assert_eq!(to_json(&tiny_unsigned, &MyValue::Int(-56)), json!(200));
        let big_unsigned = kind("bigint", "bigint(20) unsigned");
        assert_eq!(
            to_json(&big_unsigned, &MyValue::Int(-1)),
            json!(18446744073709551615u64)
        );
        assert_eq!(
            to_json(&Kind::Decimal, &MyValue::Bytes(b"12345678901.99".to_vec())),
            json!("12345678901.99")
        );
        assert_eq!(to_json(&Kind::Float, &MyValue::Float(1.1)), json!(1.1));
        assert_eq!(
            to_json(&Kind::Date, &MyValue::Date(2024, 2, 29, 0, 0, 0, 0)),
            json!("2024-02-29")
        );
        assert_eq!(
            to_json(
                &Kind::DateTime,
                &MyValue::Date(2024, 3, 5, 14, 30, 0, 250_000)
            ),
            json!("2024-03-05T14:30:00.25")
        );
        assert_eq!(
            to_json(&Kind::Timestamp, &MyValue::Date(2024, 3, 5, 14, 30, 0, 0)),
            json!("2024-03-05T14:30:00Z")
        );
        // The binlog's form of the same TIMESTAMP: seconds since the epoch.
        let binlog = |kind: &Kind, value: MyValue| binlog_to_json(kind, &BinlogValue::Value(value));
        assert_eq!(
            binlog(
                &Kind::Timestamp,
                MyValue::Bytes(b"1709649000.500000".to_vec())
            ),
            json!("2024-03-05T14:30:00.5Z")
        );
        assert_eq!(
            binlog(&Kind::Timestamp, MyValue::Bytes(b"1709649000".to_vec())),
            json!("2024-03-05T14:30:00Z")
        );
        assert_eq!(
            to_json(&Kind::Time, &MyValue::Time(true, 1, 2, 3, 4, 0)),
            json!("-26:03:04")
        );
        assert_eq!(
            to_json(&Kind::Binary { pad: Some(4) }, &MyValue::Bytes(vec![1, 2])),
            json!("AQIAAA==")
        );
        assert_eq!(
            to_json(
                &Kind::Binary { pad: None },
                &MyValue::Bytes(vec![0, 255, 16])
            ),
            json!("AP8Q")
        );
        assert_eq!(
            to_json(
                &Kind::Text { latin1: false },
                &MyValue::Bytes("Zoë 山田".as_bytes().to_vec())
            ),
            json!("Zoë 山田")
        );
        assert_eq!(
            to_json(
                &Kind::Text { latin1: true },
                &MyValue::Bytes(vec![b'Z', 0xEB])
            ),
            json!("Zë")
        );
        let enum_kind = Kind::Enum(vec!["a".into(), "b".into()]);
        assert_eq!(to_json(&enum_kind, &MyValue::Int(2)), json!("b"));
        assert_eq!(
            to_json(&enum_kind, &MyValue::Bytes(b"b".to_vec())),
            json!("b")
        );
        let set_kind = Kind::Set(vec!["x".into(), "y".into(), "z".into()]);
        assert_eq!(binlog(&set_kind, MyValue::Bytes(vec![5])), json!("x,z"));
        assert_eq!(
            to_json(&set_kind, &MyValue::Bytes(b"x,z".to_vec())),
            json!("x,z")
        );
        assert_eq!(to_json(&Kind::Bit, &MyValue::Bytes(vec![1, 2])), json!(258));
        assert_eq!(
            to_json(&Kind::Year, &MyValue::Bytes(b"2024".to_vec())),
            json!(2024)
        );
    }

    #[test]
    fn key_values_round_trip() {
        for value in [
            MyValue::Int(-3),
            MyValue::UInt(u64::MAX),
            MyValue::Bytes(b"abc".to_vec()),
            MyValue::Bytes(vec![0xff, 0]),
        ] {
            let key = KeyValue::from_value(&value);
            let text = serde_json::to_string(&key).unwrap();
            let back: KeyValue = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_value(), value);
        }
    }
}
