//! The hub's store: one trait, two backends (SQLite in the data folder by default,
//! PostgreSQL for several hub processes). Every handler talks to `dyn Store`.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;

use crate::HubError;

/// Why an enrollment token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token.
    Unknown,
    /// Used before.
    Reused,
    /// Past its expiry.
    Expired,
}

/// A registered agent.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentRecord {
    /// The agent's id.
    pub id: String,
    /// The site name from its enrollment token.
    pub name: String,
    /// Its Ed25519 public key, hex.
    #[serde(skip)]
    pub public_key: String,
    /// Host name at enrollment.
    pub hostname: String,
    /// When it enrolled (unix ms).
    pub enrolled_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// Last heartbeat or session activity (unix ms).
    pub last_seen_ms: Option<i64>,
    /// The last inventory, as JSON.
    #[schema(value_type = Object)]
    pub inventory: Option<serde_json::Value>,
}

/// A message an agent delivered, as the data API returns it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoredMessage {
    /// The stream position; pass the last one seen as `after`.
    pub cursor: i64,
    /// The agent that delivered it.
    pub agent_id: String,
    /// The agent's item id.
    pub item_id: i64,
    /// The agent's source connector.
    pub source: String,
    /// `hl7`.
    pub kind: String,
    /// MSH-9.
    pub msg_type: Option<String>,
    /// MSH-10.
    pub control_id: Option<String>,
    /// When the agent received it (unix ms).
    pub received_at_ms: i64,
    /// When the hub stored it (unix ms).
    pub stored_at_ms: i64,
    /// The message bytes (base64), only when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

/// A message on its way down to an agent's sink.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DownMessage {
    /// Its id.
    pub id: String,
    /// The agent.
    pub agent_id: String,
    /// The agent's sink.
    pub sink: String,
    /// `accepted` (at the hub), `queued` (in the agent's queue), `delivered`, `dead`, `refused`.
    pub state: String,
    /// The agent's queue item id, once queued.
    pub item_id: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was posted (unix ms).
    pub created_at_ms: i64,
    /// Last change (unix ms).
    pub updated_at_ms: i64,
    /// The bytes (not serialised).
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// One agent's latest heartbeat.
#[derive(Debug, Clone)]
pub struct InventoryUpdate {
    /// The agent.
    pub agent_id: String,
    /// Its inventory.
    pub inventory: serde_json::Value,
    /// When the heartbeat arrived (unix ms).
    pub seen_ms: i64,
}

/// Filters for reading the message stream.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// Only after this cursor.
    pub after: i64,
    /// At most this many.
    pub limit: usize,
    /// Only this agent.
    pub agent_id: Option<String>,
    /// Only this source.
    pub source: Option<String>,
    /// MSH-9 prefix match by component, like the agent's routes.
    pub msg_type: Option<String>,
    /// Include payloads.
    pub with_payload: bool,
}

/// One item to store, as received from an agent.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The agent's item id.
    pub item_id: i64,
    /// Source connector.
    pub source: String,
    /// Item kind.
    pub kind: String,
    /// MSH-9.
    pub msg_type: Option<String>,
    /// MSH-10.
    pub control_id: Option<String>,
    /// Received at the agent (unix ms).
    pub received_at_ms: i64,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// Everything the hub keeps.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a token (by its hash) for a site.
    async fn create_token(
        &self,
        token_hash: &str,
        name: &str,
        expires_at_ms: i64,
    ) -> Result<(), HubError>;
    /// Uses a token once: on success returns the site name and marks it used.
    async fn consume_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<String, TokenRefusal>, HubError>;
    /// Registers an enrolled agent.
    async fn insert_agent(&self, agent: &AgentRecord) -> Result<(), HubError>;
    /// One agent.
    async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, HubError>;
    /// All agents, by name.
    async fn agents(&self) -> Result<Vec<AgentRecord>, HubError>;
    /// Marks an agent revoked; returns whether it existed.
    async fn revoke_agent(&self, id: &str, now_ms: i64) -> Result<bool, HubError>;
    /// Records heartbeats (inventory and last-seen time), many in one transaction: a hub
    /// with thousands of agents gets thousands of heartbeats a second.
    async fn update_inventories(&self, updates: &[InventoryUpdate]) -> Result<(), HubError>;
    /// Stores messages from an agent; an item id already stored is skipped (idempotent).
    /// Returns how many were new.
    async fn insert_messages(
        &self,
        agent_id: &str,
        messages: &[NewMessage],
        now_ms: i64,
    ) -> Result<usize, HubError>;
    /// Reads the message stream.
    async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>, HubError>;
    /// The newest messages of one agent, newest first, without payloads.
    async fn recent_messages(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HubError>;
    /// The highest cursor so far (0 when empty).
    async fn last_cursor(&self) -> Result<i64, HubError>;
    /// Records an API key (by its hash).
    async fn create_api_key(&self, key_hash: &str, name: &str, now_ms: i64)
        -> Result<(), HubError>;
    /// Whether a key hash is a live API key; returns its name.
    async fn api_key(&self, key_hash: &str) -> Result<Option<String>, HubError>;
    /// Stores a message for an agent's sink.
    async fn insert_down(&self, down: &DownMessage) -> Result<(), HubError>;
    /// One down message.
    async fn down(&self, id: &str) -> Result<Option<DownMessage>, HubError>;
    /// Down messages of an agent not yet final (to send or resend on connect).
    async fn open_downs(&self, agent_id: &str) -> Result<Vec<DownMessage>, HubError>;
    /// Updates a down message's state.
    async fn update_down(
        &self,
        id: &str,
        agent_id: &str,
        state: &str,
        item_id: Option<i64>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, HubError>;
}
