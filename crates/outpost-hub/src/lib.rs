//! The Outpost hub: an HTTPS server with the agents' WebSocket endpoint, the data API for
//! the vendor's apps, and the fleet dashboard, over one store (SQLite by default).

#![forbid(unsafe_code)]

mod api;
mod api_jobs;
pub mod api_sql;
mod audit_mirror;
pub mod config;
mod dashboard;
mod error;
pub mod jobs;
mod listener;
mod monitor;
pub mod secrets;
mod session;
pub mod store;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use config::HubConfig;
pub use error::HubError;
use store::Store;

/// What every handler shares.
pub struct HubState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The config.
    pub config: HubConfig,
    /// Live agent sessions.
    pub sessions: Sessions,
    /// The last stored message cursor, for long-polling readers.
    pub last_cursor: watch::Sender<i64>,
    /// Heartbeats waiting to be written, in one transaction, by the flusher.
    pub heartbeats: Heartbeats,
    /// The key that signs jobs (shared by every hub process over the store).
    pub job_key: ed25519_dalek::SigningKey,
    /// Job dispatch and agents' job reports.
    pub jobs: jobs::Jobs,
    /// Write-back calls waiting for their agent's answer.
    pub sql_calls: api_sql::SqlCalls,
}

/// The latest heartbeat of each agent since the last flush. Writing each heartbeat on
/// its own would cost one commit each: thousands a second with a large fleet.
#[derive(Default)]
pub struct Heartbeats {
    pending: Mutex<HashMap<String, (serde_json::Value, i64)>>,
}

impl Heartbeats {
    /// Keeps an agent's latest inventory until the next flush.
    pub fn record(&self, agent_id: &str, inventory: serde_json::Value, seen_ms: i64) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(agent_id.to_owned(), (inventory, seen_ms));
        }
    }

    fn take(&self) -> Vec<store::InventoryUpdate> {
        let pending = self
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        pending
            .into_iter()
            .map(|(agent_id, (inventory, seen_ms))| store::InventoryUpdate {
                agent_id,
                inventory,
                seen_ms,
            })
            .collect()
    }
}

/// How often buffered heartbeats are written.
const HEARTBEAT_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

async fn flush_heartbeats(state: Arc<HubState>, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(HEARTBEAT_FLUSH);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = interval.tick() => false,
        };
        let updates = state.heartbeats.take();
        if !updates.is_empty() {
            if let Err(err) = state.store.update_inventories(&updates).await {
                tracing::warn!(error = %err, agents = updates.len(), "cannot record heartbeats");
            }
        }
        if stopping {
            break;
        }
    }
}

/// Live sessions by agent id. A newer session for the same agent replaces the older.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, SessionHandle>>,
}

/// How to reach a live session.
#[derive(Clone)]
pub struct SessionHandle {
    /// Distinguishes this session from a later one of the same agent.
    pub session_id: u64,
    /// Messages to send down.
    pub outbox: mpsc::Sender<outpost_proto::HubToAgent>,
    /// Cancels the session (revocation, replacement).
    pub cancel: CancellationToken,
    /// When it was authenticated (unix ms).
    pub since_ms: i64,
}

impl Sessions {
    /// Registers a session, ending any older one of the same agent.
    pub fn register(&self, agent_id: &str, handle: SessionHandle) {
        if let Ok(mut live) = self.live.lock() {
            if let Some(old) = live.insert(agent_id.to_owned(), handle) {
                old.cancel.cancel();
            }
        }
    }

    /// Removes a session if it is still the registered one.
    pub fn unregister(&self, agent_id: &str, session_id: u64) {
        if let Ok(mut live) = self.live.lock() {
            if live
                .get(agent_id)
                .is_some_and(|h| h.session_id == session_id)
            {
                live.remove(agent_id);
            }
        }
    }

    /// The live session of an agent.
    pub fn get(&self, agent_id: &str) -> Option<SessionHandle> {
        self.live
            .lock()
            .ok()
            .and_then(|live| live.get(agent_id).cloned())
    }

    /// The agents with a live session here.
    pub fn agent_ids(&self) -> Vec<String> {
        self.live
            .lock()
            .map(|live| live.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How many sessions are live.
    pub fn count(&self) -> usize {
        self.live.lock().map(|live| live.len()).unwrap_or(0)
    }
}

/// A hub that is serving.
pub struct RunningHub {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The CA agents pin (when the hub made its own).
    pub ca_path: Option<std::path::PathBuf>,
    /// The CA's SHA-256 fingerprint.
    pub fingerprint: String,
    /// Shared state, for in-process callers (demo, tests).
    pub state: Arc<HubState>,
    server: tokio::task::JoinHandle<()>,
}

impl RunningHub {
    /// Waits until the server stops (after the shutdown token is cancelled).
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens the store named by the config.
pub async fn open_store(config: &HubConfig) -> Result<Arc<dyn Store>, HubError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| HubError::Io {
        path: config.data_dir.clone(),
        source,
    })?;
    if config.database == "sqlite" {
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || store::sqlite::SqliteStore::open(&dir))
            .await
            .map_err(|_| HubError::StoreUnavailable)??;
        Ok(Arc::new(store))
    } else if config.database.starts_with("postgres://")
        || config.database.starts_with("postgresql://")
    {
        Ok(Arc::new(
            store::postgres::PostgresStore::open(&config.database).await?,
        ))
    } else {
        Err(HubError::Config(format!(
            "database {:?}: expected \"sqlite\" or a postgres:// URL",
            secrets::redact_url(&config.database)
        )))
    }
}

/// Starts serving: TLS, the routes, the offline monitor.
pub async fn start(config: HubConfig, shutdown: CancellationToken) -> Result<RunningHub, HubError> {
    let store = open_store(&config).await?;
    let tls = tls::load_or_create(
        &config.data_dir,
        config.tls_cert.as_deref(),
        config.tls_key.as_deref(),
        config.listen.ip(),
    )?;
    let last = store.last_cursor().await?;
    let job_key = jobs::load_job_key(store.as_ref()).await?;
    let (last_cursor, _) = watch::channel(last);
    let state = Arc::new(HubState {
        store,
        config: config.clone(),
        sessions: Sessions::default(),
        last_cursor,
        heartbeats: Heartbeats::default(),
        job_key,
        jobs: jobs::Jobs::default(),
        sql_calls: api_sql::SqlCalls::default(),
    });
    tokio::spawn(flush_heartbeats(state.clone(), shutdown.child_token()));
    tokio::spawn(jobs::dispatch(state.clone(), shutdown.child_token()));
    tokio::spawn(jobs::flush_reports(state.clone(), shutdown.child_token()));
    tokio::spawn(jobs::resume_rollouts(state.clone()));
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| HubError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    let addr = tcp.local_addr().map_err(|source| HubError::Bind {
        addr: config.listen.to_string(),
        source,
    })?;
    let listener =
        listener::TlsListener::new(tcp, tls.server_config.clone(), shutdown.child_token());
    let app = api::router(state.clone());
    tokio::spawn(monitor::watch_fleet(state.clone(), shutdown.child_token()));
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<listener::PeerAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "hub server stopped");
        }
    });
    tracing::info!(%addr, fingerprint = %tls.fingerprint, "hub listening");
    Ok(RunningHub {
        addr,
        ca_path: tls.ca_path,
        fingerprint: tls.fingerprint,
        state,
        server,
    })
}
