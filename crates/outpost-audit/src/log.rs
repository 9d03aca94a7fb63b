//! `AuditLog`: the agent's writer, which appends signed, hash-chained entries and repairs
//! a torn last line on open.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use fs4::fs_std::FileExt;

use crate::entry::{
    encode_line, events, line_hash, parse_line, AuditEntry, GENESIS_PREV, MAX_LINE_BYTES,
};
use crate::error::AuditError;
use crate::verify::check_genesis_shape;

/// The agent's audit log, open for appending. Holds an exclusive lock on the file, so a
/// second writer (which would fork the chain) gets [`AuditError::Locked`].
pub struct AuditLog {
    path: PathBuf,
    file: File,
    key: SigningKey,
    agent_id: String,
    last_seq: u64,
    last_hash: String,
    /// File length after the last complete line: where a failed write is cut back to.
    len: u64,
    is_poisoned: bool,
}

impl std::fmt::Debug for AuditLog {
    // By hand, so the signing key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("agent_id", &self.agent_id)
            .field("last_seq", &self.last_seq)
            .field("last_hash", &self.last_hash)
            .finish_non_exhaustive()
    }
}

/// What [`AuditLog::append`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedEntry {
    /// The entry's seq.
    pub seq: u64,
    /// Hash of its line: the next entry's `prev`.
    pub hash: String,
    /// The line as written, without its newline: what is mirrored to the hub.
    pub line: String,
}

impl AuditLog {
    /// Opens the log at `path`, creating it with a `log.opened` entry (which records the
    /// key's public half) if it does not exist or is empty, and signs new entries with
    /// `key`.
    ///
    /// On open it checks the tail. A last line without its newline (the process died
    /// mid-write) is cut off and an `audit.repaired` entry saying how many bytes were cut
    /// is appended, so a crash is visible rather than silent. The first entry must be this
    /// agent's with this key, and the last entry must verify and link to the one before,
    /// so appends continue a sound chain. This is not a full check: that is [`verify`].
    ///
    /// [`verify`]: crate::verify()
    pub fn open(path: &Path, agent_id: &str, key: SigningKey) -> Result<AuditLog, AuditError> {
        if agent_id.is_empty() {
            return Err(AuditError::EmptyAgentId {
                path: path.to_owned(),
            });
        }
        let io_error = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_error)?;
        if !file.try_lock_exclusive().map_err(io_error)? {
            return Err(AuditError::Locked {
                path: path.to_owned(),
            });
        }
        let len = file.metadata().map_err(io_error)?.len();
        let mut log = AuditLog {
            path: path.to_owned(),
            file,
            key,
            agent_id: agent_id.to_owned(),
            last_seq: 0,
            last_hash: GENESIS_PREV.to_owned(),
            len,
            is_poisoned: false,
        };
        let cut = log.cut_torn_tail()?;
        if log.len == 0 {
            log.write_genesis()?;
        } else {
            log.check_genesis()?;
            log.load_tail()?;
        }
        if cut > 0 {
            log.write(AuditEntry {
                detail: Some(format!(
                    "cut {cut} bytes of an unfinished last line at byte {}: the writer stopped mid-write",
                    log.len
                )),
                ..AuditEntry::new(events::AUDIT_REPAIRED)
            })?;
        }
        Ok(log)
    }

    /// Appends `entry`, filling its `seq`, `time_ms`, `agent_id`, `prev` and `sig` (and
    /// clearing `public_key`, which only the first entry carries). The line and its newline
    /// go out in one write and are fsynced before this returns, so an entry describing an
    /// action is on disk before the action starts.
    ///
    /// If the write fails part-way the partial line is cut off again; if even that fails,
    /// the log refuses further appends ([`AuditError::Poisoned`]) until it is reopened.
    pub fn append(&mut self, entry: AuditEntry) -> Result<AppendedEntry, AuditError> {
        if entry.event.is_empty() {
            return Err(AuditError::EmptyEvent {
                path: self.path.clone(),
            });
        }
        if entry.event == events::LOG_OPENED || entry.event == events::AUDIT_REPAIRED {
            return Err(AuditError::ReservedEvent {
                path: self.path.clone(),
                event: entry.event,
            });
        }
        self.write(AuditEntry {
            public_key: None,
            ..entry
        })
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The agent this log belongs to.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The seq of the last entry written.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Hash of the last line written: the next entry's `prev`.
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    fn io_error(&self, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> AuditError {
        AuditError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Signs, writes and fsyncs one entry as the next link of the chain.
    fn write(&mut self, entry: AuditEntry) -> Result<AppendedEntry, AuditError> {
        if self.is_poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
            });
        }
        let entry = AuditEntry {
            seq: self.last_seq + 1,
            time_ms: now_ms(),
            agent_id: self.agent_id.clone(),
            prev: self.last_hash.clone(),
            ..entry
        };
        let line = encode_line(&entry, &self.key).map_err(|source| AuditError::Encode {
            path: self.path.clone(),
            event: entry.event.clone(),
            source,
        })?;
        if line.len() > MAX_LINE_BYTES {
            return Err(AuditError::EntryTooLarge {
                path: self.path.clone(),
                event: entry.event,
                bytes: line.len(),
                limit: MAX_LINE_BYTES,
            });
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Err(source) = self.file.write_all(&bytes) {
            // Leave no partial line behind for the next append to build on.
            if self.file.set_len(self.len).is_err() {
                self.is_poisoned = true;
            }
            return Err(self.io_error(source));
        }
        if let Err(source) = self.file.sync_data() {
            // After a failed fsync nobody knows what reached the disk; stop here.
            self.is_poisoned = true;
            return Err(self.io_error(source));
        }
        self.len += bytes.len() as u64;
        self.last_seq = entry.seq;
        self.last_hash = line_hash(line.as_bytes());
        Ok(AppendedEntry {
            seq: entry.seq,
            hash: self.last_hash.clone(),
            line,
        })
    }

    fn write_genesis(&mut self) -> Result<(), AuditError> {
        let public_key = hex::encode(self.key.verifying_key().as_bytes());
        self.write(AuditEntry {
            public_key: Some(public_key),
            ..AuditEntry::new(events::LOG_OPENED)
        })?;
        // The new file's directory entry must be durable too, or a crash could lose the
        // whole log.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            sync_dir(dir).map_err(|source| self.io_error(source))?;
        }
        Ok(())
    }

    /// Cuts off a last line that has no newline and returns how many bytes went.
    fn cut_torn_tail(&mut self) -> Result<u64, AuditError> {
        if self.len == 0 {
            return Ok(0);
        }
        // A torn line is a prefix of one the writer produced, so it is at most a line long.
        let window = self.len.min(MAX_LINE_BYTES as u64 + 1);
        let tail = self.read_at(self.len - window, window)?;
        if tail.last() == Some(&b'\n') {
            return Ok(0);
        }
        let keep = match tail.iter().rposition(|&b| b == b'\n') {
            Some(at) => self.len - window + at as u64 + 1,
            None if window == self.len => 0,
            None => {
                return Err(self.corrupt(format!(
                    "the last line has no newline and is longer than {MAX_LINE_BYTES} bytes, so it is not an unfinished entry"
                )))
            }
        };
        self.file
            .set_len(keep)
            .and_then(|()| self.file.sync_all())
            .map_err(|source| self.io_error(source))?;
        let cut = self.len - keep;
        self.len = keep;
        Ok(cut)
    }

    /// The first entry must be a sound `log.opened` by this agent with this key.
    fn check_genesis(&mut self) -> Result<(), AuditError> {
        let window = self.len.min(MAX_LINE_BYTES as u64 + 1);
        let head = self.read_at(0, window)?;
        let Some(end) = head.iter().position(|&b| b == b'\n') else {
            return Err(self.corrupt("the first line is longer than any entry"));
        };
        let parsed = parse_line(&head[..end])
            .map_err(|(_, detail)| self.corrupt(format!("line 1 is not an entry ({detail})")))?;
        let ours = hex::encode(self.key.verifying_key().as_bytes());
        let recorded = parsed.entry.public_key.clone().unwrap_or_default();
        if parsed.entry.seq != 1 {
            return Err(self.corrupt("line 1 is not seq 1"));
        }
        check_genesis_shape(&parsed).map_err(|reason| self.corrupt(reason))?;
        if recorded != ours {
            return Err(AuditError::KeyMismatch {
                path: self.path.clone(),
                recorded,
                ours,
            });
        }
        if !parsed.is_signed_by(&self.key.verifying_key()) {
            return Err(self.corrupt("line 1's signature does not verify"));
        }
        if parsed.entry.agent_id != self.agent_id {
            return Err(AuditError::AgentMismatch {
                path: self.path.clone(),
                recorded: parsed.entry.agent_id,
                ours: self.agent_id.clone(),
            });
        }
        Ok(())
    }

    /// Reads the last two lines, checks the last one's signature and its link to the one
    /// before, and continues the chain from it.
    fn load_tail(&mut self) -> Result<(), AuditError> {
        let window = self.len.min(2 * (MAX_LINE_BYTES as u64 + 1));
        let tail = self.read_at(self.len - window, window)?;
        let is_whole_file = window == self.len;
        // The tail ends with a newline: `cut_torn_tail` has run.
        let body = &tail[..tail.len().saturating_sub(1)];
        let (before, last) = split_last_line(body);
        if before.is_none() && !is_whole_file {
            return Err(self.corrupt("the last line is longer than any entry"));
        }
        let parsed = parse_line(last).map_err(|(_, detail)| {
            self.corrupt(format!("the last line is not an entry ({detail})"))
        })?;
        if !parsed.is_signed_by(&self.key.verifying_key()) {
            return Err(
                self.corrupt("the last entry's signature does not verify with this agent's key")
            );
        }
        if parsed.entry.agent_id != self.agent_id {
            return Err(self.corrupt("the last entry names another agent"));
        }
        if let Some(before) = before {
            let (earlier, previous) = split_last_line(before);
            if earlier.is_none() && !is_whole_file {
                return Err(self.corrupt("the second-to-last line is longer than any entry"));
            }
            if parsed.entry.prev != line_hash(previous) {
                return Err(self.corrupt("the last entry's prev does not match the line before it"));
            }
        } else if parsed.entry.seq != 1 {
            return Err(self.corrupt("the only line is not seq 1"));
        }
        self.last_seq = parsed.entry.seq;
        self.last_hash = parsed.hash;
        Ok(())
    }

    fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, AuditError> {
        let mut buf = Vec::new();
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| (&self.file).take(len).read_to_end(&mut buf))
            .map_err(|source| self.io_error(source))?;
        Ok(buf)
    }
}

/// Splits `body` (lines joined by newlines, no final newline) into everything before the
/// last line (without the newline between) and the last line; `None` if there is one line.
fn split_last_line(body: &[u8]) -> (Option<&[u8]>, &[u8]) {
    match body.iter().rposition(|&b| b == b'\n') {
        Some(at) => (Some(&body[..at]), &body[at + 1..]),
        None => (None, body),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    // Windows cannot open a directory as a file; NTFS journals the directory entry.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_last_line_finds_the_final_line() {
        assert_eq!(split_last_line(b"a\nb\nc"), (Some(&b"a\nb"[..]), &b"c"[..]));
        assert_eq!(split_last_line(b"only"), (None, &b"only"[..]));
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let key = SigningKey::from_bytes(&[1u8; 32]);
        let _first = AuditLog::open(&path, "agent-1", key.clone()).unwrap();
        let second = AuditLog::open(&path, "agent-1", key);
        assert!(
            matches!(second, Err(AuditError::Locked { .. })),
            "{second:?}"
        );
    }

    #[test]
    fn reserved_and_empty_events_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path, "agent-1", SigningKey::from_bytes(&[1u8; 32])).unwrap();
        let opened = log.append(AuditEntry::new(events::LOG_OPENED));
        assert!(matches!(opened, Err(AuditError::ReservedEvent { .. })));
        let empty = log.append(AuditEntry::default());
        assert!(matches!(empty, Err(AuditError::EmptyEvent { .. })));
        assert_eq!(log.last_seq(), 1);
    }

    #[test]
    fn an_oversized_entry_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path, "agent-1", SigningKey::from_bytes(&[1u8; 32])).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let big = AuditEntry {
            detail: Some("x".repeat(MAX_LINE_BYTES)),
            ..AuditEntry::new("config.changed")
        };
        assert!(matches!(
            log.append(big),
            Err(AuditError::EntryTooLarge { .. })
        ));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
    }
}
