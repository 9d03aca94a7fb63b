//! The crate layering ARCHITECTURE.md promises, checked on the real dependency graph:
//! protocol crates know nothing of the queue, agent, uplink or hub, and agent and hub never
//! import each other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn normal_dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        output.status.success(),
        "cargo tree -p {package} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .filter(|name| name != package)
        .collect()
}

fn assert_none_of(package: &str, forbidden: &[&str]) {
    let dependencies = normal_dependencies(package);
    let found: Vec<&String> = dependencies
        .iter()
        .filter(|d| forbidden.contains(&d.as_str()))
        .collect();
    assert!(found.is_empty(), "{package} must not depend on {found:?}");
}

#[test]
fn protocol_crates_know_nothing_of_queue_agent_uplink_or_hub() {
    let upper = [
        "outpost-queue",
        "outpost-agent",
        "outpost-uplink",
        "outpost-hub",
        "outpost-proto",
    ];
    for protocol in [
        "outpost-hl7",
        "outpost-mllp",
        "outpost-core",
        "outpost-dicom",
        "outpost-sql",
    ] {
        assert_none_of(protocol, &upper);
    }
    assert_none_of("outpost-mllp", &["outpost-hl7"]);
}

#[test]
fn audit_and_policy_stand_alone() {
    let every_outpost_crate = [
        "outpost-core",
        "outpost-hl7",
        "outpost-mllp",
        "outpost-queue",
        "outpost-agent",
        "outpost-uplink",
        "outpost-hub",
        "outpost-proto",
        "outpost-audit",
        "outpost-policy",
    ];
    // The hub verifies mirrored audit logs with the same crate the agent writes them with.
    assert_none_of("outpost-audit", &every_outpost_crate);
    // The policy knows nothing that could carry it to or from the hub.
    assert_none_of("outpost-policy", &every_outpost_crate);
}

#[test]
fn agent_and_hub_never_import_each_other() {
    assert_none_of("outpost-agent", &["outpost-hub"]);
    assert_none_of(
        "outpost-hub",
        &["outpost-agent", "outpost-queue", "outpost-uplink"],
    );
    assert_none_of(
        "outpost-uplink",
        &["outpost-hub", "outpost-agent", "outpost-queue"],
    );
    assert_none_of(
        "outpost-proto",
        &[
            "outpost-hub",
            "outpost-agent",
            "outpost-queue",
            "outpost-uplink",
        ],
    );
}
