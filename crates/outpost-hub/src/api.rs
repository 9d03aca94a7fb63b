//! Routes: enrollment, the agents' WebSocket, the data API (API key), OpenAPI, dashboard.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{QueryRejection, StringRejection};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_proto::{EnrollRequest, EnrollResponse, ErrorBody, HubToAgent, Payload};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::store::{AgentRecord, DownMessage, MessageFilter, StoredMessage, TokenRefusal};
use crate::{now_ms, secrets, session, HubError, HubState};

/// The largest request body the API takes (a down message).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// The longest a `GET /api/v1/messages` waits for new messages.
const MAX_WAIT_SECS: u64 = 30;

/// Builds the router.
pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .route("/api/v1/enroll", post(enroll))
        .route("/api/v1/agent/session", get(agent_session))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{id}", get(get_agent))
        .route("/api/v1/agents/{id}/messages", post(post_down))
        .route("/api/v1/down/{id}", get(get_down))
        .route("/api/v1/messages", get(list_messages))
        .route("/api/v1/messages/{cursor}/content", get(message_content))
        .route("/api/v1/openapi.json", get(openapi))
        .merge(crate::api_jobs::routes())
        .merge(crate::api_sql::routes())
        .merge(crate::dashboard::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Every API error: a status and `{code, message}`; details go to the log, not the caller.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<HubError> for ApiError {
    fn from(err: HubError) -> Self {
        tracing::error!(error = %err, "request failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the hub's store is unavailable; try again",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                code: self.code.to_owned(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

/// The secret a request presents: `Authorization: Bearer …`, else the dashboard's cookie.
pub(crate) fn presented_secret(parts: &Parts) -> Option<String> {
    let header_value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match header_value.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(secret) => Some(secret.to_owned()),
        None => crate::dashboard::session_key(parts),
    }
}

/// A caller with a valid API key (`Authorization: Bearer opk_…`) or staff token.
pub struct ApiCaller {
    /// The key's name.
    pub name: String,
    /// Who, for the access log: `app:KEYNAME` or `staff:NAME`.
    pub principal: String,
}

impl FromRequestParts<Arc<HubState>> for ApiCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HubState>,
    ) -> Result<Self, Self::Rejection> {
        let key = presented_secret(parts).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send an API key as `Authorization: Bearer <key>`",
            )
        })?;
        let hash = secrets::hash_secret(&key);
        if let Some(name) = state.store.api_key(&hash).await? {
            return Ok(ApiCaller {
                principal: format!("app:{name}"),
                name,
            });
        }
        match state.store.staff_by_token(&hash).await? {
            Some(staff) => Ok(ApiCaller {
                principal: format!("staff:{}", staff.name),
                name: staff.name,
            }),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is not valid (unknown or revoked)",
            )),
        }
    }
}

/// Enrolls an agent with a one-time token.
#[utoipa::path(post, path = "/api/v1/enroll", request_body = Object, responses(
    (status = 200, description = "enrolled", body = Object),
    (status = 403, description = "token unknown, reused or expired", body = Object)))]
async fn enroll(
    State(state): State<Arc<HubState>>,
    ConnectInfo(peer): ConnectInfo<crate::listener::PeerAddr>,
    body: Result<String, StringRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let request: EnrollRequest = serde_json::from_str(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid enrollment request: {err}"),
        )
    })?;
    let key_ok = hex::decode(&request.public_key)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .is_some_and(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).is_ok());
    if !key_ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_public_key",
            "public_key must be an Ed25519 public key in hex (64 characters)",
        ));
    }
    let name = match state
        .store
        .consume_token(&secrets::hash_secret(&request.token), now_ms())
        .await?
    {
        Ok(name) => name,
        Err(refusal) => {
            let (code, message) = match refusal {
                TokenRefusal::Unknown => (
                    "token_unknown",
                    "this enrollment token is not known to the hub",
                ),
                TokenRefusal::Reused => (
                    "token_reused",
                    "this enrollment token was already used; ask for a new one",
                ),
                TokenRefusal::Expired => (
                    "token_expired",
                    "this enrollment token has expired; ask for a new one",
                ),
            };
            tracing::warn!(%peer, code, "enrollment refused");
            return Err(ApiError::new(StatusCode::FORBIDDEN, code, message));
        }
    };
    let agent = AgentRecord {
        id: secrets::new_id("agt_"),
        name: name.clone(),
        public_key: request.public_key,
        hostname: request.hostname.chars().take(255).collect(),
        enrolled_at_ms: now_ms(),
        revoked_at_ms: None,
        last_seen_ms: None,
        inventory: None,
    };
    state.store.insert_agent(&agent).await?;
    tracing::info!(agent_id = %agent.id, name = %name, %peer, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id: agent.id,
        name,
        job_key: hex::encode(state.job_key.verifying_key().to_bytes()),
    }))
}

async fn agent_session(
    ws: WebSocketUpgrade,
    State(state): State<Arc<HubState>>,
    ConnectInfo(peer): ConnectInfo<crate::listener::PeerAddr>,
) -> Response {
    // Small buffers: an idle session mostly waits, and the hub holds thousands of them
    // (tungstenite's defaults reserve 128 KiB per direction up front).
    ws.read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(outpost_proto::MAX_FRAME_BYTES)
        .max_frame_size(outpost_proto::MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session::run(socket, state, peer))
}

/// An agent with whether it is online now.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AgentView {
    #[serde(flatten)]
    agent: AgentRecord,
    /// A live session and a heartbeat within three periods.
    online: bool,
}

pub(crate) fn agent_view(state: &HubState, agent: AgentRecord) -> AgentView {
    let online = crate::monitor::is_online(state, &agent);
    AgentView { agent, online }
}

/// Lists agents with their health.
#[utoipa::path(get, path = "/api/v1/agents", responses((status = 200, body = [AgentView])), security(("api_key" = [])))]
async fn list_agents(
    _caller: ApiCaller,
    State(state): State<Arc<HubState>>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    let agents = state.store.agents().await?;
    Ok(Json(
        agents.into_iter().map(|a| agent_view(&state, a)).collect(),
    ))
}

/// One agent.
#[utoipa::path(get, path = "/api/v1/agents/{id}", params(("id" = String, Path)), responses((status = 200, body = AgentView), (status = 404, body = Object)), security(("api_key" = [])))]
async fn get_agent(
    _caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let agent = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| not_found("agent", &id))?;
    Ok(Json(agent_view(&state, agent)))
}

/// Records that `principal` looked at PHI or an audit trail. Fails the request if the
/// record cannot be written: nothing is shown that is not recorded.
pub(crate) async fn record_access(
    state: &HubState,
    principal: &str,
    action: &str,
    target: &str,
) -> Result<(), ApiError> {
    state
        .store
        .record_access(&crate::store::AccessRecord {
            at_ms: now_ms(),
            principal: principal.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
        })
        .await?;
    Ok(())
}

/// A body that could not be read (too large, not UTF-8) as a JSON error like every other.
pub(crate) fn body_error(rejection: StringRejection) -> ApiError {
    ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
}

pub(crate) fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no {what} {id:?}"),
    )
}

/// Query of `GET /api/v1/messages`.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct MessagesQuery {
    /// Cursor of the last message seen (0 for the start).
    #[serde(default)]
    after: i64,
    /// At most this many (1..=1000, default 100).
    limit: Option<usize>,
    /// Only this agent.
    agent: Option<String>,
    /// Only this source connector.
    source: Option<String>,
    /// MSH-9, matched by component (`ORU` or `ORU^R01`).
    #[serde(rename = "type")]
    msg_type: Option<String>,
    /// Wait up to this many seconds (max 30) for a message when none is there (long-poll).
    wait: Option<u64>,
    /// Include the message bytes as base64 (`payload_base64`).
    #[serde(default)]
    payload: bool,
}

/// A page of the stream.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MessagesPage {
    messages: Vec<StoredMessage>,
    /// Pass as `after` next time.
    next_cursor: i64,
}

/// Reads delivered messages as a stream with a cursor.
#[utoipa::path(get, path = "/api/v1/messages", params(MessagesQuery), responses((status = 200, body = MessagesPage), (status = 400, body = Object)), security(("api_key" = [])))]
async fn list_messages(
    caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> Result<Json<MessagesPage>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    })?;
    // The store, not this process, knows the stream's end: several hubs may share it.
    let last = state.store.last_cursor().await?;
    if query.after < 0 || query.after > last {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            format!(
                "cursor {} is not a position in this hub's stream (0 to {last})",
                query.after
            ),
        ));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            "limit must be 1 to 1000",
        ));
    }
    let filter = MessageFilter {
        after: query.after,
        limit,
        agent_id: query.agent,
        source: query.source,
        msg_type: query.msg_type,
        with_payload: query.payload,
    };
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(query.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let mut changes = state.last_cursor.subscribe();
    loop {
        let messages = state.store.messages(&filter).await?;
        if !messages.is_empty() || tokio::time::Instant::now() >= deadline {
            let next_cursor = messages
                .last()
                .map(|m| m.cursor)
                .unwrap_or(filter.after.max(0));
            if filter.with_payload && !messages.is_empty() {
                let target = format!(
                    "cursors {}..={} agent {}",
                    messages.first().map_or(0, |m| m.cursor),
                    next_cursor,
                    filter.agent_id.as_deref().unwrap_or("*")
                );
                record_access(&state, &caller.principal, "messages.payload", &target).await?;
            }
            return Ok(Json(MessagesPage {
                messages,
                next_cursor,
            }));
        }
        // Woken at once by this hub's inserts; polls for other hubs' every half second.
        let wake = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
        let _ = tokio::time::timeout_at(wake, changes.changed()).await;
    }
}

/// One message's content as a file: the HL7 message, or the whole DICOM Part-10 instance
/// (`application/dicom`, streamed from the store however large). Recorded in the access log.
#[utoipa::path(get, path = "/api/v1/messages/{cursor}/content", params(("cursor" = i64, Path)), responses((status = 200, description = "the content"), (status = 404, body = Object)), security(("api_key" = [])))]
async fn message_content(
    caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path(cursor): Path<i64>,
) -> Result<Response, ApiError> {
    let filter = MessageFilter {
        after: cursor - 1,
        limit: 1,
        with_payload: true,
        ..MessageFilter::default()
    };
    let message = state
        .store
        .messages(&filter)
        .await?
        .into_iter()
        .find(|m| m.cursor == cursor)
        .ok_or_else(|| not_found("message", &cursor.to_string()))?;
    record_access(
        &state,
        &caller.principal,
        "message.content",
        &format!("agent {} cursor {cursor}", message.agent_id),
    )
    .await?;
    if message.kind != "dicom" {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(message.payload_base64.as_deref().unwrap_or(""))
            .unwrap_or_default();
        return Ok(([(header::CONTENT_TYPE, "x-application/hl7-v2+er7")], bytes).into_response());
    }
    let Some((held, total)) = state
        .store
        .blob_state(&message.agent_id, message.item_id)
        .await?
    else {
        return Err(not_found("instance file of message", &cursor.to_string()));
    };
    if held != total {
        return Err(not_found(
            "complete instance file of message",
            &cursor.to_string(),
        ));
    }
    // Pages of parts, read one after the other as the client takes them.
    let (agent_id, item_id) = (message.agent_id.clone(), message.item_id);
    let store = state.store.clone();
    let pages = futures::stream::unfold(Some(0u64), move |next| {
        let (store, agent_id) = (store.clone(), agent_id.clone());
        async move {
            let from = next?;
            match store.blob_parts(&agent_id, item_id, from, 16).await {
                Ok(parts) if parts.is_empty() => None,
                Ok(parts) => {
                    let after = parts
                        .last()
                        .map(|(offset, data)| offset + data.len() as u64);
                    let content: Vec<u8> = parts.into_iter().flat_map(|(_, data)| data).collect();
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(content)), after))
                }
                Err(err) => Some((Err(std::io::Error::other(err.to_string())), None)),
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/dicom".to_owned()),
            (header::CONTENT_LENGTH, total.to_string()),
        ],
        axum::body::Body::from_stream(pages),
    )
        .into_response())
}

/// Body of `POST /api/v1/agents/{id}/messages`.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct DownRequest {
    /// The agent's sink to deliver through, e.g. `lab-out`.
    sink: String,
    /// The HL7 message (segments separated by `\r` or newlines).
    message: Option<String>,
    /// Or the message bytes in base64.
    message_base64: Option<String>,
}

/// Puts a message on an agent's sink; follow it with `GET /api/v1/down/{id}`.
#[utoipa::path(post, path = "/api/v1/agents/{id}/messages", params(("id" = String, Path)), request_body = DownRequest,
    responses((status = 202, body = DownMessage), (status = 400, body = Object), (status = 404, body = Object)), security(("api_key" = [])))]
async fn post_down(
    caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
    body: Result<String, StringRejection>,
) -> Result<(StatusCode, Json<DownMessage>), ApiError> {
    let body = body.map_err(body_error)?;
    let request: DownRequest = serde_json::from_str(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid body: {err}"),
        )
    })?;
    let agent = state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| not_found("agent", &id))?;
    if agent.revoked_at_ms.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "agent_revoked",
            format!("agent {id} is revoked"),
        ));
    }
    let sink_ok = !request.sink.is_empty()
        && request.sink.len() <= 64
        && request
            .sink
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !sink_ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_sink",
            "sink must be a connector name (A-Z a-z 0-9 . _ -)",
        ));
    }
    let payload = match (request.message, request.message_base64) {
        (Some(text), None) => text.replace("\r\n", "\r").replace('\n', "\r").into_bytes(),
        (None, Some(b64)) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "message_base64 is not valid base64",
                    )
                })?
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "give exactly one of message or message_base64",
            ))
        }
    };
    if !payload.starts_with(b"MSH") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_message",
            "message must be HL7 v2 starting with MSH",
        ));
    }
    let now = now_ms();
    let down = DownMessage {
        id: secrets::new_id("dn_"),
        agent_id: agent.id.clone(),
        sink: request.sink,
        state: "accepted".into(),
        item_id: None,
        error: None,
        created_at_ms: now,
        updated_at_ms: now,
        payload,
    };
    state.store.insert_down(&down).await?;
    tracing::info!(down_id = %down.id, agent_id = %agent.id, sink = %down.sink, api_key = %caller.name, "message accepted for an agent");
    if let Some(session) = state.sessions.get(&agent.id) {
        let deliver = HubToAgent::Deliver {
            down_id: down.id.clone(),
            sink: down.sink.clone(),
            payload: Payload(down.payload.clone()),
        };
        let _ = session.outbox.send(deliver).await;
    }
    Ok((StatusCode::ACCEPTED, Json(down)))
}

/// Where a message sent down is.
#[utoipa::path(get, path = "/api/v1/down/{id}", params(("id" = String, Path)), responses((status = 200, body = DownMessage), (status = 404, body = Object)), security(("api_key" = [])))]
async fn get_down(
    _caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<Json<DownMessage>, ApiError> {
    Ok(Json(
        state
            .store
            .down(&id)
            .await?
            .ok_or_else(|| not_found("message", &id))?,
    ))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Outpost hub API", description = "Fleet health, the message stream from agents, messages down to agents, write-back calls to agents' SQL sinks, and remote support jobs (staff tokens)."),
    paths(enroll, list_agents, get_agent, list_messages, message_content, post_down, get_down,
        crate::api_jobs::submit, crate::api_jobs::get_rollout, crate::api_jobs::get_job,
        crate::api_jobs::job_output, crate::api_jobs::cancel_job, crate::api_jobs::agent_jobs,
        crate::api_jobs::agent_audit, crate::api_jobs::access_log, crate::api_jobs::whoami,
        crate::api_sql::sql_call),
    components(schemas(AgentView, AgentRecord, StoredMessage, MessagesPage, DownRequest, DownMessage,
        crate::api_jobs::SubmitRequest, crate::api_jobs::RolloutView, crate::api_jobs::OutputPage,
        crate::api_jobs::AuditTrail, crate::store::JobRecord, crate::store::RolloutRecord,
        crate::store::JobChunk, crate::store::MirrorState, crate::store::MirroredLine,
        crate::store::AccessRecord, crate::store::StaffRecord,
        crate::api_sql::SqlCallRequest, crate::api_sql::SqlCallResponse,
        crate::api_sql::SqlErrorBody, crate::api_sql::SqlDatabaseError)),
    modifiers(&ApiKeyScheme)
)]
struct ApiDoc;

struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "staff_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
