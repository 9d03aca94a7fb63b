//! The README's first command: `outpost demo --for …` runs a hub and an enrolled agent on
//! loopback, pushes its first sample messages through (it sends more every 3 s; 2 s is
//! shorter, so exactly the first batch goes: three messages and a malformed one, and two
//! appointments booked in the demo practice's SQLite database, captured as change events),
//! reports where each went, and ends by itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn the_demo_delivers_its_samples_to_the_hub_and_the_lab_and_stops_by_itself() {
    let output = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["demo", "--for", "2s"])
        .output()
        .expect("running outpost demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    for expected in [
        "dashboard  https://127.0.0.1:",
        "API key    opk_",
        "sender got AA for DEMO",
        "sender got AE for (no control id): malformed HL7 message",
        "hub stored 5",
        "lab received 3",
        "agent sink vendor   delivered 5  pending 0  dead letters 0",
        "agent sink lab-out  delivered 3  pending 0  dead letters 0",
        "agent sink events   delivered 2  pending 0  dead letters 0",
        "refused at intake and kept for inspection: 1",
        "practice database: 2 change event(s)",
        r#""table":"appointment""#,
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}\n{stderr}"
        );
    }
}
