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

/// A staff member of the vendor: who signs jobs and looks at PHI.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StaffRecord {
    /// Unique name, e.g. `alice@vendor.example`.
    pub name: String,
    /// `support` or `admin`.
    pub role: String,
    /// SHA-256 of the personal token (see `secrets::hash_secret`); never shown.
    #[serde(skip)]
    pub token_hash: String,
    /// When it was made (unix ms).
    pub created_at_ms: i64,
    /// When it was disabled, if it was.
    pub disabled_at_ms: Option<i64>,
}

/// A fan-out of one job to many agents.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RolloutRecord {
    /// Its id.
    pub id: String,
    /// The staff member who submitted it.
    pub staff: String,
    /// The capability.
    pub capability: String,
    /// At most this many jobs released and unfinished at once.
    pub max_concurrency: u32,
    /// The rollout halts once more than this many jobs have failed (None: never).
    pub error_threshold: Option<u32>,
    /// `running`, `done`, `halted`.
    pub state: String,
    /// When it was submitted (unix ms).
    pub created_at_ms: i64,
    /// Last change (unix ms).
    pub updated_at_ms: i64,
}

/// One job for one agent, as the hub keeps it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobRecord {
    /// The delivery id (the signed job's id, except for rows made by hand).
    pub id: String,
    /// The rollout it belongs to.
    pub rollout_id: String,
    /// The agent.
    pub agent_id: String,
    /// The capability.
    pub capability: String,
    /// The staff member who asked.
    pub staff: String,
    /// The arguments (JSON text); never serialised: they may hold PHI (a path, a search).
    #[serde(skip)]
    pub args: String,
    /// The signed [`outpost_proto::JobSpec`] JSON, exactly as signed; not serialised.
    #[serde(skip)]
    pub signed_job: String,
    /// The hub's signature over it, hex; not serialised.
    #[serde(skip)]
    pub signature: String,
    /// A [`outpost_proto::JobState`] name.
    pub state: String,
    /// The rule or check behind the state.
    pub rule: Option<String>,
    /// Why.
    pub reason: Option<String>,
    /// A short summary of the result.
    pub summary: Option<String>,
    /// SHA-256 of the whole output, hex.
    pub digest: Option<String>,
    /// Whether the output was cut at the agent's size limit.
    pub truncated: bool,
    /// Who approved or denied it at the practice.
    pub approver: Option<String>,
    /// Whether someone asked to cancel it.
    pub cancel_requested: bool,
    /// When it was made (unix ms).
    pub created_at_ms: i64,
    /// When it expires (unix ms).
    pub expires_at_ms: i64,
    /// Last change (unix ms).
    pub updated_at_ms: i64,
}

/// A state change for one job.
#[derive(Debug, Clone)]
pub struct JobChange {
    /// The job (delivery id).
    pub id: String,
    /// The agent that must own the job: a change naming another agent's job is ignored,
    /// so one agent can never report on another's jobs.
    pub agent_id: String,
    /// The new state name.
    pub state: String,
    /// Fields that are `Some` replace the stored ones; `None` keeps them.
    pub rule: Option<String>,
    /// See `rule`.
    pub reason: Option<String>,
    /// See `rule`.
    pub summary: Option<String>,
    /// See `rule`.
    pub digest: Option<String>,
    /// Replaces the stored flag when `Some`.
    pub truncated: Option<bool>,
    /// See `rule`.
    pub approver: Option<String>,
    /// When (unix ms).
    pub at_ms: i64,
}

/// A piece of a job's output.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobChunk {
    /// The job (delivery id).
    pub job_id: String,
    /// 1, 2, 3…
    pub seq: i64,
    /// The text.
    pub data: String,
}

/// Where an agent's audit mirror stands.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct MirrorState {
    /// The last entry accepted (0: none).
    pub last_seq: u64,
    /// Its line hash (empty: none).
    pub last_hash: String,
    /// A gap, fork or bad signature found on receipt; stays until someone looks.
    pub problem: Option<String>,
    /// When the problem was found (unix ms).
    pub problem_at_ms: Option<i64>,
}

/// One line of an agent's mirrored audit log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MirroredLine {
    /// Its sequence number.
    pub seq: u64,
    /// SHA-256 of the line, hex.
    pub hash: String,
    /// The line, exactly as the agent wrote it.
    pub line: String,
    /// When the hub received it (unix ms).
    pub received_at_ms: i64,
}

/// A record of someone looking at PHI or an audit trail on the hub.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AccessRecord {
    /// When (unix ms).
    pub at_ms: i64,
    /// Who: `staff:NAME` or `app:KEYNAME`.
    pub principal: String,
    /// What: `message.payload`, `messages.payload`, `audit.trail`, `job.output`.
    pub action: String,
    /// Which: an agent id, message cursor, job id.
    pub target: String,
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

    /// Adds a staff member; returns false when the name is taken.
    async fn insert_staff(&self, staff: &StaffRecord) -> Result<bool, HubError>;
    /// The enabled staff member whose token hashes to this.
    async fn staff_by_token(&self, token_hash: &str) -> Result<Option<StaffRecord>, HubError>;
    /// Every staff member, by name.
    async fn staff(&self) -> Result<Vec<StaffRecord>, HubError>;
    /// The hub's job signing key seed: stores `candidate` if there is none yet and returns
    /// the stored one, so every hub process over one database signs with the same key.
    async fn job_key_seed(&self, candidate: &[u8; 32]) -> Result<[u8; 32], HubError>;
    /// Records a rollout.
    async fn insert_rollout(&self, rollout: &RolloutRecord) -> Result<(), HubError>;
    /// One rollout.
    async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, HubError>;
    /// Rollouts still `running`, oldest first (a hub restarting takes them up again).
    async fn running_rollouts(&self) -> Result<Vec<RolloutRecord>, HubError>;
    /// Changes a rollout's state.
    async fn set_rollout_state(&self, id: &str, state: &str, now_ms: i64) -> Result<(), HubError>;
    /// Records jobs, in one transaction. On PostgreSQL, also notifies every hub process
    /// (`NOTIFY outpost_jobs, '<agent id>'`) for jobs in state `pending`.
    async fn insert_jobs(&self, jobs: &[JobRecord]) -> Result<(), HubError>;
    /// One job.
    async fn job(&self, id: &str) -> Result<Option<JobRecord>, HubError>;
    /// The jobs of a rollout, in creation order.
    async fn rollout_jobs(&self, rollout_id: &str) -> Result<Vec<JobRecord>, HubError>;
    /// An agent's newest jobs, newest first.
    async fn recent_jobs(&self, agent_id: &str, limit: usize) -> Result<Vec<JobRecord>, HubError>;
    /// Jobs of these agents to send now: state `pending` (and `sent` too when
    /// `include_sent`, for a session that just started), not expired, oldest first.
    async fn jobs_to_send(
        &self,
        agent_ids: &[String],
        include_sent: bool,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, HubError>;
    /// Jobs of these agents with a cancel request that are not final.
    async fn jobs_to_cancel(&self, agent_ids: &[String]) -> Result<Vec<JobRecord>, HubError>;
    /// Moves `queued` jobs of a rollout to `pending`, at most `count`, oldest first;
    /// returns the released ones. On PostgreSQL, notifies as [`Store::insert_jobs`].
    async fn release_jobs(
        &self,
        rollout_id: &str,
        count: usize,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>, HubError>;
    /// Applies state changes, in one transaction. A change to a job already in a final
    /// state is ignored (an agent's late report cannot undo `expired` or `skipped`).
    async fn update_jobs(&self, changes: &[JobChange]) -> Result<(), HubError>;
    /// Marks a job for cancellation; returns whether it exists and was not final.
    /// On PostgreSQL, notifies as [`Store::insert_jobs`].
    async fn request_cancel(&self, id: &str, now_ms: i64) -> Result<bool, HubError>;
    /// Appends output pieces; a (job, seq) already stored is skipped.
    async fn append_job_output(&self, chunks: &[JobChunk]) -> Result<(), HubError>;
    /// Output pieces of a job after `after_seq`, in order, at most `limit`.
    async fn job_output(
        &self,
        job_id: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<JobChunk>, HubError>;
    /// Where an agent's audit mirror stands.
    async fn mirror_state(&self, agent_id: &str) -> Result<MirrorState, HubError>;
    /// Stores accepted audit lines and the new mirror position, in one transaction.
    async fn append_audit_lines(
        &self,
        agent_id: &str,
        lines: &[MirroredLine],
    ) -> Result<(), HubError>;
    /// Records (or with `None` clears) a mirror problem.
    async fn set_mirror_problem(
        &self,
        agent_id: &str,
        problem: Option<&str>,
        now_ms: i64,
    ) -> Result<(), HubError>;
    /// An agent's mirrored audit lines, newest first, at most `limit`.
    async fn audit_lines(
        &self,
        agent_id: &str,
        limit: usize,
    ) -> Result<Vec<MirroredLine>, HubError>;
    /// Records an access to PHI or an audit trail.
    async fn record_access(&self, access: &AccessRecord) -> Result<(), HubError>;
    /// The newest access records, newest first.
    async fn access_log(&self, limit: usize) -> Result<Vec<AccessRecord>, HubError>;
    /// Waits for job notifications from other hub processes: returns a channel of agent
    /// ids with new work (pending jobs or cancel requests), or `None` where the backend
    /// has no cross-process notifications (SQLite: one hub process only).
    async fn listen_jobs(&self) -> Result<Option<tokio::sync::mpsc::Receiver<String>>, HubError>;

    /// Starts an agent's upload of an item's file (a DICOM instance) of `total` bytes, or
    /// finds the one already started; returns how many bytes the hub holds. A different
    /// `total` for the same item restarts the upload from zero.
    async fn blob_begin(&self, agent_id: &str, item_id: i64, total: u64) -> Result<u64, HubError>;
    /// Appends `data` at `offset` when `offset` equals the bytes held (in one transaction);
    /// returns the bytes held afterwards (unchanged when the offset did not match, so the
    /// agent resumes from there). Never grows past the upload's total.
    async fn blob_append(
        &self,
        agent_id: &str,
        item_id: i64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, HubError>;
    /// The upload's (bytes held, total), if it was started.
    async fn blob_state(
        &self,
        agent_id: &str,
        item_id: i64,
    ) -> Result<Option<(u64, u64)>, HubError>;
    /// Parts of an upload from `from_offset` on, in order, at most `limit`: (offset, bytes).
    async fn blob_parts(
        &self,
        agent_id: &str,
        item_id: i64,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, HubError>;
}
