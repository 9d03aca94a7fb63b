//! The agent's log as a service manager or a support engineer reads it: from a file.

use outpost_testkit::{free_port, one_route_config, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

#[test]
fn the_agent_log_is_plain_text_when_written_to_a_file() {
    let agent = Agent::start(BIN, &one_route_config(free_port(), free_port(), "", "", ""));
    agent.wait_for_log_line(std::time::Duration::from_secs(10), &["agent started"]);
    let raw = agent.raw_log();
    let coloured: Vec<&str> = raw
        .lines()
        .filter(|line| line.contains('\u{1b}'))
        .take(3)
        .collect();
    assert!(
        coloured.is_empty(),
        "stderr is a file, not a terminal, yet log lines carry ANSI colour codes \
         (so `grep 'reason='` misses them): {coloured:?}"
    );
}
