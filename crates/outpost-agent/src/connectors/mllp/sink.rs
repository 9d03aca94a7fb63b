//! The MLLP sender: delivers a sink's queue in order over one persistent connection,
//! validates each ACK, and records the outcome before sending the next message.
//!
//! Connection trouble (refused, reset, timed out) is the sink's problem, not the message's:
//! the sink backs off and reconnects without counting an attempt against the message, so a
//! downstream that is down for a day never turns its backlog into dead letters. A negative
//! ACK is the message's problem: it counts, and may make a dead letter.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use outpost_core::ItemId;
use outpost_hl7::Ack;
use outpost_mllp::MllpClient;
use outpost_queue::{FailureOutcome, Lease, RetryPolicy};
use tracing::Instrument;

use super::{NegativeAckPolicy, SinkConfig};
use crate::connectors::SinkContext;
use crate::health::ConnectorState;
use crate::watch::DeliveryOutcome;
use crate::ConnectorError;

/// How long an idle sink sleeps before looking at the queue again even without a wake-up
/// (another process, such as `outpost queue retry`, may have changed it).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Delivers until shutdown. Returns an error only when the queue itself fails.
pub async fn run_sink(config: SinkConfig, cx: SinkContext) -> Result<(), ConnectorError> {
    let mut sender = Sender {
        policy: config.retry_policy(),
        config,
        client: None,
        connection_failures: 0,
    };
    // Leases read ahead in queue order, so the queue is read once per batch rather than
    // once per message. Every delivery is still recorded before the next message is sent.
    let mut ahead: VecDeque<Lease> = VecDeque::new();
    loop {
        if cx.shutdown.is_cancelled() {
            break;
        }
        let generation = cx.queue.append_generation();
        if ahead.is_empty() {
            let (leases, backoff) = cx
                .queue
                .ready_after(&cx.name, ItemId(0), READ_AHEAD, READ_AHEAD_BYTES)
                .await?;
            ahead.extend(leases);
            if ahead.is_empty() {
                let wait = match backoff {
                    Some(delay) => delay.min(IDLE_POLL),
                    None => {
                        cx.health.set_state(&cx.name, ConnectorState::Running);
                        IDLE_POLL
                    }
                };
                tokio::select! {
                    _ = cx.shutdown.cancelled() => break,
                    _ = cx.queue.wait_for_append(generation, wait), if backoff.is_none() => {}
                    _ = tokio::time::sleep(wait), if backoff.is_some() => {}
                }
                continue;
            }
        }
        let Some(lease) = ahead.pop_front() else {
            continue;
        };
        let span = tracing::debug_span!("item", item_id = %lease.id, msg_type = lease.msg_type.as_deref().unwrap_or(""), bytes = lease.payload.len());
        match sender.deliver(lease, &cx).instrument(span).await? {
            Step::Delivered => {}
            Step::Again(wait) => {
                // The item failed: nothing read ahead may overtake it; read afresh.
                ahead.clear();
                if let Some(delay) = wait {
                    tokio::select! {
                        _ = cx.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
    cx.health.set_state(&cx.name, ConnectorState::Stopped);
    Ok(())
}

/// Leases read ahead per queue read, and the most payload bytes they may hold.
const READ_AHEAD: usize = 64;
const READ_AHEAD_BYTES: usize = 1024 * 1024;

/// What a delivery attempt leaves the sink to do next.
enum Step {
    /// Delivered and recorded: go on with the next one.
    Delivered,
    /// Not delivered (recorded as a failure, or a connection problem): read the queue
    /// again, after this wait if any.
    Again(Option<Duration>),
}

struct Sender {
    config: SinkConfig,
    policy: RetryPolicy,
    /// The open connection, dropped after any error so a late reply is never mistaken for
    /// the ACK of the next message.
    client: Option<MllpClient>,
    /// Consecutive connection failures, for the reconnect backoff.
    connection_failures: u32,
}

impl Sender {
    /// Tries one delivery and records its outcome.
    async fn deliver(&mut self, lease: Lease, cx: &SinkContext) -> Result<Step, ConnectorError> {
        let reply = match self.exchange(&lease.payload).await {
            Ok(reply) => reply,
            Err(error) => {
                self.client = None;
                self.connection_failures = self.connection_failures.saturating_add(1);
                let delay = self.policy.backoff(self.connection_failures);
                tracing::warn!(connect = %self.config.connect, error, retry_in_ms = delay.as_millis() as u64, "downstream unavailable; message stays queued");
                cx.health.record_failure(&cx.name, &error);
                cx.health.set_state(&cx.name, ConnectorState::BackingOff);
                return Ok(Step::Again(Some(delay)));
            }
        };
        self.connection_failures = 0;
        let expected = lease.control_id.as_deref().unwrap_or_default();
        let verdict = match Ack::parse(&reply) {
            Err(err) => Err((format!("invalid ACK from downstream: {err}"), false)),
            Ok(ack) if !expected.is_empty() && ack.control_id != expected => Err((
                format!(
                    "ACK names control id {:?}, expected {expected:?}",
                    ack.control_id
                ),
                false,
            )),
            Ok(ack) if ack.code.is_accept() => Ok(()),
            Ok(ack) => {
                let text = ack.text.as_deref().unwrap_or("no reason given");
                let is_permanent = self.config.on_negative_ack == NegativeAckPolicy::DeadLetter;
                Err((
                    format!("downstream answered {}: {text}", ack.code.as_str()),
                    is_permanent,
                ))
            }
        };
        match verdict {
            Ok(()) => {
                cx.queue.mark_delivered(&cx.name, lease.id).await?;
                cx.health.count_item(&cx.name);
                cx.health.set_state(&cx.name, ConnectorState::Running);
                self.report(cx, &lease, DeliveryOutcome::Delivered(reply))
                    .await;
                tracing::debug!("delivered");
                Ok(Step::Delivered)
            }
            Err((error, is_permanent)) => {
                if !error.starts_with("downstream answered") {
                    // The stream may be out of step; start afresh.
                    self.client = None;
                }
                cx.health.record_failure(&cx.name, &error);
                match cx
                    .queue
                    .mark_failed(&cx.name, lease.id, &error, self.policy, is_permanent)
                    .await?
                {
                    FailureOutcome::RetryAfter { attempts, delay } => {
                        tracing::warn!(
                            control_id = expected,
                            attempts,
                            retry_in_ms = delay.as_millis() as u64,
                            error,
                            "delivery refused; will retry"
                        );
                        cx.health.set_state(&cx.name, ConnectorState::BackingOff);
                    }
                    FailureOutcome::DeadLettered { attempts } => {
                        tracing::warn!(
                            control_id = expected,
                            attempts,
                            error,
                            "delivery refused; moved to dead letters"
                        );
                        self.report(cx, &lease, DeliveryOutcome::DeadLettered(error))
                            .await;
                    }
                }
                Ok(Step::Again(None))
            }
        }
    }

    /// Sends the payload and returns the reply frame; any error is a connection problem.
    async fn exchange(&mut self, payload: &[u8]) -> Result<Bytes, String> {
        let client = match &mut self.client {
            Some(client) => client,
            None => {
                let timeout = Duration::from_secs(self.config.connect_timeout_secs.max(1));
                let client = MllpClient::connect(
                    self.config.connect.0.as_str(),
                    timeout,
                    self.config.max_frame_bytes,
                )
                .await
                .map_err(|err| err.to_string())?;
                tracing::info!(connect = %self.config.connect, "connected downstream");
                self.client.insert(client)
            }
        };
        let timeout = Duration::from_secs(self.config.ack_timeout_secs.max(1));
        client
            .request(payload, timeout)
            .await
            .map_err(|err| format!("{}: {err}", self.config.connect))
    }

    /// Tells whoever waits for this item's fate: a source acknowledging on delivery, or
    /// the hub for a message it sent down.
    async fn report(&self, cx: &SinkContext, lease: &Lease, outcome: DeliveryOutcome) {
        if let (Some(uplink), Some(down_id)) = (&cx.uplink, &lease.external_ref) {
            let (state, error) = match &outcome {
                DeliveryOutcome::Delivered(_) => ("delivered", None),
                DeliveryOutcome::DeadLettered(error) => ("dead", Some(error.clone())),
            };
            uplink
                .report_down(down_id, state, Some(lease.id.0), error)
                .await;
        }
        if cx
            .ack_on_delivery_sources
            .iter()
            .any(|s| s.as_str() == lease.source)
        {
            cx.deliveries.complete(lease.id, outcome);
        }
    }
}
