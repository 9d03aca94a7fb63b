#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `outpost sql grants` for a Firebird source, applied as SYSDBA to a fresh database (after
//! `outpost sql install-triggers`), lets `outpost sql check` pass for the new user; the same
//! check flags SYSDBA itself. Skipped, with a `SKIPPED` line, when `OUTPOST_PEERS=skip`.

use outpost_testkit::firebird::{skip_firebird_tests, FbDatabase};
use outpost_testkit::{describe_output, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

const SCHEMA: &str = "
CREATE TABLE PATIENT (PATNUM BIGINT NOT NULL PRIMARY KEY, LNAME VARCHAR(80) NOT NULL);
CREATE TABLE APPOINTMENT (APTNUM INTEGER NOT NULL PRIMARY KEY, PATNUM BIGINT NOT NULL);
CREATE TABLE LEDGER (ID INTEGER NOT NULL PRIMARY KEY, AMOUNT NUMERIC(12,2));
COMMIT;
";

fn config(url: &str) -> String {
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

/// Drops the test's user (server-wide) when the test ends, however it ends.
struct User<'a> {
    db: &'a FbDatabase,
    name: String,
}

impl Drop for User<'_> {
    fn drop(&mut self) {
        let _ = self
            .db
            .try_isql(&format!("DROP USER {};\nCOMMIT;\n", self.name));
    }
}

#[test]
fn the_printed_firebird_grants_pass_the_check_and_sysdba_is_flagged() {
    if skip_firebird_tests("the_printed_firebird_grants_pass_the_check_and_sysdba_is_flagged") {
        return;
    }
    let db = FbDatabase::create();
    db.isql(SCHEMA);
    let user = format!("OUTPOST_{:08X}", rand::random::<u32>());
    let _user = User {
        db: &db,
        name: user.clone(),
    };

    // SYSDBA installs the capture triggers (they create the change tables).
    let admin = Agent::prepare(BIN, &config(&db.url()));
    let admin_config = admin.config_path().to_string_lossy().into_owned();
    let out = admin.run_cli(&["sql", "install-triggers", "--config", &admin_config]);
    assert!(out.status.success(), "{}", describe_output(&out));

    let url = format!(
        "firebird://{user}:pw-in-the-url@127.0.0.1:{}/{}",
        db.port(),
        db.path().display()
    );
    let agent = Agent::prepare(BIN, &config(&url));
    let config_path = agent.config_path().to_string_lossy().into_owned();
    let out = agent.run_cli(&["sql", "grants", "--config", &config_path]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        !script.contains("pw-in-the-url"),
        "password printed:\n{script}"
    );
    assert!(!script.contains("LEDGER"), "{script}");

    // The administrator picks the password and runs the script as SYSDBA.
    db.isql(&format!(
        "{}\nCOMMIT;\n",
        script.replace("<choose a password>", "pw-in-the-url")
    ));

    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(
        out.status.success(),
        "check failed on the printed grants:\n{text}"
    );
    for line in [
        "ok      SELECT ON PATIENT",
        "ok      SELECT ON APPOINTMENT",
        "ok      SELECT ON OUTPOST_CHANGES",
        "ok      DELETE ON OUTPOST_CHANGES",
        "ok      DELETE ON OUTPOST_CHANGE_BLOBS",
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
    assert!(!text.contains("pw-in-the-url"), "password printed:\n{text}");

    // An excess grant and a table the config does not name are flagged, with the fix.
    db.isql(&format!(
        "GRANT UPDATE ON TABLE PATIENT TO USER {user};\nGRANT SELECT ON TABLE LEDGER TO USER {user};\nCOMMIT;\n"
    ));
    let out = agent.run_cli(&["sql", "check", "--config", &config_path]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "{text}");
    for line in [
        format!("EXCESS  UPDATE ON PATIENT, which nothing in the config needs (REVOKE UPDATE ON TABLE PATIENT FROM USER {user};)"),
        format!("EXCESS  SELECT ON LEDGER, a table the config does not name (REVOKE SELECT ON TABLE LEDGER FROM USER {user};)"),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }

    // SYSDBA itself: flagged, and the check fails.
    let out = admin.run_cli(&["sql", "check", "--config", &admin_config]);
    let text = describe_output(&out);
    assert!(!out.status.success(), "SYSDBA passed the check:\n{text}");
    assert!(text.contains("EXCESS  user SYSDBA"), "{text}");
    assert!(!text.contains("masterkey"), "password printed:\n{text}");
}
