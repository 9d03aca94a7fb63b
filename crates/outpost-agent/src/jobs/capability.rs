//! The one trait every capability implements, what a running job may use, and the
//! size-bounded, streamed output it writes to.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use outpost_policy::{Capability, Policy};
use outpost_queue::Queue;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control::ConnectorControls;
use crate::health::Health;
use crate::logbuf::LogBuffer;

/// Output pieces are sent in chunks of at most this many bytes.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// A job's whole output is cut at this many bytes (and marked truncated).
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024 * 1024;

/// One capability: a small module in `capabilities/` and one line in the registry.
#[async_trait]
pub trait CapabilityHandler: Send + Sync {
    /// The capability it implements.
    fn capability(&self) -> Capability;

    /// Whether a job for it waits for a local approval whatever the policy says
    /// (`config.propose`, `shell`).
    fn always_needs_approval(&self) -> bool {
        false
    }

    /// Runs the job: writes its result to `out` and returns a short, PHI-free summary.
    /// Long work checks `job.cancel` between steps and stops with
    /// [`CapabilityError::Cancelled`].
    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError>;
}

/// What a job asked, as the capability sees it (already checked against the policy).
pub struct JobInput<'a> {
    /// The job id.
    pub job_id: &'a str,
    /// The staff member who asked.
    pub staff: &'a str,
    /// The arguments (an object).
    pub args: &'a serde_json::Value,
    /// The policy in force, for the roots of `files.*`.
    pub policy: &'a Policy,
    /// Cancelled when the hub cancels the job or the agent stops.
    pub cancel: CancellationToken,
}

/// Why a capability did not finish.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    /// The arguments are wrong; says which and what was expected.
    #[error("bad arguments: {0}")]
    BadArgs(String),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Refused at run time (a path that resolves outside its root by now, a proposal that
    /// does not parse): the rule and why.
    #[error("refused by {rule}: {reason}")]
    Refused {
        /// The rule, e.g. `allow."files.read".roots`.
        rule: String,
        /// Why.
        reason: String,
    },
    /// It failed; the message says what and where (no PHI).
    #[error("{0}")]
    Failed(String),
}

/// Asks the agent process to stop and start again with its (new) config file.
#[derive(Clone)]
pub struct ReloadRequest(Arc<watch::Sender<u64>>);

impl ReloadRequest {
    /// A new request handle and what the agent's run loop watches.
    pub fn new() -> (ReloadRequest, watch::Receiver<u64>) {
        let (sender, receiver) = watch::channel(0);
        (ReloadRequest(Arc::new(sender)), receiver)
    }

    /// Asks for a reload.
    pub fn request(&self) {
        self.0.send_modify(|count| *count += 1);
    }
}

/// What every job of one agent shares; cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    /// This agent's id.
    pub agent_id: String,
    /// The agent's config (None for simulated agents in benchmarks).
    pub config: Option<Arc<AgentConfig>>,
    /// The queue (None for simulated agents).
    pub queue: Option<Queue>,
    /// Connector status.
    pub health: Health,
    /// Connector pause/resume/restart.
    pub connectors: ConnectorControls,
    /// The agent's recent log lines.
    pub logs: LogBuffer,
    /// The data directory.
    pub data_dir: PathBuf,
    /// When the agent started.
    pub started: Instant,
    /// Restarts the agent with its config file (after `config.propose` is applied).
    pub reload: ReloadRequest,
}

/// A job's output: streamed in chunks as written, cut at a size limit, digested whole.
pub struct Output {
    sender: mpsc::Sender<String>,
    pending: String,
    written: usize,
    limit: usize,
    truncated: bool,
    digest: Sha256,
}

/// The output was cut, or the job's receiver has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputClosed;

impl Output {
    /// Output that sends its chunks to `sender`, cut at `limit` bytes.
    pub fn new(sender: mpsc::Sender<String>, limit: usize) -> Output {
        Output {
            sender,
            pending: String::new(),
            written: 0,
            limit,
            truncated: false,
            digest: Sha256::new(),
        }
    }

    /// Appends text; past the limit the rest is dropped and the output marked truncated.
    /// Errors once the output is full (so loops can stop early) or nobody listens.
    pub async fn write(&mut self, text: &str) -> Result<(), OutputClosed> {
        if self.truncated {
            return Err(OutputClosed);
        }
        let room = self.limit.saturating_sub(self.written);
        let take = if text.len() <= room {
            text.len()
        } else {
            self.truncated = true;
            floor_char_boundary(text, room)
        };
        let kept = &text[..take];
        self.written += kept.len();
        self.digest.update(kept.as_bytes());
        self.pending.push_str(kept);
        while self.pending.len() >= CHUNK_BYTES {
            let cut = floor_char_boundary(&self.pending, CHUNK_BYTES).max(1);
            let rest = self.pending.split_off(cut);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.sender.send(chunk).await.map_err(|_| OutputClosed)?;
        }
        if self.truncated {
            Err(OutputClosed)
        } else {
            Ok(())
        }
    }

    /// Appends one JSON value as a line.
    pub async fn write_json<T: Serialize>(&mut self, value: &T) -> Result<(), OutputClosed> {
        let mut line = serde_json::to_string(value).map_err(|_| OutputClosed)?;
        line.push('\n');
        self.write(&line).await
    }

    /// Whether the limit was reached.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Sends what is left; returns the SHA-256 (hex) of everything kept and whether it was
    /// cut.
    pub async fn finish(mut self) -> (String, bool) {
        if !self.pending.is_empty() {
            let chunk = std::mem::take(&mut self.pending);
            let _ = self.sender.send(chunk).await;
        }
        (hex::encode(self.digest.finalize()), self.truncated)
    }
}

fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut index = index.min(text.len());
    while index > 0 && !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn output_is_chunked_cut_at_the_limit_and_digested() {
        let (sender, mut receiver) = mpsc::channel(64);
        let mut out = Output::new(sender, CHUNK_BYTES + 10);
        out.write(&"a".repeat(CHUNK_BYTES - 1)).await.unwrap();
        out.write("bb").await.unwrap();
        assert!(out.write(&"é".repeat(20)).await.is_err());
        assert!(out.is_truncated());
        let (digest, truncated) = out.finish().await;
        assert!(truncated);
        let mut all = String::new();
        while let Ok(chunk) = receiver.try_recv() {
            assert!(chunk.len() <= CHUNK_BYTES);
            all.push_str(&chunk);
        }
        assert_eq!(all.len(), CHUNK_BYTES + 9);
        assert_eq!(digest, hex::encode(Sha256::digest(all.as_bytes())));
    }
}
