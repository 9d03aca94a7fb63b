//! HL7 v2 ER7 ("pipe and hat") parsing, building, escape handling and ACK building. No IO.
//!
//! We write our own instead of using crates such as `hl7-parser` because:
//! - HL7 feeds are often not UTF-8 (Latin-1 or Windows-1252 from lab systems), so we parse
//!   bytes, not `&str`, and only convert to text when a caller asks for a `String`;
//! - the gateway forwards messages byte-identical, so every parsed piece is a slice of (and a
//!   position in) the original bytes, never a re-encoded copy;
//! - we need a builder, both for ACKs and for round-trip property tests, which those crates lack.
//!
//! [`Message`] borrows the raw bytes and splits lazily; [`MessageModel`] is the owned,
//! unescaped form that [`MessageModel::encode`] turns back into ER7.

#![forbid(unsafe_code)]

mod ack;
mod delimiters;
mod error;
mod escape;
mod message;
mod model;

pub use ack::{build_ack, build_ack_for_unparsed, Ack, AckCode};
pub use delimiters::Delimiters;
pub use error::{AckError, ParseError};
pub use escape::{escape, unescape};
pub use message::{normalize_segment_terminators, Message, Segment};
pub use model::{FieldModel, MessageModel, SegmentModel};
