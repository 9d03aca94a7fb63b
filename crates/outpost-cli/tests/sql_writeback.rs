#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Write-back end to end: an app calls `POST /api/v1/agents/{id}/sql/{sink}/{operation}` on
//! the real hub; the real agent runs the practice's configured statement on a real
//! PostgreSQL 15 (`[[sink]] kind = "sql"`) and the result comes back through the session.
//! Skipped, with a `SKIPPED` line, when `OUTPOST_PEERS=skip`.

use std::time::Duration;

use outpost_testkit::{
    agent_config_for_hub, enrolled_agent_id, free_port, skip_postgres_tests, Agent, Hub, HubApi,
    PgDatabase,
};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

const SCHEMA: &str = "
CREATE TABLE patient (patnum bigint PRIMARY KEY, lname text NOT NULL, fname text);
CREATE TABLE appointment (aptnum serial PRIMARY KEY,
                          patnum bigint NOT NULL REFERENCES patient,
                          start_at timestamptz NOT NULL, note text,
                          UNIQUE (patnum, start_at));
INSERT INTO patient VALUES (1, 'Müller', 'Zoë');
";

struct Setup {
    db: PgDatabase,
    hub: Hub,
    agent: Agent,
    api: HubApi,
    agent_id: String,
}

impl Setup {
    fn start() -> Setup {
        let db = PgDatabase::create();
        db.psql(SCHEMA);
        let hub = Hub::start(BIN);
        let api = hub.api(Some(&hub.apikey("scheduling-app")));
        let token = hub.token("Smith Pediatrics", "24h");
        let sink = format!(
            r#"[[sink]]
name = "pms-write"
kind = "sql"
url = "{url}"
[sink.operations]
create_appointment = "INSERT INTO appointment (patnum, start_at, note) VALUES (:patnum, :start_at, :note) RETURNING aptnum, start_at, note"
add_patient = "INSERT INTO patient (patnum, lname, fname) VALUES (:patnum, :lname, :fname) RETURNING patnum, lname, fname"
"#,
            url = db.url()
        );
        let agent = Agent::start(BIN, &agent_config_for_hub(&hub, &token, free_port(), &sink));
        agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
        let agent_id = enrolled_agent_id(&agent.data_dir());
        Setup {
            db,
            hub,
            agent,
            api,
            agent_id,
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

#[test]
fn a_call_repeated_with_the_same_key_writes_one_row() {
    if skip_postgres_tests("a_call_repeated_with_the_same_key_writes_one_row") {
        return;
    }
    let s = Setup::start();
    let values = json!({"patnum": 1, "start_at": "2024-06-01T09:00:00Z", "note": "checkup"});
    let first = s.call("create_appointment", values.clone(), "apt-1001");
    assert_eq!(first.status, 200, "{}\n{}", first.text, s.context());
    assert_eq!(first.json["rows_affected"], json!(1), "{}", first.text);
    assert_eq!(first.json["replayed"], json!(false), "{}", first.text);
    let returned = &first.json["returned"][0];
    assert!(returned["aptnum"].is_i64(), "{}", first.text);
    assert_eq!(returned["start_at"], json!("2024-06-01T09:00:00Z"));
    assert_eq!(returned["note"], json!("checkup"));

    let again = s.call("create_appointment", values.clone(), "apt-1001");
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["replayed"], json!(true), "{}", again.text);
    assert_eq!(
        again.json["returned"], first.json["returned"],
        "the retry returns the first call's result"
    );
    assert_eq!(
        s.db.psql("SELECT count(*) FROM appointment").trim(),
        "1",
        "two calls with one key write one row"
    );

    // The same key with other values is refused, not run.
    let other = json!({"patnum": 1, "start_at": "2024-06-02T09:00:00Z", "note": "other"});
    let reused = s.call("create_appointment", other, "apt-1001");
    assert_eq!(reused.status, 409, "{}", reused.text);
    assert_eq!(
        reused.str("code"),
        "idempotency_key_reused",
        "{}",
        reused.text
    );
    assert_eq!(s.db.psql("SELECT count(*) FROM appointment").trim(), "1");

    // Every call is in the access log under the app key's name.
    let admin = s.hub.staff("ana", "admin");
    let log = s.hub.api(Some(&admin)).get("/api/v1/access-log");
    assert_eq!(log.status, 200, "{}", log.text);
    let calls: Vec<&Value> = log
        .json
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "sql.call")
        .collect();
    assert_eq!(calls.len(), 3, "{}", log.text);
    assert!(
        calls.iter().all(|r| r["principal"] == "app:scheduling-app"
            && r["target"]
                .as_str()
                .unwrap()
                .contains("sink pms-write operation create_appointment")),
        "{}",
        log.text
    );
}

#[test]
fn a_constraint_violation_comes_back_as_the_database_error() {
    if skip_postgres_tests("a_constraint_violation_comes_back_as_the_database_error") {
        return;
    }
    let s = Setup::start();
    // No patient 999: a foreign key violation.
    let refused = s.call(
        "create_appointment",
        json!({"patnum": 999, "start_at": "2024-06-01T09:00:00Z", "note": null}),
        "apt-2001",
    );
    assert_eq!(refused.status, 422, "{}\n{}", refused.text, s.context());
    assert_eq!(
        refused.json["error"]["code"],
        json!("23503"),
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
    // A double booking: a unique violation, under a new key.
    let values = json!({"patnum": 1, "start_at": "2024-06-01T10:00:00+02:00", "note": "a"});
    assert_eq!(
        s.call("create_appointment", values.clone(), "apt-2002")
            .status,
        200
    );
    let twice = s.call("create_appointment", values, "apt-2003");
    assert_eq!(twice.status, 422, "{}", twice.text);
    assert_eq!(
        twice.json["error"]["code"],
        json!("23505"),
        "{}",
        twice.text
    );
    assert_eq!(s.db.psql("SELECT count(*) FROM appointment").trim(), "1");
    // A value the column's type refuses is the database's error too.
    let bad_time = s.call(
        "create_appointment",
        json!({"patnum": 1, "start_at": "not a time", "note": "b"}),
        "apt-2004",
    );
    assert_eq!(bad_time.status, 422, "{}", bad_time.text);
    assert_eq!(
        bad_time.json["error"]["code"],
        json!("22007"),
        "{}",
        bad_time.text
    );
}

#[test]
fn an_operation_not_in_the_config_is_refused() {
    if skip_postgres_tests("an_operation_not_in_the_config_is_refused") {
        return;
    }
    let s = Setup::start();
    let unknown = s.call("drop_patients", json!({}), "k-3001");
    assert_eq!(unknown.status, 404, "{}\n{}", unknown.text, s.context());
    assert_eq!(unknown.str("code"), "unknown_operation", "{}", unknown.text);
    assert!(
        unknown
            .str("message")
            .contains("add_patient, create_appointment"),
        "the refusal names the known operations: {}",
        unknown.text
    );
    let no_sink = s.api.post_json(
        &format!("/api/v1/agents/{}/sql/elsewhere/add_patient", s.agent_id),
        &json!({"values": {}, "idempotency_key": "k-3002"}),
    );
    assert_eq!(no_sink.status, 404, "{}", no_sink.text);
    assert_eq!(no_sink.str("code"), "unknown_sink", "{}", no_sink.text);
    // SQL text cannot be sent: the body takes values and a key only.
    let sql = s.api.post_json(
        &format!("/api/v1/agents/{}/sql/pms-write/add_patient", s.agent_id),
        &json!({"values": {}, "idempotency_key": "k-3003", "sql": "DROP TABLE patient"}),
    );
    assert_eq!(sql.status, 400, "{}", sql.text);
    let missing = s.call(
        "add_patient",
        json!({"patnum": 5, "lname": "X", "extra": 1}),
        "k-3004",
    );
    assert_eq!(missing.status, 400, "{}", missing.text);
    assert!(
        missing.str("message").contains("fname") && missing.str("message").contains("extra"),
        "{}",
        missing.text
    );
    assert_eq!(s.db.psql("SELECT count(*) FROM patient").trim(), "1");
    // The route is in the OpenAPI document.
    let doc = s.hub.api(None).get("/api/v1/openapi.json");
    assert!(
        doc.json["paths"]["/api/v1/agents/{id}/sql/{sink}/{operation}"]["post"].is_object(),
        "{}",
        doc.text
    );
}

#[test]
fn quotes_and_sql_fragments_are_stored_literally() {
    if skip_postgres_tests("quotes_and_sql_fragments_are_stored_literally") {
        return;
    }
    let s = Setup::start();
    let names = [
        (2, "'); DROP TABLE patient; --", "O'Brien"),
        (
            3,
            "山田 Zoë Ångström",
            "Robert\"); DELETE FROM appointment; --",
        ),
        (4, ":lname :: $1 ? \\x", "Seán"),
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
            json!({"patnum": patnum, "lname": lname, "fname": fname})
        );
    }
    for (patnum, lname, fname) in names {
        let stored = s.db.psql(&format!(
            "SELECT lname || '|' || fname FROM patient WHERE patnum = {patnum}"
        ));
        assert_eq!(stored.trim(), format!("{lname}|{fname}"));
    }
    assert_eq!(s.db.psql("SELECT count(*) FROM patient").trim(), "4");
}
