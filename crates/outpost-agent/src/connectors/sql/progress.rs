//! The SQL source's health line: lag (age of the newest event's commit when it was queued),
//! WAL bytes behind where the database tells, the last event's commit time, and snapshot
//! progress per table (rows queued / estimated rows).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use outpost_sql::{ChangeEvent, EncodedEvents, Op, Progress};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// How often the database is asked for its side of the lag.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// What the source task has seen, for the health line.
#[derive(Default)]
pub(super) struct Tracker {
    /// Snapshot rows queued since this start, per table.
    snapshot_rows: BTreeMap<String, u64>,
    last_commit_time: Option<String>,
    /// When an event was last queued (for databases that give no commit time).
    last_queued: Option<String>,
    lag: Option<Duration>,
    last_probe: Option<Instant>,
    progress: Progress,
}

impl Tracker {
    /// Takes note of a queued batch.
    pub(super) fn observe(&mut self, events: &[ChangeEvent]) {
        for event in events {
            if event.op == Op::Snapshot {
                *self.snapshot_rows.entry(event.table.clone()).or_default() += 1;
            }
        }
        if !events.is_empty() {
            self.last_queued = OffsetDateTime::now_utc().format(&Rfc3339).ok();
        }
        let newest = events.iter().rev().find_map(|e| e.commit_time.as_deref());
        if let Some(commit_time) = newest {
            if let Ok(at) = OffsetDateTime::parse(commit_time, &Rfc3339) {
                let lag = OffsetDateTime::now_utc() - at;
                self.lag = Some(lag.try_into().unwrap_or(Duration::ZERO));
            }
            self.last_commit_time = Some(commit_time.to_owned());
        }
    }

    /// Takes note of a queued chunk of encoded events.
    pub(super) fn observe_encoded(&mut self, encoded: &EncodedEvents) {
        if encoded.op == Op::Snapshot {
            *self.snapshot_rows.entry(encoded.table.clone()).or_default() += encoded.count as u64;
        }
        if encoded.count > 0 {
            self.last_queued = OffsetDateTime::now_utc().format(&Rfc3339).ok();
        }
    }

    /// Whether it is time to ask the database again.
    pub(super) fn probe_due(&self) -> bool {
        self.last_probe.is_none_or(|at| at.elapsed() >= PROBE_EVERY)
    }

    /// The database's answer.
    pub(super) fn update(&mut self, progress: Progress) {
        self.last_probe = Some(Instant::now());
        self.progress = progress;
    }

    /// A failed probe: try again later, keep the last figures.
    pub(super) fn probe_failed(&mut self) {
        self.last_probe = Some(Instant::now());
    }

    /// Whether the snapshot was still running at the last probe.
    pub(super) fn snapshotting(&self) -> bool {
        self.progress.snapshotting
    }

    /// One line for people: `lag 0.2 s | 4096 WAL bytes behind | last event … | snapshot …`.
    pub(super) fn line(&self) -> String {
        let mut parts = Vec::new();
        match self.lag {
            Some(lag) => parts.push(format!("lag {:.1} s", lag.as_secs_f64())),
            None if self.last_queued.is_some() => {
                parts.push("lag n/a (the database gives no commit times)".to_owned())
            }
            None => parts.push("lag n/a (no change event yet)".to_owned()),
        }
        if let Some(bytes) = self.progress.bytes_behind {
            parts.push(format!("{bytes} WAL bytes behind"));
        }
        match (&self.last_commit_time, &self.last_queued) {
            (Some(at), _) => parts.push(format!("last event {at}")),
            (None, Some(at)) => parts.push(format!("last event queued {at}")),
            (None, None) => {}
        }
        if self.progress.snapshotting {
            let tables: Vec<String> = self
                .progress
                .snapshot_estimates
                .iter()
                .map(|(table, estimate)| {
                    let done = self.snapshot_rows.get(table).copied().unwrap_or(0);
                    format!("{table} {done}/~{}", estimate.max(&done))
                })
                .collect();
            parts.push(format!("snapshot {}", tables.join(", ")));
        } else if !self.snapshot_rows.is_empty() {
            let total: u64 = self.snapshot_rows.values().sum();
            parts.push(format!("snapshot done ({total} rows this run)"));
        }
        parts.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn event(table: &str, op: Op, commit_time: Option<&str>) -> ChangeEvent {
        ChangeEvent {
            source: "pms".into(),
            table: table.into(),
            op,
            key: Default::default(),
            before: None,
            after: None,
            position: None,
            tx: None,
            commit_time: commit_time.map(str::to_owned),
            id: None,
        }
    }

    #[test]
    fn the_line_says_lag_and_snapshot_progress() {
        let mut tracker = Tracker::default();
        assert!(tracker.probe_due());
        tracker.observe(&[
            event("patient", Op::Snapshot, None),
            event("patient", Op::Snapshot, None),
        ]);
        tracker.update(Progress {
            bytes_behind: Some(120),
            snapshot_estimates: vec![("patient".into(), 10), ("appointment".into(), 5)],
            snapshotting: true,
        });
        assert!(!tracker.probe_due());
        let line = tracker.line();
        assert!(
            line.contains("snapshot patient 2/~10, appointment 0/~5"),
            "{line}"
        );
        assert!(line.contains("120 WAL bytes behind"), "{line}");
        tracker.observe(&[event("patient", Op::Insert, Some("2020-01-01T00:00:00Z"))]);
        tracker.update(Progress::default());
        let line = tracker.line();
        assert!(
            line.starts_with("lag ") && line.contains("last event 2020-01-01T00:00:00Z"),
            "{line}"
        );
        assert!(line.contains("snapshot done (2 rows this run)"), "{line}");
    }
}
