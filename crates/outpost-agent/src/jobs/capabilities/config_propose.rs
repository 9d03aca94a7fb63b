//! `config.propose`: a new agent config, applied only after a local approval (whatever
//! the policy says), then the agent restarts with it.
//!
//! Argument: `config`, the whole new `agent.toml` text. It must parse and check as an
//! agent config, and may change connector settings only: a different `data_dir` (where
//! the queue and keys live) or `policy` (the practice's file) is refused, as is a value
//! still reading `***` (a secret masked by `diagnostics` and sent back).
//!
//! Applying: the current file is copied to `<name>.<unix-ms>.bak` beside it (the rollback
//! copy), the new text is written to a temporary file in the same folder with the current
//! file's permissions, flushed, and renamed over the config; then the agent is asked to
//! reload. If the config path is a symbolic link, the file it points to is replaced and
//! the link kept. Output: `{applied, path, backup, config_sha256}`.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use outpost_policy::Capability;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::diagnostics::{is_secret_key, MASK};
use super::files::{io_failed, sync_dir};
use super::{blocking, now_ms, Args};
use crate::config::AgentConfig;
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// The largest config text accepted.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

const RULE: &str = "config.propose";

/// The `config.propose` capability.
pub struct ConfigPropose;

fn refused(reason: impl Into<String>) -> CapabilityError {
    CapabilityError::Refused {
        rule: RULE.to_owned(),
        reason: reason.into(),
    }
}

/// The dotted key of the first value that still reads [`MASK`] under a secret key.
fn find_mask(table: &toml::Table, prefix: &str) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        let at = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        find_mask_in(value, &at, is_secret_key(key))
    })
}

fn find_mask_in(value: &toml::Value, at: &str, is_secret: bool) -> Option<String> {
    match value {
        toml::Value::String(text) if is_secret && text == MASK => Some(at.to_owned()),
        toml::Value::Table(table) => find_mask(table, at),
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| find_mask_in(item, &format!("{at}[{i}]"), is_secret)),
        _ => None,
    }
}

#[async_trait]
impl CapabilityHandler for ConfigPropose {
    fn capability(&self) -> Capability {
        Capability::ConfigPropose
    }

    fn always_needs_approval(&self) -> bool {
        true
    }

    async fn run(
        &self,
        cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let args = Args::new(job.args, &["config"])?;
        let text = args.required_str("config", "the whole new agent.toml text")?;
        if text.len() > MAX_CONFIG_BYTES {
            return Err(CapabilityError::BadArgs(format!(
                "argument `config`: at most {MAX_CONFIG_BYTES} bytes, found {}",
                text.len()
            )));
        }
        let current = cx.config.as_ref().ok_or_else(|| {
            CapabilityError::Failed(
                "this agent runs without a config file; there is nothing to replace".to_owned(),
            )
        })?;
        let path = current.path.clone();

        let proposed = AgentConfig::parse(text, &path).map_err(|err| refused(err.to_string()))?;
        if proposed.data_dir != current.data_dir {
            return Err(refused(format!(
                "`data_dir` would change from {} to {}; only connector settings may change",
                current.data_dir.display(),
                proposed.data_dir.display()
            )));
        }
        // The policy file is the practice's, never the hub's to move or drop.
        if proposed.policy != current.policy {
            let shown = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map_or_else(|| "none".to_owned(), |p| p.display().to_string())
            };
            return Err(refused(format!(
                "`policy` would change from {} to {}; the policy file is set by the practice, not by a proposal",
                shown(&current.policy),
                shown(&proposed.policy)
            )));
        }
        // Where the agent's data goes at the vendor is not a connector setting either: a
        // proposal may not point the uplink at another hub or trust another CA.
        let hub_of = |config: &AgentConfig| {
            config
                .hub
                .as_ref()
                .map(|hub| (hub.url.clone(), hub.ca_file.clone(), hub.token.clone()))
        };
        if hub_of(&proposed) != hub_of(current) {
            return Err(refused(
                "the `[hub]` table would change; which hub this agent trusts is set at the practice, not by a proposal".to_owned(),
            ));
        }
        let proposed_table: toml::Table = text
            .parse()
            .map_err(|err: toml::de::Error| refused(err.to_string()))?;
        if let Some(key) = find_mask(&proposed_table, "") {
            return Err(refused(format!(
                "key `{key}` still reads {MASK:?} (masked by diagnostics); give its real value"
            )));
        }
        if job.cancel.is_cancelled() {
            return Err(CapabilityError::Cancelled);
        }

        let new_text = text.to_owned();
        let (target, backup) = blocking(move || apply(&path, &new_text)).await?;
        cx.reload.request();
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        let _ = out
            .write_json(&json!({
                "applied": true,
                "path": target.display().to_string(),
                "backup": backup.display().to_string(),
                "config_sha256": sha256,
            }))
            .await;
        Ok(format!(
            "applied; backup at {}; agent restarting",
            backup.display()
        ))
    }
}

/// Backs up the config at `path` and replaces it with `text` atomically; returns the file
/// written and the backup.
fn apply(path: &Path, text: &str) -> Result<(PathBuf, PathBuf), CapabilityError> {
    // Replace the file a link points to, not the link: the practice's layout stays.
    let target = std::fs::canonicalize(path).map_err(|err| io_failed("resolving", path, &err))?;
    let dir = target.parent().ok_or_else(|| {
        CapabilityError::Failed(format!("{} has no parent folder", target.display()))
    })?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "agent.toml".to_owned());
    let metadata = std::fs::metadata(&target)
        .map_err(|err| io_failed("reading the metadata of", &target, &err))?;

    let backup = dir.join(format!("{name}.{}.bak", now_ms()));
    std::fs::copy(&target, &backup).map_err(|err| io_failed("backing up to", &backup, &err))?;

    let temp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        // The config can hold an enrollment token: keep the current file's permissions.
        file.set_permissions(metadata.permissions())?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io_failed("writing the new config to", &target, &err));
    }
    sync_dir(dir);
    Ok((target, backup))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::testutil::{self, MINIMAL_CONFIG};

    const POLICY: &str = "[allow]\n\"config.propose\" = true\n";

    fn backups(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bak"))
            .collect()
    }

    fn assert_refused(result: Result<String, CapabilityError>, expected: &str) {
        match result {
            Err(CapabilityError::Refused { rule, reason }) => {
                assert_eq!(rule, "config.propose");
                assert!(reason.contains(expected), "{reason}");
            }
            other => panic!("expected a refusal containing {expected:?}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn refuses_invalid_config_data_dir_policy_and_mask_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cx, reloads) = testutil::context(dir.path());
        cx.config = Some(testutil::write_config(dir.path()));
        let policy = testutil::policy(POLICY);
        let cases = [
            ("data_dir = [unclosed".to_owned(), "agent.toml"),
            (
                MINIMAL_CONFIG.replace("listen = \"0.0.0.0:2575\"", ""),
                "listen",
            ),
            (
                MINIMAL_CONFIG.replace("data_dir = \"./data\"", "data_dir = \"/elsewhere\""),
                "`data_dir` would change",
            ),
            (
                format!("policy = \"/tmp/permissive.toml\"\n{MINIMAL_CONFIG}"),
                "`policy` would change",
            ),
            (
                MINIMAL_CONFIG.replace("enroll-SECRET-123", "***"),
                "the `[hub]` table would change",
            ),
        ];
        for (text, expected) in cases {
            let (result, output) =
                testutil::run(&ConfigPropose, &cx, &policy, json!({"config": text})).await;
            assert_refused(result, expected);
            assert!(output.is_empty());
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("agent.toml")).unwrap(),
            MINIMAL_CONFIG
        );
        assert!(backups(dir.path()).is_empty());
        assert!(!reloads.has_changed().unwrap());
    }

    #[tokio::test]
    async fn applies_a_valid_config_with_a_backup_and_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cx, mut reloads) = testutil::context(dir.path());
        cx.config = Some(testutil::write_config(dir.path()));
        let policy = testutil::policy(POLICY);
        let proposed = MINIMAL_CONFIG.replace("0.0.0.0:2575", "127.0.0.1:2575");
        let (result, output) =
            testutil::run(&ConfigPropose, &cx, &policy, json!({"config": proposed})).await;
        let summary = result.unwrap();
        assert!(summary.starts_with("applied; backup at "), "{summary}");
        assert!(summary.ends_with("; agent restarting"), "{summary}");

        let config_path = dir.path().join("agent.toml");
        assert_eq!(std::fs::read_to_string(&config_path).unwrap(), proposed);
        let backups = backups(dir.path());
        assert_eq!(backups.len(), 1);
        assert_eq!(
            std::fs::read_to_string(&backups[0]).unwrap(),
            MINIMAL_CONFIG
        );
        let name = backups[0].file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with("agent.toml.") && name.ends_with(".bak"),
            "{name}"
        );

        let line = &testutil::lines(&output)[0];
        assert_eq!(line["applied"], true);
        assert_eq!(
            line["config_sha256"],
            hex::encode(Sha256::digest(proposed.as_bytes()))
        );
        assert!(reloads.has_changed().unwrap());
        assert_eq!(*reloads.borrow_and_update(), 1);
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn refuses_dropping_or_moving_the_policy_but_accepts_it_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cx, _reloads) = testutil::context(dir.path());
        let with_policy = format!("policy = \"policy.toml\"\n{MINIMAL_CONFIG}");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &with_policy).unwrap();
        cx.config = Some(std::sync::Arc::new(AgentConfig::load(&path).unwrap()));
        let policy = testutil::policy(POLICY);

        let (result, _) = testutil::run(
            &ConfigPropose,
            &cx,
            &policy,
            json!({"config": MINIMAL_CONFIG}),
        )
        .await;
        assert_refused(result, "to none");
        let moved = with_policy.replace("policy.toml", "other/policy.toml");
        let (result, _) =
            testutil::run(&ConfigPropose, &cx, &policy, json!({"config": moved})).await;
        assert_refused(result, "`policy` would change");

        let same = with_policy.replace("0.0.0.0:2575", "127.0.0.1:2575");
        let (result, _) = testutil::run(
            &ConfigPropose,
            &cx,
            &policy,
            json!({"config": same.clone()}),
        )
        .await;
        result.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), same);
    }

    #[test]
    fn it_always_needs_approval() {
        assert!(ConfigPropose.always_needs_approval());
    }
}
