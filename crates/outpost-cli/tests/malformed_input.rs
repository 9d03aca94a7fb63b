//! Broken input on one connection: the sender gets a reason, the agent logs why, and a
//! well-behaved connection beside it keeps getting its AAs during and after.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use outpost_hl7::AckCode;
use outpost_testkit::{
    ack_of, free_port, one_route_config, peak_rss_kb, read_frame, samples, write_frame, Agent,
    SteadySender,
};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const QUICK_RETRY: &str = "retry_initial_ms = 50\nretry_max_secs = 1";

/// An agent whose downstream is absent (the source acknowledges on commit, so it does not
/// matter here) and a steady sender with a few AAs already.
fn agent_with_steady_sender(source_extra: &str, route_extra: &str) -> (Agent, SteadySender) {
    let agent = Agent::start(
        BIN,
        &one_route_config(
            free_port(),
            free_port(),
            source_extra,
            QUICK_RETRY,
            route_extra,
        ),
    );
    let steady = SteadySender::start(agent.port());
    steady.wait_for_more_acks(5, || format!("agent log tail:\n{}", agent.log_tail(20)));
    (agent, steady)
}

/// After the broken input: the steady connection still gets AAs, and never failed.
fn assert_steady_sender_unharmed(agent: &Agent, steady: SteadySender) {
    steady.wait_for_more_acks(5, || format!("agent log tail:\n{}", agent.log_tail(20)));
    steady.stop();
}

fn connect(agent: &Agent) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", agent.port()))
        .unwrap_or_else(|err| panic!("connect to the agent on 127.0.0.1:{}: {err}", agent.port()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap_or_else(|err| panic!("set a read timeout: {err}"));
    stream
}

/// Sends one frame on a new connection and returns the reply.
fn exchange(agent: &Agent, payload: &[u8]) -> Vec<u8> {
    let mut stream = connect(agent);
    write_frame(&mut stream, payload).unwrap_or_else(|err| {
        panic!(
            "send the frame: {err}\nagent log tail:\n{}",
            agent.log_tail(20)
        )
    });
    read_frame(&mut stream, &mut Vec::new())
        .unwrap_or_else(|err| panic!("no reply: {err}\nagent log tail:\n{}", agent.log_tail(20)))
        .unwrap_or_else(|| {
            panic!(
                "connection closed without a reply\nagent log tail:\n{}",
                agent.log_tail(20)
            )
        })
}

/// Reads until the agent closes the connection; panics if it sends anything or stays open.
fn assert_closed_by_agent(stream: &mut TcpStream, agent: &Agent) {
    let mut buf = [0u8; 1024];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "expected the agent to close the connection, it sent {:?}\nagent log tail:\n{}",
            String::from_utf8_lossy(&buf[..n]),
            agent.log_tail(20)
        ),
        Err(err) => panic!(
            "expected the agent to close the connection, reading gave {err}\nagent log tail:\n{}",
            agent.log_tail(20)
        ),
    }
}

#[test]
fn a_message_without_msh_gets_ae_with_the_reason_and_is_kept_for_inspection() {
    let (agent, steady) = agent_with_steady_sender("", "");
    let reply = exchange(
        &agent,
        b"PID|1||NOMSH77^^^SMITHPEDS^MR||HEADLESS^HAL\rOBX|1|TX|||no header zq7x",
    );
    let ack = ack_of(&reply);
    let text = ack.text.clone().unwrap_or_default();
    assert_eq!(
        ack.code,
        AckCode::AE,
        "reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        text.contains("malformed HL7 message") && text.to_lowercase().contains("msh"),
        "the AE should say the message has no MSH; text {text:?}"
    );
    assert_steady_sender_unharmed(&agent, steady);

    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["refused and kept for inspection", "malformed HL7 message"],
    );
    let found = agent.search(&["--rejected", "--text", "no header ZQ7X"]);
    assert!(
        found.lines().filter(|l| l.starts_with("item ")).count() == 1
            && found.contains("REFUSED: malformed HL7 message"),
        "hl7 search --rejected should find the refused message with its reason:\n{found}"
    );
    let status = agent.queue(&["status"]);
    assert!(
        status.contains("refused at intake (kept for inspection): 1"),
        "queue status:\n{status}"
    );
}

#[test]
fn bad_delimiters_get_ae() {
    let (agent, steady) = agent_with_steady_sender("", "");
    let reply = exchange(
        &agent,
        b"MSH|^^\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123101500||ORU^R01|BADDELIM1|P|2.5\rPID|1||MRN1^^^X^MR||DOE^JANE",
    );
    let ack = ack_of(&reply);
    let text = ack.text.clone().unwrap_or_default();
    assert_eq!(
        ack.code,
        AckCode::AE,
        "reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        text.contains("delimiters"),
        "the AE should name the delimiters; text {text:?}"
    );
    assert_steady_sender_unharmed(&agent, steady);
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["refused and kept for inspection", "invalid delimiters"],
    );
}

#[test]
fn an_oversized_frame_gets_ar_and_memory_stays_bounded() {
    const LIMIT: usize = 1_048_576;
    const FRAME_BYTES: usize = 64 * 1024 * 1024;
    let (agent, steady) = agent_with_steady_sender(&format!("max_frame_bytes = {LIMIT}"), "");
    let peak_before = peak_rss_kb(agent.pid());

    let mut stream = connect(&agent);
    let header = b"\x0bMSH|^~\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123101500||ORU^R01|HUGE0001|P|2.5\rPID|1||MRN1^^^X^MR||DOE^JANE\r";
    stream.write_all(header).expect("send the header");
    let segment = b"OBX|1|ED|PDF^Report^L||^application^pdf^Base64^JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r";
    let chunk: Vec<u8> = segment.iter().copied().cycle().take(64 * 1024).collect();
    let mut sent = header.len() - 1;
    let mut checked_half_way = false;
    while sent < FRAME_BYTES {
        let n = chunk.len().min(FRAME_BYTES - sent);
        stream.write_all(&chunk[..n]).expect("stream the frame");
        sent += n;
        if !checked_half_way && sent >= FRAME_BYTES / 2 {
            checked_half_way = true;
            // Half way through the frame: the steady connection is still served.
            steady.wait_for_more_acks(3, || format!("agent log tail:\n{}", agent.log_tail(20)));
        }
    }
    stream.write_all(b"\x1c\r").expect("end the frame");
    let reply = read_frame(&mut stream, &mut Vec::new())
        .unwrap_or_else(|err| {
            panic!(
                "no reply to the oversized frame: {err}\nagent log tail:\n{}",
                agent.log_tail(20)
            )
        })
        .unwrap_or_else(|| {
            panic!(
                "closed without a reply\nagent log tail:\n{}",
                agent.log_tail(20)
            )
        });
    let ack = ack_of(&reply);
    let text = ack.text.clone().unwrap_or_default();
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::AR, "HUGE0001"),
        "reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        text.contains(&LIMIT.to_string()),
        "the AR should name the limit {LIMIT}; text {text:?}"
    );

    let peak = peak_rss_kb(agent.pid()).expect("VmHWM from /proc/<pid>/status");
    println!("agent peak RSS: {peak_before:?} kB before the 64 MiB frame, {peak} kB after");
    assert!(
        peak < 48 * 1024,
        "the agent's peak RSS reached {peak} kB (before the frame: {peak_before:?} kB) for a {FRAME_BYTES}-byte frame with max_frame_bytes {LIMIT}"
    );
    assert_steady_sender_unharmed(&agent, steady);
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["exceeds max_frame_bytes", &LIMIT.to_string()],
    );
}

#[test]
fn garbage_bytes_close_the_connection() {
    let (agent, steady) = agent_with_steady_sender("", "");
    let mut stream = connect(&agent);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: outpost\r\n\r\n")
        .expect("send garbage");
    assert_closed_by_agent(&mut stream, &agent);
    assert_steady_sender_unharmed(&agent, steady);
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["closing connection", "outside an MLLP frame"],
    );
}

#[test]
fn half_a_frame_then_close_is_logged_and_harmless() {
    let (agent, steady) = agent_with_steady_sender("", "");
    let mut stream = connect(&agent);
    stream
        .write_all(b"\x0bMSH|^~\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123101500||ORU^R01|HALF0001|P|2.5\rPID|1||MRN")
        .expect("send half a frame");
    // While the frame is open, the steady connection is served.
    steady.wait_for_more_acks(3, || format!("agent log tail:\n{}", agent.log_tail(20)));
    stream.shutdown(Shutdown::Write).expect("close our side");
    assert_closed_by_agent(&mut stream, &agent);
    assert_steady_sender_unharmed(&agent, steady);
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["closing connection", "closed the connection mid-frame"],
    );
    let found = agent.search(&["--rejected", "--control-id", "HALF0001"]);
    assert!(
        found.contains("no stored message matches"),
        "half a frame must not be stored:\n{found}"
    );
}

#[test]
fn a_message_with_no_route_gets_ar() {
    let (agent, steady) = agent_with_steady_sender("", "msh9 = [\"ADT\"]");
    let reply = exchange(
        &agent,
        &samples::oru_r01("NOROUTE1", "MRN000005", "LOST", "LOU", 2),
    );
    let ack = ack_of(&reply);
    let text = ack.text.clone().unwrap_or_default();
    assert_eq!(
        (ack.code, ack.control_id.as_str()),
        (AckCode::AR, "NOROUTE1"),
        "reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        text.contains("no route") && text.contains("ORU^R01"),
        "the AR should say no route takes ORU^R01; text {text:?}"
    );
    assert_steady_sender_unharmed(&agent, steady);
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["refused and kept for inspection", "no route from source"],
    );
}

#[test]
fn a_message_with_an_empty_control_id_gets_ae() {
    let (agent, steady) = agent_with_steady_sender("", "");
    let reply = exchange(
        &agent,
        b"MSH|^~\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123101500||ORU^R01||P|2.5\rPID|1||MRN1^^^X^MR||DOE^JANE",
    );
    let ack = ack_of(&reply);
    let text = ack.text.clone().unwrap_or_default();
    assert_eq!(
        ack.code,
        AckCode::AE,
        "reply {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert!(
        text.contains("MSH-10"),
        "the AE should name MSH-10; text {text:?}"
    );
    assert_steady_sender_unharmed(&agent, steady);
    agent.wait_for_log_line(
        Duration::from_secs(10),
        &["refused and kept for inspection", "MSH-10"],
    );
}
