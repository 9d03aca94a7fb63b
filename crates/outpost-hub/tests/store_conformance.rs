//! One set of behaviour tests for the hub's `Store`, written once over `Arc<dyn Store>` and
//! run against both backends: SQLite in a temporary folder (`sqlite::…`) and a real
//! PostgreSQL 15 on loopback (`postgres::…`, one fresh database per test; see `support/`).
//! `OUTPOST_PEERS=skip` skips the PostgreSQL half and says so.

// The behaviour tests are plain async functions called by generated #[tokio::test]s, which
// clippy's allow-unwrap-in-tests does not see as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use outpost_hub::store::postgres::PostgresStore;
use outpost_hub::store::sqlite::SqliteStore;
use outpost_hub::store::{
    AccessRecord, AgentRecord, DownMessage, InventoryUpdate, JobChange, JobChunk, JobRecord,
    MessageFilter, MirroredLine, NewMessage, RolloutRecord, StaffRecord, Store, StoredMessage,
    TokenRefusal,
};

/// Where a test's store lives.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(support::PgDatabase),
}

impl Backend {
    fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().expect("a temporary folder for hub.db"))
    }

    /// `None` when peer tests are skipped.
    fn postgres(test: &str) -> Option<Backend> {
        if support::skip_peer_tests(test) {
            return None;
        }
        Some(Backend::Postgres(support::PgDatabase::create()))
    }

    /// Opens the store; again on the same backend, it opens the same data.
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => {
                Arc::new(SqliteStore::open(dir.path()).unwrap_or_else(|err| {
                    panic!("opening SQLite in {}: {err}", dir.path().display())
                }))
            }
            Backend::Postgres(db) => {
                Arc::new(PostgresStore::open(&db.url()).await.unwrap_or_else(|err| {
                    panic!(
                        "opening PostgreSQL: {err}\nserver log tail:\n{}",
                        db.log_tail(20)
                    )
                }))
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// Runs each test function below once per backend, as `sqlite::<name>` and
/// `postgres::<name>`; an optional attribute (such as `#[ignore]`) applies to one backend only.
macro_rules! on_both_backends {
    ($($name:ident $(, sqlite: #[$sqlite_attr:meta])? $(, postgres: #[$pg_attr:meta])? ;)*) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$sqlite_attr])?
                async fn $name() {
                    super::$name(&super::Backend::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                $(#[$pg_attr])?
                async fn $name() {
                    let test = concat!("postgres::", stringify!($name));
                    let Some(backend) = super::Backend::postgres(test) else { return };
                    super::$name(&backend).await;
                }
            )*
        }
    };
}

on_both_backends! {
    token_is_consumed_once;
    token_is_expired_at_and_after_its_expiry;
    unknown_token_is_refused;
    used_token_stays_reused_after_its_expiry;
    concurrent_consumers_get_a_token_once;
    duplicate_token_hash_is_an_error;
    agents_round_trip_and_list_by_name_in_byte_order;
    unknown_agent_is_none;
    duplicate_agent_id_is_an_error;
    revoking_an_agent_marks_it_once;
    inventory_update_stores_the_json_and_last_seen;
    same_item_twice_is_stored_once;
    item_ids_are_per_agent;
    inserting_messages_marks_the_agent_seen;
    cursors_grow_in_insert_order_and_page_with_after;
    last_cursor_is_zero_when_empty_then_the_highest;
    messages_filter_by_agent_and_source;
    msg_type_filter_matches_by_component;
    msg_type_filter_is_literal_and_case_sensitive;
    limit_caps_a_page;
    payload_is_returned_only_when_asked;
    recent_messages_are_newest_first_without_payload;
    concurrent_writers_never_hide_a_message_from_a_reader;
    api_key_is_found_by_hash;
    down_round_trips;
    open_downs_are_accepted_and_queued_oldest_first;
    update_down_sets_state_keeps_item_id_and_replaces_error;
    update_down_of_another_agent_changes_nothing;
    reopened_store_keeps_its_data;
    text_with_a_nul_character_is_stored,
        postgres: #[ignore = "PostgreSQL TEXT cannot hold U+0000; the hub replaces control characters in agent metadata before storing (session.rs, clean_text)"];
    staff_names_are_unique_and_listed_by_name;
    staff_is_found_by_token_unless_disabled;
    job_key_seed_is_the_first_candidate_stored;
    job_key_seeds_race_to_one_winner;
    rollout_round_trips_and_changes_state;
    job_round_trips_every_field;
    rollout_jobs_are_in_creation_order_and_recent_jobs_newest_first;
    duplicate_job_id_is_an_error_and_inserts_nothing;
    jobs_to_send_are_pending_unexpired_jobs_of_the_given_agents_oldest_first;
    jobs_to_send_takes_thousands_of_agent_ids;
    release_jobs_moves_the_oldest_queued_jobs_up_to_count;
    concurrent_releases_never_release_a_job_twice;
    update_jobs_replaces_some_fields_keeps_none_and_ignores_final_and_foreign_jobs;
    request_cancel_marks_open_jobs_only_and_jobs_to_cancel_lists_them;
    job_output_skips_duplicates_and_pages_in_order;
    mirror_state_is_empty_for_an_unknown_agent;
    audit_lines_are_kept_once_and_move_the_mirror_position;
    mirror_problem_is_set_and_cleared;
    access_log_is_newest_first;
    only_postgres_has_job_notifications;
    blob_upload_grows_in_order;
    blob_append_at_a_wrong_offset_changes_nothing;
    blob_append_beyond_the_total_is_refused;
    blob_begin_with_another_total_restarts_the_upload;
    blob_parts_round_trip_byte_identical_and_page_from_an_offset;
    blob_uploads_of_one_item_id_are_per_agent;
    blob_upload_resumes_in_another_store;
    concurrent_blob_appends_at_one_offset_store_one_part;
}

// ---- tokens ----

async fn token_is_consumed_once(b: &Backend) {
    let store = b.open().await;
    store.create_token("hash-1", "site-a", 2_000).await.unwrap();
    let first = store.consume_token("hash-1", 1_000).await.unwrap();
    assert_eq!(first, Ok("site-a".to_owned()), "{}: first use", b.name());
    let second = store.consume_token("hash-1", 1_001).await.unwrap();
    assert_eq!(
        second,
        Err(TokenRefusal::Reused),
        "{}: second use",
        b.name()
    );
}

async fn token_is_expired_at_and_after_its_expiry(b: &Backend) {
    let store = b.open().await;
    store.create_token("hash-1", "site-a", 2_000).await.unwrap();
    for now in [2_000, 2_001] {
        let verdict = store.consume_token("hash-1", now).await.unwrap();
        assert_eq!(
            verdict,
            Err(TokenRefusal::Expired),
            "{}: token expiring at 2000, used at {now}",
            b.name()
        );
    }
}

async fn unknown_token_is_refused(b: &Backend) {
    let store = b.open().await;
    store.create_token("hash-1", "site-a", 2_000).await.unwrap();
    let verdict = store.consume_token("hash-2", 1_000).await.unwrap();
    assert_eq!(verdict, Err(TokenRefusal::Unknown), "{}", b.name());
}

async fn used_token_stays_reused_after_its_expiry(b: &Backend) {
    let store = b.open().await;
    store.create_token("hash-1", "site-a", 2_000).await.unwrap();
    store.consume_token("hash-1", 1_000).await.unwrap().unwrap();
    let verdict = store.consume_token("hash-1", 3_000).await.unwrap();
    assert_eq!(verdict, Err(TokenRefusal::Reused), "{}", b.name());
}

async fn concurrent_consumers_get_a_token_once(b: &Backend) {
    let store = b.open().await;
    store.create_token("hash-1", "site-a", 2_000).await.unwrap();
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.consume_token("hash-1", 1_000).await })
        })
        .collect();
    let mut verdicts = Vec::new();
    for t in tries {
        verdicts.push(t.await.unwrap().unwrap());
    }
    let accepted = verdicts.iter().filter(|v| v.is_ok()).count();
    let reused = verdicts
        .iter()
        .filter(|v| **v == Err(TokenRefusal::Reused))
        .count();
    assert_eq!(
        (accepted, reused),
        (1, 7),
        "{}: 8 concurrent uses of one token gave {verdicts:?}",
        b.name()
    );
}

async fn duplicate_token_hash_is_an_error(b: &Backend) {
    let store = b.open().await;
    store.create_token("hash-1", "site-a", 2_000).await.unwrap();
    let again = store.create_token("hash-1", "site-b", 3_000).await;
    assert!(
        again.is_err(),
        "{}: second token with the same hash was accepted",
        b.name()
    );
    let verdict = store.consume_token("hash-1", 1_000).await.unwrap();
    assert_eq!(verdict, Ok("site-a".to_owned()), "{}", b.name());
}

// ---- agents ----

async fn agents_round_trip_and_list_by_name_in_byte_order(b: &Backend) {
    let store = b.open().await;
    for (id, name) in [
        ("agt_3", "beta"),
        ("agt_2", "alpha"),
        ("agt_1", "Alpha"),
        ("agt_0", "alpha"),
    ] {
        store.insert_agent(&agent(id, name)).await.unwrap();
    }
    let listed: Vec<(String, String)> = store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.id))
        .collect();
    let expected = [
        ("Alpha", "agt_1"),
        ("alpha", "agt_0"),
        ("alpha", "agt_2"),
        ("beta", "agt_3"),
    ]
    .map(|(n, i)| (n.to_owned(), i.to_owned()));
    assert_eq!(
        listed,
        expected,
        "{}: agents by name (bytes), then id",
        b.name()
    );
    let got = store
        .agent("agt_2")
        .await
        .unwrap()
        .expect("agt_2 was inserted");
    assert_eq!(
        agent_fields(&got),
        agent_fields(&agent("agt_2", "alpha")),
        "{}",
        b.name()
    );
}

async fn unknown_agent_is_none(b: &Backend) {
    let store = b.open().await;
    store.insert_agent(&agent("agt_1", "site")).await.unwrap();
    assert!(
        store.agent("agt_2").await.unwrap().is_none(),
        "{}",
        b.name()
    );
}

async fn duplicate_agent_id_is_an_error(b: &Backend) {
    let store = b.open().await;
    store.insert_agent(&agent("agt_1", "site")).await.unwrap();
    let again = store.insert_agent(&agent("agt_1", "other")).await;
    assert!(
        again.is_err(),
        "{}: second agent with the same id was accepted",
        b.name()
    );
}

async fn revoking_an_agent_marks_it_once(b: &Backend) {
    let store = b.open().await;
    store.insert_agent(&agent("agt_1", "site")).await.unwrap();
    assert!(
        store.revoke_agent("agt_1", 7_000).await.unwrap(),
        "{}: first revoke",
        b.name()
    );
    assert!(
        !store.revoke_agent("agt_1", 8_000).await.unwrap(),
        "{}: second revoke",
        b.name()
    );
    assert!(
        !store.revoke_agent("agt_9", 8_000).await.unwrap(),
        "{}: unknown agent",
        b.name()
    );
    let got = store
        .agent("agt_1")
        .await
        .unwrap()
        .expect("agt_1 was inserted");
    assert_eq!(
        got.revoked_at_ms,
        Some(7_000),
        "{}: the first revocation's time",
        b.name()
    );
}

async fn inventory_update_stores_the_json_and_last_seen(b: &Backend) {
    let store = b.open().await;
    store.insert_agent(&agent("agt_1", "site")).await.unwrap();
    let inventory = serde_json::json!({
        "version": "0.1.0",
        "host": "ward-5 ☃",
        "connectors": [{"name": "lab-in", "queued": 3}],
        "big": 9_007_199_254_740_993_u64,
        "ratio": 0.25,
        "nothing": null,
        "nul": "a\u{0}b",
    });
    store
        .update_inventories(&[InventoryUpdate {
            agent_id: "agt_1".into(),
            inventory: inventory.clone(),
            seen_ms: 9_000,
        }])
        .await
        .unwrap();
    store
        .update_inventories(&[InventoryUpdate {
            agent_id: "agt_9".into(),
            inventory: inventory.clone(),
            seen_ms: 9_000,
        }])
        .await
        .unwrap();
    let got = store
        .agent("agt_1")
        .await
        .unwrap()
        .expect("agt_1 was inserted");
    assert_eq!(got.inventory.as_ref(), Some(&inventory), "{}", b.name());
    assert_eq!(got.last_seen_ms, Some(9_000), "{}", b.name());
}

// ---- messages ----

async fn same_item_twice_is_stored_once(b: &Backend) {
    let store = b.open().await;
    let first = store
        .insert_messages(
            "agt_1",
            &[msg(1, "lab-in", None), msg(2, "lab-in", None)],
            10,
        )
        .await
        .unwrap();
    let second = store
        .insert_messages(
            "agt_1",
            &[
                msg(2, "lab-in", None),
                msg(3, "lab-in", None),
                msg(3, "lab-in", None),
            ],
            11,
        )
        .await
        .unwrap();
    assert_eq!(
        (first, second),
        (2, 1),
        "{}: new counts of the two batches",
        b.name()
    );
    let stored = store.messages(&all()).await.unwrap();
    assert_eq!(
        items(&stored),
        [("agt_1", 1), ("agt_1", 2), ("agt_1", 3)].map(owned),
        "{}",
        b.name()
    );
    assert_eq!(
        stored[1].stored_at_ms,
        10,
        "{}: the first copy is kept",
        b.name()
    );
}

async fn item_ids_are_per_agent(b: &Backend) {
    let store = b.open().await;
    store
        .insert_messages("agt_1", &[msg(1, "lab-in", None)], 10)
        .await
        .unwrap();
    let new = store
        .insert_messages("agt_2", &[msg(1, "lab-in", None)], 10)
        .await
        .unwrap();
    assert_eq!(new, 1, "{}: item 1 of another agent is new", b.name());
    let stored = store.messages(&all()).await.unwrap();
    assert_eq!(
        items(&stored),
        [("agt_1", 1), ("agt_2", 1)].map(owned),
        "{}",
        b.name()
    );
}

async fn inserting_messages_marks_the_agent_seen(b: &Backend) {
    let store = b.open().await;
    store.insert_agent(&agent("agt_1", "site")).await.unwrap();
    store
        .insert_messages("agt_1", &[msg(1, "lab-in", None)], 12_345)
        .await
        .unwrap();
    let got = store
        .agent("agt_1")
        .await
        .unwrap()
        .expect("agt_1 was inserted");
    assert_eq!(got.last_seen_ms, Some(12_345), "{}", b.name());
}

async fn cursors_grow_in_insert_order_and_page_with_after(b: &Backend) {
    let store = b.open().await;
    store
        .insert_messages("agt_1", &[msg(5, "a", None), msg(3, "a", None)], 10)
        .await
        .unwrap();
    store
        .insert_messages("agt_2", &[msg(1, "a", None)], 11)
        .await
        .unwrap();
    store
        .insert_messages("agt_1", &[msg(3, "a", None), msg(4, "a", None)], 12)
        .await
        .unwrap();
    let stored = store.messages(&all()).await.unwrap();
    assert_eq!(
        items(&stored),
        [("agt_1", 5), ("agt_1", 3), ("agt_2", 1), ("agt_1", 4)].map(owned),
        "{}: stream order is insert order",
        b.name()
    );
    let cursors: Vec<i64> = stored.iter().map(|m| m.cursor).collect();
    assert!(
        cursors.windows(2).all(|w| w[0] < w[1]) && cursors[0] > 0,
        "{}: cursors {cursors:?}",
        b.name()
    );
    let after_second = store
        .messages(&MessageFilter {
            after: cursors[1],
            ..all()
        })
        .await
        .unwrap();
    assert_eq!(
        items(&after_second),
        [("agt_2", 1), ("agt_1", 4)].map(owned),
        "{}",
        b.name()
    );
    let after_last = store
        .messages(&MessageFilter {
            after: cursors[3],
            ..all()
        })
        .await
        .unwrap();
    assert!(
        after_last.is_empty(),
        "{}: nothing after the last cursor",
        b.name()
    );
}

async fn last_cursor_is_zero_when_empty_then_the_highest(b: &Backend) {
    let store = b.open().await;
    assert_eq!(
        store.last_cursor().await.unwrap(),
        0,
        "{}: empty store",
        b.name()
    );
    store
        .insert_messages("agt_1", &[msg(1, "a", None), msg(2, "a", None)], 10)
        .await
        .unwrap();
    let stored = store.messages(&all()).await.unwrap();
    assert_eq!(
        store.last_cursor().await.unwrap(),
        stored[1].cursor,
        "{}",
        b.name()
    );
}

async fn messages_filter_by_agent_and_source(b: &Backend) {
    let store = b.open().await;
    store
        .insert_messages(
            "agt_1",
            &[msg(1, "lab-in", None), msg(2, "adt-in", None)],
            10,
        )
        .await
        .unwrap();
    store
        .insert_messages(
            "agt_2",
            &[msg(1, "lab-in", None), msg(2, "adt-in", None)],
            10,
        )
        .await
        .unwrap();
    let by_agent = store
        .messages(&MessageFilter {
            agent_id: Some("agt_2".into()),
            ..all()
        })
        .await
        .unwrap();
    assert_eq!(
        items(&by_agent),
        [("agt_2", 1), ("agt_2", 2)].map(owned),
        "{}: agent",
        b.name()
    );
    let by_source = store
        .messages(&MessageFilter {
            source: Some("lab-in".into()),
            ..all()
        })
        .await
        .unwrap();
    assert_eq!(
        items(&by_source),
        [("agt_1", 1), ("agt_2", 1)].map(owned),
        "{}: source",
        b.name()
    );
    let both = store
        .messages(&MessageFilter {
            agent_id: Some("agt_1".into()),
            source: Some("adt-in".into()),
            ..all()
        })
        .await
        .unwrap();
    assert_eq!(
        items(&both),
        [("agt_1", 2)].map(owned),
        "{}: agent and source",
        b.name()
    );
}

async fn msg_type_filter_matches_by_component(b: &Backend) {
    let store = b.open().await;
    let types = [
        Some("ORU^R01"),
        Some("ORU^R01^ORU_R01"),
        Some("ORU^R011"),
        Some("ORU"),
        Some("ORUX^R01"),
        Some("ADT^A01"),
        None,
    ];
    let batch: Vec<NewMessage> = types
        .iter()
        .enumerate()
        .map(|(i, t)| msg(i as i64, "lab-in", *t))
        .collect();
    store.insert_messages("agt_1", &batch, 10).await.unwrap();
    for (filter, expected) in [
        ("ORU", vec!["ORU^R01", "ORU^R01^ORU_R01", "ORU^R011", "ORU"]),
        ("ORU^R01", vec!["ORU^R01", "ORU^R01^ORU_R01"]),
        ("ORU^R01^ORU_R01", vec!["ORU^R01^ORU_R01"]),
        ("ADT^A01", vec!["ADT^A01"]),
        ("ORM", vec![]),
    ] {
        let got = types_matching(&*store, filter).await;
        assert_eq!(got, expected, "{}: msg_type filter {filter:?}", b.name());
    }
}

async fn msg_type_filter_is_literal_and_case_sensitive(b: &Backend) {
    let store = b.open().await;
    let batch = [
        msg(1, "lab-in", Some("ORU^R01")),
        msg(2, "lab-in", Some("ADT^A01^ADT_A01")),
    ];
    store.insert_messages("agt_1", &batch, 10).await.unwrap();
    let mut wrong = Vec::new();
    for filter in ["oru", "Oru^R01", "AD_", "AD_^A01", "%", "ORU%", "adt^a01"] {
        let got = types_matching(&*store, filter).await;
        if !got.is_empty() {
            wrong.push(format!("{filter:?} matched {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}: these msg_type filters should match nothing among ORU^R01 and ADT^A01^ADT_A01: {}",
        b.name(),
        wrong.join("; ")
    );
}

async fn limit_caps_a_page(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<NewMessage> = (1..=5).map(|i| msg(i, "a", None)).collect();
    store.insert_messages("agt_1", &batch, 10).await.unwrap();
    let first = store
        .messages(&MessageFilter { limit: 2, ..all() })
        .await
        .unwrap();
    assert_eq!(
        items(&first),
        [("agt_1", 1), ("agt_1", 2)].map(owned),
        "{}: page 1",
        b.name()
    );
    let second = store
        .messages(&MessageFilter {
            limit: 2,
            after: first[1].cursor,
            ..all()
        })
        .await
        .unwrap();
    assert_eq!(
        items(&second),
        [("agt_1", 3), ("agt_1", 4)].map(owned),
        "{}: page 2",
        b.name()
    );
    let none = store
        .messages(&MessageFilter { limit: 0, ..all() })
        .await
        .unwrap();
    assert!(none.is_empty(), "{}: limit 0", b.name());
}

async fn payload_is_returned_only_when_asked(b: &Backend) {
    let store = b.open().await;
    let bytes: Vec<u8> = (0..=255).collect();
    let message = NewMessage {
        payload: bytes.clone(),
        ..msg(1, "lab-in", Some("ORU^R01"))
    };
    store
        .insert_messages("agt_1", &[message], 10)
        .await
        .unwrap();
    let without = store.messages(&all()).await.unwrap();
    assert_eq!(
        without[0].payload_base64,
        None,
        "{}: without payload",
        b.name()
    );
    let with = store
        .messages(&MessageFilter {
            with_payload: true,
            ..all()
        })
        .await
        .unwrap();
    let expected = base64::engine::general_purpose::STANDARD.encode(&bytes);
    assert_eq!(
        with[0].payload_base64.as_deref(),
        Some(expected.as_str()),
        "{}",
        b.name()
    );
    let m = &with[0];
    assert_eq!(
        (
            m.kind.as_str(),
            m.msg_type.as_deref(),
            m.control_id.as_deref(),
            m.received_at_ms,
            m.stored_at_ms
        ),
        ("hl7", Some("ORU^R01"), Some("CTRL1"), 1_001, 10),
        "{}: the other fields",
        b.name()
    );
}

async fn recent_messages_are_newest_first_without_payload(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<NewMessage> = (1..=4).map(|i| msg(i, "a", None)).collect();
    store.insert_messages("agt_1", &batch, 10).await.unwrap();
    store
        .insert_messages("agt_2", &[msg(9, "a", None)], 11)
        .await
        .unwrap();
    let recent = store.recent_messages("agt_1", 3).await.unwrap();
    assert_eq!(
        items(&recent),
        [("agt_1", 4), ("agt_1", 3), ("agt_1", 2)].map(owned),
        "{}",
        b.name()
    );
    assert!(
        recent.iter().all(|m| m.payload_base64.is_none()),
        "{}: no payloads",
        b.name()
    );
    assert!(
        store.recent_messages("agt_3", 3).await.unwrap().is_empty(),
        "{}: unknown agent",
        b.name()
    );
}

async fn concurrent_writers_never_hide_a_message_from_a_reader(b: &Backend) {
    const WRITERS: i64 = 4;
    const BATCHES: i64 = 25;
    const PER_BATCH: i64 = 3;
    let store = b.open().await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for batch in 0..BATCHES {
                    let msgs: Vec<NewMessage> = (0..PER_BATCH)
                        .map(|i| msg(batch * PER_BATCH + i, "a", None))
                        .collect();
                    store
                        .insert_messages(&format!("agt_{w}"), &msgs, 10)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // A reader that follows the stream by cursor, as the data API's clients do, must end up
    // with every message: a cursor must never become visible before a smaller one.
    let read = async {
        let (mut seen, mut after) = (HashSet::new(), 0);
        loop {
            let is_done = writers.iter().all(|w| w.is_finished());
            let page = store
                .messages(&MessageFilter { after, ..all() })
                .await
                .unwrap();
            for m in &page {
                assert!(
                    m.cursor > after,
                    "{}: cursor {} after {after}",
                    b.name(),
                    m.cursor
                );
                seen.insert((m.agent_id.clone(), m.item_id));
                after = m.cursor;
            }
            if is_done && page.is_empty() {
                return seen;
            }
            tokio::task::yield_now().await;
        }
    };
    let seen = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or_else(|_| panic!("{}: writers did not finish within 60 s", b.name()));
    for w in writers {
        w.await.unwrap();
    }
    let total = store.messages(&all()).await.unwrap().len();
    assert_eq!(
        (seen.len(), total),
        (
            (WRITERS * BATCHES * PER_BATCH) as usize,
            (WRITERS * BATCHES * PER_BATCH) as usize
        ),
        "{}: messages the cursor-following reader saw, and messages stored",
        b.name()
    );
}

// ---- api keys ----

async fn api_key_is_found_by_hash(b: &Backend) {
    let store = b.open().await;
    store
        .create_api_key("key-hash-1", "lab app", 10)
        .await
        .unwrap();
    let found = store.api_key("key-hash-1").await.unwrap();
    assert_eq!(found.as_deref(), Some("lab app"), "{}", b.name());
    assert_eq!(
        store.api_key("key-hash-2").await.unwrap(),
        None,
        "{}: unknown",
        b.name()
    );
    assert!(
        store
            .create_api_key("key-hash-1", "again", 11)
            .await
            .is_err(),
        "{}: duplicate",
        b.name()
    );
}

// ---- down messages ----

async fn down_round_trips(b: &Backend) {
    let store = b.open().await;
    let d = DownMessage {
        payload: (0..=255).collect(),
        error: Some("earlier".into()),
        item_id: Some(4),
        ..down("dn_1", "agt_1", 100)
    };
    store.insert_down(&d).await.unwrap();
    let got = store
        .down("dn_1")
        .await
        .unwrap()
        .expect("dn_1 was inserted");
    assert_eq!(down_fields(&got), down_fields(&d), "{}", b.name());
    assert!(
        store.down("dn_2").await.unwrap().is_none(),
        "{}: unknown",
        b.name()
    );
    assert!(
        store.insert_down(&d).await.is_err(),
        "{}: duplicate id",
        b.name()
    );
}

async fn open_downs_are_accepted_and_queued_oldest_first(b: &Backend) {
    let store = b.open().await;
    let downs = [
        DownMessage {
            state: "queued".into(),
            ..down("dn_c", "agt_1", 200)
        },
        down("dn_b", "agt_1", 100),
        down("dn_a", "agt_1", 200),
        DownMessage {
            state: "delivered".into(),
            ..down("dn_d", "agt_1", 50)
        },
        DownMessage {
            state: "dead".into(),
            ..down("dn_e", "agt_1", 50)
        },
        DownMessage {
            state: "refused".into(),
            ..down("dn_f", "agt_1", 50)
        },
        down("dn_g", "agt_2", 10),
    ];
    for d in &downs {
        store.insert_down(d).await.unwrap();
    }
    let open: Vec<String> = store
        .open_downs("agt_1")
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(
        open,
        ["dn_b", "dn_a", "dn_c"],
        "{}: by created_at, then id",
        b.name()
    );
}

async fn update_down_sets_state_keeps_item_id_and_replaces_error(b: &Backend) {
    let store = b.open().await;
    store
        .insert_down(&down("dn_1", "agt_1", 100))
        .await
        .unwrap();
    let steps = [
        ("queued", Some(7), None, 110, Some(7)),
        ("queued", None, Some("sink busy"), 120, Some(7)),
        ("delivered", None, None, 130, Some(7)),
    ];
    for (state, item_id, error, now, expected_item) in steps {
        let changed = store
            .update_down("dn_1", "agt_1", state, item_id, error, now)
            .await
            .unwrap();
        assert!(changed, "{}: update to {state}", b.name());
        let got = store
            .down("dn_1")
            .await
            .unwrap()
            .expect("dn_1 was inserted");
        assert_eq!(
            (
                got.state.as_str(),
                got.item_id,
                got.error.as_deref(),
                got.updated_at_ms,
                got.created_at_ms
            ),
            (state, expected_item, error, now, 100),
            "{}: after update to {state} with item {item_id:?}, error {error:?}",
            b.name()
        );
    }
    assert!(
        store.open_downs("agt_1").await.unwrap().is_empty(),
        "{}: delivered is final",
        b.name()
    );
}

async fn update_down_of_another_agent_changes_nothing(b: &Backend) {
    let store = b.open().await;
    store
        .insert_down(&down("dn_1", "agt_1", 100))
        .await
        .unwrap();
    let changed = store
        .update_down("dn_1", "agt_2", "delivered", Some(1), None, 110)
        .await
        .unwrap();
    assert!(!changed, "{}: another agent's update was applied", b.name());
    let unknown = store
        .update_down("dn_9", "agt_1", "delivered", None, None, 110)
        .await
        .unwrap();
    assert!(!unknown, "{}: unknown down", b.name());
    let got = store
        .down("dn_1")
        .await
        .unwrap()
        .expect("dn_1 was inserted");
    assert_eq!(
        (got.state.as_str(), got.item_id),
        ("accepted", None),
        "{}",
        b.name()
    );
}

// ---- both ----

async fn reopened_store_keeps_its_data(b: &Backend) {
    {
        let store = b.open().await;
        store.insert_agent(&agent("agt_1", "site")).await.unwrap();
        store
            .insert_messages("agt_1", &[msg(1, "a", None)], 10)
            .await
            .unwrap();
    }
    let store = b.open().await;
    assert!(
        store.agent("agt_1").await.unwrap().is_some(),
        "{}: agent after reopen",
        b.name()
    );
    let new = store
        .insert_messages("agt_1", &[msg(1, "a", None), msg(2, "a", None)], 11)
        .await
        .unwrap();
    assert_eq!(new, 1, "{}: item 1 is still known after reopen", b.name());
    let stored = store.messages(&all()).await.unwrap();
    assert_eq!(
        items(&stored),
        [("agt_1", 1), ("agt_1", 2)].map(owned),
        "{}",
        b.name()
    );
}

async fn text_with_a_nul_character_is_stored(b: &Backend) {
    // msg_type and control_id come from the agent's parse of the message, unchecked by the hub.
    let store = b.open().await;
    let message = NewMessage {
        control_id: Some("A\u{0}B".into()),
        ..msg(1, "a", Some("ORU^R01"))
    };
    let stored = store.insert_messages("agt_1", &[message], 10).await;
    assert_eq!(stored.map_err(|e| e.to_string()), Ok(1), "{}", b.name());
}

// ---- staff ----

async fn staff_names_are_unique_and_listed_by_name(b: &Backend) {
    let store = b.open().await;
    assert!(
        store.insert_staff(&staff("bob@v", "tok-b")).await.unwrap(),
        "{}: first bob",
        b.name()
    );
    assert!(store
        .insert_staff(&staff("alice@v", "tok-a"))
        .await
        .unwrap());
    let again = StaffRecord {
        role: "admin".into(),
        ..staff("bob@v", "tok-other")
    };
    assert!(
        !store.insert_staff(&again).await.unwrap(),
        "{}: a taken name was accepted",
        b.name()
    );
    let listed: Vec<(String, String, String)> = store
        .staff()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.role, s.token_hash))
        .collect();
    assert_eq!(
        listed,
        [
            ("alice@v", "support", "tok-a"),
            ("bob@v", "support", "tok-b")
        ]
        .map(|(n, r, t)| (n.to_owned(), r.to_owned(), t.to_owned())),
        "{}: the first bob is kept",
        b.name()
    );
}

async fn staff_is_found_by_token_unless_disabled(b: &Backend) {
    let store = b.open().await;
    store
        .insert_staff(&staff("alice@v", "tok-a"))
        .await
        .unwrap();
    let disabled = StaffRecord {
        disabled_at_ms: Some(2_000),
        ..staff("carol@v", "tok-c")
    };
    store.insert_staff(&disabled).await.unwrap();
    let found = store
        .staff_by_token("tok-a")
        .await
        .unwrap()
        .expect("alice by her token");
    assert_eq!(
        (
            found.name.as_str(),
            found.role.as_str(),
            found.created_at_ms,
            found.disabled_at_ms
        ),
        ("alice@v", "support", 1_000, None),
        "{}",
        b.name()
    );
    assert!(
        store.staff_by_token("tok-c").await.unwrap().is_none(),
        "{}: disabled staff found by token",
        b.name()
    );
    assert!(
        store.staff_by_token("tok-x").await.unwrap().is_none(),
        "{}: unknown token",
        b.name()
    );
    let carol = store.staff().await.unwrap().pop().unwrap();
    assert_eq!(
        (carol.name.as_str(), carol.disabled_at_ms),
        ("carol@v", Some(2_000)),
        "{}: disabled staff are still listed",
        b.name()
    );
}

// ---- job signing key ----

async fn job_key_seed_is_the_first_candidate_stored(b: &Backend) {
    let first = b.open().await;
    let seed = first.job_key_seed(&[7; 32]).await.unwrap();
    assert_eq!(seed, [7; 32], "{}: the first candidate is stored", b.name());
    assert_eq!(
        first.job_key_seed(&[8; 32]).await.unwrap(),
        [7; 32],
        "{}: second call",
        b.name()
    );
    let second = b.open().await;
    assert_eq!(
        second.job_key_seed(&[9; 32]).await.unwrap(),
        [7; 32],
        "{}: another store on the same database",
        b.name()
    );
}

async fn job_key_seeds_race_to_one_winner(b: &Backend) {
    // Hub processes starting together on one database each offer their own candidate.
    let stores = [b.open().await, b.open().await, b.open().await];
    let seeds = futures::future::join_all((0..12u8).map(|i| {
        let store = stores[usize::from(i) % 3].clone();
        tokio::spawn(async move { store.job_key_seed(&[i; 32]).await.unwrap() })
    }))
    .await;
    let distinct: HashSet<[u8; 32]> = seeds.into_iter().map(|s| s.unwrap()).collect();
    assert_eq!(
        distinct.len(),
        1,
        "{}: concurrent first calls got different seeds",
        b.name()
    );
}

// ---- rollouts and jobs ----

async fn rollout_round_trips_and_changes_state(b: &Backend) {
    let store = b.open().await;
    let r = RolloutRecord {
        error_threshold: Some(u32::MAX),
        max_concurrency: u32::MAX,
        ..rollout("ro_1")
    };
    store.insert_rollout(&r).await.unwrap();
    store.insert_rollout(&rollout("ro_2")).await.unwrap();
    let got = store.rollout("ro_1").await.unwrap().expect("ro_1");
    assert_eq!(
        rollout_fields(&got),
        rollout_fields(&r),
        "{}: round trip",
        b.name()
    );
    let plain = store.rollout("ro_2").await.unwrap().expect("ro_2");
    assert_eq!(
        rollout_fields(&plain),
        rollout_fields(&rollout("ro_2")),
        "{}: no threshold",
        b.name()
    );
    store
        .set_rollout_state("ro_1", "halted", 9_000)
        .await
        .unwrap();
    let got = store.rollout("ro_1").await.unwrap().expect("ro_1");
    assert_eq!(
        (got.state.as_str(), got.updated_at_ms, got.created_at_ms),
        ("halted", 9_000, 1_000),
        "{}",
        b.name()
    );
    assert!(
        store.rollout("ro_9").await.unwrap().is_none(),
        "{}: unknown",
        b.name()
    );
    assert!(
        store.insert_rollout(&rollout("ro_2")).await.is_err(),
        "{}: duplicate rollout id",
        b.name()
    );
}

async fn job_round_trips_every_field(b: &Backend) {
    let store = b.open().await;
    let j = JobRecord {
        rule: Some("policy.allow".into()),
        reason: Some("ok ☃".into()),
        summary: Some("3 files".into()),
        digest: Some("ab".repeat(32)),
        truncated: true,
        approver: Some("nurse@site".into()),
        cancel_requested: true,
        args: r#"{"path":"C:\\logs","n":1}"#.into(),
        ..job("jb_1", "agt_1", "running", 100)
    };
    store.insert_jobs(std::slice::from_ref(&j)).await.unwrap();
    let got = store.job("jb_1").await.unwrap().expect("jb_1");
    assert_eq!(job_fields(&got), job_fields(&j), "{}", b.name());
    let plain = job("jb_2", "agt_1", "pending", 100);
    store
        .insert_jobs(std::slice::from_ref(&plain))
        .await
        .unwrap();
    let got = store.job("jb_2").await.unwrap().expect("jb_2");
    assert_eq!(
        job_fields(&got),
        job_fields(&plain),
        "{}: None fields",
        b.name()
    );
    assert!(
        store.job("jb_9").await.unwrap().is_none(),
        "{}: unknown",
        b.name()
    );
}

async fn rollout_jobs_are_in_creation_order_and_recent_jobs_newest_first(b: &Backend) {
    let store = b.open().await;
    let jobs = [
        job("jb_c", "agt_1", "pending", 200),
        job("jb_b", "agt_2", "pending", 100),
        job("jb_a", "agt_1", "pending", 200),
        JobRecord {
            rollout_id: "ro_2".into(),
            ..job("jb_d", "agt_1", "pending", 300)
        },
        job("jb_e", "agt_1", "done", 50),
    ];
    store.insert_jobs(&jobs).await.unwrap();
    assert_eq!(
        ids(&store.rollout_jobs("ro_1").await.unwrap()),
        ["jb_e", "jb_b", "jb_a", "jb_c"],
        "{}: rollout jobs by created_at, then id",
        b.name()
    );
    assert_eq!(
        ids(&store.recent_jobs("agt_1", 3).await.unwrap()),
        ["jb_d", "jb_c", "jb_a"],
        "{}: recent jobs newest first, limited",
        b.name()
    );
    assert!(
        store.recent_jobs("agt_9", 3).await.unwrap().is_empty(),
        "{}",
        b.name()
    );
}

async fn duplicate_job_id_is_an_error_and_inserts_nothing(b: &Backend) {
    let store = b.open().await;
    store
        .insert_jobs(&[job("jb_1", "agt_1", "pending", 100)])
        .await
        .unwrap();
    let batch = [
        job("jb_2", "agt_1", "pending", 100),
        job("jb_1", "agt_1", "pending", 100),
    ];
    assert!(
        store.insert_jobs(&batch).await.is_err(),
        "{}: a duplicate job id was accepted",
        b.name()
    );
    assert!(
        store.job("jb_2").await.unwrap().is_none(),
        "{}: the batch is one transaction",
        b.name()
    );
}

async fn jobs_to_send_are_pending_unexpired_jobs_of_the_given_agents_oldest_first(b: &Backend) {
    let store = b.open().await;
    let jobs = [
        job("jb_p2", "agt_1", "pending", 200),
        job("jb_p1", "agt_1", "pending", 100),
        job("jb_s", "agt_1", "sent", 150),
        job("jb_q", "agt_1", "queued", 50),
        job("jb_r", "agt_1", "running", 50),
        job("jb_d", "agt_1", "done", 50),
        JobRecord {
            expires_at_ms: 5_000,
            ..job("jb_x", "agt_1", "pending", 60)
        },
        job("jb_o", "agt_2", "pending", 10),
        job("jb_t", "agt_3", "pending", 120),
    ];
    store.insert_jobs(&jobs).await.unwrap();
    let agents = ["agt_1".to_owned(), "agt_3".to_owned()];
    assert_eq!(
        ids(&store.jobs_to_send(&agents, false, 5_000).await.unwrap()),
        ["jb_p1", "jb_t", "jb_p2"],
        "{}: pending, at expiry excluded",
        b.name()
    );
    assert_eq!(
        ids(&store.jobs_to_send(&agents, true, 4_999).await.unwrap()),
        ["jb_x", "jb_p1", "jb_t", "jb_s", "jb_p2"],
        "{}: with sent, before expiry",
        b.name()
    );
    assert!(
        store.jobs_to_send(&[], true, 0).await.unwrap().is_empty(),
        "{}: no agents",
        b.name()
    );
}

async fn jobs_to_send_takes_thousands_of_agent_ids(b: &Backend) {
    let store = b.open().await;
    let jobs: Vec<JobRecord> = (0..1_600)
        .map(|i| job(&format!("jb_{i:04}"), &format!("agt_{i:04}"), "pending", i))
        .collect();
    store.insert_jobs(&jobs).await.unwrap();
    // Every other agent, 1500 ids in all, most of them without jobs.
    let agents: Vec<String> = (0..3_000)
        .step_by(2)
        .map(|i| format!("agt_{i:04}"))
        .collect();
    let got = ids(&store.jobs_to_send(&agents, false, 0).await.unwrap());
    let expected: Vec<String> = (0..1_600)
        .step_by(2)
        .map(|i| format!("jb_{i:04}"))
        .collect();
    assert_eq!(got, expected, "{}", b.name());
}

async fn release_jobs_moves_the_oldest_queued_jobs_up_to_count(b: &Backend) {
    let store = b.open().await;
    let jobs = [
        job("jb_3", "agt_1", "queued", 300),
        job("jb_1b", "agt_2", "queued", 100),
        job("jb_1a", "agt_3", "queued", 100),
        job("jb_2", "agt_4", "queued", 200),
        job("jb_0", "agt_5", "pending", 10),
        JobRecord {
            rollout_id: "ro_2".into(),
            ..job("jb_other", "agt_6", "queued", 1)
        },
    ];
    store.insert_jobs(&jobs).await.unwrap();
    let first = store.release_jobs("ro_1", 2, 7_000).await.unwrap();
    assert_eq!(
        ids(&first),
        ["jb_1a", "jb_1b"],
        "{}: the two oldest",
        b.name()
    );
    assert!(
        first
            .iter()
            .all(|j| j.state == "pending" && j.updated_at_ms == 7_000),
        "{}: returned as released: {first:?}",
        b.name()
    );
    let stored = store.job("jb_1a").await.unwrap().unwrap();
    assert_eq!(
        (stored.state.as_str(), stored.updated_at_ms),
        ("pending", 7_000),
        "{}",
        b.name()
    );
    let zero = store.release_jobs("ro_1", 0, 7_500).await.unwrap();
    assert!(zero.is_empty(), "{}: count 0", b.name());
    let rest = store.release_jobs("ro_1", 10, 8_000).await.unwrap();
    assert_eq!(
        ids(&rest),
        ["jb_2", "jb_3"],
        "{}: the rest, never a job twice",
        b.name()
    );
    assert!(
        store
            .release_jobs("ro_1", 10, 9_000)
            .await
            .unwrap()
            .is_empty(),
        "{}: nothing left",
        b.name()
    );
    assert_eq!(
        store.job("jb_other").await.unwrap().unwrap().state,
        "queued",
        "{}: another rollout's job",
        b.name()
    );
}

async fn concurrent_releases_never_release_a_job_twice(b: &Backend) {
    let stores = [b.open().await, b.open().await];
    let jobs: Vec<JobRecord> = (0..60)
        .map(|i| job(&format!("jb_{i:02}"), &format!("agt_{i}"), "queued", i))
        .collect();
    stores[0].insert_jobs(&jobs).await.unwrap();
    let releasers: Vec<_> = (0..6)
        .map(|r| {
            let store = stores[r % 2].clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for _ in 0..20 {
                    let batch = store.release_jobs("ro_1", 2, 5_000).await.unwrap();
                    mine.extend(batch.into_iter().map(|j| j.id));
                    tokio::task::yield_now().await;
                }
                mine
            })
        })
        .collect();
    let mut released = Vec::new();
    for r in releasers {
        released.extend(r.await.unwrap());
    }
    let distinct: HashSet<&String> = released.iter().collect();
    assert_eq!(
        (released.len(), distinct.len()),
        (60, 60),
        "{}: releases and distinct jobs released",
        b.name()
    );
}

async fn update_jobs_replaces_some_fields_keeps_none_and_ignores_final_and_foreign_jobs(
    b: &Backend,
) {
    let store = b.open().await;
    let jobs = [
        JobRecord {
            rule: Some("r0".into()),
            truncated: true,
            ..job("jb_1", "agt_1", "sent", 100)
        },
        job("jb_2", "agt_1", "expired", 100),
        job("jb_3", "agt_1", "sent", 100),
        job("jb_4", "agt_1", "running", 100),
    ];
    store.insert_jobs(&jobs).await.unwrap();
    store
        .update_jobs(&[
            JobChange {
                reason: Some("needs approval".into()),
                approver: Some("nurse".into()),
                ..change("jb_1", "awaiting_approval", 200)
            },
            JobChange {
                summary: Some("late".into()),
                ..change("jb_2", "done", 210)
            },
            JobChange {
                summary: Some("3 files".into()),
                digest: Some("d1".into()),
                truncated: Some(false),
                ..change("jb_3", "done", 220)
            },
            // jb_3 is final now: a later change in the same batch is ignored as well.
            change("jb_3", "failed", 230),
            change("jb_9", "done", 240),
            // Another agent cannot report on agt_1's job.
            JobChange {
                agent_id: "agt_2".into(),
                summary: Some("not mine".into()),
                ..change("jb_4", "failed", 250)
            },
        ])
        .await
        .unwrap();
    let j1 = store.job("jb_1").await.unwrap().unwrap();
    assert_eq!(
        (
            j1.state.as_str(),
            j1.rule.as_deref(),
            j1.reason.as_deref(),
            j1.approver.as_deref(),
            j1.truncated,
            j1.updated_at_ms
        ),
        (
            "awaiting_approval",
            Some("r0"),
            Some("needs approval"),
            Some("nurse"),
            true,
            200
        ),
        "{}: jb_1",
        b.name()
    );
    let j2 = store.job("jb_2").await.unwrap().unwrap();
    assert_eq!(
        (j2.state.as_str(), j2.summary.as_deref(), j2.updated_at_ms),
        ("expired", None, 100),
        "{}: a final job is left alone",
        b.name()
    );
    let j3 = store.job("jb_3").await.unwrap().unwrap();
    assert_eq!(
        (
            j3.state.as_str(),
            j3.summary.as_deref(),
            j3.digest.as_deref(),
            j3.truncated,
            j3.updated_at_ms
        ),
        ("done", Some("3 files"), Some("d1"), false, 220),
        "{}: jb_3",
        b.name()
    );
    let j4 = store.job("jb_4").await.unwrap().unwrap();
    assert_eq!(
        (j4.state.as_str(), j4.summary.as_deref(), j4.updated_at_ms),
        ("running", None, 100),
        "{}: another agent's change is ignored",
        b.name()
    );
    // Every final state stops changes.
    for (i, state) in [
        "done",
        "failed",
        "refused",
        "denied",
        "expired",
        "cancelled",
        "skipped",
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("jb_final_{i}");
        store
            .insert_jobs(&[job(&id, "agt_1", state, 100)])
            .await
            .unwrap();
        store
            .update_jobs(&[change(&id, "running", 300)])
            .await
            .unwrap();
        assert_eq!(
            store.job(&id).await.unwrap().unwrap().state,
            state,
            "{}: {state} is final",
            b.name()
        );
    }
}

async fn request_cancel_marks_open_jobs_only_and_jobs_to_cancel_lists_them(b: &Backend) {
    let store = b.open().await;
    let jobs = [
        job("jb_run", "agt_1", "running", 100),
        job("jb_wait", "agt_1", "awaiting_approval", 50),
        job("jb_done", "agt_1", "done", 100),
        job("jb_other", "agt_2", "sent", 100),
    ];
    store.insert_jobs(&jobs).await.unwrap();
    assert!(
        store.request_cancel("jb_run", 500).await.unwrap(),
        "{}: running",
        b.name()
    );
    assert!(
        store.request_cancel("jb_wait", 500).await.unwrap(),
        "{}: awaiting approval",
        b.name()
    );
    assert!(
        store.request_cancel("jb_other", 500).await.unwrap(),
        "{}: other agent",
        b.name()
    );
    assert!(
        !store.request_cancel("jb_done", 500).await.unwrap(),
        "{}: a final job",
        b.name()
    );
    assert!(
        !store.request_cancel("jb_nope", 500).await.unwrap(),
        "{}: unknown",
        b.name()
    );
    let run = store.job("jb_run").await.unwrap().unwrap();
    assert!(run.cancel_requested, "{}", b.name());
    assert!(
        !store
            .job("jb_done")
            .await
            .unwrap()
            .unwrap()
            .cancel_requested,
        "{}: the final job is unmarked",
        b.name()
    );
    assert_eq!(
        ids(&store.jobs_to_cancel(&["agt_1".to_owned()]).await.unwrap()),
        ["jb_wait", "jb_run"],
        "{}",
        b.name()
    );
    store
        .update_jobs(&[change("jb_run", "cancelled", 600)])
        .await
        .unwrap();
    assert_eq!(
        ids(&store
            .jobs_to_cancel(&["agt_1".to_owned(), "agt_2".to_owned()])
            .await
            .unwrap()),
        ["jb_wait", "jb_other"],
        "{}: once final, no longer listed",
        b.name()
    );
}

async fn job_output_skips_duplicates_and_pages_in_order(b: &Backend) {
    let store = b.open().await;
    store
        .append_job_output(&[chunk("jb_1", 2, "two"), chunk("jb_1", 1, "one")])
        .await
        .unwrap();
    store
        .append_job_output(&[
            chunk("jb_1", 2, "TWO AGAIN"),
            chunk("jb_1", 3, "three\u{0}nul ☃"),
            chunk("jb_2", 1, "other job"),
        ])
        .await
        .unwrap();
    let all = store.job_output("jb_1", 0, 100).await.unwrap();
    let got: Vec<(String, i64, String)> =
        all.into_iter().map(|c| (c.job_id, c.seq, c.data)).collect();
    assert_eq!(
        got,
        [
            ("jb_1", 1, "one"),
            ("jb_1", 2, "two"),
            ("jb_1", 3, "three\u{0}nul ☃")
        ]
        .map(|(j, s, d)| (j.to_owned(), s, d.to_owned())),
        "{}: the first copy of a seq is kept",
        b.name()
    );
    let page: Vec<i64> = store
        .job_output("jb_1", 1, 1)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(page, [2], "{}: after 1, limit 1", b.name());
    assert!(
        store.job_output("jb_1", 3, 10).await.unwrap().is_empty(),
        "{}: after the last",
        b.name()
    );
}

// ---- audit mirror ----

async fn mirror_state_is_empty_for_an_unknown_agent(b: &Backend) {
    let store = b.open().await;
    let state = store.mirror_state("agt_1").await.unwrap();
    assert_eq!(
        (
            state.last_seq,
            state.last_hash.as_str(),
            state.problem,
            state.problem_at_ms
        ),
        (0, "", None, None),
        "{}",
        b.name()
    );
    assert!(
        store.audit_lines("agt_1", 10).await.unwrap().is_empty(),
        "{}",
        b.name()
    );
}

async fn audit_lines_are_kept_once_and_move_the_mirror_position(b: &Backend) {
    let store = b.open().await;
    store
        .append_audit_lines("agt_1", &[line(1, 100), line(2, 100)])
        .await
        .unwrap();
    let state = store.mirror_state("agt_1").await.unwrap();
    assert_eq!(
        (state.last_seq, state.last_hash.as_str()),
        (2, "h2"),
        "{}",
        b.name()
    );
    let resent = MirroredLine {
        line: "changed".into(),
        ..line(2, 200)
    };
    store
        .append_audit_lines("agt_1", &[resent, line(3, 200)])
        .await
        .unwrap();
    store
        .append_audit_lines("agt_2", &[line(1, 300)])
        .await
        .unwrap();
    store.append_audit_lines("agt_1", &[]).await.unwrap();
    let state = store.mirror_state("agt_1").await.unwrap();
    assert_eq!(
        (state.last_seq, state.last_hash.as_str()),
        (3, "h3"),
        "{}: after the second batch",
        b.name()
    );
    let lines = store.audit_lines("agt_1", 10).await.unwrap();
    let got: Vec<(u64, String, String, i64)> = lines
        .into_iter()
        .map(|l| (l.seq, l.hash, l.line, l.received_at_ms))
        .collect();
    assert_eq!(
        got,
        [
            (3, "h3", "{\"seq\":3}", 200),
            (2, "h2", "{\"seq\":2}", 100),
            (1, "h1", "{\"seq\":1}", 100)
        ]
        .map(|(s, h, l, r)| (s, h.to_owned(), l.to_owned(), r)),
        "{}: newest first, the first copy kept",
        b.name()
    );
    let limited: Vec<u64> = store
        .audit_lines("agt_1", 2)
        .await
        .unwrap()
        .iter()
        .map(|l| l.seq)
        .collect();
    assert_eq!(limited, [3, 2], "{}: limit", b.name());
    let big = 1u64 << 62;
    store
        .append_audit_lines("agt_3", &[line(big, 1)])
        .await
        .unwrap();
    assert_eq!(
        store.mirror_state("agt_3").await.unwrap().last_seq,
        big,
        "{}: a large seq",
        b.name()
    );
}

async fn mirror_problem_is_set_and_cleared(b: &Backend) {
    let store = b.open().await;
    // A problem can be found before any line was accepted (the first batch forks).
    store
        .set_mirror_problem("agt_2", Some("gap before 5"), 400)
        .await
        .unwrap();
    let state = store.mirror_state("agt_2").await.unwrap();
    assert_eq!(
        (
            state.last_seq,
            state.problem.as_deref(),
            state.problem_at_ms
        ),
        (0, Some("gap before 5"), Some(400)),
        "{}: no lines yet",
        b.name()
    );
    store
        .append_audit_lines("agt_1", &[line(1, 100)])
        .await
        .unwrap();
    store
        .set_mirror_problem("agt_1", Some("fork at 2"), 500)
        .await
        .unwrap();
    store
        .append_audit_lines("agt_1", &[line(2, 600)])
        .await
        .unwrap();
    let state = store.mirror_state("agt_1").await.unwrap();
    assert_eq!(
        (
            state.last_seq,
            state.last_hash.as_str(),
            state.problem.as_deref(),
            state.problem_at_ms
        ),
        (2, "h2", Some("fork at 2"), Some(500)),
        "{}: the problem stays while lines arrive",
        b.name()
    );
    store.set_mirror_problem("agt_1", None, 700).await.unwrap();
    let state = store.mirror_state("agt_1").await.unwrap();
    assert_eq!(
        (
            state.last_seq,
            state.last_hash.as_str(),
            state.problem,
            state.problem_at_ms
        ),
        (2, "h2", None, None),
        "{}: cleared, position kept",
        b.name()
    );
    store.set_mirror_problem("agt_9", None, 700).await.unwrap();
    assert_eq!(
        store.mirror_state("agt_9").await.unwrap().last_seq,
        0,
        "{}: clearing an unknown agent",
        b.name()
    );
}

// ---- access log ----

async fn access_log_is_newest_first(b: &Backend) {
    let store = b.open().await;
    for (at, target) in [(100, "a"), (300, "b"), (200, "c"), (300, "d")] {
        store
            .record_access(&AccessRecord {
                at_ms: at,
                principal: "staff:alice@v".into(),
                action: "audit.trail".into(),
                target: target.into(),
            })
            .await
            .unwrap();
    }
    let log = store.access_log(3).await.unwrap();
    let got: Vec<(i64, &str)> = log.iter().map(|a| (a.at_ms, a.target.as_str())).collect();
    assert_eq!(
        got,
        [(300, "d"), (300, "b"), (200, "c")],
        "{}: newest first, later record first on a tie",
        b.name()
    );
    assert_eq!(
        (log[0].principal.as_str(), log[0].action.as_str()),
        ("staff:alice@v", "audit.trail"),
        "{}",
        b.name()
    );
}

// ---- blob uploads ----

async fn blob_upload_grows_in_order(b: &Backend) {
    let store = b.open().await;
    assert_eq!(
        store.blob_state("agt_1", 7).await.unwrap(),
        None,
        "{}: not started",
        b.name()
    );
    assert_eq!(
        store.blob_append("agt_1", 7, 0, b"abc").await.unwrap(),
        0,
        "{}: an append to an upload never begun",
        b.name()
    );
    assert_eq!(
        store.blob_state("agt_1", 7).await.unwrap(),
        None,
        "{}: an append does not begin an upload",
        b.name()
    );
    assert_eq!(store.blob_begin("agt_1", 7, 10).await.unwrap(), 0);
    assert_eq!(store.blob_state("agt_1", 7).await.unwrap(), Some((0, 10)));
    assert_eq!(
        store.blob_append("agt_1", 7, 0, b"abc").await.unwrap(),
        3,
        "{}",
        b.name()
    );
    assert_eq!(
        store.blob_append("agt_1", 7, 3, b"defg").await.unwrap(),
        7,
        "{}",
        b.name()
    );
    assert_eq!(
        store.blob_append("agt_1", 7, 7, b"").await.unwrap(),
        7,
        "{}: an empty append",
        b.name()
    );
    assert_eq!(
        store.blob_begin("agt_1", 7, 10).await.unwrap(),
        7,
        "{}: beginning again with the same total resumes",
        b.name()
    );
    assert_eq!(store.blob_state("agt_1", 7).await.unwrap(), Some((7, 10)));
    assert_eq!(
        store.blob_append("agt_1", 7, 7, b"hij").await.unwrap(),
        10,
        "{}: the last part fills the total exactly",
        b.name()
    );
    assert_eq!(store.blob_state("agt_1", 7).await.unwrap(), Some((10, 10)));
    assert_eq!(
        store.blob_parts("agt_1", 7, 0, 100).await.unwrap(),
        vec![
            (0, b"abc".to_vec()),
            (3, b"defg".to_vec()),
            (7, b"hij".to_vec())
        ],
        "{}: one part per append, the empty one stored as none",
        b.name()
    );
}

async fn blob_append_at_a_wrong_offset_changes_nothing(b: &Backend) {
    let store = b.open().await;
    store.blob_begin("agt_1", 1, 100).await.unwrap();
    store.blob_append("agt_1", 1, 0, b"first").await.unwrap();
    for (offset, what) in [
        (0, "a repeat of the first part"),
        (3, "behind"),
        (9, "ahead"),
    ] {
        assert_eq!(
            store
                .blob_append("agt_1", 1, offset, b"XXXXX")
                .await
                .unwrap(),
            5,
            "{}: {what} returns the bytes held",
            b.name()
        );
    }
    assert_eq!(
        store
            .blob_append("agt_1", 1, u64::MAX, b"XXXXX")
            .await
            .unwrap(),
        5,
        "{}: an offset beyond any store's integers",
        b.name()
    );
    assert_eq!(store.blob_state("agt_1", 1).await.unwrap(), Some((5, 100)));
    assert_eq!(
        store.blob_parts("agt_1", 1, 0, 100).await.unwrap(),
        vec![(0, b"first".to_vec())],
        "{}",
        b.name()
    );
    assert_eq!(
        store.blob_append("agt_1", 1, 5, b"second").await.unwrap(),
        11,
        "{}: the right offset still works",
        b.name()
    );
}

async fn blob_append_beyond_the_total_is_refused(b: &Backend) {
    let store = b.open().await;
    store.blob_begin("agt_1", 1, 8).await.unwrap();
    store.blob_append("agt_1", 1, 0, b"12345").await.unwrap();
    assert_eq!(
        store.blob_append("agt_1", 1, 5, b"6789").await.unwrap(),
        5,
        "{}: one byte too many",
        b.name()
    );
    assert_eq!(store.blob_state("agt_1", 1).await.unwrap(), Some((5, 8)));
    assert_eq!(store.blob_parts("agt_1", 1, 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.blob_append("agt_1", 1, 5, b"678").await.unwrap(), 8);
    assert_eq!(
        store.blob_append("agt_1", 1, 8, b"9").await.unwrap(),
        8,
        "{}: a full upload takes nothing more",
        b.name()
    );
    assert_eq!(store.blob_state("agt_1", 1).await.unwrap(), Some((8, 8)));
}

async fn blob_begin_with_another_total_restarts_the_upload(b: &Backend) {
    let store = b.open().await;
    store.blob_begin("agt_1", 1, 10).await.unwrap();
    store.blob_append("agt_1", 1, 0, b"old-1").await.unwrap();
    store.blob_append("agt_1", 1, 5, b"old-2").await.unwrap();
    assert_eq!(
        store.blob_begin("agt_1", 1, 6).await.unwrap(),
        0,
        "{}: another total starts over",
        b.name()
    );
    assert_eq!(store.blob_state("agt_1", 1).await.unwrap(), Some((0, 6)));
    assert!(
        store
            .blob_parts("agt_1", 1, 0, 10)
            .await
            .unwrap()
            .is_empty(),
        "{}: the old parts are gone",
        b.name()
    );
    assert_eq!(
        store.blob_append("agt_1", 1, 5, b"x").await.unwrap(),
        0,
        "{}: the old position is no longer valid",
        b.name()
    );
    assert_eq!(store.blob_append("agt_1", 1, 0, b"new").await.unwrap(), 3);
    assert_eq!(store.blob_append("agt_1", 1, 3, b"NEW").await.unwrap(), 6);
    assert_eq!(
        store.blob_parts("agt_1", 1, 0, 10).await.unwrap(),
        vec![(0, b"new".to_vec()), (3, b"NEW".to_vec())],
        "{}",
        b.name()
    );
}

async fn blob_parts_round_trip_byte_identical_and_page_from_an_offset(b: &Backend) {
    const PART: usize = 64 * 1024;
    const PARTS: usize = 40;
    let store = b.open().await;
    let file: Vec<u8> = (0..PARTS)
        .flat_map(|i| part_bytes(i as u32, PART))
        .collect();
    let total = file.len() as u64;
    store.blob_begin("agt_1", 9, total).await.unwrap();
    for (i, part) in file.chunks(PART).enumerate() {
        let offset = (i * PART) as u64;
        assert_eq!(
            store.blob_append("agt_1", 9, offset, part).await.unwrap(),
            offset + PART as u64,
            "{}: part {i}",
            b.name()
        );
    }
    assert_eq!(
        store.blob_state("agt_1", 9).await.unwrap(),
        Some((total, total))
    );

    // Page through as a download would: 7 parts at a time, from after the last one read.
    let mut read = Vec::new();
    let mut pages = 0;
    loop {
        let page = store
            .blob_parts("agt_1", 9, read.len() as u64, 7)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7, "{}: limit", b.name());
        for (offset, data) in page {
            assert_eq!(offset, read.len() as u64, "{}: parts in order", b.name());
            read.extend_from_slice(&data);
        }
        pages += 1;
    }
    assert_eq!(pages, PARTS.div_ceil(7), "{}", b.name());
    assert!(
        read == file,
        "{}: the file comes back byte for byte",
        b.name()
    );

    let offsets =
        |parts: Vec<(u64, Vec<u8>)>| -> Vec<u64> { parts.into_iter().map(|p| p.0).collect() };
    let part = PART as u64;
    assert_eq!(
        offsets(store.blob_parts("agt_1", 9, 1, 2).await.unwrap()),
        [part, 2 * part],
        "{}: from inside a part, the next whole part on",
        b.name()
    );
    assert_eq!(
        offsets(store.blob_parts("agt_1", 9, 39 * part, 10).await.unwrap()),
        [39 * part],
        "{}: the last part",
        b.name()
    );
    assert!(
        store
            .blob_parts("agt_1", 9, total, 10)
            .await
            .unwrap()
            .is_empty(),
        "{}: past the end",
        b.name()
    );
    assert!(
        store
            .blob_parts("agt_1", 9, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty(),
        "{}: far past the end",
        b.name()
    );
}

async fn blob_uploads_of_one_item_id_are_per_agent(b: &Backend) {
    let store = b.open().await;
    store.blob_begin("agt_1", 5, 4).await.unwrap();
    store.blob_begin("agt_2", 5, 6).await.unwrap();
    store.blob_append("agt_1", 5, 0, b"one!").await.unwrap();
    assert_eq!(
        store.blob_state("agt_2", 5).await.unwrap(),
        Some((0, 6)),
        "{}: the other agent's upload is untouched",
        b.name()
    );
    store.blob_append("agt_2", 5, 0, b"two...").await.unwrap();
    assert_eq!(store.blob_state("agt_1", 5).await.unwrap(), Some((4, 4)));
    assert_eq!(
        store.blob_parts("agt_1", 5, 0, 10).await.unwrap(),
        vec![(0, b"one!".to_vec())],
        "{}",
        b.name()
    );
    assert_eq!(
        store.blob_parts("agt_2", 5, 0, 10).await.unwrap(),
        vec![(0, b"two...".to_vec())],
        "{}",
        b.name()
    );
    // Restarting one agent's upload leaves the other's parts alone.
    store.blob_begin("agt_1", 5, 99).await.unwrap();
    assert_eq!(store.blob_parts("agt_2", 5, 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.blob_state("agt_2", 5).await.unwrap(), Some((6, 6)));
}

async fn blob_upload_resumes_in_another_store(b: &Backend) {
    let first = b.open().await;
    first.blob_begin("agt_1", 3, 9).await.unwrap();
    first.blob_append("agt_1", 3, 0, b"abc").await.unwrap();
    // Another hub process (or this one after a restart) takes over the agent's session.
    let second = b.open().await;
    assert_eq!(
        second.blob_begin("agt_1", 3, 9).await.unwrap(),
        3,
        "{}: the second store sees the bytes held",
        b.name()
    );
    assert_eq!(second.blob_append("agt_1", 3, 3, b"def").await.unwrap(), 6);
    assert_eq!(
        first.blob_append("agt_1", 3, 3, b"XYZ").await.unwrap(),
        6,
        "{}: the first store sees the second's append",
        b.name()
    );
    assert_eq!(first.blob_append("agt_1", 3, 6, b"ghi").await.unwrap(), 9);
    drop(first);
    let parts = second.blob_parts("agt_1", 3, 0, 10).await.unwrap();
    let joined: Vec<u8> = parts.into_iter().flat_map(|(_, data)| data).collect();
    assert_eq!(joined, b"abcdefghi", "{}", b.name());
}

async fn concurrent_blob_appends_at_one_offset_store_one_part(b: &Backend) {
    let stores = [b.open().await, b.open().await];
    stores[0].blob_begin("agt_1", 1, 1000).await.unwrap();
    let appends = (0..8u8).map(|i| {
        let store = stores[usize::from(i % 2)].clone();
        async move { store.blob_append("agt_1", 1, 0, &[i; 10]).await.unwrap() }
    });
    let helds = futures::future::join_all(appends).await;
    assert!(
        helds.iter().all(|held| *held == 10),
        "{}: every append sees one part held: {helds:?}",
        b.name()
    );
    let parts = stores[1].blob_parts("agt_1", 1, 0, 10).await.unwrap();
    assert_eq!(parts.len(), 1, "{}", b.name());
    assert_eq!(
        stores[1].blob_state("agt_1", 1).await.unwrap(),
        Some((10, 1000))
    );
}

// ---- job notifications ----

async fn only_postgres_has_job_notifications(b: &Backend) {
    let store = b.open().await;
    let listening = store.listen_jobs().await.unwrap().is_some();
    assert_eq!(
        listening,
        matches!(b, Backend::Postgres(_)),
        "{}: SQLite serves one hub process and has nothing to listen to",
        b.name()
    );
}

// ---- PostgreSQL only ----

mod postgres_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listen_jobs_hears_work_written_by_another_store() {
        let Some(backend) =
            Backend::postgres("postgres_only::listen_jobs_hears_work_written_by_another_store")
        else {
            return;
        };
        let listener = backend.open().await;
        let writer = backend.open().await;
        let mut heard = listener
            .listen_jobs()
            .await
            .unwrap()
            .expect("PostgreSQL has notifications");
        // Queued jobs and final ones are no work for an agent's session: not notified.
        writer
            .insert_jobs(&[
                job("jb_q", "agt_queued", "queued", 1),
                job("jb_d", "agt_done", "done", 1),
                job("jb_1", "agt_1", "pending", 2),
                job("jb_2", "agt_1", "pending", 3),
            ])
            .await
            .unwrap();
        assert_eq!(next_agent(&mut heard).await, "agt_1", "insert_jobs");
        writer.release_jobs("ro_1", 5, 10).await.unwrap();
        assert_eq!(next_agent(&mut heard).await, "agt_queued", "release_jobs");
        writer.request_cancel("jb_2", 20).await.unwrap();
        assert_eq!(next_agent(&mut heard).await, "agt_1", "request_cancel");
        // Nothing else: one notification per agent and write, none for the done job.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), heard.recv())
                .await
                .is_err(),
            "an unexpected notification"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listen_jobs_reconnects_after_losing_its_connection() {
        let Some(Backend::Postgres(db)) =
            Backend::postgres("postgres_only::listen_jobs_reconnects_after_losing_its_connection")
        else {
            return;
        };
        let store = PostgresStore::open(&db.url()).await.unwrap();
        let mut heard = store.listen_jobs().await.unwrap().unwrap();
        let killed = db.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        );
        assert_eq!(killed, "1", "the listening connection");
        // Notifications sent while it reconnects are lost (the hub sweeps for those), so
        // keep writing until one is heard.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for i in 0.. {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing heard within 20 s of the connection being killed\n{}",
                db.log_tail(20)
            );
            store
                .insert_jobs(&[job(&format!("jb_{i}"), "agt_1", "pending", i)])
                .await
                .unwrap();
            if let Ok(agent) = tokio::time::timeout(Duration::from_millis(500), heard.recv()).await
            {
                assert_eq!(agent.as_deref(), Some("agt_1"));
                break;
            }
        }
    }

    async fn next_agent(heard: &mut tokio::sync::mpsc::Receiver<String>) -> String {
        tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await
            .expect("a notification within 5 s")
            .expect("the channel is open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hubs_opening_together_apply_each_migration_once() {
        let Some(Backend::Postgres(db)) =
            Backend::postgres("postgres_only::hubs_opening_together_apply_each_migration_once")
        else {
            return;
        };
        let url = db.url();
        let opens = (0..4).map(|_| PostgresStore::open(&url));
        for (i, opened) in futures::future::join_all(opens)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err(err) = opened {
                panic!(
                    "hub {i} of 4 opening together: {err}\nserver log tail:\n{}",
                    db.log_tail(20)
                );
            }
        }
        assert_eq!(
            db.psql(
                "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"
            ),
            "1,2,3"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_from_a_newer_hub_is_refused() {
        let Some(Backend::Postgres(db)) =
            Backend::postgres("postgres_only::a_database_from_a_newer_hub_is_refused")
        else {
            return;
        };
        drop(PostgresStore::open(&db.url()).await.unwrap());
        db.psql("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)");
        let err = match PostgresStore::open(&db.url()).await {
            Ok(_) => panic!("a database at schema version 999 was opened"),
            Err(err) => err.to_string(),
        };
        assert!(
            err.contains("schema version 999") && !err.contains("not-checked-pw"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_store_opens_postgres_for_a_postgres_url() {
        let Some(Backend::Postgres(db)) =
            Backend::postgres("postgres_only::open_store_opens_postgres_for_a_postgres_url")
        else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let config = outpost_hub::HubConfig {
            data_dir: dir.path().to_path_buf(),
            database: db.url(),
            ..Default::default()
        };
        let store = outpost_hub::open_store(&config).await.unwrap();
        store
            .create_api_key("key-hash-1", "lab app", 10)
            .await
            .unwrap();
        assert_eq!(db.psql("SELECT name FROM api_keys"), "lab app");
        assert!(
            !dir.path().join("hub.db").exists(),
            "a SQLite file was made as well"
        );
    }
}

// ---- helpers ----

fn agent(id: &str, name: &str) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        name: name.into(),
        public_key: format!("pk-{id}"),
        hostname: format!("host-{id}"),
        enrolled_at_ms: 5_000,
        revoked_at_ms: None,
        last_seen_ms: None,
        inventory: None,
    }
}

type AgentFields = (
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<serde_json::Value>,
);

fn agent_fields(a: &AgentRecord) -> AgentFields {
    (
        a.id.clone(),
        a.name.clone(),
        a.public_key.clone(),
        a.hostname.clone(),
        a.enrolled_at_ms,
        a.revoked_at_ms,
        a.last_seen_ms,
        a.inventory.clone(),
    )
}

fn msg(item_id: i64, source: &str, msg_type: Option<&str>) -> NewMessage {
    NewMessage {
        item_id,
        source: source.into(),
        kind: "hl7".into(),
        msg_type: msg_type.map(Into::into),
        control_id: Some(format!("CTRL{item_id}")),
        received_at_ms: 1_000 + item_id,
        payload: format!("MSH|^~\\&|{item_id}").into_bytes(),
    }
}

/// Everything from the start, 1000 at most, without payloads.
fn all() -> MessageFilter {
    MessageFilter {
        limit: 1_000,
        ..MessageFilter::default()
    }
}

fn items(messages: &[StoredMessage]) -> Vec<(String, i64)> {
    messages
        .iter()
        .map(|m| (m.agent_id.clone(), m.item_id))
        .collect()
}

fn owned((agent, item): (&str, i64)) -> (String, i64) {
    (agent.to_owned(), item)
}

async fn types_matching(store: &dyn Store, filter: &str) -> Vec<String> {
    store
        .messages(&MessageFilter {
            msg_type: Some(filter.into()),
            ..all()
        })
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| m.msg_type)
        .collect()
}

fn down(id: &str, agent_id: &str, created_at_ms: i64) -> DownMessage {
    DownMessage {
        id: id.into(),
        agent_id: agent_id.into(),
        sink: "lab-out".into(),
        state: "accepted".into(),
        item_id: None,
        error: None,
        created_at_ms,
        updated_at_ms: created_at_ms,
        payload: format!("MSH|{id}").into_bytes(),
    }
}

type DownFields = (
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<String>,
    i64,
    i64,
    Vec<u8>,
);

fn down_fields(d: &DownMessage) -> DownFields {
    (
        d.id.clone(),
        d.agent_id.clone(),
        d.sink.clone(),
        d.state.clone(),
        d.item_id,
        d.error.clone(),
        d.created_at_ms,
        d.updated_at_ms,
        d.payload.clone(),
    )
}

fn staff(name: &str, token_hash: &str) -> StaffRecord {
    StaffRecord {
        name: name.into(),
        role: "support".into(),
        token_hash: token_hash.into(),
        created_at_ms: 1_000,
        disabled_at_ms: None,
    }
}

fn rollout(id: &str) -> RolloutRecord {
    RolloutRecord {
        id: id.into(),
        staff: "alice@v".into(),
        capability: "logs.tail".into(),
        max_concurrency: 5,
        error_threshold: None,
        state: "running".into(),
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
    }
}

type RolloutFields = (String, String, String, u32, Option<u32>, String, i64, i64);

fn rollout_fields(r: &RolloutRecord) -> RolloutFields {
    (
        r.id.clone(),
        r.staff.clone(),
        r.capability.clone(),
        r.max_concurrency,
        r.error_threshold,
        r.state.clone(),
        r.created_at_ms,
        r.updated_at_ms,
    )
}

/// A job of rollout `ro_1` expiring at 10 000.
fn job(id: &str, agent_id: &str, state: &str, created_at_ms: i64) -> JobRecord {
    JobRecord {
        id: id.into(),
        rollout_id: "ro_1".into(),
        agent_id: agent_id.into(),
        capability: "logs.tail".into(),
        staff: "alice@v".into(),
        args: "{}".into(),
        signed_job: format!("{{\"id\":\"{id}\"}}"),
        signature: format!("sig-{id}"),
        state: state.into(),
        rule: None,
        reason: None,
        summary: None,
        digest: None,
        truncated: false,
        approver: None,
        cancel_requested: false,
        created_at_ms,
        expires_at_ms: 10_000,
        updated_at_ms: created_at_ms,
    }
}

/// Every field, as JSON (the record's serialisation skips the signed job and signature).
fn job_fields(j: &JobRecord) -> (serde_json::Value, String, String) {
    (
        serde_json::to_value(j).unwrap(),
        j.signed_job.clone(),
        j.signature.clone(),
    )
}

fn ids(jobs: &[JobRecord]) -> Vec<String> {
    jobs.iter().map(|j| j.id.clone()).collect()
}

/// A change reported by `agt_1`.
fn change(id: &str, state: &str, at_ms: i64) -> JobChange {
    JobChange {
        id: id.into(),
        agent_id: "agt_1".into(),
        state: state.into(),
        rule: None,
        reason: None,
        summary: None,
        digest: None,
        truncated: None,
        approver: None,
        at_ms,
    }
}

fn chunk(job_id: &str, seq: i64, data: &str) -> JobChunk {
    JobChunk {
        job_id: job_id.into(),
        seq,
        data: data.into(),
    }
}

fn line(seq: u64, received_at_ms: i64) -> MirroredLine {
    MirroredLine {
        seq,
        hash: format!("h{seq}"),
        line: format!("{{\"seq\":{seq}}}"),
        received_at_ms,
    }
}

/// A part's bytes: every value from 0 to 255, in a different order for each seed.
fn part_bytes(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}
