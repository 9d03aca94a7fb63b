//! The delimiter set a message declares in MSH-1 and MSH-2.

use crate::error::ParseError;

/// Segment terminator. HL7 v2 section 2.5.1 allows only CR.
pub(crate) const CR: u8 = b'\r';

/// The separators and escape character of one message (HL7 v2 section 2.5.4).
///
/// MSH-2 is positional: component, repetition, escape, subcomponent, truncation. So a set with
/// `escape: None` but a subcomponent separator cannot be written as MSH-2; parsed sets never
/// have that shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delimiters {
    /// Separates fields (MSH-1), usually `|`.
    pub field: u8,
    /// Separates components, usually `^`.
    pub component: u8,
    /// Separates repetitions of a field, usually `~`.
    pub repetition: u8,
    /// Starts and ends an escape sequence, usually `\`.
    pub escape: Option<u8>,
    /// Separates subcomponents, usually `&`.
    pub subcomponent: Option<u8>,
    /// Marks a truncated value (HL7 v2.7 and later), usually `#`.
    pub truncation: Option<u8>,
}

impl Default for Delimiters {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Delimiters {
    /// The recommended set: `|^~\&`.
    pub const DEFAULT: Delimiters = Delimiters {
        field: b'|',
        component: b'^',
        repetition: b'~',
        escape: Some(b'\\'),
        subcomponent: Some(b'&'),
        truncation: None,
    };

    /// The bytes of MSH-2, in their standard order.
    pub fn encoding_characters(&self) -> Vec<u8> {
        let optional = [self.escape, self.subcomponent, self.truncation];
        [self.component, self.repetition]
            .into_iter()
            .chain(optional.into_iter().flatten())
            .collect()
    }

    /// Reads MSH-1 and MSH-2 from the start of a message that begins with `MSH`.
    pub(crate) fn from_msh(raw: &[u8]) -> Result<Self, ParseError> {
        let header = raw.split(|&b| b == CR).next().unwrap_or_default();
        if header.len() < 6 {
            return Err(ParseError::MshTooShort { len: header.len() });
        }
        let field = header[3];
        let encoding: Vec<u8> = header[4..]
            .iter()
            .copied()
            .take_while(|&b| b != field)
            .collect();
        let bad = |reason| Err(ParseError::BadDelimiters { reason });
        if encoding.len() < 2 {
            return bad("fewer than two encoding characters");
        }
        if encoding.len() > 5 {
            return bad("more than five encoding characters");
        }
        let all: Vec<u8> = std::iter::once(field)
            .chain(encoding.iter().copied())
            .collect();
        if !all
            .iter()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_alphanumeric())
        {
            return bad("delimiter is not a printable punctuation character");
        }
        if all.iter().enumerate().any(|(i, b)| all[..i].contains(b)) {
            return bad("delimiters are not distinct");
        }
        Ok(Delimiters {
            field,
            component: encoding[0],
            repetition: encoding[1],
            escape: encoding.get(2).copied(),
            subcomponent: encoding.get(3).copied(),
            truncation: encoding.get(4).copied(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(raw: &[u8]) -> Result<Delimiters, ParseError> {
        Delimiters::from_msh(raw)
    }

    #[test]
    fn default_encoding_characters_are_the_standard_four() {
        assert_eq!(Delimiters::DEFAULT.encoding_characters(), b"^~\\&");
    }

    #[test]
    fn standard_header_reads_as_default() {
        assert_eq!(read(b"MSH|^~\\&|LAB"), Ok(Delimiters::DEFAULT));
    }

    #[test]
    fn truncation_character_is_read_from_the_fifth_position() {
        let d = read(b"MSH|^~\\&#|LAB").unwrap();
        assert_eq!(d.truncation, Some(b'#'));
        assert_eq!(d.encoding_characters(), b"^~\\&#");
    }

    #[test]
    fn two_encoding_characters_leave_escape_and_subcomponent_unset() {
        let d = read(b"MSH|^~|LAB").unwrap();
        assert_eq!((d.escape, d.subcomponent), (None, None));
    }

    #[test]
    fn short_header_is_rejected() {
        assert_eq!(read(b"MSH|^\rPID"), Err(ParseError::MshTooShort { len: 5 }));
    }

    #[test]
    fn bad_delimiter_sets_are_rejected() {
        for raw in [
            &b"MSH|^|LAB"[..],
            b"MSH|^~\\&#$|",
            b"MSH|^A\\&|",
            b"MSH|^ \\&|",
            b"MSH|^^\\&|",
            b"MSH^^~\\&^",
        ] {
            assert!(
                matches!(read(raw), Err(ParseError::BadDelimiters { .. })),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
