//! The hub's `Mirror` fed real lines from real logs: in order, with gaps, forks and
//! tampering.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ed25519_dalek::SigningKey;
use outpost_audit::{
    events, Accepted, AuditEntry, AuditLog, LogLines, Mirror, MirrorProblem, ProblemKind,
};
use tempfile::TempDir;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

/// A log of `n` entries whose jobs are named `{name}-{i}`, so two logs never coincide.
fn write_log(dir: &TempDir, name: &str, n: u64) -> Vec<String> {
    let path = dir.path().join(name);
    let mut log = AuditLog::open(&path, "clinic-7", key()).unwrap();
    for i in 2..=n {
        log.append(AuditEntry {
            job_id: Some(format!("{name}-{i}")),
            ..AuditEntry::new(events::JOB_STARTED)
        })
        .unwrap();
    }
    lines(&path)
}

fn lines(path: &Path) -> Vec<String> {
    LogLines::open(path).unwrap().map(Result::unwrap).collect()
}

fn mirror_of(lines: &[String]) -> Mirror {
    let mut mirror = Mirror::new(key().verifying_key());
    for line in lines {
        mirror.accept(line).unwrap();
    }
    mirror
}

#[test]
fn mirror_accepts_a_whole_log_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write_log(&dir, "a.jsonl", 5);
    let mut mirror = Mirror::new(key().verifying_key()).expect_agent("clinic-7");
    for (i, line) in lines.iter().enumerate() {
        let accepted = mirror.accept(&format!("{line}\n")).unwrap();
        assert!(
            matches!(accepted, Accepted::Appended { seq, .. } if seq == i as u64 + 1),
            "{accepted:?}"
        );
    }
    assert_eq!(mirror.last_seq(), 5);
    assert_eq!(
        mirror.last_hash(),
        outpost_audit::line_hash(lines[4].as_bytes())
    );
}

#[test]
fn mirror_flags_a_gap_and_takes_the_missing_entries_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write_log(&dir, "a.jsonl", 6);
    let mut mirror = mirror_of(&lines[..2]);
    let problem = mirror.accept(&lines[4]).unwrap_err();
    assert_eq!(
        problem,
        MirrorProblem::Gap {
            expected: 3,
            received: 5
        }
    );
    assert_eq!(
        problem.to_string(),
        "gap: expected seq 3, received seq 5 (seqs 3 to 4 missing)"
    );
    assert_eq!(mirror.last_seq(), 2, "a refused line changes nothing");
    for line in &lines[2..] {
        mirror.accept(line).unwrap();
    }
    assert_eq!(mirror.last_seq(), 6);
}

#[test]
fn mirror_flags_a_fork_at_the_same_seq() {
    let dir = tempfile::tempdir().unwrap();
    let ours = write_log(&dir, "a.jsonl", 4);
    let rewritten = write_log(&dir, "b.jsonl", 4);
    let mut mirror = mirror_of(&ours);
    let problem = mirror.accept(&rewritten[3]).unwrap_err();
    assert!(
        matches!(&problem, MirrorProblem::Fork { seq: 4, held, received }
            if *held == outpost_audit::line_hash(ours[3].as_bytes()) && held != received),
        "{problem:?}"
    );
    assert!(
        problem.to_string().starts_with("fork at seq 4"),
        "{problem}"
    );
}

#[test]
fn mirror_flags_a_rewritten_earlier_entry_as_a_broken_chain() {
    let dir = tempfile::tempdir().unwrap();
    let ours = write_log(&dir, "a.jsonl", 4);
    let rewritten = write_log(&dir, "b.jsonl", 4);
    let mut mirror = mirror_of(&ours[..3]);
    let problem = mirror.accept(&rewritten[3]).unwrap_err();
    assert_eq!(problem, MirrorProblem::BrokenChain { seq: 4 });
}

#[test]
fn mirror_takes_a_resent_last_entry_as_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write_log(&dir, "a.jsonl", 3);
    let mut mirror = mirror_of(&lines);
    assert_eq!(
        mirror.accept(&lines[2]).unwrap(),
        Accepted::Duplicate { seq: 3 }
    );
    assert_eq!(
        mirror.accept(&lines[0]).unwrap_err(),
        MirrorProblem::Stale {
            seq: 1,
            last_seq: 3
        }
    );
}

#[test]
fn mirror_flags_a_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write_log(&dir, "a.jsonl", 3);
    let mut mirror = mirror_of(&lines[..2]);
    let edited = lines[2].replace("a.jsonl-3", "a.jsonl-9");
    assert_eq!(
        mirror.accept(&edited).unwrap_err(),
        MirrorProblem::BadSignature { seq: 3 }
    );
    let mut stranger = Mirror::new(SigningKey::from_bytes(&[1u8; 32]).verifying_key());
    assert_eq!(
        stranger.accept(&lines[0]).unwrap_err(),
        MirrorProblem::BadSignature { seq: 1 }
    );
}

#[test]
fn mirror_flags_a_malformed_line() {
    let mut mirror = Mirror::new(key().verifying_key());
    let problem = mirror.accept("{\"seq\":1,").unwrap_err();
    assert!(
        matches!(
            problem,
            MirrorProblem::Malformed {
                kind: ProblemKind::TruncatedLine,
                ..
            }
        ),
        "{problem:?}"
    );
}

#[test]
fn mirror_flags_another_agent() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write_log(&dir, "a.jsonl", 2);
    let mut mirror = Mirror::new(key().verifying_key()).expect_agent("clinic-8");
    let problem = mirror.accept(&lines[0]).unwrap_err();
    assert!(
        matches!(problem, MirrorProblem::WrongAgent { seq: 1, .. }),
        "{problem:?}"
    );
}

#[test]
fn a_resumed_mirror_continues_from_the_stored_hash() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write_log(&dir, "a.jsonl", 5);
    let hash = outpost_audit::line_hash(lines[2].as_bytes());
    let mut mirror = Mirror::resume(key().verifying_key(), 3, &hash);
    assert!(matches!(
        mirror.accept(&lines[3]).unwrap(),
        Accepted::Appended { seq: 4, .. }
    ));
    let mut wrong = Mirror::resume(key().verifying_key(), 3, &"ab".repeat(32));
    assert_eq!(
        wrong.accept(&lines[3]).unwrap_err(),
        MirrorProblem::BrokenChain { seq: 4 }
    );
}
