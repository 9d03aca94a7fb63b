//! Reading a log line by line in bounded memory.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::entry::MAX_LINE_BYTES;
use crate::error::AuditError;

/// One line as read from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawLine {
    /// A line ended by a newline (the newline is not included).
    Complete(Vec<u8>),
    /// Bytes at the end of the file with no newline after them.
    Unterminated(Vec<u8>),
    /// A line longer than [`MAX_LINE_BYTES`]; its bytes were skipped, not kept.
    TooLong,
}

/// Splits a reader into [`RawLine`]s, never holding more than one line of
/// [`MAX_LINE_BYTES`] in memory.
pub(crate) struct LineReader<R> {
    inner: R,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R) -> Self {
        LineReader { inner }
    }

    /// The next line, or `None` at the end of the file.
    pub fn next_line(&mut self) -> std::io::Result<Option<RawLine>> {
        let mut line = Vec::new();
        let mut is_too_long = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(match (is_too_long, line.is_empty()) {
                    (true, _) => Some(RawLine::TooLong),
                    (false, true) => None,
                    (false, false) => Some(RawLine::Unterminated(line)),
                });
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(available.len());
            if !is_too_long {
                if line.len() + take > MAX_LINE_BYTES {
                    is_too_long = true;
                    line = Vec::new();
                } else {
                    line.extend_from_slice(&available[..take]);
                }
            }
            match newline {
                Some(at) => {
                    self.inner.consume(at + 1);
                    return Ok(Some(if is_too_long {
                        RawLine::TooLong
                    } else {
                        RawLine::Complete(line)
                    }));
                }
                None => self.inner.consume(take),
            }
        }
    }
}

/// The complete lines of a log file, in order, as text without their newlines: what the
/// agent's uplink sends to the hub's [`Mirror`](crate::Mirror). An unfinished last line is
/// not yielded (it is not an entry yet); a line that is too long or not UTF-8 is an error.
///
/// In a sound log line *n* holds seq *n*, so `LogLines::open(path)?.skip(n)` starts after
/// seq *n*.
pub struct LogLines {
    path: PathBuf,
    reader: LineReader<BufReader<File>>,
    line: u64,
}

impl LogLines {
    /// Opens `path` for reading from its first line.
    pub fn open(path: &Path) -> Result<LogLines, AuditError> {
        let file = File::open(path).map_err(|source| AuditError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(LogLines {
            path: path.to_owned(),
            reader: LineReader::new(BufReader::new(file)),
            line: 0,
        })
    }
}

impl Iterator for LogLines {
    type Item = Result<String, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        let raw = match self.reader.next_line() {
            Ok(raw) => raw?,
            Err(source) => {
                return Some(Err(AuditError::Io {
                    path: self.path.clone(),
                    source,
                }))
            }
        };
        self.line += 1;
        let unreadable = |reason: &str| AuditError::Unreadable {
            path: self.path.clone(),
            line: self.line,
            reason: reason.to_owned(),
        };
        match raw {
            RawLine::Complete(bytes) => {
                Some(String::from_utf8(bytes).map_err(|_| unreadable("not UTF-8")))
            }
            RawLine::Unterminated(_) => None,
            RawLine::TooLong => Some(Err(unreadable("longer than 1 MiB"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<RawLine> {
        let mut reader = LineReader::new(BufReader::with_capacity(7, input));
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().unwrap() {
            out.push(line);
        }
        out
    }

    #[test]
    fn splits_complete_lines_and_an_unterminated_tail() {
        assert_eq!(
            lines(b"abc\n\nlonger line here\ntail"),
            vec![
                RawLine::Complete(b"abc".to_vec()),
                RawLine::Complete(Vec::new()),
                RawLine::Complete(b"longer line here".to_vec()),
                RawLine::Unterminated(b"tail".to_vec()),
            ]
        );
        assert!(lines(b"").is_empty());
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_not_kept() {
        let mut input = vec![b'x'; MAX_LINE_BYTES + 1];
        input.extend_from_slice(b"\nok\n");
        assert_eq!(
            lines(&input),
            vec![RawLine::TooLong, RawLine::Complete(b"ok".to_vec())]
        );
        let exactly = vec![b'y'; MAX_LINE_BYTES];
        let mut input = exactly.clone();
        input.push(b'\n');
        assert_eq!(lines(&input), vec![RawLine::Complete(exactly)]);
    }
}
