//! The way down: a message posted to the hub's data API goes through the agent's session
//! into its queue and out of an MLLP sink to a real MLLP server (hl7apy's), and the API
//! follows it to "delivered".
//!
//! Each test runs twice, as `sqlite::…` and `postgres::…` (a fresh database on a real
//! PostgreSQL 15; skipped with `OUTPOST_PEERS=skip`), from one body taking a `HubBackend`.

use std::time::Duration;

use outpost_testkit::{
    agent_config_for_hub, enrolled_agent_id, free_port, samples, skip_peer_tests,
    wait_until_explained, Agent, Hl7apyServer, Hub, HubBackend,
};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

outpost_testkit::on_both_hub_backends! {
    a_message_posted_to_the_api_reaches_a_real_mllp_server_behind_the_agent;
}

fn a_message_posted_to_the_api_reaches_a_real_mllp_server_behind_the_agent(backend: HubBackend) {
    if skip_peer_tests("a_message_posted_to_the_api_reaches_a_real_mllp_server_behind_the_agent") {
        return;
    }
    let lab = Hl7apyServer::start(free_port());
    let hub = Hub::start_on(BIN, backend);
    let api = hub.api(Some(&hub.apikey("orders-app")));
    let token = hub.token("Smith Pediatrics", "24h");
    let lab_sink = format!(
        "[[sink]]\nname = \"lab-out\"\nkind = \"mllp\"\nconnect = \"127.0.0.1:{}\"\n",
        lab.port()
    );
    let agent = Agent::start(
        BIN,
        &agent_config_for_hub(&hub, &token, free_port(), &lab_sink),
    );
    agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
    let agent_id = enrolled_agent_id(&agent.data_dir());

    let sent = samples::oru_r01("DOWN0001", "MRN000777", "RIVERA", "LUZ", 3);
    let text =
        String::from_utf8(sent.clone()).unwrap_or_else(|err| panic!("samples are ASCII: {err}"));
    let posted = api.post_json(
        &format!("/api/v1/agents/{agent_id}/messages"),
        &json!({"sink": "lab-out", "message": text}),
    );
    assert_eq!(
        posted.status, 202,
        "POST /api/v1/agents/{agent_id}/messages: {}",
        posted.text
    );
    let down_id = posted.str("id").to_owned();
    assert!(
        down_id.starts_with("dn_") && posted.str("state") == "accepted",
        "the answer should give the message an id to follow: {}",
        posted.text
    );

    let context = || {
        format!(
            "agent log tail:\n{}\nhub log tail:\n{}\nhl7apy log tail:\n{}",
            agent.log_tail(20),
            hub.log_tail(20),
            lab.log_tail(10)
        )
    };
    let received = wait_until_explained(
        Duration::from_secs(30),
        "hl7apy has received the message",
        || Some(lab.received()).filter(|r| !r.is_empty()),
        context,
    );
    assert_eq!(
        received
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect::<Vec<_>>(),
        vec![text.clone()],
        "hl7apy should receive the posted message once, unchanged"
    );

    let down = wait_until_explained(
        Duration::from_secs(30),
        "GET /api/v1/down/{id} says delivered",
        || {
            let down = api.get(&format!("/api/v1/down/{down_id}"));
            if down.status == 200 && down.str("state") == "delivered" {
                Ok(down)
            } else {
                Err(format!("{} {}", down.status, down.text))
            }
        },
        context,
    );
    assert!(
        down.json["item_id"].is_i64()
            && down.str("agent_id") == agent_id
            && down.str("sink") == "lab-out"
            && down.json["error"].is_null(),
        "the delivered message's record: {}",
        down.text
    );
    assert_eq!(lab.received().len(), 1, "delivered once");
}
