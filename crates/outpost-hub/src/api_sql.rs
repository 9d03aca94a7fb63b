//! Write-back through the data API: `POST /api/v1/agents/{id}/sql/{sink}/{operation}`
//! with `{ "values": {...}, "idempotency_key": "..." }`. The hub sends the operation's
//! name and the values down the agent's session ([`HubToAgent::SqlCall`]) and waits for
//! the agent's answer ([`AgentToHub::SqlResult`](outpost_proto::AgentToHub::SqlResult));
//! it never sends SQL text, and the agent runs only statements its own config defines.
//!
//! Each call is written to the access log (action `sql.call`, with the app key's name)
//! before it is sent; a call whose record cannot be written is not sent.
//!
//! Only the hub process holding the agent's session can reach it; with several hub
//! processes behind a load balancer, a call that lands on another one gets 503 and is
//! retried with the same idempotency key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::StringRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use outpost_proto::{HubToAgent, SqlCall, SqlOutcome};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::api::{body_error, not_found, record_access, ApiCaller, ApiError};
use crate::{secrets, HubState};

/// How long the hub waits for the agent's answer unless the request says otherwise.
const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// The longest a request may ask to wait.
const MAX_TIMEOUT_MS: u64 = 120_000;

pub(crate) fn routes() -> Router<Arc<HubState>> {
    Router::new().route("/api/v1/agents/{id}/sql/{sink}/{operation}", post(sql_call))
}

/// Calls waiting for their agent's answer, by call id.
#[derive(Default)]
pub struct SqlCalls {
    pending: Mutex<HashMap<String, (String, oneshot::Sender<SqlOutcome>)>>,
}

impl SqlCalls {
    fn register(&self, call_id: &str, agent_id: &str) -> oneshot::Receiver<SqlOutcome> {
        let (sender, receiver) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(call_id.to_owned(), (agent_id.to_owned(), sender));
        }
        receiver
    }

    fn remove(&self, call_id: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(call_id);
        }
    }

    /// Hands an agent's answer to the waiting request. Answers for calls of another
    /// agent, or for calls no longer waiting, are dropped.
    pub fn complete(&self, agent_id: &str, call_id: &str, outcome: SqlOutcome) {
        let waiter = match self.pending.lock() {
            Ok(mut pending) => match pending.get(call_id) {
                Some((owner, _)) if owner == agent_id => pending.remove(call_id),
                Some(_) => {
                    tracing::warn!(
                        agent_id,
                        call_id,
                        "agent answered a SQL call of another agent; ignored"
                    );
                    None
                }
                None => None,
            },
            Err(_) => None,
        };
        match waiter {
            Some((_, sender)) => {
                let _ = sender.send(outcome);
            }
            None => {
                tracing::info!(agent_id, call_id, "SQL call answered after the caller stopped waiting (a retry with the same key gets the stored result)")
            }
        }
    }
}

/// Body of `POST /api/v1/agents/{id}/sql/{sink}/{operation}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlCallRequest {
    /// Placeholder name → value: numbers, strings, booleans, null. Every placeholder of
    /// the operation must have one, and nothing else may be given. Timestamps are RFC
    /// 3339 strings.
    #[schema(value_type = Object)]
    values: serde_json::Map<String, serde_json::Value>,
    /// Your key for this call (1 to 200 characters): a call repeated with the same key
    /// writes once and returns the first call's result.
    idempotency_key: String,
    /// How long to wait for the agent, in ms (default 30000, at most 120000).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// The result of a call that ran.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SqlCallResponse {
    /// Rows inserted, updated or deleted.
    rows_affected: u64,
    /// Rows the statement returned (`RETURNING`), column → value.
    #[schema(value_type = Vec<Object>)]
    returned: Vec<serde_json::Map<String, serde_json::Value>>,
    /// True when this is the stored result of an earlier call with the same key.
    replayed: bool,
}

/// The database's refusal: `{"error": {"code", "message"}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SqlErrorBody {
    /// The database's error.
    error: SqlDatabaseError,
    /// True when this is the stored result of an earlier call with the same key.
    replayed: bool,
}

/// A database error.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SqlDatabaseError {
    /// SQLSTATE (PostgreSQL, e.g. `23505`) or the result code's name (SQLite, e.g.
    /// `SQLITE_CONSTRAINT_UNIQUE`).
    code: String,
    /// The database's message.
    message: String,
}

/// Runs one of an agent's configured SQL operations (write-back), with bound values.
#[utoipa::path(post, path = "/api/v1/agents/{id}/sql/{sink}/{operation}",
    params(("id" = String, Path, description = "agent id"), ("sink" = String, Path, description = "the agent's `kind = \"sql\"` sink"),
        ("operation" = String, Path, description = "an operation of that sink's config")),
    request_body = SqlCallRequest,
    responses(
        (status = 200, description = "ran and committed (or the stored result of the same key)", body = SqlCallResponse),
        (status = 400, description = "values missing, unknown or of the wrong type; nothing ran", body = Object),
        (status = 404, description = "unknown agent, sink or operation", body = Object),
        (status = 409, description = "key reused with other values, or an earlier attempt's outcome is unknown (check the database)", body = Object),
        (status = 422, description = "the database refused the statement (constraint…); nothing was written", body = SqlErrorBody),
        (status = 502, description = "the agent cannot reach its database; nothing was written; retry with the same key", body = Object),
        (status = 503, description = "the agent is not connected to this hub", body = Object),
        (status = 504, description = "the agent did not answer in time; retry with the same key", body = Object)),
    security(("api_key" = [])))]
pub(crate) async fn sql_call(
    caller: ApiCaller,
    State(state): State<Arc<HubState>>,
    Path((id, sink, operation)): Path<(String, String, String)>,
    body: Result<String, StringRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let request: SqlCallRequest = serde_json::from_str(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid body: {err}"),
        )
    })?;
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !name_ok(&sink) || !name_ok(&operation) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            "sink and operation must be names (A-Z a-z 0-9 . _ -, at most 64)",
        ));
    }
    let key = &request.idempotency_key;
    if key.is_empty() || key.chars().count() > 200 || key.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "idempotency_key must be 1 to 200 characters without control characters",
        ));
    }
    let timeout_ms = request.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_timeout",
            format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS}"),
        ));
    }
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
    let Some(session) = state.sessions.get(&agent.id) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_offline",
            format!("agent {id} is not connected to this hub; nothing was sent (retry with the same idempotency key)"),
        ));
    };
    let call_id = secrets::new_id("sql_");
    record_access(
        &state,
        &caller.principal,
        "sql.call",
        &format!(
            "agent {id} sink {sink} operation {operation} call {call_id} idempotency_key {key:?}"
        ),
    )
    .await?;
    let answer = state.sql_calls.register(&call_id, &agent.id);
    let call = HubToAgent::SqlCall(SqlCall {
        call_id: call_id.clone(),
        sink: sink.clone(),
        operation: operation.clone(),
        values: request.values,
        idempotency_key: request.idempotency_key.clone(),
    });
    if session.outbox.send(call).await.is_err() {
        state.sql_calls.remove(&call_id);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_offline",
            format!("agent {id}'s session ended; nothing was sent (retry with the same idempotency key)"),
        ));
    }
    let outcome = match tokio::time::timeout(Duration::from_millis(timeout_ms), answer).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) | Err(_) => {
            state.sql_calls.remove(&call_id);
            tracing::warn!(agent_id = %id, sink, operation, call_id, "agent did not answer a SQL call in time");
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "agent_timeout",
                format!("agent {id} did not answer within {timeout_ms} ms; the call may or may not have run: retry with the same idempotency key to get its result"),
            ));
        }
    };
    let status = outcome_status(&outcome);
    tracing::info!(agent_id = %id, sink, operation, call_id, api_key = %caller.name, status, "SQL call answered");
    Ok(into_response(outcome))
}

fn outcome_status(outcome: &SqlOutcome) -> &'static str {
    match outcome {
        SqlOutcome::Done { .. } => "done",
        SqlOutcome::DatabaseError { .. } => "database_error",
        SqlOutcome::UnknownSink { .. } => "unknown_sink",
        SqlOutcome::UnknownOperation { .. } => "unknown_operation",
        SqlOutcome::InvalidValues { .. } => "invalid_values",
        SqlOutcome::KeyReused { .. } => "key_reused",
        SqlOutcome::OutcomeUnknown { .. } => "outcome_unknown",
        SqlOutcome::Unavailable { .. } => "database_unavailable",
    }
}

fn into_response(outcome: SqlOutcome) -> Response {
    let error = |status, code, message| ApiError::new(status, code, message).into_response();
    match outcome {
        SqlOutcome::Done {
            rows_affected,
            returned,
            replayed,
        } => Json(SqlCallResponse {
            rows_affected,
            returned,
            replayed,
        })
        .into_response(),
        SqlOutcome::DatabaseError {
            code,
            message,
            replayed,
        } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(SqlErrorBody {
                error: SqlDatabaseError { code, message },
                replayed,
            }),
        )
            .into_response(),
        SqlOutcome::UnknownSink { message } => {
            error(StatusCode::NOT_FOUND, "unknown_sink", message)
        }
        SqlOutcome::UnknownOperation { message, .. } => {
            error(StatusCode::NOT_FOUND, "unknown_operation", message)
        }
        SqlOutcome::InvalidValues { message } => {
            error(StatusCode::BAD_REQUEST, "invalid_values", message)
        }
        SqlOutcome::KeyReused { message } => {
            error(StatusCode::CONFLICT, "idempotency_key_reused", message)
        }
        SqlOutcome::OutcomeUnknown { message } => {
            error(StatusCode::CONFLICT, "outcome_unknown", message)
        }
        SqlOutcome::Unavailable { message } => {
            error(StatusCode::BAD_GATEWAY, "database_unavailable", message)
        }
    }
}
