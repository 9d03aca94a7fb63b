//! Large payloads are compressed (zstd, fast level) before they are sealed.
//!
//! A snapshot chunk of change events or a batch of text is megabytes of repetitive JSON:
//! compressed it is a fraction of that, and the queue writes each byte twice (SQLite's WAL,
//! then the checkpoint), so compressing is faster than writing, not slower. Small items
//! (an HL7 message) gain little and stay as they are. The `codec` column says which.

use outpost_core::ItemId;

use crate::seal::NONCE_BYTES;
use crate::{Keys, QueueError};

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

/// The largest payload a compressed item may claim to hold. Items are messages and
/// snapshot chunks of a few MiB; large files (DICOM) are blobs, not items.
const MAX_PLAIN_BYTES: i64 = 1 << 30;

/// An item's payload sealed for the queue file: `(sealed, nonce, codec)`.
///
/// A payload stored as given is bound to its item id only (the format of version-1 files);
/// a packed one is bound to its id, codec and plain length too, so altering either clear
/// column makes it fail to open instead of steering the decoder (or its allocation).
pub(crate) fn seal_item(
    keys: &Keys,
    id: ItemId,
    payload: &[u8],
) -> (Vec<u8>, [u8; NONCE_BYTES], i64) {
    let (packed, codec) = pack(payload);
    let (sealed, nonce) = keys.seal_bound(&item_context(id, codec, payload.len() as i64), &packed);
    (sealed, nonce, codec)
}

/// Opens and unpacks an item's payload sealed by [`seal_item`].
pub(crate) fn open_item(
    keys: &Keys,
    id: ItemId,
    codec: i64,
    plain_bytes: i64,
    nonce: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, QueueError> {
    let opened = keys
        .open_bound(&item_context(id, codec, plain_bytes), nonce, sealed)
        .ok_or(QueueError::Unseal { id })?;
    unpack(id, codec, opened, plain_bytes)
}

fn item_context(id: ItemId, codec: i64, plain_bytes: i64) -> Vec<u8> {
    let mut context = id.0.to_le_bytes().to_vec();
    if codec != PLAIN {
        context.extend_from_slice(&codec.to_le_bytes());
        context.extend_from_slice(&plain_bytes.to_le_bytes());
    }
    context
}

/// The payload back from what was sealed; `plain_bytes` is its recorded length.
fn unpack(
    id: ItemId,
    codec: i64,
    opened: Vec<u8>,
    plain_bytes: i64,
) -> Result<Vec<u8>, QueueError> {
    match codec {
        PLAIN if i64::try_from(opened.len()) == Ok(plain_bytes) => Ok(opened),
        PLAIN => Err(QueueError::Corrupt {
            id,
            what: "payload_bytes",
        }),
        ZSTD => {
            let capacity = usize::try_from(plain_bytes)
                .ok()
                .filter(|_| plain_bytes <= MAX_PLAIN_BYTES)
                .ok_or(QueueError::Corrupt {
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
        assert!(unpack(ItemId(1), PLAIN, b"abc".to_vec(), 4).is_err());
    }

    #[test]
    fn a_sealed_item_opens_only_with_its_own_id_codec_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load_or_create(&dir.path().join("queue.key")).unwrap();
        let payload = vec![b'x'; 100_000];
        let (sealed, nonce, codec) = seal_item(&keys, ItemId(3), &payload);
        assert_eq!(codec, ZSTD);
        let open = |id, codec, len| open_item(&keys, ItemId(id), codec, len, &nonce, &sealed);
        assert_eq!(open(3, codec, 100_000).unwrap(), payload);
        // A length raised to make the decoder allocate, a codec switched, another row:
        // each fails authentication before anything is decoded.
        for (id, codec, len) in [(3, ZSTD, i64::MAX), (3, PLAIN, 100_000), (4, ZSTD, 100_000)] {
            assert!(
                matches!(open(id, codec, len), Err(QueueError::Unseal { .. })),
                "{id} {codec} {len}"
            );
        }
        // Small payloads keep the version-1 form: bound to the id alone.
        let (sealed, nonce, codec) = seal_item(&keys, ItemId(5), b"MSH|small");
        assert_eq!(codec, PLAIN);
        assert_eq!(keys.open(ItemId(5), &nonce, &sealed).unwrap(), b"MSH|small");
    }
}
