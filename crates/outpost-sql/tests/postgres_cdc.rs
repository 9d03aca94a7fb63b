#![allow(clippy::unwrap_used, clippy::expect_used)]
//! PostgreSQL change capture against a real PostgreSQL 15 (logical decoding, pgoutput):
//! snapshot, then changes in commit order with the right before/after; restarts that
//! resume without gaps or repeats of committed positions; a slot that moves on while the
//! captured tables are quiet and others are busy.

use std::path::Path;
use std::time::Duration;

use outpost_sql::{Batch, ChangeEvent, ChangeSource, Op, Position, SourceConfig};
use outpost_testkit::{skip_postgres_tests, PgDatabase};
use serde_json::json;

const SCHEMA: &str = "
CREATE TABLE provider (provnum int PRIMARY KEY, name text NOT NULL);
CREATE TABLE patient (
    patnum bigint PRIMARY KEY, lname text NOT NULL, fname text, birthdate date,
    balance numeric(14,2), photo bytea, created timestamptz, seen_at timestamp, active boolean);
ALTER TABLE patient REPLICA IDENTITY FULL;
CREATE TABLE appointment (
    aptnum int PRIMARY KEY, patnum bigint NOT NULL, provnum int, start_at timestamptz, note text);
CREATE TABLE noise (id serial PRIMARY KEY, payload text);
INSERT INTO provider VALUES (1, 'Dr. Ōkubo'), (2, 'Dr. Smith');
INSERT INTO patient VALUES
    (1, 'Müller', 'Zoë', '1980-02-29', 12.50, '\\x00ff10', '2024-03-05 14:30:00+00', '2024-03-05 09:15:00.25', true),
    (2, '山田', '太郎', NULL, NULL, NULL, NULL, NULL, NULL),
    (3, 'O''Brien', 'Seán', '2001-12-31', 12345678901.99, '\\x', '2023-01-01 00:00:00.5+00', NULL, false),
    (4, 'Nguyễn', NULL, '1955-07-04', -0.01, NULL, NULL, NULL, true),
    (5, 'Smith', 'Ann', NULL, 0, NULL, NULL, NULL, true);
INSERT INTO appointment VALUES
    (1, 1, 1, '2024-06-01 09:00:00+00', 'checkup'),
    (2, 2, NULL, NULL, NULL),
    (3, 3, 2, '2024-06-02 10:30:00+00', 'x-ray; \"quoted\"');
";

fn config(db: &PgDatabase, extra: &str) -> SourceConfig {
    toml::from_str(&format!(
        r#"url = "{}"
           mode = "cdc"
           chunk_rows = 2
           slot = "outpost_{}"
           tables = [ {{ name = "patient", key = ["patnum"] }},
                      {{ name = "appointment", key = ["aptnum"] }},
                      {{ name = "public.provider", key = ["provnum"] }} ]
           {extra}"#,
        db.url(),
        db.name()
    ))
    .unwrap()
}

async fn open(
    db: &PgDatabase,
    config: &SourceConfig,
    resume: Option<Position>,
) -> Box<dyn ChangeSource> {
    let state = tempfile::tempdir().unwrap();
    outpost_sql::open("pms", config, Path::new("."), state.path(), resume)
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

fn summary(events: &[ChangeEvent]) -> Vec<(String, &'static str, serde_json::Value)> {
    events
        .iter()
        .map(|e| {
            (
                e.table.clone(),
                e.op.as_str(),
                serde_json::Value::Object(e.key.clone()),
            )
        })
        .collect()
}

fn slot_confirmed(db: &PgDatabase) -> String {
    db.psql(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE database = current_database()",
    )
}

fn lsn(text: &str) -> u64 {
    outpost_sql::pgoutput::parse_lsn(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_changes_arrive_in_commit_order() {
    if skip_postgres_tests("snapshot_then_changes_arrive_in_commit_order") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    let config = config(&db, "");
    let mut source = open(&db, &config, None).await;
    // Committed after the slot exists and before the snapshot: in both, delivered once.
    db.psql("INSERT INTO patient (patnum, lname) VALUES (7, 'Between')");

    let (snapshot, _) = take(&mut source, 11).await;
    assert!(snapshot.iter().all(|e| e.op == Op::Snapshot));
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
            ("patient".into(), json!({"patnum": 7})),
            ("appointment".into(), json!({"aptnum": 1})),
            ("appointment".into(), json!({"aptnum": 2})),
            ("appointment".into(), json!({"aptnum": 3})),
            ("public.provider".into(), json!({"provnum": 1})),
            ("public.provider".into(), json!({"provnum": 2})),
        ]
    );
    assert_eq!(
        serde_json::Value::Object(snapshot[0].after.clone().unwrap()),
        json!({"patnum": 1, "lname": "Müller", "fname": "Zoë", "birthdate": "1980-02-29",
               "balance": "12.50", "photo": "AP8Q", "created": "2024-03-05T14:30:00Z",
               "seen_at": "2024-03-05T09:15:00.25", "active": true})
    );
    assert_eq!(
        serde_json::Value::Object(snapshot[1].after.clone().unwrap()),
        json!({"patnum": 2, "lname": "山田", "fname": "太郎", "birthdate": null,
               "balance": null, "photo": null, "created": null, "seen_at": null, "active": null})
    );
    assert_eq!(
        snapshot[2].after.as_ref().unwrap()["balance"],
        json!("12345678901.99")
    );
    assert_eq!(snapshot[2].after.as_ref().unwrap()["photo"], json!(""));

    db.psql(
        "BEGIN;
         INSERT INTO patient (patnum, lname, fname, balance) VALUES (6, 'Núñez', 'José', 99.95);
         UPDATE appointment SET note = 'moved' WHERE aptnum = 1;
         COMMIT;
         BEGIN;
         UPDATE patient SET lname = 'Yamada' WHERE patnum = 2;
         DELETE FROM appointment WHERE aptnum = 3;
         COMMIT;
         DELETE FROM patient WHERE patnum = 5;
         INSERT INTO noise (payload) VALUES ('not captured');",
    );
    let (changes, _) = take(&mut source, 5).await;
    assert_eq!(
        summary(&changes),
        vec![
            ("patient".into(), "insert", json!({"patnum": 6})),
            ("appointment".into(), "update", json!({"aptnum": 1})),
            ("patient".into(), "update", json!({"patnum": 2})),
            ("appointment".into(), "delete", json!({"aptnum": 3})),
            ("patient".into(), "delete", json!({"patnum": 5})),
        ]
    );
    // One transaction, one xid and commit time; transactions in commit order.
    assert_eq!(changes[0].tx, changes[1].tx);
    assert_eq!(changes[2].tx, changes[3].tx);
    assert_ne!(changes[0].tx, changes[2].tx);
    assert!(changes
        .iter()
        .all(|e| e.commit_time.as_deref().is_some_and(|t| t.ends_with('Z'))));
    assert!(changes.iter().all(|e| e.position.is_some()));

    let insert = &changes[0];
    assert_eq!(insert.before, None);
    assert_eq!(insert.after.as_ref().unwrap()["lname"], json!("Núñez"));
    assert_eq!(insert.after.as_ref().unwrap()["balance"], json!("99.95"));
    // Default replica identity: before holds the key only.
    assert_eq!(
        serde_json::Value::Object(changes[1].before.clone().unwrap()),
        json!({"aptnum": 1})
    );
    assert_eq!(changes[1].after.as_ref().unwrap()["note"], json!("moved"));
    // REPLICA IDENTITY FULL: before is the whole old row.
    assert_eq!(changes[2].before.as_ref().unwrap()["lname"], json!("山田"));
    assert_eq!(changes[2].before.as_ref().unwrap()["fname"], json!("太郎"));
    assert_eq!(changes[2].after.as_ref().unwrap()["lname"], json!("Yamada"));
    assert_eq!(changes[3].after, None);
    assert_eq!(
        serde_json::Value::Object(changes[3].before.clone().unwrap()),
        json!({"aptnum": 3})
    );
    assert_eq!(changes[4].after, None);
    assert_eq!(changes[4].before.as_ref().unwrap()["fname"], json!("Ann"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_resume_without_gaps_or_repeats() {
    if skip_postgres_tests("restarts_resume_without_gaps_or_repeats") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    let config = config(&db, "");

    // Mid-snapshot: one chunk committed, then the process goes away.
    let mut source = open(&db, &config, None).await;
    let batch = next(&mut source).await;
    assert_eq!(batch.all_events().unwrap().len(), 2);
    source.committed(&batch.position).await.unwrap();
    let stored = batch.position.clone();
    drop(source);
    db.psql("UPDATE patient SET fname = 'Changed' WHERE patnum = 4");

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

    // Mid-stream: a batch read but never made durable comes again.
    let mut source = open(&db, &config, Some(stored.clone())).await;
    let (replayed, stored) = take(&mut source, 1).await;
    assert_eq!(
        summary(&replayed),
        vec![("patient".into(), "update", json!({"patnum": 4}))]
    );
    db.psql("INSERT INTO appointment VALUES (10, 1, 1, NULL, 'a'); INSERT INTO appointment VALUES (11, 1, 1, NULL, 'b');");
    let batch = next(&mut source).await;
    assert_eq!(
        summary(&batch.events),
        vec![
            ("appointment".into(), "insert", json!({"aptnum": 10})),
            ("appointment".into(), "insert", json!({"aptnum": 11})),
        ]
    );
    // Not committed: dropped before the caller made it durable.
    drop(source);
    let mut source = open(&db, &config, Some(stored)).await;
    let (again, _) = take(&mut source, 2).await;
    assert_eq!(summary(&again), summary(&batch.events));
    let ids = |events: &[ChangeEvent]| {
        events
            .iter()
            .map(|e| e.id.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&batch.events), "stable ids");

    // Made durable (position stored) but the slot never heard: no repeat after restart.
    db.psql("DELETE FROM appointment WHERE aptnum = 10");
    let batch = next(&mut source).await;
    assert_eq!(
        summary(&batch.events),
        vec![("appointment".into(), "delete", json!({"aptnum": 10}))]
    );
    let stored = batch.position.clone();
    drop(source);
    let mut source = open(&db, &config, Some(stored)).await;
    db.psql("DELETE FROM appointment WHERE aptnum = 11");
    let (after, _) = take(&mut source, 1).await;
    assert_eq!(
        summary(&after),
        vec![("appointment".into(), "delete", json!({"aptnum": 11}))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_captured_tables_still_let_the_slot_advance() {
    if skip_postgres_tests("quiet_captured_tables_still_let_the_slot_advance") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    let config = config(&db, r#"heartbeat = "300ms""#);
    let mut source = open(&db, &config, None).await;
    take(&mut source, 10).await;
    let before = lsn(&slot_confirmed(&db));
    for _ in 0..20 {
        db.psql("INSERT INTO noise (payload) SELECT repeat('x', 100) FROM generate_series(1, 500)");
    }
    let busy = lsn(&db.psql("SELECT pg_current_wal_flush_lsn()"));
    assert!(busy > before);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let batch = next(&mut source).await;
        assert!(
            batch.events.is_empty(),
            "only uncaptured tables changed: {:?}",
            batch.events
        );
        source.committed(&batch.position).await.unwrap();
        let now = lsn(&slot_confirmed(&db));
        if now >= busy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed at {now:X}, WAL is at {busy:X}"
        );
    }
}

/// A snapshot far bigger than the connection's buffers, with the progress probes the agent
/// makes between batches: the snapshot streams on one connection, so a probe that queried
/// the database while the reader waited for its chunk to be taken would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_snapshot_streams_while_progress_is_probed() {
    if skip_postgres_tests("a_large_snapshot_streams_while_progress_is_probed") {
        return;
    }
    const ROWS: usize = 60_000;
    let db = PgDatabase::create();
    db.psql(SCHEMA);
    db.psql(&format!(
        "INSERT INTO patient (patnum, lname, fname, balance)
             SELECT g, 'Patient ' || g, repeat('x', 40), g / 100.0 FROM generate_series(10, {ROWS} + 4) g;
         ANALYZE patient;"
    ));
    let config = config(&db, "").clone();
    let config = SourceConfig {
        chunk_rows: 500,
        ..config
    };
    let mut source = open(&db, &config, None).await;
    let mut patients = std::collections::HashSet::new();
    let mut probes = 0;
    let mut estimated = 0;
    while patients.len() < ROWS {
        let batch = next(&mut source).await;
        let encoded = batch.encoded.as_ref().map_or(0, |e| e.ndjson.len());
        assert!(encoded <= 3 * 1024 * 1024, "an item of {encoded} bytes");
        for event in batch.all_events().unwrap() {
            assert_eq!(event.op, Op::Snapshot);
            if event.table == "patient" {
                patients.insert(event.key["patnum"].as_i64().unwrap());
            }
        }
        source.committed(&batch.position).await.unwrap();
        let progress = tokio::time::timeout(Duration::from_secs(10), source.progress())
            .await
            .expect("a progress probe answers while the snapshot streams")
            .unwrap();
        probes += 1;
        if progress.snapshotting {
            estimated = progress
                .snapshot_estimates
                .iter()
                .find(|(table, _)| table == "patient")
                .map_or(0, |(_, rows)| *rows);
        }
    }
    assert_eq!(patients.len(), ROWS, "every patient once");
    assert!(probes > 10, "{probes} probes");
    assert!(estimated >= ROWS as u64 / 2, "estimate {estimated}");
}

/// A key column that allows NULL is refused before anything is created in the database; a
/// NOT NULL column that is not the primary key is a key like any other, and a snapshot
/// resumed after a restart goes on after the last one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_that_allows_null_is_refused() {
    if skip_postgres_tests("a_key_column_that_allows_null_is_refused") {
        return;
    }
    let db = PgDatabase::create();
    db.psql(
        "CREATE TABLE chart (chartid int PRIMARY KEY, chartno text, code text NOT NULL);
         INSERT INTO chart VALUES (1, NULL, 'c1'), (2, 'x', 'c2'), (3, 'y', 'c3');",
    );
    let chart = |key: &str| -> SourceConfig {
        toml::from_str(&format!(
            r#"url = "{}"
               mode = "cdc"
               chunk_rows = 2
               slot = "outpost_{}"
               tables = [ {{ name = "chart", key = {key} }} ]"#,
            db.url(),
            db.name()
        ))
        .unwrap()
    };
    let state = tempfile::tempdir().unwrap();
    for key in [r#"["chartno"]"#, r#"["code", "chartno"]"#] {
        let err = outpost_sql::open("pms", &chart(key), Path::new("."), state.path(), None)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert_eq!(
            err,
            "source pms: table \"chart\": key column \"chartno\" allows NULL; a key must \
             identify each row: choose NOT NULL columns (such as the primary key) in \
             tables[].key, or add NOT NULL to the column"
        );
    }
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"),
        "0",
        "refused before the slot is created"
    );

    // `outpost sql check` says so too.
    let config = chart(r#"["code", "chartno"]"#);
    let needs = outpost_sql::grants::SourceNeeds::of_config("pms", &config).unwrap();
    let report = outpost_sql::check::check_postgres(
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
        [
            "NOT NULL on key column \"chartno\" of \"public\".\"chart\": it allows NULL, and a \
          key must identify each row (choose NOT NULL columns, such as the primary key, in \
          tables[].key, or add NOT NULL to the column: ALTER TABLE \"public\".\"chart\" ALTER \
          COLUMN \"chartno\" SET NOT NULL;)"
        ]
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
