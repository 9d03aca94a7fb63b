//! The session loop: connect, authenticate, then move items up and messages down until the
//! session ends; reconnect with backoff and jitter, for as long as it takes.

use std::collections::VecDeque;
use std::time::Duration;

use ed25519_dalek::Signer;
use futures::{SinkExt, StreamExt};
use outpost_proto::{AgentToHub, HubToAgent, PROTOCOL_VERSION};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::{
    Credentials, DataRequest, DownRequest, Inbound, InventorySource, LinkState, UplinkError,
    UplinkHandle,
};

/// Batches sent but not yet acknowledged, at most: enough to keep the link busy while the
/// hub commits, few enough that a lost session resends little.
const WINDOW: usize = 4;
/// Reconnect backoff bounds.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long the handshake steps may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// Batches sent and not yet stored: their item ids and who waits for them.
type InFlight = VecDeque<(Vec<i64>, oneshot::Sender<Result<(), UplinkError>>)>;

/// The uplink task.
pub struct Uplink;

impl Uplink {
    /// Starts the session loop; it runs until `shutdown`.
    pub fn start(
        credentials: Credentials,
        inventory: InventorySource,
        inbound: mpsc::Sender<Inbound>,
        shutdown: CancellationToken,
    ) -> UplinkHandle {
        let (data, data_rx) = mpsc::channel(WINDOW * 2);
        let (control, control_rx) = mpsc::channel(256);
        let (state_tx, state) = watch::channel(LinkState::Down("not connected yet".into()));
        let (blob_have, _) = tokio::sync::broadcast::channel(256);
        let (audit, audit_rx) = mpsc::channel(4);
        let link = Link {
            credentials,
            inventory,
            inbound,
            data_rx,
            control_rx,
            state: state_tx,
            blob_have: blob_have.clone(),
            audit_rx,
            shutdown,
        };
        tokio::spawn(link.run());
        UplinkHandle {
            data,
            control,
            state,
            blob_have,
            audit,
        }
    }
}

struct Link {
    credentials: Credentials,
    inventory: InventorySource,
    inbound: mpsc::Sender<Inbound>,
    data_rx: mpsc::Receiver<DataRequest>,
    control_rx: mpsc::Receiver<AgentToHub>,
    state: watch::Sender<LinkState>,
    blob_have: tokio::sync::broadcast::Sender<(i64, u64)>,
    audit_rx: mpsc::Receiver<(u64, Vec<String>)>,
    shutdown: CancellationToken,
}

/// Why a connection attempt failed.
enum ConnectError {
    Refused(String),
    Other(String),
}

impl Link {
    async fn run(mut self) {
        let mut failures = 0u32;
        let mut session = 0u64;
        let url = format!(
            "{}/api/v1/agent/session",
            self.credentials.hub_url.replacen("https://", "wss://", 1)
        );
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let connected = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                connected = self.connect(&url) => connected,
            };
            match connected {
                Ok((socket, heartbeat, skew_ms)) => {
                    failures = 0;
                    session += 1;
                    tracing::info!(hub = %self.credentials.hub_url, agent_id = %self.credentials.agent_id, clock_skew_ms = skew_ms, "connected to the hub");
                    self.state.send_replace(LinkState::Up(session));
                    let reason = self.serve(socket, session, heartbeat).await;
                    let _ = self.inbound.try_send(Inbound::SessionEnded { session });
                    if self.shutdown.is_cancelled() {
                        tracing::info!(reason, "hub session ended");
                    } else {
                        tracing::warn!(reason, "hub session ended");
                    }
                    self.state.send_replace(LinkState::Down(reason));
                }
                Err(ConnectError::Refused(reason)) => {
                    tracing::error!(hub = %self.credentials.hub_url, reason, "the hub refused the session");
                    self.state
                        .send_replace(LinkState::Down(format!("refused: {reason}")));
                }
                Err(ConnectError::Other(problem)) => {
                    tracing::warn!(hub = %self.credentials.hub_url, problem, "cannot reach the hub");
                    self.state.send_replace(LinkState::Down(problem));
                }
            }
            failures = failures.saturating_add(1);
            let delay = backoff(failures);
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.state.send_replace(LinkState::Down("stopped".into()));
    }

    /// Connects and authenticates. Returns the socket, the heartbeat period and clock skew.
    async fn connect(&self, url: &str) -> Result<(Socket, Duration, i64), ConnectError> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(outpost_proto::MAX_FRAME_BYTES))
            .max_frame_size(Some(outpost_proto::MAX_FRAME_BYTES));
        let connector = tokio_tungstenite::Connector::Rustls(self.credentials.tls.clone());
        let attempt = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(config),
            true,
            Some(connector),
        );
        let (mut socket, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
            .await
            .map_err(|_| ConnectError::Other(format!("connect {url}: timed out")))?
            .map_err(|err| {
                ConnectError::Other(crate::credentials::explain_tls(format!(
                    "connect {url}: {err}"
                )))
            })?;
        let nonce = match next_message(&mut socket).await? {
            HubToAgent::Challenge { nonce, .. } => nonce,
            HubToAgent::Refused { reason } => return Err(ConnectError::Refused(reason)),
            other => {
                return Err(ConnectError::Other(format!(
                    "expected a challenge, got {}",
                    kind_of(&other)
                )))
            }
        };
        let proof = outpost_proto::session_proof(&nonce, &self.credentials.agent_id);
        let hello = AgentToHub::Hello {
            agent_id: self.credentials.agent_id.clone(),
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            signature: hex::encode(self.credentials.key.sign(&proof).to_bytes()),
        };
        socket
            .send(Message::Text(outpost_proto::encode(&hello).into()))
            .await
            .map_err(|err| ConnectError::Other(format!("sending hello: {err}")))?;
        match next_message(&mut socket).await? {
            HubToAgent::Welcome {
                heartbeat_secs,
                hub_time_ms,
            } => {
                let skew = outpost_now_ms() - hub_time_ms;
                Ok((
                    socket,
                    Duration::from_secs(heartbeat_secs.clamp(1, 3600)),
                    skew,
                ))
            }
            HubToAgent::Refused { reason } => Err(ConnectError::Refused(reason)),
            other => Err(ConnectError::Other(format!(
                "expected welcome, got {}",
                kind_of(&other)
            ))),
        }
    }

    /// Runs one authenticated session; returns why it ended.
    async fn serve(&mut self, socket: Socket, session: u64, heartbeat: Duration) -> String {
        let (mut sink, mut stream) = socket.split();
        let mut in_flight = InFlight::new();
        let mut beat = tokio::time::interval(heartbeat);
        let mut last_heard = Instant::now();
        let silence_limit = heartbeat * 3;
        let reason = loop {
            let can_send_data = in_flight.len() < WINDOW;
            let outgoing = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break "agent stopping".to_owned(),
                frame = stream.next() => {
                    last_heard = Instant::now();
                    match frame {
                        None => break "hub closed the connection".to_owned(),
                        Some(Err(err)) => break format!("connection error: {err}"),
                        Some(Ok(Message::Text(text))) => match outpost_proto::decode::<HubToAgent>(&text) {
                            Ok(message) => match self.on_message(message, session, &mut in_flight).await {
                                Ok(()) => None,
                                Err(reason) => break reason,
                            },
                            Err(err) => break format!("hub sent an invalid message: {err}"),
                        },
                        Some(Ok(Message::Close(_))) => break "hub closed the session".to_owned(),
                        Some(Ok(_)) => None,
                    }
                }
                _ = beat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        break format!("hub silent for {} s", silence_limit.as_secs());
                    }
                    let inventory = (self.inventory)().await;
                    // A ping too, so a silent hub is noticed even when nothing else flows.
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break "connection lost".to_owned();
                    }
                    Some(AgentToHub::Heartbeat { inventory: Box::new(inventory) })
                }
                control = self.control_rx.recv() => control,
                audit = self.audit_rx.recv() => match audit {
                    Some((for_session, lines)) if for_session == session => {
                        Some(AgentToHub::AuditLines { lines })
                    }
                    _ => None,
                },
                request = self.data_rx.recv(), if can_send_data => match request {
                    Some(request) if request.session == session => {
                        let ids = request.items.iter().map(|i| i.id).collect();
                        in_flight.push_back((ids, request.stored));
                        Some(AgentToHub::Items { items: request.items })
                    }
                    Some(stale) => {
                        let _ = stale.stored.send(Err(UplinkError::SessionLost));
                        None
                    }
                    None => None,
                },
            };
            if let Some(message) = outgoing {
                if let Err(err) = sink
                    .send(Message::Text(outpost_proto::encode(&message).into()))
                    .await
                {
                    break format!("connection lost: {err}");
                }
            }
        };
        for (_, waiter) in in_flight {
            let _ = waiter.send(Err(UplinkError::SessionLost));
        }
        let _ = sink.close().await;
        reason
    }

    async fn on_message(
        &mut self,
        message: HubToAgent,
        session: u64,
        in_flight: &mut InFlight,
    ) -> Result<(), String> {
        match message {
            HubToAgent::Stored { ids } => {
                let Some((expected, waiter)) = in_flight.pop_front() else {
                    return Err("hub acknowledged items that were not sent".into());
                };
                if expected != ids {
                    return Err("hub acknowledged a different batch than the one sent first".into());
                }
                let _ = waiter.send(Ok(()));
            }
            HubToAgent::Deliver {
                down_id,
                sink,
                payload,
            } => {
                let request = DownRequest {
                    down_id,
                    sink,
                    payload: payload.0,
                };
                self.pass_on(Inbound::Down(request)).await?;
            }
            HubToAgent::Job {
                dispatch_id,
                job,
                signature,
            } => {
                let job = outpost_proto::SignedJob { job, signature };
                self.pass_on(Inbound::Job { dispatch_id, job }).await?;
            }
            HubToAgent::CancelJob { dispatch_id } => {
                self.pass_on(Inbound::CancelJob { dispatch_id }).await?;
            }
            HubToAgent::SqlCall(call) => {
                self.pass_on(Inbound::SqlCall(call)).await?;
            }
            HubToAgent::BlobHave { item_id, offset } => {
                // Nobody listening is fine: no upload is waiting for this answer.
                let _ = self.blob_have.send((item_id, offset));
            }
            HubToAgent::AuditWanted { after_seq } => {
                // Advisory: an agent that keeps no audit log (a test harness, a benchmark's
                // simulated agents) simply does not take it, and the session goes on.
                match self
                    .inbound
                    .try_send(Inbound::AuditWanted { after_seq, session })
                {
                    Err(mpsc::error::TrySendError::Full(message)) => self.pass_on(message).await?,
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            HubToAgent::Refused { reason } => {
                return Err(format!("hub ended the session: {reason}"))
            }
            HubToAgent::Welcome { .. } | HubToAgent::Challenge { .. } => {
                tracing::debug!("ignoring a repeated handshake message from the hub");
            }
        }
        Ok(())
    }
}

impl Link {
    async fn pass_on(&self, message: Inbound) -> Result<(), String> {
        self.inbound
            .send(message)
            .await
            .map_err(|_| "the agent is not taking messages from the hub".to_owned())
    }
}

async fn next_message(socket: &mut Socket) -> Result<HubToAgent, ConnectError> {
    loop {
        let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.next())
            .await
            .map_err(|_| ConnectError::Other("hub did not answer the handshake in time".into()))?;
        match frame {
            Some(Ok(Message::Text(text))) => {
                return outpost_proto::decode(&text)
                    .map_err(|err| ConnectError::Other(format!("hub sent {err}")));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(ConnectError::Other(
                    "hub closed the connection during the handshake".into(),
                ))
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(ConnectError::Other(format!("handshake: {err}"))),
        }
    }
}

fn kind_of(message: &HubToAgent) -> &'static str {
    match message {
        HubToAgent::Challenge { .. } => "challenge",
        HubToAgent::Welcome { .. } => "welcome",
        HubToAgent::Refused { .. } => "refused",
        HubToAgent::Stored { .. } => "stored",
        HubToAgent::Deliver { .. } => "deliver",
        HubToAgent::Job { .. } => "job",
        HubToAgent::CancelJob { .. } => "cancel_job",
        HubToAgent::AuditWanted { .. } => "audit_wanted",
        HubToAgent::BlobHave { .. } => "blob_have",
        HubToAgent::SqlCall(_) => "sql_call",
    }
}

/// Capped exponential backoff with equal jitter.
fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let full = BACKOFF_INITIAL
        .saturating_mul(1 << exponent)
        .min(BACKOFF_MAX);
    let half = full / 2;
    half + Duration::from_millis(rand::thread_rng().gen_range(0..=half.as_millis() as u64))
}

fn outpost_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
