//! Fleet watch: an agent silent for three heartbeat periods is offline; each change is
//! logged and, when configured, posted to a webhook.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::AgentRecord;
use crate::{now_ms, HubState};

/// Online: a live session and a heartbeat (or items) within three heartbeat periods.
pub fn is_online(state: &HubState, agent: &AgentRecord) -> bool {
    let window_ms = 3 * state.config.heartbeat.as_millis() as i64;
    state.sessions.get(&agent.id).is_some()
        && agent
            .last_seen_ms
            .is_some_and(|seen| now_ms() - seen <= window_ms)
}

#[derive(Serialize)]
struct WebhookEvent<'a> {
    event: &'static str,
    agent_id: &'a str,
    name: &'a str,
    last_seen_ms: Option<i64>,
    at_ms: i64,
}

/// Runs until shutdown, checking once per heartbeat period.
pub async fn watch_fleet(state: Arc<HubState>, shutdown: CancellationToken) {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .ok();
    let mut known: HashMap<String, bool> = HashMap::new();
    let mut interval = tokio::time::interval(state.config.heartbeat);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        let agents = match state.store.agents().await {
            Ok(agents) => agents,
            Err(err) => {
                tracing::warn!(error = %err, "fleet check: cannot read agents");
                continue;
            }
        };
        // Revocation may come from another process (the CLI): end live sessions here.
        for agent in agents.iter().filter(|a| a.revoked_at_ms.is_some()) {
            if let Some(session) = state.sessions.get(&agent.id) {
                tracing::warn!(agent_id = %agent.id, "agent revoked; ending its session");
                let refused = outpost_proto::HubToAgent::Refused {
                    reason: format!("agent {} is revoked", agent.id),
                };
                let _ = session.outbox.try_send(refused);
                session.cancel.cancel();
            }
        }
        for agent in agents.iter().filter(|a| a.revoked_at_ms.is_none()) {
            let online = is_online(&state, agent);
            let before = known.insert(agent.id.clone(), online);
            let event = match (before, online) {
                (Some(true), false) => "agent.offline",
                (Some(false), true) | (None, true) => "agent.online",
                _ => continue,
            };
            if event == "agent.offline" {
                tracing::warn!(agent_id = %agent.id, name = %agent.name, "agent offline (silent for 3 heartbeat periods)");
            } else if before.is_some() {
                tracing::info!(agent_id = %agent.id, name = %agent.name, "agent back online");
            }
            if let (Some(url), Some(client)) = (&state.config.webhook_url, &client) {
                let body = WebhookEvent {
                    event,
                    agent_id: &agent.id,
                    name: &agent.name,
                    last_seen_ms: agent.last_seen_ms,
                    at_ms: now_ms(),
                };
                if let Err(err) = client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                {
                    tracing::warn!(event, agent_id = %agent.id, error = %err, "webhook call failed");
                }
            }
        }
    }
}
