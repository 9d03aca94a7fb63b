//! Queue behaviour tests on real SQLite files in temporary directories.

use super::*;

fn sink(name: &str) -> ConnectorName {
    ConnectorName::new(name).unwrap()
}

fn item(n: usize, sinks: &[&str]) -> NewItem {
    NewItem {
        source: sink("lab-in"),
        kind: ItemKind::Hl7,
        msg_type: Some("ORU^R01".into()),
        control_id: Some(format!("MSG{n:05}")),
        subject: Some(format!("PAT{n}").into_bytes()),
        external_ref: None,
        payload: format!(
            "MSH|^~\\&|LAB|||||||ORU^R01|MSG{n:05}|P|2.5\rPID|1||PAT{n}||SECRETNAME{n}\r"
        )
        .into_bytes(),
        sinks: sinks.iter().map(|s| sink(s)).collect(),
    }
}

const NO_RETRY_LIMIT: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_millis(10),
    max_backoff: Duration::from_millis(20),
    max_attempts: None,
};

async fn ready(queue: &Queue, name: &str) -> Lease {
    match queue.next_delivery(&sink(name)).await.unwrap() {
        NextDelivery::Ready(lease) => lease,
        other => panic!("expected an item for {name}, got {other:?}"),
    }
}

#[tokio::test]
async fn each_sink_receives_items_in_order_with_its_own_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    for n in 0..3 {
        queue.append(item(n, &["a", "b"])).await.unwrap();
    }
    let first_a = ready(&queue, "a").await;
    assert_eq!(first_a.control_id.as_deref(), Some("MSG00000"));
    queue.mark_delivered(&sink("a"), first_a.id).await.unwrap();
    assert_eq!(
        ready(&queue, "a").await.control_id.as_deref(),
        Some("MSG00001")
    );
    // Sink b has not moved.
    assert_eq!(
        ready(&queue, "b").await.control_id.as_deref(),
        Some("MSG00000")
    );
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.sinks.len(), 2);
    assert_eq!(
        (
            stats.sinks[0].sink.as_str(),
            stats.sinks[0].pending,
            stats.sinks[0].delivered
        ),
        ("a", 2, 1)
    );
    assert_eq!((stats.sinks[1].pending, stats.sinks[1].delivered), (3, 0));
}

#[tokio::test]
async fn items_survive_closing_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let id = queue.append(item(1, &["a"])).await.unwrap();
    queue.close().await.unwrap();
    assert!(matches!(
        queue.append(item(2, &["a"])).await,
        Err(QueueError::Closed)
    ));

    let reopened = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let lease = ready(&reopened, "a").await;
    assert_eq!(lease.id, id);
    assert_eq!(lease.payload, item(1, &[]).payload);
    // Ids keep growing after a restart.
    assert!(reopened.append(item(2, &["a"])).await.unwrap() > id);
}

#[tokio::test]
async fn items_and_a_source_state_are_committed_together_and_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    assert_eq!(queue.source_state("sql:pms").await.unwrap(), None);
    let ids = queue
        .append_with_state(
            vec![item(1, &["a"]), item(2, &["a"])],
            Some(state(None, "patient after 'Müller'")),
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1]);
    queue
        .append_with_state(
            vec![item(3, &["a"])],
            Some(state(Some("patient after 'Müller'"), "lsn 0/16B3748")),
        )
        .await
        .unwrap();
    // Without a state the last one stays.
    queue
        .append_with_state(vec![item(4, &["a"])], None)
        .await
        .unwrap();
    queue.close().await.unwrap();

    let bytes = std::fs::read(dir.path().join(QUEUE_FILE)).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("lsn 0/16B3748"),
        "the state is sealed on disk"
    );

    let reopened = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    assert_eq!(
        reopened.source_state("sql:pms").await.unwrap().as_deref(),
        Some("lsn 0/16B3748")
    );
    assert_eq!(reopened.source_state("sql:other").await.unwrap(), None);
    let (leases, _) = reopened
        .ready_after(&sink("a"), ItemId(0), 10, 1 << 20)
        .await
        .unwrap();
    assert_eq!(leases.len(), 4);
}

fn state(expected: Option<&str>, value: &str) -> SourceState {
    SourceState {
        name: "sql:pms".into(),
        expected: expected.map(str::to_owned),
        value: value.into(),
    }
}

#[tokio::test]
async fn a_batch_whose_predecessor_failed_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    queue
        .append_with_state(vec![item(1, &["a"])], Some(state(None, "p1")))
        .await
        .unwrap();
    // Three batches in flight; the first is refused (its expected state is not the
    // stored one, as after any failure), so the two after it, which follow from it, must
    // be refused too: otherwise the stored position would pass over its items.
    let first = queue
        .enqueue_with_state(vec![item(2, &["a"])], Some(state(Some("p0"), "p2")))
        .await
        .unwrap();
    let second = queue
        .enqueue_with_state(vec![item(3, &["a"])], Some(state(Some("p2"), "p3")))
        .await
        .unwrap();
    let heartbeat = queue
        .enqueue_with_state(vec![], Some(state(Some("p3"), "p4")))
        .await
        .unwrap();
    for appending in [first, second, heartbeat] {
        let err = appending.committed().await.err().unwrap();
        assert!(
            matches!(err, QueueError::StateMoved { ref name } if name == "sql:pms"),
            "{err}"
        );
    }
    assert_eq!(
        queue.source_state("sql:pms").await.unwrap().as_deref(),
        Some("p1")
    );
    let (leases, _) = queue
        .ready_after(&sink("a"), ItemId(0), 10, 1 << 20)
        .await
        .unwrap();
    assert_eq!(leases.len(), 1, "nothing of a refused batch is written");

    // A reset forgets the state; the source, starting over, expects none.
    assert!(queue.forget_source_state("sql:pms").await.unwrap());
    assert!(!queue.forget_source_state("sql:pms").await.unwrap());
    let stale = queue
        .append_with_state(vec![], Some(state(Some("p1"), "p5")))
        .await;
    assert!(matches!(stale, Err(QueueError::StateMoved { .. })));
    queue
        .append_with_state(vec![item(4, &["a"])], Some(state(None, "fresh")))
        .await
        .unwrap();
    assert_eq!(
        queue.source_state("sql:pms").await.unwrap().as_deref(),
        Some("fresh")
    );
}

#[tokio::test]
async fn a_source_state_opens_only_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    queue
        .append_with_state(vec![], Some(state(None, "lsn 0/1")))
        .await
        .unwrap();
    queue.close().await.unwrap();
    let conn = rusqlite::Connection::open(dir.path().join(QUEUE_FILE)).unwrap();
    conn.execute(
        "INSERT INTO source_state (name, nonce, value, updated_at)
         SELECT 'sql:other', nonce, value, updated_at FROM source_state WHERE name = 'sql:pms'",
        [],
    )
    .unwrap();
    drop(conn);
    let reopened = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    assert_eq!(
        reopened.source_state("sql:pms").await.unwrap().as_deref(),
        Some("lsn 0/1")
    );
    let err = reopened.source_state("sql:other").await.err().unwrap();
    assert!(matches!(err, QueueError::StateUnreadable { .. }), "{err}");
}

#[tokio::test]
async fn a_version_1_file_is_upgraded_by_the_agent_and_left_alone_by_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let id = queue.append(item(1, &["a"])).await.unwrap();
    queue.close().await.unwrap();
    // Make it what version 1 wrote: no codec column, no source states.
    let conn = rusqlite::Connection::open(dir.path().join(QUEUE_FILE)).unwrap();
    conn.execute_batch(
        "ALTER TABLE items DROP COLUMN codec; DROP TABLE source_state; PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);

    let err = Queue::open_existing(dir.path()).err().unwrap();
    assert!(
        err.to_string()
            .contains("schema version 1 is older than this outpost"),
        "{err}"
    );
    let conn = rusqlite::Connection::open(dir.path().join(QUEUE_FILE)).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1, "inspection must not upgrade the file");
    drop(conn);

    let upgraded = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let stored = upgraded.get(id).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&stored.payload).contains("SECRETNAME1"));
    assert_eq!(upgraded.source_state("sql:pms").await.unwrap(), None);
    upgraded.close().await.unwrap();
    assert!(Queue::open_existing(dir.path()).is_ok());
}

#[tokio::test]
async fn a_failing_head_item_backs_off_and_blocks_later_items() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let first = queue.append(item(1, &["a"])).await.unwrap();
    queue.append(item(2, &["a"])).await.unwrap();
    let policy = RetryPolicy {
        initial_backoff: Duration::from_secs(30),
        ..NO_RETRY_LIMIT
    };
    let policy = RetryPolicy {
        max_backoff: Duration::from_secs(60),
        ..policy
    };
    let outcome = queue
        .mark_failed(&sink("a"), first, "peer said AE", policy, false)
        .await
        .unwrap();
    assert!(
        matches!(outcome, FailureOutcome::RetryAfter { attempts: 1, .. }),
        "{outcome:?}"
    );
    match queue.next_delivery(&sink("a")).await.unwrap() {
        NextDelivery::Backoff(wait) => assert!(wait > Duration::from_secs(10), "{wait:?}"),
        other => panic!("the second item overtook the first: {other:?}"),
    }
}

#[tokio::test]
async fn exhausted_attempts_make_a_dead_letter_that_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let first = queue.append(item(1, &["a"])).await.unwrap();
    let second = queue.append(item(2, &["a"])).await.unwrap();
    let policy = RetryPolicy {
        initial_backoff: Duration::ZERO,
        max_attempts: Some(2),
        ..NO_RETRY_LIMIT
    };
    queue
        .mark_failed(&sink("a"), first, "AE: unknown test code", policy, false)
        .await
        .unwrap();
    let outcome = queue
        .mark_failed(&sink("a"), first, "AE: unknown test code", policy, false)
        .await
        .unwrap();
    assert_eq!(outcome, FailureOutcome::DeadLettered { attempts: 2 });
    // The sink moves on past the dead letter.
    assert_eq!(ready(&queue, "a").await.id, second);
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].attempts), (first, 2));
    assert_eq!(dead[0].last_error.as_deref(), Some("AE: unknown test code"));

    assert_eq!(
        queue
            .retry_dead(Some(&sink("a")), Some(first))
            .await
            .unwrap(),
        1
    );
    assert_eq!(ready(&queue, "a").await.id, first);
    assert!(queue.dead_letters(None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_queue_file_holds_no_payload_text() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    for n in 0..50 {
        queue.append(item(n, &["a"])).await.unwrap();
    }
    queue.close().await.unwrap();
    let mut on_disk = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != KEY_FILE {
            on_disk.extend(std::fs::read(path).unwrap());
        }
    }
    assert!(on_disk
        .windows(b"SECRETNAME".len())
        .all(|w| w != b"SECRETNAME"));
    assert!(on_disk.windows(b"PAT1".len()).all(|w| w != b"PAT1"));
    // The control id is metadata kept in clear for support look-ups.
    assert!(on_disk.windows(b"MSG00001".len()).any(|w| w == b"MSG00001"));
}

#[tokio::test]
async fn a_wrong_key_cannot_open_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    queue.append(item(1, &["a"])).await.unwrap();
    queue.close().await.unwrap();
    std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    let with_new_key = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let err = with_new_key.next_delivery(&sink("a")).await.unwrap_err();
    assert!(matches!(err, QueueError::Unseal { .. }), "{err}");
}

#[tokio::test]
async fn purge_removes_settled_items_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let big = "x".repeat(4000);
    let mut ids = Vec::new();
    for n in 0..3000 {
        let mut it = item(n, &["a"]);
        it.payload.extend_from_slice(big.as_bytes());
        ids.push(queue.append(it).await.unwrap());
    }
    let kept = queue.append(item(9999, &["a"])).await.unwrap();
    for id in &ids {
        queue.mark_delivered(&sink("a"), *id).await.unwrap();
    }
    // A purge within retention removes nothing but checkpoints, so the main file holds all.
    assert_eq!(
        queue.purge(Duration::from_secs(3600)).await.unwrap().items,
        0
    );
    let full = queue.disk_bytes();

    std::thread::sleep(Duration::from_millis(5));
    let report = queue.purge(Duration::ZERO).await.unwrap();
    let empty = queue.disk_bytes();
    assert_eq!(report.items, ids.len());
    assert!(report.pages_freed > 0, "{report:?}");
    assert!(
        empty < full / 10,
        "queue file did not shrink: {full} -> {empty} bytes"
    );
    // The pending item stays.
    assert_eq!(ready(&queue, "a").await.id, kept);
    assert_eq!(queue.stats().await.unwrap().items, 1);
}

#[tokio::test]
async fn retention_keeps_recently_delivered_items() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let id = queue.append(item(1, &["a"])).await.unwrap();
    queue.mark_delivered(&sink("a"), id).await.unwrap();
    let report = queue.purge(Duration::from_secs(3600)).await.unwrap();
    assert_eq!(report.items, 0);
    assert!(queue.get(id).await.unwrap().is_some());
}

#[tokio::test]
async fn intake_stops_with_a_clear_error_when_the_disk_is_low() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(
        dir.path(),
        QueueOptions {
            min_free_disk_bytes: u64::MAX,
            ..QueueOptions::default()
        },
    )
    .unwrap();
    let err = queue.append(item(1, &["a"])).await.unwrap_err();
    assert!(matches!(err, QueueError::DiskFull { .. }), "{err}");
    assert!(err.to_string().starts_with("disk full:"), "{err}");
    assert_eq!(queue.stats().await.unwrap().items, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..200 {
                queue.append(item(t * 1000 + n, &["a"])).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(queue.stats().await.unwrap().sinks[0].pending, 1600);
}

#[tokio::test]
async fn search_finds_by_type_control_id_patient_and_text() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    for n in 0..20 {
        queue.append(item(n, &["a"])).await.unwrap();
    }
    let mut adt = item(100, &["a"]);
    adt.msg_type = Some("ADT^A01^ADT_A01".into());
    queue.append(adt).await.unwrap();
    queue
        .append_rejected(item(200, &[]), "no MSH segment".into())
        .await
        .unwrap();

    let by = |q: SearchQuery| {
        let queue = queue.clone();
        async move { queue.search(SearchQuery { limit: 100, ..q }).await.unwrap() }
    };
    assert_eq!(
        by(SearchQuery {
            msg_type: Some("ADT^A01".into()),
            ..Default::default()
        })
        .await
        .len(),
        1
    );
    assert_eq!(
        by(SearchQuery {
            msg_type: Some("ORU".into()),
            ..Default::default()
        })
        .await
        .len(),
        20
    );
    let hit = by(SearchQuery {
        control_id: Some("MSG00007".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(hit.len(), 1);
    assert_eq!(hit[0].deliveries[0].state, "pending");
    assert_eq!(
        by(SearchQuery {
            subject: Some("PAT13".into()),
            ..Default::default()
        })
        .await[0]
            .control_id
            .as_deref(),
        Some("MSG00013")
    );
    assert_eq!(
        by(SearchQuery {
            text: Some("secretname1".into()),
            ..Default::default()
        })
        .await
        .len(),
        12
    );
    let rejected = by(SearchQuery {
        include_rejected: true,
        control_id: Some("MSG00200".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        rejected[0].rejected_reason.as_deref(),
        Some("no MSH segment")
    );
    assert!(by(SearchQuery {
        since_ms: Some(now_ms() + 60_000),
        ..Default::default()
    })
    .await
    .is_empty());
}

#[tokio::test]
async fn reading_ahead_stops_at_the_byte_budget_but_always_takes_one() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    for n in 0..10 {
        let mut big = item(n, &["a"]);
        big.payload.resize(100_000, b'x');
        queue.append(big).await.unwrap();
    }
    let (leases, backoff) = queue
        .ready_after(&sink("a"), ItemId(0), 64, 350_000)
        .await
        .unwrap();
    assert_eq!((leases.len(), backoff), (3, None));
    let (leases, _) = queue
        .ready_after(&sink("a"), ItemId(0), 64, 10)
        .await
        .unwrap();
    assert_eq!(
        leases.len(),
        1,
        "the first item is taken even when it alone is over the budget"
    );
    let (leases, _) = queue
        .ready_after(&sink("a"), leases[0].id, 64, usize::MAX)
        .await
        .unwrap();
    assert_eq!(leases.len(), 9);
}
