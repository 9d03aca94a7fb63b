//! Every capability a job may ask for, one module each. Adding one (`sql.query`,
//! `backup.*`, `update.apply`) is a module here and a line in [`registry`].
//!
//! None of them runs a shell or starts a process. Those that touch files resolve the
//! requested path against the policy's roots again at run time (the policy check before
//! `run` may be stale by then) and never follow a symbolic link in the final component.

use std::ops::RangeInclusive;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::jobs::capability::{CapabilityError, CapabilityHandler, Output};

mod b64;
pub mod config_propose;
pub mod connector;
pub mod diagnostics;
mod files;
pub mod files_list;
pub mod files_read;
pub mod files_write;
pub mod health;
pub mod logs_search;
pub mod logs_tail;
#[cfg(test)]
mod testutil;

/// Every capability this agent can run.
pub fn registry() -> Vec<Arc<dyn CapabilityHandler>> {
    vec![
        Arc::new(health::HealthCapability),
        Arc::new(logs_tail::LogsTail),
        Arc::new(logs_search::LogsSearch),
        Arc::new(connector::ConnectorControl::RESTART),
        Arc::new(connector::ConnectorControl::PAUSE),
        Arc::new(connector::ConnectorControl::RESUME),
        Arc::new(diagnostics::Diagnostics),
        Arc::new(files_list::FilesList),
        Arc::new(files_read::FilesRead),
        Arc::new(files_write::FilesWrite),
        Arc::new(config_propose::ConfigPropose),
    ]
}

/// A job's arguments: an object whose every key is one the capability knows. `null` (or
/// no arguments) is the empty object, and a key set to `null` counts as absent.
pub(crate) struct Args<'a> {
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Args<'a> {
    /// Checks that `args` is an object naming only `known` keys.
    pub(crate) fn new(args: &'a Value, known: &[&str]) -> Result<Args<'a>, CapabilityError> {
        let map = match args {
            Value::Null => None,
            Value::Object(map) => Some(map),
            other => {
                return Err(CapabilityError::BadArgs(format!(
                    "the arguments must be a JSON object, found {}",
                    describe(other)
                )))
            }
        };
        if let Some(unknown) = map
            .into_iter()
            .flat_map(|m| m.keys())
            .find(|key| !known.contains(&key.as_str()))
        {
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            return Err(CapabilityError::BadArgs(format!(
                "unknown argument `{unknown}` (known: {known})"
            )));
        }
        Ok(Args { map })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map
            .and_then(|m| m.get(name))
            .filter(|value| !value.is_null())
    }

    /// An optional string.
    pub(crate) fn str(&self, name: &str) -> Result<Option<&'a str>, CapabilityError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(bad(name, "a string", other)),
        }
    }

    /// A required string; `expected` says what it should hold, for the error.
    pub(crate) fn required_str(
        &self,
        name: &str,
        expected: &str,
    ) -> Result<&'a str, CapabilityError> {
        self.str(name)?.ok_or_else(|| {
            CapabilityError::BadArgs(format!("argument `{name}`: missing; expected {expected}"))
        })
    }

    /// An optional boolean.
    pub(crate) fn bool(&self, name: &str) -> Result<Option<bool>, CapabilityError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(*flag)),
            Some(other) => Err(bad(name, "true or false", other)),
        }
    }

    /// An optional integer within `range`, or `default`.
    pub(crate) fn u64_in(
        &self,
        name: &str,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, CapabilityError> {
        let expected = || format!("an integer from {} to {}", range.start(), range.end());
        match self.get(name) {
            None => Ok(default),
            Some(value) => match value.as_u64() {
                Some(n) if range.contains(&n) => Ok(n),
                _ => Err(bad(name, &expected(), value)),
            },
        }
    }

    /// An optional signed integer (a unix time in ms).
    pub(crate) fn i64(&self, name: &str) -> Result<Option<i64>, CapabilityError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_i64()
                .map(Some)
                .ok_or_else(|| bad(name, "an integer (unix time in milliseconds)", value)),
        }
    }

    /// An optional minimum log level: `error`, `warn`, `info`, `debug` or `trace` (any
    /// case).
    pub(crate) fn level(&self, name: &str) -> Result<Option<tracing::Level>, CapabilityError> {
        const EXPECTED: &str = "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"";
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => text.parse::<tracing::Level>().map(Some).map_err(|_| {
                CapabilityError::BadArgs(format!(
                    "argument `{name}`: expected {EXPECTED}, found {text:?}"
                ))
            }),
            Some(other) => Err(bad(name, EXPECTED, other)),
        }
    }

    /// Whether the argument was given (and not `null`).
    pub(crate) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// `argument `name`: expected …, found …`.
fn bad(name: &str, expected: &str, found: &Value) -> CapabilityError {
    CapabilityError::BadArgs(format!(
        "argument `{name}`: expected {expected}, found {}",
        describe(found)
    ))
}

/// A JSON value for an error message: numbers and booleans as written, anything that could
/// be large (or carry patient data) by its type only.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// The end of a summary for output that hit its size limit.
pub(crate) fn cut_note(out: &Output) -> &'static str {
    if out.is_truncated() {
        " (output cut at the size limit)"
    } else {
        ""
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    outpost_queue::now_ms()
}

/// Waits for `work` unless the job is cancelled first.
pub(crate) async fn unless_cancelled<T>(
    cancel: &tokio_util::sync::CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> Result<T, CapabilityError> {
    tokio::select! {
        _ = cancel.cancelled() => Err(CapabilityError::Cancelled),
        value = work => Ok(value),
    }
}

/// Runs blocking file work on the blocking pool; a panic there is reported, not propagated.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CapabilityError> + Send + 'static,
) -> Result<T, CapabilityError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| CapabilityError::Failed(format!("the file task stopped: {err}")))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use outpost_policy::Capability;
    use serde_json::json;

    #[test]
    fn the_registry_has_one_handler_per_capability() {
        let handlers = registry();
        let mut names: Vec<&str> = handlers.iter().map(|h| h.capability().as_str()).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a capability is registered twice");
        for cap in [
            Capability::Health,
            Capability::LogsTail,
            Capability::LogsSearch,
            Capability::ConnectorRestart,
            Capability::ConnectorPause,
            Capability::ConnectorResume,
            Capability::Diagnostics,
            Capability::FilesList,
            Capability::FilesRead,
            Capability::FilesWrite,
            Capability::ConfigPropose,
        ] {
            assert!(names.contains(&cap.as_str()), "{cap} is missing");
        }
        assert!(!names.contains(&"shell"));
        let approval: Vec<Capability> = handlers
            .iter()
            .filter(|h| h.always_needs_approval())
            .map(|h| h.capability())
            .collect();
        assert_eq!(approval, [Capability::ConfigPropose]);
    }

    #[test]
    fn args_name_the_argument_and_what_was_expected() {
        let value = json!({"lines": 0, "level": "loud", "path": 3});
        let args = Args::new(&value, &["lines", "level", "path"]).unwrap();
        let err = args.u64_in("lines", 1..=5000, 200).unwrap_err().to_string();
        assert!(err.contains("`lines`") && err.contains("1 to 5000") && err.contains("found 0"));
        let err = args.level("level").unwrap_err().to_string();
        assert!(err.contains("`level`") && err.contains("\"warn\""), "{err}");
        let err = args.required_str("path", "a path").unwrap_err().to_string();
        assert!(err.contains("`path`") && err.contains("a string") && err.contains("found 3"));

        let err = Args::new(&json!({"lien": 1}), &["lines"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unknown argument `lien`") && err.contains("lines"),
            "{err}"
        );
        let err = Args::new(&json!([1]), &[]).err().unwrap().to_string();
        assert!(err.contains("JSON object"), "{err}");

        let empty = Args::new(&Value::Null, &["lines"]).unwrap();
        assert_eq!(empty.u64_in("lines", 1..=5000, 200).unwrap(), 200);
        let missing = empty.required_str("path", "a path under the roots");
        assert!(missing.unwrap_err().to_string().contains("missing"));
    }
}
