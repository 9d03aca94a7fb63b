//! The agent's audit log as the job runner uses it: appends off the async threads (each
//! is fsynced), a watch of the last sequence number for the mirror to the hub, and the
//! start-up scan that recovers remembered nonces and the last recorded policy and config.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use outpost_audit::{AuditEntry, AuditError, AuditLog};
use tokio::sync::watch;

/// The audit log file in the data directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// Appends to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditWriter {
    log: Arc<Mutex<AuditLog>>,
    path: PathBuf,
    last_seq: Arc<watch::Sender<u64>>,
}

impl AuditWriter {
    /// Opens (or starts) the log.
    pub fn open(path: &Path, agent_id: &str, key: SigningKey) -> Result<AuditWriter, AuditError> {
        let log = AuditLog::open(path, agent_id, key)?;
        crate::jobs::restrict_to_owner(path);
        let (last_seq, _) = watch::channel(log.last_seq());
        Ok(AuditWriter {
            log: Arc::new(Mutex::new(log)),
            path: path.to_owned(),
            last_seq: Arc::new(last_seq),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an entry; returns its sequence number once it is on disk.
    pub async fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        let log = self.log.clone();
        let path = self.path.clone();
        let seq = tokio::task::spawn_blocking(move || {
            let mut log = log.lock().map_err(|_| AuditError::Poisoned { path })?;
            log.append(entry).map(|appended| appended.seq)
        })
        .await
        .map_err(|_| AuditError::Poisoned {
            path: self.path.clone(),
        })??;
        self.last_seq.send_replace(seq);
        Ok(seq)
    }

    /// Watches the last sequence number written.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }
}

/// What the start-up scan of the log found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Nonces of jobs decided before, with their expiry.
    pub nonces: Vec<(String, i64)>,
    /// The policy digest the last `policy.changed` entry recorded.
    pub policy_digest: Option<String>,
    /// The config digest the last `config.changed` entry recorded.
    pub config_digest: Option<String>,
}

/// Reads the log once (after it was opened and its tail checked). Lines that do not parse
/// are skipped here; `outpost audit verify` is the place that reports them.
pub fn recover(path: &Path, now_ms: i64) -> Recovered {
    let mut recovered = Recovered::default();
    let Ok(file) = std::fs::File::open(path) else {
        return recovered;
    };
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Ok(entry) = serde_json::from_str::<AuditEntry>(&line) else {
            continue;
        };
        let detail = entry.detail.as_deref().unwrap_or("");
        match entry.event.as_str() {
            outpost_audit::events::JOB_DECIDED => {
                if let (Some(nonce), Some(expires)) =
                    (field(detail, "nonce"), field(detail, "expires_at_ms"))
                {
                    if let Ok(expires) = expires.parse::<i64>() {
                        if expires > now_ms {
                            recovered.nonces.push((nonce.to_owned(), expires));
                        }
                    }
                }
            }
            outpost_audit::events::POLICY_CHANGED => {
                recovered.policy_digest = field(detail, "digest").map(str::to_owned);
            }
            outpost_audit::events::CONFIG_CHANGED => {
                recovered.config_digest = field(detail, "digest").map(str::to_owned);
            }
            _ => {}
        }
    }
    recovered
}

/// The value of `name=value` in a space-separated detail.
fn field<'a>(detail: &'a str, name: &str) -> Option<&'a str> {
    detail.split(' ').find_map(|part| {
        part.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use outpost_audit::events;

    #[tokio::test]
    async fn the_scan_recovers_unexpired_nonces_and_the_last_digests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let writer = AuditWriter::open(&path, "a1", SigningKey::from_bytes(&[3; 32])).unwrap();
        for (nonce, expires) in [("n-old", 5), ("n-live", 5_000)] {
            writer
                .append(AuditEntry {
                    detail: Some(format!("nonce={nonce} expires_at_ms={expires}")),
                    ..AuditEntry::new(events::JOB_DECIDED)
                })
                .await
                .unwrap();
        }
        for digest in ["d1", "d2"] {
            writer
                .append(AuditEntry {
                    detail: Some(format!("digest={digest} path=/p")),
                    ..AuditEntry::new(events::POLICY_CHANGED)
                })
                .await
                .unwrap();
        }
        assert_eq!(*writer.watch().borrow(), 5);
        let recovered = recover(&path, 100);
        assert_eq!(recovered.nonces, vec![("n-live".to_owned(), 5_000)]);
        assert_eq!(recovered.policy_digest.as_deref(), Some("d2"));
        assert_eq!(recovered.config_digest, None);
    }
}
