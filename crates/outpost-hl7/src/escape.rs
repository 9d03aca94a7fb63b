//! Escape sequences inside field values (HL7 v2 section 2.7).

use crate::delimiters::Delimiters;

/// Replaces the escape sequences for delimiters (`\F\ \S\ \T\ \R\ \E\ \P\`) and hex data
/// (`\Xhh..\`) with the bytes they stand for.
///
/// Formatting and highlighting sequences (`\.br\`, `\H\`, `\N\`, `\Zxxx\` and the like), a hex
/// sequence that is not whole bytes of hex, and a lone or unterminated escape character are kept
/// verbatim: they carry meaning for the receiving system that plain bytes cannot express.
/// Without an escape character the value is returned unchanged.
pub fn unescape(value: &[u8], d: &Delimiters) -> Vec<u8> {
    let Some(esc) = d.escape else {
        return value.to_vec();
    };
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.iter().position(|&b| b == esc) {
        out.extend_from_slice(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(len) = after.iter().position(|&b| b == esc) else {
            out.extend_from_slice(&rest[start..]);
            return out;
        };
        let sequence = &rest[start..start + len + 2];
        match decode_sequence(&after[..len], d) {
            Some(bytes) => out.extend_from_slice(&bytes),
            None => out.extend_from_slice(sequence),
        }
        rest = &after[len + 1..];
    }
    out.extend_from_slice(rest);
    out
}

/// Escapes every delimiter byte of `d`, plus CR as `\X0D\` and LF as `\X0A\`, so the result
/// can stand in any field, component or subcomponent. `unescape(&escape(x, d), d) == x`.
///
/// Without an escape character nothing can be escaped and the value is returned unchanged.
pub fn escape(value: &[u8], d: &Delimiters) -> Vec<u8> {
    let Some(esc) = d.escape else {
        return value.to_vec();
    };
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        let code: &[u8] = match b {
            b'\r' => b"X0D",
            b'\n' => b"X0A",
            _ if b == d.field => b"F",
            _ if b == d.component => b"S",
            _ if b == d.repetition => b"R",
            _ if b == esc => b"E",
            _ if Some(b) == d.subcomponent => b"T",
            _ if Some(b) == d.truncation => b"P",
            _ => {
                out.push(b);
                continue;
            }
        };
        out.push(esc);
        out.extend_from_slice(code);
        out.push(esc);
    }
    out
}

/// The bytes an escape sequence's body stands for, or `None` to keep the sequence verbatim.
fn decode_sequence(body: &[u8], d: &Delimiters) -> Option<Vec<u8>> {
    let single = match body {
        b"F" => Some(d.field),
        b"S" => Some(d.component),
        b"R" => Some(d.repetition),
        b"E" => d.escape,
        b"T" => d.subcomponent,
        b"P" => d.truncation,
        [b'X', hex @ ..] => return decode_hex(hex),
        _ => None,
    };
    single.map(|b| vec![b])
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    let pairs = hex.chunks_exact(2);
    if hex.is_empty() || !pairs.remainder().is_empty() {
        return None;
    }
    pairs
        .map(|pair| Some((hex_digit(pair[0])? << 4) | hex_digit(pair[1])?))
        .collect()
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|v| u8::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Delimiters = Delimiters::DEFAULT;

    fn un(value: &str) -> String {
        String::from_utf8(unescape(value.as_bytes(), &D)).unwrap()
    }

    #[test]
    fn delimiter_sequences_become_delimiters() {
        assert_eq!(un(r"a\F\b\S\c\T\d\R\e\E\f"), r"a|b^c&d~e\f");
    }

    #[test]
    fn hex_sequences_become_bytes() {
        assert_eq!(unescape(br"x\X0D0a\y\XE9\", &D), b"x\r\ny\xE9");
    }

    #[test]
    fn formatting_sequences_are_kept_verbatim() {
        for kept in [
            r"line\.br\next",
            r"\H\bold\N\",
            r"\.sp2\",
            r"\Zvendor\",
            r"\X0\",
            r"\XZZ\",
        ] {
            assert_eq!(un(kept), kept);
        }
    }

    #[test]
    fn lone_or_unterminated_escape_is_kept_verbatim() {
        assert_eq!(un(r"C:\path"), r"C:\path");
        assert_eq!(un(r"a\S\b\"), r"a^b\");
        assert_eq!(un(r"\\"), r"\\");
    }

    #[test]
    fn truncation_sequence_needs_a_truncation_character() {
        let d = Delimiters {
            truncation: Some(b'#'),
            ..D
        };
        assert_eq!(unescape(br"a\P\", &d), b"a#");
        assert_eq!(un(r"a\P\"), r"a\P\");
    }

    #[test]
    fn escape_covers_delimiters_and_line_breaks() {
        assert_eq!(
            escape(b"a|b^c&d~e\\f\r\n", &D),
            br"a\F\b\S\c\T\d\R\e\E\f\X0D\\X0A\"
        );
    }

    #[test]
    fn without_escape_character_values_pass_through() {
        let d = Delimiters { escape: None, ..D };
        assert_eq!(escape(b"a^b", &d), b"a^b");
        assert_eq!(unescape(br"a\S\b", &d), br"a\S\b");
    }
}
