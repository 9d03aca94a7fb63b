#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `outpost sql grants` applied to a fresh PostgreSQL database lets the source run with a
//! role that has nothing else; `outpost sql check` passes for it, flags an excess write
//! grant on it, and flags a superuser. Skipped, with a `SKIPPED` line, when
//! `OUTPOST_PEERS=skip`.

use outpost_testkit::jsonl::wait_for_count;
use outpost_testkit::{describe_output, skip_postgres_tests, Agent, PgDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

const SCHEMA: &str = "
CREATE TABLE patient (patnum bigint PRIMARY KEY, lname text NOT NULL, ssn text);
CREATE TABLE appointment (aptnum int PRIMARY KEY, patnum bigint NOT NULL, note text);
INSERT INTO patient VALUES (1, 'Müller', '123'), (2, 'O''Brien', NULL);
INSERT INTO appointment VALUES (1, 1, 'checkup');
";

fn config(url: &str) -> String {
    format!(
        r#"[[source]]
name = "pms"
kind = "sql"
url = "{url}"
tables = [ {{ name = "patient", key = ["patnum"], columns = ["lname"] }},
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

/// Drops the test role when the test ends, however it ends.
struct Role<'a> {
    db: &'a PgDatabase,
    name: String,
}

impl Drop for Role<'_> {
    fn drop(&mut self) {
        self.db.psql(&format!(
            "DROP PUBLICATION IF EXISTS outpost_pms; DROP OWNED BY \"{0}\"; DROP ROLE \"{0}\"",
            self.name
        ));
    }
}

#[test]
fn the_printed_grants_let_the_source_run_and_check_flags_excess() {
    if skip_postgres_tests("the_printed_grants_let_the_source_run_and_check_flags_excess") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    // Roles are shared by the whole server: one of its own per test database.
    let role = format!("outpost_{}", &db.name()[db.name().len() - 8..]);
    let url = db.url().replace(
        "postgres:not-checked-pw@",
        &format!("{role}:pw-in-the-url@"),
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
            "GRANT SELECT (\"patnum\", \"lname\") ON TABLE \"public\".\"patient\" TO \"{role}\";"
        )),
        "{script}"
    );
    assert!(!script.contains("ssn"), "{script}");

    // The administrator picks a password and runs the script (as postgres, the owner).
    db.psql(&script.replace("<choose a password>", "a-password"));
    let _role = Role {
        db: &db,
        name: role.clone(),
    };

    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(
        out.status.success(),
        "check failed on the printed grants:\n{text}"
    );
    assert!(text.contains("ok      REPLICATION"), "{text}");
    assert!(!text.contains("pw-in-the-url"), "{text}");

    agent.launch();
    let file = agent.dir().join("events.jsonl");
    let wait_for = |count: usize, what: &str| wait_for_count(&agent, &file, count, what);
    wait_for(
        3,
        "the snapshot reaches the file with the least-privilege role",
    );
    db.psql("INSERT INTO patient VALUES (3, 'Nguyễn', 'secret-ssn')");
    let events = wait_for(
        4,
        "an insert reaches the file with the least-privilege role",
    );
    assert!(events.iter().all(|e| e["after"].get("ssn").is_none()));
    assert!(events
        .iter()
        .any(|e| e["op"] == "insert" && e["key"]["patnum"] == 3));
    agent.kill9();

    // An excess grant is flagged, and check exits non-zero.
    db.psql(&format!("GRANT INSERT, TRUNCATE ON patient TO \"{role}\""));
    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("EXCESS  INSERT"), "{text}");
    assert!(
        text.contains("EXCESS  TRUNCATE on \"public\".\"patient\""),
        "{text}"
    );

    // A superuser (the test server's postgres) is flagged.
    let su = Agent::prepare(BIN, &config(&db.url()));
    let su_config = su.config_path().to_string_lossy().into_owned();
    let out = su.run_cli(&["sql", "check", "--config", &su_config]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("EXCESS  role \"postgres\" has SUPERUSER"),
        "{text}"
    );
    assert!(text.contains("owns \"public\".\"patient\""), "{text}");
    assert!(!text.contains("not-checked-pw"), "{text}");
}

#[test]
fn write_back_operations_get_exactly_their_grants() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outpost.toml");
    std::fs::write(
        &path,
        r#"data_dir = "data"
[[sink]]
name = "pms_write"
kind = "sql"
url = "postgres://writer:do-not-print@127.0.0.1:5433/pms"
operations = { create_appointment = "INSERT INTO appointment (patnum, start_at, note) VALUES (:pat, :start, :note)", cancel = "DELETE FROM appointment WHERE aptnum = :id" }
"#,
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["sql", "grants", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = describe_output(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("do-not-print"), "{text}");
    for line in [
        "GRANT INSERT (\"note\", \"patnum\", \"start_at\") ON TABLE \"appointment\" TO \"writer\";",
        "GRANT DELETE ON TABLE \"appointment\" TO \"writer\";",
        "GRANT SELECT (\"aptnum\") ON TABLE \"appointment\" TO \"writer\";  -- read by WHERE, RETURNING or SET expressions",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
    }
    assert!(!text.contains("UPDATE"), "{text}");
}
