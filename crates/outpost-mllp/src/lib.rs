//! MLLP (Minimal Lower Layer Protocol, the HL7 v2 transport) over bytes only.
//!
//! A frame on the wire is `0x0B <payload> 0x1C 0x0D`. [`MllpCodec`] turns a byte
//! stream into [`Frame`]s and payloads back into framed bytes, without touching a
//! socket (the mini-redis split: frame parsing apart from IO). [`MllpClient`] is
//! a small persistent request/reply client built on it. This crate knows nothing
//! about HL7 itself: payloads are opaque bytes.
#![forbid(unsafe_code)]

mod client;
mod codec;
mod error;

pub use client::{configure_stream, MllpClient};
pub use codec::{Frame, MllpCodec, OVERSIZED_HEAD_BYTES};
pub use error::MllpError;

/// Byte that opens an MLLP frame (vertical tab).
pub const START_BLOCK: u8 = 0x0B;
/// First byte of the two-byte trailer that closes an MLLP frame (file separator).
pub const END_BLOCK: u8 = 0x1C;
/// Second byte of the trailer that closes an MLLP frame.
pub const CARRIAGE_RETURN: u8 = 0x0D;
/// Default largest payload accepted in one frame: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
