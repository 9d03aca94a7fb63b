//! `logs.search`: search the agent's own log lines, or the HL7 messages stored in the
//! queue, one JSON object a line.
//!
//! Arguments:
//! - `in`: `"logs"` (default) or `"hl7"`.
//! - `text`: a substring (ASCII case-insensitive); in `hl7`, matched against the payload.
//! - `limit`: 1 to 1000, default 100; the newest matches are returned.
//! - `logs` only: `level` (that level and more severe ones).
//! - `hl7` only: `msh9` (`ORU^R01`, or `ORU` for every ORU), `control_id` (exact),
//!   `patient_id` (exact PID-3 identifier, compared through the queue's keyed digest),
//!   `since_ms` / `until_ms` (received at or after / before, unix ms), `rejected` (also
//!   messages refused at intake, default false) and `payload` (default false: metadata
//!   only; true adds the message text, lossily decoded as UTF-8).
//!
//! The summary is a count only: it goes to the audit log, which must hold no PHI.

use async_trait::async_trait;
use outpost_policy::Capability;
use outpost_queue::{SearchQuery, StoredItem};
use serde::Serialize;

use super::{cut_note, unless_cancelled, Args};
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// The most matches one job may ask for.
pub const MAX_LIMIT: u64 = 1000;
/// Matches returned when the job does not say.
pub const DEFAULT_LIMIT: u64 = 100;

const HL7_ONLY: [&str; 7] = [
    "msh9",
    "control_id",
    "patient_id",
    "since_ms",
    "until_ms",
    "payload",
    "rejected",
];

/// The `logs.search` capability.
pub struct LogsSearch;

/// One stored message as `logs.search` returns it.
#[derive(Debug, Serialize)]
struct FoundMessage<'a> {
    id: i64,
    source: &'a str,
    kind: &'static str,
    msg_type: Option<&'a str>,
    control_id: Option<&'a str>,
    received_at_ms: i64,
    /// `rejected`, `dead` (any sink gave up), `pending` (any sink still to go) or
    /// `delivered`.
    state: &'static str,
    rejected_reason: Option<&'a str>,
    deliveries: Vec<FoundDelivery<'a>>,
    payload_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
}

#[derive(Debug, Serialize)]
struct FoundDelivery<'a> {
    sink: &'a str,
    state: &'static str,
    attempts: u32,
    last_error: Option<&'a str>,
}

impl<'a> FoundMessage<'a> {
    fn new(item: &'a StoredItem, with_payload: bool) -> FoundMessage<'a> {
        let state = if item.rejected_reason.is_some() {
            "rejected"
        } else if item.deliveries.iter().any(|d| d.state == "dead") {
            "dead"
        } else if item.deliveries.iter().any(|d| d.state == "pending") {
            "pending"
        } else {
            "delivered"
        };
        FoundMessage {
            id: item.id.0,
            source: &item.source,
            kind: item.kind.as_str(),
            msg_type: item.msg_type.as_deref(),
            control_id: item.control_id.as_deref(),
            received_at_ms: item.received_at_ms,
            state,
            rejected_reason: item.rejected_reason.as_deref(),
            deliveries: item
                .deliveries
                .iter()
                .map(|d| FoundDelivery {
                    sink: &d.sink,
                    state: d.state,
                    attempts: d.attempts,
                    last_error: d.last_error.as_deref(),
                })
                .collect(),
            payload_bytes: item.payload.len(),
            payload: with_payload.then(|| String::from_utf8_lossy(&item.payload).into_owned()),
        }
    }
}

#[async_trait]
impl CapabilityHandler for LogsSearch {
    fn capability(&self) -> Capability {
        Capability::LogsSearch
    }

    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let mut known = vec!["in", "text", "limit", "level"];
        known.extend(HL7_ONLY);
        let args = Args::new(job.args, &known)?;
        let limit = args.u64_in("limit", 1..=MAX_LIMIT, DEFAULT_LIMIT)?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let text = args.str("text")?.filter(|t| !t.is_empty());
        match args.str("in")?.unwrap_or("logs") {
            "logs" => {
                if let Some(name) = HL7_ONLY.iter().find(|name| args.has(name)) {
                    return Err(CapabilityError::BadArgs(format!(
                        "argument `{name}`: applies only with `in` = \"hl7\""
                    )));
                }
                search_logs(cx, &args, text, limit, out).await
            }
            "hl7" => {
                if args.has("level") {
                    return Err(CapabilityError::BadArgs(
                        "argument `level`: applies only with `in` = \"logs\"".to_owned(),
                    ));
                }
                search_hl7(cx, job, &args, text, limit, out).await
            }
            other => Err(CapabilityError::BadArgs(format!(
                "argument `in`: expected \"logs\" or \"hl7\", found {other:?}"
            ))),
        }
    }
}

async fn search_logs(
    cx: &JobContext,
    args: &Args<'_>,
    text: Option<&str>,
    limit: usize,
    out: &mut Output,
) -> Result<String, CapabilityError> {
    let level = args.level("level")?;
    let found = cx.logs.search(text.unwrap_or(""), level, limit);
    let mut written = 0usize;
    for line in &found {
        if out.write_json(line).await.is_err() {
            break;
        }
        written += 1;
    }
    Ok(format!(
        "{} log line{} matched, {written} returned{}",
        found.len(),
        if found.len() == 1 { "" } else { "s" },
        cut_note(out)
    ))
}

async fn search_hl7(
    cx: &JobContext,
    job: &JobInput<'_>,
    args: &Args<'_>,
    text: Option<&str>,
    limit: usize,
    out: &mut Output,
) -> Result<String, CapabilityError> {
    let owned = |value: Option<&str>| value.filter(|v| !v.is_empty()).map(str::to_owned);
    let query = SearchQuery {
        msg_type: owned(args.str("msh9")?),
        control_id: owned(args.str("control_id")?),
        subject: owned(args.str("patient_id")?),
        text: text.map(str::to_owned),
        since_ms: args.i64("since_ms")?,
        until_ms: args.i64("until_ms")?,
        limit,
        include_rejected: args.bool("rejected")?.unwrap_or(false),
        kind: Some(outpost_core::ItemKind::Hl7),
    };
    let with_payload = args.bool("payload")?.unwrap_or(false);
    let queue = cx.queue.as_ref().ok_or_else(|| {
        CapabilityError::Failed("this agent has no queue open to search".to_owned())
    })?;
    let found = unless_cancelled(&job.cancel, queue.search(query))
        .await?
        .map_err(|err| CapabilityError::Failed(format!("searching the queue: {err}")))?;
    let mut written = 0usize;
    for item in &found {
        if job.cancel.is_cancelled() {
            return Err(CapabilityError::Cancelled);
        }
        if out
            .write_json(&FoundMessage::new(item, with_payload))
            .await
            .is_err()
        {
            break;
        }
        written += 1;
    }
    Ok(format!(
        "{} stored message{} matched, {written} returned{}",
        found.len(),
        if found.len() == 1 { "" } else { "s" },
        cut_note(out)
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::testutil;
    use crate::logbuf::LogLine;
    use outpost_core::{ConnectorName, ItemKind};
    use outpost_queue::{NewItem, Queue, QueueOptions};
    use serde_json::json;

    const POLICY: &str = "[allow]\n\"logs.search\" = true\n";

    #[tokio::test]
    async fn log_search_matches_text_and_level() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        for (level, text) in [
            ("INFO", "lab-in accepted a message"),
            ("WARN", "lab-out backing off"),
            ("ERROR", "lab-out delivery failed"),
        ] {
            cx.logs.push(LogLine {
                time_ms: 1,
                level: level.to_owned(),
                target: "outpost_agent".to_owned(),
                text: text.to_owned(),
            });
        }
        let policy = testutil::policy(POLICY);
        let (result, output) =
            testutil::run(&LogsSearch, &cx, &policy, json!({"text": "LAB-OUT"})).await;
        assert_eq!(result.unwrap(), "2 log lines matched, 2 returned");
        assert_eq!(testutil::lines(&output).len(), 2);

        let (result, output) = testutil::run(
            &LogsSearch,
            &cx,
            &policy,
            json!({"in": "logs", "text": "lab", "level": "error"}),
        )
        .await;
        result.unwrap();
        let lines = testutil::lines(&output);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["text"], "lab-out delivery failed");
    }

    #[tokio::test]
    async fn hl7_arguments_are_refused_for_log_search_and_bad_in_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let policy = testutil::policy(POLICY);
        let (result, _) = testutil::run(&LogsSearch, &cx, &policy, json!({"msh9": "ORU"})).await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("`msh9`") && err.contains("hl7"), "{err}");
        let (result, _) = testutil::run(&LogsSearch, &cx, &policy, json!({"in": "db"})).await;
        assert!(result.unwrap_err().to_string().contains("`in`"));
        let (result, _) = testutil::run(&LogsSearch, &cx, &policy, json!({"in": "hl7"})).await;
        assert!(matches!(result, Err(CapabilityError::Failed(m)) if m.contains("no queue")));
    }

    #[tokio::test]
    async fn hl7_search_returns_metadata_and_the_payload_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let options = QueueOptions {
            min_free_disk_bytes: 0,
            reserve_bytes: 0,
            ..QueueOptions::default()
        };
        let queue = Queue::open(&dir.path().join("data"), options).unwrap();
        let lab_out = ConnectorName::new("lab-out").unwrap();
        for (msg_type, control_id, body) in [
            ("ORU^R01^ORU_R01", "c1", "PID|1||12345||DOE^JANE"),
            ("ADT^A01", "c2", "PID|1||999||ROE^RICHARD"),
        ] {
            queue
                .append(NewItem {
                    source: ConnectorName::new("lab-in").unwrap(),
                    kind: ItemKind::Hl7,
                    msg_type: Some(msg_type.to_owned()),
                    control_id: Some(control_id.to_owned()),
                    subject: None,
                    external_ref: None,
                    payload: format!("MSH|^~\\&|LAB\r{body}\r").into_bytes(),
                    sinks: vec![lab_out.clone()],
                })
                .await
                .unwrap();
        }
        let (mut cx, _reloads) = testutil::context(dir.path());
        cx.queue = Some(queue.clone());
        let policy = testutil::policy(POLICY);

        let (result, output) = testutil::run(
            &LogsSearch,
            &cx,
            &policy,
            json!({"in": "hl7", "msh9": "ORU^R01"}),
        )
        .await;
        let summary = result.unwrap();
        assert_eq!(summary, "1 stored message matched, 1 returned");
        assert!(!summary.contains("DOE"));
        let found = testutil::lines(&output);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["control_id"], "c1");
        assert_eq!(found[0]["source"], "lab-in");
        assert_eq!(found[0]["state"], "pending");
        assert_eq!(found[0]["deliveries"][0]["sink"], "lab-out");
        assert!(found[0].get("payload").is_none());
        assert!(!output.contains("DOE"));

        let (result, output) = testutil::run(
            &LogsSearch,
            &cx,
            &policy,
            json!({"in": "hl7", "text": "roe^rich", "payload": true}),
        )
        .await;
        result.unwrap();
        let found = testutil::lines(&output);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["control_id"], "c2");
        assert!(found[0]["payload"]
            .as_str()
            .unwrap()
            .contains("ROE^RICHARD"));
        queue.close().await.unwrap();
    }
}
