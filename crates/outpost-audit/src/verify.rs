//! `verify`: checks a whole log and names its first bad entry.

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use crate::entry::{
    events, parse_line, parse_public_key, LineFault, ParsedLine, GENESIS_PREV, MAX_LINE_BYTES,
};
use crate::error::AuditError;
use crate::lines::{LineReader, RawLine};

/// Checks the whole log at `path`: one JSON entry per line, `seq` 1, 2, 3… with no gaps,
/// each `prev` the hash of the line before, every signature, and one `agent_id`
/// throughout. Signatures are checked with `public_key` if given, else with the key the
/// first entry records; the report says which.
///
/// Streams the file, holding at most one line (of at most [`MAX_LINE_BYTES`]) at a time.
/// Stops at the first problem. `Err` only for a file that cannot be read; a damaged log is
/// an `Ok` report with [`VerifyReport::first_problem`] set.
pub fn verify(path: &Path, public_key: Option<&VerifyingKey>) -> Result<VerifyReport, AuditError> {
    let io_error = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let mut reader = LineReader::new(BufReader::new(file));
    let mut chain = Chain::new(public_key.copied());
    let mut line = 0u64;
    while let Some(raw) = reader.next_line().map_err(io_error)? {
        line += 1;
        let problem = match chain.check(line, raw) {
            Ok(()) => continue,
            Err(Found::Problem(problem)) => problem,
            Err(Found::SeqJump { seq, expected }) => {
                let later = find_seq(&mut reader, line, expected).map_err(io_error)?;
                seq_jump_problem(line, seq, expected, later)
            }
        };
        return Ok(chain.report(Some(problem)));
    }
    if line == 0 {
        let problem = Problem::new(
            1,
            None,
            ProblemKind::Empty,
            "the log is empty: even a new log starts with a `log.opened` entry",
        );
        return Ok(chain.report(Some(problem)));
    }
    Ok(chain.report(None))
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries that passed every check, from the first line up to the first problem (all of
    /// them if there is none).
    pub entries: u64,
    /// The seq of the last entry that passed (0 if none did).
    pub last_seq: u64,
    /// Hash of the last line that passed ([`GENESIS_PREV`] if none did): where a mirror
    /// resumes from.
    pub last_hash: String,
    /// The first bad line, if any.
    pub first_problem: Option<Problem>,
    /// Which key the signatures were checked with.
    pub key_source: KeySource,
}

impl VerifyReport {
    /// Whether the whole log passed.
    pub fn is_ok(&self) -> bool {
        self.first_problem.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first_problem {
            None => write!(
                f,
                "ok: {} entries, chain intact, signatures checked with {}; last hash {}",
                self.entries, self.key_source, self.last_hash
            ),
            Some(problem) => write!(
                f,
                "BAD: {problem} ({} entries before it passed; signatures checked with {})",
                self.entries, self.key_source
            ),
        }
    }
}

/// Which key [`verify`] checked the signatures with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The key the caller gave (`--pubkey`): proves the log is this agent's.
    Given,
    /// The key recorded in the log's first entry: proves the log is internally consistent,
    /// not whose it is.
    Genesis,
    /// No key: none was given and the first entry records none that could be used.
    Unavailable,
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeySource::Given => "the given public key",
            KeySource::Genesis => "the public key recorded in the first entry",
            KeySource::Unavailable => "no key",
        })
    }
}

/// The first bad line of a log.
///
/// Displays as `line 5 (seq 5): previous-hash does not match line 4: an entry before it
/// was edited, removed or reordered`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number in the file.
    pub line: u64,
    /// The seq the line claims, when it could be read.
    pub seq: Option<u64>,
    /// What kind of damage.
    pub kind: ProblemKind,
    /// What is wrong and what it means, in words.
    pub message: String,
}

impl Problem {
    fn new(line: u64, seq: Option<u64>, kind: ProblemKind, message: impl Into<String>) -> Self {
        Problem {
            line,
            seq,
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "line {} (seq {seq}): {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

impl std::error::Error for Problem {}

/// The kinds of damage [`verify`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The file has no lines at all.
    Empty,
    /// The line is not JSON.
    NotJson,
    /// The line is JSON but not an audit entry (a field missing or of the wrong type).
    BadEntry,
    /// The line is cut short, or the last line has no newline.
    TruncatedLine,
    /// The line is longer than [`MAX_LINE_BYTES`].
    LineTooLong,
    /// The signature is missing, malformed or does not verify: the entry was edited or
    /// was not written by this key.
    BadSignature,
    /// The first entry is not a proper `log.opened` entry.
    BadGenesis,
    /// The entry's `agent_id` differs from the first entry's.
    WrongAgent,
    /// One or more seqs are missing: entries were removed.
    SeqGap,
    /// A seq comes earlier than it should: entries were reordered or repeated.
    SeqOutOfOrder,
    /// `prev` is not the hash of the line before.
    BrokenChain,
}

impl ProblemKind {
    /// A short stable name, e.g. `bad-signature`, for scripts and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Empty => "empty",
            ProblemKind::NotJson => "not-json",
            ProblemKind::BadEntry => "bad-entry",
            ProblemKind::TruncatedLine => "truncated-line",
            ProblemKind::LineTooLong => "line-too-long",
            ProblemKind::BadSignature => "bad-signature",
            ProblemKind::BadGenesis => "bad-genesis",
            ProblemKind::WrongAgent => "wrong-agent",
            ProblemKind::SeqGap => "seq-gap",
            ProblemKind::SeqOutOfOrder => "seq-out-of-order",
            ProblemKind::BrokenChain => "broken-chain",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Turns a parse failure into the problem it means for line `line`.
pub(crate) fn line_fault_problem(line: u64, fault: LineFault, detail: &str) -> Problem {
    let (kind, message) = match fault {
        LineFault::NotJson => (ProblemKind::NotJson, format!("not JSON ({detail})")),
        LineFault::Truncated => (
            ProblemKind::TruncatedLine,
            format!("the line is cut short ({detail})"),
        ),
        LineFault::BadEntry => (
            ProblemKind::BadEntry,
            format!("not an audit entry ({detail})"),
        ),
        LineFault::NoSignature => (ProblemKind::BadSignature, detail.to_owned()),
    };
    Problem::new(line, None, kind, message)
}

/// What [`Chain::check`] stopped at.
enum Found {
    Problem(Problem),
    /// A seq higher than expected: a gap, unless the missing seqs come later (a reorder),
    /// which only reading on can tell.
    SeqJump {
        seq: u64,
        expected: u64,
    },
}

/// The running state of a verification: what the next line must continue.
struct Chain {
    key: Option<VerifyingKey>,
    key_source: KeySource,
    /// The first entry's key, when the caller gave another one, for the message.
    genesis_key: Option<String>,
    agent_id: String,
    entries: u64,
    last_seq: u64,
    last_hash: String,
}

impl Chain {
    fn new(given: Option<VerifyingKey>) -> Self {
        Chain {
            key: given,
            key_source: if given.is_some() {
                KeySource::Given
            } else {
                KeySource::Unavailable
            },
            genesis_key: None,
            agent_id: String::new(),
            entries: 0,
            last_seq: 0,
            last_hash: GENESIS_PREV.to_owned(),
        }
    }

    fn report(self, first_problem: Option<Problem>) -> VerifyReport {
        VerifyReport {
            entries: self.entries,
            last_seq: self.last_seq,
            last_hash: self.last_hash,
            first_problem,
            key_source: self.key_source,
        }
    }

    /// Checks line `line`; on success it becomes the link the next line must continue.
    /// The order of checks makes the report name the edited entry itself: its own
    /// signature fails before the next entry's `prev` is looked at.
    fn check(&mut self, line: u64, raw: RawLine) -> Result<(), Found> {
        let parsed = parse_raw(line, raw).map_err(Found::Problem)?;
        let entry = &parsed.entry;
        let seq = Some(entry.seq);
        let problem =
            |kind, message: String| Found::Problem(Problem::new(line, seq, kind, message));
        if line == 1 {
            self.adopt_genesis_key(&parsed)
                .map_err(|message| problem(ProblemKind::BadGenesis, message))?;
        }
        let Some(key) = self.key else {
            // Only reachable on line 1 when its seq is not 1: the genesis is gone.
            return Err(Found::SeqJump {
                seq: entry.seq,
                expected: 1,
            });
        };
        if !parsed.is_signed_by(&key) {
            return Err(problem(ProblemKind::BadSignature, self.signature_message()));
        }
        if line == 1 {
            self.agent_id.clone_from(&entry.agent_id);
        } else if entry.agent_id != self.agent_id {
            return Err(problem(
                ProblemKind::WrongAgent,
                format!(
                    "agent_id {:?} differs from the log's agent {:?} (line 1)",
                    entry.agent_id, self.agent_id
                ),
            ));
        }
        let expected = self.last_seq + 1;
        if entry.seq > expected {
            return Err(Found::SeqJump {
                seq: entry.seq,
                expected,
            });
        }
        if entry.seq < expected {
            return Err(problem(
                ProblemKind::SeqOutOfOrder,
                format!(
                    "expected seq {expected}, but seq {} already came before: entries were reordered or repeated",
                    entry.seq
                ),
            ));
        }
        if line == 1 {
            check_genesis_shape(&parsed).map_err(|m| problem(ProblemKind::BadGenesis, m))?;
        } else if entry.prev != self.last_hash {
            return Err(problem(
                ProblemKind::BrokenChain,
                format!(
                    "previous-hash does not match line {}: an entry before it was edited, removed or reordered",
                    line - 1
                ),
            ));
        }
        self.entries += 1;
        self.last_seq = entry.seq;
        self.last_hash = parsed.hash;
        Ok(())
    }

    /// On line 1: takes the recorded key if the caller gave none, and remembers it.
    fn adopt_genesis_key(&mut self, parsed: &ParsedLine) -> Result<(), String> {
        let recorded = parsed.entry.public_key.as_deref();
        match (self.key, recorded) {
            (Some(given), Some(recorded)) => {
                if parse_public_key(recorded) != Some(given) {
                    self.genesis_key = Some(recorded.to_owned());
                }
                Ok(())
            }
            (Some(_), None) => Ok(()),
            (None, Some(recorded)) => {
                let key = parse_public_key(recorded).ok_or_else(|| {
                    "the first entry's public_key is not a valid Ed25519 key in lowercase hex"
                        .to_owned()
                })?;
                self.key = Some(key);
                self.key_source = KeySource::Genesis;
                Ok(())
            }
            (None, None) if parsed.entry.seq != 1 => Ok(()),
            (None, None) => Err(
                "the first entry records no public_key, so signatures cannot be checked without --pubkey"
                    .to_owned(),
            ),
        }
    }

    fn signature_message(&self) -> String {
        match (self.key_source, &self.genesis_key) {
            (KeySource::Given, Some(recorded)) => format!(
                "signature does not verify with the given public key (the log's first entry records key {recorded}): the log was written by another key, or the entry was edited"
            ),
            (KeySource::Given, None) => "signature does not verify with the given public key: the entry was edited or written by another key".to_owned(),
            (KeySource::Genesis | KeySource::Unavailable, _) => "signature does not verify with the public key recorded in line 1: the entry was edited or written by another key".to_owned(),
        }
    }
}

/// Parses a raw line, or says why it is not an entry.
fn parse_raw(line: u64, raw: RawLine) -> Result<ParsedLine, Problem> {
    match raw {
        RawLine::TooLong => Err(Problem::new(
            line,
            None,
            ProblemKind::LineTooLong,
            format!("the line is longer than {MAX_LINE_BYTES} bytes, more than any entry"),
        )),
        RawLine::Unterminated(bytes) => {
            let seq = parse_line(&bytes).ok().map(|p| p.entry.seq);
            Err(Problem::new(
                line,
                seq,
                ProblemKind::TruncatedLine,
                format!(
                    "the last line ends without a newline after {} bytes: the writer stopped mid-write or the file was cut",
                    bytes.len()
                ),
            ))
        }
        RawLine::Complete(bytes) => {
            parse_line(&bytes).map_err(|(fault, detail)| line_fault_problem(line, fault, &detail))
        }
    }
}

/// The first entry must be `log.opened` with `prev` all zeros.
pub(crate) fn check_genesis_shape(parsed: &ParsedLine) -> Result<(), String> {
    if parsed.entry.event != events::LOG_OPENED {
        return Err(format!(
            "the first entry is {:?}, not `{}`",
            parsed.entry.event,
            events::LOG_OPENED
        ));
    }
    if parsed.entry.prev != GENESIS_PREV {
        return Err("the first entry's prev is not 64 zeros".to_owned());
    }
    Ok(())
}

/// Reads on from the current position for a line whose seq is `wanted`, and returns its
/// line number. Only the seq is decoded; lines that do not parse are skipped.
fn find_seq<R: std::io::BufRead>(
    reader: &mut LineReader<R>,
    mut line: u64,
    wanted: u64,
) -> std::io::Result<Option<u64>> {
    #[derive(Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    while let Some(raw) = reader.next_line()? {
        line += 1;
        if let RawLine::Complete(bytes) | RawLine::Unterminated(bytes) = raw {
            if let Ok(SeqOnly { seq }) = serde_json::from_slice(&bytes) {
                if seq == wanted {
                    return Ok(Some(line));
                }
            }
        }
    }
    Ok(None)
}

fn seq_jump_problem(line: u64, seq: u64, expected: u64, later: Option<u64>) -> Problem {
    let (kind, message) = match later {
        Some(later) => (
            ProblemKind::SeqOutOfOrder,
            format!("expected seq {expected}, which comes later at line {later}: entries were reordered"),
        ),
        None if seq == expected + 1 => (
            ProblemKind::SeqGap,
            format!("expected seq {expected}: entry {expected} is missing (removed)"),
        ),
        None => (
            ProblemKind::SeqGap,
            format!(
                "expected seq {expected}: entries {expected} to {} are missing (removed)",
                seq - 1
            ),
        ),
    };
    Problem::new(line, Some(seq), kind, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_displays_line_seq_and_message() {
        let problem = Problem::new(5, Some(5), ProblemKind::BrokenChain, "x y");
        assert_eq!(problem.to_string(), "line 5 (seq 5): x y");
        let problem = Problem::new(2, None, ProblemKind::NotJson, "not JSON");
        assert_eq!(problem.to_string(), "line 2: not JSON");
    }

    #[test]
    fn a_jump_is_a_gap_unless_the_missing_seq_comes_later() {
        assert_eq!(seq_jump_problem(3, 4, 3, None).kind, ProblemKind::SeqGap);
        assert_eq!(
            seq_jump_problem(3, 4, 3, Some(4)).kind,
            ProblemKind::SeqOutOfOrder
        );
        assert!(seq_jump_problem(3, 6, 3, None)
            .message
            .contains("entries 3 to 5 are missing"));
    }

    #[test]
    fn an_empty_file_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, b"").unwrap();
        let report = verify(&path, None).unwrap();
        assert_eq!(report.first_problem.unwrap().kind, ProblemKind::Empty);
    }
}
