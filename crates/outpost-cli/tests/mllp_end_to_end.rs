//! HL7 over MLLP through the agent to python-hl7's server: what arrives, in which order,
//! byte for byte; a backlog; and `ack = "on_delivery"`.

use std::time::Duration;

use outpost_hl7::{AckCode, Message};
use outpost_testkit::{
    ack_of, free_port, normalize_segment_ends, one_route_config, samples, send_each,
    skip_peer_tests, wait_until_explained, Agent, PyHl7Server,
};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Fifty varied messages as (control id, text as written to the file). Segment ends are
/// CR except for one LF message and one CRLF message.
fn varied_messages() -> Vec<(String, Vec<u8>)> {
    let families = [
        "GARCIA", "NGUYEN", "OKAFOR", "MUELLER", "SMITH", "KOWALSKI", "TANAKA", "OBRIEN",
    ];
    let givens = [
        "ANA", "MINH", "CHIDI", "LENA", "JOHN", "PIOTR", "YUKI", "SEAN",
    ];
    let mut messages = Vec::new();
    for i in 0..48 {
        let control_id = format!("MSG{i:04}");
        let (family, given) = (families[i % families.len()], givens[(i * 3) % givens.len()]);
        let mrn = format!("MRN{:06}", 100 + i);
        let message = match i % 6 {
            0..=2 => samples::oru_r01(&control_id, &mrn, family, given, 2 + i % 5),
            3 => samples::adt(&control_id, "A01", &mrn, family, given),
            4 => samples::adt(&control_id, "A08", &mrn, family, given),
            _ => samples::orm_o01(&control_id, &mrn, family, given),
        };
        messages.push((control_id, message));
    }
    // Escape sequences: \T\ (&), \F\ (|), \S\ (^), \R\ (~), \E\ (\), and a line break.
    messages.insert(
        7,
        (
            "MSGESC1".to_owned(),
            b"MSH|^~\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123102000||ORU^R01^ORU_R01|MSGESC1|P|2.5.1\r\
PID|1||MRN000900^^^SMITHPEDS^MR||O\\S\\NEIL^MARY \\T\\ ANNE||20120101|F\r\
OBR|1|ORD900||24331-1^Lipid panel^LN\r\
OBX|1|TX|8251-1^Comment^LN||Fasting \\F\\ non-fasting \\T\\ see note\\.br\\path C:\\E\\lab\\E\\in, codes A\\R\\B||||||F\r\
NTE|1||Specimen received \\T\\ processed within 2 hours."
                .to_vec(),
        ),
    );
    let lf: Vec<u8> = samples::oru_r01("MSGLF01", "MRN000901", "ABARA", "NIA", 4)
        .into_iter()
        .map(|b| if b == b'\r' { b'\n' } else { b })
        .collect();
    messages.insert(20, ("MSGLF01".to_owned(), lf));
    let crlf: Vec<u8> = samples::adt("MSGCRLF1", "A08", "MRN000902", "BERG", "OLA")
        .into_iter()
        .flat_map(|b| {
            if b == b'\r' {
                vec![b'\r', b'\n']
            } else {
                vec![b]
            }
        })
        .collect();
    messages.insert(33, ("MSGCRLF1".to_owned(), crlf));
    messages
}

#[test]
fn mllp_send_gets_an_aa_for_each_message_and_pyhl7_receives_them_in_order_byte_identical() {
    if skip_peer_tests(
        "mllp_send_gets_an_aa_for_each_message_and_pyhl7_receives_them_in_order_byte_identical",
    ) {
        return;
    }
    let downstream = PyHl7Server::start(free_port());
    let agent = Agent::start(
        BIN,
        &one_route_config(free_port(), downstream.port(), "", "", ""),
    );
    let messages = varied_messages();
    assert_eq!(messages.len(), 51);

    // mllp_send --loose splits the file before each "MSH|^~\&|", turns CRLF and LF into
    // CR and strips the CR/LF/space around each message: one message per line block.
    let file = agent.dir().join("messages.hl7");
    let mut text = Vec::new();
    for (_, message) in &messages {
        text.extend_from_slice(message);
        text.push(b'\n');
    }
    std::fs::write(&file, &text).expect("write the message file");
    let output = outpost_testkit::mllp_send(agent.port(), &file);

    let acks: Vec<_> = output
        .stdout
        .split(|&b| b == 0x1c)
        .map(|piece| {
            let start = piece
                .iter()
                .position(|&b| !b.is_ascii_whitespace() && b != 0x0b)
                .unwrap_or(piece.len());
            &piece[start..]
        })
        .filter(|piece| !piece.is_empty())
        .map(ack_of)
        .collect();
    let got: Vec<(AckCode, String)> = acks
        .iter()
        .map(|a| (a.code, a.control_id.clone()))
        .collect();
    let expected: Vec<(AckCode, String)> = messages
        .iter()
        .map(|(id, _)| (AckCode::AA, id.clone()))
        .collect();
    assert_eq!(
        got,
        expected,
        "mllp_send should print one MSA|AA per message, in order; stdout:\n{}\nagent log tail:\n{}",
        String::from_utf8_lossy(&output.stdout).replace('\r', "\n"),
        agent.log_tail(20)
    );

    let received = wait_until_explained(
        Duration::from_secs(30),
        "python-hl7 has received every message",
        || {
            let received = downstream.received();
            if received.len() >= messages.len() {
                Ok(received)
            } else {
                Err(format!("{} of {} received", received.len(), messages.len()))
            }
        },
        || {
            format!(
                "agent log tail:\n{}\npeer log tail:\n{}",
                agent.log_tail(20),
                downstream.log_tail(10)
            )
        },
    );
    assert_eq!(
        received.len(),
        messages.len(),
        "no message should arrive twice"
    );
    for (i, ((control_id, sent), arrived)) in messages.iter().zip(&received).enumerate() {
        let expected = normalize_segment_ends(sent);
        assert!(
            *arrived == expected,
            "message {i} ({control_id}) differs downstream:\nsent (segment ends made CR):\n{:?}\narrived:\n{:?}",
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(arrived)
        );
    }
}

#[test]
fn lf_and_crlf_segment_endings_reach_the_downstream_as_cr_and_nothing_else_changes() {
    if skip_peer_tests(
        "lf_and_crlf_segment_endings_reach_the_downstream_as_cr_and_nothing_else_changes",
    ) {
        return;
    }
    let downstream = PyHl7Server::start(free_port());
    let agent = Agent::start(
        BIN,
        &one_route_config(free_port(), downstream.port(), "", "", ""),
    );
    let cr = samples::oru_r01("ENDCR", "MRN000001", "LINE", "CARRIE", 3);
    let lf: Vec<u8> = cr
        .iter()
        .map(|&b| if b == b'\r' { b'\n' } else { b })
        .collect();
    let crlf = String::from_utf8(cr.clone())
        .expect("ascii")
        .replace('\r', "\r\n")
        .into_bytes();
    let mut trailing = crlf.clone();
    trailing.extend_from_slice(b"\r\n");
    let sent = [cr.clone(), lf, crlf, trailing];
    // Distinct control ids so each can be told apart downstream.
    let sent: Vec<Vec<u8>> = sent
        .iter()
        .enumerate()
        .map(|(i, m)| {
            String::from_utf8_lossy(m)
                .replacen("ENDCR", &format!("ENDCR{i}"), 1)
                .into_bytes()
        })
        .collect();
    for (message, reply) in sent.iter().zip(send_each(agent.port(), &sent)) {
        let ack = ack_of(&reply);
        assert_eq!(
            ack.code,
            AckCode::AA,
            "reply {:?} for {:?}",
            ack,
            String::from_utf8_lossy(message)
        );
    }
    let received = wait_until_explained(
        Duration::from_secs(30),
        "python-hl7 has received the four messages",
        || Some(downstream.received()).filter(|r| r.len() >= sent.len()),
        || {
            format!(
                "agent log tail:\n{}\npeer log tail:\n{}",
                agent.log_tail(20),
                downstream.log_tail(10)
            )
        },
    );
    let expected: Vec<Vec<u8>> = sent.iter().map(|m| normalize_segment_ends(m)).collect();
    assert_eq!(
        received
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect::<Vec<_>>(),
        "each message should arrive with CR segment ends and otherwise unchanged"
    );
}

#[test]
fn a_backlog_drains_in_order_once_the_downstream_is_back() {
    if skip_peer_tests("a_backlog_drains_in_order_once_the_downstream_is_back") {
        return;
    }
    let downstream_port = free_port();
    let sink = "retry_initial_ms = 50\nretry_max_secs = 1";
    let agent = Agent::start(
        BIN,
        &one_route_config(free_port(), downstream_port, "", sink, ""),
    );
    let messages: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            samples::oru_r01(
                &format!("BACKLOG{i:04}"),
                &format!("MRN{i:06}"),
                "QUEUE",
                "KATE",
                1 + i % 4,
            )
        })
        .collect();
    for (i, reply) in send_each(agent.port(), &messages).iter().enumerate() {
        let ack = ack_of(reply);
        assert_eq!(
            (ack.code, ack.control_id.as_str()),
            (AckCode::AA, format!("BACKLOG{i:04}").as_str()),
            "on_commit: every message is acknowledged while the downstream is down"
        );
    }
    let ((pending, dead, delivered), status) = agent.sink_counts("out");
    assert_eq!(
        (pending, dead, delivered),
        (300, 0, 0),
        "queue status with the downstream down:\n{status}"
    );

    let downstream = PyHl7Server::start(downstream_port);
    let received = wait_until_explained(
        Duration::from_secs(60),
        "the backlog of 300 has reached python-hl7",
        || {
            let received = downstream.received();
            if received.len() >= messages.len() {
                Ok(received)
            } else {
                Err(format!("{} of 300 received", received.len()))
            }
        },
        || {
            format!(
                "agent log tail:\n{}\npeer log tail:\n{}",
                agent.log_tail(20),
                downstream.log_tail(10)
            )
        },
    );
    assert_eq!(received.len(), 300, "nothing should arrive twice");
    for (i, (sent, arrived)) in messages.iter().zip(&received).enumerate() {
        assert!(
            sent == arrived,
            "position {i}: expected BACKLOG{i:04} byte-identical, got {:?}",
            String::from_utf8_lossy(arrived)
        );
    }
    wait_until_explained(
        Duration::from_secs(30),
        "queue status shows 0 pending and 300 delivered",
        || {
            let (counts, status) = agent.sink_counts("out");
            if counts == (0, 0, 300) {
                Ok(())
            } else {
                Err(status)
            }
        },
        || format!("agent log tail:\n{}", agent.log_tail(20)),
    );
}

#[test]
fn ack_on_delivery_returns_the_downstream_ack() {
    if skip_peer_tests("ack_on_delivery_returns_the_downstream_ack") {
        return;
    }
    let downstream = PyHl7Server::start(free_port());
    let config = one_route_config(
        free_port(),
        downstream.port(),
        "ack = \"on_delivery\"",
        "",
        "",
    );
    let agent = Agent::start(BIN, &config);
    let messages: Vec<Vec<u8>> = (0..3)
        .map(|i| samples::oru_r01(&format!("ONDELIV{i}"), "MRN000042", "WAITE", "DEL", 2))
        .collect();
    let replies = send_each(agent.port(), &messages);
    for (i, reply) in replies.iter().enumerate() {
        let control_id = format!("ONDELIV{i}");
        // The downstream wrote the message before answering, so it must be there already.
        let received = downstream.received_control_ids();
        assert!(
            received.contains(&control_id),
            "{control_id} was acknowledged before python-hl7 had it; python-hl7 has {received:?}"
        );
        let ack = ack_of(reply);
        assert_eq!(
            (ack.code, ack.control_id.as_str()),
            (AckCode::AA, control_id.as_str())
        );
        // python-hl7's create_ack: MSH-10 is 20 characters (16 digits of time and 4 random
        // alphanumerics) and MSH-7 has no offset; the agent's own ACK has MSH-10 "A<item id>"
        // and MSH-7 ending "+0000".
        let text = String::from_utf8_lossy(reply).into_owned();
        let message = Message::parse(reply).unwrap_or_else(|err| panic!("ACK {text:?}: {err}"));
        let msh10 = message.get("MSH-10").unwrap_or_default();
        let msh7 = message.get("MSH-7").unwrap_or_default();
        let is_python_id = msh10.len() == 20
            && msh10[..16].bytes().all(|b| b.is_ascii_digit())
            && msh10[16..].bytes().all(|b| b.is_ascii_alphanumeric());
        assert!(
            is_python_id && !msh7.contains('+'),
            "expected python-hl7's ACK (MSH-10 of 20 characters, MSH-7 without offset), got MSH-10 {msh10:?}, MSH-7 {msh7:?}: {:?}",
            text.replace('\r', "\n")
        );
        // Sending and receiving application are swapped relative to the original.
        assert_eq!(
            (
                message.get("MSH-3").as_deref(),
                message.get("MSH-5").as_deref()
            ),
            (Some("OUTPOST"), Some("LAB")),
            "ACK {:?}",
            text.replace('\r', "\n")
        );
    }
}
