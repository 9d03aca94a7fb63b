//! Errors for parsing messages and ACKs. They identify a problem by position, never by content,
//! because message content is patient data.

/// Why raw bytes are not a parsable HL7 v2 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The input holds no bytes at all.
    #[error("empty input")]
    Empty,
    /// The input does not start with the three bytes `MSH`.
    #[error("input does not start with an MSH segment")]
    MissingMsh,
    /// The MSH segment ends before the field separator and two encoding characters.
    #[error("MSH segment too short to hold delimiters ({len} bytes)")]
    MshTooShort {
        /// Length of the MSH segment in bytes.
        len: usize,
    },
    /// MSH-1 and MSH-2 do not form a valid set of delimiters.
    #[error("invalid delimiters: {reason}")]
    BadDelimiters {
        /// Which rule the delimiters break.
        reason: &'static str,
    },
    /// A segment name is not three ASCII uppercase letters or digits followed by a field separator.
    #[error("segment {index} at byte {offset}: name is not three uppercase letters or digits")]
    BadSegmentName {
        /// 0-based index of the segment, not counting skipped empty segments.
        index: usize,
        /// Byte offset of the segment in the input.
        offset: usize,
    },
}

/// Why bytes are not a usable acknowledgment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The bytes are not an HL7 v2 message.
    #[error("ACK is not an HL7 message: {0}")]
    NotHl7(#[from] ParseError),
    /// The message has no MSA segment.
    #[error("ACK has no MSA segment")]
    MissingMsa,
    /// MSA-1 is not one of AA, AE, AR, CA, CE, CR.
    #[error("ACK for control id {control_id:?}: MSA-1 is not a known acknowledgment code")]
    UnknownCode {
        /// MSA-2, the control id of the acknowledged message, when present.
        control_id: Option<String>,
    },
}
