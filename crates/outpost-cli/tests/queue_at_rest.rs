//! What a copy of the queue files gives away: no patient data without the key file, which
//! only its owner can read.

use outpost_hl7::AckCode;
use outpost_testkit::{ack_of, free_port, one_route_config, send_each, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

#[test]
fn the_queue_file_copied_elsewhere_does_not_contain_the_message_text() {
    // The downstream is absent, so every message stays queued.
    let agent = Agent::start(
        BIN,
        &one_route_config(
            free_port(),
            free_port(),
            "",
            "retry_initial_ms = 50\nretry_max_secs = 1",
            "",
        ),
    );
    let secrets = [
        "ZYGMUNTOWICZ",
        "QUENTRELLA",
        "MRNX880417ZQ",
        "4417 BRIARWOOD HOLLOW",
        "555-0199-7713",
        "19730228",
    ];
    let messages: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            format!(
                "MSH|^~\\&|PMS|SMITHPEDS|OUTPOST|SMITHPEDS|20261123101600||ADT^A08^ADT_A01|SECRET{i}|P|2.5.1\r\
EVN|A08|20261123101600\r\
PID|1||MRNX880417ZQ^^^SMITHPEDS^MR||ZYGMUNTOWICZ^QUENTRELLA^B||19730228|F|||4417 BRIARWOOD HOLLOW^^SPRINGFIELD^IL^62704||555-0199-7713\r\
PV1|1|O|PEDS^^^SMITHPEDS||||1234^WELBY^MARCUS"
            )
            .into_bytes()
        })
        .collect();
    for reply in send_each(agent.port(), &messages) {
        assert_eq!(ack_of(&reply).code, AckCode::AA);
    }
    // A refused message is kept for inspection: it must be sealed too.
    let refused = send_each(
        agent.port(),
        &[b"PID|1||MRNX880417ZQ^^^SMITHPEDS^MR||ZYGMUNTOWICZ^QUENTRELLA^B||19730228|F".to_vec()],
    );
    assert_eq!(ack_of(&refused[0]).code, AckCode::AE);
    // They are stored (and readable with the key).
    let found = agent.search(&["--rejected", "--text", "zygmuntowicz"]);
    assert_eq!(
        found.lines().filter(|l| l.starts_with("item ")).count(),
        4,
        "hl7 search should find all four:\n{found}"
    );

    let copy = tempfile::tempdir().expect("temporary folder");
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(agent.data_dir()).expect("list the data folder") {
        let path = entry.expect("folder entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("queue.db") {
            std::fs::copy(&path, copy.path().join(&name)).expect("copy a queue file");
            copied.push(name);
        }
    }
    assert!(
        copied.iter().any(|n| n == "queue.db"),
        "no queue.db in {}: {copied:?}",
        agent.data_dir().display()
    );
    let mut leaks = Vec::new();
    for name in &copied {
        let bytes = std::fs::read(copy.path().join(name)).expect("read the copy");
        for secret in secrets {
            if bytes
                .windows(secret.len())
                .any(|w| w.eq_ignore_ascii_case(secret.as_bytes()))
            {
                leaks.push(format!("{secret:?} in {name} ({} bytes)", bytes.len()));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "patient data readable in the copied queue files: {leaks:?}"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = agent.data_dir().join("queue.key");
        let mode = std::fs::metadata(&key)
            .expect("the key file exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
    }
}
