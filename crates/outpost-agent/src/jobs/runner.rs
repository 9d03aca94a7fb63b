//! The job runner: one task per agent that takes signed jobs from the hub, checks them,
//! asks the policy, records the decision in the audit log (before anything runs), and
//! runs allowed and approved jobs on their capability, streaming output back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{SigningKey, VerifyingKey};
use outpost_audit::{events, AuditEntry};
use outpost_policy::{Capability, Decision, Policy, Request};
use outpost_proto::{AgentToHub, JobSpec, JobState, JobUpdate, SignedJob};
use outpost_uplink::UplinkHandle;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::jobs::approvals::{Approvals, WaitingJob};
use crate::jobs::audit::{self, AuditWriter};
use crate::jobs::capabilities::registry;
use crate::jobs::capability::{CapabilityHandler, JobContext, JobInput, Output, MAX_OUTPUT_BYTES};
use crate::jobs::gate::Gate;
use crate::AgentError;

/// How often waiting approvals, expiries and the policy file are looked at.
const TICK: Duration = Duration::from_millis(500);
/// Delivery ids remembered against redelivery, at most (a replay is still refused by its
/// nonce).
const MAX_REMEMBERED_DISPATCHES: usize = 100_000;
/// The policy and config files are checked for changes every this many ticks.
const FILE_CHECK_TICKS: u32 = 4;

/// What the runner needs to know about its agent.
pub struct RunnerSettings {
    /// The agent's id.
    pub agent_id: String,
    /// The agent's key, which signs its audit entries.
    pub agent_key: SigningKey,
    /// The hub's job key pinned at enrollment.
    pub job_key: Option<VerifyingKey>,
    /// Where `audit.jsonl` and `approvals.db` live.
    pub data_dir: PathBuf,
    /// The practice's policy file (None: every job is refused).
    pub policy_path: Option<PathBuf>,
    /// The agent's config file, whose changes are audited.
    pub config_path: Option<PathBuf>,
    /// Jobs running at once, at most.
    pub max_concurrent: usize,
}

/// A message for the runner.
#[derive(Debug)]
pub enum RunnerMessage {
    /// A job from the hub.
    Job {
        /// The hub's delivery id.
        dispatch_id: String,
        /// The job, unchecked.
        job: SignedJob,
    },
    /// The hub cancels a job.
    Cancel {
        /// The delivery.
        dispatch_id: String,
    },
}

/// The runner's handle: where to send jobs, and the audit log it writes.
#[derive(Clone)]
pub struct RunnerHandle {
    /// Jobs and cancellations from the hub.
    pub messages: mpsc::Sender<RunnerMessage>,
    /// The audit log (for the mirror to the hub).
    pub audit: AuditWriter,
}

/// Starts the runner for one agent.
pub fn start(
    settings: RunnerSettings,
    cx: JobContext,
    uplink: UplinkHandle,
    shutdown: CancellationToken,
) -> Result<RunnerHandle, AgentError> {
    let audit_path = settings.data_dir.join(audit::AUDIT_FILE);
    let audit = AuditWriter::open(&audit_path, &settings.agent_id, settings.agent_key.clone())?;
    let now = now_ms();
    let recovered = audit::recover(&audit_path, now);
    let mut gate = Gate::new(&settings.agent_id, settings.job_key);
    for (nonce, expires) in &recovered.nonces {
        gate.remember(nonce, *expires);
    }
    let approvals = Approvals::open(&settings.data_dir)?;
    let waiting = approvals.in_state("waiting")?.len()
        + approvals.in_state("approved")?.len()
        + approvals.in_state("denied")?.len();
    let handlers = registry()
        .into_iter()
        .map(|handler| (handler.capability(), handler))
        .collect();
    let (messages, inbox) = mpsc::channel(256);
    let runner = Runner {
        gate,
        policy: PolicyState::default(),
        policy_path: settings.policy_path,
        config_path: settings.config_path,
        last_config_digest: recovered.config_digest,
        recorded_policy_digest: recovered.policy_digest,
        approvals,
        waiting,
        handlers,
        running: HashMap::new(),
        taken: std::collections::HashSet::new(),
        slots: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
        shared: Arc::new(Shared {
            cx,
            uplink,
            audit: audit.clone(),
        }),
        shutdown,
    };
    tokio::spawn(runner.run(inbox));
    Ok(RunnerHandle { messages, audit })
}

/// What every job task shares.
struct Shared {
    cx: JobContext,
    uplink: UplinkHandle,
    audit: AuditWriter,
}

#[derive(Default)]
struct PolicyState {
    policy: Option<Arc<Policy>>,
    /// Why there is no policy (none configured, unreadable).
    missing: Option<String>,
    /// The file's modification time when it was last read.
    modified: Option<std::time::SystemTime>,
}

struct Runner {
    gate: Gate,
    policy: PolicyState,
    policy_path: Option<PathBuf>,
    config_path: Option<PathBuf>,
    last_config_digest: Option<String>,
    recorded_policy_digest: Option<String>,
    approvals: Approvals,
    /// Jobs in the approvals file not yet settled; polling stops when there are none.
    waiting: usize,
    handlers: HashMap<Capability, Arc<dyn CapabilityHandler>>,
    running: HashMap<String, CancellationToken>,
    /// Deliveries taken by this process, so a redelivery is not mistaken for a replay.
    taken: std::collections::HashSet<String>,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

/// A job that passed the gate and the policy (and approval, if it needed one).
struct Cleared {
    dispatch_id: String,
    spec: JobSpec,
    handler: Arc<dyn CapabilityHandler>,
    policy: Arc<Policy>,
    approver: Option<String>,
    /// The policy rule that allowed it (None after an approval: the waiting rule stands).
    rule: Option<String>,
}

impl Runner {
    async fn run(mut self, mut inbox: mpsc::Receiver<RunnerMessage>) {
        self.check_files(true).await;
        let (finished_tx, mut finished) = mpsc::channel::<String>(64);
        let mut tick = tokio::time::interval(TICK);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                message = inbox.recv() => match message {
                    Some(RunnerMessage::Job { dispatch_id, job }) => {
                        // The hub sends a job again when a session broke before the agent's
                        // first report reached it; this process already has it.
                        if !self.taken.insert(dispatch_id.clone()) {
                            tracing::debug!(dispatch_id, "job delivered again; already taken");
                            continue;
                        }
                        if self.taken.len() > MAX_REMEMBERED_DISPATCHES {
                            self.taken.clear();
                            self.taken.insert(dispatch_id.clone());
                        }
                        if let Some(cleared) = self.take(dispatch_id, job).await {
                            self.launch(cleared, finished_tx.clone()).await;
                        }
                    }
                    Some(RunnerMessage::Cancel { dispatch_id }) => self.cancel(&dispatch_id).await,
                    None => break,
                },
                Some(done) = finished.recv() => {
                    self.running.remove(&done);
                }
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    let now = now_ms();
                    self.gate.prune(now);
                    if self.waiting > 0 {
                        for cleared in self.poll_approvals(now).await {
                            self.launch(cleared, finished_tx.clone()).await;
                        }
                    }
                    if ticks.is_multiple_of(FILE_CHECK_TICKS) {
                        self.check_files(false).await;
                    }
                }
            }
        }
        for cancel in self.running.values() {
            cancel.cancel();
        }
    }

    /// Checks a job and decides on it; returns it when it may run now.
    async fn take(&mut self, dispatch_id: String, signed: SignedJob) -> Option<Cleared> {
        let now = now_ms();
        let spec = match self.gate.check(&signed, now) {
            Ok(spec) => spec,
            Err(refusal) => {
                let job_id = refusal
                    .job
                    .as_ref()
                    .map(|job| job.job_id.clone())
                    .or_else(|| outpost_proto::claimed_job_id(&signed.job));
                tracing::warn!(dispatch_id, rule = refusal.rule, reason = %refusal.reason, "job refused");
                let entry = AuditEntry {
                    job_id: job_id.clone(),
                    staff: refusal.job.as_ref().map(|job| job.staff.clone()),
                    capability: refusal.job.as_ref().map(|job| job.capability.clone()),
                    args_digest: refusal.job.as_ref().map(|job| job.args_digest()),
                    decision: Some(outpost_audit::Decision::Refused),
                    rule: Some(refusal.rule.to_owned()),
                    detail: Some(refusal.reason.clone()),
                    ..AuditEntry::new(events::JOB_DECIDED)
                };
                let _ = self.shared.audit.append(entry).await;
                self.shared
                    .report(JobUpdate {
                        job_id,
                        rule: Some(refusal.rule.to_owned()),
                        reason: Some(refusal.reason),
                        ..update(&dispatch_id, JobState::Refused)
                    })
                    .await;
                return None;
            }
        };
        let (decision, handler, policy) = self.decide(&spec, now);
        let nonce_detail = format!("nonce={} expires_at_ms={}", spec.nonce, spec.expires_at_ms);
        let (audit_decision, rule, reason) = match &decision {
            Decision::Allowed { rule } => (outpost_audit::Decision::Allowed, rule.clone(), None),
            Decision::AwaitingApproval { rule } => (
                outpost_audit::Decision::AwaitingApproval,
                rule.clone(),
                None,
            ),
            Decision::Refused { rule, reason } => (
                outpost_audit::Decision::Refused,
                rule.clone(),
                Some(reason.clone()),
            ),
        };
        let entry = AuditEntry {
            staff: Some(spec.staff.clone()),
            job_id: Some(spec.job_id.clone()),
            capability: Some(spec.capability.clone()),
            args_digest: Some(spec.args_digest()),
            decision: Some(audit_decision),
            rule: Some(rule.clone()),
            detail: Some(match &reason {
                Some(reason) => format!("{nonce_detail} reason: {reason}"),
                None => nonce_detail,
            }),
            ..AuditEntry::new(events::JOB_DECIDED)
        };
        if let Err(err) = self.shared.audit.append(entry).await {
            // Nothing runs that the log cannot record.
            tracing::error!(error = %err, job_id = %spec.job_id, "cannot write the audit log; refusing the job");
            self.shared
                .report(JobUpdate {
                    job_id: Some(spec.job_id.clone()),
                    rule: Some("audit-unavailable".into()),
                    reason: Some(format!("the agent cannot write its audit log: {err}")),
                    ..update(&dispatch_id, JobState::Refused)
                })
                .await;
            return None;
        }
        tracing::info!(job_id = %spec.job_id, capability = %spec.capability, staff = %spec.staff, rule, "job decided");
        match (decision, handler, policy) {
            (Decision::Allowed { rule }, Some(handler), Some(policy)) => Some(Cleared {
                dispatch_id,
                spec,
                handler,
                policy,
                approver: None,
                rule: Some(rule),
            }),
            (Decision::AwaitingApproval { rule }, Some(_), Some(_)) => {
                let waiting = WaitingJob {
                    dispatch_id: dispatch_id.clone(),
                    job_id: spec.job_id.clone(),
                    staff: spec.staff.clone(),
                    capability: spec.capability.clone(),
                    args: spec.args.to_string(),
                    job: signed.job,
                    signature: signed.signature,
                    rule: rule.clone(),
                    requested_at_ms: now,
                    expires_at_ms: spec.expires_at_ms,
                    state: "waiting".into(),
                    decided_by: None,
                    reason: None,
                };
                let state = match self.approvals.add(&waiting) {
                    Ok(()) => {
                        self.waiting += 1;
                        JobState::AwaitingApproval
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "cannot record a job waiting for approval");
                        JobState::Failed
                    }
                };
                self.shared
                    .report(JobUpdate {
                        job_id: Some(spec.job_id),
                        rule: Some(rule),
                        reason: Some(
                            "waiting for a local approval: `outpost approvals list` on the agent"
                                .into(),
                        ),
                        ..update(&dispatch_id, state)
                    })
                    .await;
                None
            }
            _ => {
                self.shared
                    .report(JobUpdate {
                        job_id: Some(spec.job_id),
                        rule: Some(rule),
                        reason,
                        ..update(&dispatch_id, JobState::Refused)
                    })
                    .await;
                None
            }
        }
    }

    /// The policy's decision, with the handler and policy to run it when not refused.
    fn decide(
        &self,
        spec: &JobSpec,
        now: i64,
    ) -> (
        Decision,
        Option<Arc<dyn CapabilityHandler>>,
        Option<Arc<Policy>>,
    ) {
        let Some(policy) = self.policy.policy.clone() else {
            let reason = self
                .policy
                .missing
                .clone()
                .unwrap_or_else(|| "no policy is loaded".into());
            return (
                Decision::Refused {
                    rule: "no-policy".into(),
                    reason,
                },
                None,
                None,
            );
        };
        let timestamp =
            jiff::Timestamp::from_millisecond(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let decision = policy.decide(&Request {
            capability: &spec.capability,
            args: &spec.args,
            now: timestamp,
        });
        if let Decision::Refused { .. } = decision {
            return (decision, None, None);
        }
        let handler = Capability::from_name(&spec.capability)
            .and_then(|capability| self.handlers.get(&capability).cloned());
        let Some(handler) = handler else {
            return (
                Decision::Refused {
                    rule: "not-implemented".into(),
                    reason: format!(
                        "this agent version cannot run `{}`",
                        spec.capability.chars().take(64).collect::<String>()
                    ),
                },
                None,
                None,
            );
        };
        let decision = match decision {
            Decision::Allowed { .. } if handler.always_needs_approval() => {
                Decision::AwaitingApproval {
                    rule: format!("{} always needs local approval", spec.capability),
                }
            }
            other => other,
        };
        (decision, Some(handler), Some(policy))
    }

    async fn launch(&mut self, cleared: Cleared, finished: mpsc::Sender<String>) {
        let cancel = self.shutdown.child_token();
        self.running
            .insert(cleared.dispatch_id.clone(), cancel.clone());
        let shared = self.shared.clone();
        let slots = self.slots.clone();
        tokio::spawn(async move {
            let dispatch_id = cleared.dispatch_id.clone();
            let _slot = slots.acquire_owned().await;
            shared.run_job(cleared, cancel).await;
            let _ = finished.send(dispatch_id).await;
        });
    }

    async fn cancel(&mut self, dispatch_id: &str) {
        if let Some(cancel) = self.running.get(dispatch_id) {
            cancel.cancel();
            return;
        }
        if let Ok(true) = self.approvals.settle(dispatch_id, "waiting", "cancelled") {
            self.waiting = self.waiting.saturating_sub(1);
            let entry = AuditEntry {
                detail: Some(format!(
                    "dispatch {dispatch_id} cancelled by the hub while waiting for approval"
                )),
                ..AuditEntry::new("job.cancelled")
            };
            let _ = self.shared.audit.append(entry).await;
            self.shared
                .report(update(dispatch_id, JobState::Cancelled))
                .await;
        }
    }

    /// Takes approvals and denials made with `outpost approvals`, and expires what waited
    /// too long.
    async fn poll_approvals(&mut self, now: i64) -> Vec<Cleared> {
        let mut cleared = Vec::new();
        let (approved, denied, waiting) = match (
            self.approvals.in_state("approved"),
            self.approvals.in_state("denied"),
            self.approvals.in_state("waiting"),
        ) {
            (Ok(a), Ok(d), Ok(w)) => (a, d, w),
            _ => return cleared,
        };
        for job in denied {
            if !matches!(
                self.approvals.settle(&job.dispatch_id, "denied", "taken"),
                Ok(true)
            ) {
                continue;
            }
            let entry = AuditEntry {
                staff: Some(job.staff.clone()),
                job_id: Some(job.job_id.clone()),
                capability: Some(job.capability.clone()),
                approver: job.decided_by.clone(),
                detail: job.reason.clone(),
                ..AuditEntry::new(events::JOB_DENIED)
            };
            let _ = self.shared.audit.append(entry).await;
            self.shared
                .report(JobUpdate {
                    job_id: Some(job.job_id.clone()),
                    approver: job.decided_by.clone(),
                    reason: Some(match &job.reason {
                        Some(reason) => format!("denied at the practice: {reason}"),
                        None => "denied at the practice".into(),
                    }),
                    ..update(&job.dispatch_id, JobState::Denied)
                })
                .await;
        }
        for job in approved {
            if !matches!(
                self.approvals.settle(&job.dispatch_id, "approved", "taken"),
                Ok(true)
            ) {
                continue;
            }
            let approver = job.decided_by.clone();
            let entry = AuditEntry {
                staff: Some(job.staff.clone()),
                job_id: Some(job.job_id.clone()),
                capability: Some(job.capability.clone()),
                approver: approver.clone(),
                ..AuditEntry::new(events::JOB_APPROVED)
            };
            if self.shared.audit.append(entry).await.is_err() {
                self.shared
                    .report(JobUpdate {
                        rule: Some("audit-unavailable".into()),
                        ..update(&job.dispatch_id, JobState::Refused)
                    })
                    .await;
                continue;
            }
            match self.clear_approved(&job, now) {
                Ok(mut ready) => {
                    ready.approver = approver;
                    cleared.push(ready);
                }
                Err((state, rule, reason)) => {
                    self.shared
                        .report(JobUpdate {
                            job_id: Some(job.job_id.clone()),
                            rule: Some(rule),
                            reason: Some(reason),
                            approver,
                            ..update(&job.dispatch_id, state)
                        })
                        .await;
                }
            }
        }
        for job in waiting.into_iter().filter(|job| job.expires_at_ms <= now) {
            if !matches!(
                self.approvals
                    .settle(&job.dispatch_id, "waiting", "expired"),
                Ok(true)
            ) {
                continue;
            }
            let entry = AuditEntry {
                staff: Some(job.staff.clone()),
                job_id: Some(job.job_id.clone()),
                capability: Some(job.capability.clone()),
                detail: Some("nobody approved it before it expired".into()),
                ..AuditEntry::new("job.expired")
            };
            let _ = self.shared.audit.append(entry).await;
            self.shared
                .report(JobUpdate {
                    job_id: Some(job.job_id.clone()),
                    rule: Some("expiry".into()),
                    reason: Some("nobody approved it at the practice before it expired".into()),
                    ..update(&job.dispatch_id, JobState::Expired)
                })
                .await;
        }
        self.waiting = self
            .approvals
            .in_state("waiting")
            .map(|w| w.len())
            .unwrap_or(0)
            + self
                .approvals
                .in_state("approved")
                .map(|w| w.len())
                .unwrap_or(0)
            + self
                .approvals
                .in_state("denied")
                .map(|w| w.len())
                .unwrap_or(0);
        cleared
    }

    /// An approved job runs if it has not expired and the policy (which may have changed
    /// while it waited) still does not refuse it.
    fn clear_approved(
        &self,
        job: &WaitingJob,
        now: i64,
    ) -> Result<Cleared, (JobState, String, String)> {
        let spec: JobSpec = serde_json::from_str(&job.job).map_err(|err| {
            (
                JobState::Failed,
                "approvals".to_owned(),
                format!("the stored job is unreadable: {err}"),
            )
        })?;
        if spec.expires_at_ms <= now {
            return Err((
                JobState::Expired,
                "expiry".into(),
                "approved after the job expired".into(),
            ));
        }
        match self.decide(&spec, now) {
            (Decision::Refused { rule, reason }, _, _) => Err((JobState::Refused, rule, reason)),
            (_, Some(handler), Some(policy)) => Ok(Cleared {
                dispatch_id: job.dispatch_id.clone(),
                spec,
                handler,
                policy,
                approver: None,
                rule: None,
            }),
            _ => Err((
                JobState::Refused,
                "no-policy".into(),
                "no policy is loaded".into(),
            )),
        }
    }

    /// Loads the policy when it changed, and records policy and config changes.
    async fn check_files(&mut self, at_start: bool) {
        if let Some(path) = self.policy_path.clone() {
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if at_start || modified != self.policy.modified {
                self.policy.modified = modified;
                let (digest_detail, loaded) = match Policy::load(&path) {
                    Ok(policy) => {
                        let digest = policy.digest();
                        (
                            Some(format!("digest={digest} path={}", path.display())),
                            Ok((Arc::new(policy), digest)),
                        )
                    }
                    Err(err) => (None, Err(err.to_string())),
                };
                match loaded {
                    Ok((policy, digest)) => {
                        self.policy.policy = Some(policy);
                        self.policy.missing = None;
                        if self.recorded_policy_digest.as_deref() != Some(digest.as_str()) {
                            tracing::info!(path = %path.display(), "support policy loaded (changed)");
                            self.recorded_policy_digest = Some(digest);
                            let entry = AuditEntry {
                                detail: digest_detail,
                                ..AuditEntry::new(events::POLICY_CHANGED)
                            };
                            let _ = self.shared.audit.append(entry).await;
                        }
                    }
                    Err(problem) => {
                        // A policy that does not load refuses everything: a typo must never
                        // leave the older, possibly wider policy in force.
                        tracing::error!(problem, "the support policy cannot be loaded; every job is refused until it is fixed");
                        self.policy.policy = None;
                        self.policy.missing = Some(format!("the policy does not load: {problem}"));
                        let detail = format!("invalid path={} error: {problem}", path.display());
                        if self.recorded_policy_digest.as_deref() != Some("invalid") {
                            self.recorded_policy_digest = Some("invalid".into());
                            let entry = AuditEntry {
                                detail: Some(detail),
                                ..AuditEntry::new(events::POLICY_CHANGED)
                            };
                            let _ = self.shared.audit.append(entry).await;
                        }
                    }
                }
            }
        } else if at_start {
            self.policy.missing =
                Some("the agent config names no `policy` file, so every job is refused".into());
        }
        if let Some(path) = self.config_path.clone() {
            if let Ok(bytes) = std::fs::read(&path) {
                let digest = hex::encode(Sha256::digest(&bytes));
                if self.last_config_digest.as_deref() != Some(digest.as_str()) {
                    self.last_config_digest = Some(digest.clone());
                    let entry = AuditEntry {
                        detail: Some(format!("digest={digest} path={}", path.display())),
                        ..AuditEntry::new(events::CONFIG_CHANGED)
                    };
                    let _ = self.shared.audit.append(entry).await;
                }
            }
        }
    }
}

impl Shared {
    async fn report(&self, update: JobUpdate) {
        if self
            .uplink
            .send(AgentToHub::JobUpdate(update))
            .await
            .is_err()
        {
            tracing::debug!("hub link stopped; job update dropped");
        }
    }

    async fn run_job(&self, cleared: Cleared, cancel: CancellationToken) {
        let Cleared {
            dispatch_id,
            spec,
            handler,
            policy,
            approver,
            rule: allowed_by,
        } = cleared;
        self.report(JobUpdate {
            job_id: Some(spec.job_id.clone()),
            approver: approver.clone(),
            rule: allowed_by,
            reason: approver
                .as_ref()
                .map(|by| format!("approved at the practice by {by}")),
            ..update(&dispatch_id, JobState::Running)
        })
        .await;
        let (chunks, mut chunk_rx) = mpsc::channel::<String>(16);
        let uplink = self.uplink.clone();
        let forward_id = dispatch_id.clone();
        let forwarder = tokio::spawn(async move {
            let mut seq = 0u64;
            while let Some(data) = chunk_rx.recv().await {
                seq += 1;
                let message = AgentToHub::JobOutput {
                    dispatch_id: forward_id.clone(),
                    seq,
                    data,
                };
                if uplink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let mut out = Output::new(chunks, MAX_OUTPUT_BYTES);
        let input = JobInput {
            job_id: &spec.job_id,
            staff: &spec.staff,
            args: &spec.args,
            policy: &policy,
            cancel: cancel.clone(),
        };
        let result = tokio::select! {
            result = handler.run(&self.cx, &input, &mut out) => result,
            _ = cancel.cancelled() => Err(crate::jobs::CapabilityError::Cancelled),
        };
        let (digest, truncated) = out.finish().await;
        let _ = forwarder.await;
        let (state, summary, rule) = match result {
            Ok(summary) => (JobState::Done, summary, None),
            Err(crate::jobs::CapabilityError::Cancelled) => {
                (JobState::Cancelled, "cancelled".to_owned(), None)
            }
            Err(crate::jobs::CapabilityError::Refused { rule, reason }) => {
                (JobState::Refused, reason, Some(rule))
            }
            Err(err) => (JobState::Failed, err.to_string(), None),
        };
        let summary: String = summary.chars().take(500).collect();
        let entry = AuditEntry {
            staff: Some(spec.staff.clone()),
            job_id: Some(spec.job_id.clone()),
            capability: Some(spec.capability.clone()),
            rule: rule.clone(),
            approver: approver.clone(),
            result_summary: Some(format!("{state}: {summary}")),
            result_digest: Some(digest.clone()),
            ..AuditEntry::new(events::JOB_FINISHED)
        };
        if let Err(err) = self.audit.append(entry).await {
            tracing::error!(error = %err, job_id = %spec.job_id, "cannot record a finished job in the audit log");
        }
        tracing::info!(job_id = %spec.job_id, capability = %spec.capability, state = %state, "job finished");
        self.report(JobUpdate {
            job_id: Some(spec.job_id),
            rule,
            summary: Some(summary),
            digest: Some(digest),
            truncated,
            approver,
            ..update(&dispatch_id, state)
        })
        .await;
    }
}

fn update(dispatch_id: &str, state: JobState) -> JobUpdate {
    JobUpdate {
        dispatch_id: dispatch_id.to_owned(),
        job_id: None,
        state,
        rule: None,
        reason: None,
        summary: None,
        digest: None,
        truncated: false,
        approver: None,
    }
}

fn now_ms() -> i64 {
    outpost_queue::now_ms()
}
