#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Firebird trigger capture against a real Firebird 3 (the peer recipe): the printed
//! script installs, the snapshot and then changes in transactions arrive in commit order
//! with the right before/after, a restart loses nothing, and the change table is trimmed
//! only after `committed`.

use std::path::Path;
use std::time::Duration;

use outpost_sql::{firebird, Batch, ChangeEvent, ChangeSource, Op, Position, SourceConfig};
use outpost_testkit::firebird::{skip_firebird_tests, FbDatabase};
use serde_json::json;

const SCHEMA: &str = r#"
CREATE TABLE PROVIDER (
  PROVNUM INTEGER NOT NULL PRIMARY KEY,
  NAME VARCHAR(100) NOT NULL,
  FEE NUMERIC(9,2)
);
CREATE TABLE PATIENT (
  PATNUM INTEGER NOT NULL PRIMARY KEY,
  LNAME VARCHAR(100) NOT NULL,
  FNAME VARCHAR(100),
  BIRTHDATE DATE,
  BALANCE NUMERIC(15,2),
  NOTE BLOB SUB_TYPE TEXT,
  PHOTO BLOB SUB_TYPE BINARY,
  CREATED_AT TIMESTAMP,
  ACTIVE BOOLEAN,
  WEIGHT DOUBLE PRECISION,
  PROVNUM INTEGER REFERENCES PROVIDER (PROVNUM)
);
CREATE TABLE APPOINTMENT (
  APTNUM BIGINT NOT NULL PRIMARY KEY,
  PATNUM INTEGER NOT NULL REFERENCES PATIENT (PATNUM),
  START_AT TIMESTAMP NOT NULL,
  DURATION SMALLINT,
  NOTE VARCHAR(200)
);
COMMIT;
INSERT INTO PROVIDER VALUES (1, 'Dr. Zoë Ångström', 120.50);
INSERT INTO PROVIDER VALUES (2, 'Dr. 山田 太郎', NULL);
INSERT INTO PATIENT VALUES (1, 'O''Brien', 'Seán', '1980-02-29', 12.50, 'Allergic to "penicillin"
second line', x'00FF10', '2024-03-05 14:30:00.25', TRUE, 71.5, 1);
INSERT INTO PATIENT VALUES (2, 'Müller', NULL, NULL, -0.75, NULL, NULL, NULL, FALSE, NULL, 2);
INSERT INTO PATIENT VALUES (3, 'Nguyễn', 'Thị', '2001-12-31', 123456789012.34, NULL, NULL, '2024-01-01 00:00:00', NULL, NULL, NULL);
INSERT INTO APPOINTMENT VALUES (10, 1, '2024-06-03 08:00:00', 30, NULL);
COMMIT;
"#;

fn config(db: &FbDatabase) -> SourceConfig {
    let text = format!(
        r#"url = "{}"
        mode = "cdc"
        chunk_rows = 2
        tables = [ {{ name = "provider", key = ["provnum"] }},
                   {{ name = "patient", key = ["patnum"] }},
                   {{ name = "appointment", key = ["aptnum"] }} ]"#,
        db.url()
    );
    let config: SourceConfig = toml::from_str(&text).unwrap();
    config.validate(Path::new(".")).unwrap();
    config
}

fn setup() -> Option<(FbDatabase, SourceConfig)> {
    if skip_firebird_tests("firebird_capture") {
        return None;
    }
    let db = FbDatabase::create();
    db.isql(SCHEMA);
    let config = config(&db);
    Some((db, config))
}

async fn install(db: &FbDatabase, config: &SourceConfig) -> String {
    let script = firebird::install_script(config).await.unwrap();
    db.isql(&script);
    script
}

async fn open(config: &SourceConfig, resume: Option<Position>) -> Box<dyn ChangeSource> {
    outpost_sql::open("pms", config, Path::new("."), Path::new("."), resume)
        .await
        .unwrap()
}

async fn next(source: &mut Box<dyn ChangeSource>) -> Batch {
    tokio::time::timeout(Duration::from_secs(30), source.next_batch())
        .await
        .expect("a batch within 30 s")
        .unwrap()
}

/// Reads and commits batches until the snapshot is over; returns its events.
async fn snapshot(source: &mut Box<dyn ChangeSource>) -> (Vec<ChangeEvent>, Position) {
    let mut events = Vec::new();
    loop {
        let batch = next(source).await;
        source.committed(&batch.position).await.unwrap();
        if batch.events.is_empty() {
            assert!(
                batch.position.0.contains("\"stream\""),
                "{}",
                batch.position.0
            );
            return (events, batch.position);
        }
        assert!(batch.events.iter().all(|e| e.op == Op::Snapshot));
        events.extend(batch.events);
    }
}

/// The next `n` non-empty batches, committing each if `commit`.
async fn changes(
    source: &mut Box<dyn ChangeSource>,
    n: usize,
    commit: bool,
) -> (Vec<Vec<ChangeEvent>>, Position) {
    let mut out = Vec::new();
    let mut last = None;
    while out.len() < n {
        let batch = next(source).await;
        if commit {
            source.committed(&batch.position).await.unwrap();
        }
        last = Some(batch.position.clone());
        if !batch.events.is_empty() {
            out.push(batch.events);
        }
    }
    (out, last.unwrap())
}

fn pending(db: &FbDatabase) -> u64 {
    db.value("SELECT COUNT(*) FROM OUTPOST_CHANGES")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_script_installs_cleanly_and_is_required() {
    let Some((db, config)) = setup() else { return };
    let err = outpost_sql::open("pms", &config, Path::new("."), Path::new("."), None)
        .await
        .err()
        .expect("refused without triggers")
        .to_string();
    assert!(err.contains("install-triggers"), "{err}");
    assert!(!err.contains("masterkey"), "{err}");
    let script = install(&db, &config).await;
    assert!(script.contains("CREATE TABLE OUTPOST_CHANGES"), "{script}");
    assert!(script.contains("CREATE OR ALTER TRIGGER \"OUTPOST_T_PATIENT\""));
    // Once installed, the script only re-creates the function and triggers, and the
    // agent's own install runs cleanly on top.
    let again = firebird::install_script(&config).await.unwrap();
    assert!(!again.contains("CREATE TABLE"), "{again}");
    db.isql(&again);
    let ran = firebird::install(&config).await.unwrap();
    assert!(ran.iter().all(|s| !s.starts_with("CREATE TABLE")));
    assert_eq!(
        db.value(
            "SELECT COUNT(*) FROM RDB$TRIGGERS WHERE RDB$TRIGGER_NAME STARTING WITH 'OUTPOST_T_'"
        ),
        "3"
    );
    // The application's writes still work, and land in the change table.
    db.isql("UPDATE PROVIDER SET FEE = 99.99 WHERE PROVNUM = 1; COMMIT;");
    assert_eq!(pending(&db), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_transactions_arrive_in_commit_order_with_before_and_after() {
    let Some((db, config)) = setup() else { return };
    install(&db, &config).await;
    // Committed before the source's first start: already in the snapshot.
    db.isql("UPDATE PATIENT SET FNAME = 'Sean' WHERE PATNUM = 1; COMMIT;");
    let mut source = open(&config, None).await;
    let (snap, _) = snapshot(&mut source).await;
    assert_eq!(snap.len(), 6, "{snap:#?}");
    let tables: Vec<&str> = snap.iter().map(|e| e.table.as_str()).collect();
    assert_eq!(
        tables,
        [
            "provider",
            "provider",
            "patient",
            "patient",
            "patient",
            "appointment"
        ]
    );
    let p1 = snap[2].after.clone().unwrap();
    assert_eq!(
        serde_json::Value::Object(p1),
        json!({"patnum": 1, "lname": "O'Brien", "fname": "Sean", "birthdate": "1980-02-29",
               "balance": "12.50", "note": "Allergic to \"penicillin\"\nsecond line",
               "photo": "AP8Q", "created_at": "2024-03-05T14:30:00.25", "active": true,
               "weight": 71.5, "provnum": 1})
    );
    let p2 = snap[3].after.clone().unwrap();
    assert_eq!(p2["lname"], json!("Müller"));
    assert_eq!(p2["fname"], json!(null));
    assert_eq!(p2["balance"], json!("-0.75"));
    assert_eq!(p2["active"], json!(false));
    assert_eq!(
        snap[4].after.as_ref().unwrap()["balance"],
        json!("123456789012.34")
    );
    assert_eq!(
        snap[1].after.as_ref().unwrap()["name"],
        json!("Dr. 山田 太郎")
    );
    assert_eq!(
        snap[2].key,
        json!({"patnum": 1}).as_object().unwrap().clone()
    );
    assert_eq!(pending(&db), 0, "changes before the snapshot are cleared");

    // Three transactions, one after the other.
    db.isql(
        "INSERT INTO PATIENT (PATNUM, LNAME, FNAME, BIRTHDATE, BALANCE, PHOTO, CREATED_AT) \
         VALUES (4, 'Żółć \"quoted\" \\ back', 'tab	here', '1999-09-09', 0.01, x'CAFE', '2024-06-01 09:01:12.3456');
         INSERT INTO APPOINTMENT VALUES (11, 4, '2024-06-03 09:00:00', 15, 'first visit');
         COMMIT;",
    );
    db.isql(
        "UPDATE PATIENT SET LNAME = 'O''Brien-Smith', BALANCE = 0, PHOTO = NULL WHERE PATNUM = 1;
         UPDATE APPOINTMENT SET DURATION = 45 WHERE APTNUM = 10;
         COMMIT;",
    );
    db.isql("DELETE FROM APPOINTMENT WHERE APTNUM = 11; DELETE FROM PROVIDER WHERE PROVNUM = 2 AND 1 = 0; COMMIT;");
    let (batches, _) = changes(&mut source, 3, true).await;
    let ops: Vec<Vec<(String, Op)>> = batches
        .iter()
        .map(|b| b.iter().map(|e| (e.table.clone(), e.op)).collect())
        .collect();
    assert_eq!(
        ops,
        [
            vec![
                ("patient".into(), Op::Insert),
                ("appointment".into(), Op::Insert)
            ],
            vec![
                ("patient".into(), Op::Update),
                ("appointment".into(), Op::Update)
            ],
            vec![("appointment".into(), Op::Delete)],
        ]
    );
    for batch in &batches {
        let tx = batch[0].tx.clone().unwrap();
        assert!(batch.iter().all(|e| e.tx.as_deref() == Some(tx.as_str())));
    }
    let insert = &batches[0][0];
    assert_eq!(insert.before, None);
    let after = insert.after.as_ref().unwrap();
    assert_eq!(after["lname"], json!("Żółć \"quoted\" \\ back"));
    assert_eq!(after["fname"], json!("tab\there"));
    assert_eq!(after["photo"], json!("yv4="));
    assert_eq!(after["created_at"], json!("2024-06-01T09:01:12.3456"));
    assert_eq!(after["balance"], json!("0.01"));
    assert_eq!(after["note"], json!(null));
    let update = &batches[1][0];
    let before = update.before.as_ref().unwrap();
    let after = update.after.as_ref().unwrap();
    assert_eq!(before["lname"], json!("O'Brien"));
    assert_eq!(before["photo"], json!("AP8Q"));
    assert_eq!(after["lname"], json!("O'Brien-Smith"));
    assert_eq!(after["balance"], json!("0.00"));
    assert_eq!(after["photo"], json!(null));
    assert_eq!(after["note"], before["note"]);
    let delete = &batches[2][0];
    assert_eq!(delete.after, None);
    assert_eq!(
        delete.key,
        json!({"aptnum": 11}).as_object().unwrap().clone()
    );
    assert_eq!(
        delete.before.as_ref().unwrap()["note"],
        json!("first visit")
    );
    assert!(delete.commit_time.is_none());
    assert_eq!(pending(&db), 0);

    // A transaction that made its change first but commits last: read after the other,
    // and not trimmed away with it.
    let before = db.value("SELECT GEN_ID(OUTPOST_CHANGE_SEQ, 0) FROM RDB$DATABASE");
    let mut slow = db.isql_session();
    slow.send("INSERT INTO PROVIDER VALUES (7, 'Dr. Slow', 1);\n");
    outpost_testkit::wait_until(Duration::from_secs(10), "the slow insert ran", || {
        (db.value("SELECT GEN_ID(OUTPOST_CHANGE_SEQ, 0) FROM RDB$DATABASE") != before).then_some(())
    });
    db.isql("UPDATE PROVIDER SET FEE = 2 WHERE PROVNUM = 1; COMMIT;");
    let (fast, _) = changes(&mut source, 1, true).await;
    assert_eq!(fast[0][0].op, Op::Update);
    assert_eq!(
        pending(&db),
        0,
        "the open transaction's row is not visible yet"
    );
    slow.send("COMMIT;\n");
    slow.finish();
    let (late, _) = changes(&mut source, 1, true).await;
    assert_eq!(late[0][0].op, Op::Insert);
    assert_eq!(
        late[0][0].key,
        json!({"provnum": 7}).as_object().unwrap().clone()
    );
    let late_id: i64 = late[0][0].position.as_deref().unwrap().parse().unwrap();
    let fast_id: i64 = fast[0][0].position.as_deref().unwrap().parse().unwrap();
    assert!(late_id < fast_id, "the slow change has the lower id");
    assert_eq!(pending(&db), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_during_the_snapshot_are_streamed_once() {
    let Some((db, config)) = setup() else { return };
    install(&db, &config).await;
    let mut source = open(&config, None).await;
    // The first chunk (providers 1 and 2) opens the snapshot transaction.
    let first = next(&mut source).await;
    assert_eq!(first.events.len(), 2);
    source.committed(&first.position).await.unwrap();
    // Both committed after the snapshot started: the snapshot shows neither.
    db.isql("UPDATE PROVIDER SET FEE = 1 WHERE PROVNUM = 1; UPDATE PATIENT SET FNAME = 'Later' WHERE PATNUM = 3; COMMIT;");
    let (snap, _) = snapshot(&mut source).await;
    let p3 = snap
        .iter()
        .find(|e| e.table == "patient" && e.key["patnum"] == json!(3))
        .unwrap();
    assert_eq!(p3.after.as_ref().unwrap()["fname"], json!("Thị"));
    let (batches, _) = changes(&mut source, 1, true).await;
    assert_eq!(batches[0].len(), 2);
    assert_eq!(batches[0][0].after.as_ref().unwrap()["fee"], json!("1.00"));
    assert_eq!(
        batches[0][1].after.as_ref().unwrap()["fname"],
        json!("Later")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_without_loss_and_trims_only_after_committed() {
    let Some((db, config)) = setup() else { return };
    install(&db, &config).await;
    let mut source = open(&config, None).await;
    // Stop mid-snapshot: after the first chunk was committed.
    let first = next(&mut source).await;
    source.committed(&first.position).await.unwrap();
    let mid = first.position.clone();
    drop(source);
    let mut source = open(&config, Some(mid)).await;
    let (rest, stream_at) = snapshot(&mut source).await;
    assert_eq!(
        rest.len(),
        4,
        "the rest of the snapshot, not the first chunk again"
    );
    assert!(rest.iter().all(|e| e.table != "provider"));

    db.isql("INSERT INTO PROVIDER VALUES (3, 'Dr. Third', 10); COMMIT;");
    db.isql("UPDATE PROVIDER SET FEE = 11 WHERE PROVNUM = 3; COMMIT;");
    // Read both, commit neither: nothing is trimmed.
    let (seen, _) = changes(&mut source, 2, false).await;
    assert_eq!(pending(&db), 2);
    drop(source);
    // Restart from the last committed position: the same events again.
    let mut source = open(&config, Some(stream_at)).await;
    let a = next(&mut source).await;
    assert_eq!(a.events, seen[0]);
    assert_eq!(a.events[0].id, seen[0][0].id);
    let b = next(&mut source).await;
    assert_eq!(b.events, seen[1]);
    drop(source);
    assert_eq!(pending(&db), 2, "nothing committed yet");
    // The agent stored A's position, then died before `committed`: opening at it trims A.
    let mut source = open(&config, Some(a.position.clone())).await;
    assert_eq!(pending(&db), 1);
    let (left, _) = changes(&mut source, 1, true).await;
    assert_eq!(left[0], seen[1]);
    assert_eq!(pending(&db), 0);
}
