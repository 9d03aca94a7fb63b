//! Messages from a sender through the agent's hub sink to the hub's data API: once, in
//! order, byte for byte; and across a hub outage with an agent restart in the middle.
//!
//! Each test runs twice, as `sqlite::…` and `postgres::…` (a fresh database on a real
//! PostgreSQL 15; skipped with `OUTPOST_PEERS=skip`), from one body taking a `HubBackend`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use outpost_hl7::{AckCode, Message};
use outpost_testkit::{
    ack_of, agent_config_for_hub, enrolled_agent_id, free_port, normalize_segment_ends, samples,
    send_with_retries, skip_peer_tests, wait_until_explained, Agent, Hub, HubApi, HubBackend,
    SendReport,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

outpost_testkit::on_both_hub_backends! {
    mllp_send_through_the_agent_reaches_the_hub_api_once_in_order_byte_identical;
    hub_down_for_a_while_with_an_agent_restart_in_between_delivers_everything_exactly_once;
}

/// Fifty varied messages (ORU, ADT, ORM; one with LF and one with CRLF segment ends), as
/// (control id, bytes).
fn varied_messages() -> Vec<(String, Vec<u8>)> {
    let families = ["GARCIA", "NGUYEN", "OKAFOR", "MUELLER", "SMITH", "TANAKA"];
    let givens = ["ANA", "MINH", "CHIDI", "LENA", "JOHN", "YUKI"];
    let mut messages: Vec<(String, Vec<u8>)> = (0..48)
        .map(|i| {
            let control_id = format!("HUB{i:04}");
            let (family, given) = (families[i % families.len()], givens[(i * 5) % givens.len()]);
            let mrn = format!("MRN{:06}", 300 + i);
            let message = match i % 4 {
                0 | 1 => samples::oru_r01(&control_id, &mrn, family, given, 1 + i % 6),
                2 => samples::adt(&control_id, "A08", &mrn, family, given),
                _ => samples::orm_o01(&control_id, &mrn, family, given),
            };
            (control_id, message)
        })
        .collect();
    let lf: Vec<u8> = samples::oru_r01("HUBLF01", "MRN000901", "ABARA", "NIA", 4)
        .into_iter()
        .map(|b| if b == b'\r' { b'\n' } else { b })
        .collect();
    messages.insert(11, ("HUBLF01".to_owned(), lf));
    let crlf = String::from_utf8(samples::adt("HUBCRLF1", "A01", "MRN000902", "BERG", "OLA"))
        .unwrap_or_default()
        .replace('\r', "\r\n")
        .into_bytes();
    messages.insert(30, ("HUBCRLF1".to_owned(), crlf));
    messages
}

fn decode_payload(message: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(message["payload_base64"].as_str().unwrap_or(""))
        .unwrap_or_else(|err| panic!("payload_base64 of {message} is not base64: {err}"))
}

/// Starts a hub and an agent enrolled with it (through `[hub]` on first start); returns
/// them with the agent's id and an API client.
fn hub_and_agent(backend: HubBackend) -> (Hub, Agent, String, HubApi) {
    let hub = Hub::start_on(BIN, backend);
    let api = hub.api(Some(&hub.apikey("delivery-test")));
    let token = hub.token("Smith Pediatrics", "24h");
    let agent = Agent::start(BIN, &agent_config_for_hub(&hub, &token, free_port(), ""));
    agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
    let agent_id = enrolled_agent_id(&agent.data_dir());
    (hub, agent, agent_id, api)
}

fn mllp_send_through_the_agent_reaches_the_hub_api_once_in_order_byte_identical(
    backend: HubBackend,
) {
    if skip_peer_tests(
        "mllp_send_through_the_agent_reaches_the_hub_api_once_in_order_byte_identical",
    ) {
        return;
    }
    let (hub, agent, agent_id, api) = hub_and_agent(backend);
    let messages = varied_messages();
    let file = agent.dir().join("messages.hl7");
    let mut text = Vec::new();
    for (_, message) in &messages {
        text.extend_from_slice(message);
        text.push(b'\n');
    }
    std::fs::write(&file, &text).unwrap_or_else(|err| panic!("write {}: {err}", file.display()));
    let output = outpost_testkit::mllp_send(agent.port(), &file);
    let acks: Vec<(AckCode, String)> = output
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
        .map(|piece| {
            let ack = ack_of(piece);
            (ack.code, ack.control_id)
        })
        .collect();
    let expected_acks: Vec<(AckCode, String)> = messages
        .iter()
        .map(|(id, _)| (AckCode::AA, id.clone()))
        .collect();
    assert_eq!(
        acks, expected_acks,
        "mllp_send should get one AA per message"
    );

    // Read the stream as an app would: long-poll from the last cursor seen.
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor = 0i64;
    wait_until_explained(
        Duration::from_secs(60),
        "the data API has returned every message",
        || {
            let page = api.get(&format!(
                "/api/v1/messages?after={cursor}&payload=true&limit=1000&wait=5"
            ));
            if page.status != 200 {
                return Err(format!("status {}: {}", page.status, page.text));
            }
            seen.extend(
                page.json["messages"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
            cursor = page.json["next_cursor"].as_i64().unwrap_or(cursor);
            if seen.len() >= messages.len() {
                Ok(())
            } else {
                Err(format!("{} of {} messages", seen.len(), messages.len()))
            }
        },
        || {
            format!(
                "agent log tail:\n{}\nhub log tail:\n{}",
                agent.log_tail(20),
                hub.log_tail(20)
            )
        },
    );
    // Everything delivered at the agent, and still nothing more at the hub.
    wait_until_explained(
        Duration::from_secs(30),
        "the agent's hub sink has nothing pending",
        || match agent.sink_counts("vendor") {
            ((0, 0, delivered), _) if delivered == messages.len() as u64 => Ok(()),
            (_, status) => Err(status),
        },
        || format!("agent log tail:\n{}", agent.log_tail(20)),
    );
    let all = api
        .all_messages()
        .unwrap_or_else(|err| panic!("read the whole stream: {err}"));
    let got: Vec<&str> = all
        .iter()
        .map(|m| m["control_id"].as_str().unwrap_or("?"))
        .collect();
    let want: Vec<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(got, want, "each message once, in the order sent");
    for (i, ((control_id, sent), stored)) in messages.iter().zip(&all).enumerate() {
        let expected = normalize_segment_ends(sent);
        let payload = decode_payload(stored);
        assert!(
            payload == expected,
            "message {i} ({control_id}) differs at the hub:\nsent (segment ends made CR):\n{:?}\nstored:\n{:?}",
            String::from_utf8_lossy(&expected),
            String::from_utf8_lossy(&payload)
        );
        let msh9 = Message::parse(&expected)
            .ok()
            .and_then(|m| m.get("MSH-9"))
            .unwrap_or_default();
        assert_eq!(
            (
                stored["agent_id"].as_str(),
                stored["source"].as_str(),
                stored["kind"].as_str(),
                stored["msg_type"].as_str()
            ),
            (
                Some(agent_id.as_str()),
                Some("lab-in"),
                Some("hl7"),
                Some(msh9.as_str())
            ),
            "metadata of message {i}: {stored}"
        );
    }
}

/// A sender that keeps sending ADT^A08 messages (control ids `OUT000001`…) in chunks over
/// fresh connections, resending on failure, until stopped.
struct ChunkedSender {
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Result<SendReport, String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChunkedSender {
    fn start(port: u16) -> ChunkedSender {
        let acked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Ok(SendReport::default())));
        let (t_acked, t_stop, t_report) = (acked.clone(), stop.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|err| panic!("tokio runtime: {err}"));
            let mut next = 1usize;
            while !t_stop.load(Ordering::SeqCst) {
                let chunk: Vec<(String, Vec<u8>)> = (next..next + 10)
                    .map(|n| {
                        let id = format!("OUT{n:06}");
                        let message =
                            samples::adt(&id, "A08", &format!("M{n:06}"), "OUTAGE", "OLIVE");
                        (id, message)
                    })
                    .collect();
                next += chunk.len();
                let sent = runtime.block_on(send_with_retries(
                    port,
                    chunk,
                    t_acked.clone(),
                    Duration::from_secs(30),
                ));
                let Ok(mut report) = t_report.lock() else {
                    return;
                };
                match (sent, &mut *report) {
                    (Ok(chunk), Ok(total)) => {
                        total.acked.extend(chunk.acked);
                        total.unknown_outcomes.extend(chunk.unknown_outcomes);
                        total.connections += chunk.connections;
                    }
                    (Err(err), slot) => {
                        *slot = Err(err);
                        return;
                    }
                    (Ok(_), Err(_)) => return,
                }
                drop(report);
                // Pacing, so the stream is still flowing while the test kills things.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        ChunkedSender {
            acked,
            stop,
            report,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    fn wait_for(&self, total: usize, context: impl Fn() -> String) {
        wait_until_explained(
            Duration::from_secs(60),
            &format!("the sender has {total} AAs"),
            || {
                if let Ok(Err(err)) = self.report.lock().as_deref() {
                    panic!("the sender failed: {err}\n{}", context());
                }
                let acked = self.acked();
                if acked >= total {
                    Ok(())
                } else {
                    Err(format!("{acked} AAs"))
                }
            },
            &context,
        );
    }

    fn stop(mut self) -> SendReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                panic!("the sender thread panicked");
            }
        }
        let report = match self.report.lock() {
            Ok(report) => report.clone(),
            Err(_) => panic!("the sender's report lock is poisoned"),
        };
        report.unwrap_or_else(|err| panic!("the sender failed: {err}"))
    }
}

fn hub_down_for_a_while_with_an_agent_restart_in_between_delivers_everything_exactly_once(
    backend: HubBackend,
) {
    let (mut hub, mut agent, agent_id, api) = hub_and_agent(backend);
    let sender = ChunkedSender::start(agent.port());
    let context = |agent: &Agent, hub: &Hub| {
        format!(
            "agent log tail:\n{}\nhub log tail:\n{}",
            agent.log_tail(20),
            hub.log_tail(20)
        )
    };

    sender.wait_for(150, || context(&agent, &hub));
    hub.kill9();
    let at_kill = sender.acked();
    // The agent keeps acknowledging: its queue holds what the hub cannot take.
    sender.wait_for(at_kill + 200, || context(&agent, &hub));
    agent.kill9();
    agent.restart();
    let at_restart = sender.acked();
    sender.wait_for(at_restart + 150, || context(&agent, &hub));
    let ((pending, _, _), status) = agent.sink_counts("vendor");
    assert!(
        pending >= 150,
        "with the hub down the agent's queue should hold what it acknowledged:\n{status}"
    );
    hub.restart();
    let at_hub_back = sender.acked();
    sender.wait_for(at_hub_back + 100, || context(&agent, &hub));
    let report = sender.stop();
    assert!(
        report.connections >= 2,
        "the agent restart should have broken the sender's connection: {report:?}"
    );

    let acked: Vec<String> = report.acked.clone();
    let result = wait_until_explained(
        Duration::from_secs(120),
        "the data API holds every acknowledged control id",
        || {
            let all = api.all_messages()?;
            let mut counts: HashMap<String, usize> = HashMap::new();
            for message in &all {
                *counts
                    .entry(message["control_id"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
            let missing = acked.iter().filter(|id| !counts.contains_key(*id)).count();
            if missing == 0 {
                Ok((all, counts))
            } else {
                Err(format!(
                    "{missing} of {} acknowledged messages not at the hub yet ({} stored)",
                    acked.len(),
                    all.len()
                ))
            }
        },
        || context(&agent, &hub),
    );
    let (all, counts) = result;
    // Once the agent's queue is drained nothing more may arrive.
    wait_until_explained(
        Duration::from_secs(30),
        "the agent's hub sink has nothing pending",
        || match agent.sink_counts("vendor") {
            ((0, 0, _), _) => Ok(()),
            (_, status) => Err(status),
        },
        || context(&agent, &hub),
    );
    let final_all = api
        .all_messages()
        .unwrap_or_else(|err| panic!("read the stream: {err}"));
    assert_eq!(
        final_all.len(),
        all.len(),
        "messages arrived after every acknowledged one was there"
    );
    // A message whose ACK was lost when the agent was killed was sent again by the sender,
    // so the agent may rightly hold it twice; every other one must be there exactly once.
    let doubled: Vec<(&String, &usize)> = counts
        .iter()
        .filter(|(id, &n)| n > 1 && !report.unknown_outcomes.contains(id))
        .collect();
    assert!(
        doubled.is_empty(),
        "control ids stored more than once at the hub: {doubled:?} (sender resent only {:?})",
        report.unknown_outcomes
    );
    let order: Vec<&str> = final_all
        .iter()
        .map(|m| m["control_id"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "the stream should hold the messages in the order they were sent: {order:?}"
    );
    let mut item_ids: Vec<i64> = final_all
        .iter()
        .filter(|m| m["agent_id"].as_str() == Some(agent_id.as_str()))
        .map(|m| m["item_id"].as_i64().unwrap_or(-1))
        .collect();
    let stored = item_ids.len();
    item_ids.sort_unstable();
    item_ids.dedup();
    assert_eq!(
        item_ids.len(),
        stored,
        "an agent item id was stored twice at the hub"
    );
    // The hub died and came back during the test: its log says both sessions happened.
    assert!(
        agent.log().matches("connected to the hub").count() >= 2,
        "agent log:\n{}",
        agent.log_tail(40)
    );
}
