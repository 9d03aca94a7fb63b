//! Firebird column types and how their values reach JSON.
//!
//! Every non-text value is read as its SQL text form (`CAST(x AS VARCHAR(64))`), both in
//! the snapshot and in the triggers, so the two paths map values the same way and nothing
//! passes through a floating-point number on the way: `NUMERIC(15,2)` stays `"12.50"`.

use base64::Engine;
use serde_json::{Number, Value};

/// What a column holds, from `RDB$FIELDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FbKind {
    /// `SMALLINT`, `INTEGER`, `BIGINT` (scale 0).
    Int,
    /// `NUMERIC`/`DECIMAL` (an integer type with a negative scale), `INT128`, `DECFLOAT`.
    Decimal,
    /// `FLOAT`, `DOUBLE PRECISION`.
    Float,
    /// `DATE`.
    Date,
    /// `TIME`.
    Time,
    /// `TIMESTAMP`.
    Timestamp,
    /// `BOOLEAN`.
    Bool,
    /// `CHAR`, `VARCHAR` (any character set but `OCTETS`).
    Text,
    /// `BLOB SUB_TYPE TEXT`.
    TextBlob,
    /// Any other `BLOB`, and `CHAR`/`VARCHAR` in `CHARACTER SET OCTETS`.
    Binary,
}

impl FbKind {
    /// From `RDB$FIELD_TYPE`, `RDB$FIELD_SUB_TYPE`, `RDB$FIELD_SCALE` and
    /// `RDB$CHARACTER_SET_ID`.
    pub fn from_rdb(field_type: i64, sub_type: i64, scale: i64, charset: i64) -> Option<FbKind> {
        Some(match field_type {
            7 | 8 | 16 if scale < 0 => FbKind::Decimal,
            7 | 8 | 16 => FbKind::Int,
            26 => FbKind::Decimal,
            24 | 25 => FbKind::Decimal,
            10 | 27 | 11 => FbKind::Float,
            12 => FbKind::Date,
            13 | 28 => FbKind::Time,
            35 | 29 => FbKind::Timestamp,
            23 => FbKind::Bool,
            14 | 37 | 40 if charset == 1 => FbKind::Binary,
            14 | 37 | 40 => FbKind::Text,
            261 if sub_type == 1 => FbKind::TextBlob,
            261 => FbKind::Binary,
            _ => return None,
        })
    }

    /// Whether the value is read and logged as text (`CAST … AS VARCHAR(64)`).
    pub fn cast_to_text(self) -> bool {
        !matches!(self, FbKind::Text | FbKind::TextBlob | FbKind::Binary)
    }

    /// The expression that reads `column` (already quoted, e.g. `"PATNUM"` or
    /// `NEW."PATNUM"`) so that [`to_json`] can map it.
    pub fn select_expr(self, column: &str) -> String {
        match self {
            FbKind::Binary => format!("CAST({column} AS BLOB SUB_TYPE BINARY)"),
            k if k.cast_to_text() => format!("CAST({column} AS VARCHAR(64))"),
            _ => column.to_owned(),
        }
    }
}

/// A value read as [`FbKind::select_expr`] gave it, as JSON.
pub fn to_json(kind: FbKind, value: Option<Result<String, Vec<u8>>>) -> Value {
    let text = match value {
        None => return Value::Null,
        Some(Err(bytes)) => {
            return Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Some(Ok(text)) => text,
    };
    text_to_json(kind, &text)
}

/// The SQL text form of a value of `kind` as JSON: integers as numbers, decimals as
/// strings exactly as Firebird writes them, floats as numbers, `DATE` as `YYYY-MM-DD`,
/// `TIME` as `HH:MM:SS[.f]`, `TIMESTAMP` as ISO 8601 without an offset (Firebird 3
/// records none), booleans as booleans, text as it is.
pub fn text_to_json(kind: FbKind, text: &str) -> Value {
    match kind {
        FbKind::Int => text
            .trim()
            .parse::<i64>()
            .map(|n| Value::Number(n.into()))
            .unwrap_or_else(|_| Value::String(text.trim().to_owned())),
        FbKind::Float => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(text.trim().to_owned())),
        FbKind::Decimal => Value::String(text.trim().to_owned()),
        FbKind::Date => Value::String(text.trim().to_owned()),
        FbKind::Time => Value::String(trim_fraction(text.trim())),
        FbKind::Timestamp => Value::String(trim_fraction(&text.trim().replacen(' ', "T", 1))),
        FbKind::Bool => match text.trim() {
            "TRUE" | "true" | "1" => Value::Bool(true),
            "FALSE" | "false" | "0" => Value::Bool(false),
            other => Value::String(other.to_owned()),
        },
        FbKind::Text | FbKind::TextBlob | FbKind::Binary => Value::String(text.to_owned()),
    }
}

/// `14:30:00.2500` → `14:30:00.25`; `14:30:00.0000` → `14:30:00`.
fn trim_fraction(text: &str) -> String {
    match text.rsplit_once('.') {
        Some((whole, fraction))
            if !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit()) =>
        {
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                whole.to_owned()
            } else {
                format!("{whole}.{fraction}")
            }
        }
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn values_keep_their_meaning() {
        assert_eq!(text_to_json(FbKind::Int, "42"), json!(42));
        assert_eq!(
            text_to_json(FbKind::Int, "-9223372036854775808"),
            json!(i64::MIN)
        );
        assert_eq!(text_to_json(FbKind::Decimal, "12.50"), json!("12.50"));
        assert_eq!(
            text_to_json(FbKind::Decimal, "-123456789012345.67"),
            json!("-123456789012345.67")
        );
        assert_eq!(text_to_json(FbKind::Float, "1.500000000000000"), json!(1.5));
        assert_eq!(
            text_to_json(FbKind::Date, "2024-02-29"),
            json!("2024-02-29")
        );
        assert_eq!(
            text_to_json(FbKind::Time, "14:30:00.0000"),
            json!("14:30:00")
        );
        assert_eq!(
            text_to_json(FbKind::Timestamp, "2024-03-05 14:30:00.2500"),
            json!("2024-03-05T14:30:00.25")
        );
        assert_eq!(text_to_json(FbKind::Bool, "TRUE"), json!(true));
        assert_eq!(text_to_json(FbKind::Bool, "FALSE"), json!(false));
        assert_eq!(
            text_to_json(FbKind::Text, "Zoë \"Ångström\" 山田"),
            json!("Zoë \"Ångström\" 山田")
        );
        assert_eq!(
            to_json(FbKind::Binary, Some(Err(vec![0, 255, 16]))),
            json!("AP8Q")
        );
        assert_eq!(to_json(FbKind::Int, None), json!(null));
    }

    #[test]
    fn kinds_come_from_the_catalog() {
        assert_eq!(FbKind::from_rdb(8, 0, 0, 0), Some(FbKind::Int));
        assert_eq!(FbKind::from_rdb(16, 1, -2, 0), Some(FbKind::Decimal));
        assert_eq!(FbKind::from_rdb(37, 0, 0, 4), Some(FbKind::Text));
        assert_eq!(FbKind::from_rdb(37, 0, 0, 1), Some(FbKind::Binary));
        assert_eq!(FbKind::from_rdb(261, 1, 0, 4), Some(FbKind::TextBlob));
        assert_eq!(FbKind::from_rdb(261, 0, 0, 0), Some(FbKind::Binary));
        assert_eq!(FbKind::from_rdb(35, 0, 0, 0), Some(FbKind::Timestamp));
        assert_eq!(FbKind::from_rdb(99, 0, 0, 0), None);
    }
}
