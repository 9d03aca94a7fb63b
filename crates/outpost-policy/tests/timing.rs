//! Not a timed test: prints how long `decide` takes, for the closing note. Run with
//! `cargo test --release -p outpost-policy --test timing -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::time::Instant;

use common::{example, parse, ts};
use outpost_policy::{Policy, Request};
use serde_json::{json, Value};

fn ns_per_decide(policy: &Policy, capability: &str, args: &Value, iterations: u32) -> f64 {
    let request = Request {
        capability,
        args,
        now: ts("2025-01-08T12:00:00Z"),
    };
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(policy.decide(black_box(&request)));
    }
    start.elapsed().as_nanos() as f64 / f64::from(iterations)
}

#[test]
#[ignore = "prints timings; run by hand"]
fn print_ns_per_decide() {
    let policy = example();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("reports")).unwrap();
    std::fs::write(dir.path().join("reports/a.csv"), "x").unwrap();
    let files = parse(&format!(
        "[allow]\n\"files.read\" = {{ roots = [{:?}] }}\n",
        dir.path().display().to_string()
    ));
    let cases: [(&str, &Policy, &str, Value, u32); 6] = [
        ("health (allowed)", &policy, "health", json!({}), 1_000_000),
        (
            "policy.write (unknown)",
            &policy,
            "policy.write",
            json!({}),
            1_000_000,
        ),
        (
            "update.apply (window, refused)",
            &policy,
            "update.apply",
            json!({}),
            200_000,
        ),
        (
            "sql.query (awaiting approval)",
            &policy,
            "sql.query",
            json!({"table": "patient", "columns": ["PatNum", "LName", "FName"], "limit": 100}),
            200_000,
        ),
        (
            "files.read (path resolution, IO)",
            &files,
            "files.read",
            json!({"path": "reports/a.csv"}),
            20_000,
        ),
        (
            "files.read (`..`, refused)",
            &files,
            "files.read",
            json!({"path": "../x"}),
            200_000,
        ),
    ];
    for (label, policy, capability, args, iterations) in cases {
        let ns = ns_per_decide(policy, capability, &args, iterations);
        println!("decide {label}: {ns:.0} ns");
    }
}
