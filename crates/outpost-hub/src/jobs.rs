//! Remote support on the hub: staff submit a job for one agent or a fan-out; the hub signs
//! one job per agent with its job key, releases them up to the rollout's concurrency, halts
//! the rest past its error threshold, and sends each down the agent's session, on whichever
//! hub process holds it (the jobs table is shared; PostgreSQL NOTIFY wakes the others).
//! Agents' updates and output come back through their session and are written in batches.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use outpost_proto::{HubToAgent, JobSpec, JobState, JobUpdate};
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::{JobChange, JobChunk, JobRecord, RolloutRecord, StaffRecord, Store};
use crate::{now_ms, secrets, HubError, HubState};

/// How often every hub process looks for work for its sessions that no notification
/// announced (a missed NOTIFY, a row written by hand).
const SWEEP: Duration = Duration::from_secs(1);
/// How often buffered updates and output are written.
const FLUSH: Duration = Duration::from_millis(50);
/// How often a rollout's controller looks at its jobs.
const CONTROL: Duration = Duration::from_millis(100);
/// How long the dispatcher waits for one session to take a message.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a job may live.
pub const MAX_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// Loads the job key every hub process over this store shares (made on first use).
pub async fn load_job_key(store: &dyn Store) -> Result<SigningKey, HubError> {
    let mut candidate = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut candidate);
    let seed = store.job_key_seed(&candidate).await?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The hub's job machinery: wake-ups for the dispatcher and buffered agent reports.
pub struct Jobs {
    wake: mpsc::Sender<String>,
    wake_rx: Mutex<Option<mpsc::Receiver<String>>>,
    pending: Mutex<Reports>,
    /// Cancels already sent per job, so a sweep does not send them again.
    cancels_sent: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct Reports {
    changes: Vec<JobChange>,
    chunks: Vec<(String, JobChunk)>,
}

impl Default for Jobs {
    fn default() -> Self {
        let (wake, wake_rx) = mpsc::channel(4096);
        Jobs {
            wake,
            wake_rx: Mutex::new(Some(wake_rx)),
            pending: Mutex::new(Reports::default()),
            cancels_sent: Mutex::new(HashSet::new()),
        }
    }
}

impl Jobs {
    /// Asks the dispatcher to look at an agent's jobs now.
    pub fn wake(&self, agent_id: &str) {
        let _ = self.wake.try_send(agent_id.to_owned());
    }

    /// Keeps an agent's job update until the next flush. Updates for jobs of other agents
    /// are dropped by the store (it matches the agent too).
    pub fn record_update(&self, agent_id: &str, update: JobUpdate) {
        let change = JobChange {
            id: update.dispatch_id,
            agent_id: agent_id.to_owned(),
            state: update.state.as_str().to_owned(),
            rule: update.rule.map(|text| bounded(&text, 200)),
            reason: update.reason.map(|text| bounded(&text, 2000)),
            summary: update.summary.map(|text| bounded(&text, 2000)),
            digest: update.digest.map(|text| bounded(&text, 128)),
            truncated: Some(update.truncated),
            approver: update.approver.map(|text| bounded(&text, 200)),
            at_ms: now_ms(),
        };
        if let Ok(mut pending) = self.pending.lock() {
            pending.changes.push(change);
        }
    }

    /// Keeps a piece of output from `agent_id` until the next flush.
    pub fn record_output(&self, agent_id: &str, dispatch_id: String, seq: u64, data: String) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.chunks.push((
                agent_id.to_owned(),
                JobChunk {
                    job_id: dispatch_id,
                    seq: seq as i64,
                    data,
                },
            ));
        }
    }
}

fn bounded(text: &str, max_chars: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect()
}

/// What a staff member asks for.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// The agents.
    pub agent_ids: Vec<String>,
    /// The capability.
    pub capability: String,
    /// Its arguments (an object).
    pub args: serde_json::Value,
    /// How long the job stays valid.
    pub expires_in: Duration,
    /// Jobs released and unfinished at once, at most.
    pub max_concurrency: u32,
    /// Halt after more than this many failures.
    pub error_threshold: Option<u32>,
}

/// Records a rollout and its signed jobs, and starts its controller.
pub async fn submit(
    state: &Arc<HubState>,
    staff: &StaffRecord,
    request: JobRequest,
) -> Result<(RolloutRecord, Vec<JobRecord>), HubError> {
    let now = now_ms();
    let expires_at_ms = now + request.expires_in.as_millis() as i64;
    let rollout = RolloutRecord {
        id: secrets::new_id("rol_"),
        staff: staff.name.clone(),
        capability: request.capability.clone(),
        max_concurrency: request.max_concurrency.max(1),
        error_threshold: request.error_threshold,
        state: "running".into(),
        created_at_ms: now,
        updated_at_ms: now,
    };
    let args_text = request.args.to_string();
    let jobs: Vec<JobRecord> = request
        .agent_ids
        .iter()
        .map(|agent_id| {
            let job_id = secrets::new_id("job_");
            let mut nonce = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            let spec = JobSpec {
                job_id: job_id.clone(),
                agent_id: agent_id.clone(),
                capability: request.capability.clone(),
                args: request.args.clone(),
                staff: staff.name.clone(),
                issued_at_ms: now,
                expires_at_ms,
                nonce: hex::encode(nonce),
            };
            let signed = outpost_proto::sign_job(&spec, &state.job_key);
            JobRecord {
                id: job_id,
                rollout_id: rollout.id.clone(),
                agent_id: agent_id.clone(),
                capability: request.capability.clone(),
                staff: staff.name.clone(),
                args: args_text.clone(),
                signed_job: signed.job,
                signature: signed.signature,
                state: JobState::Queued.as_str().into(),
                rule: None,
                reason: None,
                summary: None,
                digest: None,
                truncated: false,
                approver: None,
                cancel_requested: false,
                created_at_ms: now,
                expires_at_ms,
                updated_at_ms: now,
            }
        })
        .collect();
    state.store.insert_rollout(&rollout).await?;
    state.store.insert_jobs(&jobs).await?;
    tracing::info!(rollout_id = %rollout.id, staff = %staff.name, capability = %rollout.capability, agents = jobs.len(), "jobs submitted");
    tokio::spawn(control_rollout(state.clone(), rollout.clone()));
    Ok((rollout, jobs))
}

/// Takes up the rollouts left `running` by a hub process that stopped (its own, before a
/// restart, or another one over the same database): their controllers release the rest
/// and expire what outlived its expiry. Two hubs doing this at once is harmless: releasing
/// is atomic in the store and the other steps are idempotent.
pub async fn resume_rollouts(state: Arc<HubState>) {
    match state.store.running_rollouts().await {
        Ok(rollouts) => {
            for rollout in rollouts {
                tracing::info!(rollout_id = %rollout.id, "taking up a rollout still running");
                tokio::spawn(control_rollout(state.clone(), rollout));
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot read running rollouts"),
    }
}

/// Releases a rollout's jobs up to its concurrency, expires what outlived its expiry at
/// the hub, and halts the rest once failures pass the threshold.
async fn control_rollout(state: Arc<HubState>, rollout: RolloutRecord) {
    let mut interval = tokio::time::interval(CONTROL);
    let mut halted = false;
    loop {
        interval.tick().await;
        let jobs = match state.store.rollout_jobs(&rollout.id).await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::warn!(rollout_id = %rollout.id, error = %err, "cannot read the rollout's jobs");
                continue;
            }
        };
        let now = now_ms();
        let states: Vec<JobState> = jobs
            .iter()
            .map(|job| JobState::from_name(&job.state).unwrap_or(JobState::Failed))
            .collect();
        // Jobs that never reached a decision by their expiry: the agent was away.
        let stale: Vec<JobChange> = jobs
            .iter()
            .zip(&states)
            .filter(|(job, state)| {
                job.expires_at_ms <= now
                    && matches!(state, JobState::Queued | JobState::Pending | JobState::Sent)
            })
            .map(|(job, _)| JobChange {
                reason: Some("the agent did not take the job before it expired".into()),
                rule: Some("expiry".into()),
                ..change(job, JobState::Expired, now)
            })
            .collect();
        if !stale.is_empty() {
            let _ = state.store.update_jobs(&stale).await;
            continue;
        }
        let failures = states.iter().filter(|s| s.is_failure()).count() as u32;
        let queued = states.iter().filter(|s| **s == JobState::Queued).count();
        let in_flight = states
            .iter()
            .filter(|s| !s.is_final() && **s != JobState::Queued)
            .count();
        if !halted
            && rollout
                .error_threshold
                .is_some_and(|limit| failures > limit)
        {
            halted = true;
            let skipped: Vec<JobChange> = jobs
                .iter()
                .zip(&states)
                .filter(|(_, state)| **state == JobState::Queued)
                .map(|(job, _)| JobChange {
                    reason: Some(format!(
                        "the rollout halted: {failures} jobs failed, more than its error threshold"
                    )),
                    ..change(job, JobState::Skipped, now)
                })
                .collect();
            tracing::warn!(rollout_id = %rollout.id, failures, skipped = skipped.len(), "rollout halted at its error threshold");
            let _ = state.store.update_jobs(&skipped).await;
            let _ = state
                .store
                .set_rollout_state(&rollout.id, "halted", now)
                .await;
            continue;
        }
        if queued == 0 && in_flight == 0 {
            if !halted {
                let _ = state
                    .store
                    .set_rollout_state(&rollout.id, "done", now)
                    .await;
            }
            break;
        }
        let room = (rollout.max_concurrency as usize).saturating_sub(in_flight);
        if !halted && queued > 0 && room > 0 {
            match state.store.release_jobs(&rollout.id, room, now).await {
                Ok(released) => {
                    for job in released {
                        state.jobs.wake(&job.agent_id);
                    }
                }
                Err(err) => {
                    tracing::warn!(rollout_id = %rollout.id, error = %err, "cannot release jobs")
                }
            }
        }
    }
}

fn change(job: &JobRecord, state: JobState, now: i64) -> JobChange {
    JobChange {
        id: job.id.clone(),
        agent_id: job.agent_id.clone(),
        state: state.as_str().into(),
        rule: None,
        reason: None,
        summary: None,
        digest: None,
        truncated: None,
        approver: None,
        at_ms: now,
    }
}

/// Sends jobs (and cancellations) down the sessions this process holds: when woken for an
/// agent, on every sweep, and from the store's notifications of other hub processes.
pub async fn dispatch(state: Arc<HubState>, shutdown: CancellationToken) {
    let Some(mut wake) = state.jobs.wake_rx.lock().ok().and_then(|mut rx| rx.take()) else {
        return;
    };
    let mut notified = match state.store.listen_jobs().await {
        Ok(receiver) => receiver,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for jobs from other hub processes; sweeping only");
            None
        }
    };
    let mut sweep = tokio::time::interval(SWEEP);
    loop {
        let agents: Vec<String> = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(agent) = wake.recv() => {
                let mut agents = vec![agent];
                while let Ok(more) = wake.try_recv() {
                    agents.push(more);
                }
                agents
            }
            Some(agent) = async { match notified.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => vec![agent],
            _ = sweep.tick() => state.sessions.agent_ids(),
        };
        let local: Vec<String> = agents
            .into_iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|agent| state.sessions.get(agent).is_some())
            .collect();
        if !local.is_empty() {
            send_jobs(&state, &local, false).await;
        }
    }
}

/// Sends an agent's waiting jobs down its session (with `include_sent`, also those sent
/// on an earlier session that never answered).
pub async fn send_jobs(state: &HubState, agent_ids: &[String], include_sent: bool) {
    let now = now_ms();
    let jobs = match state.store.jobs_to_send(agent_ids, include_sent, now).await {
        Ok(jobs) => jobs,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read jobs to send");
            return;
        }
    };
    if !jobs.is_empty() {
        let sent: Vec<JobChange> = jobs
            .iter()
            .map(|job| change(job, JobState::Sent, now))
            .collect();
        if let Err(err) = state.store.update_jobs(&sent).await {
            tracing::warn!(error = %err, "cannot mark jobs sent");
            return;
        }
        for job in jobs {
            if let Some(session) = state.sessions.get(&job.agent_id) {
                let message = HubToAgent::Job {
                    dispatch_id: job.id,
                    job: job.signed_job,
                    signature: job.signature,
                };
                // One stuck session must not hold up every other agent's jobs; a job not
                // handed over stays `sent` and goes again with the agent's next session.
                if tokio::time::timeout(SEND_TIMEOUT, session.outbox.send(message))
                    .await
                    .is_err()
                {
                    tracing::warn!(agent_id = %job.agent_id, "the agent's session is not taking messages; its job goes with the next session");
                }
            }
        }
    }
    let cancels = match state.store.jobs_to_cancel(agent_ids).await {
        Ok(cancels) => cancels,
        Err(_) => return,
    };
    for job in cancels {
        let first = state
            .jobs
            .cancels_sent
            .lock()
            .map(|mut sent| sent.insert(job.id.clone()))
            .unwrap_or(false);
        if let (true, Some(session)) = (first, state.sessions.get(&job.agent_id)) {
            let _ = session
                .outbox
                .send(HubToAgent::CancelJob {
                    dispatch_id: job.id,
                })
                .await;
        }
    }
}

/// Writes buffered agent reports: output first, so a job is never final before its output
/// is stored.
pub async fn flush_reports(state: Arc<HubState>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(FLUSH);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = interval.tick() => false,
        };
        let reports = state
            .jobs
            .pending
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default();
        if !reports.chunks.is_empty() {
            let chunks = owned_chunks(&state, reports.chunks).await;
            if let Err(err) = state.store.append_job_output(&chunks).await {
                tracing::warn!(error = %err, chunks = chunks.len(), "cannot store job output");
            }
        }
        if !reports.changes.is_empty() {
            let finished: HashMap<String, ()> = reports
                .changes
                .iter()
                .filter(|c| JobState::from_name(&c.state).is_some_and(JobState::is_final))
                .map(|c| (c.id.clone(), ()))
                .collect();
            if let Err(err) = state.store.update_jobs(&reports.changes).await {
                tracing::warn!(error = %err, changes = reports.changes.len(), "cannot store job updates");
            }
            if let Ok(mut sent) = state.jobs.cancels_sent.lock() {
                sent.retain(|id| !finished.contains_key(id));
            }
        }
        if stopping {
            break;
        }
    }
}

/// The chunks whose job belongs to the agent that sent them.
async fn owned_chunks(state: &HubState, chunks: Vec<(String, JobChunk)>) -> Vec<JobChunk> {
    let mut owners: HashMap<String, Option<String>> = HashMap::new();
    let mut kept = Vec::with_capacity(chunks.len());
    for (agent_id, chunk) in chunks {
        if !owners.contains_key(&chunk.job_id) {
            let owner = match state.store.job(&chunk.job_id).await {
                Ok(job) => job.map(|job| job.agent_id),
                Err(_) => None,
            };
            owners.insert(chunk.job_id.clone(), owner);
        }
        if owners.get(&chunk.job_id).and_then(Option::as_deref) == Some(agent_id.as_str()) {
            kept.push(chunk);
        } else {
            tracing::warn!(agent_id, job_id = %chunk.job_id, "output for a job of another agent dropped");
        }
    }
    kept
}
