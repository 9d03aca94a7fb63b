//! PostgreSQL values written straight into JSON bytes, from the binary result format (the
//! snapshot's fast path) or from text (types without a binary decoder here).
//!
//! The JSON is byte for byte what `serde_json::to_vec(&pg_text_to_json(oid, text))` gives
//! for the text PostgreSQL prints for the same value in the capture session (`DateStyle
//! 'ISO, YMD'`, `TimeZone 'UTC'`, `extra_float_digits 3`): the stream's change events carry
//! text values, and a row must look the same in a snapshot event and in a change event.
//! Text here means the type's output function, as pgoutput sends it; for `char(n)` that keeps
//! the padding, which a `::text` cast would drop.
//!
//! Nothing here panics on malformed bytes: a value that is too short, too long or out of
//! PostgreSQL's own range is a [`SqlError::Decode`], and the output buffer is left as it was.

use base64::Engine;
use serde_json::ser::{CompactFormatter, Formatter};
use tokio_postgres::types::{FromSql, Type};

use crate::SqlError;

const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const NAME: u32 = 19;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const OID: u32 = 26;
const XID: u32 = 28;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const BPCHAR: u32 = 1042;
const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const UUID: u32 = 2950;
const JSONB: u32 = 3802;

/// Whether `write_binary_json` decodes this type's binary form; for other types the snapshot
/// selects `col::text` and calls `write_text_json`.
pub fn decodes_binary(type_oid: u32) -> bool {
    matches!(
        type_oid,
        BOOL | BYTEA
            | NAME
            | INT8
            | INT2
            | INT4
            | TEXT
            | OID
            | JSON
            | FLOAT4
            | FLOAT8
            | BPCHAR
            | VARCHAR
            | DATE
            | TIMESTAMP
            | TIMESTAMPTZ
            | NUMERIC
            | UUID
            | JSONB
    )
}

/// Appends the JSON of one non-NULL value given in PostgreSQL's binary format. On error
/// `out` is left as it was.
pub fn write_binary_json(type_oid: u32, raw: &[u8], out: &mut Vec<u8>) -> Result<(), SqlError> {
    let start = out.len();
    let written = write_binary(type_oid, raw, out);
    if written.is_err() {
        out.truncate(start);
    }
    written
}

/// Appends the JSON of one non-NULL value given in text form: the same bytes as
/// serde_json::to_vec(&pg_text_to_json(type_oid, text)), without building a Value.
pub fn write_text_json(type_oid: u32, text: &str, out: &mut Vec<u8>) {
    // Each arm mirrors the arm of `pg_text_to_json` for the same types.
    match type_oid {
        INT2 | INT4 | INT8 | OID | XID => match text.parse::<i64>() {
            Ok(number) => write_integer(number, out),
            Err(_) => write_json_string(text, out),
        },
        FLOAT4 | FLOAT8 => match text.parse::<f64>() {
            Ok(number) if number.is_finite() => write_finite_f64(number, out),
            _ => write_json_string(text, out),
        },
        BOOL => match text {
            "t" | "true" => out.extend_from_slice(b"true"),
            "f" | "false" => out.extend_from_slice(b"false"),
            other => write_json_string(other, out),
        },
        BYTEA => match text.strip_prefix("\\x") {
            Some(hex) if is_hex(hex.as_bytes()) => write_hex_as_base64(hex.as_bytes(), out),
            _ => write_json_string(text, out),
        },
        TIMESTAMP => write_iso_timestamp(text, false, out),
        TIMESTAMPTZ => write_iso_timestamp(text, true, out),
        _ => write_json_string(text, out),
    }
}

/// Appends `text` as a JSON string (quotes and escapes), as serde_json would.
pub fn write_json_string(text: &str, out: &mut Vec<u8>) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    write_escaped(text.as_bytes(), out);
    out.push(b'"');
}

/// A tokio-postgres FromSql that borrows any column's raw bytes (accepts every type), so a
/// row's values can be read without allocation: `row.try_get::<_, Option<RawValue>>(i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawValue<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> Result<RawValue<'a>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn write_binary(type_oid: u32, raw: &[u8], out: &mut Vec<u8>) -> Result<(), SqlError> {
    match type_oid {
        BOOL => {
            // boolrecv takes any non-zero byte as true.
            let [byte] = fixed::<1>(raw, "bool")?;
            out.extend_from_slice(if byte != 0 { b"true" } else { b"false" });
        }
        INT2 => write_integer(i16::from_be_bytes(fixed(raw, "int2")?).into(), out),
        INT4 => write_integer(i32::from_be_bytes(fixed(raw, "int4")?).into(), out),
        INT8 => write_integer(i64::from_be_bytes(fixed(raw, "int8")?), out),
        OID => write_integer(u32::from_be_bytes(fixed(raw, "oid")?).into(), out),
        FLOAT4 => write_float4(f32::from_be_bytes(fixed(raw, "float4")?), out),
        FLOAT8 => write_float8(f64::from_be_bytes(fixed(raw, "float8")?), out),
        BYTEA => write_base64(raw, out)?,
        TEXT | VARCHAR | BPCHAR | NAME | JSON => {
            write_json_string(utf8(raw, type_name(type_oid))?, out)
        }
        JSONB => match raw.split_first() {
            // jsonb_send: a format version, then the same text jsonb_out prints.
            Some((1, text)) => write_json_string(utf8(text, "jsonb")?, out),
            Some((version, _)) => {
                return Err(decode_error(format!(
                    "jsonb: format version {version}, expected 1"
                )))
            }
            None => return Err(decode_error("jsonb: 0 bytes, expected at least 1".into())),
        },
        DATE => write_date(i32::from_be_bytes(fixed(raw, "date")?), out)?,
        TIMESTAMP => write_timestamp(i64::from_be_bytes(fixed(raw, "timestamp")?), false, out)?,
        TIMESTAMPTZ => write_timestamp(i64::from_be_bytes(fixed(raw, "timestamptz")?), true, out)?,
        NUMERIC => write_numeric(raw, out)?,
        UUID => write_uuid(fixed(raw, "uuid")?, out),
        other => {
            return Err(decode_error(format!(
                "type oid {other}: no binary decoder, select it as text"
            )))
        }
    }
    Ok(())
}

fn type_name(type_oid: u32) -> &'static str {
    match type_oid {
        TEXT => "text",
        VARCHAR => "varchar",
        BPCHAR => "bpchar",
        NAME => "name",
        JSON => "json",
        _ => "text-like type",
    }
}

fn decode_error(message: String) -> SqlError {
    SqlError::Decode(message)
}

/// The value as a fixed-size array, or an error naming the type and both sizes.
fn fixed<const N: usize>(raw: &[u8], type_name: &str) -> Result<[u8; N], SqlError> {
    raw.try_into()
        .map_err(|_| decode_error(format!("{type_name}: {} bytes, expected {N}", raw.len())))
}

fn utf8<'a>(raw: &'a [u8], type_name: &str) -> Result<&'a str, SqlError> {
    std::str::from_utf8(raw).map_err(|err| {
        decode_error(format!(
            "{type_name}: not valid UTF-8 at byte {}",
            err.valid_up_to()
        ))
    })
}

// Numbers go through serde_json's own formatter, so they print exactly as a
// `serde_json::Value` holding them would, whichever float printer serde_json uses.
// Writing into a Vec cannot fail, hence the ignored results.

fn write_integer(number: i64, out: &mut Vec<u8>) {
    let _ = CompactFormatter.write_i64(out, number);
}

/// A finite double as serde_json prints it (`Number::from_f64` holds only finite ones).
fn write_finite_f64(number: f64, out: &mut Vec<u8>) {
    let _ = CompactFormatter.write_f64(out, number);
}

/// NaN and the infinities as PostgreSQL spells them (the text path keeps them strings).
fn write_non_finite(number: f64, out: &mut Vec<u8>) {
    out.extend_from_slice(if number.is_nan() {
        b"\"NaN\""
    } else if number > 0.0 {
        b"\"Infinity\""
    } else {
        b"\"-Infinity\""
    });
}

fn write_float8(number: f64, out: &mut Vec<u8>) {
    // PostgreSQL prints the shortest text that reads back as the same double, so the text
    // path's parse gives back `number` itself.
    if number.is_finite() {
        write_finite_f64(number, out);
    } else {
        write_non_finite(number, out);
    }
}

fn write_float4(number: f32, out: &mut Vec<u8>) {
    if number.is_finite() {
        // The text path parses PostgreSQL's float4 text as a double: 0.1::float4 becomes the
        // double nearest 0.1, not the float4's exact value widened.
        write_finite_f64(float4_as_postgres_decimal(number), out);
    } else {
        write_non_finite(f64::from(number), out);
    }
}

/// The double nearest to the decimal PostgreSQL prints for a finite float4 (with
/// `extra_float_digits > 0`). That is Ryu's shortest decimal, except that PostgreSQL never
/// prints the exact midpoint between two floats (`STRICTLY_SHORTEST 0` in its
/// `ryu_common.h`), so it sometimes prints one digit more than the ryu crate or Rust's own
/// formatting: 807715968::float4 is `8.0771597e+08` there, not `807716000`. This is a port
/// of `float_to_shortest_decimal_bufn` in its `src/common/f2s.c` up to the digits.
fn float4_as_postgres_decimal(number: f32) -> f64 {
    const MANTISSA_BITS: u32 = 23;
    const BIAS: i32 = 127;
    let bits = number.to_bits();
    let negative = bits >> 31 != 0;
    let ieee_mantissa = bits & ((1 << MANTISSA_BITS) - 1);
    let ieee_exponent = (bits >> MANTISSA_BITS) & 0xFF;
    let magnitude = if ieee_exponent == 0 && ieee_mantissa == 0 {
        0.0
    } else {
        // Small integers are printed exactly (f2d_small_int).
        let e2 = ieee_exponent as i32 - BIAS - MANTISSA_BITS as i32;
        let small_integer =
            (-(MANTISSA_BITS as i32)..=0).contains(&e2) && ieee_mantissa & ((1u32 << -e2) - 1) == 0;
        if small_integer {
            f64::from(((1 << MANTISSA_BITS) | ieee_mantissa) >> -e2)
        } else {
            let (digits, exponent) = ryu_f2d_without_midpoints(ieee_mantissa, ieee_exponent);
            decimal_to_f64(digits, exponent)
        }
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// `digits × 10^exponent`, correctly rounded to a double.
fn decimal_to_f64(digits: u32, exponent: i32) -> f64 {
    // Exact powers of ten: with an exact integer, one correctly rounded multiplication or
    // division is the correctly rounded result (Clinger's fast path).
    const EXACT_POWERS: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
        1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    ];
    let power = usize::try_from(exponent.unsigned_abs())
        .ok()
        .and_then(|at| EXACT_POWERS.get(at));
    match power {
        Some(power) if exponent >= 0 => f64::from(digits) * power,
        Some(power) => f64::from(digits) / power,
        None => {
            use std::io::Write;
            // At most 10 digits, `e` and a sign and 3 digits.
            let mut text = [0u8; 16];
            let mut cursor = std::io::Cursor::new(&mut text[..]);
            let _ = write!(cursor, "{digits}e{exponent}");
            let len = usize::try_from(cursor.position()).unwrap_or(0);
            std::str::from_utf8(text.get(..len).unwrap_or_default())
                .ok()
                .and_then(|text| text.parse().ok())
                .unwrap_or(0.0)
        }
    }
}

const FLOAT_POW5_INV_BITCOUNT: u32 = 59;
const FLOAT_POW5_BITCOUNT: u32 = 61;

/// `e == 0 ? 1 : ceil(log2(5^e))`, for e up to 3528.
const fn pow5_bits(e: u32) -> u32 {
    ((e * 1_217_359) >> 19) + 1
}

/// `floor(log10(2^e))`.
const fn log10_pow2(e: u32) -> u32 {
    (e * 78_913) >> 18
}

/// `floor(log10(5^e))`.
const fn log10_pow5(e: u32) -> u32 {
    (e * 732_923) >> 20
}

/// `floor(2^(pow5_bits(q) - 1 + 59) / 5^q) + 1`: Ryu's table of inverse powers of five.
const FLOAT_POW5_INV_SPLIT: [u64; 31] = {
    let mut table = [0u64; 31];
    let mut q = 0;
    let mut pow5: u128 = 1;
    while q < table.len() {
        let shift = pow5_bits(q as u32) - 1 + FLOAT_POW5_INV_BITCOUNT;
        // 2^128 does not fit; as 5^q does not divide it, (2^128 - 1) / 5^q has the same floor.
        let quotient = if shift >= 128 {
            u128::MAX / pow5
        } else {
            (1u128 << shift) / pow5
        };
        table[q] = (quotient + 1) as u64;
        pow5 *= 5;
        q += 1;
    }
    table
};

/// 5^i scaled to 61 bits: Ryu's table of powers of five (one entry more than Ryu's 47, so
/// that every index the algorithm can form is in it).
const FLOAT_POW5_SPLIT: [u64; 48] = {
    let mut table = [0u64; 48];
    let mut i = 0;
    let mut pow5: u128 = 1;
    while i < table.len() {
        let bits = 128 - pow5.leading_zeros();
        table[i] = if bits > FLOAT_POW5_BITCOUNT {
            (pow5 >> (bits - FLOAT_POW5_BITCOUNT)) as u64
        } else {
            (pow5 << (FLOAT_POW5_BITCOUNT - bits)) as u64
        };
        pow5 *= 5;
        i += 1;
    }
    table
};

fn mul_shift(m: u32, factor: u64, shift: i32) -> u32 {
    let product = u128::from(m) * u128::from(factor);
    u32::try_from(product >> shift.clamp(0, 127)).unwrap_or(u32::MAX)
}

fn mul_pow5_inv_div_pow2(m: u32, q: u32, shift: i32) -> u32 {
    let factor = FLOAT_POW5_INV_SPLIT.get(q as usize).copied().unwrap_or(0);
    mul_shift(m, factor, shift)
}

fn mul_pow5_div_pow2(m: u32, i: u32, shift: i32) -> u32 {
    let factor = FLOAT_POW5_SPLIT.get(i as usize).copied().unwrap_or(0);
    mul_shift(m, factor, shift)
}

fn multiple_of_power_of_5(mut value: u32, p: u32) -> bool {
    let mut count = 0;
    while value != 0 && value.is_multiple_of(5) {
        value /= 5;
        count += 1;
    }
    count >= p
}

fn multiple_of_power_of_2(value: u32, p: u32) -> bool {
    value & 1u32.checked_shl(p).map_or(u32::MAX, |bit| bit - 1) == 0
}

/// Ryu's `f2d` for a positive, finite, non-zero float4 as PostgreSQL builds it (bounds never
/// accepted): the shortest decimal strictly inside the float's rounding interval, closest to
/// its exact value, as (digits, power of ten). Unsigned arithmetic wraps as in C.
fn ryu_f2d_without_midpoints(ieee_mantissa: u32, ieee_exponent: u32) -> (u32, i32) {
    const MANTISSA_BITS: u32 = 23;
    const BIAS: i32 = 127;
    // Two bits more than the float, for the interval's bounds.
    let (e2, m2) = if ieee_exponent == 0 {
        (1 - BIAS - MANTISSA_BITS as i32 - 2, ieee_mantissa)
    } else {
        (
            ieee_exponent as i32 - BIAS - MANTISSA_BITS as i32 - 2,
            (1 << MANTISSA_BITS) | ieee_mantissa,
        )
    };
    let mv = 4 * m2;
    let mp = 4 * m2 + 2;
    let mm_shift = u32::from(ieee_mantissa != 0 || ieee_exponent <= 1);
    let mm = (4 * m2).wrapping_sub(1).wrapping_sub(mm_shift);

    let (mut vr, mut vp, mut vm, e10);
    let mut vr_is_trailing_zeros = false;
    let mut last_removed_digit = 0;
    if e2 >= 0 {
        let q = log10_pow2(e2.unsigned_abs());
        e10 = q as i32;
        let k = (FLOAT_POW5_INV_BITCOUNT + pow5_bits(q)) as i32 - 1;
        let i = -e2 + q as i32 + k;
        vr = mul_pow5_inv_div_pow2(mv, q, i);
        vp = mul_pow5_inv_div_pow2(mp, q, i);
        vm = mul_pow5_inv_div_pow2(mm, q, i);
        if q != 0 && vp.wrapping_sub(1) / 10 <= vm / 10 {
            // One removed digit is needed even when the loop below removes none.
            let l = (FLOAT_POW5_INV_BITCOUNT + pow5_bits(q - 1)) as i32 - 1;
            last_removed_digit = mul_pow5_inv_div_pow2(mv, q - 1, -e2 + q as i32 - 1 + l) % 10;
        }
        if q <= 9 {
            // At most one of mp, mv and mm is a multiple of 5.
            if mv.is_multiple_of(5) {
                vr_is_trailing_zeros = multiple_of_power_of_5(mv, q);
            } else {
                vp = vp.wrapping_sub(u32::from(multiple_of_power_of_5(mp, q)));
            }
        }
    } else {
        let q = log10_pow5(e2.unsigned_abs());
        e10 = q as i32 + e2;
        let i = -e2 - q as i32;
        let k = pow5_bits(i.unsigned_abs()) as i32 - FLOAT_POW5_BITCOUNT as i32;
        let j = q as i32 - k;
        vr = mul_pow5_div_pow2(mv, i.unsigned_abs(), j);
        vp = mul_pow5_div_pow2(mp, i.unsigned_abs(), j);
        vm = mul_pow5_div_pow2(mm, i.unsigned_abs(), j);
        if q != 0 && vp.wrapping_sub(1) / 10 <= vm / 10 {
            let j = q as i32
                - 1
                - (pow5_bits(i.unsigned_abs() + 1) as i32 - FLOAT_POW5_BITCOUNT as i32);
            last_removed_digit = mul_pow5_div_pow2(mv, i.unsigned_abs() + 1, j) % 10;
        }
        if q <= 1 {
            // mv = 4 * m2 has at least two trailing zero bits; mp = mv + 2 at least one.
            vr_is_trailing_zeros = true;
            vp = vp.wrapping_sub(1);
        } else if q < 31 {
            vr_is_trailing_zeros = multiple_of_power_of_2(mv, q - 1);
        }
    }

    let mut removed = 0;
    while vp / 10 > vm / 10 {
        vr_is_trailing_zeros &= last_removed_digit == 0;
        last_removed_digit = vr % 10;
        vr /= 10;
        vp /= 10;
        vm /= 10;
        removed += 1;
    }
    if vr_is_trailing_zeros && last_removed_digit == 5 && vr.is_multiple_of(2) {
        // The exact value is ...50..0: round half to even.
        last_removed_digit = 4;
    }
    // vr + 1 when vr is outside the interval or rounds up.
    let digits = vr.wrapping_add(u32::from(vr == vm || last_removed_digit >= 5));
    (digits, e10 + removed)
}

fn write_base64(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), SqlError> {
    out.push(b'"');
    write_base64_contents(bytes, out).ok_or_else(|| {
        decode_error(format!(
            "bytea: {} bytes are too many for base64",
            bytes.len()
        ))
    })?;
    out.push(b'"');
    Ok(())
}

fn is_hex(hex: &[u8]) -> bool {
    hex.len().is_multiple_of(2) && hex.iter().all(u8::is_ascii_hexdigit)
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// `hex` (already checked by `is_hex`) as base64 of its bytes, without holding all the bytes.
fn write_hex_as_base64(hex: &[u8], out: &mut Vec<u8>) {
    // A multiple of 3 bytes, so the chunks' base64 concatenates to that of the whole.
    const CHUNK_BYTES: usize = 3 * 256;
    let mut bytes = [0u8; CHUNK_BYTES];
    out.reserve(hex.len() / 2 * 4 / 3 + 6);
    out.push(b'"');
    for hex_chunk in hex.chunks(2 * CHUNK_BYTES) {
        let mut count = 0;
        for (byte, pair) in bytes.iter_mut().zip(hex_chunk.chunks_exact(2)) {
            if let [high, low] = pair {
                *byte = hex_value(*high) << 4 | hex_value(*low);
                count += 1;
            }
        }
        // Cannot fail: a chunk is at most CHUNK_BYTES, far from any size limit.
        let _ = write_base64_contents(bytes.get(..count).unwrap_or_default(), out);
    }
    out.push(b'"');
}

/// Base64 of `bytes` (standard alphabet, padded, as event.rs) without quotes; `None` only
/// when the encoded length would overflow.
fn write_base64_contents(bytes: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let encoded_len = base64::encoded_len(bytes.len(), true)?;
    out.reserve(encoded_len + 1);
    let at = out.len();
    out.resize(at + encoded_len, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, out.get_mut(at..)?)
        .ok()?;
    out.truncate(at + written);
    Some(())
}

/// `ESCAPE[byte]`: 0 for bytes copied as they are, else the letter after the backslash
/// (`u` for `\u00XX`). The same table as serde_json's.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0A] = b'n';
    table[0x0C] = b'f';
    table[0x0D] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// The JSON string contents of `bytes` (valid UTF-8; the runs copied between escapes end
/// at ASCII bytes, so they stay valid).
fn write_escaped(bytes: &[u8], out: &mut Vec<u8>) {
    let mut run_start = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        let escape = ESCAPE[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(bytes.get(run_start..at).unwrap_or_default());
        if escape == b'u' {
            const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX_DIGITS[usize::from(byte >> 4)],
                HEX_DIGITS[usize::from(byte & 0xF)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', escape]);
        }
        run_start = at + 1;
    }
    out.extend_from_slice(bytes.get(run_start..).unwrap_or_default());
}

/// What `iso_timestamp` in event.rs makes of PostgreSQL's text, written as a JSON string:
/// the first space becomes `T`, and for `timestamptz` a UTC offset becomes `Z` and an
/// hours-only offset gains `:00`. Too-short, BC and non-numeric-year texts stay as they are.
fn write_iso_timestamp(text: &str, zoned: bool, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    let as_is =
        bytes.len() < 19 || text.ends_with(" BC") || !bytes.iter().take(4).all(u8::is_ascii_digit);
    if as_is {
        write_json_string(text, out);
        return;
    }
    let space = bytes.iter().position(|byte| *byte == b' ');
    let offset_at = if zoned {
        bytes
            .get(19..)
            .and_then(|tail| tail.iter().rposition(|b| *b == b'+' || *b == b'-'))
            .map(|at| at + 19)
    } else {
        None
    };
    out.reserve(text.len() + 5);
    out.push(b'"');
    match offset_at {
        None => write_with_t(bytes, space, 0, bytes.len(), out),
        Some(at) => {
            write_with_t(bytes, space, 0, at, out);
            // The offset as iso_timestamp sees it: with the `T` if the first space is there.
            let space_in_offset = space.is_some_and(|space| space >= at);
            let offset = bytes.get(at..).unwrap_or_default();
            if !space_in_offset && matches!(offset, b"+00" | b"+00:00" | b"-00") {
                out.push(b'Z');
            } else {
                write_with_t(bytes, space, at, bytes.len(), out);
                if offset.len() == 3 {
                    out.extend_from_slice(b":00");
                }
            }
        }
    }
    out.push(b'"');
}

/// The escaped `bytes[from..to]`, with the byte at `space` (if inside) written as `T`.
fn write_with_t(bytes: &[u8], space: Option<usize>, from: usize, to: usize, out: &mut Vec<u8>) {
    match space {
        Some(space) if (from..to).contains(&space) => {
            write_escaped(bytes.get(from..space).unwrap_or_default(), out);
            out.push(b'T');
            write_escaped(bytes.get(space + 1..to).unwrap_or_default(), out);
        }
        _ => write_escaped(bytes.get(from..to).unwrap_or_default(), out),
    }
}

/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_UNIX_DAYS: i64 = 10_957;
/// PostgreSQL's range of dates, as days from 2000-01-01: Julian day 0 (4714-11-24 BC) up to
/// but not including 5874898-01-01.
const DATE_MIN: i32 = -2_451_545;
const DATE_END: i32 = 2_147_483_494 - 2_451_545;
/// The same range for timestamps, in microseconds, up to but not including 294277-01-01.
const TIMESTAMP_MIN: i64 = -211_813_488_000_000_000;
const TIMESTAMP_END: i64 = 9_223_371_331_200_000_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// (year, month, day) of the proleptic Gregorian calendar (as PostgreSQL's `j2date`), year
/// 0 being 1 BC; from Howard Hinnant's `civil_from_days`.
fn civil_from_days(days_since_unix_epoch: i64) -> (i64, u32, u32) {
    let days = days_since_unix_epoch + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both fit: day is 1..=31 and month 1..=12.
    (year, month as u32, day as u32)
}

fn push_two_digits(value: u32, out: &mut Vec<u8>) {
    let value = value % 100;
    out.extend_from_slice(&[b'0' + (value / 10) as u8, b'0' + (value % 10) as u8]);
}

fn push_four_digits(value: u32, out: &mut Vec<u8>) {
    push_two_digits(value / 100, out);
    push_two_digits(value, out);
}

/// `YYYY-MM-DD` as PostgreSQL prints it: at least four year digits, BC years counted from 1
/// (the caller appends ` BC` where PostgreSQL puts it).
fn push_date(year: i64, month: u32, day: u32, out: &mut Vec<u8>) {
    let shown_year = if year > 0 { year } else { 1 - year };
    match u32::try_from(shown_year) {
        Ok(year) if year < 10_000 => push_four_digits(year, out),
        _ => write_integer(shown_year, out),
    }
    out.push(b'-');
    push_two_digits(month, out);
    out.push(b'-');
    push_two_digits(day, out);
}

fn write_date(days: i32, out: &mut Vec<u8>) -> Result<(), SqlError> {
    match days {
        i32::MAX => out.extend_from_slice(b"\"infinity\""),
        i32::MIN => out.extend_from_slice(b"\"-infinity\""),
        DATE_MIN..DATE_END => {
            let (year, month, day) = civil_from_days(i64::from(days) + PG_EPOCH_UNIX_DAYS);
            out.reserve(20);
            out.push(b'"');
            push_date(year, month, day, out);
            if year <= 0 {
                out.extend_from_slice(b" BC");
            }
            out.push(b'"');
        }
        _ => {
            return Err(decode_error(format!(
                "date: {days} days from 2000-01-01 is outside PostgreSQL's range"
            )))
        }
    }
    Ok(())
}

fn write_timestamp(micros: i64, zoned: bool, out: &mut Vec<u8>) -> Result<(), SqlError> {
    match micros {
        i64::MAX => out.extend_from_slice(b"\"infinity\""),
        i64::MIN => out.extend_from_slice(b"\"-infinity\""),
        TIMESTAMP_MIN..TIMESTAMP_END => {
            let days = micros.div_euclid(MICROS_PER_DAY);
            // 0..MICROS_PER_DAY, so every part below fits in u32.
            let time_of_day = micros.rem_euclid(MICROS_PER_DAY);
            let seconds_of_day = (time_of_day / 1_000_000) as u32;
            let fraction = (time_of_day % 1_000_000) as u32;
            let (year, month, day) = civil_from_days(days + PG_EPOCH_UNIX_DAYS);
            out.reserve(40);
            out.push(b'"');
            push_date(year, month, day, out);
            // iso_timestamp leaves BC texts as PostgreSQL printed them.
            let bc = year <= 0;
            out.push(if bc { b' ' } else { b'T' });
            push_two_digits(seconds_of_day / 3600, out);
            out.push(b':');
            push_two_digits(seconds_of_day / 60 % 60, out);
            out.push(b':');
            push_two_digits(seconds_of_day % 60, out);
            if fraction != 0 {
                // Six digits without the trailing zeros, as PostgreSQL prints them.
                let mut digits = [0u8; 7];
                digits[0] = b'.';
                let mut rest = fraction;
                for digit in digits.iter_mut().skip(1).rev() {
                    *digit = b'0' + (rest % 10) as u8;
                    rest /= 10;
                }
                let len = digits
                    .iter()
                    .rposition(|d| *d != b'0')
                    .map_or(0, |at| at + 1);
                out.extend_from_slice(digits.get(..len).unwrap_or_default());
            }
            match (zoned, bc) {
                (true, false) => out.push(b'Z'),
                (true, true) => out.extend_from_slice(b"+00 BC"),
                (false, true) => out.extend_from_slice(b" BC"),
                (false, false) => {}
            }
            out.push(b'"');
        }
        _ => {
            return Err(decode_error(format!(
                "{}: {micros} µs from 2000-01-01 is outside PostgreSQL's range",
                if zoned { "timestamptz" } else { "timestamp" }
            )))
        }
    }
    Ok(())
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;
const NUMERIC_DSCALE_MAX: u16 = 0x3FFF;
const NUMERIC_BASE: u16 = 10_000;

/// numeric's binary form: digit count, weight (of the first digit, in base-10000 places),
/// sign, display scale, then the base-10000 digits, all big-endian 16-bit.
fn write_numeric(raw: &[u8], out: &mut Vec<u8>) -> Result<(), SqlError> {
    let Some((header, digit_bytes)) = raw.split_first_chunk::<8>() else {
        return Err(decode_error(format!(
            "numeric: {} bytes, expected at least 8",
            raw.len()
        )));
    };
    let [n0, n1, w0, w1, s0, s1, d0, d1] = *header;
    let ndigits = usize::from(u16::from_be_bytes([n0, n1]));
    let weight = i32::from(i16::from_be_bytes([w0, w1]));
    let sign = u16::from_be_bytes([s0, s1]);
    let dscale = u16::from_be_bytes([d0, d1]);
    if digit_bytes.len() != 2 * ndigits {
        return Err(decode_error(format!(
            "numeric: {ndigits} digits need {} bytes after the header, got {}",
            2 * ndigits,
            digit_bytes.len()
        )));
    }
    match sign {
        NUMERIC_POS | NUMERIC_NEG => {}
        NUMERIC_NAN => {
            out.extend_from_slice(b"\"NaN\"");
            return Ok(());
        }
        NUMERIC_PINF => {
            out.extend_from_slice(b"\"Infinity\"");
            return Ok(());
        }
        NUMERIC_NINF => {
            out.extend_from_slice(b"\"-Infinity\"");
            return Ok(());
        }
        other => {
            return Err(decode_error(format!(
                "numeric: sign 0x{other:04x}, expected 0x0000, 0x4000, 0xC000, 0xD000 or 0xF000"
            )))
        }
    }
    if dscale > NUMERIC_DSCALE_MAX {
        return Err(decode_error(format!(
            "numeric: display scale {dscale}, at most {NUMERIC_DSCALE_MAX}"
        )));
    }
    if let Some(bad) = digit_bytes
        .chunks_exact(2)
        .map(big_endian_u16)
        .find(|digit| *digit >= NUMERIC_BASE)
    {
        return Err(decode_error(format!(
            "numeric: base-10000 digit {bad}, expected below 10000"
        )));
    }
    // numeric_recv drops leading zero digits (printing them would give "00012"), and gives
    // zero the weight 0.
    let mut digits = digit_bytes;
    let mut weight = weight;
    while let [0, 0, rest @ ..] = digits {
        digits = rest;
        weight -= 1;
    }
    if digits.is_empty() {
        weight = 0;
    }
    let digit_at = |place: i32| -> u32 {
        usize::try_from(place)
            .ok()
            .and_then(|place| digits.get(2 * place..2 * place + 2))
            .map_or(0, |pair| u32::from(big_endian_u16(pair)))
    };

    out.reserve(usize::try_from(weight.max(0)).unwrap_or(0) * 4 + usize::from(dscale) + 8);
    out.push(b'"');
    let sign_at = out.len();
    if sign == NUMERIC_NEG {
        out.push(b'-');
    }
    // As get_str_from_var in numeric.c: the integer part without leading zeros, then exactly
    // dscale fractional digits.
    let mut place = 0;
    if weight < 0 {
        out.push(b'0');
        place = weight + 1;
    } else {
        write_integer(digit_at(0).into(), out);
        place += 1;
        while place <= weight {
            push_four_digits(digit_at(place), out);
            place += 1;
        }
    }
    if dscale > 0 {
        out.push(b'.');
        let fraction_end = out.len() + usize::from(dscale);
        let mut written = 0;
        while written < dscale {
            push_four_digits(digit_at(place), out);
            place += 1;
            written += 4;
        }
        out.truncate(fraction_end);
    }
    // numeric_recv makes a zero positive, also one whose non-zero digits dscale hides.
    if sign == NUMERIC_NEG
        && !out
            .get(sign_at..)
            .unwrap_or_default()
            .iter()
            .any(|byte| matches!(byte, b'1'..=b'9'))
    {
        out.remove(sign_at);
    }
    out.push(b'"');
    Ok(())
}

/// A 2-byte slice as a big-endian u16 (0 for any other length).
fn big_endian_u16(pair: &[u8]) -> u16 {
    match pair {
        [high, low] => u16::from_be_bytes([*high, *low]),
        _ => 0,
    }
}

fn write_uuid(bytes: [u8; 16], out: &mut Vec<u8>) {
    const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 38];
    let mut at = 0;
    let mut put = |byte: u8| {
        if let Some(slot) = text.get_mut(at) {
            *slot = byte;
        }
        at += 1;
    };
    put(b'"');
    for (index, byte) in bytes.iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            put(b'-');
        }
        put(HEX_DIGITS[usize::from(byte >> 4)]);
        put(HEX_DIGITS[usize::from(byte & 0xF)]);
    }
    put(b'"');
    out.extend_from_slice(&text);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::event::{pg_epoch_micros_to_rfc3339, pg_text_to_json};

    fn binary(type_oid: u32, raw: &[u8]) -> String {
        let mut out = Vec::new();
        write_binary_json(type_oid, raw, &mut out)
            .unwrap_or_else(|err| panic!("oid {type_oid}, {raw:?}: {err}"));
        String::from_utf8(out).unwrap()
    }

    fn binary_error(type_oid: u32, raw: &[u8]) -> String {
        let mut out = b"kept".to_vec();
        let err = write_binary_json(type_oid, raw, &mut out).expect_err("malformed input");
        assert_eq!(out, b"kept", "output untouched on error");
        err.to_string()
    }

    /// What the stream gives for PostgreSQL's text of the value.
    fn via_text(type_oid: u32, text: &str) -> String {
        String::from_utf8(serde_json::to_vec(&pg_text_to_json(type_oid, text)).unwrap()).unwrap()
    }

    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(digits.len() as u16).to_be_bytes());
        raw.extend_from_slice(&weight.to_be_bytes());
        raw.extend_from_slice(&sign.to_be_bytes());
        raw.extend_from_slice(&dscale.to_be_bytes());
        for digit in digits {
            raw.extend_from_slice(&digit.to_be_bytes());
        }
        raw
    }

    #[test]
    fn text_json_is_what_pg_text_to_json_serializes_to() {
        let cases: &[(u32, &str)] = &[
            (INT2, "-32768"),
            (INT4, "42"),
            (INT4, "+7"),
            (INT8, "-9223372036854775808"),
            (INT8, "9223372036854775808"),
            (OID, "4294967295"),
            (XID, "751"),
            (INT4, "not a number"),
            (FLOAT8, "0.1"),
            (FLOAT8, "-0"),
            (FLOAT8, "1e+300"),
            (FLOAT8, "1.2345678901234568e+17"),
            (FLOAT8, "5e-324"),
            (FLOAT8, "NaN"),
            (FLOAT8, "Infinity"),
            (FLOAT8, "-Infinity"),
            (FLOAT4, "1.1754944e-38"),
            (FLOAT4, "1e+30"),
            (FLOAT4, "junk"),
            (BOOL, "t"),
            (BOOL, "f"),
            (BOOL, "true"),
            (BOOL, "false"),
            (BOOL, "yes"),
            (BYTEA, "\\x"),
            (BYTEA, "\\x00ff10"),
            (BYTEA, "\\xDEADbeef"),
            (BYTEA, "\\x0"),
            (BYTEA, "\\xzz"),
            (BYTEA, "no prefix"),
            (TIMESTAMP, "2024-03-05 14:30:00.25"),
            (TIMESTAMP, "0044-03-15 12:00:00 BC"),
            (TIMESTAMP, "10000-01-01 00:00:00"),
            (TIMESTAMP, "infinity"),
            (TIMESTAMP, "-infinity"),
            (TIMESTAMP, "short"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00+00"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00.5+05:30"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00-08"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00-00"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00+00:00"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00.123456+00"),
            (TIMESTAMPTZ, "10000-01-01 00:00:00+00"),
            (TIMESTAMPTZ, "294276-12-31 23:59:59.999999+00"),
            (TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"),
            (TIMESTAMPTZ, "2024-03-05T14:30:00+0 x"),
            (TIMESTAMPTZ, "2024-03-05X14:30:00+0 x"),
            (TIMESTAMPTZ, "2024-03-05X14:30:00+ x"),
            (TIMESTAMPTZ, "2024-03-05 14:30:00 \"+00"),
            (TIMESTAMPTZ, "infinity"),
            (TIMESTAMPTZ, "abcd-03-05 14:30:00+00"),
            (NUMERIC, "12345678901234567890.000001"),
            (DATE, "0044-03-15 BC"),
            (
                TEXT,
                "Zoë \"quoted\" back\\slash\ttab\u{1}\u{1f}\u{7f}\u{2028} 🦷",
            ),
            (1186, "P1Y2M3DT4H5M6S"),
            (0, ""),
        ];
        for (type_oid, text) in cases {
            let mut out = b"[".to_vec();
            write_text_json(*type_oid, text, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("[{}", via_text(*type_oid, text)),
                "oid {type_oid}, text {text:?}"
            );
        }
    }

    #[test]
    fn long_bytea_text_is_encoded_across_chunks() {
        for len in [0, 1, 2, 3, 767, 768, 769, 1536, 5000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let text = format!("\\x{}", hex::encode(&bytes));
            let mut out = Vec::new();
            write_text_json(BYTEA, &text, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                via_text(BYTEA, &text),
                "{len} bytes"
            );
            assert_eq!(binary(BYTEA, &bytes), via_text(BYTEA, &text), "{len} bytes");
        }
    }

    #[test]
    fn json_strings_escape_as_serde_json_does() {
        let mut every_ascii: String = (0u8..0x80).map(char::from).collect();
        every_ascii.push_str("é山🦷\u{2028}\u{2029}\u{feff}");
        for text in [
            every_ascii.as_str(),
            "",
            "plain",
            "\"",
            "\\",
            "\n\n",
            "a\u{0}b",
        ] {
            let mut out = Vec::new();
            write_json_string(text, &mut out);
            assert_eq!(out, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn integers_and_booleans() {
        assert_eq!(binary(BOOL, &[1]), "true");
        assert_eq!(binary(BOOL, &[0]), "false");
        assert_eq!(binary(INT2, &i16::MIN.to_be_bytes()), "-32768");
        assert_eq!(binary(INT4, &42i32.to_be_bytes()), "42");
        assert_eq!(
            binary(INT8, &i64::MIN.to_be_bytes()),
            "-9223372036854775808"
        );
        assert_eq!(binary(INT8, &i64::MAX.to_be_bytes()), "9223372036854775807");
        assert_eq!(binary(OID, &u32::MAX.to_be_bytes()), "4294967295");
    }

    #[test]
    fn floats_match_the_text_path() {
        let doubles = [
            0.0,
            -0.0,
            0.1,
            1.5,
            1e300,
            -1e-300,
            5e-324,
            f64::MAX,
            f64::MIN_POSITIVE,
            123_456_789_012_345_680.0,
            1e21,
            1e-7,
        ];
        for double in doubles {
            // Rust prints the shortest round-trip digits, as PostgreSQL does.
            assert_eq!(
                binary(FLOAT8, &double.to_be_bytes()),
                via_text(FLOAT8, &format!("{double:e}")),
                "{double:e}"
            );
        }
        let singles = [
            0.0f32,
            -0.0,
            0.1,
            1.5,
            1e30,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-45,
            16_777_217.0,
            123_456.7,
        ];
        for single in singles {
            assert_eq!(
                binary(FLOAT4, &single.to_be_bytes()),
                via_text(FLOAT4, &format!("{single:e}")),
                "{single:e}"
            );
        }
        assert_eq!(binary(FLOAT4, &0.1f32.to_be_bytes()), "0.1");
        // Exactly between two float4s: PostgreSQL prints a digit more than the shortest.
        assert_eq!(
            binary(FLOAT4, &807_715_968f32.to_be_bytes()),
            via_text(FLOAT4, "8.0771597e+08")
        );
        assert_eq!(binary(FLOAT4, &807_715_968f32.to_be_bytes()), "807715970.0");
        assert_eq!(binary(FLOAT8, &(-0.0f64).to_be_bytes()), "-0.0");
        assert_eq!(binary(FLOAT8, &f64::NAN.to_be_bytes()), "\"NaN\"");
        assert_eq!(binary(FLOAT8, &f64::INFINITY.to_be_bytes()), "\"Infinity\"");
        assert_eq!(
            binary(FLOAT4, &f32::NEG_INFINITY.to_be_bytes()),
            "\"-Infinity\""
        );
        assert_eq!(binary(FLOAT4, &f32::NAN.to_be_bytes()), "\"NaN\"");
    }

    #[test]
    fn ryu_tables_match_postgres_f2s() {
        // Entries of the tables printed in PostgreSQL's src/common/f2s.c.
        assert_eq!(FLOAT_POW5_INV_SPLIT[0], 576_460_752_303_423_489);
        assert_eq!(FLOAT_POW5_INV_SPLIT[1], 461_168_601_842_738_791);
        assert_eq!(FLOAT_POW5_INV_SPLIT[21], 340_282_366_920_938_464);
        assert_eq!(FLOAT_POW5_INV_SPLIT[30], 365_375_409_332_725_730);
        assert_eq!(FLOAT_POW5_SPLIT[0], 1_152_921_504_606_846_976);
        assert_eq!(FLOAT_POW5_SPLIT[1], 1_441_151_880_758_558_720);
        assert_eq!(FLOAT_POW5_SPLIT[27], 1_862_645_149_230_957_031);
        assert_eq!(FLOAT_POW5_SPLIT[46], 2_019_483_917_365_790_221);
    }

    #[test]
    fn float4_digits_are_ryus_except_at_midpoints() {
        // Away from midpoints PostgreSQL's digits are the shortest ones, which Rust prints
        // too; compare a spread of bit patterns and count the midpoint cases (0.4% of them).
        let mut differing = 0;
        let mut checked = 0;
        let mut bits = 1u32;
        while bits < 0x7f80_0000 {
            let single = f32::from_bits(bits);
            let shortest: f64 = format!("{single:e}").parse().unwrap();
            let postgres = float4_as_postgres_decimal(single);
            if postgres != shortest {
                differing += 1;
                // Then PostgreSQL's decimal is a different one that still reads back as the
                // same float4.
                assert_eq!(postgres as f32, single, "{single:e}");
            }
            bits += 9_973;
            checked += 1;
        }
        assert!(
            differing * 100 < checked,
            "{differing} of {checked} float4s print differently from Rust"
        );
    }

    #[test]
    fn text_types_bytea_uuid_and_json() {
        assert_eq!(
            binary(TEXT, "Zoë \"q\" \\ \n 🦷".as_bytes()),
            r#""Zoë \"q\" \\ \n 🦷""#
        );
        assert_eq!(binary(BPCHAR, b"ab   "), r#""ab   ""#);
        assert_eq!(binary(VARCHAR, b""), r#""""#);
        assert_eq!(binary(NAME, b"pg_class"), r#""pg_class""#);
        assert_eq!(binary(JSON, br#"{"a": 1}"#), r#""{\"a\": 1}""#);
        assert_eq!(binary(JSONB, b"\x01{\"a\": 1}"), r#""{\"a\": 1}""#);
        assert_eq!(binary(BYTEA, &[]), r#""""#);
        assert_eq!(binary(BYTEA, &[0x00, 0xff, 0x10]), r#""AP8Q""#);
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(
            binary(UUID, &uuid),
            r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#
        );
    }

    #[test]
    fn dates_as_postgres_prints_them() {
        let days = |d: i32| binary(DATE, &d.to_be_bytes());
        assert_eq!(days(0), r#""2000-01-01""#);
        assert_eq!(days(-1), r#""1999-12-31""#);
        assert_eq!(days(8825), r#""2024-02-29""#);
        assert_eq!(days(i32::MAX), r#""infinity""#);
        assert_eq!(days(i32::MIN), r#""-infinity""#);
        assert_eq!(days(DATE_MIN), r#""4714-11-24 BC""#);
        assert_eq!(days(DATE_END - 1), r#""5874897-12-31""#);
        // 0001-01-01 and the day before it, 1 BC (year 0).
        assert_eq!(days(-730_119), r#""0001-01-01""#);
        assert_eq!(days(-730_120), r#""0001-12-31 BC""#);
        assert_eq!(days(2_921_940), r#""10000-01-01""#);
        assert_eq!(days(2_921_939), r#""9999-12-31""#);
    }

    #[test]
    fn dates_agree_with_the_time_crate() {
        // Julian day 2451545 is 2000-01-01; time covers years 1..=9999 here.
        let format = time::macros::format_description!("[year]-[month]-[day]");
        let mut day = -730_119;
        while day < 2_921_940 {
            let date = time::Date::from_julian_day(2_451_545 + day).unwrap();
            let expected = format!("\"{}\"", date.format(&format).unwrap());
            assert_eq!(binary(DATE, &day.to_be_bytes()), expected, "day {day}");
            day += 337;
        }
    }

    #[test]
    fn timestamps_as_iso_timestamp_makes_them() {
        let at = |oid: u32, micros: i64| binary(oid, &micros.to_be_bytes());
        assert_eq!(at(TIMESTAMP, 0), r#""2000-01-01T00:00:00""#);
        assert_eq!(at(TIMESTAMPTZ, 0), r#""2000-01-01T00:00:00Z""#);
        assert_eq!(at(TIMESTAMP, -1), r#""1999-12-31T23:59:59.999999""#);
        assert_eq!(at(TIMESTAMPTZ, 1_500_000), r#""2000-01-01T00:00:01.5Z""#);
        assert_eq!(at(TIMESTAMP, 250_000), r#""2000-01-01T00:00:00.25""#);
        assert_eq!(at(TIMESTAMP, 1), r#""2000-01-01T00:00:00.000001""#);
        assert_eq!(at(TIMESTAMP, i64::MAX), r#""infinity""#);
        assert_eq!(at(TIMESTAMPTZ, i64::MIN), r#""-infinity""#);
        assert_eq!(at(TIMESTAMP, TIMESTAMP_MIN), r#""4714-11-24 00:00:00 BC""#);
        assert_eq!(
            at(TIMESTAMPTZ, TIMESTAMP_MIN),
            r#""4714-11-24 00:00:00+00 BC""#
        );
        assert_eq!(
            at(TIMESTAMPTZ, TIMESTAMP_END - 1),
            r#""294276-12-31T23:59:59.999999Z""#
        );
        // 1 BC, half a second before 0001-01-01.
        let year_one = -730_119 * MICROS_PER_DAY;
        assert_eq!(
            at(TIMESTAMP, year_one - 500_000),
            r#""0001-12-31 23:59:59.5 BC""#
        );
        assert_eq!(at(TIMESTAMPTZ, year_one), r#""0001-01-01T00:00:00Z""#);
        for (oid, micros) in [
            (TIMESTAMP, year_one - 500_000),
            (TIMESTAMPTZ, TIMESTAMP_MIN),
            (TIMESTAMPTZ, 1_500_000),
        ] {
            // BC forms are PostgreSQL's text, which the text path keeps as it is.
            let json = at(oid, micros);
            let text: String = serde_json::from_str(&json).unwrap();
            let pg_text = text.replacen('T', " ", 1).replace('Z', "+00");
            assert_eq!(json, via_text(oid, &pg_text));
        }
    }

    #[test]
    fn timestamps_agree_with_the_commit_time_formatting() {
        // RFC 3339 covers years 1..=9999; step through them at an odd stride.
        let mut micros: i64 = -63_082_281_600_000_000;
        while micros < 252_455_615_999_999_999 {
            let expected = format!("\"{}\"", pg_epoch_micros_to_rfc3339(micros).unwrap());
            assert_eq!(
                binary(TIMESTAMPTZ, &micros.to_be_bytes()),
                expected,
                "{micros} µs"
            );
            micros += 98_765_432_123_457;
        }
    }

    #[test]
    fn numerics_print_exactly_dscale_fraction_digits() {
        let cases: &[(i16, u16, u16, &[u16], &str)] = &[
            (0, NUMERIC_POS, 0, &[], "0"),
            (0, NUMERIC_POS, 2, &[], "0.00"),
            (0, NUMERIC_POS, 2, &[12, 5000], "12.50"),
            (-1, NUMERIC_NEG, 2, &[100], "-0.01"),
            (-1, NUMERIC_POS, 4, &[1], "0.0001"),
            (
                4,
                NUMERIC_POS,
                6,
                &[1234, 5678, 9012, 3456, 7890, 0, 100],
                "12345678901234567890.000001",
            ),
            (1, NUMERIC_POS, 0, &[1], "10000"),
            (2, NUMERIC_POS, 0, &[1], "100000000"),
            (0, NUMERIC_POS, 4, &[9999, 9999], "9999.9999"),
            (-5, NUMERIC_NEG, 20, &[1], "-0.00000000000000000001"),
            (0, NUMERIC_POS, 0, &[0, 12], "0"),
            (1, NUMERIC_POS, 0, &[0, 12], "12"),
            (0, NUMERIC_NEG, 0, &[], "0"),
            (-1, NUMERIC_NEG, 2, &[1], "0.00"),
            (0, NUMERIC_NAN, 0, &[], "NaN"),
            (0, NUMERIC_PINF, 0, &[], "Infinity"),
            (0, NUMERIC_NINF, 0, &[], "-Infinity"),
        ];
        for (weight, sign, dscale, digits, text) in cases {
            assert_eq!(
                binary(NUMERIC, &numeric(*weight, *sign, *dscale, digits)),
                format!("\"{text}\""),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_values_are_errors() {
        assert_eq!(binary_error(BOOL, &[]), "decode: bool: 0 bytes, expected 1");
        assert_eq!(
            binary_error(INT4, &[0; 3]),
            "decode: int4: 3 bytes, expected 4"
        );
        assert_eq!(
            binary_error(INT8, &[0; 9]),
            "decode: int8: 9 bytes, expected 8"
        );
        assert!(binary_error(INT2, &[0]).contains("int2: 1 bytes"));
        assert!(binary_error(OID, &[0]).contains("oid"));
        assert!(binary_error(FLOAT4, &[0; 8]).contains("float4: 8 bytes"));
        assert!(binary_error(FLOAT8, &[0; 4]).contains("float8: 4 bytes"));
        assert!(binary_error(UUID, &[0; 15]).contains("uuid: 15 bytes, expected 16"));
        assert!(binary_error(DATE, &[0; 8]).contains("date"));
        assert!(binary_error(TIMESTAMP, &[]).contains("timestamp: 0 bytes"));
        assert!(binary_error(TIMESTAMPTZ, &[0; 4]).contains("timestamptz"));
        assert!(binary_error(TEXT, b"ok \xff").contains("text: not valid UTF-8 at byte 3"));
        assert!(binary_error(BPCHAR, b"\xc3").contains("bpchar"));
        assert!(binary_error(JSONB, b"").contains("jsonb: 0 bytes"));
        assert!(binary_error(JSONB, b"\x02{}").contains("version 2"));
        assert!(binary_error(1186, &[0; 16]).contains("type oid 1186"));
        assert!(binary_error(DATE, &(DATE_END).to_be_bytes()).contains("outside"));
        assert!(binary_error(DATE, &(DATE_MIN - 1).to_be_bytes()).contains("outside"));
        assert!(binary_error(TIMESTAMP, &(TIMESTAMP_END).to_be_bytes()).contains("outside"));
        assert!(binary_error(TIMESTAMPTZ, &(i64::MIN + 1).to_be_bytes()).contains("outside"));
        assert_eq!(
            binary_error(NUMERIC, &[0; 7]),
            "decode: numeric: 7 bytes, expected at least 8"
        );
        let mut short = numeric(0, NUMERIC_POS, 0, &[1, 2]);
        short.pop();
        assert!(
            binary_error(NUMERIC, &short).contains("2 digits need 4 bytes after the header, got 3")
        );
        assert!(binary_error(NUMERIC, &numeric(0, 0x1234, 0, &[1])).contains("sign 0x1234"));
        assert!(
            binary_error(NUMERIC, &numeric(0, NUMERIC_POS, 0x4000, &[1])).contains("display scale")
        );
        assert!(
            binary_error(NUMERIC, &numeric(0, NUMERIC_POS, 0, &[10_000])).contains("digit 10000")
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let oids = [
            BOOL,
            BYTEA,
            NAME,
            INT8,
            INT2,
            INT4,
            TEXT,
            OID,
            JSON,
            FLOAT4,
            FLOAT8,
            BPCHAR,
            VARCHAR,
            DATE,
            TIMESTAMP,
            TIMESTAMPTZ,
            NUMERIC,
            UUID,
            JSONB,
            0,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let raw: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for oid in oids {
                out.clear();
                let _ = write_binary_json(oid, &raw, &mut out);
                if let Ok(text) = std::str::from_utf8(&raw) {
                    out.clear();
                    write_text_json(oid, text, &mut out);
                    assert_eq!(
                        String::from_utf8(out.clone()).unwrap(),
                        via_text(oid, text),
                        "oid {oid} text {text:?}"
                    );
                }
            }
            // Numeric headers with plausible sizes, to get past the length check.
            let ndigits = (next() % 6) as u16;
            let mut raw = numeric(
                next() as i16,
                [0, 0x4000][(next() % 2) as usize],
                (next() % 40) as u16,
                &[],
            );
            raw.splice(0..2, ndigits.to_be_bytes());
            for _ in 0..ndigits {
                raw.extend_from_slice(&((next() % 10_001) as u16).to_be_bytes());
            }
            out.clear();
            let _ = write_binary_json(NUMERIC, &raw, &mut out);
        }
    }

    #[test]
    fn raw_value_accepts_every_type() {
        assert!(<RawValue as FromSql>::accepts(&Type::INTERVAL));
        let value = <RawValue as FromSql>::from_sql(&Type::TEXT, b"abc").unwrap();
        assert_eq!(value, RawValue(b"abc"));
    }

    #[test]
    fn decodes_binary_lists_the_decoded_types() {
        for oid in [
            16, 17, 19, 20, 21, 23, 25, 26, 114, 700, 701, 1042, 1043, 1082, 1114, 1184, 1700,
            2950, 3802,
        ] {
            assert!(decodes_binary(oid), "{oid}");
        }
        for oid in [0, 28, 1083, 1186, 1266, 790, 869, 1007] {
            assert!(!decodes_binary(oid), "{oid}");
        }
    }
}
