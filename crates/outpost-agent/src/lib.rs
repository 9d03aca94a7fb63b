//! The Outpost agent: loads the config, opens the queue, and runs every source and sink
//! under a supervisor that restarts a failing connector with backoff and stops them all
//! cleanly on shutdown.

#![forbid(unsafe_code)]

pub mod config;
pub mod connectors;
pub mod control;
mod error;
pub mod health;
mod hub_link;
pub mod jobs;
pub mod logbuf;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_core::ConnectorName;
use outpost_queue::{Queue, QueueOptions, RetryPolicy};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::AgentConfig;
use connectors::{mllp, SinkContext, SinkKind, SourceContext, SourceKind};
use control::{ConnectorControls, Control};
pub use error::{AgentError, ConfigError, ConnectorError};
pub use health::{ConnectorState, ConnectorStatus, Health};
pub use hub_link::route_inbound;
use jobs::{JobContext, ReloadRequest};
use logbuf::LogBuffer;
use watch::DeliveryWatch;

/// How often delivered items past their retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// Restart backoff for a connector whose task failed.
const RESTART_POLICY: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_millis(500),
    max_backoff: Duration::from_secs(60),
    max_attempts: None,
};

/// An agent that has started: listeners are bound and every connector is running.
pub struct RunningAgent {
    /// The queue, for inspection while running.
    pub queue: Queue,
    /// Connector status.
    pub health: Health,
    /// Where each listening source is bound.
    pub listeners: Vec<(ConnectorName, SocketAddr)>,
    shutdown: CancellationToken,
    supervisor: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Waits until the agent has stopped (after `shutdown` is cancelled).
    pub async fn wait(self) {
        let _ = self.supervisor.await;
    }

    /// Stops the agent and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// What the process running the agent gives it besides its config.
#[derive(Clone)]
pub struct AgentExtras {
    /// The log lines the process's `tracing` layer collects (for `logs.*` jobs).
    pub logs: LogBuffer,
    /// Asked after `config.propose` applied a new config: the process restarts the agent.
    pub reload: ReloadRequest,
}

impl Default for AgentExtras {
    fn default() -> Self {
        AgentExtras {
            logs: LogBuffer::default(),
            reload: ReloadRequest::new().0,
        }
    }
}

/// [`start_with`] without a log buffer or reload handling (tests, embedded uses).
pub async fn start(
    config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<RunningAgent, AgentError> {
    start_with(config, shutdown, AgentExtras::default()).await
}

/// Opens the queue, binds every listener and starts every connector. Errors here (a bad
/// data directory, a port in use) are start-up errors; later connector failures are
/// logged and the connector restarted.
pub async fn start_with(
    config: AgentConfig,
    shutdown: CancellationToken,
    extras: AgentExtras,
) -> Result<RunningAgent, AgentError> {
    let started = std::time::Instant::now();
    let config = Arc::new(config);
    let options = QueueOptions {
        min_free_disk_bytes: config.min_free_disk_bytes,
        ..QueueOptions::default()
    };
    let data_dir = config.data_dir.clone();
    let queue = tokio::task::spawn_blocking(move || Queue::open(&data_dir, options))
        .await
        .map_err(|_| AgentError::Queue(outpost_queue::QueueError::Closed))??;
    let health = Health::default();
    let controls = ConnectorControls::default();
    let deliveries = DeliveryWatch::default();
    let mut tasks = JoinSet::new();
    let mut listeners = Vec::new();

    for source in &config.sources {
        health.register(&source.name, "source", source.kind.kind_name());
        let cx = SourceContext {
            name: source.name.clone(),
            queue: queue.clone(),
            config: config.clone(),
            deliveries: deliveries.clone(),
            health: health.clone(),
            shutdown: shutdown.child_token(),
        };
        let listener = bind_source(&source.kind)
            .await
            .map_err(|err| AgentError::Connector {
                kind: "source",
                name: source.name.to_string(),
                message: err.to_string(),
            })?;
        if let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
            listeners.push((source.name.clone(), addr));
        }
        let kind = source.kind.clone();
        // The listener bound above serves the first run; a restart binds again.
        let bound = Arc::new(std::sync::Mutex::new(Some(listener)));
        let span =
            tracing::info_span!("connector", name = %source.name, kind = source.kind.kind_name());
        let (name, health, stop) = (cx.name.clone(), cx.health.clone(), cx.shutdown.clone());
        let control = controls.register(&name);
        tasks.spawn(
            supervise(name, health, stop, "source", control, move |run_stop| {
                let (kind, bound) = (kind.clone(), bound.clone());
                let cx = SourceContext {
                    shutdown: run_stop,
                    ..cx.clone()
                };
                async move {
                    let reused = bound.lock().ok().and_then(|mut slot| slot.take()).flatten();
                    let listener = match reused {
                        Some(listener) => Some(listener),
                        None => bind_source(&kind).await?,
                    };
                    let needs_listener =
                        || ConnectorError::Unavailable("the source's listener is not bound".into());
                    match kind {
                        SourceKind::Mllp(config) => {
                            mllp::run_source(config, listener.ok_or_else(needs_listener)?, cx).await
                        }
                        SourceKind::Dicom(config) => {
                            let listener = listener.ok_or_else(needs_listener)?;
                            connectors::dicom::run_source(config, listener, cx).await
                        }
                        SourceKind::Sql(config) => connectors::sql::run_source(*config, cx).await,
                    }
                }
            })
            .instrument(span),
        );
    }

    let uplink = if config.uses_hub() {
        Some(
            hub_link::start(
                config.clone(),
                queue.clone(),
                JobContext {
                    agent_id: String::new(),
                    config: Some(config.clone()),
                    queue: Some(queue.clone()),
                    health: health.clone(),
                    connectors: controls.clone(),
                    logs: extras.logs.clone(),
                    data_dir: config.data_dir.clone(),
                    started,
                    reload: extras.reload.clone(),
                },
                shutdown.child_token(),
            )
            .await?,
        )
    } else {
        None
    };
    let on_delivery: Vec<ConnectorName> = config
        .sources
        .iter()
        .filter(|s| s.kind.acks_on_delivery())
        .map(|s| s.name.clone())
        .collect();
    for sink in &config.sinks {
        health.register(&sink.name, "sink", sink.kind.kind_name());
        let cx = SinkContext {
            name: sink.name.clone(),
            queue: queue.clone(),
            ack_on_delivery_sources: on_delivery.clone(),
            deliveries: deliveries.clone(),
            health: health.clone(),
            shutdown: shutdown.child_token(),
            uplink: uplink.clone(),
            data_dir: config.data_dir.clone(),
        };
        let kind = sink.kind.clone();
        let span =
            tracing::info_span!("connector", name = %sink.name, kind = sink.kind.kind_name());
        let (name, health, stop) = (cx.name.clone(), cx.health.clone(), cx.shutdown.clone());
        let control = controls.register(&name);
        tasks.spawn(
            supervise(name, health, stop, "sink", control, move |run_stop| {
                let cx = SinkContext {
                    shutdown: run_stop,
                    ..cx.clone()
                };
                run_sink(kind.clone(), cx)
            })
            .instrument(span),
        );
    }

    let purge_queue = queue.clone();
    let retention = config.retention;
    let purge_stop = shutdown.child_token();
    let blobs = config
        .sources
        .iter()
        .any(|s| matches!(s.kind, SourceKind::Dicom(_)))
        .then(|| outpost_queue::blob::BlobStore::open(&config.data_dir).ok())
        .flatten();
    tasks.spawn(async move { purge_periodically(purge_queue, retention, blobs, purge_stop).await });

    tracing::info!(
        data_dir = %config.data_dir.display(),
        sources = config.sources.len(),
        sinks = config.sinks.len(),
        "agent started"
    );
    let supervisor_queue = queue.clone();
    let grace = config.shutdown_grace;
    let supervisor_shutdown = shutdown.clone();
    let supervisor = tokio::spawn(async move {
        supervisor_shutdown.cancelled().await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "stopping: finishing in-flight messages"
        );
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("connectors did not stop within the grace period; aborting them (unacknowledged messages will be resent by their senders)");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        if let Err(err) = supervisor_queue.close().await {
            tracing::warn!(error = %err, "closing the queue");
        }
        tracing::info!("agent stopped");
    });
    Ok(RunningAgent {
        queue,
        health,
        listeners,
        shutdown,
        supervisor,
    })
}

/// Runs one sink of any kind until shutdown.
async fn run_sink(kind: SinkKind, cx: SinkContext) -> Result<(), ConnectorError> {
    match kind {
        SinkKind::Mllp(config) => mllp::run_sink(config, cx).await,
        SinkKind::Hub(config) => connectors::hub::run_sink(config, cx).await,
        SinkKind::Dicom(config) => connectors::dicom::run_sink(config, cx).await,
        SinkKind::Stow(config) => connectors::dicom::run_stow_sink(config, cx).await,
        SinkKind::Jsonl(config) => connectors::jsonl::run_sink(config, cx).await,
        SinkKind::Sql(config) => connectors::sqlsink::run_sink(*config, cx).await,
    }
}

/// Binds a listening source's address; `None` for a source that does not listen.
async fn bind_source(kind: &SourceKind) -> Result<Option<tokio::net::TcpListener>, ConnectorError> {
    match kind {
        SourceKind::Mllp(config) => mllp::bind_source(config).await.map(Some),
        SourceKind::Dicom(config) => connectors::dicom::bind_source(config).await.map(Some),
        SourceKind::Sql(_) => Ok(None),
    }
}

/// Runs a connector, restarting it with backoff whenever it fails, until shutdown. A
/// pause stops it until resumed; a restart request stops it and starts it again at once.
/// `run` gets the token that stops that one run.
async fn supervise<F, Fut>(
    name: ConnectorName,
    health: Health,
    shutdown: CancellationToken,
    role: &'static str,
    mut control: tokio::sync::watch::Receiver<Control>,
    mut run: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), ConnectorError>>,
{
    let mut failures = 0u32;
    let mut control_open = true;
    loop {
        if control.borrow_and_update().paused {
            health.set_state(&name, ConnectorState::Paused);
            tracing::info!(role, "connector paused");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
            }
        }
        let run_stop = shutdown.child_token();
        let task = run(run_stop.clone());
        tokio::pin!(task);
        let mut interrupted = false;
        let outcome = loop {
            tokio::select! {
                outcome = &mut task => break outcome,
                changed = control.changed(), if control_open && !interrupted => {
                    if changed.is_err() {
                        control_open = false;
                    } else {
                        interrupted = true;
                        run_stop.cancel();
                    }
                }
            }
        };
        if shutdown.is_cancelled() {
            break;
        }
        if interrupted {
            failures = 0;
            tracing::info!(role, "connector stopped on request");
            continue;
        }
        match outcome {
            Ok(()) => break,
            Err(err) => {
                failures = failures.saturating_add(1);
                let delay = RESTART_POLICY.backoff(failures);
                tracing::error!(role, error = %err, restart_in_ms = delay.as_millis() as u64, "connector failed; restarting");
                health.record_failure(&name, &err.to_string());
                health.set_state(&name, ConnectorState::BackingOff);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                    changed = control.changed(), if control_open => {
                        if changed.is_err() {
                            control_open = false;
                        }
                    }
                }
            }
        }
    }
}

async fn purge_periodically(
    queue: Queue,
    retention: Duration,
    blobs: Option<outpost_queue::blob::BlobStore>,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        match queue.purge(retention).await {
            Ok(report) if report.items > 0 => {
                tracing::info!(
                    items = report.items,
                    pages_freed = report.pages_freed,
                    "purged delivered items past retention"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "purge failed"),
        }
        if let Some(blobs) = &blobs {
            remove_orphan_blobs(&queue, blobs).await;
        }
    }
}

/// Deletes blobs whose queue item was purged, and unfinished ones left by a crash (never
/// acknowledged to a sender: the SCP answers only after the commit).
async fn remove_orphan_blobs(queue: &Queue, blobs: &outpost_queue::blob::BlobStore) {
    const UNFINISHED_AFTER: Duration = Duration::from_secs(3600);
    let names = match blobs.list(UNFINISHED_AFTER).await {
        Ok(names) => names,
        Err(err) => {
            tracing::warn!(error = %err, "cannot list blobs");
            return;
        }
    };
    let mut removed = 0usize;
    for name in names {
        // A blob is written under its own name before its queue record commits: a young
        // one may be an instance arriving or being acknowledged right now.
        let young = blobs
            .path(&name)
            .ok()
            .and_then(|path| std::fs::metadata(path).ok())
            .and_then(|meta| meta.modified().ok())
            .and_then(|modified| modified.elapsed().ok())
            .is_none_or(|age| age < UNFINISHED_AFTER);
        if young {
            continue;
        }
        match queue.find_by_external_ref(&name).await {
            Ok(None) => {
                if blobs.remove(&name).await.is_ok() {
                    removed += 1;
                }
            }
            Ok(Some(_)) => {}
            Err(err) => {
                tracing::warn!(error = %err, "cannot check a blob against the queue");
                return;
            }
        }
    }
    if removed > 0 {
        tracing::info!(blobs = removed, "removed blobs of purged instances");
    }
}
