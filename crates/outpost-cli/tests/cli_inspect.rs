//! `outpost hl7 search` and `outpost queue …` against a running agent's queue.

use std::collections::BTreeSet;

use outpost_hl7::AckCode;
use outpost_testkit::{
    ack_of, describe_output, free_port, one_route_config, samples, send_each, Agent,
};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// The control ids of the items `outpost hl7 search` printed.
fn control_ids(search_output: &str) -> BTreeSet<String> {
    search_output
        .lines()
        .filter(|line| line.starts_with("item "))
        .filter_map(|line| {
            line.split("control id ")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|id| id.to_string()).collect()
}

#[test]
fn hl7_search_finds_messages_by_type_control_id_pid_and_text() {
    // The downstream is absent, so the messages stay in transit.
    let agent = Agent::start(
        BIN,
        &one_route_config(
            free_port(),
            free_port(),
            "",
            "retry_initial_ms = 50\nretry_max_secs = 1",
            "",
        ),
    );
    let messages = [
        samples::oru_r01("FIND-ORU-1", "PAT-A", "ADEYEMI", "TOLU", 3),
        samples::adt("FIND-ADT-1", "A01", "PAT-B", "BJORK", "INGA"),
        samples::adt("FIND-ADT-2", "A08", "PAT-A", "HARGREAVES", "TOLU"),
        samples::orm_o01("FIND-ORM-1", "PAT-C", "CHEN", "WEI"),
    ];
    for reply in send_each(agent.port(), &messages) {
        assert_eq!(ack_of(&reply).code, AckCode::AA);
    }
    let cases: [(&[&str], &[&str]); 8] = [
        (&["--type", "ORU^R01"], &["FIND-ORU-1"]),
        (&["--type", "ADT"], &["FIND-ADT-1", "FIND-ADT-2"]),
        (&["--type", "ADT^A08"], &["FIND-ADT-2"]),
        (&["--control-id", "FIND-ADT-1"], &["FIND-ADT-1"]),
        (&["--pid", "PAT-A"], &["FIND-ORU-1", "FIND-ADT-2"]),
        (&["--text", "hargreaves"], &["FIND-ADT-2"]),
        (&["--type", "ADT", "--pid", "PAT-A"], &["FIND-ADT-2"]),
        (&["--pid", "PAT-Z"], &[]),
    ];
    let mut failures = Vec::new();
    for (args, expected) in cases {
        let output = agent.search(args);
        if control_ids(&output) != set(expected) {
            failures.push(format!(
                "hl7 search {args:?}: expected {expected:?}, got:\n{output}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let shown = agent.search(&["--control-id", "FIND-ORM-1", "--show"]);
    assert!(
        shown.contains("    PID|1||PAT-C^^^SMITHPEDS^MR||CHEN^WEI"),
        "--show prints the segments:\n{shown}"
    );
}

#[test]
fn queue_actions_take_config_after_the_action_as_hl7_search_does() {
    let agent = Agent::start(BIN, &one_route_config(free_port(), free_port(), "", "", ""));
    let reply = send_each(
        agent.port(),
        &[samples::adt("ORDER1", "A08", "PAT-A", "ARG", "ORDER")],
    );
    assert_eq!(ack_of(&reply[0]).code, AckCode::AA);
    let config = agent.config_path().to_string_lossy().into_owned();
    // `outpost hl7 search --config FILE` takes the flag after the action; so should
    // `outpost queue status --config FILE`, the form support staff (and our docs) type.
    for action in [&["status"][..], &["dead"], &["retry", "--all"]] {
        let mut args = vec!["queue"];
        args.extend_from_slice(action);
        args.extend_from_slice(&["--config", &config]);
        let output = agent.run_cli(&args);
        assert!(
            output.status.success(),
            "`outpost {}` failed\n{}",
            args.join(" "),
            describe_output(&output)
        );
    }
}
