//! Connector state for health reports, the demo, and later the hub's inventory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use outpost_core::ConnectorName;

/// What a connector is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectorState {
    /// Starting or reconnecting.
    Starting,
    /// Working normally.
    Running,
    /// Failing and waiting before the next try.
    BackingOff,
    /// Stopped (shutdown).
    Stopped,
    /// Paused by a support job until resumed.
    Paused,
}

impl ConnectorState {
    /// A short word for displays.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::BackingOff => "backing off",
            Self::Stopped => "stopped",
            Self::Paused => "paused",
        }
    }
}

/// One connector's status.
#[derive(Debug, Clone)]
pub struct ConnectorStatus {
    /// `source` or `sink`.
    pub role: &'static str,
    /// The connector kind, e.g. `mllp`.
    pub kind: &'static str,
    /// What it is doing.
    pub state: ConnectorState,
    /// The last error, kept after recovery so support can see what happened.
    pub last_error: Option<String>,
    /// Items taken in (sources) or delivered (sinks) since start.
    pub items: u64,
    /// Items refused (sources) or failed attempts (sinks) since start.
    pub failures: u64,
    /// What the connector kind alone can say, on one line (SQL sources: lag, WAL bytes
    /// behind, last event time, snapshot progress); never patient data.
    pub detail: Option<String>,
}

/// Shared status of every connector; cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    connectors: Arc<Mutex<BTreeMap<ConnectorName, ConnectorStatus>>>,
}

impl Health {
    /// Registers a connector.
    pub fn register(&self, name: &ConnectorName, role: &'static str, kind: &'static str) {
        if let Ok(mut map) = self.connectors.lock() {
            map.insert(
                name.clone(),
                ConnectorStatus {
                    role,
                    kind,
                    state: ConnectorState::Starting,
                    last_error: None,
                    items: 0,
                    failures: 0,
                    detail: None,
                },
            );
        }
    }

    /// Changes a connector's state.
    pub fn set_state(&self, name: &ConnectorName, state: ConnectorState) {
        self.update(name, |s| s.state = state);
    }

    /// Counts one item handled.
    pub fn count_item(&self, name: &ConnectorName) {
        self.count_items(name, 1);
    }

    /// Counts `n` items moved at once.
    pub fn count_items(&self, name: &ConnectorName, n: u64) {
        if n > 0 {
            self.update(name, |s| s.items += n);
        }
    }

    /// Records a failure and its error text (never patient data).
    pub fn record_failure(&self, name: &ConnectorName, error: &str) {
        self.update(name, |s| {
            s.failures += 1;
            s.last_error = Some(error.to_owned());
        });
    }

    /// Replaces a connector's one-line detail.
    pub fn set_detail(&self, name: &ConnectorName, detail: Option<String>) {
        self.update(name, |s| s.detail = detail);
    }

    /// A copy of every connector's status.
    pub fn snapshot(&self) -> Vec<(ConnectorName, ConnectorStatus)> {
        self.connectors
            .lock()
            .map(|map| map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    fn update(&self, name: &ConnectorName, change: impl FnOnce(&mut ConnectorStatus)) {
        if let Ok(mut map) = self.connectors.lock() {
            if let Some(status) = map.get_mut(name) {
                change(status);
            }
        }
    }
}
