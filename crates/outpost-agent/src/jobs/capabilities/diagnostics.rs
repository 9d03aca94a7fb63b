//! `diagnostics`: one JSON bundle for a support ticket: the config file with its secrets
//! masked, the newest log lines, the health report (which holds the queue's counts) and a
//! small preflight (listeners on every interface, free disk on the data directory).
//!
//! No arguments. The summary gives sizes and counts only.

use std::path::Path;

use async_trait::async_trait;
use outpost_policy::Capability;
use serde::Serialize;
use serde_json::{json, Value};

use super::health::{self, HealthReport};
use super::{cut_note, Args};
use crate::config::AgentConfig;
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};
use crate::logbuf::LogLine;

/// Log lines in the bundle.
pub const LOG_LINES: usize = 200;
/// The largest config file put in the bundle; a real one is a few kilobytes.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// What a masked value reads as.
pub const MASK: &str = "***";

/// The `diagnostics` capability.
pub struct Diagnostics;

#[derive(Serialize)]
struct Bundle {
    config: Value,
    logs: Vec<LogLine>,
    health: HealthReport,
    preflight: Preflight,
}

#[derive(Serialize)]
struct Preflight {
    listeners: Vec<Value>,
    data_dir: String,
    data_dir_free_bytes: Option<u64>,
    min_free_disk_bytes: Option<u64>,
    warnings: Vec<String>,
}

/// Whether a config key holds a secret: its name contains `token`, `password`, `secret`
/// or `passphrase`, or it is `key`, `api_key` or ends in `_key`. `ca_file` is a path to a
/// public certificate and stays readable.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key == "ca_file" {
        return false;
    }
    ["token", "password", "secret", "passphrase"]
        .iter()
        .any(|word| key.contains(word))
        || key == "key"
        || key == "api_key"
        || key.ends_with("_key")
}

/// Replaces the value of every secret key (see [`is_secret_key`]) with [`MASK`], through
/// nested tables and arrays of tables; returns how many were masked.
pub fn mask_secrets(table: &mut toml::Table) -> usize {
    let mut masked = 0;
    for (key, value) in table.iter_mut() {
        if is_secret_key(key) {
            *value = toml::Value::String(MASK.to_owned());
            masked += 1;
        } else {
            masked += mask_value(value);
        }
    }
    masked
}

fn mask_value(value: &mut toml::Value) -> usize {
    match value {
        toml::Value::Table(table) => mask_secrets(table),
        toml::Value::Array(items) => items.iter_mut().map(mask_value).sum(),
        _ => 0,
    }
}

/// The config file as text with its secrets masked, or why it is not included. The file
/// is parsed and written out again, so comments are dropped: a secret in a comment must
/// not survive.
async fn masked_config(path: &Path) -> Value {
    let shown = path.display().to_string();
    let bytes = match read_bounded(path).await {
        Ok(bytes) => bytes,
        Err(reason) => return json!({"path": shown, "error": reason}),
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return json!({"path": shown, "error": "the file is not UTF-8; not included"});
    };
    let mut table: toml::Table = match text.parse() {
        Ok(table) => table,
        // The parser's message can quote the offending line, which may hold a secret.
        Err(_) => {
            return json!({"path": shown, "error": "the file does not parse as TOML; not included"})
        }
    };
    let masked = mask_secrets(&mut table);
    match toml::to_string(&table) {
        Ok(text) => json!({"path": shown, "text": text, "masked_values": masked}),
        Err(err) => {
            json!({"path": shown, "error": format!("re-serializing the masked config: {err}")})
        }
    }
}

async fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let metadata = tokio::fs::metadata(path)
        .await
        .map_err(|err| format!("cannot read it: {err}"))?;
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "it is {} bytes, more than the {MAX_CONFIG_BYTES} included",
            metadata.len()
        ));
    }
    tokio::fs::read(path)
        .await
        .map_err(|err| format!("cannot read it: {err}"))
}

fn preflight(cx: &JobContext, config: Option<&AgentConfig>, health: &HealthReport) -> Preflight {
    let mut warnings = Vec::new();
    let mut listeners = Vec::new();
    for source in config.iter().flat_map(|c| c.sources.iter()) {
        let Some(addr) = source.kind.listen_addr() else {
            continue;
        };
        let all_interfaces = addr.ip().is_unspecified();
        if all_interfaces {
            warnings.push(format!(
                "source \"{}\" listens on all interfaces ({addr}); bind it to the address senders use",
                source.name
            ));
        }
        listeners.push(json!({
            "source": source.name,
            "kind": source.kind.kind_name(),
            "listen": addr.to_string(),
            "all_interfaces": all_interfaces,
        }));
    }
    let queue = health.queue.as_ref();
    let data_dir_free_bytes = queue.and_then(|q| q.disk_free_bytes);
    let min_free_disk_bytes = config.map(|c| c.min_free_disk_bytes);
    if let (Some(free), Some(min)) = (data_dir_free_bytes, min_free_disk_bytes) {
        if free < min.saturating_mul(2) {
            warnings.push(format!(
                "the data directory's disk has {free} bytes free; intake stops below {min}"
            ));
        }
    }
    if queue.is_none() {
        warnings.push("no queue is open, so free disk on the data directory is unknown".to_owned());
    }
    Preflight {
        listeners,
        data_dir: cx.data_dir.display().to_string(),
        data_dir_free_bytes,
        min_free_disk_bytes,
        warnings,
    }
}

#[async_trait]
impl CapabilityHandler for Diagnostics {
    fn capability(&self) -> Capability {
        Capability::Diagnostics
    }

    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        Args::new(job.args, &[])?;
        let config = match &cx.config {
            Some(config) => masked_config(&config.path).await,
            None => json!({"error": "this agent runs without a config file"}),
        };
        if job.cancel.is_cancelled() {
            return Err(CapabilityError::Cancelled);
        }
        let health = health::collect(cx).await;
        let preflight = preflight(cx, cx.config.as_deref(), &health);
        let bundle = Bundle {
            config,
            logs: cx.logs.tail(LOG_LINES),
            health,
            preflight,
        };
        let text = serde_json::to_string(&bundle)
            .map_err(|err| CapabilityError::Failed(format!("encoding the bundle: {err}")))?;
        let _ = out.write(&text).await;
        let _ = out.write("\n").await;
        let config_note = match bundle.config.get("text").and_then(Value::as_str) {
            Some(config) => format!(
                "config {} bytes ({} values masked)",
                config.len(),
                bundle.config["masked_values"]
            ),
            None => "config not included".to_owned(),
        };
        Ok(format!(
            "bundle of {} bytes: {config_note}, {} log lines, {}, {} preflight warnings{}",
            text.len() + 1,
            bundle.logs.len(),
            bundle.health.summary(),
            bundle.preflight.warnings.len(),
            cut_note(out)
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::testutil;

    const POLICY: &str = "[allow]\ndiagnostics = true\n";

    #[test]
    fn secret_keys_are_recognised_and_ca_file_is_not() {
        for key in [
            "token",
            "hub_token",
            "Password",
            "db_password",
            "client_secret",
            "passphrase",
            "key",
            "api_key",
            "private_key",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["ca_file", "url", "keyboard", "name", "listen", "monkey"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn masking_reaches_nested_tables_and_arrays_of_tables() {
        let mut table: toml::Table = r#"
            password = "top"
            [hub]
            token = "t1"
            ca_file = "ca.pem"
            [[sink]]
            name = "db"
            settings = { api_key = "k1", user = "u" }
            [[sink]]
            name = "other"
            secret = ["a", "b"]
        "#
        .parse()
        .unwrap();
        assert_eq!(mask_secrets(&mut table), 4);
        let text = toml::to_string(&table).unwrap();
        for secret in ["top", "t1", "k1", "\"a\""] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("ca.pem") && text.contains("\"u\""));
    }

    #[tokio::test]
    async fn the_bundle_masks_secrets_and_flags_listeners_on_all_interfaces() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cx, _reloads) = testutil::context(dir.path());
        let config = testutil::write_config(dir.path());
        // A password in a comment and in an unknown-to-the-agent table must not survive.
        let path = config.path.clone();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("# old password = hunter2\n");
        std::fs::write(&path, &text).unwrap();
        cx.config = Some(config);
        cx.logs.push(LogLine {
            time_ms: 1,
            level: "WARN".to_owned(),
            target: "outpost_agent".to_owned(),
            text: "lab-out backing off".to_owned(),
        });
        let policy = testutil::policy(POLICY);
        let (result, output) = testutil::run(&Diagnostics, &cx, &policy, json!({})).await;
        let summary = result.unwrap();
        assert!(summary.contains("1 values masked"), "{summary}");
        assert!(!output.contains("enroll-SECRET-123"));
        assert!(!output.contains("hunter2"));
        let bundle = &testutil::lines(&output)[0];
        let config_text = bundle["config"]["text"].as_str().unwrap();
        assert!(config_text.contains("token = \"***\""), "{config_text}");
        assert!(config_text.contains("hub-ca.pem"), "{config_text}");
        assert_eq!(bundle["logs"][0]["text"], "lab-out backing off");
        assert_eq!(bundle["health"]["agent_id"], "agent-test");
        let listener = &bundle["preflight"]["listeners"][0];
        assert_eq!(listener["source"], "lab-in");
        assert_eq!(listener["all_interfaces"], true);
        let warnings = bundle["preflight"]["warnings"].as_array().unwrap();
        assert!(warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("listens on all interfaces")));
    }

    #[tokio::test]
    async fn an_unreadable_config_is_reported_in_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cx, _reloads) = testutil::context(dir.path());
        let config = testutil::write_config(dir.path());
        std::fs::remove_file(&config.path).unwrap();
        cx.config = Some(config);
        let policy = testutil::policy(POLICY);
        let (result, output) = testutil::run(&Diagnostics, &cx, &policy, json!({})).await;
        assert!(result.unwrap().contains("config not included"));
        let bundle = &testutil::lines(&output)[0];
        assert!(bundle["config"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot read it"));

        // Without a config at all (simulated agents) the bundle still comes.
        cx.config = None;
        let (result, _) = testutil::run(&Diagnostics, &cx, &policy, json!({})).await;
        result.unwrap();
    }
}
