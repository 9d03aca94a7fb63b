//! The fleet dashboard in headless Chromium: the agent shows online with its queue depth,
//! then offline once it has been silent for three heartbeat periods, without a reload.
//! Screenshots are kept in `target/test-artifacts/`.
//!
//! Each test runs twice, as `sqlite::…` and `postgres::…` (a fresh database on a real
//! PostgreSQL 15; skipped with `OUTPOST_PEERS=skip`), from one body taking a `HubBackend`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outpost_hl7::AckCode;
use outpost_testkit::{
    ack_of, agent_config_for_hub, describe_output, free_port, run, samples, send_each,
    wait_until_explained, workspace_root, Agent, Browser, Hub, HubBackend,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

outpost_testkit::on_both_hub_backends! {
    the_dashboard_shows_the_agent_online_then_offline;
}

fn artifacts_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("test-artifacts")
}

/// The fleet table as shown: one map from column header to cell text per row.
fn fleet_rows(browser: &mut Browser) -> Result<Vec<serde_json::Map<String, Value>>, String> {
    let text = browser.evaluate(
        "JSON.stringify({headers: Array.from(document.querySelectorAll('thead th')).map(h => h.innerText.trim()), \
         rows: Array.from(document.querySelectorAll('#fleet tr')).map(r => Array.from(r.cells).map(c => c.innerText.trim()))})",
    );
    let table: Value =
        serde_json::from_str(&text).map_err(|err| format!("page gave {text:?}: {err}"))?;
    let headers: Vec<String> = table["headers"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|x| x.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    Ok(table["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|row| {
            headers
                .iter()
                .cloned()
                .zip(row.as_array().cloned().unwrap_or_default())
                .collect()
        })
        .collect())
}

fn cell<'a>(row: &'a serde_json::Map<String, Value>, header: &str) -> &'a str {
    row.get(header).and_then(|v| v.as_str()).unwrap_or("")
}

fn the_dashboard_shows_the_agent_online_then_offline(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let key = hub.apikey("dashboard-viewer");
    let token = hub.token("Smith Pediatrics", "24h");
    // A second sink to a lab that is down, so the agent has a queue depth to show.
    let down_lab = format!(
        "[[sink]]\nname = \"lab-out\"\nkind = \"mllp\"\nconnect = \"127.0.0.1:{}\"\n\n\
         [[route]]\nfrom = \"lab-in\"\nto = [\"lab-out\"]\n",
        free_port()
    );
    let agent = Agent::start(
        BIN,
        &agent_config_for_hub(&hub, &token, free_port(), &down_lab),
    );
    agent.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
    let messages: Vec<Vec<u8>> = (0..3)
        .map(|i| samples::oru_r01(&format!("DASH{i}"), "MRN000123", "VIEW", "DANA", 2))
        .collect();
    for reply in send_each(agent.port(), &messages) {
        assert_eq!(ack_of(&reply).code, AckCode::AA);
    }

    let mut browser = Browser::start();
    browser.set_cookie(&format!("{}/", hub.url()), "outpost_key", &key);
    browser.navigate(&format!("{}/", hub.url()));
    let context = |browser: &mut Browser| {
        format!(
            "page at {}:\n{}\nagent log tail:\n{}\nhub log tail:\n{}",
            browser.location(),
            browser.text(),
            agent.log_tail(15),
            hub.log_tail(15)
        )
    };
    let online = wait_until_explained(
        Duration::from_secs(30),
        "the fleet page shows Smith Pediatrics online with a queue depth of 3",
        || {
            let rows = fleet_rows(&mut browser)?;
            match rows.first() {
                Some(row)
                    if rows.len() == 1
                        && cell(row, "Site").contains("Smith Pediatrics")
                        && cell(row, "State") == "online"
                        && cell(row, "Queue depth") == "3" =>
                {
                    Ok(row.clone())
                }
                _ => Err(format!("rows: {rows:?}")),
            }
        },
        || "see the page text below".to_owned(),
    );
    let text = browser.text();
    assert!(
        text.contains("Smith Pediatrics") && text.contains("online"),
        "page text:\n{text}\n{}",
        context(&mut browser)
    );
    assert!(
        cell(&online, "Connectors").contains("lab-in: running"),
        "connector states on the page: {online:?}"
    );
    browser.screenshot(&artifacts_dir().join("hub-dashboard-online.png"));

    // Freeze the agent: its session stays open but it goes silent.
    let stopped = run(Command::new("kill")
        .arg("-STOP")
        .arg(agent.pid().to_string()));
    assert!(stopped.status.success(), "{}", describe_output(&stopped));
    let offline = wait_until_explained(
        Duration::from_secs(30),
        "the page, without a reload, shows the silent agent offline",
        || {
            let rows = fleet_rows(&mut browser)?;
            match rows.first() {
                Some(row) if cell(row, "State") == "offline" => Ok(row.clone()),
                _ => Err(format!("rows: {rows:?}")),
            }
        },
        || "see below".to_owned(),
    );
    browser.screenshot(&artifacts_dir().join("hub-dashboard-offline.png"));
    assert!(
        cell(&offline, "Site").contains("Smith Pediatrics"),
        "row: {offline:?}"
    );
    assert!(
        !hub.log().contains("agent disconnected"),
        "the session was still open: offline must come from the missing heartbeats\n{}",
        context(&mut browser)
    );
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &["agent offline", "silent for 3 heartbeat periods"],
    );
}
