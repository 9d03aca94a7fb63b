//! `[[sink]] kind = "jsonl"`: appends each item to a file as one JSON line, for exports,
//! debugging and tests without a hub. A change event is written as its own JSON object;
//! any other item as `{"item_id", "source", "kind", "msg_type", "received_at_ms",
//! "payload"}` (payload as text when it is UTF-8, else `payload_base64`).
//!
//! Lines are written and fsync'd before the deliveries are recorded, so a crash in between
//! repeats lines (at least once), never loses one.

mod sink;

use std::path::PathBuf;

use serde::Deserialize;

pub use sink::run_sink;

/// `[[sink]] kind = "jsonl"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The file to append to; relative paths are taken from the config file's folder.
    pub path: PathBuf,
    /// Items written per fsync at most.
    #[serde(default = "default_batch_items")]
    pub batch_items: usize,
}

fn default_batch_items() -> usize {
    256
}
