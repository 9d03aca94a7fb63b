#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Write-back end to end on MariaDB: an app calls `POST /api/v1/agents/{id}/sql/{sink}/{operation}`
//! on the real hub; the real agent runs the practice's configured statement on a real
//! MariaDB 10.11 (`[[sink]] kind = "sql"`, `url = "mysql://…"`) as a user made from the
//! script `outpost sql grants` prints, with its password in a `password_file`, and the
//! result comes back through the session. Skipped, with a `SKIPPED` line, when
//! `OUTPOST_PEERS=skip`.

use std::time::Duration;

use outpost_testkit::mariadb::{skip_mariadb_tests, MariaDb};
use outpost_testkit::{
    agent_config_for_hub, describe_output, enrolled_agent_id, free_port, Agent, Hub, HubApi,
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Open Dental's names, much reduced.
const SCHEMA: &str = "
CREATE TABLE patient (PatNum BIGINT PRIMARY KEY, LName VARCHAR(100) NOT NULL,
                      FName VARCHAR(100)) ENGINE=InnoDB;
CREATE TABLE appointment (AptNum BIGINT AUTO_INCREMENT PRIMARY KEY, PatNum BIGINT NOT NULL,
                          AptDateTime DATETIME NOT NULL, Note TEXT,
                          UNIQUE KEY (PatNum, AptDateTime),
                          FOREIGN KEY (PatNum) REFERENCES patient (PatNum)) ENGINE=InnoDB;
INSERT INTO patient VALUES (1, 'Müller', 'Zoë');
";

const PASSWORD: &str = "writer-pw-secret";

/// Drops the writer user (`'name'@'%'`, server-wide) when the test ends, however it ends.
struct User<'a> {
    db: &'a MariaDb,
    name: String,
}

impl Drop for User<'_> {
    fn drop(&mut self) {
        let _ = self
            .db
            .try_sql(&format!("DROP USER IF EXISTS '{}'@'%'", self.name));
    }
}

struct Setup {
    hub: Hub,
    agent: Agent,
    api: HubApi,
    agent_id: String,
    _secrets: tempfile::TempDir,
}

impl Setup {
    /// A hub and an agent whose `pms-write` sink connects as a user holding exactly what
    /// `outpost sql grants` prints for it.
    fn start(db: &MariaDb, user: &str) -> Setup {
        db.sql(SCHEMA);
        let secrets = tempfile::tempdir().unwrap();
        let password_file = secrets.path().join("writer.pw");
        std::fs::write(&password_file, PASSWORD).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let hub = Hub::start(BIN);
        let api = hub.api(Some(&hub.apikey("scheduling-app")));
        let token = hub.token("Smith Pediatrics", "24h");
        let sink = format!(
            r#"[[sink]]
name = "pms-write"
kind = "sql"
url = "mysql://{user}@127.0.0.1:{port}/{name}"
password_file = {password_file:?}
[sink.operations]
# A DATETIME holds the practice's wall-clock time: "2024-06-01 09:00:00".
create_appointment = "INSERT INTO appointment (PatNum, AptDateTime, Note) VALUES (:patnum, :start, :note)"
# An RFC 3339 instant in UTC, converted to the server's time zone in the statement.
create_appointment_utc = "INSERT INTO appointment (PatNum, AptDateTime, Note) VALUES (:patnum, CONVERT_TZ(STR_TO_DATE(:start, '%Y-%m-%dT%H:%i:%sZ'), '+00:00', @@time_zone), :note) RETURNING AptNum, AptDateTime, Note"
add_patient = "INSERT INTO patient (PatNum, LName, FName) VALUES (:patnum, :lname, :fname) RETURNING PatNum, LName, FName"
"#,
            port = db.port(),
            name = db.name(),
            password_file = password_file.display().to_string(),
        );
        let mut agent =
            Agent::prepare(BIN, &agent_config_for_hub(&hub, &token, free_port(), &sink));
        let config_path = agent.config_path().to_string_lossy().into_owned();
        let out = agent.run_cli(&["sql", "grants", "--config", &config_path]);
        assert!(out.status.success(), "{}", describe_output(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            !script.contains("DROP") && !script.contains("ALL PRIVILEGES"),
            "{script}"
        );
        // Only what the script grants: MariaDB's `INSERT … RETURNING` wants INSERT and
        // SELECT on every column inserted or returned, and the script says so.
        assert!(
            script.contains(&format!(
                "GRANT INSERT (`AptDateTime`, `AptNum`, `Note`, `PatNum`) ON `{}`.`appointment` TO '{user}'@'%';",
                db.name()
            )),
            "{script}"
        );
        db.sql(&script.replace("<choose a password>", PASSWORD));
        agent.launch();
        agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
        let agent_id = enrolled_agent_id(&agent.data_dir());
        Setup {
            hub,
            agent,
            api,
            agent_id,
            _secrets: secrets,
        }
    }

    fn call(&self, operation: &str, values: Value, key: &str) -> outpost_testkit::ApiResponse {
        self.api.post_json(
            &format!("/api/v1/agents/{}/sql/pms-write/{operation}", self.agent_id),
            &json!({"values": values, "idempotency_key": key}),
        )
    }

    fn context(&self) -> String {
        format!(
            "agent log tail:\n{}\nhub log tail:\n{}",
            self.agent.log_tail(20),
            self.hub.log_tail(20)
        )
    }
}

/// A fresh database and the name of its writer user (dropped with the guard).
fn database(test: &str) -> Option<(MariaDb, String)> {
    if skip_mariadb_tests(test) {
        return None;
    }
    let db = MariaDb::create();
    let id = db.name()[db.name().len() - 8..].to_owned();
    Some((db, format!("outpost_w_{id}")))
}

#[test]
fn a_call_repeated_with_the_same_key_writes_one_row() {
    let Some((db, user)) = database("a_call_repeated_with_the_same_key_writes_one_row") else {
        return;
    };
    let _user = User {
        db: &db,
        name: user.clone(),
    };
    let s = Setup::start(&db, &user);
    let values = json!({"patnum": 1, "start": "2024-06-01 09:00:00", "note": "checkup"});
    let first = s.call("create_appointment", values.clone(), "apt-1001");
    assert_eq!(first.status, 200, "{}\n{}", first.text, s.context());
    assert_eq!(first.json["rows_affected"], json!(1), "{}", first.text);
    assert_eq!(first.json["replayed"], json!(false), "{}", first.text);
    let generated = first.json["returned"][0]["last_insert_id"].as_u64();
    assert!(generated.is_some_and(|id| id > 0), "{}", first.text);

    let again = s.call("create_appointment", values, "apt-1001");
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["replayed"], json!(true), "{}", again.text);
    assert_eq!(
        again.json["returned"], first.json["returned"],
        "the retry returns the first call's result"
    );
    assert_eq!(
        db.sql("SELECT count(*) FROM appointment"),
        "1",
        "two calls with one key write one row"
    );
    assert_eq!(
        db.sql("SELECT AptNum, AptDateTime FROM appointment"),
        format!("{}\t2024-06-01 09:00:00", generated.unwrap())
    );

    // The same key with other values is refused, not run.
    let other = json!({"patnum": 1, "start": "2024-06-02 09:00:00", "note": "other"});
    let reused = s.call("create_appointment", other, "apt-1001");
    assert_eq!(reused.status, 409, "{}", reused.text);
    assert_eq!(
        reused.str("code"),
        "idempotency_key_reused",
        "{}",
        reused.text
    );

    // The documented way in for an RFC 3339 instant; RETURNING gives the row back.
    let utc = s.call(
        "create_appointment_utc",
        json!({"patnum": 1, "start": "2024-06-01T10:00:00Z", "note": "utc"}),
        "apt-1002",
    );
    assert_eq!(utc.status, 200, "{}\n{}", utc.text, s.context());
    let returned = &utc.json["returned"][0];
    assert!(returned["AptNum"].is_u64(), "{}", utc.text);
    assert_eq!(
        (&returned["AptDateTime"], &returned["Note"]),
        (&json!("2024-06-01T10:00:00"), &json!("utc")),
        "{}",
        utc.text
    );
    // Straight into a DATETIME, strict mode refuses it (it is not truncated to the date).
    let zoned = s.call(
        "create_appointment",
        json!({"patnum": 1, "start": "2024-06-01T11:00:00Z", "note": "z"}),
        "apt-1003",
    );
    assert_eq!(zoned.status, 422, "{}", zoned.text);
    assert_eq!(zoned.json["error"]["code"], json!("1292"), "{}", zoned.text);
    assert_eq!(db.sql("SELECT count(*) FROM appointment"), "2");
}

#[test]
fn a_constraint_violation_comes_back_as_the_database_error() {
    let Some((db, user)) = database("a_constraint_violation_comes_back_as_the_database_error")
    else {
        return;
    };
    let _user = User {
        db: &db,
        name: user.clone(),
    };
    let s = Setup::start(&db, &user);
    // No patient 999: a foreign key violation.
    let refused = s.call(
        "create_appointment",
        json!({"patnum": 999, "start": "2024-06-01 09:00:00", "note": null}),
        "apt-2001",
    );
    assert_eq!(refused.status, 422, "{}\n{}", refused.text, s.context());
    assert_eq!(
        refused.json["error"]["code"],
        json!("1452"),
        "{}",
        refused.text
    );
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("foreign key"),
        "{}",
        refused.text
    );
    // The refusal is the key's result: replayed, not run again.
    let replay = s.call(
        "create_appointment",
        json!({"patnum": 999, "start": "2024-06-01 09:00:00", "note": null}),
        "apt-2001",
    );
    assert_eq!(replay.status, 422, "{}", replay.text);
    assert_eq!(replay.json["replayed"], json!(true), "{}", replay.text);

    // A double booking: a duplicate key, under a new key.
    let values = json!({"patnum": 1, "start": "2024-06-01 10:00:00", "note": "a"});
    let booked = s.call("create_appointment", values.clone(), "apt-2002");
    assert_eq!(booked.status, 200, "{}", booked.text);
    let twice = s.call("create_appointment", values, "apt-2003");
    assert_eq!(twice.status, 422, "{}", twice.text);
    assert_eq!(twice.json["error"]["code"], json!("1062"), "{}", twice.text);
    let message = twice.json["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Duplicate entry '…' for key"),
        "the quoted value is left out: {message}"
    );
    assert_eq!(db.sql("SELECT count(*) FROM appointment"), "1");

    // NOT NULL and too long are the database's errors too.
    let no_name = s.call(
        "add_patient",
        json!({"patnum": 5, "lname": null, "fname": "x"}),
        "pat-2004",
    );
    assert_eq!(no_name.status, 422, "{}", no_name.text);
    assert_eq!(
        no_name.json["error"]["code"],
        json!("1048"),
        "{}",
        no_name.text
    );
    let long = s.call(
        "add_patient",
        json!({"patnum": 5, "lname": "x".repeat(101), "fname": "x"}),
        "pat-2005",
    );
    assert_eq!(long.status, 422, "{}", long.text);
    assert_eq!(long.json["error"]["code"], json!("1406"), "{}", long.text);
    assert_eq!(db.sql("SELECT count(*) FROM patient"), "1");
}

#[test]
fn an_operation_not_in_the_config_is_refused() {
    let Some((db, user)) = database("an_operation_not_in_the_config_is_refused") else {
        return;
    };
    let _user = User {
        db: &db,
        name: user.clone(),
    };
    let s = Setup::start(&db, &user);
    let unknown = s.call("drop_patients", json!({}), "k-3001");
    assert_eq!(unknown.status, 404, "{}\n{}", unknown.text, s.context());
    assert_eq!(unknown.str("code"), "unknown_operation", "{}", unknown.text);
    assert!(
        unknown
            .str("message")
            .contains("add_patient, create_appointment, create_appointment_utc"),
        "the refusal names the known operations: {}",
        unknown.text
    );
    // SQL text cannot be sent: the body takes values and a key only.
    let sql = s.api.post_json(
        &format!("/api/v1/agents/{}/sql/pms-write/add_patient", s.agent_id),
        &json!({"values": {}, "idempotency_key": "k-3002", "sql": "DROP TABLE patient"}),
    );
    assert_eq!(sql.status, 400, "{}", sql.text);
    let missing = s.call(
        "add_patient",
        json!({"patnum": 5, "lname": "X", "extra": 1}),
        "k-3003",
    );
    assert_eq!(missing.status, 400, "{}", missing.text);
    assert!(
        missing.str("message").contains("fname") && missing.str("message").contains("extra"),
        "{}",
        missing.text
    );
    assert_eq!(db.sql("SELECT count(*) FROM patient"), "1");
}

#[test]
fn quotes_and_sql_fragments_are_stored_literally() {
    let Some((db, user)) = database("quotes_and_sql_fragments_are_stored_literally") else {
        return;
    };
    let _user = User {
        db: &db,
        name: user.clone(),
    };
    let s = Setup::start(&db, &user);
    let names = [
        (2, "'); DROP TABLE patient; --", "O'Brien"),
        (
            3,
            "山田 Zoë Ångström",
            "Robert\"); DELETE FROM appointment; --",
        ),
        (4, "\\'; DROP TABLE patient; #", "back\\slash \\\\ \\0 \\n"),
        (5, ":lname :: $1 ? /* x */ `y`", "Seán 🦷"),
    ];
    for (patnum, lname, fname) in names {
        let added = s.call(
            "add_patient",
            json!({"patnum": patnum, "lname": lname, "fname": fname}),
            &format!("pat-{patnum}"),
        );
        assert_eq!(added.status, 200, "{}\n{}", added.text, s.context());
        assert_eq!(
            added.json["returned"][0],
            json!({"PatNum": patnum, "LName": lname, "FName": fname})
        );
    }
    for (patnum, lname, fname) in names {
        // As hex: the client's batch output escapes backslashes.
        let stored = db.sql(&format!(
            "SELECT HEX(LName), HEX(FName) FROM patient WHERE PatNum = {patnum}"
        ));
        assert_eq!(
            stored,
            format!("{}\t{}", hex::encode_upper(lname), hex::encode_upper(fname)),
            "patient {patnum}"
        );
    }
    assert_eq!(db.sql("SELECT count(*) FROM patient"), "5");
    assert!(
        !s.agent.log_tail(500).contains(PASSWORD),
        "the password reached the log"
    );
}
