//! Large payloads are compressed (zstd, fast level) before they are sealed.
//!
//! A snapshot chunk of change events or a batch of text is megabytes of repetitive JSON:
//! compressed it is a fraction of that, and the queue writes each byte twice (SQLite's WAL,
//! then the checkpoint), so compressing is faster than writing, not slower. Small items
//! (an HL7 message) gain little and stay as they are. The `codec` column says which.

use outpost_core::ItemId;

use crate::QueueError;

/// Stored as given.
pub(crate) const PLAIN: i64 = 0;
/// zstd frame.
pub(crate) const ZSTD: i64 = 1;

/// Payloads from this size on are compressed.
const COMPRESS_FROM: usize = 16 * 1024;
/// zstd's fastest standard level: well over 1 GB/s on JSON.
const LEVEL: i32 = 1;

/// The bytes to seal and their codec: compressed when the payload is large and
/// compressing makes it smaller.
pub(crate) fn pack(payload: &[u8]) -> (std::borrow::Cow<'_, [u8]>, i64) {
    if payload.len() >= COMPRESS_FROM {
        if let Ok(packed) = zstd::bulk::compress(payload, LEVEL) {
            if packed.len() < payload.len() {
                return (std::borrow::Cow::Owned(packed), ZSTD);
            }
        }
    }
    (std::borrow::Cow::Borrowed(payload), PLAIN)
}

/// The payload back from what was sealed; `plain_bytes` is its recorded length.
pub(crate) fn unpack(
    id: ItemId,
    codec: i64,
    opened: Vec<u8>,
    plain_bytes: i64,
) -> Result<Vec<u8>, QueueError> {
    match codec {
        PLAIN => Ok(opened),
        ZSTD => {
            let capacity = usize::try_from(plain_bytes).map_err(|_| QueueError::Corrupt {
                id,
                what: "payload_bytes",
            })?;
            let payload =
                zstd::bulk::decompress(&opened, capacity).map_err(|_| QueueError::Corrupt {
                    id,
                    what: "compressed payload",
                })?;
            if payload.len() == capacity {
                Ok(payload)
            } else {
                Err(QueueError::Corrupt {
                    id,
                    what: "compressed payload",
                })
            }
        }
        _ => Err(QueueError::Corrupt { id, what: "codec" }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn large_payloads_are_compressed_and_come_back_whole() {
        let line = br#"{"source":"pms","table":"patient","op":"snapshot","key":{"patnum":1}}"#;
        let payload: Vec<u8> = line.iter().copied().cycle().take(200_000).collect();
        let (packed, codec) = pack(&payload);
        assert_eq!(codec, ZSTD);
        assert!(packed.len() < payload.len() / 10);
        let back = unpack(ItemId(7), codec, packed.into_owned(), payload.len() as i64).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn small_or_incompressible_payloads_stay_plain() {
        let (packed, codec) = pack(b"MSH|^~\\&|small");
        assert_eq!((codec, packed.as_ref()), (PLAIN, &b"MSH|^~\\&|small"[..]));
        let mut noise = vec![0u8; 100_000];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut noise);
        assert_eq!(pack(&noise).1, PLAIN);
    }

    #[test]
    fn a_wrong_length_or_codec_is_corruption_not_a_panic() {
        let payload = vec![b'x'; 100_000];
        let (packed, codec) = pack(&payload);
        assert!(unpack(ItemId(1), codec, packed.to_vec(), 99_999).is_err());
        assert!(unpack(ItemId(1), codec, packed.to_vec(), -1).is_err());
        assert!(unpack(ItemId(1), 9, packed.to_vec(), 100_000).is_err());
        assert!(unpack(ItemId(1), ZSTD, b"not zstd".to_vec(), 100_000).is_err());
    }
}
