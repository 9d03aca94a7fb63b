//! Standard base64 (RFC 4648, `+/`, padded) for `files.read` and `files.write`.
//!
//! Written out here because `outpost-agent` does not depend on the `base64` crate; the
//! workspace already pins `base64 = "0.22"`, and this module can be replaced by it once the
//! agent's Cargo.toml lists it.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes `bytes` with padding.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        // A chunk of k bytes carries k + 1 symbols; the rest is padding.
        for (i, symbol) in symbols.iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[*symbol as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Why a base64 text did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decodes standard base64. Padding is optional; ASCII whitespace (line breaks from a
/// wrapped encoder) is skipped; anything else outside the alphabet is an error naming its
/// position.
pub fn decode(text: &str) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 3);
    let mut quad = [0u32; 4];
    let mut filled = 0usize;
    let mut padding_at: Option<usize> = None;
    for (position, byte) in text.bytes().enumerate() {
        if byte.is_ascii_whitespace() {
            continue;
        }
        if byte == b'=' {
            padding_at.get_or_insert(position);
            continue;
        }
        if let Some(at) = padding_at {
            return Err(DecodeError(format!(
                "data after the padding `=` at byte {at}"
            )));
        }
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => {
                return Err(DecodeError(format!(
                    "byte {position} is not a base64 character"
                )))
            }
        };
        quad[filled] = u32::from(value);
        filled += 1;
        if filled == 4 {
            let n = (quad[0] << 18) | (quad[1] << 12) | (quad[2] << 6) | quad[3];
            out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
            filled = 0;
        }
    }
    let n = (quad[0] << 18) | (quad[1] << 12) | (quad[2] << 6) | quad[3];
    match filled {
        0 => {}
        2 => out.push((n >> 16) as u8),
        3 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8]),
        _ => {
            return Err(DecodeError(
                "the length is not a whole number of base64 bytes (one symbol too many)".to_owned(),
            ))
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encodes_the_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(encode(plain.as_bytes()), encoded);
            assert_eq!(decode(encoded).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn round_trips_every_byte_value_and_skips_whitespace() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let encoded = encode(&bytes);
        assert_eq!(decode(&encoded).unwrap(), bytes);
        let wrapped: String = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(decode(&wrapped).unwrap(), bytes);
        assert_eq!(decode("Zm8").unwrap(), b"fo");
    }

    #[test]
    fn refuses_bad_characters_and_lengths() {
        assert!(decode("Zm9v!").unwrap_err().0.contains("byte 4"));
        assert!(decode("Z").is_err());
        assert!(decode("Zg==Zg==").is_err());
    }
}
