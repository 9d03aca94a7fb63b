//! Shared fixtures: the example policy from security.md and request helpers.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use jiff::Timestamp;
use outpost_policy::{Decision, Policy, Request};
use serde_json::Value;

/// security.md's example policy, byte for byte.
pub const EXAMPLE: &str = r#"# /etc/outpost/policy.toml — owned by the practice's IT; the hub cannot change it.
access = "unattended"          # or "approval": every job waits for a local approval
maintenance_window = "Sun 01:00-04:00 America/New_York"

[allow]
health = true
"logs.tail" = true
"logs.search" = true
"connector.restart" = true
diagnostics = true
"backup.run" = true
"update.apply" = "window"      # only inside the maintenance window
"files.read" = { roots = ["/var/lib/outpost/exports"] }
"sql.query" = { approval = true, tables = { patient = ["PatNum", "LName", "FName", "Birthdate"], appointment = "*" }, max_rows = 500 }
"#;

pub fn parse(text: &str) -> Policy {
    match Policy::parse(text, Path::new("policy.toml")) {
        Ok(policy) => policy,
        Err(err) => panic!("policy should parse: {err}\n--- policy ---\n{text}"),
    }
}

pub fn example() -> Policy {
    parse(EXAMPLE)
}

/// A Monday in January, far from the example's Sunday window.
pub fn weekday_noon() -> Timestamp {
    ts("2025-01-06T17:00:00Z")
}

pub fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

pub fn decide_at(policy: &Policy, capability: &str, args: Value, now: Timestamp) -> Decision {
    policy.decide(&Request {
        capability,
        args: &args,
        now,
    })
}

pub fn decide(policy: &Policy, capability: &str, args: Value) -> Decision {
    decide_at(policy, capability, args, weekday_noon())
}

pub fn allowed(rule: &str) -> Decision {
    Decision::Allowed { rule: rule.into() }
}

pub fn awaiting(rule: &str) -> Decision {
    Decision::AwaitingApproval { rule: rule.into() }
}

/// Asserts a refusal by `rule` whose reason contains `needle`; returns the reason.
#[track_caller]
pub fn assert_refused(decision: &Decision, rule: &str, needle: &str) -> String {
    match decision {
        Decision::Refused { rule: r, reason } if r == rule && reason.contains(needle) => {
            reason.clone()
        }
        other => panic!("expected a refusal by `{rule}` mentioning {needle:?}, got {other:?}"),
    }
}
