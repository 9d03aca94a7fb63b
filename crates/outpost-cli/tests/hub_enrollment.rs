//! Enrollment against a real hub process: a token works once; a reused, unknown or expired
//! token, a wrong CA pin and a revoked agent are each refused with the reason in both logs.
//!
//! Each test runs twice, as `sqlite::…` and `postgres::…` (a fresh database on a real
//! PostgreSQL 15; skipped with `OUTPOST_PEERS=skip`), from one body taking a `HubBackend`.

use std::process::Output;
use std::time::{Duration, Instant};

use outpost_testkit::{
    describe_output, enrolled_agent_id, free_port, hub_sink_config, wait_until, Agent, Hub,
    HubBackend,
};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

outpost_testkit::on_both_hub_backends! {
    enrollment_works_once_and_refuses_reuse_expiry_unknown_and_wrong_ca;
}

/// `outpost agent --config <agent's config> enroll --hub URL --token T --ca CA`.
fn enroll(agent: &Agent, hub_url: &str, token: &str, ca: &std::path::Path) -> Output {
    let config = agent.config_path().to_string_lossy().into_owned();
    let ca = ca.to_string_lossy().into_owned();
    agent.run_cli(&[
        "agent", "--config", &config, "enroll", "--hub", hub_url, "--token", token, "--ca", &ca,
    ])
}

fn stderr(output: &Output) -> String {
    outpost_testkit::strip_ansi(&String::from_utf8_lossy(&output.stderr))
}

/// Runs an enrollment that must be refused; returns the CLI's stderr.
fn refused_enrollment(
    hub: &Hub,
    token: &str,
    ca: &std::path::Path,
    expected: &[&str],
    case: &str,
) -> String {
    let agent = Agent::prepare(BIN, &hub_sink_config(free_port()));
    let output = enroll(&agent, &hub.url(), token, ca);
    let err = stderr(&output);
    assert!(
        !output.status.success() && expected.iter().all(|part| err.contains(part)),
        "{case}: enrollment should fail saying {expected:?}\n{}\nhub log tail:\n{}",
        describe_output(&output),
        hub.log_tail(20)
    );
    assert!(
        !agent.data_dir().join("agent.json").exists(),
        "{case}: a refused enrollment must not leave credentials behind"
    );
    err
}

fn enrollment_works_once_and_refuses_reuse_expiry_unknown_and_wrong_ca(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let token = hub.token("Smith Pediatrics", "24h");

    // First use: enrolled, with the key kept private on the box.
    let mut first = Agent::prepare(BIN, &hub_sink_config(free_port()));
    let output = enroll(&first, &hub.url(), &token, &hub.ca_path());
    assert!(
        output.status.success()
            && String::from_utf8_lossy(&output.stdout).contains("enrolled as agent agt_"),
        "first use of the token should enroll\n{}\nhub log tail:\n{}",
        describe_output(&output),
        hub.log_tail(20)
    );
    let agent_id = enrolled_agent_id(&first.data_dir());
    hub.wait_for_log_line(Duration::from_secs(10), &["agent enrolled", &agent_id]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = first.data_dir().join("agent.key");
        let mode = std::fs::metadata(&key)
            .unwrap_or_else(|err| panic!("{}: {err}", key.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} mode {mode:o}", key.display());
    }

    // Second use of the same token.
    refused_enrollment(
        &hub,
        &token,
        &hub.ca_path(),
        &["token_reused", "already used"],
        "reused token",
    );
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &["enrollment refused", "token_reused"],
    );

    // A token the hub never made.
    refused_enrollment(
        &hub,
        "opt_thisTokenWasNeverMadeByThisHub0000000000",
        &hub.ca_path(),
        &["token_unknown", "not known"],
        "unknown token",
    );
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &["enrollment refused", "token_unknown"],
    );

    // A token past its expiry.
    let late = hub.token("Late Clinic", "1s");
    let made = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the one-second token has expired",
        || (made.elapsed() >= Duration::from_millis(1100)).then_some(()),
    );
    refused_enrollment(
        &hub,
        &late,
        &hub.ca_path(),
        &["token_expired", "expired"],
        "expired token",
    );
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &["enrollment refused", "token_expired"],
    );

    // The CA of another hub pinned: the TLS handshake fails, the token is not spent.
    let other = Hub::start_on(BIN, backend);
    let pinned = hub.token("Pinned Clinic", "24h");
    // (Both hubs' CAs carry the same name, so rustls reports a bad signature rather than
    // an unknown issuer; either way the certificate is refused.)
    refused_enrollment(
        &hub,
        &pinned,
        &other.ca_path(),
        &["invalid peer certificate"],
        "wrong CA pinned",
    );
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &["TLS handshake failed", "received fatal alert"],
    );
    let retry = Agent::prepare(BIN, &hub_sink_config(free_port()));
    let output = enroll(&retry, &hub.url(), &pinned, &hub.ca_path());
    assert!(
        output.status.success(),
        "the token refused over the wrong CA should still work with the right one\n{}",
        describe_output(&output)
    );

    // A revoked agent: its live session ends and new sessions are refused, said on both ends.
    first.launch();
    first.wait_for_log_line(Duration::from_secs(30), &["connected to the hub"]);
    let revoked = hub.revoke(&agent_id);
    assert!(revoked.contains(&agent_id), "revoke printed {revoked:?}");
    let line = first.wait_for_log_line(
        Duration::from_secs(30),
        &["the hub refused the session", "is revoked"],
    );
    assert!(line.contains(&agent_id), "agent log line: {line}");
    hub.wait_for_log_line(
        Duration::from_secs(10),
        &[
            "agent session refused",
            &format!("agent {agent_id} is revoked"),
        ],
    );
    let api = hub.api(Some(&hub.apikey("enrollment-test")));
    let view = api.get(&format!("/api/v1/agents/{agent_id}"));
    assert!(
        view.status == 200
            && view.json["revoked_at_ms"].is_i64()
            && view.json["online"] == serde_json::json!(false),
        "GET /api/v1/agents/{agent_id} after revocation: {} {}",
        view.status,
        view.text
    );
}
