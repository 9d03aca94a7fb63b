#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bad input for a PostgreSQL source, against the real `outpost agent`:
//!
//! - a wrong password: a clear error naming the source (and the user), the password nowhere;
//! - the database down at start: the agent keeps retrying and says why, then captures once
//!   it is up; the database going away mid-stream: nothing lost after it returns (each on a
//!   PostgreSQL of the test's own, started with `peers/start-postgres.sh` on another port,
//!   so the shared server is never stopped under other tests);
//! - a table that does not exist: an error naming it, retried until the table is there;
//! - a column dropped mid-stream: one warning naming it, and events go on with the
//!   remaining columns (a dropped *key* column stops the source with an error instead).
//!
//! Skipped, with a `SKIPPED` line, when `OUTPOST_PEERS=skip`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outpost_testkit::jsonl::read_events;
use outpost_testkit::{
    describe_output, free_port, peers_dir, skip_postgres_tests, wait_until_explained,
    workspace_root, Agent, PgDatabase,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// A PostgreSQL 15 of this test's own, under `target/tmp`, stopped on drop.
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnPostgres {
    /// Picks a folder and a port; does not start the server.
    fn new() -> OwnPostgres {
        let parent = workspace_root().join("target").join("tmp");
        std::fs::create_dir_all(&parent).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("outpost-pg-bad-input-")
            .tempdir_in(&parent)
            .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        OwnPostgres {
            dir,
            port: free_port(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn start(&self) {
        let out = Command::new("bash")
            .arg(peers_dir().join("start-postgres.sh"))
            .arg(self.data())
            .env("PG_PORT", self.port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start-postgres.sh: {}",
            describe_output(&out)
        );
    }

    fn stop(&self) {
        let out = Command::new("bash")
            .arg(peers_dir().join("stop-peer.sh"))
            .arg("postgres")
            .arg(self.data())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "stop-peer.sh: {}",
            describe_output(&out)
        );
    }

    fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "peerdb",
                "-v",
                "ON_ERROR_STOP=1",
                "-Atqc",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            describe_output(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(peers_dir().join("stop-peer.sh"))
            .arg("postgres")
            .arg(self.data())
            .output();
    }
}

fn config(url: &str, tables: &str, extra: &str) -> String {
    format!(
        r#"[[source]]
name = "pms"
kind = "sql"
url = "{url}"
tables = [ {tables} ]
{extra}
[[sink]]
name = "events"
kind = "jsonl"
path = "events.jsonl"
[[route]]
from = "pms"
to = ["events"]
"#
    )
}

/// Waits until every key in `keys` has an event with `op` in the file.
fn wait_for_keys(agent: &Agent, op: &str, keys: &[i64], what: &str) -> Vec<Value> {
    let file = agent.dir().join("events.jsonl");
    wait_until_explained(
        Duration::from_secs(120),
        what,
        || {
            let all = read_events(&file);
            let seen: HashSet<i64> = all
                .iter()
                .filter(|e| e["op"] == op)
                .filter_map(|e| e["key"]["patnum"].as_i64())
                .collect();
            let missing: Vec<&i64> = keys.iter().filter(|k| !seen.contains(k)).collect();
            if missing.is_empty() {
                Ok(all)
            } else {
                Err(format!("missing {op} of {missing:?}"))
            }
        },
        || format!("agent log tail:\n{}", agent.log_tail(30)),
    )
}

#[test]
fn a_wrong_password_is_named_and_never_printed() {
    if skip_postgres_tests("a_wrong_password_is_named_and_never_printed") {
        return;
    }
    let pg = OwnPostgres::new();
    pg.start();
    std::fs::write(
        pg.data().join("postgres/cluster/pg_hba.conf"),
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    pg.psql("SELECT pg_reload_conf()");
    pg.psql("CREATE ROLE app LOGIN REPLICATION PASSWORD 'the-right-one'; CREATE TABLE patient (patnum int PRIMARY KEY)");

    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("pw");
    std::fs::write(&pw, "wrong-Pa55word\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut agent = Agent::prepare(
        BIN,
        &config(
            &format!("postgres://app@127.0.0.1:{}/peerdb", pg.port),
            r#"{ name = "patient", key = ["patnum"] }"#,
            &format!("password_file = {:?}", pw.display().to_string()),
        ),
    );
    agent.launch();
    let line = agent.wait_for_log_line(
        Duration::from_secs(30),
        &[
            "name=pms",
            "connector failed; restarting",
            "password authentication failed for user \"app\"",
        ],
    );
    assert!(
        line.contains(&format!("postgres://app@127.0.0.1:{}/peerdb", pg.port)),
        "{line}"
    );
    // Still retrying, not exited.
    wait_until_explained(
        Duration::from_secs(30),
        "a second try",
        || {
            let tries = agent
                .log()
                .matches("password authentication failed")
                .count();
            if tries >= 2 {
                Ok(())
            } else {
                Err(format!("{tries} tries"))
            }
        },
        || agent.log_tail(10),
    );
    assert!(
        !agent.raw_log().contains("wrong-Pa55word"),
        "the password reached the log"
    );

    let config_path = agent.config_path().to_string_lossy().into_owned();
    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("source pms") && text.contains("password authentication failed"),
        "{text}"
    );
    assert!(!text.contains("wrong-Pa55word"), "{text}");
}

#[test]
fn a_database_down_at_start_and_mid_stream_loses_nothing() {
    if skip_postgres_tests("a_database_down_at_start_and_mid_stream_loses_nothing") {
        return;
    }
    let pg = OwnPostgres::new();
    let url = format!("postgres://postgres@127.0.0.1:{}/peerdb", pg.port);
    // Chunks of 4 over keys 1..12 cross 9 → 10: the chunks must follow the key's own order.
    let agent = Agent::start(
        BIN,
        &config(
            &url,
            r#"{ name = "patient", key = ["patnum"] }"#,
            "chunk_rows = 4",
        ),
    );
    agent.wait_for_log_line(
        Duration::from_secs(30),
        &[
            "name=pms",
            "connector failed; restarting",
            &format!("connect to {url}"),
        ],
    );

    pg.start();
    pg.psql(
        "CREATE TABLE patient (patnum bigint PRIMARY KEY, lname text);
         INSERT INTO patient SELECT g, 'p' || g FROM generate_series(1, 12) g;",
    );
    let all = wait_for_keys(
        &agent,
        "snapshot",
        &(1..=12).collect::<Vec<_>>(),
        "the snapshot once the database is up",
    );
    let snapshot: Vec<i64> = all
        .iter()
        .filter(|e| e["op"] == "snapshot")
        .filter_map(|e| e["key"]["patnum"].as_i64())
        .collect();
    assert_eq!(
        snapshot,
        (1..=12).collect::<Vec<_>>(),
        "snapshot rows out of key order or doubled"
    );

    // Mid-stream: some inserts are captured, the last ones are committed just before the
    // server goes away and may not be.
    for n in 13..=16 {
        pg.psql(&format!("INSERT INTO patient VALUES ({n}, 'p{n}')"));
    }
    wait_for_keys(&agent, "insert", &[13], "the first stream insert");
    for n in 17..=20 {
        pg.psql(&format!("INSERT INTO patient VALUES ({n}, 'p{n}')"));
    }
    pg.stop();
    agent.wait_for_log_line(
        Duration::from_secs(30),
        &["name=pms", "connector failed; restarting"],
    );
    std::thread::sleep(Duration::from_secs(2));
    pg.start();
    for n in 21..=24 {
        pg.psql(&format!("INSERT INTO patient VALUES ({n}, 'p{n}')"));
    }
    let all = wait_for_keys(
        &agent,
        "insert",
        &(13..=24).collect::<Vec<_>>(),
        "every insert, including those around the outage",
    );
    // Commit order, counting each insert's first appearance.
    let mut order = Vec::new();
    for e in all.iter().filter(|e| e["op"] == "insert") {
        let key = e["key"]["patnum"].as_i64().unwrap();
        if !order.contains(&key) {
            order.push(key);
        }
    }
    assert_eq!(order, (13..=24).collect::<Vec<_>>());
}

#[test]
fn a_missing_table_is_named_and_retried_until_it_exists() {
    if skip_postgres_tests("a_missing_table_is_named_and_retried_until_it_exists") {
        return;
    }
    let db = PgDatabase::create();
    db.psql("CREATE TABLE patient (patnum int PRIMARY KEY); INSERT INTO patient VALUES (1)");
    let agent = Agent::start(
        BIN,
        &config(
            &db.url(),
            r#"{ name = "patient", key = ["patnum"] }, { name = "recall", key = ["patnum"] }"#,
            "",
        ),
    );
    agent.wait_for_log_line(
        Duration::from_secs(30),
        &[
            "name=pms",
            "table recall: does not exist in schema \"public\"",
        ],
    );
    db.psql("CREATE TABLE recall (patnum int PRIMARY KEY); INSERT INTO recall VALUES (7)");
    let file = agent.dir().join("events.jsonl");
    wait_until_explained(
        Duration::from_secs(90),
        "the source starts once the table exists",
        || {
            let all = read_events(&file);
            if all.iter().any(|e| e["table"] == "recall") {
                Ok(())
            } else {
                Err(format!("{} events", all.len()))
            }
        },
        || agent.log_tail(20),
    );
    assert!(!agent.raw_log().contains("not-checked-pw"));
}

#[test]
fn a_column_dropped_mid_stream_is_logged_and_events_go_on() {
    if skip_postgres_tests("a_column_dropped_mid_stream_is_logged_and_events_go_on") {
        return;
    }
    let db = PgDatabase::create();
    db.psql("CREATE TABLE patient (patnum int PRIMARY KEY, lname text, fname text); INSERT INTO patient VALUES (1, 'A', 'a')");
    let agent = Agent::start(
        BIN,
        &config(&db.url(), r#"{ name = "patient", key = ["patnum"] }"#, ""),
    );
    wait_for_keys(&agent, "snapshot", &[1], "the snapshot");
    db.psql("INSERT INTO patient VALUES (2, 'B', 'b')");
    wait_for_keys(&agent, "insert", &[2], "an insert before the drop");
    db.psql("ALTER TABLE patient DROP COLUMN fname; INSERT INTO patient VALUES (3, 'C')");
    let all = wait_for_keys(&agent, "insert", &[3], "an insert after the drop");
    let line = agent.wait_for_log_line(
        Duration::from_secs(10),
        &[
            "captured columns were dropped or renamed",
            "patient",
            "fname",
        ],
    );
    assert!(line.contains("WARN"), "{line}");
    let after = all.iter().find(|e| e["key"]["patnum"] == 3).unwrap();
    assert_eq!(after["after"]["lname"], "C");
    assert!(after["after"].get("fname").is_none(), "{after}");
    let before = all
        .iter()
        .find(|e| e["key"]["patnum"] == 2 && e["op"] == "insert")
        .unwrap();
    assert_eq!(before["after"]["fname"], "b");
}
