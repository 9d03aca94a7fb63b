//! The MLLP frame codec: a `tokio_util::codec` decoder and encoder over raw bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{MllpError, CARRIAGE_RETURN, END_BLOCK, START_BLOCK};

/// How many leading payload bytes of an oversized frame are kept in
/// [`Frame::Oversized::head`], enough to hold an HL7 MSH segment and its control id.
pub const OVERSIZED_HEAD_BYTES: usize = 4096;

/// One decoded MLLP frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete payload (without the framing bytes).
    Message(Bytes),
    /// A frame longer than the limit: its body was discarded as it arrived, so
    /// memory stays bounded.
    Oversized {
        /// The first [`OVERSIZED_HEAD_BYTES`] payload bytes (fewer if the frame was
        /// shorter), so the caller can still read e.g. a control id to put in a
        /// negative acknowledgement.
        head: Bytes,
        /// The full payload length seen.
        total_bytes: u64,
    },
}

/// MLLP framing as a [`Decoder`] (bytes to [`Frame`]) and an [`Encoder`]
/// (payload to `0x0B payload 0x1C 0x0D`).
///
/// Decoding rules:
/// - between frames, CR, LF, space and tab are skipped (senders often add a stray
///   LF after the trailer); any other byte but a start block is
///   [`MllpError::OutsideFrame`];
/// - inside a frame, a start block is [`MllpError::NestedStart`] and an end block
///   followed by anything but a carriage return is [`MllpError::BadEndBlock`];
/// - a payload longer than `max_frame_bytes` is discarded as it arrives and comes
///   out as [`Frame::Oversized`];
/// - at end of stream, an unfinished frame is [`MllpError::TruncatedFrame`].
///
/// Framing errors are sticky: the stream is out of sync, every later call returns
/// the same error, and the caller should close the connection.
#[derive(Debug)]
pub struct MllpCodec {
    max_frame_bytes: usize,
    /// Bytes of the stream already removed from the front of the buffer, so
    /// `consumed + i` is the stream offset of `buffer[i]`.
    consumed: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Waiting for a start block; the buffer starts at a byte not yet looked at.
    BetweenFrames,
    /// The start block was consumed and the buffer starts with the payload.
    /// `scanned` payload bytes are known to hold no framing byte, so a frame
    /// arriving in small pieces is scanned once, not once per piece.
    InFrame { scanned: usize },
    /// The payload passed the limit: it is dropped as it arrives, only its head
    /// is kept. The buffer starts with the next unseen payload byte.
    Discarding { head: BytesMut, total_bytes: u64 },
    /// The stream broke the framing rules; nothing more is decoded.
    Failed(Fault),
}

/// A framing violation: the decoder's own errors, kept so they can be repeated.
#[derive(Debug, Clone, Copy)]
enum Fault {
    OutsideFrame { offset: u64, byte: u8 },
    NestedStart { offset: u64 },
    BadEndBlock { offset: u64 },
}

impl From<Fault> for MllpError {
    fn from(fault: Fault) -> Self {
        match fault {
            Fault::OutsideFrame { offset, byte } => MllpError::OutsideFrame { offset, byte },
            Fault::NestedStart { offset } => MllpError::NestedStart { offset },
            Fault::BadEndBlock { offset } => MllpError::BadEndBlock { offset },
        }
    }
}

impl MllpCodec {
    /// Creates a codec that accepts payloads of up to `max_frame_bytes` bytes.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            max_frame_bytes,
            consumed: 0,
            state: State::BetweenFrames,
        }
    }

    /// The largest payload, in bytes, decoded as a [`Frame::Message`].
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// How many bytes of the stream the decoder has consumed so far.
    pub fn stream_offset(&self) -> u64 {
        self.consumed
    }

    /// Skips whitespace up to a start block and consumes it. Returns whether a
    /// frame has started.
    fn find_start(&mut self, src: &mut BytesMut) -> Result<bool, Fault> {
        let Some(skip) = src.iter().position(|&b| !is_between_frames_whitespace(b)) else {
            self.drop_front(src, src.len());
            return Ok(false);
        };
        self.drop_front(src, skip);
        match src.first() {
            Some(&START_BLOCK) => {
                self.drop_front(src, 1);
                Ok(true)
            }
            Some(&byte) => Err(Fault::OutsideFrame {
                offset: self.consumed,
                byte,
            }),
            None => Ok(false),
        }
    }

    /// Looks for the end of a frame whose payload starts at `src[0]`.
    /// Returns the state to continue in, and the frame if one was completed.
    fn decode_in_frame(
        &mut self,
        src: &mut BytesMut,
        scanned: usize,
    ) -> Result<(State, Option<Frame>), Fault> {
        let found = find_framing_byte(&src[scanned..]).map(|rel| scanned + rel);
        let payload_len = match found {
            None => src.len(),
            Some(at) if src[at] == START_BLOCK => {
                return Err(Fault::NestedStart {
                    offset: self.consumed + offset(at),
                })
            }
            Some(at) => match src.get(at + 1) {
                // The carriage return has not arrived yet.
                None => at,
                Some(&CARRIAGE_RETURN) => {
                    let payload = src.split_to(at);
                    self.consumed += offset(at);
                    self.drop_front(src, 2);
                    return Ok((State::BetweenFrames, Some(self.complete(payload))));
                }
                Some(_) => {
                    return Err(Fault::BadEndBlock {
                        offset: self.consumed + offset(at),
                    })
                }
            },
        };
        if payload_len <= self.max_frame_bytes {
            return Ok((
                State::InFrame {
                    scanned: payload_len,
                },
                None,
            ));
        }
        // Over the limit and still open: keep the head, drop the body, and give
        // the allocation back (a fresh buffer holding only the possible end block),
        // so a huge frame costs at most `max_frame_bytes` once.
        let head = BytesMut::from(&src[..payload_len.min(OVERSIZED_HEAD_BYTES)]);
        *src = BytesMut::from(&src[payload_len..]);
        self.consumed += offset(payload_len);
        let state = State::Discarding {
            head,
            total_bytes: offset(payload_len),
        };
        Ok((state, None))
    }

    /// Drops payload bytes of an oversized frame until its end block.
    fn discard(
        &mut self,
        src: &mut BytesMut,
        mut head: BytesMut,
        mut total_bytes: u64,
    ) -> Result<(State, Option<Frame>), Fault> {
        let found = find_framing_byte(src);
        let body_len = found.unwrap_or(src.len());
        let room = OVERSIZED_HEAD_BYTES.saturating_sub(head.len());
        head.extend_from_slice(&src[..body_len.min(room)]);
        total_bytes += offset(body_len);
        self.drop_front(src, body_len);
        if found.is_none() {
            return Ok((State::Discarding { head, total_bytes }, None));
        }
        if src[0] == START_BLOCK {
            return Err(Fault::NestedStart {
                offset: self.consumed,
            });
        }
        match src.get(1) {
            // The carriage return has not arrived yet.
            None => Ok((State::Discarding { head, total_bytes }, None)),
            Some(&CARRIAGE_RETURN) => {
                self.drop_front(src, 2);
                let frame = Frame::Oversized {
                    head: head.freeze(),
                    total_bytes,
                };
                Ok((State::BetweenFrames, Some(frame)))
            }
            Some(_) => Err(Fault::BadEndBlock {
                offset: self.consumed,
            }),
        }
    }

    /// Turns a complete payload into a frame, applying the size limit to frames
    /// that arrived whole in one read.
    fn complete(&self, payload: BytesMut) -> Frame {
        if payload.len() <= self.max_frame_bytes {
            return Frame::Message(payload.freeze());
        }
        Frame::Oversized {
            head: Bytes::copy_from_slice(&payload[..OVERSIZED_HEAD_BYTES.min(payload.len())]),
            total_bytes: offset(payload.len()),
        }
    }

    fn drop_front(&mut self, src: &mut BytesMut, n: usize) {
        src.advance(n);
        self.consumed += offset(n);
    }
}

impl Default for MllpCodec {
    /// A codec with the [`DEFAULT_MAX_FRAME_BYTES`](crate::DEFAULT_MAX_FRAME_BYTES) limit.
    fn default() -> Self {
        Self::new(crate::DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for MllpCodec {
    type Item = Frame;
    type Error = MllpError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, MllpError> {
        let state = std::mem::replace(&mut self.state, State::BetweenFrames);
        let outcome = match state {
            State::BetweenFrames => match self.find_start(src) {
                Ok(true) => self.decode_in_frame(src, 0),
                Ok(false) => Ok((State::BetweenFrames, None)),
                Err(fault) => Err(fault),
            },
            State::InFrame { scanned } => self.decode_in_frame(src, scanned),
            State::Discarding { head, total_bytes } => self.discard(src, head, total_bytes),
            State::Failed(fault) => Err(fault),
        };
        match outcome {
            Ok((next, frame)) => {
                self.state = next;
                Ok(frame)
            }
            Err(fault) => {
                // The stream is out of sync: every later call reports the same fault.
                self.state = State::Failed(fault);
                Err(fault.into())
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, MllpError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        let buffered_bytes = match &self.state {
            State::BetweenFrames => return Ok(None),
            State::Failed(fault) => return Err((*fault).into()),
            State::InFrame { .. } => offset(src.len()),
            State::Discarding { total_bytes, .. } => total_bytes + offset(src.len()),
        };
        self.consumed += offset(src.len());
        src.clear();
        self.state = State::BetweenFrames;
        Err(MllpError::TruncatedFrame { buffered_bytes })
    }
}

impl Encoder<&[u8]> for MllpCodec {
    type Error = MllpError;

    /// Writes `0x0B payload 0x1C 0x0D`. A payload holding 0x0B or 0x1C is refused
    /// with [`MllpError::FramingByteInPayload`], since the peer would misread it.
    fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), MllpError> {
        if let Some(at) = find_framing_byte(payload) {
            return Err(MllpError::FramingByteInPayload {
                offset: at,
                byte: payload[at],
            });
        }
        dst.reserve(payload.len() + 3);
        dst.put_u8(START_BLOCK);
        dst.extend_from_slice(payload);
        dst.put_u8(END_BLOCK);
        dst.put_u8(CARRIAGE_RETURN);
        Ok(())
    }
}

impl Encoder<Bytes> for MllpCodec {
    type Error = MllpError;

    /// Same as the `&[u8]` encoder.
    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), MllpError> {
        Encoder::<&[u8]>::encode(self, &payload, dst)
    }
}

/// Bytes a sender may put between frames: real senders add a stray LF (or CR LF)
/// after the trailer, and some pad with spaces.
fn is_between_frames_whitespace(byte: u8) -> bool {
    matches!(byte, b'\r' | b'\n' | b' ' | b'\t')
}

fn find_framing_byte(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .position(|&b| b == START_BLOCK || b == END_BLOCK)
}

/// A buffer length as a stream offset (usize always fits in u64 on supported targets).
fn offset(n: usize) -> u64 {
    n as u64
}

#[cfg(test)]
mod tests;
