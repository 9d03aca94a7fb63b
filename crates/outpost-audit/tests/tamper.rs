//! `verify` on damaged logs: each kind of tampering is named at the right line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use outpost_audit::{
    events, verify, AuditEntry, AuditLog, KeySource, Problem, ProblemKind, VerifyReport,
};
use tempfile::TempDir;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

/// A sound log of `n` entries (the genesis plus `n - 1` jobs) for `agent`.
fn write_log(dir: &TempDir, name: &str, agent: &str, n: u64) -> PathBuf {
    let path = dir.path().join(name);
    let mut log = AuditLog::open(&path, agent, key()).unwrap();
    for i in 2..=n {
        log.append(AuditEntry {
            staff: Some("alice@vendor".into()),
            job_id: Some(format!("job-{i}")),
            capability: Some("files.read".into()),
            ..AuditEntry::new(events::JOB_REQUESTED)
        })
        .unwrap();
    }
    path
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn first_problem(path: &Path) -> (VerifyReport, Problem) {
    let report = verify(path, None).unwrap();
    let problem = report
        .first_problem
        .clone()
        .unwrap_or_else(|| panic!("expected a problem, got {report}"));
    (report, problem)
}

#[test]
fn a_sound_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let report = verify(&path, None).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.entries, 6);
    assert!(report.to_string().starts_with("ok: 6 entries"), "{report}");
}

#[test]
fn verify_reports_the_edited_entry_not_the_one_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let mut lines = read_lines(&path);
    lines[3] = lines[3].replace("job-4", "job-X");
    write_lines(&path, &lines);
    let (report, problem) = first_problem(&path);
    assert_eq!((problem.line, problem.seq), (4, Some(4)), "{problem}");
    assert_eq!(problem.kind, ProblemKind::BadSignature);
    assert!(
        problem.message.contains("signature does not verify"),
        "{problem}"
    );
    assert_eq!(report.entries, 3);
}

#[test]
fn an_edit_that_breaks_the_json_is_reported_at_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let mut lines = read_lines(&path);
    lines[2] = lines[2].replacen("\"seq\":3,", "\"seq\":3;", 1);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (3, ProblemKind::NotJson),
        "{problem}"
    );
    assert!(
        problem.to_string().starts_with("line 3: not JSON"),
        "{problem}"
    );
}

#[test]
fn verify_reports_a_removed_entry_as_a_gap_at_the_following_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let mut lines = read_lines(&path);
    lines.remove(2);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!((problem.line, problem.seq), (3, Some(4)), "{problem}");
    assert_eq!(problem.kind, ProblemKind::SeqGap);
    assert_eq!(
        problem.to_string(),
        "line 3 (seq 4): expected seq 3: entry 3 is missing (removed)"
    );
}

#[test]
fn verify_reports_several_removed_entries_as_one_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 8);
    let mut lines = read_lines(&path);
    lines.drain(2..5);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (3, ProblemKind::SeqGap),
        "{problem}"
    );
    assert!(
        problem.message.contains("entries 3 to 5 are missing"),
        "{problem}"
    );
}

#[test]
fn verify_reports_a_removed_genesis_as_a_gap_at_line_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 4);
    let mut lines = read_lines(&path);
    lines.remove(0);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (1, ProblemKind::SeqGap),
        "{problem}"
    );
}

#[test]
fn verify_reports_the_first_reordered_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let mut lines = read_lines(&path);
    lines.swap(2, 3);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!((problem.line, problem.seq), (3, Some(4)), "{problem}");
    assert_eq!(problem.kind, ProblemKind::SeqOutOfOrder);
    assert_eq!(
        problem.to_string(),
        "line 3 (seq 4): expected seq 3, which comes later at line 4: entries were reordered"
    );
}

#[test]
fn verify_reports_a_distant_swap_as_a_reorder() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 8);
    let mut lines = read_lines(&path);
    lines.swap(2, 6);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (3, ProblemKind::SeqOutOfOrder),
        "{problem}"
    );
    assert!(
        problem.message.contains("comes later at line 7"),
        "{problem}"
    );
}

#[test]
fn verify_reports_a_repeated_entry_as_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 5);
    let mut lines = read_lines(&path);
    let copy = lines[2].clone();
    lines.insert(3, copy);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (4, ProblemKind::SeqOutOfOrder),
        "{problem}"
    );
}

#[test]
fn verify_reports_a_line_cut_short_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let mut lines = read_lines(&path);
    let half = lines[3].len() / 2;
    lines[3].truncate(half);
    write_lines(&path, &lines);
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (4, ProblemKind::TruncatedLine),
        "{problem}"
    );
    assert!(problem.message.contains("cut short"), "{problem}");
}

#[test]
fn verify_reports_bytes_cut_out_across_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 6);
    let bytes = fs::read(&path).unwrap();
    let line_3_start = read_lines(&path)[..2]
        .iter()
        .map(|l| l.len() + 1)
        .sum::<usize>();
    // Cut from the middle of line 3 to the middle of line 4: the two halves join, and as
    // the lines look alike the result may even be JSON; either way line 3 is named.
    let mut damaged = bytes[..line_3_start + 50].to_vec();
    let line_4_start = line_3_start + read_lines(&path)[2].len() + 1;
    damaged.extend_from_slice(&bytes[line_4_start + 50..]);
    fs::write(&path, damaged).unwrap();
    let (_, problem) = first_problem(&path);
    assert_eq!(problem.line, 3, "{problem}");
    assert!(
        matches!(
            problem.kind,
            ProblemKind::NotJson
                | ProblemKind::TruncatedLine
                | ProblemKind::BadEntry
                | ProblemKind::BadSignature
        ),
        "{problem}"
    );
}

#[test]
fn verify_reports_a_file_cut_mid_line_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 4);
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
    let (report, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (4, ProblemKind::TruncatedLine),
        "{problem}"
    );
    assert!(problem.message.contains("without a newline"), "{problem}");
    assert_eq!(report.entries, 3);
}

#[test]
fn verify_reports_an_entry_from_another_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ours = write_log(&dir, "ours.jsonl", "clinic-7", 5);
    let theirs = write_log(&dir, "theirs.jsonl", "clinic-8", 5);
    let mut lines = read_lines(&ours);
    lines[3] = read_lines(&theirs)[3].clone();
    write_lines(&ours, &lines);
    let (_, problem) = first_problem(&ours);
    assert_eq!(
        (problem.line, problem.kind),
        (4, ProblemKind::WrongAgent),
        "{problem}"
    );
    assert!(
        problem
            .message
            .contains("\"clinic-8\" differs from the log's agent \"clinic-7\""),
        "{problem}"
    );
}

#[test]
fn verify_reports_a_validly_signed_entry_from_another_chain_as_a_broken_link() {
    let dir = tempfile::tempdir().unwrap();
    let ours = write_log(&dir, "ours.jsonl", "clinic-7", 5);
    // Another log of the same agent and key (say a restored backup) whose entry 2 differs:
    // its entry 3 is validly signed but links to a line 2 this log does not have.
    let other = dir.path().join("other.jsonl");
    let mut log = AuditLog::open(&other, "clinic-7", key()).unwrap();
    for job in ["other-2", "other-3"] {
        log.append(AuditEntry {
            job_id: Some(job.into()),
            ..AuditEntry::new(events::JOB_REQUESTED)
        })
        .unwrap();
    }
    drop(log);
    let mut lines = read_lines(&ours);
    lines[2] = read_lines(&other)[2].clone();
    write_lines(&ours, &lines);
    let (_, problem) = first_problem(&ours);
    assert_eq!(problem.kind, ProblemKind::BrokenChain, "{problem}");
    assert_eq!(
        problem.to_string(),
        "line 3 (seq 3): previous-hash does not match line 2: an entry before it was edited, removed or reordered"
    );
}

#[test]
fn verify_with_the_wrong_public_key_says_signature() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 3);
    let wrong = SigningKey::from_bytes(&[1u8; 32]).verifying_key();
    let report = verify(&path, Some(&wrong)).unwrap();
    assert_eq!(report.key_source, KeySource::Given);
    let problem = report.first_problem.expect("a wrong key must not verify");
    assert_eq!((problem.line, problem.kind), (1, ProblemKind::BadSignature));
    assert!(
        problem
            .message
            .contains("signature does not verify with the given public key"),
        "{problem}"
    );
    assert!(
        problem
            .message
            .contains(&hex::encode(key().verifying_key().as_bytes())),
        "message names the key the log records: {problem}"
    );
}

#[test]
fn verify_with_the_right_public_key_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 3);
    let report = verify(&path, Some(&key().verifying_key())).unwrap();
    assert!(report.is_ok(), "{report}");
    assert!(
        report.to_string().contains("the given public key"),
        "{report}"
    );
}

#[test]
fn verify_refuses_an_overlong_line_without_reading_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(&dir, "audit.jsonl", "clinic-7", 3);
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&vec![b'x'; 2 * 1024 * 1024]);
    bytes.push(b'\n');
    fs::write(&path, bytes).unwrap();
    let (_, problem) = first_problem(&path);
    assert_eq!(
        (problem.line, problem.kind),
        (4, ProblemKind::LineTooLong),
        "{problem}"
    );
}

#[test]
fn verify_of_a_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let result = verify(&dir.path().join("nope.jsonl"), None);
    assert!(result.is_err());
}
