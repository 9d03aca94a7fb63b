//! Property: no single-byte change anywhere in a sound log passes `verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use outpost_audit::{events, verify, AuditEntry, AuditLog, Decision};
use proptest::prelude::*;

/// A sound log with every optional field used, built once.
fn sound_log() -> &'static [u8] {
    static LOG: OnceLock<Vec<u8>> = OnceLock::new();
    LOG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log =
            AuditLog::open(&path, "clinic-7", SigningKey::from_bytes(&[42u8; 32])).unwrap();
        log.append(AuditEntry {
            staff: Some("alice@vendor".into()),
            job_id: Some("j-1".into()),
            capability: Some("files.read".into()),
            args_digest: Some("ab".repeat(32)),
            ..AuditEntry::new(events::JOB_REQUESTED)
        })
        .unwrap();
        log.append(AuditEntry {
            job_id: Some("j-1".into()),
            decision: Some(Decision::AwaitingApproval),
            rule: Some("allow.files.read.approval".into()),
            ..AuditEntry::new(events::JOB_DECIDED)
        })
        .unwrap();
        log.append(AuditEntry {
            job_id: Some("j-1".into()),
            approver: Some("it@clinic".into()),
            ..AuditEntry::new(events::JOB_APPROVED)
        })
        .unwrap();
        log.append(AuditEntry {
            job_id: Some("j-1".into()),
            result_summary: Some("3 files, 12 KiB".into()),
            result_digest: Some("cd".repeat(32)),
            detail: Some("quote \" and é".into()),
            ..AuditEntry::new(events::JOB_FINISHED)
        })
        .unwrap();
        drop(log);
        let bytes = fs::read(&path).unwrap();
        assert!(verify(&path, None).unwrap().is_ok());
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_single_byte_change_is_detected(position in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let original = sound_log();
        let at = position.index(original.len());
        prop_assume!(original[at] != byte);
        let mut damaged = original.to_vec();
        damaged[at] = byte;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, &damaged).unwrap();
        let report = verify(&path, None).unwrap();
        prop_assert!(
            report.first_problem.is_some(),
            "byte {at} changed from {:#04x} to {byte:#04x} and verify said: {report}",
            original[at]
        );
    }

    #[test]
    fn any_single_bit_flip_is_detected(position in any::<prop::sample::Index>(), bit in 0u8..8) {
        let original = sound_log();
        let at = position.index(original.len());
        let mut damaged = original.to_vec();
        damaged[at] ^= 1 << bit;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, &damaged).unwrap();
        let key = SigningKey::from_bytes(&[42u8; 32]).verifying_key();
        let report = verify(&path, Some(&key)).unwrap();
        prop_assert!(
            report.first_problem.is_some(),
            "bit {bit} of byte {at} flipped and verify said: {report}"
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_verify(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        fs::write(&path, &bytes).unwrap();
        let report = verify(&path, None).unwrap();
        prop_assert!(report.first_problem.is_some());
    }
}

#[test]
fn every_single_bit_flip_is_detected() {
    let original = sound_log();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    for at in 0..original.len() {
        for bit in 0..8 {
            let mut damaged = original.to_vec();
            damaged[at] ^= 1 << bit;
            fs::write(&path, &damaged).unwrap();
            let report = verify(&path, None).unwrap();
            assert!(
                report.first_problem.is_some(),
                "bit {bit} of byte {at} flipped and verify said: {report}"
            );
        }
    }
}
