#![allow(clippy::unwrap_used, clippy::expect_used)]
//! SQLite polling on a watermark: first look is a snapshot, then inserts, updates and
//! deletes; an uncommitted batch comes again after a restart, a committed one does not.

use std::path::Path;
use std::time::Duration;

use outpost_sql::{ChangeSource, Op, SourceConfig};
use rusqlite::Connection;
use serde_json::json;

fn config(db: &Path) -> SourceConfig {
    toml::from_str(&format!(
        r#"url = "sqlite:{}"
           mode = "poll"
           interval = "50ms"
           watermark = "version"
           tables = [ {{ name = "patient", key = ["patnum"] }} ]"#,
        db.display()
    ))
    .unwrap()
}

async fn next(source: &mut Box<dyn ChangeSource>) -> outpost_sql::Batch {
    tokio::time::timeout(Duration::from_secs(10), source.next_batch())
        .await
        .expect("a batch within 10 s")
        .unwrap()
}

fn ops(batch: &outpost_sql::Batch) -> Vec<(Op, serde_json::Value)> {
    batch
        .events
        .iter()
        .map(|e| (e.op, serde_json::Value::Object(e.key.clone())))
        .collect()
}

#[tokio::test]
async fn watermark_polling_finds_inserts_updates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pms.db");
    let db = Connection::open(&path).unwrap();
    db.execute_batch(
        "CREATE TABLE patient (patnum INTEGER PRIMARY KEY, lname TEXT, photo BLOB, balance REAL, version INTEGER NOT NULL);
         INSERT INTO patient VALUES (1, 'Müller', x'00ff10', 1.5, 1), (2, '山田', NULL, NULL, 2);",
    )
    .unwrap();
    let config = config(&path);
    let state = dir.path().join("state");
    let mut source = outpost_sql::open("pms", &config, Path::new("."), &state, None)
        .await
        .unwrap();

    let batch = next(&mut source).await;
    assert_eq!(
        ops(&batch),
        vec![
            (Op::Snapshot, json!({"patnum": 1})),
            (Op::Snapshot, json!({"patnum": 2}))
        ]
    );
    assert_eq!(
        serde_json::Value::Object(batch.events[0].after.clone().unwrap()),
        json!({"patnum": 1, "lname": "Müller", "photo": "AP8Q", "balance": 1.5, "version": 1})
    );
    source.committed(&batch.position).await.unwrap();

    db.execute_batch(
        "INSERT INTO patient VALUES (3, 'O''Brien', NULL, 0, 3);
         UPDATE patient SET lname = 'Yamada', version = 4 WHERE patnum = 2;
         DELETE FROM patient WHERE patnum = 1;",
    )
    .unwrap();
    let batch = next(&mut source).await;
    assert_eq!(
        ops(&batch),
        vec![
            (Op::Insert, json!({"patnum": 3})),
            (Op::Update, json!({"patnum": 2})),
            (Op::Delete, json!({"patnum": 1})),
        ]
    );
    assert_eq!(batch.events[2].after, None);
    // Not committed: a restart finds the same changes again.
    drop(source);
    let mut source = outpost_sql::open("pms", &config, Path::new("."), &state, None)
        .await
        .unwrap();
    let again = next(&mut source).await;
    assert_eq!(ops(&again), ops(&batch));
    source.committed(&again.position).await.unwrap();
    drop(source);

    let mut source = outpost_sql::open("pms", &config, Path::new("."), &state, None)
        .await
        .unwrap();
    db.execute(
        "UPDATE patient SET balance = 2, version = 5 WHERE patnum = 3",
        [],
    )
    .unwrap();
    let batch = next(&mut source).await;
    assert_eq!(ops(&batch), vec![(Op::Update, json!({"patnum": 3}))]);
}

#[tokio::test]
async fn a_key_column_that_allows_null_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pms.db");
    let db = Connection::open(&path).unwrap();
    // `INT PRIMARY KEY` is no rowid alias: SQLite lets it hold NULL.
    db.execute_batch(
        "CREATE TABLE patient (patnum INTEGER PRIMARY KEY, chartno TEXT, ssn TEXT NOT NULL, version INTEGER NOT NULL);
         CREATE TABLE recall (recallnum INT PRIMARY KEY, version INTEGER NOT NULL);
         CREATE TABLE visit (visitnum INT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE claim (claimnum INTEGER, version INTEGER NOT NULL, PRIMARY KEY (claimnum DESC));
         INSERT INTO patient VALUES (1, NULL, 'a', 1), (2, 'C-2', 'b', 2);",
    )
    .unwrap();
    let open = |tables: &str| {
        let config: SourceConfig = toml::from_str(&format!(
            r#"url = "sqlite:{}"
               mode = "poll"
               interval = "50ms"
               watermark = "version"
               tables = [ {tables} ]"#,
            path.display()
        ))
        .unwrap();
        let state = dir.path().join("state");
        async move { outpost_sql::open("pms", &config, Path::new("."), &state, None).await }
    };

    let err = open(r#"{ name = "patient", key = ["chartno"] }"#)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(
        err,
        "source pms: table \"patient\": key column \"chartno\" allows NULL; a key must identify \
         each row: choose NOT NULL columns (such as the primary key) in tables[].key, or add \
         NOT NULL to the column"
    );
    let err = open(r#"{ name = "patient", key = ["patnum", "chartno"] }"#)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("\"chartno\" allows NULL"), "{err}");
    let err = open(r#"{ name = "main.recall", key = ["recallnum"] }"#)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("table \"main.recall\": key column \"recallnum\" allows NULL"),
        "{err}"
    );

    // NOT NULL, a WITHOUT ROWID primary key and rowid aliases are keys.
    let mut source = open(
        r#"{ name = "patient", key = ["ssn"] }, { name = "visit", key = ["visitnum"] },
           { name = "claim", key = ["claimnum"] }"#,
    )
    .await
    .unwrap();
    let batch = next(&mut source).await;
    assert_eq!(
        ops(&batch),
        vec![
            (Op::Snapshot, json!({"ssn": "a"})),
            (Op::Snapshot, json!({"ssn": "b"}))
        ]
    );
}
