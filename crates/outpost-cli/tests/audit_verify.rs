//! `outpost audit verify` on a real audit log: intact, then edited, reordered and cut.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use ed25519_dalek::SigningKey;
use outpost_audit::{AuditEntry, AuditLog};

fn verify(file: &Path, pubkey: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outpost"));
    command.args(["audit", "verify"]).arg(file);
    if let Some(key) = pubkey {
        command.args(["--pubkey", key]);
    }
    command.output().expect("running outpost audit verify")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn write_log(path: &Path, key: &SigningKey) {
    let mut log = AuditLog::open(path, "agt_clinic", key.clone()).unwrap();
    for n in 0..5 {
        let mut entry = AuditEntry::new("job.requested");
        entry.staff = Some("alice@vendor".into());
        entry.job_id = Some(format!("job-{n}"));
        entry.capability = Some("health".into());
        log.append(entry).unwrap();
    }
}

#[test]
fn verify_accepts_an_intact_log_and_names_the_first_bad_entry_of_a_tampered_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let pubkey = hex::encode(key.verifying_key().to_bytes());
    let path = dir.path().join("audit.log");
    write_log(&path, &key);

    let intact = verify(&path, Some(&pubkey));
    assert!(intact.status.success(), "{}", text(&intact));
    assert!(text(&intact).contains("6 entries"), "{}", text(&intact));

    let other_key = hex::encode(
        SigningKey::from_bytes(&[9u8; 32])
            .verifying_key()
            .to_bytes(),
    );
    let wrong_key = verify(&path, Some(&other_key));
    assert!(!wrong_key.status.success(), "{}", text(&wrong_key));
    assert!(text(&wrong_key).contains("line 1"), "{}", text(&wrong_key));

    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();

    let swapped = dir.path().join("swapped.log");
    let mut reordered = lines.clone();
    reordered.swap(2, 3);
    std::fs::write(&swapped, reordered.join("\n") + "\n").unwrap();
    let out = verify(&swapped, Some(&pubkey));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("line 3"),
        "swap of lines 3 and 4 not named at line 3:\n{}",
        text(&out)
    );

    let edited = dir.path().join("edited.log");
    std::fs::write(&edited, original.replacen("job-2", "job-9", 1)).unwrap();
    let out = verify(&edited, Some(&pubkey));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("line 4"),
        "edit of line 4 not named:\n{}",
        text(&out)
    );

    let removed = dir.path().join("removed.log");
    let mut fewer = lines.clone();
    fewer.remove(1);
    std::fs::write(&removed, fewer.join("\n") + "\n").unwrap();
    let out = verify(&removed, Some(&pubkey));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("line 2"),
        "removal of line 2 not named:\n{}",
        text(&out)
    );

    let cut = dir.path().join("cut.log");
    let mut truncated = lines.clone();
    let half = &lines[2][..lines[2].len() / 2];
    truncated[2] = half;
    std::fs::write(&cut, truncated.join("\n") + "\n").unwrap();
    let out = verify(&cut, Some(&pubkey));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("line 3"),
        "truncation in line 3 not named:\n{}",
        text(&out)
    );
}
