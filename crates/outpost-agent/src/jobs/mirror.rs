//! Mirrors the audit log to the hub: on each session the hub says how far its copy goes,
//! and the agent sends the lines after that, exactly as written, then each new one.

use std::io::{BufRead, Seek, SeekFrom};
use std::path::Path;

use outpost_uplink::UplinkHandle;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::jobs::audit::AuditWriter;

/// Lines per message, at most.
const BATCH_LINES: usize = 256;
/// Bytes per message, about at most.
const BATCH_BYTES: usize = 512 * 1024;

/// What the hub link tells the mirror.
#[derive(Debug)]
pub enum MirrorEvent {
    /// The hub holds entries up to `after_seq`.
    Wanted {
        /// The last entry the hub holds.
        after_seq: u64,
        /// The session it came on.
        session: u64,
    },
    /// A session ended.
    SessionEnded {
        /// Which.
        session: u64,
    },
}

/// Where the reader stopped last: the byte offset just after entry `seq`.
#[derive(Default, Clone, Copy)]
struct Bookmark {
    seq: u64,
    offset: u64,
}

/// Runs until shutdown.
pub async fn run(
    audit: AuditWriter,
    uplink: UplinkHandle,
    mut events: mpsc::Receiver<MirrorEvent>,
    shutdown: CancellationToken,
) {
    let mut appended = audit.watch();
    // (session, the last seq the hub has or has been sent)
    let mut hub: Option<(u64, u64)> = None;
    let mut bookmark = Bookmark::default();
    loop {
        let local_last = *appended.borrow_and_update();
        if let Some((session, after)) = hub {
            if local_last > after {
                let path = audit.path().to_owned();
                let read =
                    tokio::task::spawn_blocking(move || read_after(&path, after, bookmark)).await;
                match read {
                    Ok(Ok((lines, last_seq, next))) if !lines.is_empty() => {
                        bookmark = next;
                        if uplink.send_audit(session, lines).await.is_err() {
                            break;
                        }
                        hub = Some((session, last_seq));
                        continue;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "cannot read the audit log for the hub mirror");
                    }
                    Err(_) => {}
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = appended.changed() => if changed.is_err() { break },
            event = events.recv() => match event {
                Some(MirrorEvent::Wanted { after_seq, session }) => hub = Some((session, after_seq)),
                Some(MirrorEvent::SessionEnded { session }) => {
                    if hub.is_some_and(|(current, _)| current == session) {
                        hub = None;
                    }
                }
                None => break,
            },
        }
    }
}

/// The lines after entry `after` (up to a batch), the last one's seq, and a bookmark
/// after it.
fn read_after(
    path: &Path,
    after: u64,
    bookmark: Bookmark,
) -> std::io::Result<(Vec<String>, u64, Bookmark)> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let mut file = std::fs::File::open(path)?;
    let start = if bookmark.seq == after && bookmark.offset > 0 {
        bookmark.offset
    } else {
        0
    };
    file.seek(SeekFrom::Start(start))?;
    let mut reader = std::io::BufReader::new(file);
    let mut offset = start;
    let mut lines = Vec::new();
    let mut bytes = 0usize;
    let mut last = Bookmark {
        seq: after,
        offset: start,
    };
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader.read_line(&mut line)?;
        if read == 0 || !line.ends_with('\n') {
            // The end, or a line still being written: it goes in the next batch.
            break;
        }
        offset += read as u64;
        let text = line.trim_end_matches('\n');
        let Ok(Seq { seq }) = serde_json::from_str::<Seq>(text) else {
            continue;
        };
        if seq <= after {
            last = Bookmark { seq, offset };
            continue;
        }
        bytes += text.len();
        lines.push(text.to_owned());
        last = Bookmark { seq, offset };
        if lines.len() >= BATCH_LINES || bytes >= BATCH_BYTES {
            break;
        }
    }
    Ok((lines, last.seq, last))
}
