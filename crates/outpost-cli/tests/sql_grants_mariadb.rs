#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `outpost sql grants` applied (as root) to a fresh MariaDB database lets the source run
//! with a user that has nothing else; `outpost sql check` passes for it, flags an excess
//! write grant, a table the config does not name, a whole-table SELECT where the config
//! lists columns, and a user with `ALL PRIVILEGES ON *.*`. Skipped, with a `SKIPPED` line,
//! when `OUTPOST_PEERS=skip`.
//!
//! A second test runs the source with the column-level grants printed for a config that
//! lists columns: `information_schema` hides the other columns from that user, while the
//! binlog carries every column, so the hidden ones must keep their places.

use outpost_testkit::jsonl::wait_for_count;
use outpost_testkit::mariadb::{skip_mariadb_tests, MariaDb};
use outpost_testkit::{describe_output, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

const SCHEMA: &str = "
CREATE TABLE patient (patnum BIGINT PRIMARY KEY, lname VARCHAR(100) NOT NULL, ssn VARCHAR(20));
CREATE TABLE appointment (aptnum INT PRIMARY KEY, patnum BIGINT NOT NULL, note TEXT);
CREATE TABLE ledger (id INT PRIMARY KEY, amount DECIMAL(12,2));
INSERT INTO patient VALUES (1, 'Müller', '123'), (2, 'O''Brien', NULL);
INSERT INTO appointment VALUES (1, 1, 'checkup');
";

fn config(url: &str) -> String {
    config_with(url, "")
}

/// The config, with `patient_columns` (e.g. `, columns = ["lname"]`) on the patient table.
fn config_with(url: &str, patient_columns: &str) -> String {
    format!(
        r#"[[source]]
name = "pms"
kind = "sql"
url = "{url}"
tables = [ {{ name = "patient", key = ["patnum"]{patient_columns} }},
           {{ name = "appointment", key = ["aptnum"] }} ]
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

/// Drops the test's users (`'name'@'%'`, server-wide) when the test ends, however it ends.
struct Users<'a> {
    db: &'a MariaDb,
    names: Vec<String>,
}

impl Drop for Users<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = self
                .db
                .try_sql(&format!("DROP USER IF EXISTS '{name}'@'%'"));
        }
    }
}

#[test]
fn the_printed_mariadb_grants_let_the_source_run_and_check_flags_excess() {
    if skip_mariadb_tests("the_printed_mariadb_grants_let_the_source_run_and_check_flags_excess") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    // Users are shared by the whole server: ones of its own per test database.
    let id = &db.name()[db.name().len() - 8..];
    let user = format!("outpost_{id}");
    let root_like = format!("outpost_all_{id}");
    let _users = Users {
        db: &db,
        names: vec![user.clone(), root_like.clone()],
    };
    let url = format!(
        "mysql://{user}:pw-in-the-url@127.0.0.1:{}/{}",
        db.port(),
        db.name()
    );
    let mut agent = Agent::prepare(BIN, &config(&url));
    let config_path = agent.config_path().to_string_lossy().into_owned();

    let out = agent.run_cli(&["sql", "grants", "--config", &config_path]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        !script.contains("pw-in-the-url"),
        "password printed:\n{script}"
    );
    assert!(
        script.contains(&format!(
            "GRANT SELECT ON `{}`.`patient` TO '{user}'@'%';",
            db.name()
        )),
        "{script}"
    );
    assert!(!script.contains("ledger"), "{script}");

    // The administrator picks the password and runs the script as root.
    db.sql(&script.replace("<choose a password>", "pw-in-the-url"));

    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(
        out.status.success(),
        "check failed on the printed grants:\n{text}"
    );
    for line in [
        "ok      REPLICATION SLAVE ON *.*",
        "ok      REPLICATION CLIENT ON *.*",
        &format!("ok      SELECT ON `{}`.`patient`", db.name()),
        &format!("ok      SELECT ON `{}`.`appointment`", db.name()),
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    assert!(!text.contains("pw-in-the-url"), "{text}");

    agent.launch();
    let file = agent.dir().join("events.jsonl");
    let wait_for = |count: usize, what: &str| wait_for_count(&agent, &file, count, what);
    wait_for(
        3,
        "the snapshot reaches the file with the least-privilege user",
    );
    db.sql("INSERT INTO patient VALUES (3, 'Nguyễn', 'secret-ssn')");
    let events = wait_for(
        4,
        "an insert reaches the file with the least-privilege user",
    );
    assert!(events
        .iter()
        .any(|e| e["op"] == "insert" && e["key"]["patnum"] == 3));
    agent.kill9();
    assert!(
        !agent.log_tail(200).contains("pw-in-the-url"),
        "password logged"
    );

    // A config that reads fewer columns than the grant gives: the others are flagged.
    let narrow = Agent::prepare(BIN, &config_with(&url, r#", columns = ["lname"]"#));
    let narrow_config = narrow.config_path().to_string_lossy().into_owned();
    let out = narrow.run_cli(&["sql", "check", "--config", &narrow_config]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "EXCESS  SELECT on the whole of `{0}`.`patient`, also on `ssn` (REVOKE SELECT ON `{0}`.`patient` FROM '{user}'@'%'; GRANT SELECT (`lname`, `patnum`) ON `{0}`.`patient` TO '{user}'@'%';)",
            db.name()
        )),
        "{text}"
    );

    // Excess grants are flagged, with a fix line, and check exits non-zero.
    db.sql(&format!(
        "GRANT INSERT ON `{0}`.`patient` TO '{user}'@'%'; GRANT SELECT ON `{0}`.`ledger` TO '{user}'@'%';",
        db.name()
    ));
    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "EXCESS  INSERT ON `{0}`.`patient`, which nothing in the config needs (REVOKE INSERT ON `{0}`.`patient` FROM '{user}'@'%';)",
            db.name()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "EXCESS  SELECT ON `{}`.`ledger`, a table the config does not name",
            db.name()
        )),
        "{text}"
    );

    // A user with ALL PRIVILEGES ON *.* is flagged.
    db.sql(&format!(
        "CREATE USER '{root_like}'@'%' IDENTIFIED BY 'all-pw-secret'; GRANT ALL PRIVILEGES ON *.* TO '{root_like}'@'%';"
    ));
    let all_url = format!(
        "mysql://{root_like}:all-pw-secret@127.0.0.1:{}/{}",
        db.port(),
        db.name()
    );
    let all = Agent::prepare(BIN, &config(&all_url));
    let all_config = all.config_path().to_string_lossy().into_owned();
    let out = all.run_cli(&["sql", "check", "--config", &all_config]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("EXCESS  ALL PRIVILEGES ON *.*"), "{text}");
    assert!(text.contains("SUPER"), "{text}");
    assert!(!text.contains("all-pw-secret"), "{text}");
}

#[test]
fn column_level_grants_let_the_source_capture_the_listed_columns() {
    if skip_mariadb_tests("column_level_grants_let_the_source_capture_the_listed_columns") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let id = &db.name()[db.name().len() - 8..];
    let user = format!("outpost_col_{id}");
    let _users = Users {
        db: &db,
        names: vec![user.clone()],
    };
    let url = format!(
        "mysql://{user}:col-pw@127.0.0.1:{}/{}",
        db.port(),
        db.name()
    );
    // `lname` sits between the key and `ssn`: the user may not read it.
    let mut agent = Agent::prepare(BIN, &config_with(&url, r#", columns = ["ssn"]"#));
    let config_path = agent.config_path().to_string_lossy().into_owned();
    let out = agent.run_cli(&["sql", "grants", "--config", &config_path]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    db.sql(&script.replace("<choose a password>", "col-pw"));
    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    assert!(out.status.success(), "{}", describe_output(&out));

    agent.launch();
    let file = agent.dir().join("events.jsonl");
    let wait_for = |count: usize, what: &str| wait_for_count(&agent, &file, count, what);
    wait_for(3, "the snapshot with column-level grants");
    db.sql("INSERT INTO patient VALUES (3, 'Nguyễn', 'ssn-3'); UPDATE patient SET ssn = 'ssn-1b', lname = 'Mueller' WHERE patnum = 1;");
    let events = wait_for(5, "an insert and an update with column-level grants");
    let patient: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["table"] == "patient").collect();
    let snapshot = patient
        .iter()
        .find(|e| e["op"] == "snapshot" && e["key"]["patnum"] == 1)
        .expect("snapshot row 1");
    assert_eq!(snapshot["after"]["ssn"], "123", "{snapshot}");
    assert!(snapshot["after"].get("lname").is_none(), "{snapshot}");
    let insert = patient
        .iter()
        .find(|e| e["op"] == "insert")
        .expect("the insert");
    assert_eq!(insert["after"]["patnum"], 3, "{insert}");
    assert_eq!(insert["after"]["ssn"], "ssn-3", "{insert}");
    assert!(insert["after"].get("lname").is_none(), "{insert}");
    let update = patient
        .iter()
        .find(|e| e["op"] == "update")
        .expect("the update");
    assert_eq!(update["after"]["ssn"], "ssn-1b", "{update}");
    assert_eq!(update["before"]["ssn"], "123", "{update}");
    assert!(update["after"].get("lname").is_none(), "{update}");
    agent.kill9();
}
