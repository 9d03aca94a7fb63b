#![allow(clippy::unwrap_used, clippy::expect_used)]
//! MariaDB change capture against a real MariaDB 10.11 (binlog, row format, full images):
//! snapshot, then changes in commit order with the right before/after; a change committed
//! while the snapshot runs arrives exactly once; restarts resume without gaps or repeats of
//! committed positions; the position moves on while the captured tables are quiet and others
//! are busy; added and dropped columns; clear errors for bad settings.

use std::path::Path;
use std::time::Duration;

use outpost_sql::{Batch, ChangeEvent, ChangeSource, Op, Position, SourceConfig};
use outpost_testkit::mariadb::{skip_mariadb_tests, MariaDb};
use serde_json::{json, Value};

const SCHEMA: &str = "
SET time_zone = '+00:00';
CREATE TABLE provider (provnum INT PRIMARY KEY, name VARCHAR(100) NOT NULL);
CREATE TABLE patient (
    patnum BIGINT PRIMARY KEY, lname VARCHAR(100) NOT NULL, fname VARCHAR(100), birthdate DATE,
    balance DECIMAL(14,2), photo BLOB, created TIMESTAMP(6) NULL DEFAULT NULL,
    seen_at DATETIME(2), active TINYINT(1), visits TINYINT UNSIGNED,
    status ENUM('active','inactive','archived'), ssn_hash BINARY(4));
CREATE TABLE appointment (
    aptnum INT PRIMARY KEY, patnum BIGINT NOT NULL, provnum INT, start_at DATETIME, note TEXT);
CREATE TABLE noise (id INT AUTO_INCREMENT PRIMARY KEY, payload TEXT);
INSERT INTO provider VALUES (1, 'Dr. Ōkubo'), (2, 'Dr. Smith');
INSERT INTO patient VALUES
    (1, 'Müller', 'Zoë', '1980-02-29', 12.50, x'00ff10', '2024-03-05 14:30:00', '2024-03-05 09:15:00.25', 1, 200, 'active', x'0102'),
    (2, '山田', '太郎', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, 'O''Brien', 'Seán', '2001-12-31', 12345678901.99, x'', '2023-01-01 00:00:00.5', NULL, 0, 0, 'archived', NULL),
    (4, 'Nguyễn', NULL, '1955-07-04', -0.01, NULL, NULL, NULL, 1, 255, 'inactive', NULL),
    (5, 'Smith', 'Ann', NULL, 0, NULL, NULL, NULL, 1, NULL, NULL, NULL);
INSERT INTO appointment VALUES
    (1, 1, 1, '2024-06-01 09:00:00', 'checkup'),
    (2, 2, NULL, NULL, NULL),
    (3, 3, 2, '2024-06-02 10:30:00', 'x-ray; \"quoted\" ''single''');
";

fn config(db: &MariaDb, extra: &str) -> SourceConfig {
    toml::from_str(&format!(
        r#"url = "{}"
           mode = "cdc"
           chunk_rows = 2
           tables = [ {{ name = "patient", key = ["patnum"] }},
                      {{ name = "appointment", key = ["aptnum"] }},
                      {{ name = "{}.provider", key = ["provnum"] }} ]
           {extra}"#,
        db.url(),
        db.name()
    ))
    .unwrap()
}

async fn try_open(
    config: &SourceConfig,
    resume: Option<Position>,
) -> Result<Box<dyn ChangeSource>, outpost_sql::SqlError> {
    let state = tempfile::tempdir().unwrap();
    outpost_sql::open("pms", config, Path::new("."), state.path(), resume).await
}

async fn open(
    db: &MariaDb,
    config: &SourceConfig,
    resume: Option<Position>,
) -> Box<dyn ChangeSource> {
    try_open(config, resume)
        .await
        .unwrap_or_else(|err| panic!("open: {err}\nserver log:\n{}", db.log_tail(20)))
}

async fn next(source: &mut Box<dyn ChangeSource>) -> Batch {
    tokio::time::timeout(Duration::from_secs(30), source.next_batch())
        .await
        .expect("a batch within 30 s")
        .unwrap()
}

/// Reads and commits batches until `count` events have come; returns them and the last
/// position.
async fn take(source: &mut Box<dyn ChangeSource>, count: usize) -> (Vec<ChangeEvent>, Position) {
    let mut events = Vec::new();
    let mut position = None;
    while events.len() < count {
        let batch = next(source).await;
        events.extend(batch.all_events().unwrap());
        source.committed(&batch.position).await.unwrap();
        position = Some(batch.position);
    }
    assert_eq!(
        events.len(),
        count,
        "more events than expected: {events:#?}"
    );
    (events, position.unwrap())
}

fn summary(events: &[ChangeEvent]) -> Vec<(String, &'static str, Value)> {
    events
        .iter()
        .map(|e| (e.table.clone(), e.op.as_str(), Value::Object(e.key.clone())))
        .collect()
}

fn object(row: &Option<outpost_sql::Row>) -> Value {
    row.clone().map(Value::Object).unwrap_or(Value::Null)
}

/// `file:pos` of a stored position's binlog field, as (file, pos).
fn stored_binlog(position: &Position) -> (String, u64) {
    let value: Value = serde_json::from_str(&position.0).unwrap();
    let text = value["binlog"].as_str().unwrap().to_owned();
    let (file, pos) = text.rsplit_once(':').unwrap();
    (file.to_owned(), pos.parse().unwrap())
}

fn master_status(db: &MariaDb) -> (String, u64) {
    let out = db.sql("SHOW MASTER STATUS");
    let mut fields = out.split('\t');
    let file = fields.next().unwrap().to_owned();
    let pos = fields.next().unwrap().trim().parse().unwrap();
    (file, pos)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_changes_arrive_in_commit_order() {
    if skip_mariadb_tests("snapshot_then_changes_arrive_in_commit_order") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let config = config(&db, "");
    let mut source = open(&db, &config, None).await;

    let (snapshot, _) = take(&mut source, 10).await;
    assert!(snapshot.iter().all(|e| e.op == Op::Snapshot));
    let provider = format!("{}.provider", db.name());
    let keys: Vec<_> = summary(&snapshot)
        .into_iter()
        .map(|(t, _, k)| (t, k))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("patient".into(), json!({"patnum": 1})),
            ("patient".into(), json!({"patnum": 2})),
            ("patient".into(), json!({"patnum": 3})),
            ("patient".into(), json!({"patnum": 4})),
            ("patient".into(), json!({"patnum": 5})),
            ("appointment".into(), json!({"aptnum": 1})),
            ("appointment".into(), json!({"aptnum": 2})),
            ("appointment".into(), json!({"aptnum": 3})),
            (provider.clone(), json!({"provnum": 1})),
            (provider.clone(), json!({"provnum": 2})),
        ]
    );
    let müller = json!({"patnum": 1, "lname": "Müller", "fname": "Zoë", "birthdate": "1980-02-29",
        "balance": "12.50", "photo": "AP8Q", "created": "2024-03-05T14:30:00Z",
        "seen_at": "2024-03-05T09:15:00.25", "active": 1, "visits": 200, "status": "active",
        "ssn_hash": "AQIAAA=="});
    assert_eq!(object(&snapshot[0].after), müller);
    assert_eq!(
        object(&snapshot[1].after),
        json!({"patnum": 2, "lname": "山田", "fname": "太郎", "birthdate": null,
               "balance": null, "photo": null, "created": null, "seen_at": null, "active": null,
               "visits": null, "status": null, "ssn_hash": null})
    );
    let obrien = snapshot[2].after.as_ref().unwrap();
    assert_eq!(obrien["balance"], json!("12345678901.99"));
    assert_eq!(obrien["photo"], json!(""));
    assert_eq!(obrien["created"], json!("2023-01-01T00:00:00.5Z"));
    assert_eq!(snapshot[3].after.as_ref().unwrap()["visits"], json!(255));
    assert_eq!(
        snapshot[7].after.as_ref().unwrap()["note"],
        json!("x-ray; \"quoted\" 'single'")
    );
    assert_eq!(
        snapshot[8].after.as_ref().unwrap()["name"],
        json!("Dr. Ōkubo")
    );
    assert!(snapshot[0]
        .position
        .as_deref()
        .is_some_and(|p| p.starts_with("binlog.")));

    db.sql(
        "SET time_zone = '+00:00';
         BEGIN;
         INSERT INTO patient (patnum, lname, fname, balance, created) VALUES (6, 'Núñez', 'José', 99.95, '2024-06-01 08:00:00.123456');
         UPDATE appointment SET note = 'moved', start_at = '2024-06-03 08:00:00' WHERE aptnum = 1;
         COMMIT;
         BEGIN;
         UPDATE patient SET lname = 'Yamada', visits = 201 WHERE patnum = 2;
         UPDATE patient SET fname = 'Zoé' WHERE patnum = 1;
         DELETE FROM appointment WHERE aptnum = 3;
         COMMIT;
         DELETE FROM patient WHERE patnum = 5;
         INSERT INTO noise (payload) VALUES ('not captured');
         UPDATE provider SET name = 'Dr. Ōkubo-Smith' WHERE provnum = 1;",
    );
    let (changes, _) = take(&mut source, 7).await;
    assert_eq!(
        summary(&changes),
        vec![
            ("patient".into(), "insert", json!({"patnum": 6})),
            ("appointment".into(), "update", json!({"aptnum": 1})),
            ("patient".into(), "update", json!({"patnum": 2})),
            ("patient".into(), "update", json!({"patnum": 1})),
            ("appointment".into(), "delete", json!({"aptnum": 3})),
            ("patient".into(), "delete", json!({"patnum": 5})),
            (provider.clone(), "update", json!({"provnum": 1})),
        ]
    );
    // One transaction, one GTID and commit time; transactions in commit order.
    assert_eq!(changes[0].tx, changes[1].tx);
    assert_eq!(changes[2].tx, changes[3].tx);
    assert_eq!(changes[2].tx, changes[4].tx);
    assert_ne!(changes[0].tx, changes[2].tx);
    assert_ne!(changes[4].tx, changes[5].tx);
    let gtid = changes[0].tx.as_deref().unwrap();
    assert_eq!(gtid.split('-').count(), 3, "a MariaDB GTID: {gtid}");
    assert!(changes
        .iter()
        .all(|e| e.commit_time.as_deref().is_some_and(|t| t.ends_with('Z'))));
    assert!(changes.iter().all(|e| e
        .position
        .as_deref()
        .is_some_and(|p| p.starts_with("binlog."))));
    let ids: Vec<_> = changes.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids[0], format!("{gtid}:0"));
    assert_eq!(ids[1], format!("{gtid}:1"));

    let insert = &changes[0];
    assert_eq!(insert.before, None);
    let after = insert.after.as_ref().unwrap();
    assert_eq!(after["lname"], json!("Núñez"));
    assert_eq!(after["balance"], json!("99.95"));
    assert_eq!(after["created"], json!("2024-06-01T08:00:00.123456Z"));
    assert_eq!(after["photo"], Value::Null);
    // binlog_row_image = FULL: before is the whole old row.
    assert_eq!(
        changes[1].before.as_ref().unwrap()["note"],
        json!("checkup")
    );
    assert_eq!(
        changes[1].before.as_ref().unwrap()["start_at"],
        json!("2024-06-01T09:00:00")
    );
    assert_eq!(changes[1].after.as_ref().unwrap()["note"], json!("moved"));
    assert_eq!(
        changes[1].after.as_ref().unwrap()["start_at"],
        json!("2024-06-03T08:00:00")
    );
    assert_eq!(changes[2].before.as_ref().unwrap()["lname"], json!("山田"));
    assert_eq!(changes[2].before.as_ref().unwrap()["visits"], Value::Null);
    assert_eq!(changes[2].after.as_ref().unwrap()["lname"], json!("Yamada"));
    assert_eq!(changes[2].after.as_ref().unwrap()["visits"], json!(201));
    // The binlog's before image of a row maps exactly as the snapshot did.
    assert_eq!(object(&changes[3].before), müller);
    assert_eq!(changes[3].after.as_ref().unwrap()["fname"], json!("Zoé"));
    assert_eq!(changes[4].after, None);
    assert_eq!(
        changes[4].before.as_ref().unwrap()["note"],
        json!("x-ray; \"quoted\" 'single'")
    );
    assert_eq!(changes[5].after, None);
    assert_eq!(changes[5].before.as_ref().unwrap()["fname"], json!("Ann"));
    assert_eq!(
        changes[6].after.as_ref().unwrap()["name"],
        json!("Dr. Ōkubo-Smith")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_during_the_snapshot_arrives_exactly_once() {
    if skip_mariadb_tests("a_change_committed_during_the_snapshot_arrives_exactly_once") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let config = config(&db, "");
    let mut source = open(&db, &config, None).await;
    // The snapshot transaction is open after the first chunk (patients 1 and 2).
    let first = next(&mut source).await;
    assert_eq!(first.all_events().unwrap().len(), 2);
    source.committed(&first.position).await.unwrap();
    db.sql(
        "UPDATE patient SET fname = 'After' WHERE patnum = 1;
         UPDATE patient SET fname = 'Later' WHERE patnum = 5;
         INSERT INTO patient (patnum, lname) VALUES (100, 'New');
         DELETE FROM appointment WHERE aptnum = 2;",
    );
    let (rest, _) = take(&mut source, 8).await;
    // The snapshot saw none of it: patient 5 as it was, no patient 100, appointment 2 there.
    let keys: Vec<_> = summary(&rest);
    assert_eq!(
        keys[2],
        ("patient".into(), "snapshot", json!({"patnum": 5}))
    );
    assert_eq!(rest[2].after.as_ref().unwrap()["fname"], json!("Ann"));
    assert!(rest
        .iter()
        .any(|e| e.table == "appointment" && e.key["aptnum"] == json!(2)));
    assert!(!rest
        .iter()
        .any(|e| e.key.get("patnum") == Some(&json!(100))));
    // ... and the stream gives each change once, in commit order.
    let (changes, _) = take(&mut source, 4).await;
    assert_eq!(
        summary(&changes),
        vec![
            ("patient".into(), "update", json!({"patnum": 1})),
            ("patient".into(), "update", json!({"patnum": 5})),
            ("patient".into(), "insert", json!({"patnum": 100})),
            ("appointment".into(), "delete", json!({"aptnum": 2})),
        ]
    );
    // Nothing more: a quiet stream yields at most an empty heartbeat batch.
    let quiet = tokio::time::timeout(Duration::from_secs(2), source.next_batch()).await;
    if let Ok(batch) = quiet {
        assert!(batch.unwrap().events.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_resume_without_gaps_or_repeats() {
    if skip_mariadb_tests("restarts_resume_without_gaps_or_repeats") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let config = config(&db, "");

    // Mid-snapshot: one chunk committed, then the process goes away.
    let mut source = open(&db, &config, None).await;
    let batch = next(&mut source).await;
    assert_eq!(batch.all_events().unwrap().len(), 2);
    source.committed(&batch.position).await.unwrap();
    let stored = batch.position.clone();
    drop(source);
    db.sql("UPDATE patient SET fname = 'Changed' WHERE patnum = 4");

    let mut source = open(&db, &config, Some(stored)).await;
    let (rest, stored) = take(&mut source, 8).await;
    let keys = summary(&rest);
    assert_eq!(
        keys[0],
        ("patient".into(), "snapshot", json!({"patnum": 3})),
        "resumes after the last key"
    );
    // Changed after the first snapshot, before the second: seen by the resumed snapshot,
    // and streamed again afterwards (in order), never lost.
    assert_eq!(rest[1].after.as_ref().unwrap()["fname"], json!("Changed"));
    drop(source);

    // Mid-stream: the change between the two snapshots comes from the first one's position.
    let mut source = open(&db, &config, Some(stored.clone())).await;
    let (replayed, stored) = take(&mut source, 1).await;
    assert_eq!(
        summary(&replayed),
        vec![("patient".into(), "update", json!({"patnum": 4}))]
    );
    db.sql("INSERT INTO appointment VALUES (10, 1, 1, NULL, 'a'); INSERT INTO appointment VALUES (11, 1, 1, NULL, 'b');");
    let mut read = Vec::new();
    while read.len() < 2 {
        read.extend(next(&mut source).await.events);
    }
    assert_eq!(
        summary(&read),
        vec![
            ("appointment".into(), "insert", json!({"aptnum": 10})),
            ("appointment".into(), "insert", json!({"aptnum": 11})),
        ]
    );
    // Not committed: dropped before the caller made it durable; read again, same ids.
    drop(source);
    let mut source = open(&db, &config, Some(stored)).await;
    let (again, _) = take(&mut source, 2).await;
    assert_eq!(summary(&again), summary(&read));
    let ids = |events: &[ChangeEvent]| {
        events
            .iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&read), "stable ids");

    // Made durable (position stored): no repeat after a restart.
    db.sql("DELETE FROM appointment WHERE aptnum = 10");
    let batch = next(&mut source).await;
    assert_eq!(
        summary(&batch.events),
        vec![("appointment".into(), "delete", json!({"aptnum": 10}))]
    );
    let stored = batch.position.clone();
    drop(source);
    let mut source = open(&db, &config, Some(stored)).await;
    db.sql("DELETE FROM appointment WHERE aptnum = 11");
    let (after, _) = take(&mut source, 1).await;
    assert_eq!(
        summary(&after),
        vec![("appointment".into(), "delete", json!({"aptnum": 11}))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_captured_tables_still_move_the_position() {
    if skip_mariadb_tests("quiet_captured_tables_still_move_the_position") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let config = config(&db, r#"heartbeat = "300ms""#);
    let mut source = open(&db, &config, None).await;
    take(&mut source, 10).await;
    let start = master_status(&db);
    for i in 0..20 {
        db.sql(&format!(
            "INSERT INTO noise (payload) VALUES (REPEAT('{i}', 100))"
        ));
    }
    let busy = master_status(&db);
    assert!(busy.1 > start.1 || busy.0 != start.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let batch = next(&mut source).await;
        assert!(
            batch.events.is_empty(),
            "only uncaptured tables changed: {:?}",
            batch.events
        );
        source.committed(&batch.position).await.unwrap();
        let now = stored_binlog(&batch.position);
        // Other tests write to the same server's binlog: at or past it.
        if now >= busy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the position stayed at {now:?}, the binlog is at {busy:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_dropped_columns_are_handled_or_reported() {
    if skip_mariadb_tests("added_and_dropped_columns_are_handled_or_reported") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let config = config(&db, "");
    let mut source = open(&db, &config, None).await;
    take(&mut source, 10).await;
    // The last chunk was full: one more read ends the snapshot (and its transaction, whose
    // metadata lock would hold the ALTER TABLE below).
    let done = next(&mut source).await;
    assert!(done.events.is_empty());

    // Added while streaming: the new column's name is read again and appears.
    db.sql(
        "ALTER TABLE appointment ADD COLUMN room VARCHAR(10);
         INSERT INTO appointment VALUES (20, 1, 1, NULL, 'with room', 'B2');",
    );
    let (added, stored) = take(&mut source, 1).await;
    assert_eq!(added[0].after.as_ref().unwrap()["room"], json!("B2"));
    drop(source);

    // Written before a column was dropped, read after: the names cannot be matched, and
    // the error says so.
    db.sql(
        "INSERT INTO appointment VALUES (21, 1, 1, NULL, 'before the drop', 'C3');
         ALTER TABLE appointment DROP COLUMN note;",
    );
    let mut source = open(&db, &config, Some(stored)).await;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(30), source.next_batch())
            .await
            .expect("an answer within 30 s")
        {
            Ok(batch) => assert!(batch.events.is_empty(), "{:?}", batch.events),
            Err(err) => break err.to_string(),
        }
    };
    assert!(
        err.contains("table appointment") && err.contains("6 columns") && err.contains("5"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_give_clear_errors_without_the_password() {
    if skip_mariadb_tests("bad_settings_give_clear_errors_without_the_password") {
        return;
    }
    let db = MariaDb::create();
    db.sql(SCHEMA);
    let wrong: SourceConfig = toml::from_str(&format!(
        r#"url = "{}"
           tables = [ {{ name = "patient", key = ["patnum"] }} ]"#,
        db.url().replace(db.password(), "wrong-pw-123")
    ))
    .unwrap();
    let err = try_open(&wrong, None).await.err().unwrap().to_string();
    assert!(
        err.contains("Access denied") && !err.contains("wrong-pw-123"),
        "{err}"
    );
    let missing: SourceConfig = toml::from_str(&format!(
        r#"url = "{}"
           tables = [ {{ name = "no_such_table", key = ["id"] }} ]"#,
        db.url().replace("mysql://", "mariadb://")
    ))
    .unwrap();
    let err = try_open(&missing, None).await.err().unwrap().to_string();
    assert!(
        err.contains("no_such_table")
            && err.contains("does not exist")
            && !err.contains(db.password()),
        "{err}"
    );
    let no_key: SourceConfig = toml::from_str(&format!(
        r#"url = "{}"
           tables = [ {{ name = "patient", key = ["nope"] }} ]"#,
        db.url()
    ))
    .unwrap();
    let err = try_open(&no_key, None).await.err().unwrap().to_string();
    assert!(err.contains("has no column \"nope\""), "{err}");
}

/// A key column that allows NULL is refused; a NOT NULL column that is not the primary key
/// is a key like any other, and a snapshot resumed after a restart goes on after the last
/// one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_that_allows_null_is_refused() {
    if skip_mariadb_tests("a_key_column_that_allows_null_is_refused") {
        return;
    }
    let db = MariaDb::create();
    db.sql(
        "CREATE TABLE chart (chartid INT PRIMARY KEY, chartno VARCHAR(20), code VARCHAR(20) NOT NULL);
         INSERT INTO chart VALUES (1, NULL, 'c1'), (2, 'x', 'c2'), (3, 'y', 'c3');",
    );
    let chart = |key: &str| -> SourceConfig {
        toml::from_str(&format!(
            r#"url = "{}"
               mode = "cdc"
               chunk_rows = 2
               tables = [ {{ name = "chart", key = {key} }} ]"#,
            db.url()
        ))
        .unwrap()
    };
    for key in [r#"["chartno"]"#, r#"["code", "chartno"]"#] {
        let err = try_open(&chart(key), None).await.err().unwrap().to_string();
        assert_eq!(
            err,
            "source pms: table \"chart\": key column \"chartno\" allows NULL; a key must \
             identify each row: choose NOT NULL columns (such as the primary key) in \
             tables[].key, or add NOT NULL to the column"
        );
    }

    // `outpost sql check` says so too.
    let config = chart(r#"["code", "chartno"]"#);
    let needs = outpost_sql::grants::SourceNeeds::of_config("pms", &config).unwrap();
    let report = outpost_sql::check::check_mysql(
        &config.url,
        None,
        &outpost_sql::check::Needs::source(&needs),
    )
    .await
    .unwrap();
    let keys: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.what.contains("key column"))
        .map(|f| f.what.as_str())
        .collect();
    assert_eq!(
        keys,
        [format!(
            "NOT NULL on key column `chartno` of `{}`.`chart`: it allows NULL, and a key must \
             identify each row (choose NOT NULL columns, such as the primary key, in \
             tables[].key, or add NOT NULL to the column)",
            db.name()
        )]
    );

    let config = chart(r#"["code"]"#);
    let mut source = open(&db, &config, None).await;
    let first = next(&mut source).await;
    assert_eq!(
        summary(&first.all_events().unwrap()),
        vec![
            ("chart".into(), "snapshot", json!({"code": "c1"})),
            ("chart".into(), "snapshot", json!({"code": "c2"})),
        ]
    );
    source.committed(&first.position).await.unwrap();
    drop(source);
    let mut source = open(&db, &config, Some(first.position)).await;
    let rest = next(&mut source).await;
    assert_eq!(
        summary(&rest.all_events().unwrap()),
        vec![("chart".into(), "snapshot", json!({"code": "c3"}))]
    );
}
