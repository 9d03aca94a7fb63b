//! Write-back to PostgreSQL: `$N` binds, values in PostgreSQL's text format (the server
//! converts each to the type it infers for the parameter, as it would a quoted literal,
//! but the value is never part of the SQL text), returned rows decoded to JSON, and the
//! transaction id as the marker whose fate `txid_status` tells after a crash.

use base64::Engine;
use serde_json::{Map, Number, Value};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::Client;

use super::placeholders::BindStyle;
use super::{Dialect, ExecError, Executed, Fate, Session};
use crate::event::pg_epoch_micros_to_rfc3339;

/// How long one statement may run before the server cancels it (and nothing is written).
const STATEMENT_TIMEOUT: &str = "20s";

/// PostgreSQL, reached by URL (and a password from the sink's settings).
pub struct Postgres {
    /// The URL as configured.
    pub url: String,
    /// From `password_file` or `password_env`.
    pub password: Option<String>,
}

#[async_trait::async_trait]
impl Dialect for Postgres {
    fn name(&self) -> &'static str {
        "postgresql"
    }

    fn bind_style(&self) -> BindStyle {
        BindStyle::Dollar
    }

    fn has_markers(&self) -> bool {
        true
    }

    async fn connect(&self) -> Result<Box<dyn Session>, ExecError> {
        let (client, task) =
            crate::postgres::pg_connect(&self.url, self.password.as_deref(), "outpost-writeback")
                .await
                .map_err(|err| ExecError::Unavailable(err.to_string()))?;
        let session = PgSession { client, task };
        session
            .client
            .batch_execute(&format!(
                "SET statement_timeout = '{STATEMENT_TIMEOUT}'; SET extra_float_digits = 3"
            ))
            .await
            .map_err(classify)?;
        Ok(Box::new(session))
    }
}

struct PgSession {
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait::async_trait]
impl Session for PgSession {
    async fn begin(&mut self) -> Result<Option<String>, ExecError> {
        self.client.batch_execute("BEGIN").await.map_err(classify)?;
        let row = self
            .client
            .query_one("SELECT txid_current()::text", &[])
            .await
            .map_err(classify)?;
        let xid: String = row.try_get(0).map_err(classify)?;
        Ok(Some(xid))
    }

    async fn execute(&mut self, sql: &str, values: &[Value]) -> Result<Executed, ExecError> {
        let params: Vec<TextParam> = values.iter().map(TextParam::from_json).collect();
        let stream = self
            .client
            .query_raw(sql, params.iter().map(|p| p as &(dyn ToSql + Sync)))
            .await
            .map_err(classify)?;
        let (rows, rows_affected) = collect_rows(stream).await.map_err(classify)?;
        let mut returned = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut out = Map::new();
            for (i, column) in row.columns().iter().enumerate() {
                let cell: Returned = row.try_get(i).map_err(classify)?;
                let value = cell.0.map_err(|type_name| {
                    ExecError::Invalid(format!(
                        "returned column {:?} has type {type_name}, which is not mapped to JSON; cast it in the statement, e.g. RETURNING {}::text",
                        column.name(),
                        column.name()
                    ))
                })?;
                out.insert(column.name().to_owned(), value);
            }
            returned.push(out);
        }
        Ok(Executed {
            rows_affected: rows_affected.unwrap_or(rows.len() as u64),
            returned,
        })
    }

    async fn commit(&mut self) -> Result<(), ExecError> {
        self.client.batch_execute("COMMIT").await.map_err(classify)
    }

    async fn rollback(&mut self) {
        if let Err(err) = self.client.batch_execute("ROLLBACK").await {
            tracing::debug!(error = %err, "rollback failed (the connection is dropped)");
        }
    }

    async fn fate(&mut self, marker: &str) -> Result<Fate, ExecError> {
        let row = self
            .client
            .query_one("SELECT txid_status($1::text::bigint)", &[&marker])
            .await
            .map_err(classify)?;
        let status: Option<String> = row.try_get(0).map_err(classify)?;
        Ok(match status.as_deref() {
            Some("committed") => Fate::Committed,
            Some("aborted") => Fate::Aborted,
            _ => Fate::Unknown,
        })
    }

    fn is_usable(&self) -> bool {
        !self.client.is_closed()
    }
}

/// Reads a row stream to its end; the command tag's count comes with the end.
async fn collect_rows(
    stream: tokio_postgres::RowStream,
) -> Result<(Vec<tokio_postgres::Row>, Option<u64>), tokio_postgres::Error> {
    use futures::TryStreamExt;
    let mut stream = std::pin::pin!(stream);
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await? {
        rows.push(row);
    }
    Ok((rows, stream.rows_affected()))
}

/// An error from the database or the connection.
fn classify(err: tokio_postgres::Error) -> ExecError {
    match err.as_db_error() {
        Some(db) => {
            let code = db.code().code().to_owned();
            let transient =
                ["40", "53", "57", "08"].iter().any(|c| code.starts_with(c)) || code == "55P03";
            ExecError::Refused {
                message: db.message().to_owned(),
                code,
                transient,
            }
        }
        None => ExecError::Unavailable(crate::error::pg_message(&err)),
    }
}

/// A value sent in text format: the server parses it as the parameter's type.
#[derive(Debug)]
struct TextParam(Option<String>);

impl TextParam {
    fn from_json(value: &Value) -> TextParam {
        TextParam(match value {
            Value::Null => None,
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            // Refused before this point; sent as JSON text if ever reached.
            other => Some(other.to_string()),
        })
    }
}

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> tokio_postgres::types::Format {
        tokio_postgres::types::Format::Text
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A returned cell as JSON, or the name of a type that is not mapped.
struct Returned(Result<Value, String>);

impl<'a> FromSql<'a> for Returned {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Returned(decode(ty, raw)))
    }

    fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Returned(Ok(Value::Null)))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

fn be<const N: usize>(raw: &[u8]) -> Result<[u8; N], String> {
    raw.try_into().map_err(|_| "a malformed value".to_owned())
}

/// Binary format → JSON, as the change events map values: integers as numbers, decimals
/// as strings, timestamps RFC 3339, binary base64.
fn decode(ty: &Type, raw: &[u8]) -> Result<Value, String> {
    let value = match *ty {
        Type::BOOL => Value::Bool(raw.first().is_some_and(|b| *b != 0)),
        Type::INT2 => Value::from(i16::from_be_bytes(be(raw)?)),
        Type::INT4 => Value::from(i32::from_be_bytes(be(raw)?)),
        Type::INT8 => Value::from(i64::from_be_bytes(be(raw)?)),
        Type::OID => Value::from(u32::from_be_bytes(be(raw)?)),
        Type::FLOAT4 => float(f64::from(f32::from_be_bytes(be(raw)?))),
        Type::FLOAT8 => float(f64::from_be_bytes(be(raw)?)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::CHAR => {
            Value::String(String::from_utf8_lossy(raw).into_owned())
        }
        Type::JSON => serde_json::from_slice(raw).map_err(|_| "json".to_owned())?,
        Type::JSONB => serde_json::from_slice(raw.get(1..).unwrap_or_default())
            .map_err(|_| "jsonb".to_owned())?,
        Type::BYTEA => Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
        Type::NUMERIC => Value::String(numeric(raw).ok_or_else(|| "numeric".to_owned())?),
        Type::DATE => {
            let days = i32::from_be_bytes(be(raw)?);
            match days {
                i32::MAX => Value::String("infinity".into()),
                i32::MIN => Value::String("-infinity".into()),
                days => {
                    let epoch = time::macros::date!(2000 - 01 - 01);
                    let date = epoch
                        .checked_add(time::Duration::days(days.into()))
                        .ok_or_else(|| "date".to_owned())?;
                    Value::String(date.to_string())
                }
            }
        }
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let micros = i64::from_be_bytes(be(raw)?);
            match micros {
                i64::MAX => Value::String("infinity".into()),
                i64::MIN => Value::String("-infinity".into()),
                micros => {
                    let text =
                        pg_epoch_micros_to_rfc3339(micros).ok_or_else(|| "timestamp".to_owned())?;
                    if *ty == Type::TIMESTAMP {
                        Value::String(text.trim_end_matches('Z').to_owned())
                    } else {
                        Value::String(text)
                    }
                }
            }
        }
        Type::TIME => {
            let micros = i64::from_be_bytes(be(raw)?);
            let (secs, frac) = (micros / 1_000_000, micros % 1_000_000);
            let mut text = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
            if frac != 0 {
                text.push_str(format!(".{frac:06}").trim_end_matches('0'));
            }
            Value::String(text)
        }
        Type::UUID => {
            let hex = hex::encode(raw);
            if hex.len() != 32 {
                return Err("uuid".into());
            }
            Value::String(format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            ))
        }
        _ => return Err(ty.name().to_owned()),
    };
    Ok(value)
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(f.to_string()))
}

/// PostgreSQL's binary numeric (base-10000 digits) as decimal text, without loss.
fn numeric(raw: &[u8]) -> Option<String> {
    let word =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*raw.get(i)?, *raw.get(i + 1)?])) };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(2)? as i16);
    let sign = word(4)?;
    let dscale = usize::from(word(6)?);
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(8 + 2 * i))
        .collect::<Option<_>>()?;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => {}
    }
    let digit = |pos: i32| -> u16 {
        usize::try_from(pos)
            .ok()
            .and_then(|p| digits.get(p).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for pos in 0..=weight {
            if pos == 0 {
                text.push_str(&digit(pos).to_string());
            } else {
                text.push_str(&format!("{:04}", digit(pos)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let mut pos = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(pos)));
            pos += 1;
        }
        frac.truncate(dscale);
        text.push('.');
        text.push_str(&frac);
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn numeric_bytes(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut raw = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            raw.extend_from_slice(&d.to_be_bytes());
        }
        raw
    }

    #[test]
    fn numerics_decode_without_loss() {
        assert_eq!(
            numeric(&numeric_bytes(2, 0, 0, 2, &[12, 5000])).unwrap(),
            "12.50"
        );
        assert_eq!(
            numeric(&numeric_bytes(1, -1, 0x4000, 2, &[500])).unwrap(),
            "-0.05"
        );
        assert_eq!(
            numeric(&numeric_bytes(1, -2, 0, 5, &[5000])).unwrap(),
            "0.00005"
        );
        assert_eq!(
            numeric(&numeric_bytes(2, 1, 0, 0, &[1, 2])).unwrap(),
            "10002"
        );
        assert_eq!(
            numeric(&numeric_bytes(1, 2, 0, 0, &[7])).unwrap(),
            "700000000"
        );
        assert_eq!(numeric(&numeric_bytes(0, 0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(
            numeric(&numeric_bytes(0, 0, 0xC000, 0, &[])).unwrap(),
            "NaN"
        );
    }

    #[test]
    fn returned_values_keep_their_meaning() {
        assert_eq!(
            decode(&Type::INT4, &42i32.to_be_bytes()).unwrap(),
            Value::from(42)
        );
        assert_eq!(
            decode(&Type::TIMESTAMPTZ, &1_500_000i64.to_be_bytes()).unwrap(),
            Value::from("2000-01-01T00:00:01.5Z")
        );
        assert_eq!(
            decode(&Type::DATE, &60i32.to_be_bytes()).unwrap(),
            Value::from("2000-03-01")
        );
        assert_eq!(
            decode(&Type::TIME, &(3_723_500_000i64).to_be_bytes()).unwrap(),
            Value::from("01:02:03.5")
        );
        assert!(decode(&Type::INTERVAL, &[0; 16]).is_err());
    }
}
