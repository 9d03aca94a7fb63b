//! The MLLP listener: one task per connection; each message is parsed, committed to the
//! queue and only then acknowledged. Malformed or refused messages get a negative ACK with
//! the reason and are kept for inspection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use outpost_core::ItemKind;
use outpost_hl7::{
    build_ack, build_ack_for_unparsed, normalize_segment_terminators, AckCode, Message,
};
use outpost_mllp::{Frame, MllpCodec};
use outpost_queue::{now_ms, NewItem};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tracing::Instrument;

use super::{hl7_timestamp, AckMode, SourceConfig};
use crate::connectors::SourceContext;
use crate::health::ConnectorState;
use crate::watch::DeliveryOutcome;
use crate::ConnectorError;

/// Binds the listen address. Done before the agent reports itself started, so a port in
/// use is a start-up error rather than a silent retry loop.
pub async fn bind_source(config: &SourceConfig) -> Result<TcpListener, ConnectorError> {
    let addr = config.listen.0;
    if addr.ip().is_unspecified() {
        tracing::warn!(%addr, "listening on every interface; name one address (e.g. 127.0.0.1) unless other hosts must connect");
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| ConnectorError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Accepts connections until shutdown, then lets each connection finish the message it is
/// handling (stored and acknowledged, or not acknowledged at all).
pub async fn run_source(
    config: SourceConfig,
    listener: TcpListener,
    cx: SourceContext,
) -> Result<(), ConnectorError> {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut connections = JoinSet::new();
    let listen = listener.local_addr().unwrap_or(config.listen.0);
    tracing::info!(%listen, "mllp source listening");
    cx.health.set_state(&cx.name, ConnectorState::Running);
    loop {
        let permit = tokio::select! {
            _ = cx.shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = cx.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let connection = Connection {
                    config: config.clone(),
                    cx: cx.clone(),
                    peer,
                };
                let span = tracing::info_span!("connection", %peer);
                connections.spawn(connection.serve(stream, permit).instrument(span));
            }
            Err(err) => {
                // Running out of file descriptors must not end the listener: wait and retry.
                tracing::warn!(%listen, error = %err, "accept failed");
                cx.health
                    .record_failure(&cx.name, &format!("accept on {listen}: {err}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    cx.health.set_state(&cx.name, ConnectorState::Stopped);
    Ok(())
}

struct Connection {
    config: Arc<SourceConfig>,
    cx: SourceContext,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, stream: TcpStream, _permit: OwnedSemaphorePermit) {
        if let Err(err) = outpost_mllp::configure_stream(&stream) {
            tracing::warn!(error = %err, "cannot set TCP_NODELAY");
        }
        tracing::debug!("connection opened");
        let idle = Duration::from_secs(self.config.idle_timeout_secs.max(1));
        let mut framed = Framed::new(stream, MllpCodec::new(self.config.max_frame_bytes));
        loop {
            let next = tokio::select! {
                biased;
                _ = self.cx.shutdown.cancelled() => break,
                next = tokio::time::timeout(idle, framed.next()) => next,
            };
            let reply = match next {
                Err(_) => {
                    tracing::info!(idle_secs = idle.as_secs(), "closing idle connection");
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(err))) => {
                    tracing::warn!(error = %err, "closing connection: {}", describe_framing_error(&err));
                    self.cx
                        .health
                        .record_failure(&self.cx.name, &format!("{}: {err}", self.peer));
                    break;
                }
                Ok(Some(Ok(Frame::Oversized { head, total_bytes }))) => {
                    self.refuse_oversized(&head, total_bytes)
                }
                Ok(Some(Ok(Frame::Message(bytes)))) => match self.handle_message(&bytes).await {
                    Some(reply) => reply,
                    None => break,
                },
            };
            if let Err(err) = framed.send(&reply[..]).await {
                tracing::warn!(error = %err, "could not send acknowledgement");
                break;
            }
        }
        tracing::debug!("connection closed");
    }

    /// Stores the message and returns the ACK to send, or `None` when the agent is
    /// stopping before the outcome is known (the sender then gets no ACK and resends).
    async fn handle_message(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let normalized = normalize_segment_terminators(frame).into_owned();
        let message = match Message::parse(&normalized) {
            Ok(message) => message,
            Err(err) => {
                let reason = format!("malformed HL7 message: {err}");
                return Some(self.reject_unparsed(normalized.clone(), reason).await);
            }
        };
        let msg_type = message.message_type_full();
        let Some(control_id) = message.control_id().filter(|id| !id.is_empty()) else {
            let reason = "malformed HL7 message: MSH-10 (message control id) is empty".to_owned();
            let item = self.new_item(&message, normalized.clone(), Vec::new());
            return Some(
                self.reject(item, reason, |text, ack_id| {
                    build_ack(&message, AckCode::AE, Some(text), &hl7_timestamp(), ack_id)
                })
                .await,
            );
        };
        let span = tracing::debug_span!("message", msg_type = msg_type.as_deref().unwrap_or(""), control_id = %control_id, bytes = normalized.len());
        let sinks = self.cx.config.sinks_for(&self.cx.name, msg_type.as_deref());
        if sinks.is_empty() {
            let reason = format!(
                "no route from source \"{}\" accepts message type {}",
                self.cx.name,
                msg_type.as_deref().unwrap_or("(empty MSH-9)")
            );
            let item = self.new_item(&message, normalized.clone(), Vec::new());
            return Some(
                self.reject(item, reason, |text, ack_id| {
                    build_ack(&message, AckCode::AR, Some(text), &hl7_timestamp(), ack_id)
                })
                .instrument(span)
                .await,
            );
        }
        let item = self.new_item(&message, normalized.clone(), sinks);
        async {
            match self.cx.queue.append(item).await {
                Ok(id) => {
                    self.cx.health.count_item(&self.cx.name);
                    tracing::debug!(item_id = %id, "message stored");
                    let ack_id = format!("A{id}");
                    match self.config.ack {
                        AckMode::OnCommit => Some(build_ack(
                            &message,
                            AckCode::AA,
                            None,
                            &hl7_timestamp(),
                            &ack_id,
                        )),
                        AckMode::OnDelivery => self.ack_after_delivery(id, &message, &ack_id).await,
                    }
                }
                Err(err) => {
                    // Not stored: the sender must keep the message and send it again.
                    tracing::error!(error = %err, "message not stored; answered AR");
                    self.cx
                        .health
                        .record_failure(&self.cx.name, &err.to_string());
                    let text = format!("message not stored, send it again later: {err}");
                    Some(build_ack(
                        &message,
                        AckCode::AR,
                        Some(&text),
                        &hl7_timestamp(),
                        &format!("E{}", now_ms()),
                    ))
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn ack_after_delivery(
        &self,
        id: outpost_core::ItemId,
        message: &Message<'_>,
        ack_id: &str,
    ) -> Option<Vec<u8>> {
        let outcome = self.cx.deliveries.expect(id);
        tokio::select! {
            outcome = outcome => match outcome {
                Ok(DeliveryOutcome::Delivered(downstream_ack)) => Some(downstream_ack.to_vec()),
                Ok(DeliveryOutcome::DeadLettered(error)) => {
                    let text = format!("not delivered downstream: {error}");
                    Some(build_ack(message, AckCode::AE, Some(&text), &hl7_timestamp(), ack_id))
                }
                Err(_) => None,
            },
            _ = self.cx.shutdown.cancelled() => {
                self.cx.deliveries.abandon(id);
                None
            }
        }
    }

    fn new_item(
        &self,
        message: &Message<'_>,
        payload: Vec<u8>,
        sinks: Vec<outpost_core::ConnectorName>,
    ) -> NewItem {
        NewItem {
            source: self.cx.name.clone(),
            kind: ItemKind::Hl7,
            msg_type: message.message_type_full(),
            control_id: message.control_id().filter(|id| !id.is_empty()),
            subject: message.get_unescaped("PID-3.1").filter(|id| !id.is_empty()),
            external_ref: None,
            payload,
            sinks,
        }
    }

    async fn reject_unparsed(&self, payload: Vec<u8>, reason: String) -> Vec<u8> {
        let item = NewItem {
            source: self.cx.name.clone(),
            kind: ItemKind::Hl7,
            msg_type: None,
            control_id: None,
            subject: None,
            external_ref: None,
            payload,
            sinks: Vec::new(),
        };
        let sending_app = self.config.sending_application.clone();
        self.reject(item, reason, |text, ack_id| {
            build_ack_for_unparsed(
                AckCode::AE,
                text,
                &sending_app,
                &hl7_timestamp(),
                ack_id,
                None,
            )
        })
        .await
    }

    /// Keeps a refused message for inspection, logs why, and builds the negative ACK.
    async fn reject(
        &self,
        item: NewItem,
        reason: String,
        build: impl FnOnce(&str, &str) -> Vec<u8>,
    ) -> Vec<u8> {
        let bytes = item.payload.len();
        let control_id = item.control_id.clone().unwrap_or_default();
        self.cx.health.record_failure(&self.cx.name, &reason);
        let ack_id = match self.cx.queue.append_rejected(item, reason.clone()).await {
            Ok(id) => {
                tracing::warn!(item_id = %id, control_id, bytes, reason, "message refused and kept for inspection");
                format!("A{id}")
            }
            Err(err) => {
                tracing::warn!(control_id, bytes, reason, store_error = %err, "message refused; could not keep it for inspection");
                format!("E{}", now_ms())
            }
        };
        build(&reason, &ack_id)
    }

    fn refuse_oversized(&self, head: &[u8], total_bytes: u64) -> Vec<u8> {
        let reason = format!(
            "message of {total_bytes} bytes exceeds max_frame_bytes ({}) and was discarded",
            self.config.max_frame_bytes
        );
        self.cx.health.record_failure(&self.cx.name, &reason);
        let head = normalize_segment_terminators(head);
        match Message::parse(&head) {
            Ok(message) => {
                tracing::warn!(
                    control_id = message.control_id().unwrap_or_default(),
                    total_bytes,
                    "{reason}"
                );
                build_ack(
                    &message,
                    AckCode::AR,
                    Some(&reason),
                    &hl7_timestamp(),
                    &format!("E{}", now_ms()),
                )
            }
            Err(_) => {
                tracing::warn!(total_bytes, "{reason}");
                build_ack_for_unparsed(
                    AckCode::AR,
                    &reason,
                    &self.config.sending_application,
                    &hl7_timestamp(),
                    &format!("E{}", now_ms()),
                    None,
                )
            }
        }
    }
}

fn describe_framing_error(err: &outpost_mllp::MllpError) -> &'static str {
    use outpost_mllp::MllpError;
    match err {
        MllpError::OutsideFrame { .. } => {
            "bytes outside an MLLP frame (not an MLLP sender, or out of sync)"
        }
        MllpError::NestedStart { .. } => "a new frame started before the previous one ended",
        MllpError::BadEndBlock { .. } => "frame end (0x1C) not followed by carriage return",
        MllpError::TruncatedFrame { .. } => {
            "sender closed the connection mid-frame; the partial message was discarded"
        }
        _ => "connection error",
    }
}
