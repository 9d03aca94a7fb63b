//! Wires the agent to its hub: loads (or, with a token in `[hub]`, makes) the credentials,
//! starts the uplink with an inventory of this agent, and puts messages the hub sends down
//! into the queue for the named sink.

use std::sync::Arc;
use std::time::Instant;

use outpost_core::{ConnectorName, ItemKind};
use outpost_proto::{ConnectorReport, Inventory, QueueReport};
use outpost_queue::{NewItem, Queue};
use outpost_uplink::{Credentials, DownRequest, Inbound, InventorySource, Uplink, UplinkHandle};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, HUB_SOURCE};
use crate::connectors::SinkKind;
use crate::jobs::mirror::{self, MirrorEvent};
use crate::jobs::{runner, JobContext, RunnerMessage, RunnerSettings};
use crate::{AgentError, Health};

/// Jobs that may run at once on one agent.
const MAX_CONCURRENT_JOBS: usize = 4;

/// Starts the uplink; returns its handle.
pub async fn start(
    config: Arc<AgentConfig>,
    queue: Queue,
    cx: JobContext,
    shutdown: CancellationToken,
) -> Result<UplinkHandle, AgentError> {
    let health = cx.health.clone();
    let sql_health = cx.health.clone();
    let credentials = match Credentials::load(&config.data_dir) {
        Ok(credentials) => credentials,
        Err(outpost_uplink::UplinkError::NotEnrolled { .. })
            if has_enrollment_settings(&config) =>
        {
            let hub = config.hub.clone().unwrap_or_default();
            let (url, token) = (hub.url.unwrap_or_default(), hub.token.unwrap_or_default());
            let enrolled =
                outpost_uplink::enroll(&config.data_dir, &url, &token, hub.ca_file.as_deref())
                    .await?;
            tracing::info!(agent_id = %enrolled.agent_id, name = %enrolled.name, hub = %url, "enrolled with the hub");
            Credentials::load(&config.data_dir)?
        }
        Err(err) => return Err(err.into()),
    };
    let agent_id = credentials.agent_id.clone();
    let settings = RunnerSettings {
        agent_id: agent_id.clone(),
        agent_key: credentials.key.clone(),
        job_key: credentials.job_key,
        data_dir: config.data_dir.clone(),
        policy_path: config.policy.clone(),
        config_path: Some(config.path.clone()),
        max_concurrent: MAX_CONCURRENT_JOBS,
    };
    let (inbound, inbound_rx) = mpsc::channel(64);
    let inventory = inventory_source(config.clone(), queue.clone(), health);
    let uplink = Uplink::start(credentials, inventory, inbound, shutdown.clone());
    let runner = runner::start(
        settings,
        JobContext { agent_id, ..cx },
        uplink.clone(),
        shutdown.clone(),
    )?;
    let (mirror_events, mirror_rx) = mpsc::channel(16);
    tokio::spawn(mirror::run(
        runner.audit.clone(),
        uplink.clone(),
        mirror_rx,
        shutdown.clone(),
    ));
    let sql_calls = crate::connectors::sqlsink::start_calls(
        config.clone(),
        uplink.clone(),
        sql_health,
        shutdown.clone(),
    );
    let (downs, requests) = mpsc::channel(64);
    tokio::spawn(take_downs(
        config,
        queue,
        uplink.clone(),
        requests,
        shutdown,
    ));
    tokio::spawn(route(
        inbound_rx,
        downs,
        runner.messages,
        mirror_events,
        Some(sql_calls),
    ));
    Ok(uplink)
}

/// Hands each message from the hub to the part of the agent that deals with it (an agent
/// without SQL sinks: write-back calls are dropped, and the hub times them out).
pub async fn route_inbound(
    inbound: mpsc::Receiver<Inbound>,
    downs: mpsc::Sender<DownRequest>,
    jobs: mpsc::Sender<RunnerMessage>,
    mirror: mpsc::Sender<MirrorEvent>,
) {
    route(inbound, downs, jobs, mirror, None).await
}

async fn route(
    mut inbound: mpsc::Receiver<Inbound>,
    downs: mpsc::Sender<DownRequest>,
    jobs: mpsc::Sender<RunnerMessage>,
    mirror: mpsc::Sender<MirrorEvent>,
    sql_calls: Option<mpsc::Sender<outpost_proto::SqlCall>>,
) {
    while let Some(message) = inbound.recv().await {
        let delivered = match message {
            Inbound::Down(request) => downs.send(request).await.is_ok(),
            Inbound::Job { dispatch_id, job } => jobs
                .send(RunnerMessage::Job { dispatch_id, job })
                .await
                .is_ok(),
            Inbound::CancelJob { dispatch_id } => jobs
                .send(RunnerMessage::Cancel { dispatch_id })
                .await
                .is_ok(),
            Inbound::AuditWanted { after_seq, session } => mirror
                .send(MirrorEvent::Wanted { after_seq, session })
                .await
                .is_ok(),
            Inbound::SqlCall(call) => match &sql_calls {
                Some(sql_calls) => sql_calls.send(call).await.is_ok(),
                None => {
                    tracing::warn!(call_id = %call.call_id, "write-back call on an agent that takes none; dropped");
                    true
                }
            },
            Inbound::SessionEnded { session } => mirror
                .send(MirrorEvent::SessionEnded { session })
                .await
                .is_ok(),
        };
        if !delivered {
            break;
        }
    }
}

fn has_enrollment_settings(config: &AgentConfig) -> bool {
    config
        .hub
        .as_ref()
        .is_some_and(|hub| hub.url.is_some() && hub.token.is_some())
}

fn inventory_source(config: Arc<AgentConfig>, queue: Queue, health: Health) -> InventorySource {
    let started = Instant::now();
    Arc::new(move || {
        let (config, queue, health) = (config.clone(), queue.clone(), health.clone());
        Box::pin(async move {
            let stats = queue.stats().await.unwrap_or_default();
            Inventory {
                hostname: outpost_uplink::hostname(),
                os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_secs: started.elapsed().as_secs(),
                agent_time_ms: outpost_queue::now_ms(),
                connectors: health
                    .snapshot()
                    .into_iter()
                    .map(|(name, status)| ConnectorReport {
                        name: name.to_string(),
                        role: status.role.to_owned(),
                        kind: status.kind.to_owned(),
                        state: status.state.as_str().to_owned(),
                        last_error: status.last_error,
                        detail: status.detail,
                        items: status.items,
                        failures: status.failures,
                    })
                    .collect(),
                queues: stats
                    .sinks
                    .iter()
                    .filter(|s| config.sinks.iter().any(|c| c.name.as_str() == s.sink))
                    .map(|s| QueueReport {
                        sink: s.sink.clone(),
                        pending: s.pending,
                        retrying: s.retrying,
                        dead: s.dead,
                        oldest_pending_ms: s.oldest_pending_ms,
                    })
                    .collect(),
                rejected: stats.rejected,
                disk_free_bytes: queue.disk_free_bytes(),
                queue_bytes: queue.disk_bytes(),
            }
        })
    })
}

/// Puts each message from the hub on its sink's queue, once: a message the hub sends
/// again (after a reconnect) is answered with its current state instead.
async fn take_downs(
    config: Arc<AgentConfig>,
    queue: Queue,
    uplink: UplinkHandle,
    mut requests: mpsc::Receiver<DownRequest>,
    shutdown: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let (state, item_id, error) = match take_down(&config, &queue, &request).await {
            Ok((state, item_id, error)) => (state, item_id, error),
            Err(err) => {
                // Not stored: say nothing, the hub resends on the next session.
                tracing::error!(down_id = %request.down_id, error = %err, "cannot queue a message from the hub");
                continue;
            }
        };
        tracing::info!(down_id = %request.down_id, sink = %request.sink, state, "message from the hub");
        uplink
            .report_down(&request.down_id, state, item_id, error)
            .await;
    }
}

async fn take_down(
    config: &AgentConfig,
    queue: &Queue,
    request: &DownRequest,
) -> Result<(&'static str, Option<i64>, Option<String>), outpost_queue::QueueError> {
    if let Some((id, delivery)) = queue.find_by_external_ref(&request.down_id).await? {
        let state = match delivery.as_ref().map(|d| d.state) {
            Some("delivered") => "delivered",
            Some("dead") => "dead",
            _ => "queued",
        };
        return Ok((state, Some(id.0), delivery.and_then(|d| d.last_error)));
    }
    let sink = config
        .sinks
        .iter()
        .find(|s| s.name.as_str() == request.sink);
    let sink = match sink {
        None => {
            return Ok((
                "refused",
                None,
                Some(format!("this agent has no sink named {:?}", request.sink)),
            ))
        }
        Some(sink) if matches!(sink.kind, SinkKind::Dicom(_) | SinkKind::Stow(_)) => {
            return Ok((
                "refused",
                None,
                Some(format!(
                    "sink {:?} takes DICOM instances, not HL7 messages",
                    request.sink
                )),
            ))
        }
        Some(sink) if matches!(sink.kind, SinkKind::Sql(_)) => {
            return Ok((
                "refused",
                None,
                Some(format!(
                    "sink {:?} runs SQL operations (POST /api/v1/agents/{{id}}/sql/...), not HL7 messages",
                    request.sink
                )),
            ))
        }
        Some(sink) if matches!(sink.kind, SinkKind::Hub(_)) => {
            return Ok((
                "refused",
                None,
                Some(format!("sink {:?} leads back to the hub", request.sink)),
            ))
        }
        Some(sink) => sink,
    };
    let payload = outpost_hl7::normalize_segment_terminators(&request.payload).into_owned();
    let (msg_type, control_id) = match outpost_hl7::Message::parse(&payload) {
        Ok(message) => (message.message_type_full(), message.control_id()),
        Err(err) => {
            return Ok((
                "refused",
                None,
                Some(format!("malformed HL7 message: {err}")),
            ))
        }
    };
    let item = NewItem {
        source: ConnectorName::new(HUB_SOURCE)
            .unwrap_or_else(|_| unreachable!("\"hub\" is a valid connector name")),
        kind: ItemKind::Hl7,
        msg_type,
        control_id,
        subject: None,
        external_ref: Some(request.down_id.clone()),
        payload,
        sinks: vec![sink.name.clone()],
    };
    let id = queue.append(item).await?;
    Ok(("queued", Some(id.0), None))
}
