//! Remote support routes: submit jobs (staff tokens only), follow rollouts and output,
//! cancel, read an agent's mirrored audit trail, and the hub's access log.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{QueryRejection, StringRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_proto::JobState;
use serde::{Deserialize, Serialize};

use crate::api::{body_error, not_found, record_access, ApiError};
use crate::jobs::{JobRequest, MAX_EXPIRY};
use crate::store::{
    AccessRecord, JobChunk, JobRecord, MirrorState, MirroredLine, RolloutRecord, StaffRecord,
};
use crate::{now_ms, secrets, HubState};

/// The longest a request waits for new output.
const MAX_WAIT_SECS: u64 = 30;
/// Agents one submission may name, at most.
const MAX_AGENTS: usize = 100_000;

pub(crate) fn routes() -> Router<Arc<HubState>> {
    Router::new()
        .route("/api/v1/jobs", post(submit))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/output", get(job_output))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/rollouts/{id}", get(get_rollout))
        .route("/api/v1/agents/{id}/jobs", get(agent_jobs))
        .route("/api/v1/agents/{id}/audit", get(agent_audit))
        .route("/api/v1/access-log", get(access_log))
        .route("/api/v1/whoami", get(whoami))
}

/// A staff member authenticated by their personal token (`Authorization: Bearer ops_…`,
/// or the dashboard's cookie).
pub struct StaffCaller(pub StaffRecord);

impl FromRequestParts<Arc<HubState>> for StaffCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<HubState>,
    ) -> Result<Self, Self::Rejection> {
        let token = crate::api::presented_secret(parts).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_staff_token",
                "send your staff token as `Authorization: Bearer <token>` (made with `outpost hub staff add`)",
            )
        })?;
        match state
            .store
            .staff_by_token(&secrets::hash_secret(&token))
            .await?
        {
            Some(staff) => Ok(StaffCaller(staff)),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_staff_token",
                "this is not a valid staff token (unknown or disabled; API keys cannot run jobs)",
            )),
        }
    }
}

/// Body of `POST /api/v1/jobs`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// Agent ids; or use `selector`.
    #[serde(default)]
    agents: Vec<String>,
    /// `all`, `online`, or `name:PATTERN` (`*` matches any run of characters).
    #[serde(default)]
    selector: Option<String>,
    /// The capability, e.g. `health`.
    capability: String,
    /// Its arguments (an object).
    #[serde(default)]
    #[schema(value_type = Object)]
    args: Option<serde_json::Value>,
    /// Seconds the job stays valid (default 600, at most 86400).
    #[serde(default)]
    expires_in_secs: Option<u64>,
    /// Jobs released and unfinished at once (default 50).
    #[serde(default)]
    max_concurrency: Option<u32>,
    /// Halt the rollout once more than this many jobs failed (default: never).
    #[serde(default)]
    error_threshold: Option<u32>,
}

/// A rollout with its jobs.
#[derive(Serialize, utoipa::ToSchema)]
pub struct RolloutView {
    rollout: RolloutRecord,
    jobs: Vec<JobRecord>,
    /// Jobs per state.
    #[schema(value_type = Object)]
    counts: std::collections::BTreeMap<String, usize>,
    /// Whether every job is final.
    finished: bool,
}

fn rollout_view(rollout: RolloutRecord, jobs: Vec<JobRecord>) -> RolloutView {
    let mut counts = std::collections::BTreeMap::new();
    for job in &jobs {
        *counts.entry(job.state.clone()).or_insert(0) += 1;
    }
    let finished = jobs
        .iter()
        .all(|job| JobState::from_name(&job.state).is_some_and(JobState::is_final));
    RolloutView {
        rollout,
        jobs,
        counts,
        finished,
    }
}

/// Submits a job to one or many agents; the hub signs one job per agent.
#[utoipa::path(post, path = "/api/v1/jobs", request_body = SubmitRequest, responses((status = 201, body = RolloutView), (status = 400, body = Object), (status = 401, body = Object)), security(("staff_token" = [])))]
pub(crate) async fn submit(
    StaffCaller(staff): StaffCaller,
    State(state): State<Arc<HubState>>,
    body: Result<String, StringRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let body = body.map_err(body_error)?;
    let request: SubmitRequest = serde_json::from_str(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid job request: {err}"),
        )
    })?;
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message);
    let capability = request.capability.trim().to_owned();
    if capability.is_empty()
        || capability.len() > 64
        || !capability
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
    {
        return Err(bad(
            "capability must be a name like `health` or `files.read`".into(),
        ));
    }
    let args = request.args.unwrap_or_else(|| serde_json::json!({}));
    if !args.is_object() {
        return Err(bad("args must be a JSON object".into()));
    }
    let expires_in = Duration::from_secs(request.expires_in_secs.unwrap_or(600));
    if expires_in.is_zero() || expires_in > MAX_EXPIRY {
        return Err(bad("expires_in_secs must be 1 to 86400".into()));
    }
    let agents = state.store.agents().await?;
    let live = |agent: &crate::store::AgentRecord| agent.revoked_at_ms.is_none();
    let agent_ids: Vec<String> = match (&request.selector, request.agents.is_empty()) {
        (Some(_), false) => return Err(bad("give `agents` or `selector`, not both".into())),
        (None, true) => return Err(bad("give `agents` (ids) or a `selector`".into())),
        (None, false) => {
            for id in &request.agents {
                if !agents.iter().any(|a| &a.id == id && live(a)) {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "unknown_agent",
                        format!("no enrolled, unrevoked agent {id:?}"),
                    ));
                }
            }
            // Each agent once, in the order given.
            let mut seen = std::collections::HashSet::new();
            request
                .agents
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .cloned()
                .collect()
        }
        (Some(selector), true) => {
            let selector = selector.trim();
            let matched: Vec<String> = if selector == "all" {
                agents
                    .iter()
                    .filter(|a| live(a))
                    .map(|a| a.id.clone())
                    .collect()
            } else if selector == "online" {
                agents
                    .iter()
                    .filter(|a| live(a) && crate::monitor::is_online(&state, a))
                    .map(|a| a.id.clone())
                    .collect()
            } else if let Some(pattern) = selector.strip_prefix("name:") {
                agents
                    .iter()
                    .filter(|a| live(a) && glob_matches(pattern, &a.name))
                    .map(|a| a.id.clone())
                    .collect()
            } else {
                return Err(bad(format!(
                    "selector {selector:?}: expected `all`, `online` or `name:PATTERN`"
                )));
            };
            if matched.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "no_agents",
                    format!("selector {selector:?} matches no enrolled agent"),
                ));
            }
            matched
        }
    };
    if agent_ids.len() > MAX_AGENTS {
        return Err(bad(format!("at most {MAX_AGENTS} agents per submission")));
    }
    let request = JobRequest {
        agent_ids,
        capability,
        args,
        expires_in,
        max_concurrency: request.max_concurrency.unwrap_or(50).max(1),
        error_threshold: request.error_threshold,
    };
    let (rollout, jobs) = crate::jobs::submit(&state, &staff, request).await?;
    Ok((StatusCode::CREATED, Json(rollout_view(rollout, jobs))))
}

/// `*` matches any run of characters; everything else literally.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (index, part) in parts.iter().enumerate() {
        if index == 0 {
            let Some(after) = rest.strip_prefix(part) else {
                return false;
            };
            rest = after;
        } else if index == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(at) = rest.find(part) {
            rest = &rest[at + part.len()..];
        } else {
            return false;
        }
    }
    true
}

/// A rollout and its jobs.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", params(("id" = String, Path)), responses((status = 200, body = RolloutView)), security(("staff_token" = [])))]
pub(crate) async fn get_rollout(
    _staff: StaffCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    let rollout = state
        .store
        .rollout(&id)
        .await?
        .ok_or_else(|| not_found("rollout", &id))?;
    let jobs = state.store.rollout_jobs(&id).await?;
    Ok(Json(rollout_view(rollout, jobs)))
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path)), responses((status = 200, body = JobRecord)), security(("staff_token" = [])))]
pub(crate) async fn get_job(
    _staff: StaffCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    let job = state
        .store
        .job(&id)
        .await?
        .ok_or_else(|| not_found("job", &id))?;
    Ok(Json(job))
}

/// Query of `GET /api/v1/jobs/{id}/output`.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct OutputQuery {
    /// The last piece seen (0: from the start).
    #[serde(default)]
    after: i64,
    /// Wait up to this many seconds (max 30) for more output or the job's end.
    #[serde(default)]
    wait: u64,
}

/// Output pieces and the job's state.
#[derive(Serialize, utoipa::ToSchema)]
pub struct OutputPage {
    job: JobRecord,
    chunks: Vec<JobChunk>,
    /// Pass as `after` next time.
    next: i64,
}

/// A job's output after a piece, waiting for more (long-poll). Recorded in the access log:
/// output may hold PHI (log lines, files, HL7 messages).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/output", params(("id" = String, Path), OutputQuery), responses((status = 200, body = OutputPage)), security(("staff_token" = [])))]
pub(crate) async fn job_output(
    StaffCaller(staff): StaffCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
    query: Result<Query<OutputQuery>, QueryRejection>,
) -> Result<Json<OutputPage>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(query.wait.min(MAX_WAIT_SECS));
    let mut recorded = false;
    loop {
        let job = state
            .store
            .job(&id)
            .await?
            .ok_or_else(|| not_found("job", &id))?;
        let chunks = state.store.job_output(&id, query.after, 256).await?;
        let is_final = JobState::from_name(&job.state).is_some_and(JobState::is_final);
        if !chunks.is_empty() && !recorded {
            record_access(&state, &format!("staff:{}", staff.name), "job.output", &id).await?;
            recorded = true;
        }
        if !chunks.is_empty() || is_final || tokio::time::Instant::now() >= deadline {
            let next = chunks.last().map_or(query.after, |chunk| chunk.seq);
            return Ok(Json(OutputPage { job, chunks, next }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the agent to stop a job that is running or waiting for approval.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", params(("id" = String, Path)), responses((status = 202, body = Object), (status = 409, body = Object)), security(("staff_token" = [])))]
pub(crate) async fn cancel_job(
    StaffCaller(staff): StaffCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let job = state
        .store
        .job(&id)
        .await?
        .ok_or_else(|| not_found("job", &id))?;
    if !state.store.request_cancel(&id, now_ms()).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_final",
            format!("job {id} has already ended ({})", job.state),
        ));
    }
    tracing::info!(job_id = %id, staff = %staff.name, "job cancel requested");
    state.jobs.wake(&job.agent_id);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"job_id": id, "cancel_requested": true})),
    ))
}

/// Query with a limit.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct LimitQuery {
    /// At most this many (default 100, at most 1000).
    #[serde(default)]
    limit: Option<usize>,
}

fn limit_of(query: Result<Query<LimitQuery>, QueryRejection>) -> Result<usize, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    })?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_limit",
            "limit must be 1 to 1000",
        ));
    }
    Ok(limit)
}

/// An agent's newest jobs.
#[utoipa::path(get, path = "/api/v1/agents/{id}/jobs", params(("id" = String, Path), LimitQuery), responses((status = 200, body = [JobRecord])), security(("staff_token" = [])))]
pub(crate) async fn agent_jobs(
    _staff: StaffCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
    query: Result<Query<LimitQuery>, QueryRejection>,
) -> Result<Json<Vec<JobRecord>>, ApiError> {
    let limit = limit_of(query)?;
    Ok(Json(state.store.recent_jobs(&id, limit).await?))
}

/// An agent's mirrored audit trail.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AuditTrail {
    mirror: MirrorState,
    /// Newest first.
    lines: Vec<MirroredLine>,
}

/// An agent's mirrored audit trail, newest first, and any gap or fork found. Recorded in
/// the access log.
#[utoipa::path(get, path = "/api/v1/agents/{id}/audit", params(("id" = String, Path), LimitQuery), responses((status = 200, body = AuditTrail)), security(("staff_token" = [])))]
pub(crate) async fn agent_audit(
    StaffCaller(staff): StaffCaller,
    State(state): State<Arc<HubState>>,
    Path(id): Path<String>,
    query: Result<Query<LimitQuery>, QueryRejection>,
) -> Result<Json<AuditTrail>, ApiError> {
    let limit = limit_of(query)?;
    state
        .store
        .agent(&id)
        .await?
        .ok_or_else(|| not_found("agent", &id))?;
    record_access(&state, &format!("staff:{}", staff.name), "audit.trail", &id).await?;
    Ok(Json(AuditTrail {
        mirror: state.store.mirror_state(&id).await?,
        lines: state.store.audit_lines(&id, limit).await?,
    }))
}

/// Who looked at PHI or audit trails on this hub (admins only).
#[utoipa::path(get, path = "/api/v1/access-log", params(LimitQuery), responses((status = 200, body = [AccessRecord]), (status = 403, body = Object)), security(("staff_token" = [])))]
pub(crate) async fn access_log(
    StaffCaller(staff): StaffCaller,
    State(state): State<Arc<HubState>>,
    query: Result<Query<LimitQuery>, QueryRejection>,
) -> Result<Json<Vec<AccessRecord>>, ApiError> {
    if staff.role != "admin" {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            "the access log is for staff with the admin role",
        ));
    }
    let limit = limit_of(query)?;
    Ok(Json(state.store.access_log(limit).await?))
}

/// The staff member behind the token.
#[utoipa::path(get, path = "/api/v1/whoami", responses((status = 200, body = StaffRecord)), security(("staff_token" = [])))]
pub(crate) async fn whoami(StaffCaller(staff): StaffCaller) -> Json<StaffRecord> {
    Json(staff)
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn globs_match_literally_except_stars() {
        assert!(glob_matches("clinic-*", "clinic-north"));
        assert!(glob_matches("*north", "clinic-north"));
        assert!(glob_matches("c*n*h", "clinic-north"));
        assert!(!glob_matches("clinic-*", "lab-north"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exact2"));
        assert!(!glob_matches("a_c", "abc"));
    }
}
