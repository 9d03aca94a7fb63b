//! Property tests of the MLLP codec: round trips, chunking invariance, no panics, bounded memory.

use bytes::BytesMut;
use outpost_mllp::{Frame, MllpCodec, MllpError, END_BLOCK, OVERSIZED_HEAD_BYTES, START_BLOCK};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

/// What decoding a whole stream gave: its frames, then how it ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    /// `None` for a clean end, else the error's message.
    error: Option<String>,
}

/// Feeds `stream` cut into pieces of the given sizes (cycled), checking the
/// memory bound after every call, then signals end of stream.
fn decode_chunked(max_frame_bytes: usize, stream: &[u8], chunk_sizes: &[usize]) -> Outcome {
    let mut codec = MllpCodec::new(max_frame_bytes);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut sizes = chunk_sizes.iter().copied().cycle();
    while !rest.is_empty() {
        let take = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        error: Some(e.to_string()),
                    }
                }
            }
        }
        assert!(
            buf.len() <= max_frame_bytes + 1,
            "buffer holds {} bytes with a limit of {max_frame_bytes}",
            buf.len()
        );
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => {
                return Outcome {
                    frames,
                    error: None,
                }
            }
            Err(e) => {
                return Outcome {
                    frames,
                    error: Some(e.to_string()),
                }
            }
        }
    }
}

fn payload_byte() -> impl Strategy<Value = u8> {
    any::<u8>().prop_filter("framing byte", |b| *b != START_BLOCK && *b != END_BLOCK)
}

fn whitespace() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![b'\r', b'\n', b' ', b'\t']), 0..4)
}

/// Bytes rich in framing and whitespace bytes, so every decoder path is hit.
fn stream_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        1 => Just(START_BLOCK),
        1 => Just(END_BLOCK),
        1 => Just(b'\r'),
        1 => Just(b'\n'),
    ]
}

proptest! {
    #[test]
    fn encoded_payloads_decode_back_whatever_the_chunking(
        payloads in prop::collection::vec(prop::collection::vec(payload_byte(), 0..300), 0..8),
        gaps in prop::collection::vec(whitespace(), 8),
        chunk_sizes in prop::collection::vec(1usize..64, 1..10),
    ) {
        let mut codec = MllpCodec::new(300);
        let mut stream = BytesMut::new();
        for (payload, gap) in payloads.iter().zip(&gaps) {
            codec.encode(&payload[..], &mut stream).map_err(|e| TestCaseError::fail(e.to_string()))?;
            stream.extend_from_slice(gap);
        }
        let outcome = decode_chunked(300, &stream, &chunk_sizes);
        let expected: Vec<Frame> = payloads.iter().map(|p| Frame::Message(p.clone().into())).collect();
        prop_assert_eq!(outcome, Outcome { frames: expected, error: None });
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_frames_respect_the_limit(
        stream in prop::collection::vec(stream_byte(), 0..3000),
        max_frame_bytes in 0usize..600,
        chunk_sizes in prop::collection::vec(1usize..200, 1..10),
    ) {
        let outcome = decode_chunked(max_frame_bytes, &stream, &chunk_sizes);
        for frame in &outcome.frames {
            match frame {
                Frame::Message(payload) => prop_assert!(payload.len() <= max_frame_bytes),
                Frame::Oversized { head, total_bytes } => {
                    prop_assert!(*total_bytes > max_frame_bytes as u64);
                    prop_assert!(head.len() <= OVERSIZED_HEAD_BYTES);
                    prop_assert!(head.len() as u64 <= *total_bytes);
                }
            }
        }
    }

    #[test]
    fn decoding_gives_the_same_frames_and_error_whatever_the_chunking(
        stream in prop::collection::vec(stream_byte(), 0..3000),
        max_frame_bytes in 0usize..600,
        chunk_sizes in prop::collection::vec(1usize..200, 1..10),
    ) {
        let whole = decode_chunked(max_frame_bytes, &stream, &[stream.len().max(1)]);
        let chunked = decode_chunked(max_frame_bytes, &stream, &chunk_sizes);
        prop_assert_eq!(whole, chunked);
    }

    #[test]
    fn long_frames_split_anywhere_come_out_oversized_with_their_head(
        len in 0usize..20_000,
        max_frame_bytes in 0usize..10_000,
        chunk_sizes in prop::collection::vec(1usize..3000, 1..5),
    ) {
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let mut stream = BytesMut::new();
        MllpCodec::new(max_frame_bytes).encode(&payload[..], &mut stream).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let outcome = decode_chunked(max_frame_bytes, &stream, &chunk_sizes);
        let expected = if len <= max_frame_bytes {
            Frame::Message(payload.into())
        } else {
            Frame::Oversized {
                head: payload[..len.min(OVERSIZED_HEAD_BYTES)].to_vec().into(),
                total_bytes: len as u64,
            }
        };
        prop_assert_eq!(outcome, Outcome { frames: vec![expected], error: None });
    }
}

#[test]
fn the_encoder_error_type_is_mllp_error() {
    // Keeps the Encoder impl's error type part of the tested surface.
    let err: MllpError = MllpCodec::default()
        .encode(&[START_BLOCK][..], &mut BytesMut::new())
        .unwrap_err();
    assert!(matches!(
        err,
        MllpError::FramingByteInPayload {
            offset: 0,
            byte: START_BLOCK
        }
    ));
}
