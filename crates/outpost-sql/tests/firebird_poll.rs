#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Firebird `mode = "poll"` against a real Firebird 3: nothing is installed in the
//! database, the first look is a snapshot with the trigger capture's value mapping, then an
//! insert, an update and a delete are found in order; an uncommitted batch comes again
//! after a restart, a committed one does not; config mistakes are refused clearly.

use std::path::Path;
use std::time::Duration;

use outpost_sql::{Batch, ChangeSource, Op, Position, SourceConfig};
use outpost_testkit::firebird::{skip_firebird_tests, FbDatabase};
use serde_json::json;

const SCHEMA: &str = r#"
CREATE TABLE PATIENT (
  PATNUM INTEGER NOT NULL PRIMARY KEY,
  LNAME VARCHAR(100) NOT NULL,
  FNAME VARCHAR(100),
  BIRTHDATE DATE,
  BALANCE NUMERIC(15,2),
  NOTE BLOB SUB_TYPE TEXT,
  PHOTO BLOB SUB_TYPE BINARY,
  ACTIVE BOOLEAN,
  WEIGHT DOUBLE PRECISION,
  CHANGED_AT TIMESTAMP NOT NULL
);
CREATE TABLE APPOINTMENT (
  APTNUM BIGINT NOT NULL PRIMARY KEY,
  PATNUM INTEGER NOT NULL,
  START_AT TIMESTAMP NOT NULL,
  VERSION BIGINT
);
CREATE SEQUENCE APT_VERSION;
SET TERM ^ ;
CREATE TRIGGER APT_VERSION_BIU FOR APPOINTMENT BEFORE INSERT OR UPDATE AS
BEGIN
  NEW.VERSION = NEXT VALUE FOR APT_VERSION;
END^
SET TERM ; ^
COMMIT;
INSERT INTO PATIENT VALUES (1, 'O''Brien', 'Seán', '1980-02-29', 12.50, 'Allergic to "penicillin"
second line', x'00FF10', TRUE, 71.5, '2024-03-05 14:30:00.25');
INSERT INTO PATIENT VALUES (2, 'Müller', NULL, NULL, -0.75, NULL, NULL, FALSE, NULL, '2024-03-05 14:30:00.25');
INSERT INTO PATIENT VALUES (3, 'Nguyễn', 'Thị', '2001-12-31', 123456789012.34, NULL, NULL, NULL, NULL, '2024-03-06 09:00:00');
INSERT INTO APPOINTMENT (APTNUM, PATNUM, START_AT) VALUES (10, 1, '2024-06-03 08:00:00');
COMMIT;
"#;

fn config_text(db: &FbDatabase, watermark: &str) -> String {
    format!(
        r#"url = "{}"
        mode = "poll"
        interval = "100ms"
        {watermark}
        tables = [ {{ name = "patient", key = ["patnum"] }},
                   {{ name = "appointment", key = ["aptnum"], watermark = "version" }} ]"#,
        db.url()
    )
}

fn config(db: &FbDatabase) -> SourceConfig {
    let config: SourceConfig =
        toml::from_str(&config_text(db, r#"watermark = "changed_at""#)).unwrap();
    config.validate(Path::new(".")).unwrap();
    config
}

async fn open(
    config: &SourceConfig,
    state: &Path,
    resume: Option<Position>,
) -> Box<dyn ChangeSource> {
    outpost_sql::open("pms", config, Path::new("."), state, resume)
        .await
        .unwrap()
}

async fn next(source: &mut Box<dyn ChangeSource>) -> Batch {
    tokio::time::timeout(Duration::from_secs(30), source.next_batch())
        .await
        .expect("a batch within 30 s")
        .unwrap()
}

fn ops(batch: &Batch) -> Vec<(String, Op, serde_json::Value)> {
    batch
        .events
        .iter()
        .map(|e| {
            (
                e.table.clone(),
                e.op,
                serde_json::Value::Object(e.key.clone()),
            )
        })
        .collect()
}

fn installed_objects(db: &FbDatabase) -> String {
    db.value(
        "SELECT (SELECT COUNT(*) FROM RDB$RELATIONS WHERE RDB$RELATION_NAME STARTING WITH 'OUTPOST') \
         + (SELECT COUNT(*) FROM RDB$TRIGGERS WHERE RDB$TRIGGER_NAME STARTING WITH 'OUTPOST') \
         + (SELECT COUNT(*) FROM RDB$GENERATORS WHERE RDB$GENERATOR_NAME STARTING WITH 'OUTPOST') \
         FROM RDB$DATABASE",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_finds_snapshot_inserts_updates_and_deletes_and_resumes() {
    if skip_firebird_tests("firebird_poll") {
        return;
    }
    let db = FbDatabase::create();
    db.isql(SCHEMA);
    let config = config(&db);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    // First look: every row as a snapshot, in (watermark, key) order, mapped as the
    // trigger capture maps them.
    let mut source = open(&config, &state, None).await;
    let batch = next(&mut source).await;
    assert_eq!(
        ops(&batch),
        vec![
            ("patient".into(), Op::Snapshot, json!({"patnum": 1})),
            ("patient".into(), Op::Snapshot, json!({"patnum": 2})),
            ("patient".into(), Op::Snapshot, json!({"patnum": 3})),
            ("appointment".into(), Op::Snapshot, json!({"aptnum": 10})),
        ]
    );
    assert_eq!(
        serde_json::Value::Object(batch.events[0].after.clone().unwrap()),
        json!({"patnum": 1, "lname": "O'Brien", "fname": "Seán", "birthdate": "1980-02-29",
               "balance": "12.50", "note": "Allergic to \"penicillin\"\nsecond line",
               "photo": "AP8Q", "active": true, "weight": 71.5,
               "changed_at": "2024-03-05T14:30:00.25"})
    );
    assert_eq!(
        serde_json::Value::Object(batch.events[1].after.clone().unwrap()),
        json!({"patnum": 2, "lname": "Müller", "fname": null, "birthdate": null,
               "balance": "-0.75", "note": null, "photo": null, "active": false,
               "weight": null, "changed_at": "2024-03-05T14:30:00.25"})
    );
    assert_eq!(
        serde_json::Value::Object(batch.events[3].after.clone().unwrap()),
        json!({"aptnum": 10, "patnum": 1, "start_at": "2024-06-03T08:00:00", "version": 1})
    );
    assert_eq!(
        batch.events[0].position.as_deref(),
        Some("2024-03-05T14:30:00.25")
    );
    assert_eq!(batch.events[3].position.as_deref(), Some("1"));
    assert!(batch.events.iter().all(|e| e.before.is_none()));
    source.committed(&batch.position).await.unwrap();
    // Poll mode installs nothing in the database.
    assert_eq!(installed_objects(&db), "0");

    // An insert, an update, a delete.
    db.isql(
        "INSERT INTO PATIENT VALUES (4, 'Yamada', '太郎', NULL, 0.10, NULL, x'01', NULL, 80.25, '2024-07-01 10:00:00');
         COMMIT;
         UPDATE PATIENT SET LNAME = 'Mueller', BALANCE = 5.00, CHANGED_AT = '2024-07-01 10:00:01' WHERE PATNUM = 2;
         COMMIT;
         DELETE FROM PATIENT WHERE PATNUM = 3;
         COMMIT;",
    );
    let batch = next(&mut source).await;
    assert_eq!(
        ops(&batch),
        vec![
            ("patient".into(), Op::Insert, json!({"patnum": 4})),
            ("patient".into(), Op::Update, json!({"patnum": 2})),
            ("patient".into(), Op::Delete, json!({"patnum": 3})),
        ]
    );
    let [insert, update, delete] = &batch.events[..] else {
        panic!("three events")
    };
    assert_eq!(
        serde_json::Value::Object(insert.after.clone().unwrap()),
        json!({"patnum": 4, "lname": "Yamada", "fname": "太郎", "birthdate": null,
               "balance": "0.10", "note": null, "photo": "AQ==", "active": null,
               "weight": 80.25, "changed_at": "2024-07-01T10:00:00"})
    );
    assert_eq!(insert.before, None);
    assert_eq!(
        serde_json::Value::Object(update.after.clone().unwrap()),
        json!({"patnum": 2, "lname": "Mueller", "fname": null, "birthdate": null,
               "balance": "5.00", "note": null, "photo": null, "active": false,
               "weight": null, "changed_at": "2024-07-01T10:00:01"})
    );
    // Polling cannot see the old row: `before` holds the key only.
    assert_eq!(
        update.before.clone().map(serde_json::Value::Object),
        Some(json!({"patnum": 2}))
    );
    assert_eq!(
        (
            delete.before.clone().map(serde_json::Value::Object),
            &delete.after
        ),
        (Some(json!({"patnum": 3})), &None)
    );

    // Not committed: a restart finds the same changes again.
    drop(source);
    let mut source = open(&config, &state, None).await;
    let again = next(&mut source).await;
    assert_eq!(ops(&again), ops(&batch));
    assert_eq!(again.events, batch.events);
    source.committed(&again.position).await.unwrap();
    let stored = again.position.clone();
    drop(source);

    // Committed: a restart with the stored position resumes without repeats; the
    // generator-fed watermark of the other table works the same way.
    db.isql("UPDATE APPOINTMENT SET START_AT = '2024-06-03 09:00:00' WHERE APTNUM = 10; COMMIT;");
    let mut source = open(&config, &state, Some(stored)).await;
    let batch = next(&mut source).await;
    assert_eq!(
        ops(&batch),
        vec![("appointment".into(), Op::Update, json!({"aptnum": 10}))]
    );
    assert_eq!(
        serde_json::Value::Object(batch.events[0].after.clone().unwrap()),
        json!({"aptnum": 10, "patnum": 1, "start_at": "2024-06-03T09:00:00", "version": 2})
    );
    source.committed(&batch.position).await.unwrap();
    // Nothing more: the next look waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(600), source.next_batch())
            .await
            .is_err(),
        "no repeats after a committed batch"
    );
    assert_eq!(installed_objects(&db), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_refuses_config_mistakes() {
    if skip_firebird_tests("firebird_poll") {
        return;
    }
    let db = FbDatabase::create();
    db.isql(SCHEMA);
    let dir = tempfile::tempdir().unwrap();

    // No watermark for a table.
    let config: SourceConfig = toml::from_str(&config_text(&db, "")).unwrap();
    let err = config.validate(Path::new(".")).unwrap_err().to_string();
    assert!(
        err.contains("watermark") && err.contains("patient"),
        "{err}"
    );

    // A watermark column the table does not have.
    let config: SourceConfig =
        toml::from_str(&config_text(&db, r#"watermark = "updated_at""#)).unwrap();
    config.validate(Path::new(".")).unwrap();
    let err = outpost_sql::open("pms", &config, Path::new("."), dir.path(), None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("patient") && err.contains("updated_at"),
        "{err}"
    );
    assert!(!err.contains("masterkey"), "{err}");

    // A watermark column that cannot grow.
    let config: SourceConfig = toml::from_str(&config_text(&db, r#"watermark = "lname""#)).unwrap();
    let err = outpost_sql::open("pms", &config, Path::new("."), dir.path(), None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("TIMESTAMP"), "{err}");
    assert_eq!(installed_objects(&db), "0");
}

/// A key column that allows NULL is refused; a NOT NULL column (here through its domain)
/// that is not the primary key is a key like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_that_allows_null_is_refused() {
    if skip_firebird_tests("firebird_poll") {
        return;
    }
    let db = FbDatabase::create();
    db.isql(
        "CREATE DOMAIN D_CODE VARCHAR(20) NOT NULL;
         CREATE TABLE CHART (
           CHARTID INTEGER PRIMARY KEY,
           CHARTNO VARCHAR(20),
           CODE D_CODE,
           CHANGED_AT TIMESTAMP NOT NULL
         );
         COMMIT;
         INSERT INTO CHART VALUES (1, NULL, 'c1', '2024-03-05 14:30:00');
         INSERT INTO CHART VALUES (2, 'x', 'c2', '2024-03-05 14:30:00');
         COMMIT;",
    );
    let dir = tempfile::tempdir().unwrap();
    let chart = |key: &str| -> SourceConfig {
        toml::from_str(&format!(
            r#"url = "{}"
               mode = "poll"
               interval = "100ms"
               watermark = "changed_at"
               tables = [ {{ name = "chart", key = {key} }} ]"#,
            db.url()
        ))
        .unwrap()
    };
    for key in [r#"["chartno"]"#, r#"["code", "CHARTNO"]"#] {
        let err = outpost_sql::open("pms", &chart(key), Path::new("."), dir.path(), None)
            .await
            .err()
            .expect("refused")
            .to_string();
        let column = if key.contains("CHARTNO") {
            "CHARTNO"
        } else {
            "chartno"
        };
        assert_eq!(
            err,
            format!(
                "source pms: table \"chart\": key column \"{column}\" allows NULL; a key must \
                 identify each row: choose NOT NULL columns (such as the primary key) in \
                 tables[].key, or add NOT NULL to the column"
            )
        );
    }

    // The trigger capture refuses it too, before it looks for its triggers.
    let mut cdc = chart(r#"["chartno"]"#);
    cdc.mode = outpost_sql::Mode::Cdc;
    let err = outpost_sql::open("pms", &cdc, Path::new("."), dir.path(), None)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("key column \"chartno\" allows NULL"), "{err}");

    // The primary key (NOT NULL without saying so) and a NOT NULL domain are keys.
    for key in [r#"["chartid"]"#, r#"["code"]"#] {
        let state = dir.path().join(key.replace(['[', ']', '"'], ""));
        let mut source = open(&chart(key), &state, None).await;
        let batch = next(&mut source).await;
        let name = key.trim_matches(['[', ']', '"']);
        let keys: Vec<serde_json::Value> = ops(&batch).into_iter().map(|(_, _, k)| k).collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.iter().all(|k| k.get(name).is_some()), "{keys:?}");
    }
}
