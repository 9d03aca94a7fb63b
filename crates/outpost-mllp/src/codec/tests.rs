//! Unit tests of the MLLP decoder rules and the encoder.

use super::*;
use crate::DEFAULT_MAX_FRAME_BYTES;

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![START_BLOCK];
    out.extend_from_slice(payload);
    out.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
    out
}

fn message(payload: &[u8]) -> Frame {
    Frame::Message(Bytes::copy_from_slice(payload))
}

/// Decodes everything `decode` yields from `buf`, stopping at the first `None`.
fn drain(codec: &mut MllpCodec, buf: &mut BytesMut) -> Result<Vec<Frame>, MllpError> {
    let mut frames = Vec::new();
    while let Some(frame) = codec.decode(buf)? {
        frames.push(frame);
    }
    Ok(frames)
}

/// Feeds `stream` in `chunk`-byte pieces, then signals end of stream.
fn decode_in_chunks(
    codec: &mut MllpCodec,
    stream: &[u8],
    chunk: usize,
) -> Result<Vec<Frame>, MllpError> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        frames.extend(drain(codec, &mut buf)?);
    }
    while let Some(frame) = codec.decode_eof(&mut buf)? {
        frames.push(frame);
    }
    Ok(frames)
}

#[test]
fn many_frames_in_one_buffer_decode_in_order() {
    let mut buf = BytesMut::new();
    for payload in [&b"MSH|one"[..], b"MSH|two", b"", b"MSH|three"] {
        buf.extend_from_slice(&framed(payload));
    }
    let frames = drain(&mut MllpCodec::default(), &mut buf).unwrap();
    assert_eq!(
        frames,
        vec![
            message(b"MSH|one"),
            message(b"MSH|two"),
            message(b""),
            message(b"MSH|three")
        ]
    );
    assert!(buf.is_empty(), "left in buffer: {buf:?}");
}

#[test]
fn a_frame_split_at_every_byte_boundary_decodes_the_same() {
    let stream = [framed(b"MSH|^~\\&|A\rPID|1"), framed(b"second")].concat();
    for split in 0..=stream.len() {
        let mut codec = MllpCodec::default();
        let mut buf = BytesMut::from(&stream[..split]);
        let mut frames = drain(&mut codec, &mut buf).unwrap();
        buf.extend_from_slice(&stream[split..]);
        frames.extend(drain(&mut codec, &mut buf).unwrap());
        assert_eq!(
            frames,
            vec![message(b"MSH|^~\\&|A\rPID|1"), message(b"second")],
            "split at byte {split}"
        );
    }
}

#[test]
fn one_byte_reads_decode_the_same() {
    let stream = [framed(b"abc"), b"\n".to_vec(), framed(b"def")].concat();
    let frames = decode_in_chunks(&mut MllpCodec::default(), &stream, 1).unwrap();
    assert_eq!(frames, vec![message(b"abc"), message(b"def")]);
}

#[test]
fn whitespace_between_frames_is_skipped() {
    let stream = [
        b"\r\n \t".to_vec(),
        framed(b"a"),
        b"\n".to_vec(),
        framed(b"b"),
        b"\r\n  ".to_vec(),
    ]
    .concat();
    let frames = decode_in_chunks(&mut MllpCodec::default(), &stream, stream.len()).unwrap();
    assert_eq!(frames, vec![message(b"a"), message(b"b")]);
}

#[test]
fn whitespace_inside_a_payload_is_kept() {
    let frames = decode_in_chunks(&mut MllpCodec::default(), &framed(b" a\r\nb\t"), 3).unwrap();
    assert_eq!(frames, vec![message(b" a\r\nb\t")]);
}

#[test]
fn garbage_between_frames_is_reported_with_its_stream_offset() {
    let mut buf = BytesMut::from(&[framed(b"abc"), b"\nX".to_vec(), framed(b"d")].concat()[..]);
    let mut codec = MllpCodec::default();
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(message(b"abc")));
    let err = codec.decode(&mut buf).unwrap_err();
    // 6 framed bytes, then the LF at offset 6, then 'X' at offset 7.
    assert!(
        matches!(
            err,
            MllpError::OutsideFrame {
                offset: 7,
                byte: b'X'
            }
        ),
        "got {err:?}"
    );
}

#[test]
fn garbage_before_the_first_frame_is_an_error() {
    let err = MllpCodec::default()
        .decode(&mut BytesMut::from(&b"GET / HTTP/1.1"[..]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            MllpError::OutsideFrame {
                offset: 0,
                byte: b'G'
            }
        ),
        "got {err:?}"
    );
}

#[test]
fn framing_errors_repeat_on_later_calls() {
    let mut codec = MllpCodec::default();
    let mut buf = BytesMut::from(&b"\x0bab\x0bcd"[..]);
    let first = codec.decode(&mut buf).unwrap_err();
    buf.extend_from_slice(&framed(b"fine"));
    let second = codec.decode(&mut buf).unwrap_err();
    let third = codec.decode_eof(&mut buf).unwrap_err();
    assert_eq!(first.to_string(), second.to_string());
    assert_eq!(first.to_string(), third.to_string());
}

#[test]
fn a_start_block_inside_a_frame_is_a_nested_start() {
    let err = decode_in_chunks(&mut MllpCodec::default(), b"\x0babc\x0bdef\x1c\r", 2).unwrap_err();
    assert!(
        matches!(err, MllpError::NestedStart { offset: 4 }),
        "got {err:?}"
    );
}

#[test]
fn an_end_block_followed_by_another_byte_is_a_bad_end_block() {
    let err = decode_in_chunks(&mut MllpCodec::default(), b"\x0babc\x1c\n", 1).unwrap_err();
    assert!(
        matches!(err, MllpError::BadEndBlock { offset: 4 }),
        "got {err:?}"
    );
}

#[test]
fn an_end_block_split_from_its_carriage_return_waits_for_more() {
    let mut codec = MllpCodec::default();
    let mut buf = BytesMut::from(&b"\x0babc\x1c"[..]);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        None,
        "a second look changes nothing"
    );
    buf.extend_from_slice(b"\r");
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(message(b"abc")));
    assert!(buf.is_empty());
}

#[test]
fn a_frame_at_exactly_the_limit_is_a_message() {
    let payload = vec![b'a'; 100];
    let frames = decode_in_chunks(&mut MllpCodec::new(100), &framed(&payload), 7).unwrap();
    assert_eq!(frames, vec![message(&payload)]);
}

#[test]
fn a_frame_over_the_limit_is_discarded_with_its_head_kept() {
    let payload: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let stream = [framed(&payload), framed(b"next")].concat();
    for chunk in [1, 100, 4096, 5000, stream.len()] {
        let mut codec = MllpCodec::new(1000);
        let frames = decode_in_chunks(&mut codec, &stream, chunk).unwrap();
        let expected_oversized = Frame::Oversized {
            head: Bytes::copy_from_slice(&payload[..OVERSIZED_HEAD_BYTES]),
            total_bytes: 10_000,
        };
        assert_eq!(
            frames,
            vec![expected_oversized, message(b"next")],
            "chunk {chunk}"
        );
    }
}

#[test]
fn an_oversized_frame_shorter_than_the_head_keeps_all_of_it() {
    let frames = decode_in_chunks(&mut MllpCodec::new(10), &framed(b"0123456789AB"), 3).unwrap();
    assert_eq!(
        frames,
        vec![Frame::Oversized {
            head: Bytes::from_static(b"0123456789AB"),
            total_bytes: 12
        }]
    );
}

#[test]
fn the_buffer_never_holds_more_than_the_limit_while_discarding() {
    let mut codec = MllpCodec::new(1000);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[START_BLOCK]);
    for _ in 0..1000 {
        buf.extend_from_slice(&[b'x'; 37]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.len() <= 1001, "buffer holds {} bytes", buf.len());
    }
}

#[test]
fn a_twenty_mib_frame_in_kib_chunks_is_oversized_with_a_bounded_buffer() {
    const CHUNK: usize = 1024;
    let total = 20 * 1024 * 1024;
    let mut codec = MllpCodec::new(DEFAULT_MAX_FRAME_BYTES);
    let mut buf = BytesMut::new();
    let chunk = [b'x'; CHUNK];
    let mut frames = Vec::new();
    let mut peak_capacity = 0;
    buf.extend_from_slice(&[START_BLOCK]);
    for _ in 0..total / CHUNK {
        buf.extend_from_slice(&chunk);
        frames.extend(drain(&mut codec, &mut buf).unwrap());
        assert!(
            buf.len() <= DEFAULT_MAX_FRAME_BYTES + 1,
            "buffer holds {} bytes, limit {DEFAULT_MAX_FRAME_BYTES}",
            buf.len()
        );
        peak_capacity = peak_capacity.max(buf.capacity());
    }
    // Once discarding, the big allocation was given back and only chunks pass through.
    assert!(
        buf.capacity() <= 64 * 1024,
        "capacity after switching to discard: {}",
        buf.capacity()
    );
    buf.extend_from_slice(&[END_BLOCK, CARRIAGE_RETURN]);
    frames.extend(drain(&mut codec, &mut buf).unwrap());
    assert!(
        peak_capacity <= 2 * (DEFAULT_MAX_FRAME_BYTES + CHUNK),
        "peak capacity {peak_capacity}"
    );
    assert_eq!(
        frames,
        vec![Frame::Oversized {
            head: Bytes::from(vec![b'x'; OVERSIZED_HEAD_BYTES]),
            total_bytes: total as u64
        }]
    );
}

#[test]
fn a_frame_cut_off_at_eof_is_truncated() {
    let err = decode_in_chunks(&mut MllpCodec::default(), b"\x0bMSH|abc", 3).unwrap_err();
    assert!(
        matches!(err, MllpError::TruncatedFrame { buffered_bytes: 7 }),
        "got {err:?}"
    );
}

#[test]
fn a_frame_cut_off_between_end_block_and_carriage_return_is_truncated() {
    let err = decode_in_chunks(&mut MllpCodec::default(), b"\x0babc\x1c", 100).unwrap_err();
    assert!(
        matches!(err, MllpError::TruncatedFrame { buffered_bytes: 4 }),
        "got {err:?}"
    );
}

#[test]
fn an_oversized_frame_cut_off_at_eof_counts_what_was_discarded() {
    let stream = [&[START_BLOCK][..], &[b'x'; 500]].concat();
    let err = decode_in_chunks(&mut MllpCodec::new(100), &stream, 64).unwrap_err();
    assert!(
        matches!(
            err,
            MllpError::TruncatedFrame {
                buffered_bytes: 500
            }
        ),
        "got {err:?}"
    );
}

#[test]
fn trailing_whitespace_at_eof_is_a_clean_end() {
    let stream = [framed(b"a"), b"\r\n \t".to_vec()].concat();
    assert_eq!(
        decode_in_chunks(&mut MllpCodec::default(), &stream, 2).unwrap(),
        vec![message(b"a")]
    );
    assert_eq!(
        decode_in_chunks(&mut MllpCodec::default(), b"", 1).unwrap(),
        vec![]
    );
}

#[test]
fn stream_offset_counts_every_consumed_byte() {
    let stream = [b"\n".to_vec(), framed(b"abc"), b"\r\n".to_vec()].concat();
    let mut codec = MllpCodec::default();
    decode_in_chunks(&mut codec, &stream, 2).unwrap();
    assert_eq!(codec.stream_offset(), stream.len() as u64);
}

#[test]
fn the_encoder_wraps_the_payload_in_framing_bytes() {
    let mut codec = MllpCodec::default();
    let mut dst = BytesMut::new();
    codec.encode(&b"MSH|x"[..], &mut dst).unwrap();
    codec.encode(Bytes::from_static(b""), &mut dst).unwrap();
    assert_eq!(&dst[..], b"\x0bMSH|x\x1c\r\x0b\x1c\r");
}

#[test]
fn the_encoder_refuses_payloads_holding_framing_bytes() {
    let mut dst = BytesMut::new();
    let err = MllpCodec::default()
        .encode(&b"ab\x1ccd"[..], &mut dst)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MllpError::FramingByteInPayload {
                offset: 2,
                byte: END_BLOCK
            }
        ),
        "got {err:?}"
    );
    assert!(dst.is_empty(), "nothing is written for a refused payload");
}

#[test]
fn error_messages_carry_no_payload_bytes() {
    let stream = b"\x0bPATIENT^SECRET\x1cZ";
    let err = decode_in_chunks(&mut MllpCodec::default(), stream, 4).unwrap_err();
    let text = err.to_string();
    assert!(
        !text.contains("SECRET") && !text.contains("PATIENT"),
        "message: {text}"
    );
    assert_eq!(
        text,
        "end block at stream offset 15 is not followed by a carriage return"
    );
}

#[tokio::test]
async fn framed_read_over_a_byte_stream_yields_frames_then_ends() {
    use futures::StreamExt;
    let stream = [
        framed(b"one"),
        b"\n".to_vec(),
        framed(b"two"),
        b"\n".to_vec(),
    ]
    .concat();
    let mut reader = tokio_util::codec::FramedRead::new(&stream[..], MllpCodec::default());
    assert_eq!(reader.next().await.unwrap().unwrap(), message(b"one"));
    assert_eq!(reader.next().await.unwrap().unwrap(), message(b"two"));
    assert!(reader.next().await.is_none());
}
