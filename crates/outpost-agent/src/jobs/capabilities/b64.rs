//! Standard base64 (RFC 4648, `+/`) for `files.read` and `files.write`, through the
//! `base64` crate: padding is optional on input and whitespace (line breaks from a
//! wrapping encoder) is skipped.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Standard alphabet; writes padding, accepts input with or without it.
const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why base64 text did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Encodes `bytes` with padding.
pub fn encode(bytes: &[u8]) -> String {
    ENGINE.encode(bytes)
}

/// Decodes `text`, skipping whitespace.
pub fn decode(text: &str) -> Result<Vec<u8>, DecodeError> {
    let compact: Vec<u8> = text
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    ENGINE.decode(&compact).map_err(|err| {
        DecodeError(match err {
            base64::DecodeError::InvalidByte(position, _) => {
                format!("byte {position} is not a base64 character")
            }
            base64::DecodeError::InvalidPadding => "misplaced padding `=`".to_owned(),
            other => other.to_string(),
        })
    })
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
