//! One agent's WebSocket session: challenge, proof of key possession, then items up
//! (stored, then acknowledged by id), heartbeats, and messages down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use futures::{SinkExt, StreamExt};
use outpost_proto::{AgentToHub, HubToAgent, Payload, PROTOCOL_VERSION};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{AgentRecord, NewMessage};
use crate::{now_ms, HubState, SessionHandle};

/// The largest item file (a DICOM instance) the hub takes: 16 GiB.
const MAX_BLOB_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// An agent that has not proven its key within this long is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Runs a session until the agent goes, the session is replaced or revoked, or shutdown.
pub async fn run(socket: WebSocket, state: Arc<HubState>, peer: crate::listener::PeerAddr) {
    let (mut sender, mut receiver) = socket.split();
    let mut nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    let challenge = HubToAgent::Challenge {
        nonce: nonce.clone(),
        protocol: PROTOCOL_VERSION,
    };
    if sender
        .send(Message::Text(outpost_proto::encode(&challenge).into()))
        .await
        .is_err()
    {
        return;
    }
    let agent = match authenticate(&mut receiver, &state, &nonce).await {
        Ok(agent) => agent,
        Err(reason) => {
            tracing::warn!(%peer, reason, "agent session refused");
            let refused = HubToAgent::Refused { reason };
            let _ = sender
                .send(Message::Text(outpost_proto::encode(&refused).into()))
                .await;
            let _ = sender.close().await;
            return;
        }
    };
    let session_id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let cancel = CancellationToken::new();
    let (outbox, mut outgoing) = mpsc::channel::<HubToAgent>(256);
    state.sessions.register(
        &agent.id,
        SessionHandle {
            session_id,
            outbox: outbox.clone(),
            cancel: cancel.clone(),
            since_ms: now_ms(),
        },
    );
    tracing::info!(agent_id = %agent.id, name = %agent.name, %peer, "agent connected");

    // The writer runs before anything is queued: a reconnecting agent may have more waiting
    // for it (messages, jobs) than the outbox holds.
    let writer_cancel = cancel.clone();
    let writer = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = writer_cancel.cancelled() => {
                    // Whatever was queued before the cancel (a `Refused` saying why the
                    // session ends, above all) still goes out.
                    while let Ok(message) = outgoing.try_recv() {
                        let text = outpost_proto::encode(&message);
                        if sender.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
                next = outgoing.recv() => next,
            };
            let Some(message) = next else { break };
            if sender
                .send(Message::Text(outpost_proto::encode(&message).into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sender.close().await;
    });

    let welcome = HubToAgent::Welcome {
        heartbeat_secs: state.config.heartbeat.as_secs(),
        hub_time_ms: now_ms(),
    };
    let _ = outbox.send(welcome).await;
    match state.store.open_downs(&agent.id).await {
        Ok(downs) => {
            for down in downs {
                let _ = outbox
                    .send(HubToAgent::Deliver {
                        down_id: down.id,
                        sink: down.sink,
                        payload: Payload(down.payload),
                    })
                    .await;
            }
        }
        Err(err) => {
            tracing::warn!(agent_id = %agent.id, error = %err, "cannot read messages waiting for this agent")
        }
    }

    crate::jobs::send_jobs(&state, std::slice::from_ref(&agent.id), true).await;
    let mut audit = match agent_key(&agent) {
        Ok(key) => match crate::audit_mirror::AuditReceiver::start(&state, &agent, key).await {
            Ok((receiver, after_seq)) => {
                let _ = outbox.send(HubToAgent::AuditWanted { after_seq }).await;
                Some(receiver)
            }
            Err(err) => {
                tracing::warn!(agent_id = %agent.id, error = %err, "cannot read the audit mirror; not mirroring this session");
                None
            }
        },
        Err(_) => None,
    };

    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => break,
            frame = receiver.next() => frame,
        };
        let text = match frame {
            None => break,
            Some(Err(err)) => {
                tracing::warn!(agent_id = %agent.id, error = %err, "agent session broke");
                break;
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) => break,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                tracing::warn!(agent_id = %agent.id, "agent sent a binary frame; closing the session");
                break;
            }
        };
        let message = match outpost_proto::decode::<AgentToHub>(&text) {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(agent_id = %agent.id, error = %err, bytes = text.len(), "agent sent an invalid message; closing the session");
                break;
            }
        };
        if let Err(err) = handle(&state, &agent, &outbox, audit.as_mut(), message).await {
            tracing::error!(agent_id = %agent.id, error = %err, "cannot handle agent message; closing the session so the agent resends");
            break;
        }
    }
    cancel.cancel();
    let _ = writer.await;
    state.sessions.unregister(&agent.id, session_id);
    tracing::info!(agent_id = %agent.id, "agent disconnected");
}

async fn authenticate(
    receiver: &mut futures::stream::SplitStream<WebSocket>,
    state: &HubState,
    nonce: &str,
) -> Result<AgentRecord, String> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, receiver.next())
        .await
        .map_err(|_| format!("no hello within {} s", HELLO_TIMEOUT.as_secs()))?;
    let text = match first {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(_)) => return Err("expected a hello text message".into()),
        Some(Err(err)) => return Err(format!("session broke before hello: {err}")),
        None => return Err("closed before hello".into()),
    };
    let (agent_id, protocol, signature) = match outpost_proto::decode::<AgentToHub>(&text) {
        Ok(AgentToHub::Hello {
            agent_id,
            protocol,
            signature,
            ..
        }) => (agent_id, protocol, signature),
        Ok(_) => return Err("expected hello first".into()),
        Err(err) => return Err(err.to_string()),
    };
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "protocol {protocol} is not supported (hub speaks {PROTOCOL_VERSION})"
        ));
    }
    let agent = state
        .store
        .agent(&agent_id)
        .await
        .map_err(|err| format!("hub store unavailable: {err}"))?
        .ok_or_else(|| format!("unknown agent {agent_id}: enroll it again"))?;
    if agent.revoked_at_ms.is_some() {
        return Err(format!("agent {agent_id} is revoked"));
    }
    let key = agent_key(&agent)?;
    let signature_bytes: [u8; 64] = hex::decode(&signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "signature is not 64 bytes of hex".to_owned())?;
    key.verify(
        &outpost_proto::session_proof(nonce, &agent_id),
        &Signature::from_bytes(&signature_bytes),
    )
    .map_err(|_| format!("signature does not match the key enrolled for agent {agent_id}"))?;
    Ok(agent)
}

/// The agent's enrolled public key.
fn agent_key(agent: &AgentRecord) -> Result<VerifyingKey, String> {
    let key_bytes: [u8; 32] = hex::decode(&agent.public_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("agent {} has an unreadable public key on record", agent.id))?;
    VerifyingKey::from_bytes(&key_bytes)
        .map_err(|_| format!("agent {} has an invalid public key on record", agent.id))
}

async fn handle(
    state: &HubState,
    agent: &AgentRecord,
    outbox: &mpsc::Sender<HubToAgent>,
    audit: Option<&mut crate::audit_mirror::AuditReceiver>,
    message: AgentToHub,
) -> Result<(), crate::HubError> {
    match message {
        AgentToHub::Items { items } => {
            // An item with a file (a DICOM instance) is stored only once its whole file is;
            // an agent that says otherwise is resent to by closing the session.
            for item in items.iter().filter(|i| i.kind == "dicom") {
                match state.store.blob_state(&agent.id, item.id).await? {
                    Some((held, total)) if held == total => {}
                    _ => {
                        return Err(crate::HubError::Protocol(format!(
                            "item {} arrived before its whole file",
                            item.id
                        )))
                    }
                }
            }
            let ids: Vec<i64> = items.iter().map(|i| i.id).collect();
            let messages: Vec<NewMessage> = items
                .into_iter()
                .map(|i| NewMessage {
                    item_id: i.id,
                    source: clean_text(i.source),
                    kind: clean_text(i.kind),
                    msg_type: i.msg_type.map(clean_text),
                    control_id: i.control_id.map(clean_text),
                    received_at_ms: i.received_at_ms,
                    payload: i.payload.0,
                })
                .collect();
            let inserted = state
                .store
                .insert_messages(&agent.id, &messages, now_ms())
                .await?;
            if inserted > 0 {
                let last = state.store.last_cursor().await?;
                state.last_cursor.send_replace(last);
            }
            tracing::debug!(agent_id = %agent.id, received = ids.len(), inserted, "items stored");
            let _ = outbox.send(HubToAgent::Stored { ids }).await;
        }
        AgentToHub::Heartbeat { inventory } => {
            let now = now_ms();
            let mut value = serde_json::to_value(&*inventory).unwrap_or(serde_json::Value::Null);
            // The agent's clock against the hub's, as seen on arrival (loopback or LAN
            // latency is well under the seconds that matter for skew).
            if let Some(fields) = value.as_object_mut() {
                fields.insert(
                    "clock_skew_ms".into(),
                    (inventory.agent_time_ms - now).into(),
                );
            }
            state.heartbeats.record(&agent.id, value, now);
        }
        AgentToHub::DownState {
            down_id,
            state: down_state,
            item_id,
            error,
        } => {
            let known = ["queued", "delivered", "dead", "refused"];
            if !known.contains(&down_state.as_str()) {
                tracing::warn!(agent_id = %agent.id, down_id, "agent reported an unknown state for a message");
                return Ok(());
            }
            state
                .store
                .update_down(
                    &down_id,
                    &agent.id,
                    &down_state,
                    item_id,
                    error.as_deref(),
                    now_ms(),
                )
                .await?;
        }
        AgentToHub::JobUpdate(update) => state.jobs.record_update(&agent.id, update),
        AgentToHub::JobOutput {
            dispatch_id,
            seq,
            data,
        } => {
            // Output is accepted only for this agent's jobs: the store matches the agent
            // when the job's state changes, and output of a job id that is not the agent's
            // is dropped by the flusher's ownership check.
            state.jobs.record_output(&agent.id, dispatch_id, seq, data);
        }
        AgentToHub::BlobOffer { item_id, total } => {
            if total > MAX_BLOB_BYTES {
                return Err(crate::HubError::Protocol(format!(
                    "item {item_id}'s file is {total} bytes; at most {MAX_BLOB_BYTES} are taken"
                )));
            }
            let held = state.store.blob_begin(&agent.id, item_id, total).await?;
            let _ = outbox
                .send(HubToAgent::BlobHave {
                    item_id,
                    offset: held,
                })
                .await;
        }
        AgentToHub::BlobPart {
            item_id,
            offset,
            data,
        } => {
            if data.0.len() > outpost_proto::MAX_BLOB_PART {
                return Err(crate::HubError::Protocol(format!(
                    "a part of item {item_id}'s file is {} bytes; at most {} are taken",
                    data.0.len(),
                    outpost_proto::MAX_BLOB_PART
                )));
            }
            let held = state
                .store
                .blob_append(&agent.id, item_id, offset, &data.0)
                .await?;
            let _ = outbox
                .send(HubToAgent::BlobHave {
                    item_id,
                    offset: held,
                })
                .await;
        }
        AgentToHub::AuditLines { lines } => {
            if let Some(audit) = audit {
                audit.receive(state, lines).await?;
            }
        }
        AgentToHub::SqlResult { call_id, outcome } => {
            state.sql_calls.complete(&agent.id, &call_id, outcome);
        }
        AgentToHub::Hello { .. } => {
            tracing::warn!(agent_id = %agent.id, "agent sent a second hello; ignored");
        }
    }
    Ok(())
}

/// Metadata from an agent with control characters (NUL above all, which PostgreSQL text
/// refuses) replaced, so one odd message cannot wedge a whole batch; the payload is
/// stored as sent.
fn clean_text(text: String) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
            .collect()
    } else {
        text
    }
}
