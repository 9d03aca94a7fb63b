//! The writer on real files: appending, reopening, continuing the chain, and repairing a
//! torn last line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use ed25519_dalek::SigningKey;
use outpost_audit::{
    events, verify, AuditEntry, AuditError, AuditLog, Decision, KeySource, LogLines, GENESIS_PREV,
};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn job_decided(job: &str) -> AuditEntry {
    AuditEntry {
        staff: Some("alice@vendor".into()),
        job_id: Some(job.into()),
        capability: Some("health".into()),
        decision: Some(Decision::Allowed),
        rule: Some("allow.health".into()),
        ..AuditEntry::new(events::JOB_DECIDED)
    }
}

fn lines(path: &Path) -> Vec<String> {
    LogLines::open(path).unwrap().map(Result::unwrap).collect()
}

fn entry(line: &str) -> AuditEntry {
    serde_json::from_str(line).unwrap()
}

#[test]
fn a_new_log_starts_with_a_genesis_recording_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path, "clinic-7", key()).unwrap();
    assert_eq!(log.last_seq(), 1);
    let lines = lines(&path);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let genesis = entry(&lines[0]);
    assert_eq!(genesis.seq, 1);
    assert_eq!(genesis.event, "log.opened");
    assert_eq!(genesis.agent_id, "clinic-7");
    assert_eq!(genesis.prev, GENESIS_PREV);
    assert_eq!(
        genesis.public_key.as_deref(),
        Some(hex::encode(key().verifying_key().as_bytes()).as_str())
    );
}

#[test]
fn appends_chain_each_entry_to_the_line_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
    let first = log.append(job_decided("j-1")).unwrap();
    let second = log.append(job_decided("j-2")).unwrap();
    assert_eq!((first.seq, second.seq), (2, 3));
    let lines = lines(&path);
    assert_eq!(lines[1], first.line);
    assert_eq!(entry(&lines[2]).prev, first.hash);
    assert_eq!(first.hash, outpost_audit::line_hash(lines[1].as_bytes()));
    let written = entry(&lines[1]);
    assert_eq!(written.decision, Some(Decision::Allowed));
    assert_eq!(written.public_key, None);
    assert!(
        written.time_ms > 1_600_000_000_000,
        "time_ms {}",
        written.time_ms
    );
    let report = verify(&path, Some(&key().verifying_key())).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!((report.entries, report.last_seq), (3, 3));
    assert_eq!(report.last_hash, second.hash);
    assert_eq!(report.key_source, KeySource::Given);
}

#[test]
fn reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let last = {
        let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
        log.append(job_decided("j-1")).unwrap()
    };
    let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
    assert_eq!(log.last_seq(), 2);
    assert_eq!(log.last_hash(), last.hash);
    let next = log.append(job_decided("j-2")).unwrap();
    assert_eq!(next.seq, 3);
    assert_eq!(entry(&next.line).prev, last.hash);
    drop(log);
    let report = verify(&path, None).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.entries, 3);
    assert_eq!(report.key_source, KeySource::Genesis);
}

#[test]
fn a_torn_last_line_is_cut_on_open_and_the_repair_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let kept = {
        let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
        log.append(job_decided("j-1")).unwrap()
    };
    // The process died mid-write: half a line, no newline.
    let torn = r#"{"seq":3,"time_ms":1767225600000,"agent_id":"clinic-7","event":"job.sta"#;
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(torn.as_bytes());
    fs::write(&path, &bytes).unwrap();
    let before = verify(&path, None).unwrap();
    assert_eq!(
        before.first_problem.as_ref().map(|p| (p.line, p.kind)),
        Some((3, outpost_audit::ProblemKind::TruncatedLine)),
        "{before}"
    );

    let log = AuditLog::open(&path, "clinic-7", key()).unwrap();
    assert_eq!(log.last_seq(), 3);
    let lines = lines(&path);
    assert_eq!(lines.len(), 3, "{lines:?}");
    let repaired = entry(&lines[2]);
    assert_eq!(repaired.event, "audit.repaired");
    assert_eq!(repaired.prev, kept.hash);
    let detail = repaired.detail.unwrap_or_default();
    assert!(
        detail.contains(&format!("cut {} bytes", torn.len())),
        "{detail}"
    );
    let report = verify(&path, None).unwrap();
    assert!(report.is_ok(), "{report}");
}

#[test]
fn a_torn_genesis_is_replaced_and_the_repair_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    fs::write(&path, br#"{"seq":1,"time_ms":17"#).unwrap();
    let log = AuditLog::open(&path, "clinic-7", key()).unwrap();
    assert_eq!(log.last_seq(), 2);
    let lines = lines(&path);
    assert_eq!(entry(&lines[0]).event, "log.opened");
    assert_eq!(entry(&lines[1]).event, "audit.repaired");
    assert!(verify(&path, None).unwrap().is_ok());
}

#[test]
fn opening_with_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    drop(AuditLog::open(&path, "clinic-7", key()).unwrap());
    let other = SigningKey::from_bytes(&[9u8; 32]);
    let result = AuditLog::open(&path, "clinic-7", other);
    assert!(
        matches!(result, Err(AuditError::KeyMismatch { .. })),
        "{result:?}"
    );
}

#[test]
fn opening_as_another_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    drop(AuditLog::open(&path, "clinic-7", key()).unwrap());
    let result = AuditLog::open(&path, "clinic-8", key());
    assert!(
        matches!(result, Err(AuditError::AgentMismatch { .. })),
        "{result:?}"
    );
}

#[test]
fn opening_a_log_whose_last_entry_was_edited_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
        log.append(job_decided("j-1")).unwrap();
    }
    let text = fs::read_to_string(&path).unwrap().replace("j-1", "j-9");
    fs::write(&path, text).unwrap();
    let result = AuditLog::open(&path, "clinic-7", key());
    match result {
        Err(AuditError::Corrupt { reason, .. }) => {
            assert!(reason.contains("signature"), "{reason}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn log_lines_skip_an_unfinished_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    {
        let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
        log.append(job_decided("j-1")).unwrap();
    }
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"seq\":3");
    fs::write(&path, &bytes).unwrap();
    assert_eq!(lines(&path).len(), 2);
}
