//! Bad agent sessions against a real hub: one that never authenticates, and malformed,
//! binary or oversized WebSocket messages. Each ends only its own session, with a log line
//! at the hub; a real agent next to it keeps delivering undisturbed.
//!
//! Each test runs twice, as `sqlite::…` and `postgres::…` (a fresh database on a real
//! PostgreSQL 15; skipped with `OUTPOST_PEERS=skip`), from one body taking a `HubBackend`.

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use futures::{SinkExt, StreamExt};
use outpost_hl7::AckCode;
use outpost_proto::{AgentToHub, HubToAgent, Payload, UpItem, PROTOCOL_VERSION};
use outpost_testkit::{
    ack_of, agent_config_for_hub, enrolled_agent_id, free_port, samples, send_each,
    wait_until_explained, Agent, Hub, HubApi, HubBackend,
};
use serde_json::json;
use tokio::net::TcpStream as AsyncTcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

outpost_testkit::on_both_hub_backends! {
    a_websocket_session_that_never_authenticates_is_dropped_and_others_continue;
    a_malformed_or_oversized_websocket_message_ends_only_that_session;
    a_revoked_agents_open_session_is_told_why_before_it_is_closed;
}

type Socket = WebSocketStream<MaybeTlsStream<AsyncTcpStream>>;

/// How long a test waits for the hub to close a session (its hello timeout is 10 s).
const CLOSE_DEADLINE: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("tokio runtime: {err}"))
}

/// TLS settings trusting only the hub's CA.
fn pinned_tls(ca: &Path) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca).unwrap_or_else(|err| panic!("{}: {err}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.unwrap_or_else(|err| panic!("{}: {err}", ca.display())))
            .unwrap_or_else(|err| panic!("{}: {err}", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|err| panic!("TLS versions: {err}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Opens a WebSocket to the hub's agent endpoint and reads its challenge nonce.
async fn open_session(hub: &Hub) -> (Socket, String) {
    let url = format!("wss://127.0.0.1:{}/api/v1/agent/session", hub.port());
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let connector = tokio_tungstenite::Connector::Rustls(pinned_tls(&hub.ca_path()));
    let (mut socket, _) = tokio_tungstenite::connect_async_tls_with_config(
        &url,
        Some(config),
        false,
        Some(connector),
    )
    .await
    .unwrap_or_else(|err| panic!("connect {url}: {err}"));
    match next_message(&mut socket).await {
        Some(HubToAgent::Challenge { nonce, protocol }) => {
            assert_eq!(protocol, PROTOCOL_VERSION);
            (socket, nonce)
        }
        other => panic!("expected a challenge from the hub, got {other:?}"),
    }
}

/// The next protocol message, or `None` once the hub has closed the session. The hub's
/// request for the audit log, sent at the start of every session, is passed over: these
/// hand-written agents keep no audit log.
async fn next_message(socket: &mut Socket) -> Option<HubToAgent> {
    loop {
        let frame = tokio::time::timeout(CLOSE_DEADLINE, socket.next())
            .await
            .unwrap_or_else(|_| panic!("the hub sent nothing for {CLOSE_DEADLINE:?}"));
        match frame {
            Some(Ok(Message::Text(text))) => {
                let message = outpost_proto::decode(&text)
                    .unwrap_or_else(|err| panic!("the hub sent {text:?}: {err}"));
                if matches!(message, HubToAgent::AuditWanted { .. }) {
                    continue;
                }
                return Some(message);
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads until the hub closes the session; returns what it said on the way.
async fn until_closed(socket: &mut Socket) -> Vec<HubToAgent> {
    let mut said = Vec::new();
    while let Some(message) = next_message(socket).await {
        said.push(message);
    }
    said
}

/// An agent of our own: a key pair enrolled through `POST /api/v1/enroll`.
struct HandAgent {
    id: String,
    key: SigningKey,
}

impl HandAgent {
    fn enroll(hub: &Hub, api: &HubApi) -> HandAgent {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let token = hub.token("Hand Written Agent", "1h");
        let enrolled = api.post_json(
            "/api/v1/enroll",
            &json!({
                "token": token,
                "public_key": hex::encode(key.verifying_key().to_bytes()),
                "hostname": "hand-agent",
                "version": "test",
            }),
        );
        assert_eq!(enrolled.status, 200, "enroll: {}", enrolled.text);
        HandAgent {
            id: enrolled.str("agent_id").to_owned(),
            key,
        }
    }

    /// Opens a session and proves possession of the key; returns it after the welcome.
    async fn session(&self, hub: &Hub) -> Socket {
        let (mut socket, nonce) = open_session(hub).await;
        let proof = outpost_proto::session_proof(&nonce, &self.id);
        let hello = AgentToHub::Hello {
            agent_id: self.id.clone(),
            protocol: PROTOCOL_VERSION,
            version: "test".into(),
            signature: hex::encode(self.key.sign(&proof).to_bytes()),
        };
        socket
            .send(Message::Text(outpost_proto::encode(&hello).into()))
            .await
            .unwrap_or_else(|err| panic!("send hello: {err}"));
        match next_message(&mut socket).await {
            Some(HubToAgent::Welcome { .. }) => socket,
            other => panic!(
                "expected a welcome for {}, got {other:?}\nhub log tail:\n{}",
                self.id,
                hub.log_tail(20)
            ),
        }
    }
}

/// A hub with a real agent enrolled and connected; returns them, the agent's id and an API
/// client.
fn hub_and_agent(backend: HubBackend) -> (Hub, Agent, String, HubApi) {
    let hub = Hub::start_on(BIN, backend);
    let api = hub.api(Some(&hub.apikey("sessions-test")));
    let token = hub.token("Smith Pediatrics", "24h");
    let agent = Agent::start(BIN, &agent_config_for_hub(&hub, &token, free_port(), ""));
    agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
    let agent_id = enrolled_agent_id(&agent.data_dir());
    (hub, agent, agent_id, api)
}

/// Sends `count` messages (control ids `<prefix>0…`) through the real agent and waits
/// until the hub's API has them.
fn deliver_through_the_agent(hub: &Hub, agent: &Agent, api: &HubApi, prefix: &str, count: usize) {
    let messages: Vec<Vec<u8>> = (0..count)
        .map(|i| samples::oru_r01(&format!("{prefix}{i}"), "MRN000042", "STILL", "THERE", 2))
        .collect();
    for reply in send_each(agent.port(), &messages) {
        assert_eq!(ack_of(&reply).code, AckCode::AA);
    }
    wait_until_explained(
        Duration::from_secs(30),
        &format!("the hub has every {prefix}… message"),
        || {
            let all = api.all_messages()?;
            let there = all
                .iter()
                .filter(|m| {
                    m["control_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with(prefix))
                })
                .count();
            if there == count {
                Ok(())
            } else {
                Err(format!("{there} of {count}"))
            }
        },
        || {
            format!(
                "agent log tail:\n{}\nhub log tail:\n{}",
                agent.log_tail(20),
                hub.log_tail(20)
            )
        },
    );
}

/// The real agent kept its first session throughout.
fn assert_agent_undisturbed(agent: &Agent, hub: &Hub) {
    let log = agent.log();
    assert!(
        log.matches("connected to the hub").count() == 1 && !log.contains("hub session ended"),
        "the real agent's session should be untouched\nagent log:\n{}\nhub log tail:\n{}",
        agent.log_tail(40),
        hub.log_tail(30)
    );
}

fn a_websocket_session_that_never_authenticates_is_dropped_and_others_continue(
    backend: HubBackend,
) {
    let (hub, agent, _agent_id, api) = hub_and_agent(backend);
    let rt = runtime();
    // Three WebSocket sessions that read the challenge and then say nothing, and a TCP
    // connection that never even starts TLS.
    let mut silent: Vec<Socket> = (0..3).map(|_| rt.block_on(open_session(&hub)).0).collect();
    let _mute = TcpStream::connect(("127.0.0.1", hub.port()))
        .unwrap_or_else(|err| panic!("connect to the hub: {err}"));

    // Meanwhile the real agent delivers.
    deliver_through_the_agent(&hub, &agent, &api, "WHILESILENT", 5);

    for (i, socket) in silent.iter_mut().enumerate() {
        let said = rt.block_on(until_closed(socket));
        assert!(
            matches!(said.as_slice(), [HubToAgent::Refused { reason }] if reason.contains("no hello within 10 s")),
            "silent session {i}: the hub should refuse it for saying nothing, then close; it said {said:?}\nhub log tail:\n{}",
            hub.log_tail(20)
        );
    }
    wait_until_explained(
        Duration::from_secs(10),
        "the hub log has three refusals for a missing hello",
        || {
            let refusals = hub
                .log()
                .lines()
                .filter(|l| {
                    l.contains("agent session refused") && l.contains("no hello within 10 s")
                })
                .count();
            if refusals == 3 {
                Ok(())
            } else {
                Err(format!("{refusals} refusals"))
            }
        },
        || format!("hub log tail:\n{}", hub.log_tail(30)),
    );
    hub.wait_for_log_line(CLOSE_DEADLINE, &["TLS handshake timed out"]);

    deliver_through_the_agent(&hub, &agent, &api, "AFTERSILENT", 5);
    assert_agent_undisturbed(&agent, &hub);
}

fn a_malformed_or_oversized_websocket_message_ends_only_that_session(backend: HubBackend) {
    let (hub, agent, _agent_id, api) = hub_and_agent(backend);
    let hand = HandAgent::enroll(&hub, &api);
    let rt = runtime();

    // Not JSON, an unknown message type, a binary frame: each ends that session.
    let bad: [(&str, Message, &str); 3] = [
        (
            "truncated JSON",
            Message::Text("{\"type\":\"items\",\"items\":[{\"id\":".into()),
            "agent sent an invalid message; closing the session",
        ),
        (
            "an unknown message type",
            Message::Text("{\"type\":\"format_disk\"}".into()),
            "agent sent an invalid message; closing the session",
        ),
        (
            "a binary frame",
            Message::Binary(vec![0u8, 1, 2, 3].into()),
            "agent sent a binary frame; closing the session",
        ),
    ];
    for (what, message, log_line) in bad {
        let said = rt.block_on(async {
            let mut socket = hand.session(&hub).await;
            socket
                .send(message)
                .await
                .unwrap_or_else(|err| panic!("send {what}: {err}"));
            until_closed(&mut socket).await
        });
        assert!(
            said.is_empty(),
            "after {what} the hub should just close the session; it said {said:?}"
        );
        hub.wait_for_log_line(Duration::from_secs(10), &[log_line, &hand.id]);
    }

    // 40 MiB in one message, after authenticating and before.
    let oversized = format!(
        "{{\"type\":\"heartbeat\",\"inventory\":{{\"hostname\":\"{}\"}}}}",
        "A".repeat(40 << 20)
    );
    rt.block_on(async {
        let mut socket = hand.session(&hub).await;
        // The hub may close while the frame is still being written.
        let _ = socket.send(Message::Text(oversized.clone().into())).await;
        let said = until_closed(&mut socket).await;
        assert!(said.is_empty(), "after 40 MiB the hub said {said:?}");
    });
    hub.wait_for_log_line(Duration::from_secs(10), &["agent session broke", &hand.id]);
    rt.block_on(async {
        let (mut socket, _) = open_session(&hub).await;
        let _ = socket.send(Message::Text(oversized.into())).await;
        until_closed(&mut socket).await
    });
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &["agent session refused", "session broke before hello"],
    );

    // The hand agent can still open a good session and deliver; so can the real agent.
    let stored = rt.block_on(async {
        let mut socket = hand.session(&hub).await;
        let items = AgentToHub::Items {
            items: vec![UpItem {
                id: 1,
                source: "hand-in".into(),
                kind: "hl7".into(),
                msg_type: Some("ORU^R01".into()),
                control_id: Some("HAND0001".into()),
                received_at_ms: 1,
                payload: Payload(samples::oru_r01("HAND0001", "MRN1", "HAND", "HANNA", 1)),
            }],
        };
        socket
            .send(Message::Text(outpost_proto::encode(&items).into()))
            .await
            .unwrap_or_else(|err| panic!("send items: {err}"));
        next_message(&mut socket).await
    });
    assert_eq!(
        stored,
        Some(HubToAgent::Stored { ids: vec![1] }),
        "a good batch after the bad sessions"
    );
    deliver_through_the_agent(&hub, &agent, &api, "AFTERBAD", 5);
    assert_agent_undisturbed(&agent, &hub);
}

fn a_revoked_agents_open_session_is_told_why_before_it_is_closed(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let api = hub.api(None);
    // Several agents, so that a race between telling and closing cannot hide.
    let hands: Vec<HandAgent> = (0..5).map(|_| HandAgent::enroll(&hub, &api)).collect();
    let rt = runtime();
    let mut sockets: Vec<Socket> = hands.iter().map(|h| rt.block_on(h.session(&hub))).collect();
    for hand in &hands {
        hub.revoke(&hand.id);
    }
    for (hand, socket) in hands.iter().zip(sockets.iter_mut()) {
        let said = rt.block_on(until_closed(socket));
        let expected = format!("agent {} is revoked", hand.id);
        assert!(
            matches!(said.as_slice(), [HubToAgent::Refused { reason }] if *reason == expected),
            "the open session of {} should get Refused {{ {expected:?} }} before it closes; it got {said:?}\nhub log tail:\n{}",
            hand.id,
            hub.log_tail(20)
        );
    }
}
