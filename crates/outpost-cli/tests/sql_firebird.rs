#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `outpost` binary against a real Firebird 3: `outpost sql install-triggers`
//! prints and installs the capture, then the agent (the issue's minimal config with a
//! `firebird://` URL) writes the snapshot and the changes to a `jsonl` file in commit
//! order; killed with -9 mid-stream and restarted, no change is missing. Skipped, with a
//! `SKIPPED` line, when `OUTPOST_PEERS=skip`.

use std::collections::HashSet;
use std::time::Duration;

use outpost_testkit::firebird::{skip_firebird_tests, FbDatabase};
use outpost_testkit::jsonl::{brief, read_events, wait_for_count};
use outpost_testkit::{describe_output, wait_until_explained, Agent};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

const SCHEMA: &str = "
CREATE TABLE PATIENT (PATNUM BIGINT NOT NULL PRIMARY KEY, LNAME VARCHAR(80) NOT NULL,
                      FNAME VARCHAR(80), BIRTHDATE DATE, BALANCE NUMERIC(12,2));
CREATE TABLE APPOINTMENT (APTNUM INTEGER NOT NULL PRIMARY KEY, PATNUM BIGINT NOT NULL,
                          START_AT TIMESTAMP, NOTE VARCHAR(200));
COMMIT;
INSERT INTO PATIENT VALUES (1, 'Müller', 'Zoë', '1980-02-29', 12.50);
INSERT INTO PATIENT VALUES (2, '山田', NULL, NULL, NULL);
INSERT INTO PATIENT VALUES (3, 'O''Brien', 'Seán', NULL, 0);
INSERT INTO APPOINTMENT VALUES (1, 1, '2024-06-01 09:00:00', 'checkup');
INSERT INTO APPOINTMENT VALUES (2, 2, NULL, NULL);
COMMIT;
";

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
fn firebird_changes_reach_the_jsonl_file_in_order_across_kill_9() {
    if skip_firebird_tests("firebird_changes_reach_the_jsonl_file_in_order_across_kill_9") {
        return;
    }
    let db = FbDatabase::create();
    db.isql(SCHEMA);
    let mut agent = Agent::prepare(BIN, &minimal_config(&db.url()));
    let config = agent.config_path().to_string_lossy().into_owned();

    // Without the triggers the source refuses to start, naming the command to run.
    let printed = agent.run_cli(&["sql", "install-triggers", "--config", &config, "--print"]);
    assert!(printed.status.success(), "{}", describe_output(&printed));
    let script = String::from_utf8_lossy(&printed.stdout);
    assert!(script.contains("CREATE TABLE OUTPOST_CHANGES"), "{script}");
    assert!(script.contains("\"OUTPOST_T_APPOINTMENT\""), "{script}");
    assert!(!script.contains("masterkey"), "the password was printed");
    assert_eq!(
        db.value("SELECT COUNT(*) FROM RDB$RELATIONS WHERE RDB$RELATION_NAME = 'OUTPOST_CHANGES'"),
        "0",
        "--print changed nothing"
    );
    let installed = agent.run_cli(&["sql", "install-triggers", "--config", &config]);
    assert!(
        installed.status.success(),
        "{}",
        describe_output(&installed)
    );
    assert_eq!(
        db.value("SELECT COUNT(*) FROM RDB$RELATIONS WHERE RDB$RELATION_NAME = 'OUTPOST_CHANGES'"),
        "1"
    );

    agent.launch();
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
    assert_eq!(snapshot[0]["after"]["lname"], json!("Müller"));
    assert_eq!(snapshot[0]["after"]["balance"], json!("12.50"));
    assert_eq!(snapshot[0]["after"]["birthdate"], json!("1980-02-29"));
    assert_eq!(
        snapshot[3]["after"]["start_at"],
        json!("2024-06-01T09:00:00")
    );

    db.isql(
        "INSERT INTO PATIENT VALUES (4, 'Nguyễn', NULL, NULL, 1.10);
         UPDATE APPOINTMENT SET NOTE = 'moved', START_AT = '2024-06-03 08:00:00' WHERE APTNUM = 1;
         COMMIT;
         DELETE FROM APPOINTMENT WHERE APTNUM = 2;
         COMMIT;",
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
    assert_eq!(all[6]["before"]["note"], json!("checkup"));
    assert_eq!(all[6]["after"]["start_at"], json!("2024-06-03T08:00:00"));
    assert_eq!(all[7]["after"], Value::Null);
    assert_eq!(all[5]["tx"], all[6]["tx"]);
    assert_ne!(all[6]["tx"], all[7]["tx"]);
    assert!(
        !agent.log().contains("masterkey"),
        "the password reached the log"
    );

    // Mid-stream: transactions keep committing while the agent is killed and restarted.
    const WRITES: i32 = 30;
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            for i in 0..WRITES {
                db.isql(&format!(
                    "INSERT INTO APPOINTMENT VALUES ({}, 1, NULL, 'stream {i}'); COMMIT;",
                    100 + i
                ));
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
    assert!(repeats <= WRITES as usize, "{repeats} repeats");
    // Everything made durable was trimmed from the change table.
    wait_until_explained(
        Duration::from_secs(30),
        "the change table is trimmed",
        || {
            let left = db.value("SELECT COUNT(*) FROM OUTPOST_CHANGES");
            (left == "0").then_some(()).ok_or(left)
        },
        || agent.log_tail(20),
    );
    agent.terminate();
    agent.wait_exit(Duration::from_secs(20));
}
