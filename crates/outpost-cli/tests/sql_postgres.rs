#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `outpost agent` capturing a real PostgreSQL 15 with the issue's minimal config
//! (`kind = "sql"` source, `kind = "jsonl"` sink): the snapshot and then the changes land in
//! the file in commit order; killed with -9 mid-stream and restarted, no change is missing.
//! Skipped, with a `SKIPPED` line, when `OUTPOST_PEERS=skip`.

use std::collections::HashSet;
use std::time::Duration;

use outpost_testkit::jsonl::{brief, read_events, wait_for_count, wait_for_events};
use outpost_testkit::{skip_postgres_tests, wait_until_explained, Agent, PgDatabase};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

const SCHEMA: &str = "
CREATE TABLE patient (patnum bigint PRIMARY KEY, lname text NOT NULL, fname text,
                      birthdate date, balance numeric(12,2));
CREATE TABLE appointment (aptnum int PRIMARY KEY, patnum bigint NOT NULL,
                          start_at timestamptz, note text);
INSERT INTO patient VALUES (1, 'Müller', 'Zoë', '1980-02-29', 12.50),
                           (2, '山田', NULL, NULL, NULL), (3, 'O''Brien', 'Seán', NULL, 0);
INSERT INTO appointment VALUES (1, 1, '2024-06-01 09:00:00+00', 'checkup'), (2, 2, NULL, NULL);
";

/// The issue's minimal config, with the test database's URL.
fn minimal_config(url: &str) -> String {
    format!(
        r#"data_dir = "./outpost-data"
[[source]]
name = "pms"
kind = "sql"
url = "{url}"
mode = "cdc"
tables = [ {{ name = "patient", key = ["patnum"] }},
           {{ name = "appointment", key = ["aptnum"] }} ]
[[sink]]
name = "events"
kind = "jsonl"
path = "./events.jsonl"
[[route]]
from = "pms"
to = ["events"]
"#
    )
}

#[test]
fn postgres_changes_reach_the_jsonl_file_in_order_across_kill_9() {
    if skip_postgres_tests("postgres_changes_reach_the_jsonl_file_in_order_across_kill_9") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    let mut agent = Agent::start(BIN, &minimal_config(&db.url()));
    let file = agent.dir().join("events.jsonl");

    let snapshot = wait_for_count(&agent, &file, 5, "the snapshot is in the file");
    let got: Vec<_> = snapshot.iter().map(brief).collect();
    assert_eq!(
        got,
        vec![
            ("patient".into(), "snapshot".into(), json!({"patnum": 1})),
            ("patient".into(), "snapshot".into(), json!({"patnum": 2})),
            ("patient".into(), "snapshot".into(), json!({"patnum": 3})),
            (
                "appointment".into(),
                "snapshot".into(),
                json!({"aptnum": 1})
            ),
            (
                "appointment".into(),
                "snapshot".into(),
                json!({"aptnum": 2})
            ),
        ]
    );
    assert_eq!(snapshot[0]["source"], json!("pms"));
    assert_eq!(snapshot[0]["after"]["lname"], json!("Müller"));
    assert_eq!(snapshot[0]["after"]["balance"], json!("12.50"));
    assert_eq!(snapshot[0]["after"]["birthdate"], json!("1980-02-29"));

    db.psql(
        "BEGIN;
         INSERT INTO patient VALUES (4, 'Nguyễn', NULL, NULL, 1.10);
         UPDATE appointment SET note = 'moved', start_at = '2024-06-03 08:00:00+00' WHERE aptnum = 1;
         COMMIT;
         DELETE FROM appointment WHERE aptnum = 2;",
    );
    let all = wait_for_count(&agent, &file, 8, "the first changes are in the file");
    let got: Vec<_> = all[5..].iter().map(brief).collect();
    assert_eq!(
        got,
        vec![
            ("patient".into(), "insert".into(), json!({"patnum": 4})),
            ("appointment".into(), "update".into(), json!({"aptnum": 1})),
            ("appointment".into(), "delete".into(), json!({"aptnum": 2})),
        ]
    );
    assert_eq!(all[6]["after"]["start_at"], json!("2024-06-03T08:00:00Z"));
    assert_eq!(all[6]["before"], json!({"aptnum": 1}));
    assert_eq!(all[7]["after"], Value::Null);
    assert_eq!(all[5]["tx"], all[6]["tx"]);
    assert!(all[5]["commit_time"].as_str().is_some());
    let log = agent.log();
    assert!(
        !log.contains("not-checked-pw"),
        "the password reached the log"
    );

    // Mid-stream: transactions keep committing while the agent is killed and restarted.
    const WRITES: i32 = 40;
    let sqls: Vec<String> = (0..WRITES)
        .map(|i| {
            format!(
                "INSERT INTO appointment VALUES ({}, 1, NULL, 'stream {i}')",
                100 + i
            )
        })
        .collect();
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            for sql in &sqls {
                db.psql(sql);
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        wait_for_count(&agent, &file, 8 + 5, "some stream events before the kill");
        agent.kill9();
        std::thread::sleep(Duration::from_millis(300));
        agent.restart();
        handle.join().unwrap();
    });
    let expected: Vec<i64> = (0..WRITES as i64).map(|i| 100 + i).collect();
    let all = wait_until_explained(
        Duration::from_secs(60),
        "every streamed insert is in the file after the restart",
        || {
            let all = read_events(&file);
            let seen: HashSet<i64> = all
                .iter()
                .filter(|e| e["op"] == "insert" && e["table"] == "appointment")
                .filter_map(|e| e["key"]["aptnum"].as_i64())
                .collect();
            let missing: Vec<&i64> = expected.iter().filter(|k| !seen.contains(k)).collect();
            if missing.is_empty() {
                Ok(all)
            } else {
                Err(format!("missing {missing:?}"))
            }
        },
        || format!("agent log tail:\n{}", agent.log_tail(30)),
    );
    // Commit order: the first time each insert appears, they appear in the order written.
    let mut first_seen = Vec::new();
    for event in &all[8..] {
        if let Some(key) = event["key"]["aptnum"].as_i64() {
            if !first_seen.contains(&key) {
                first_seen.push(key);
            }
        }
    }
    assert_eq!(first_seen, expected, "stream events out of commit order");
    let repeats = all[8..].len() - first_seen.len();
    eprintln!("{repeats} repeated lines after kill -9 (at least once delivery to the file)");
    // Nothing is delivered twice from the queue: repeats can only be lines written but not
    // yet recorded as delivered when the agent was killed (one batch at most).
    assert!(repeats <= WRITES as usize, "{repeats} repeats");
}

/// Patients in the kill-9 snapshot test: enough chunks that the kill lands mid-snapshot.
const SNAPSHOT_PATIENTS: i64 = 100_000;
const SNAPSHOT_CHUNK: usize = 100;

#[test]
fn a_snapshot_killed_with_9_resumes_and_loses_no_row() {
    if skip_postgres_tests("a_snapshot_killed_with_9_resumes_and_loses_no_row") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    db.psql(&format!(
        "INSERT INTO patient (patnum, lname, fname, balance)
             SELECT g, 'Patient ' || g, E'quote '' backslash \\\\ tab \t', g / 100.0
             FROM generate_series(4, {SNAPSHOT_PATIENTS}) g;"
    ));
    let config = minimal_config(&db.url()).replace(
        "mode = \"cdc\"",
        &format!("mode = \"cdc\"\nchunk_rows = {SNAPSHOT_CHUNK}"),
    );
    let mut agent = Agent::start(BIN, &config);
    let file = agent.dir().join("events.jsonl");
    // Killed as soon as the first chunk reaches the file: the snapshot (a thousand
    // chunks, each its own commit) is then well under way and far from done.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&file).map_or(0, |m| m.len()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot chunk in the file after 60 s:\n{}",
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    agent.kill9();
    let at_kill = read_events(&file).len();
    assert!(
        at_kill < SNAPSHOT_PATIENTS as usize,
        "the snapshot finished before the kill ({at_kill} lines): the test proves nothing"
    );
    agent.restart();
    let total = SNAPSHOT_PATIENTS as usize + 2;
    let snapshot_keys = |events: &[Value]| -> HashSet<(String, i64)> {
        events
            .iter()
            .filter(|e| e["op"] == "snapshot")
            .filter_map(|e| {
                let key = e["key"]["patnum"]
                    .as_i64()
                    .or(e["key"]["aptnum"].as_i64())?;
                Some((e["table"].as_str()?.to_owned(), key))
            })
            .collect()
    };
    let all = wait_for_events(
        &agent,
        &file,
        "the whole snapshot is in the file",
        |events| {
            let unique = snapshot_keys(events).len();
            if unique == total {
                Ok(())
            } else {
                Err(format!("{unique} of {total} rows so far"))
            }
        },
    );
    let repeats = all.len() - total;
    eprintln!("snapshot: {at_kill} lines at kill -9, {repeats} repeated after restart");
    // Repeats are only chunks read but not yet queued, or queued and written to the file
    // but not yet recorded as delivered: a few chunks, never the snapshot again.
    assert!(
        repeats <= 20 * SNAPSHOT_CHUNK,
        "{repeats} repeated lines: the snapshot started over"
    );
    let row = all
        .iter()
        .find(|e| e["key"] == json!({"patnum": 4}))
        .unwrap();
    assert_eq!(row["after"]["fname"], json!("quote ' backslash \\ tab \t"));
    assert_eq!(row["after"]["balance"], json!("0.04"));
    assert_eq!(row["before"], Value::Null);
    assert_eq!(row["tx"], Value::Null);
    let first = all
        .iter()
        .find(|e| e["key"] == json!({"patnum": 1}))
        .unwrap();
    assert_eq!(first["after"]["lname"], json!("Müller"));
    assert_eq!(first["after"]["birthdate"], json!("1980-02-29"));
}

#[test]
fn sql_reset_makes_a_running_source_take_a_new_snapshot() {
    if skip_postgres_tests("sql_reset_makes_a_running_source_take_a_new_snapshot") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    let agent = Agent::start(BIN, &minimal_config(&db.url()));
    let file = agent.dir().join("events.jsonl");
    wait_for_count(&agent, &file, 5, "the snapshot is in the file");
    let config = agent.config_path().to_string_lossy().into_owned();

    let unknown = agent.run_cli(&["sql", "reset", "billing", "--config", &config]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(
        stderr.contains("no SQL source or sink named \"billing\""),
        "{stderr}"
    );

    let reset = agent.run_cli(&["sql", "reset", "pms", "--config", &config]);
    let stdout = String::from_utf8_lossy(&reset.stdout);
    assert!(
        reset.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    assert!(
        stdout.contains("source pms: stored position forgotten"),
        "{stdout}"
    );

    // The running source's next batch (a heartbeat at the latest) no longer follows the
    // stored state, so it is refused and the source restarts from nothing: a new snapshot.
    let events = wait_for_count(&agent, &file, 10, "the snapshot is taken again");
    let snapshots: Vec<_> = events
        .iter()
        .filter(|e| e["op"] == "snapshot")
        .map(|e| {
            (
                e["table"].as_str().unwrap().to_owned(),
                e["key"].to_string(),
            )
        })
        .collect();
    assert_eq!(snapshots.len(), 10, "{snapshots:?}");
    assert_eq!(
        snapshots[..5],
        snapshots[5..],
        "the same rows, snapshotted twice"
    );
    assert!(
        agent.log().contains("batch refused"),
        "the refusal is logged: {}",
        agent.log_tail(20)
    );

    // Changes after the new snapshot still arrive.
    db.psql("INSERT INTO patient VALUES (4, 'Nguyễn', 'Anh', NULL, 1.00)");
    let events = wait_for_count(&agent, &file, 11, "an insert after the reset");
    assert_eq!(
        brief(&events[10]),
        ("patient".into(), "insert".into(), json!({"patnum": 4}))
    );
}
