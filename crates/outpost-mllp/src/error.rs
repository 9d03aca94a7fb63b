//! Errors of the MLLP codec and client.

use std::io;
use std::time::Duration;

/// Everything that can go wrong while framing, unframing or exchanging MLLP frames.
///
/// Messages never include payload bytes: a payload is usually a patient record.
#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    /// Reading from or writing to the connection failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A byte other than whitespace or a start block arrived between frames.
    /// The connection is out of sync and should be closed.
    #[error("byte 0x{byte:02x} at stream offset {offset} is outside a frame")]
    OutsideFrame {
        /// Position of the byte in the connection's byte stream.
        offset: u64,
        /// The unexpected byte (a framing-level byte, never payload).
        byte: u8,
    },
    /// A start block arrived before the current frame was closed.
    #[error("start block at stream offset {offset} inside an unfinished frame")]
    NestedStart {
        /// Position of the second start block in the connection's byte stream.
        offset: u64,
    },
    /// An end block was followed by something other than a carriage return.
    #[error("end block at stream offset {offset} is not followed by a carriage return")]
    BadEndBlock {
        /// Position of the end block byte in the connection's byte stream.
        offset: u64,
    },
    /// The connection ended in the middle of a frame.
    #[error("connection closed mid-frame after {buffered_bytes} bytes of the frame")]
    TruncatedFrame {
        /// Bytes of the unfinished frame received after its start block.
        buffered_bytes: u64,
    },
    /// A payload given to the encoder contains a byte reserved for framing
    /// (0x0B or 0x1C); sent as is, it would desynchronise the peer.
    #[error("payload byte at offset {offset} is a reserved framing byte 0x{byte:02x}")]
    FramingByteInPayload {
        /// Position of the byte in the payload.
        offset: usize,
        /// The reserved byte found.
        byte: u8,
    },
    /// A network operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// Which operation: `"connect"` or `"reply"`.
        what: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed by peer")]
    ConnectionClosed,
    /// Opening the TCP connection failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// The address as given by the caller.
        addr: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The reply frame was larger than the client's frame limit; its body was discarded.
    #[error("reply of {total_bytes} bytes exceeds the limit of {max_frame_bytes} bytes")]
    ReplyTooLarge {
        /// Payload length of the reply.
        total_bytes: u64,
        /// The client's frame limit.
        max_frame_bytes: usize,
    },
    /// An earlier error (a timeout, a bad frame, a closed connection) left the
    /// connection in an unknown state: a late reply could be taken for the answer
    /// to the next request, so the client refuses to go on.
    #[error("connection is unusable after an earlier error, reconnect")]
    Broken,
}
