//! Jobs waiting for a local approval, in `approvals.db` in the data directory. The agent
//! adds them; `outpost approvals` (another process, run by the practice) approves or
//! denies them; the agent picks the decision up, records it in the audit log with the
//! approver, and runs or drops the job. A job nobody decides on expires.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// The file in the data directory.
pub const APPROVALS_FILE: &str = "approvals.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS approvals (
    dispatch_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    staff TEXT NOT NULL,
    capability TEXT NOT NULL,
    args TEXT NOT NULL,
    job TEXT NOT NULL,
    signature TEXT NOT NULL,
    rule TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT,
    decided_at_ms INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals(state);
";

/// What can go wrong with the approvals file.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// SQLite failed.
    #[error("{path}: {source}")]
    Db {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// No waiting job matches.
    #[error("no job waiting for approval matches {0:?} (see `outpost approvals list`)")]
    NotWaiting(String),
    /// Several waiting jobs match a prefix.
    #[error("{0:?} matches several waiting jobs; give more of the id")]
    Ambiguous(String),
    /// The job expired before the decision.
    #[error("job {0} has expired; it can no longer be approved")]
    Expired(String),
}

/// A job waiting (or decided, not yet taken by the agent).
#[derive(Debug, Clone, Serialize)]
pub struct WaitingJob {
    /// The hub's delivery id.
    pub dispatch_id: String,
    /// The signed job id.
    pub job_id: String,
    /// Who asked.
    pub staff: String,
    /// The capability.
    pub capability: String,
    /// The arguments (JSON), shown to the approver.
    pub args: String,
    /// The signed job text.
    #[serde(skip)]
    pub job: String,
    /// Its signature.
    #[serde(skip)]
    pub signature: String,
    /// The rule that asked for approval.
    pub rule: String,
    /// When it arrived (unix ms).
    pub requested_at_ms: i64,
    /// When it expires (unix ms).
    pub expires_at_ms: i64,
    /// `waiting`, `approved`, `denied`.
    pub state: String,
    /// Who decided.
    pub decided_by: Option<String>,
    /// Why (deny).
    pub reason: Option<String>,
}

/// The approvals file.
pub struct Approvals {
    path: PathBuf,
    conn: Connection,
}

impl Approvals {
    /// Opens (or creates) `approvals.db` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Approvals, ApprovalError> {
        let path = data_dir.join(APPROVALS_FILE);
        let db = |source| ApprovalError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        crate::jobs::restrict_to_owner(&path);
        Ok(Approvals { path, conn })
    }

    fn db(&self, source: rusqlite::Error) -> ApprovalError {
        ApprovalError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Adds a job to wait for approval.
    pub fn add(&self, job: &WaitingJob) -> Result<(), ApprovalError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO approvals (dispatch_id, job_id, staff, capability, args, job, signature, rule, requested_at_ms, expires_at_ms, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'waiting')",
                params![
                    job.dispatch_id,
                    job.job_id,
                    job.staff,
                    job.capability,
                    job.args,
                    job.job,
                    job.signature,
                    job.rule,
                    job.requested_at_ms,
                    job.expires_at_ms
                ],
            )
            .map_err(|err| self.db(err))?;
        Ok(())
    }

    /// Jobs in `state` (`waiting`, `approved`, `denied`), oldest first.
    pub fn in_state(&self, state: &str) -> Result<Vec<WaitingJob>, ApprovalError> {
        let mut statement = self
            .conn
            .prepare(
                "SELECT dispatch_id, job_id, staff, capability, args, job, signature, rule, requested_at_ms, expires_at_ms, state, decided_by, reason
                 FROM approvals WHERE state = ?1 ORDER BY requested_at_ms, dispatch_id",
            )
            .map_err(|err| self.db(err))?;
        let rows = statement
            .query_map(params![state], |row| {
                Ok(WaitingJob {
                    dispatch_id: row.get(0)?,
                    job_id: row.get(1)?,
                    staff: row.get(2)?,
                    capability: row.get(3)?,
                    args: row.get(4)?,
                    job: row.get(5)?,
                    signature: row.get(6)?,
                    rule: row.get(7)?,
                    requested_at_ms: row.get(8)?,
                    expires_at_ms: row.get(9)?,
                    state: row.get(10)?,
                    decided_by: row.get(11)?,
                    reason: row.get(12)?,
                })
            })
            .map_err(|err| self.db(err))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|err| self.db(err))
    }

    /// Approves or denies the waiting job whose job id (or delivery id) starts with
    /// `id_prefix`; returns it.
    pub fn decide(
        &self,
        id_prefix: &str,
        approve: bool,
        by: &str,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<WaitingJob, ApprovalError> {
        let matching: Vec<WaitingJob> = self
            .in_state("waiting")?
            .into_iter()
            .filter(|job| {
                !id_prefix.is_empty()
                    && (job.job_id.starts_with(id_prefix) || job.dispatch_id.starts_with(id_prefix))
            })
            .collect();
        let job = match matching.as_slice() {
            [] => return Err(ApprovalError::NotWaiting(id_prefix.to_owned())),
            [job] => job.clone(),
            _ => return Err(ApprovalError::Ambiguous(id_prefix.to_owned())),
        };
        if job.expires_at_ms <= now_ms {
            return Err(ApprovalError::Expired(job.job_id));
        }
        let state = if approve { "approved" } else { "denied" };
        let changed = self
            .conn
            .execute(
                "UPDATE approvals SET state = ?1, decided_by = ?2, decided_at_ms = ?3, reason = ?4
                 WHERE dispatch_id = ?5 AND state = 'waiting'",
                params![state, by, now_ms, reason, job.dispatch_id],
            )
            .map_err(|err| self.db(err))?;
        if changed == 0 {
            return Err(ApprovalError::NotWaiting(id_prefix.to_owned()));
        }
        Ok(WaitingJob {
            state: state.to_owned(),
            decided_by: Some(by.to_owned()),
            reason: reason.map(str::to_owned),
            ..job
        })
    }

    /// Moves a job to a final state (`taken`, `expired`, `cancelled`) from `from`;
    /// returns whether it was in `from`.
    pub fn settle(&self, dispatch_id: &str, from: &str, to: &str) -> Result<bool, ApprovalError> {
        let changed = self
            .conn
            .execute(
                "UPDATE approvals SET state = ?1 WHERE dispatch_id = ?2 AND state = ?3",
                params![to, dispatch_id, from],
            )
            .map_err(|err| self.db(err))?;
        Ok(changed > 0)
    }

    /// One job by delivery id.
    pub fn get(&self, dispatch_id: &str) -> Result<Option<String>, ApprovalError> {
        self.conn
            .query_row(
                "SELECT state FROM approvals WHERE dispatch_id = ?1",
                params![dispatch_id],
                |row| row.get(0),
            )
            .optional()
            .map_err(|err| self.db(err))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn waiting(dispatch_id: &str, expires_at_ms: i64) -> WaitingJob {
        WaitingJob {
            dispatch_id: dispatch_id.into(),
            job_id: dispatch_id.into(),
            staff: "alice".into(),
            capability: "files.write".into(),
            args: "{}".into(),
            job: "{}".into(),
            signature: String::new(),
            rule: "access".into(),
            requested_at_ms: 1,
            expires_at_ms,
            state: "waiting".into(),
            decided_by: None,
            reason: None,
        }
    }

    #[test]
    fn a_waiting_job_is_decided_once_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let approvals = Approvals::open(dir.path()).unwrap();
        approvals.add(&waiting("job-aaa", 10_000)).unwrap();
        approvals.add(&waiting("job-abb", 10_000)).unwrap();
        assert!(matches!(
            approvals.decide("job-a", true, "it", None, 5),
            Err(ApprovalError::Ambiguous(_))
        ));
        let decided = approvals.decide("job-aa", true, "it", None, 5).unwrap();
        assert_eq!(decided.decided_by.as_deref(), Some("it"));
        assert!(matches!(
            approvals.decide("job-aa", false, "it", None, 5),
            Err(ApprovalError::NotWaiting(_))
        ));
        // Another process (the CLI) sees the same file.
        let other = Approvals::open(dir.path()).unwrap();
        assert_eq!(other.in_state("approved").unwrap().len(), 1);
        assert!(other.settle("job-aaa", "approved", "taken").unwrap());
        assert!(!other.settle("job-aaa", "approved", "taken").unwrap());
        assert!(matches!(
            approvals.decide("job-abb", true, "it", None, 20_000),
            Err(ApprovalError::Expired(_))
        ));
    }
}
