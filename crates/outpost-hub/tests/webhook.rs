//! The fleet monitor: an agent whose session goes silent is marked offline after three
//! heartbeat periods and the webhook hears of it; it hears again when the agent is back.
//! A real hub and a real agent uplink, in process, on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use ed25519_dalek::SigningKey;
use outpost_hub::store::AgentRecord;
use outpost_hub::HubConfig;
use outpost_proto::Inventory;
use outpost_uplink::{Credentials, LinkState, Uplink};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

async fn webhook_receiver() -> (String, mpsc::Receiver<serde_json::Value>) {
    let (tx, rx) = mpsc::channel(16);
    let app = Router::new().route(
        "/hook",
        post(move |Json(event): Json<serde_json::Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), rx)
}

async fn next_event(
    events: &mut mpsc::Receiver<serde_json::Value>,
    wanted: &str,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {wanted} event within 20 s"))
            .expect("webhook receiver ended");
        if event["event"] == wanted {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_silent_for_three_heartbeats_is_offline_and_the_webhook_is_called() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (webhook_url, mut events) = webhook_receiver().await;
    let config = HubConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("hub"),
        heartbeat: Duration::from_secs(1),
        webhook_url: Some(webhook_url),
        ..HubConfig::default()
    };
    let shutdown = CancellationToken::new();
    let hub = outpost_hub::start(config, shutdown.child_token())
        .await
        .unwrap();
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let agent = AgentRecord {
        id: "agt_webhook".into(),
        name: "Webhook Clinic".into(),
        public_key: hex::encode(key.verifying_key().to_bytes()),
        hostname: "test".into(),
        enrolled_at_ms: outpost_hub::now_ms(),
        revoked_at_ms: None,
        last_seen_ms: None,
        inventory: None,
    };
    hub.state.store.insert_agent(&agent).await.unwrap();

    let start_agent = |stop: CancellationToken| {
        let credentials = Credentials {
            agent_id: agent.id.clone(),
            name: agent.name.clone(),
            hub_url: format!("https://{}", hub.addr),
            key: key.clone(),
            job_key: None,
            tls: outpost_uplink::client_tls(hub.ca_path.as_deref()).unwrap(),
        };
        let inventory: outpost_uplink::InventorySource =
            Arc::new(|| Box::pin(async { Inventory::default() }));
        let (downs, _) = mpsc::channel(1);
        Uplink::start(credentials, inventory, downs, stop)
    };

    let first_run = CancellationToken::new();
    let uplink = start_agent(first_run.clone());
    uplink.wait_connected().await;
    let online = next_event(&mut events, "agent.online").await;
    assert_eq!(online["agent_id"], "agt_webhook");
    assert_eq!(online["name"], "Webhook Clinic");

    first_run.cancel();
    let offline = next_event(&mut events, "agent.offline").await;
    assert_eq!(offline["agent_id"], "agt_webhook");
    assert!(matches!(uplink.state(), LinkState::Down(_)));

    let second_run = CancellationToken::new();
    let uplink = start_agent(second_run.clone());
    uplink.wait_connected().await;
    next_event(&mut events, "agent.online").await;
    second_run.cancel();
    shutdown.cancel();
    hub.wait().await;
}
