//! Pause, resume and restart for running connectors: each connector's supervisor watches
//! its own [`Control`] and stops, waits or starts again when it changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use outpost_core::ConnectorName;
use tokio::sync::watch;

/// What support (or the practice) wants a connector to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Stopped until resumed.
    pub paused: bool,
    /// Bumped by each restart request; a change stops the running task and starts it again.
    pub restarts: u64,
}

/// A connector name that is not configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no connector is named {0:?}")]
pub struct UnknownConnector(pub String);

/// Every connector's control; cheap to clone.
#[derive(Clone, Default)]
pub struct ConnectorControls {
    controls: Arc<Mutex<BTreeMap<ConnectorName, watch::Sender<Control>>>>,
}

impl ConnectorControls {
    /// Registers a connector and returns what its supervisor watches.
    pub fn register(&self, name: &ConnectorName) -> watch::Receiver<Control> {
        let (sender, receiver) = watch::channel(Control::default());
        if let Ok(mut controls) = self.controls.lock() {
            controls.insert(name.clone(), sender);
        }
        receiver
    }

    /// Stops a connector until [`ConnectorControls::resume`]; returns whether it was
    /// running before.
    pub fn pause(&self, name: &str) -> Result<bool, UnknownConnector> {
        self.change(name, |control| {
            let was_running = !control.paused;
            control.paused = true;
            was_running
        })
    }

    /// Starts a paused connector again; returns whether it was paused.
    pub fn resume(&self, name: &str) -> Result<bool, UnknownConnector> {
        self.change(name, |control| {
            let was_paused = control.paused;
            control.paused = false;
            was_paused
        })
    }

    /// Stops a connector's task and starts it again (a paused one stays paused).
    pub fn restart(&self, name: &str) -> Result<(), UnknownConnector> {
        self.change(name, |control| control.restarts += 1)
    }

    /// Whether a connector is paused.
    pub fn is_paused(&self, name: &str) -> Option<bool> {
        let controls = self.controls.lock().ok()?;
        controls
            .iter()
            .find(|(known, _)| known.as_str() == name)
            .map(|(_, sender)| sender.borrow().paused)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.controls
            .lock()
            .map(|controls| controls.keys().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    fn change<T>(
        &self,
        name: &str,
        apply: impl FnOnce(&mut Control) -> T,
    ) -> Result<T, UnknownConnector> {
        let controls = self
            .controls
            .lock()
            .map_err(|_| UnknownConnector(name.to_owned()))?;
        let sender = controls
            .iter()
            .find(|(known, _)| known.as_str() == name)
            .map(|(_, sender)| sender)
            .ok_or_else(|| UnknownConnector(name.to_owned()))?;
        let mut result = None;
        sender.send_modify(|control| result = Some(apply(control)));
        result.ok_or_else(|| UnknownConnector(name.to_owned()))
    }
}
