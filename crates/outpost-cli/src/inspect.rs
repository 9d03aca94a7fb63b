//! `outpost queue …` and `outpost hl7 search`: what support staff used to grep HL7 files
//! for. They open the agent's queue beside the running agent (SQLite WAL allows it).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use outpost_agent::connectors::dicom::InstanceRecord;
use outpost_agent::AgentConfig;
use outpost_core::{ConnectorName, ItemId, ItemKind};
use outpost_queue::{now_ms, Queue, SearchQuery, StoredItem};

/// `outpost queue` actions.
#[derive(Subcommand)]
pub enum QueueAction {
    /// Depth per sink, dead letters, refused messages and disk use.
    Status,
    /// List dead letters with their last error.
    Dead {
        /// Only this sink.
        #[arg(long)]
        sink: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Put dead letters back in line: one item, one sink's, or all.
    Retry {
        /// Only this item.
        #[arg(long)]
        item: Option<ItemId>,
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        /// Every dead letter (needed when neither --item nor --sink is given).
        #[arg(long)]
        all: bool,
    },
    /// One item's metadata and deliveries; `--payload` also prints the message (patient data).
    Show {
        /// The item id.
        id: ItemId,
        /// Print the message itself.
        #[arg(long)]
        payload: bool,
    },
    /// Purge delivered items past the retention now and give the space back.
    Purge,
    /// DICOM studies in the queue (newest instances first): instances per study and how
    /// far each sink has got.
    Studies {
        /// List every instance under its study.
        #[arg(long)]
        instances: bool,
        /// Look at this many of the newest instances.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

/// `outpost hl7` actions.
#[derive(Subcommand)]
pub enum Hl7Action {
    /// Search stored messages (in transit, and delivered within the retention).
    Search {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// MSH-9, e.g. `ORU^R01` or `ADT`.
        #[arg(long = "type")]
        msg_type: Option<String>,
        /// MSH-10.
        #[arg(long)]
        control_id: Option<String>,
        /// PID-3 (first identifier), matched exactly.
        #[arg(long)]
        pid: Option<String>,
        /// Text anywhere in the message, case-insensitive.
        #[arg(long)]
        text: Option<String>,
        /// From: `2026-11-23`, `2026-11-23T10:00:00Z`, or an age like `2h`.
        #[arg(long)]
        since: Option<String>,
        /// Until (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// At most this many, newest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Include messages refused at intake.
        #[arg(long)]
        rejected: bool,
        /// Print each message (patient data).
        #[arg(long)]
        show: bool,
    },
}

/// Runs a queue action.
pub async fn queue(config: &AgentConfig, action: QueueAction) -> anyhow::Result<()> {
    let queue = Queue::open_existing(&config.data_dir)?;
    let result = queue_action(config, &queue, action).await;
    queue.close().await?;
    result
}

async fn queue_action(
    config: &AgentConfig,
    queue: &Queue,
    action: QueueAction,
) -> anyhow::Result<()> {
    match action {
        QueueAction::Status => print_status(queue).await,
        QueueAction::Dead { sink, limit } => {
            let sink = sink.as_deref().map(ConnectorName::new).transpose()?;
            let dead = queue.dead_letters(sink.as_ref(), limit).await?;
            if dead.is_empty() {
                println!("no dead letters");
            }
            for letter in dead {
                println!(
                    "item {}  sink {}  {}  control id {}  received {}  attempts {}\n    last error: {}",
                    letter.id,
                    letter.sink,
                    letter.msg_type.as_deref().unwrap_or("-"),
                    letter.control_id.as_deref().unwrap_or("-"),
                    format_time(letter.received_at_ms),
                    letter.attempts,
                    letter.last_error.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        QueueAction::Retry { item, sink, all } => {
            if item.is_none() && sink.is_none() && !all {
                bail!("say which dead letters to retry: --item ID, --sink NAME, or --all");
            }
            let sink = sink.as_deref().map(ConnectorName::new).transpose()?;
            let count = queue.retry_dead(sink.as_ref(), item).await?;
            println!(
                "{count} dead letter(s) put back in line; the agent picks them up within a second"
            );
            Ok(())
        }
        QueueAction::Show { id, payload } => {
            let item = queue
                .get(id)
                .await?
                .with_context(|| format!("no item {id} (purged, or never stored)"))?;
            print_item(&item, payload);
            Ok(())
        }
        QueueAction::Studies { instances, limit } => print_studies(queue, instances, limit).await,
        QueueAction::Purge => {
            let report = queue.purge(config.retention).await?;
            println!(
                "purged {} item(s), freed {} page(s); queue now {} on disk",
                report.items,
                report.pages_freed,
                bytes(queue.disk_bytes())
            );
            Ok(())
        }
    }
}

/// One study as the queue holds it.
#[derive(Default)]
struct StudyView {
    modality: String,
    calling_ae: String,
    first_ms: i64,
    last_ms: i64,
    bytes: u64,
    items: Vec<(StoredItem, InstanceRecord)>,
    /// sink -> (delivered, pending, dead)
    sinks: std::collections::BTreeMap<String, (u64, u64, u64)>,
}

async fn print_studies(queue: &Queue, list_instances: bool, limit: usize) -> anyhow::Result<()> {
    let found = queue
        .search(SearchQuery {
            limit: limit.max(1),
            kind: Some(ItemKind::Dicom),
            ..SearchQuery::default()
        })
        .await?;
    let mut studies: std::collections::BTreeMap<String, StudyView> = Default::default();
    for item in found {
        let Ok(record) = serde_json::from_slice::<InstanceRecord>(&item.payload) else {
            continue;
        };
        let key = record
            .study_instance_uid
            .clone()
            .unwrap_or_else(|| "(no study uid)".into());
        let study = studies.entry(key).or_default();
        if study.items.is_empty() {
            study.first_ms = item.received_at_ms;
        }
        study.first_ms = study.first_ms.min(item.received_at_ms);
        study.last_ms = study.last_ms.max(item.received_at_ms);
        study.modality = record.modality.clone().unwrap_or_default();
        study.calling_ae = record.calling_ae.clone();
        study.bytes += record.len;
        for delivery in &item.deliveries {
            let counts = study.sinks.entry(delivery.sink.clone()).or_default();
            match delivery.state {
                "delivered" => counts.0 += 1,
                "dead" => counts.2 += 1,
                _ => counts.1 += 1,
            }
        }
        study.items.push((item, record));
    }
    if studies.is_empty() {
        println!("no DICOM instances in the queue");
        return Ok(());
    }
    for (uid, study) in &studies {
        println!(
            "study {uid}  {} from {}  {} instance(s), {}, received {} .. {}",
            if study.modality.is_empty() {
                "?"
            } else {
                &study.modality
            },
            study.calling_ae,
            study.items.len(),
            bytes(study.bytes),
            format_time(study.first_ms),
            format_time(study.last_ms)
        );
        for (sink, (delivered, pending, dead)) in &study.sinks {
            println!("    {sink:<16} delivered {delivered}  pending {pending}  dead {dead}");
        }
        if list_instances {
            for (item, record) in &study.items {
                let states: Vec<String> = item
                    .deliveries
                    .iter()
                    .map(|d| format!("{}={}", d.sink, d.state))
                    .collect();
                println!(
                    "      #{} {}  class {}  ts {}  {}  {}",
                    item.id,
                    record.sop_instance_uid,
                    record.sop_class_uid,
                    record.transfer_syntax,
                    bytes(record.len),
                    states.join(" ")
                );
            }
        }
    }
    Ok(())
}

async fn print_status(queue: &Queue) -> anyhow::Result<()> {
    let stats = queue.stats().await?;
    println!(
        "queue {}  ({} on disk, {} free)",
        queue.path().display(),
        bytes(queue.disk_bytes()),
        queue
            .disk_free_bytes()
            .map(bytes)
            .unwrap_or_else(|| "?".into())
    );
    println!(
        "{:<20} {:>9} {:>9} {:>6} {:>10}  oldest pending",
        "sink", "pending", "retrying", "dead", "delivered"
    );
    for sink in &stats.sinks {
        let oldest = sink.oldest_pending_ms.map(|ms| {
            humantime::format_duration(Duration::from_secs((ms / 1000) as u64)).to_string()
        });
        println!(
            "{:<20} {:>9} {:>9} {:>6} {:>10}  {}",
            sink.sink,
            sink.pending,
            sink.retrying,
            sink.dead,
            sink.delivered,
            oldest.as_deref().unwrap_or("-")
        );
    }
    println!(
        "items stored: {}  refused at intake (kept for inspection): {}",
        stats.items, stats.rejected
    );
    Ok(())
}

/// Runs an HL7 action.
pub async fn hl7(action: Hl7Action) -> anyhow::Result<()> {
    let Hl7Action::Search {
        config,
        msg_type,
        control_id,
        pid,
        text,
        since,
        until,
        limit,
        rejected,
        show,
    } = action;
    let config = AgentConfig::load(&config)?;
    let query = SearchQuery {
        msg_type,
        control_id,
        subject: pid,
        text,
        since_ms: since
            .as_deref()
            .map(parse_time)
            .transpose()
            .context("--since")?,
        until_ms: until
            .as_deref()
            .map(parse_time)
            .transpose()
            .context("--until")?,
        limit,
        include_rejected: rejected,
        kind: Some(ItemKind::Hl7),
    };
    let queue = Queue::open_existing(&config.data_dir)?;
    let found = queue.search(query).await;
    queue.close().await?;
    let found = found?;
    if found.is_empty() {
        println!("no stored message matches");
    }
    for item in &found {
        print_item(item, show);
    }
    Ok(())
}

fn print_item(item: &StoredItem, with_payload: bool) {
    let deliveries: Vec<String> = item
        .deliveries
        .iter()
        .map(|d| match &d.last_error {
            Some(err) if d.state != "delivered" => format!(
                "{} {} (attempts {}, last error: {err})",
                d.sink, d.state, d.attempts
            ),
            _ => format!("{} {}", d.sink, d.state),
        })
        .collect();
    println!(
        "item {}  {}  {}  control id {}  from {}  {} bytes  {}",
        item.id,
        format_time(item.received_at_ms),
        item.msg_type.as_deref().unwrap_or("-"),
        item.control_id.as_deref().unwrap_or("-"),
        item.source,
        item.payload.len(),
        match &item.rejected_reason {
            Some(reason) => format!("REFUSED: {reason}"),
            None => format!("-> {}", deliveries.join(", ")),
        }
    );
    if with_payload {
        for segment in item
            .payload
            .split(|b| *b == b'\r')
            .filter(|s| !s.is_empty())
        {
            println!("    {}", String::from_utf8_lossy(segment));
        }
    }
}

/// `2026-11-23`, an RFC 3339 time, or an age such as `2h` (that long ago).
fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(age) = humantime::parse_duration(text) {
        return Ok(now_ms() - age.as_millis() as i64);
    }
    if let Ok(at) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok((at.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let day_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(day) = time::Date::parse(text, &day_format) {
        return Ok(day.midnight().assume_utc().unix_timestamp() * 1000);
    }
    bail!("expected a date (2026-11-23), a time (2026-11-23T10:00:00Z) or an age (2h), found {text:?}")
}

fn format_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Bytes for people: `1.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
