//! What a `jsonl` sink wrote: one JSON value (a change event) per line, read back and
//! waited for by the database-sync tests.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::{wait_until_explained, Agent};

/// How long a test waits for events before it fails, explaining what it saw.
const WAIT: Duration = Duration::from_secs(120);

/// Every complete line of the file as JSON (none if the file is not there yet); a line
/// that is not JSON fails the test, naming it. A last line without its newline is still
/// being written (or was cut short by a kill, and the sink cuts it off on restart), so it
/// is not read.
pub fn read_events(path: &Path) -> Vec<Value> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let complete = bytes
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(&[][..], |end| &bytes[..end]);
    let text = String::from_utf8_lossy(complete);
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("line {line:?}: {err}")))
        .collect()
}

/// Waits until `done` accepts the file's events and returns them; on timeout the test
/// fails with `done`'s last complaint and the agent's log tail.
pub fn wait_for_events(
    agent: &Agent,
    path: &Path,
    what: &str,
    done: impl Fn(&[Value]) -> Result<(), String>,
) -> Vec<Value> {
    wait_until_explained(
        WAIT,
        what,
        || {
            let events = read_events(path);
            done(&events).map(|()| events)
        },
        || format!("agent log tail:\n{}", agent.log_tail(30)),
    )
}

/// Waits until the file holds at least `count` events.
pub fn wait_for_count(agent: &Agent, path: &Path, count: usize, what: &str) -> Vec<Value> {
    wait_for_events(agent, path, what, |events| {
        if events.len() >= count {
            Ok(())
        } else {
            Err(format!("{} of {count} events so far", events.len()))
        }
    })
}

/// An event's table, op and key: what order checks compare.
pub fn brief(event: &Value) -> (String, String, Value) {
    (
        event["table"].as_str().unwrap_or_default().to_owned(),
        event["op"].as_str().unwrap_or_default().to_owned(),
        event["key"].clone(),
    )
}
