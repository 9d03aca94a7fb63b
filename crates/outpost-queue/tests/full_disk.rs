//! A really full disk (a small tmpfs): intake fails with a clear error, the queue is not
//! corrupted, what was stored stays deliverable, and intake resumes once space is freed.
//! Needs root for `mount -t tmpfs` (CI runs as root).

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_core::{ConnectorName, ItemKind};
use outpost_queue::{NewItem, NextDelivery, Queue, QueueError, QueueOptions};

struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "mount -t tmpfs failed ({status}); this test needs root to make a small disk that really fills up");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Bytes that do not compress (the queue compresses large payloads, and this test must
/// fill the disk with what it appends).
fn noise(seed: usize, len: usize) -> Vec<u8> {
    let mut state = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn item(n: usize) -> NewItem {
    NewItem {
        source: ConnectorName::new("lab-in").unwrap(),
        kind: ItemKind::Hl7,
        msg_type: Some("ORU^R01".into()),
        control_id: Some(format!("MSG{n}")),
        subject: None,
        external_ref: None,
        payload: noise(n, 16 * 1024),
        sinks: vec![ConnectorName::new("lab-out").unwrap()],
    }
}

#[tokio::test]
async fn a_full_disk_stops_intake_without_corrupting_the_queue() {
    let disk = Tmpfs::mount("32m");
    let data = disk.path().join("data");
    // No free-space floor: let SQLite run into the real ENOSPC.
    // Default reserve (8 MiB): more than the WAL holds between automatic checkpoints.
    let options = QueueOptions {
        min_free_disk_bytes: 0,
        ..QueueOptions::default()
    };
    let queue = Queue::open(&data, options).unwrap();
    let mut stored = Vec::new();
    let err = loop {
        match queue.append(item(stored.len())).await {
            Ok(id) => stored.push(id),
            Err(err) => break err,
        }
        assert!(stored.len() < 10_000, "a 32 MiB disk never filled up");
    };
    assert!(
        matches!(err, QueueError::DiskFull { .. }),
        "expected DiskFull, got: {err}"
    );
    assert!(err.to_string().starts_with("disk full:"), "{err}");
    assert!(!stored.is_empty());

    // The reserve was given up so bookkeeping still works, and intake stays refused.
    assert!(!data.join(outpost_queue::RESERVE_FILE).exists());
    assert!(matches!(
        queue.append(item(0)).await,
        Err(QueueError::DiskFull { .. })
    ));

    // Everything acknowledged is still there and readable, in order.
    let sink = ConnectorName::new("lab-out").unwrap();
    for id in &stored {
        match queue.next_delivery(&sink).await.unwrap() {
            NextDelivery::Ready(lease) => {
                assert_eq!(lease.id, *id);
                queue.mark_delivered(&sink, lease.id).await.unwrap();
            }
            other => panic!("item {id} missing after the disk filled: {other:?}"),
        }
    }
    // Freeing space (purging what was delivered) lets intake resume.
    tokio::time::sleep(Duration::from_millis(5)).await;
    queue.purge(Duration::ZERO).await.unwrap();
    queue
        .append(item(99_999))
        .await
        .expect("intake resumes once space is free");
    assert!(
        data.join(outpost_queue::RESERVE_FILE).exists(),
        "the reserve is made again"
    );
    queue.close().await.unwrap();

    let conn = rusqlite::Connection::open(data.join("queue.db")).unwrap();
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(verdict, "ok");
}
