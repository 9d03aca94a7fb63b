//! A message the downstream keeps refusing becomes a dead letter that support can list
//! and put back in line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use outpost_hl7::{AckCode, Message};
use outpost_testkit::{
    ack_of, free_port, one_route_config, samples, send_each, wait_until_explained, Agent,
    DownstreamReply, ScriptedDownstream,
};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

#[test]
fn dead_letters_are_listed_and_can_be_retried() {
    // DEAD0001 is answered AE the first two times it arrives, everything else AA.
    let seen: Mutex<HashMap<String, usize>> = Mutex::new(HashMap::new());
    let downstream = ScriptedDownstream::start(move |_, payload| {
        let id = Message::parse(payload)
            .ok()
            .and_then(|m| m.control_id())
            .unwrap_or_default();
        let mut seen = seen.lock().expect("lock");
        let count = seen.entry(id.clone()).or_default();
        *count += 1;
        if id == "DEAD0001" && *count <= 2 {
            DownstreamReply {
                code: AckCode::AE,
                text: Some("patient not found in the lab system".into()),
            }
        } else {
            DownstreamReply {
                code: AckCode::AA,
                text: None,
            }
        }
    });
    let sink = "max_attempts = 2\nretry_initial_ms = 50\nretry_max_secs = 1";
    let agent = Agent::start(
        BIN,
        &one_route_config(free_port(), downstream.port(), "", sink, ""),
    );
    let explain = || {
        format!(
            "downstream got: {}\nagent log tail:\n{}",
            downstream.summary(),
            agent.log_tail(20)
        )
    };

    let first = send_each(
        agent.port(),
        &[samples::oru_r01(
            "DEAD0001",
            "MRN000013",
            "UNLUCKY",
            "UNA",
            2,
        )],
    );
    assert_eq!(ack_of(&first[0]).code, AckCode::AA);
    let dead = wait_until_explained(
        Duration::from_secs(30),
        "`outpost queue dead` lists DEAD0001",
        || {
            let dead = agent.queue(&["dead"]);
            if dead.contains("DEAD0001") {
                Ok(dead)
            } else {
                Err(dead)
            }
        },
        explain,
    );
    assert!(
        dead.contains("sink out")
            && dead.contains("attempts 2")
            && dead.contains("downstream answered AE"),
        "the dead letter should show its sink, attempts and last error:\n{dead}"
    );

    // A dead letter does not hold up the messages behind it.
    let second = send_each(
        agent.port(),
        &[samples::adt("LIVE0002", "A08", "MRN000014", "LUCKY", "LUC")],
    );
    assert_eq!(ack_of(&second[0]).code, AckCode::AA);
    wait_until_explained(
        Duration::from_secs(30),
        "LIVE0002 is delivered while DEAD0001 is dead",
        || Some(()).filter(|()| agent.sink_counts("out").0 == (0, 1, 1)),
        explain,
    );

    let retried = agent.queue(&["retry", "--all"]);
    assert!(
        retried.contains("1 dead letter(s) put back"),
        "queue retry --all said:\n{retried}"
    );
    wait_until_explained(
        Duration::from_secs(30),
        "DEAD0001 is delivered after the retry",
        || {
            let (counts, status) = agent.sink_counts("out");
            if counts == (0, 0, 2) {
                Ok(())
            } else {
                Err(status)
            }
        },
        explain,
    );
    let arrivals: Vec<(String, AckCode)> = downstream
        .received()
        .iter()
        .map(|(raw, code)| {
            (
                Message::parse(raw)
                    .ok()
                    .and_then(|m| m.control_id())
                    .unwrap_or_default(),
                *code,
            )
        })
        .collect();
    let expected: Vec<(String, AckCode)> = [
        ("DEAD0001", AckCode::AE),
        ("DEAD0001", AckCode::AE),
        ("LIVE0002", AckCode::AA),
        ("DEAD0001", AckCode::AA),
    ]
    .iter()
    .map(|(id, code)| (id.to_string(), *code))
    .collect();
    assert_eq!(arrivals, expected, "what the downstream saw and answered");
    let dead_after = agent.queue(&["dead"]);
    assert!(
        dead_after.contains("no dead letters"),
        "after the retry:\n{dead_after}"
    );
}
