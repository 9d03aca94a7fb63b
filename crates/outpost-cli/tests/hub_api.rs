//! The hub's data API at the edges: missing and wrong API keys, cursors that are not
//! positions in the stream, and the published OpenAPI document.
//!
//! Each test runs twice, as `sqlite::…` and `postgres::…` (a fresh database on a real
//! PostgreSQL 15; skipped with `OUTPOST_PEERS=skip`), from one body taking a `HubBackend`.

use std::time::Duration;

use outpost_hl7::AckCode;
use outpost_testkit::{
    ack_of, agent_config_for_hub, free_port, samples, send_each, wait_until_explained, Agent,
    ApiResponse, Hub, HubBackend,
};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

outpost_testkit::on_both_hub_backends! {
    api_calls_without_or_with_a_wrong_key_get_json_errors;
    a_cursor_from_the_future_is_refused_clearly;
    query_parameters_that_do_not_parse_get_json_errors;
    the_openapi_document_lists_the_data_api;
    a_request_body_over_the_limit_or_not_json_gets_a_json_error;
}

/// Asserts a JSON error with this status and code and a non-empty message.
fn assert_json_error(response: &ApiResponse, status: u16, code: &str, what: &str) {
    assert!(
        response.status == status
            && response.content_type.starts_with("application/json")
            && response.str("code") == code
            && !response.str("message").is_empty(),
        "{what}: expected {status} with JSON {{\"code\": {code:?}, \"message\": …}}, got {} ({}): {}",
        response.status,
        response.content_type,
        response.text
    );
}

fn api_calls_without_or_with_a_wrong_key_get_json_errors(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let good = hub.apikey("reporting-app");
    let anonymous = hub.api(None);
    let wrong = hub.api(Some("opk_notAKeyThisHubMadeAtAll00000000000000"));
    let calls = [
        "/api/v1/agents",
        "/api/v1/agents/agt_unknown",
        "/api/v1/messages?after=0",
        "/api/v1/down/dn_unknown",
        "/dashboard/fleet.json",
    ];
    for path in calls {
        assert_json_error(
            &anonymous.get(path),
            401,
            "missing_api_key",
            &format!("GET {path} without a key"),
        );
        assert_json_error(
            &wrong.get(path),
            401,
            "invalid_api_key",
            &format!("GET {path} with a wrong key"),
        );
    }
    let body =
        json!({"sink": "lab-out", "message": "MSH|^~\\&|A|B|C|D|20260101||ORM^O01|X1|P|2.5.1"});
    assert_json_error(
        &anonymous.post_json("/api/v1/agents/agt_unknown/messages", &body),
        401,
        "missing_api_key",
        "POST a message down without a key",
    );
    assert_json_error(
        &wrong.post_json("/api/v1/agents/agt_unknown/messages", &body),
        401,
        "invalid_api_key",
        "POST a message down with a wrong key",
    );
    // The good key still works, and its refusals are JSON too.
    let api = hub.api(Some(&good));
    let agents = api.get("/api/v1/agents");
    assert!(
        agents.status == 200 && agents.json.as_array().is_some_and(|a| a.is_empty()),
        "GET /api/v1/agents with the key: {} {}",
        agents.status,
        agents.text
    );
    assert_json_error(
        &api.get("/api/v1/agents/agt_unknown"),
        404,
        "not_found",
        "an unknown agent",
    );
    let log = hub.log();
    assert!(
        !log.contains(&good) && !log.contains("opk_notAKey"),
        "API keys, good or wrong, must never be logged; log:\n{}",
        hub.log_tail(30)
    );
}

/// A hub with an agent that has delivered two messages; returns them and the API key.
fn hub_with_two_messages(backend: HubBackend) -> (Hub, Agent, String) {
    let hub = Hub::start_on(BIN, backend);
    let key = hub.apikey("cursor-test");
    let token = hub.token("Cursor Clinic", "24h");
    let agent = Agent::start(BIN, &agent_config_for_hub(&hub, &token, free_port(), ""));
    let messages: Vec<Vec<u8>> = (0..2)
        .map(|i| samples::oru_r01(&format!("CUR{i}"), "MRN000001", "POS", "ITA", 1))
        .collect();
    for reply in send_each(agent.port(), &messages) {
        assert_eq!(ack_of(&reply).code, AckCode::AA);
    }
    let api = hub.api(Some(&key));
    wait_until_explained(
        Duration::from_secs(30),
        "the hub has both messages",
        || match api.all_messages() {
            Ok(all) if all.len() == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        },
        || {
            format!(
                "agent log:\n{}\nhub log:\n{}",
                agent.log_tail(20),
                hub.log_tail(20)
            )
        },
    );
    (hub, agent, key)
}

fn a_cursor_from_the_future_is_refused_clearly(backend: HubBackend) {
    let (hub, _agent, key) = hub_with_two_messages(backend);
    let api = hub.api(Some(&key));
    let last = api
        .get("/api/v1/messages?after=0&limit=1000")
        .json
        .get("next_cursor")
        .and_then(|c| c.as_i64())
        .unwrap_or_else(|| panic!("no next_cursor in the first page"));
    for after in [last + 1, last + 1_000_000, -1] {
        let page = api.get(&format!("/api/v1/messages?after={after}&wait=30"));
        assert_json_error(
            &page,
            400,
            "invalid_cursor",
            &format!("GET /api/v1/messages?after={after} (the stream ends at {last})"),
        );
        assert!(
            page.str("message").contains(&after.to_string())
                && page.str("message").contains(&last.to_string()),
            "the message should name the cursor and the valid range: {}",
            page.text
        );
    }
    // The last real cursor is fine: an empty page that keeps the cursor.
    let page = api.get(&format!("/api/v1/messages?after={last}"));
    assert!(
        page.status == 200
            && page.json["messages"]
                .as_array()
                .is_some_and(|m| m.is_empty())
            && page.json["next_cursor"].as_i64() == Some(last),
        "GET /api/v1/messages?after={last}: {} {}",
        page.status,
        page.text
    );
}

fn query_parameters_that_do_not_parse_get_json_errors(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let api = hub.api(Some(&hub.apikey("query-test")));
    for query in ["after=abc", "after=0&limit=many", "after=0&wait=-1"] {
        let page = api.get(&format!("/api/v1/messages?{query}"));
        assert!(
            page.status == 400
                && page.content_type.starts_with("application/json")
                && !page.str("code").is_empty()
                && !page.str("message").is_empty(),
            "GET /api/v1/messages?{query}: expected 400 with a JSON {{code, message}}, got {} ({}): {}",
            page.status,
            page.content_type,
            page.text
        );
    }
}

fn the_openapi_document_lists_the_data_api(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let doc = hub.api(None).get("/api/v1/openapi.json");
    assert!(
        doc.status == 200 && doc.content_type.starts_with("application/json"),
        "GET /api/v1/openapi.json: {} ({}) {}",
        doc.status,
        doc.content_type,
        doc.text
    );
    let openapi = &doc.json;
    assert!(
        openapi["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with('3')),
        "not an OpenAPI 3 document: {}",
        doc.text
    );
    let paths = openapi["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no paths: {}", doc.text));
    for (path, method) in [
        ("/api/v1/enroll", "post"),
        ("/api/v1/agents", "get"),
        ("/api/v1/agents/{id}", "get"),
        ("/api/v1/agents/{id}/messages", "post"),
        ("/api/v1/down/{id}", "get"),
        ("/api/v1/messages", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "the document should describe {} {path}; it has {:?}",
            method.to_uppercase(),
            paths.keys().collect::<Vec<_>>()
        );
    }
    let parameters: Vec<&str> = openapi["paths"]["/api/v1/messages"]["get"]["parameters"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    for name in [
        "after", "limit", "agent", "source", "type", "wait", "payload",
    ] {
        assert!(
            parameters.contains(&name),
            "GET /api/v1/messages should document `{name}`; it documents {parameters:?}"
        );
    }
    assert_eq!(
        openapi["components"]["securitySchemes"]["api_key"]["scheme"].as_str(),
        Some("bearer"),
        "the API key scheme: {}",
        openapi["components"]
    );
}

fn a_request_body_over_the_limit_or_not_json_gets_a_json_error(backend: HubBackend) {
    let hub = Hub::start_on(BIN, backend);
    let api = hub.api(Some(&hub.apikey("body-test")));
    let path = "/api/v1/agents/agt_unknown/messages";
    let not_json = api.post_raw(path, "application/json", b"{\"sink\": ".to_vec());
    assert_json_error(&not_json, 400, "invalid_request", "a body that is not JSON");
    // 17 MiB: over the 16 MiB the API takes.
    let mut huge = b"{\"sink\":\"lab-out\",\"message\":\"MSH|".to_vec();
    huge.resize(17 << 20, b'A');
    huge.extend_from_slice(b"\"}");
    let response = api.post_raw(path, "application/json", huge);
    assert!(
        response.status == 413
            && response.content_type.starts_with("application/json")
            && !response.str("code").is_empty()
            && !response.str("message").is_empty(),
        "a 17 MiB body: expected 413 with a JSON {{code, message}}, got {} ({}): {}",
        response.status,
        response.content_type,
        response.text.chars().take(300).collect::<String>()
    );
}
