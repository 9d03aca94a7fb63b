//! Each rule path of `Policy::decide`, on security.md's example and small variations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{allowed, assert_refused, awaiting, decide, example, parse, EXAMPLE};
use outpost_policy::Decision;
use serde_json::json;

#[test]
fn true_grant_is_allowed_unattended() {
    let policy = example();
    assert_eq!(
        decide(&policy, "health", json!({})),
        allowed("allow.health")
    );
    assert_eq!(
        decide(&policy, "logs.tail", json!({})),
        allowed("allow.\"logs.tail\"")
    );
    assert_eq!(
        decide(&policy, "backup.run", json!({})),
        allowed("allow.\"backup.run\"")
    );
}

#[test]
fn capability_not_in_allow_is_refused_by_default_deny() {
    let policy = example();
    for cap in [
        "connector.pause",
        "files.write",
        "backup.restore",
        "config.propose",
    ] {
        let reason = assert_refused(&decide(&policy, cap, json!({})), "default-deny", cap);
        assert_eq!(reason, format!("the policy does not allow `{cap}`"));
    }
}

#[test]
fn capability_set_to_false_is_refused_by_default_deny() {
    let policy = parse("[allow]\nhealth = false\n");
    assert_refused(
        &decide(&policy, "health", json!({})),
        "default-deny",
        "health",
    );
}

#[test]
fn access_approval_makes_every_true_grant_wait() {
    let policy = parse(&EXAMPLE.replace("access = \"unattended\"", "access = \"approval\""));
    assert_eq!(decide(&policy, "health", json!({})), awaiting("access"));
    // Refusals still come first: nobody is asked to approve what may not run.
    assert_refused(
        &decide(&policy, "files.write", json!({})),
        "default-deny",
        "files.write",
    );
}

#[test]
fn approval_grant_waits_for_approval() {
    let policy = parse("[allow]\n\"backup.restore\" = \"approval\"\n");
    assert_eq!(
        decide(&policy, "backup.restore", json!({})),
        awaiting("allow.\"backup.restore\"")
    );
    let policy = parse("[allow]\n\"config.propose\" = { approval = true }\n");
    assert_eq!(
        decide(&policy, "config.propose", json!({})),
        awaiting("allow.\"config.propose\".approval")
    );
}

#[test]
fn unknown_capability_is_refused_with_its_own_rule() {
    let policy = example();
    let reason = assert_refused(
        &decide(&policy, "health.check", json!({})),
        "unknown-capability",
        "\"health.check\"",
    );
    assert_eq!(reason, "no capability is named \"health.check\"");
}

#[test]
fn hostile_capability_name_is_escaped_and_shortened_in_the_reason() {
    let policy = example();
    let name = format!("x\ny{}", "z".repeat(500));
    let reason = assert_refused(
        &decide(&policy, &name, json!({})),
        "unknown-capability",
        "\\n",
    );
    assert!(!reason.contains('\n') && reason.len() < 120, "{reason}");
}

#[test]
fn shell_is_refused_unless_enabled() {
    let policy = example();
    assert_refused(
        &decide(&policy, "shell", json!({})),
        "default-deny",
        "shell",
    );
}

#[test]
fn enabled_shell_always_waits_for_approval() {
    for value in ["true", "\"approval\"", "{ approval = true }", "{}"] {
        let policy = parse(&format!(
            "access = \"unattended\"\n[allow]\nshell = {value}\n"
        ));
        let expected = if value.contains("approval = true") {
            "allow.shell.approval"
        } else {
            "allow.shell"
        };
        assert_eq!(
            decide(&policy, "shell", json!({})),
            awaiting(expected),
            "shell = {value}"
        );
    }
}

#[test]
fn sql_query_within_the_grant_waits_for_approval() {
    let policy = example();
    let args = json!({"table": "patient", "columns": ["PatNum", "LName"], "limit": 500});
    assert_eq!(
        decide(&policy, "sql.query", args),
        awaiting("allow.\"sql.query\".approval")
    );
}

#[test]
fn sql_query_without_approval_is_allowed() {
    let policy =
        parse("[allow]\n\"sql.query\" = { tables = { appointment = \"*\" }, max_rows = 10 }\n");
    let args = json!({"table": "appointment", "limit": 10});
    assert_eq!(
        decide(&policy, "sql.query", args),
        allowed("allow.\"sql.query\"")
    );
}

#[test]
fn sql_query_on_an_unlisted_table_is_refused() {
    let policy = example();
    let args = json!({"table": "payment", "columns": ["Amount"], "limit": 1});
    let reason = assert_refused(
        &decide(&policy, "sql.query", args),
        "allow.\"sql.query\".tables",
        "table \"payment\" is not listed",
    );
    assert!(!reason.contains("Amount"));
}

#[test]
fn sql_query_on_an_unlisted_column_is_refused() {
    let policy = example();
    for columns in [json!(["PatNum", "SSN"]), json!(["*"]), json!(["lname"])] {
        let args = json!({"table": "patient", "columns": columns, "limit": 1});
        assert_refused(
            &decide(&policy, "sql.query", args),
            "allow.\"sql.query\".tables",
            "is not listed",
        );
    }
}

#[test]
fn sql_query_for_all_columns_needs_a_star_table() {
    let policy = example();
    let args = json!({"table": "patient", "limit": 1});
    assert_refused(
        &decide(&policy, "sql.query", args),
        "allow.\"sql.query\".tables",
        "argument `columns` is missing",
    );
    for args in [
        json!({"table": "appointment", "limit": 1}),
        json!({"table": "appointment", "columns": ["*"], "limit": 1}),
        json!({"table": "appointment", "columns": ["AptNum", "AptDateTime"], "limit": 1}),
    ] {
        assert_eq!(
            decide(&policy, "sql.query", args.clone()),
            awaiting("allow.\"sql.query\".approval"),
            "{args}"
        );
    }
}

#[test]
fn sql_injection_through_a_column_name_is_refused_even_on_a_star_table() {
    let policy = example();
    let args = json!({"table": "appointment", "columns": ["AptNum FROM patient --"], "limit": 1});
    assert_refused(
        &decide(&policy, "sql.query", args),
        "allow.\"sql.query\".tables",
        "is not listed",
    );
}

#[test]
fn sql_query_over_the_row_limit_is_refused() {
    let policy = example();
    for limit in [
        json!(501),
        json!(0),
        json!(-1),
        json!(1.5),
        json!("10"),
        json!(null),
    ] {
        let args = json!({"table": "appointment", "limit": limit});
        assert_refused(
            &decide(&policy, "sql.query", args),
            "allow.\"sql.query\".max_rows",
            "from 1 to 500",
        );
    }
    let args = json!({"table": "appointment"});
    assert_refused(
        &decide(&policy, "sql.query", args),
        "allow.\"sql.query\".max_rows",
        "limit",
    );
}

#[test]
fn sql_query_with_malformed_arguments_is_refused() {
    let policy = example();
    for args in [
        json!({}),
        json!({"table": 5, "limit": 1}),
        json!({"table": "patient", "columns": "LName", "limit": 1}),
        json!({"table": "patient", "columns": [], "limit": 1}),
        json!({"table": "patient", "columns": [1], "limit": 1}),
    ] {
        let decision = decide(&policy, "sql.query", args.clone());
        assert!(
            matches!(&decision, Decision::Refused { rule, .. } if rule == "allow.\"sql.query\".tables"),
            "{args}: {decision:?}"
        );
    }
}

#[test]
fn files_job_without_a_path_is_refused() {
    let policy = example();
    assert_refused(
        &decide(&policy, "files.read", json!({})),
        "allow.\"files.read\".roots",
        "argument `path`",
    );
}

#[test]
fn decision_rule_accessor_covers_every_variant() {
    assert_eq!(allowed("a").rule(), "a");
    assert_eq!(awaiting("b").rule(), "b");
    let refused = Decision::Refused {
        rule: "c".into(),
        reason: "d".into(),
    };
    assert_eq!(refused.rule(), "c");
}
