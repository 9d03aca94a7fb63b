//! Config loading: the issue's minimal shape works as written; errors name file and key.

use std::path::Path;

use super::*;

const MINIMAL: &str = r#"
data_dir = "./outpost-data"        # queue, key file
[[source]]
name = "lab-in"
kind = "mllp"
listen = "127.0.0.1:2575"
[[sink]]
name = "lab-out"
kind = "mllp"
connect = "127.0.0.1:2576"
[[route]]
from = "lab-in"
to = ["lab-out"]                   # optional filter on MSH-9, e.g. msh9 = ["ORU^R01"]
"#;

fn parse(text: &str) -> Result<AgentConfig, String> {
    AgentConfig::parse(text, Path::new("/etc/outpost/agent.toml")).map_err(|e| e.to_string())
}

fn error_of(text: &str) -> String {
    parse(text).expect_err("config should be refused")
}

#[test]
fn the_minimal_config_works_as_written() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.data_dir, Path::new("/etc/outpost/./outpost-data"));
    assert_eq!(config.sources.len(), 1);
    assert_eq!(
        config.sources[0].kind.listen_addr(),
        Some("127.0.0.1:2575".parse().unwrap())
    );
    let lab_in = ConnectorName::new("lab-in").unwrap();
    assert_eq!(
        config.sinks_for(&lab_in, Some("ORU^R01")),
        vec![ConnectorName::new("lab-out").unwrap()]
    );
}

#[test]
fn route_filters_match_msh9_component_by_component() {
    assert!(msh9_matches("ORU^R01", "ORU^R01^ORU_R01"));
    assert!(msh9_matches("ORU", "ORU^R01"));
    assert!(!msh9_matches("ORU^R01", "ORU^R011"));
    assert!(!msh9_matches("ORU^R01", "ORU"));
    let config = parse(&MINIMAL.replace(
        "to = [\"lab-out\"]",
        "to = [\"lab-out\"]\nmsh9 = [\"ADT^A01\"]",
    ))
    .unwrap();
    let lab_in = ConnectorName::new("lab-in").unwrap();
    assert!(config.sinks_for(&lab_in, Some("ORU^R01")).is_empty());
    assert_eq!(config.sinks_for(&lab_in, Some("ADT^A01^ADT_A01")).len(), 1);
}

#[test]
fn a_misspelt_key_is_named_with_the_file() {
    let err = error_of(&MINIMAL.replace("listen =", "lisen ="));
    assert!(err.starts_with("/etc/outpost/agent.toml: "), "{err}");
    assert!(err.contains("source[0]") && err.contains("lisen"), "{err}");
}

#[test]
fn a_missing_listen_address_is_named() {
    let err = error_of(&MINIMAL.replace("listen = \"127.0.0.1:2575\"", ""));
    assert!(
        err.contains("key `source[0]`") && err.contains("missing field `listen`"),
        "{err}"
    );
}

#[test]
fn a_host_name_listen_address_says_what_was_expected() {
    let err = error_of(&MINIMAL.replace("127.0.0.1:2575", "localhost:2575"));
    assert!(err.contains("key `source[0].listen`"), "{err}");
    assert!(
        err.contains("expected an IP address and port like \"127.0.0.1:2575\""),
        "{err}"
    );
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let err = error_of(&MINIMAL.replace(
        "connect = \"127.0.0.1:2576\"",
        "connect = \"127.0.0.1:2576\"\nack_timeout_secs = \"thirty\"",
    ));
    assert!(err.contains("key `sink[0].ack_timeout_secs`"), "{err}");
    assert!(err.contains("expected u64"), "{err}");
}

#[test]
fn an_unknown_kind_lists_the_known_ones() {
    let err = error_of(&MINIMAL.replacen("kind = \"mllp\"", "kind = \"mlp\"", 1));
    assert!(
        err.contains(
            "key `source[0].kind`: expected one of \"mllp\", \"dicom\", \"sql\", found \"mlp\""
        ),
        "{err}"
    );
}

#[test]
fn a_route_to_an_unknown_sink_is_refused() {
    let err = error_of(&MINIMAL.replace("to = [\"lab-out\"]", "to = [\"lab-outt\"]"));
    assert!(
        err.contains("key `route[0].to[0]`: expected the name of a [[sink]], found \"lab-outt\""),
        "{err}"
    );
}

#[test]
fn a_source_without_a_route_is_refused() {
    let config = format!(
        "{MINIMAL}\n[[source]]\nname = \"adt-in\"\nkind = \"mllp\"\nlisten = \"127.0.0.1:2577\"\n"
    );
    let err = error_of(&config);
    assert!(
        err.contains("source[1] (\"adt-in\"): no [[route]] has from = \"adt-in\""),
        "{err}"
    );
}

#[test]
fn duplicate_names_and_listen_addresses_are_refused() {
    let twice = MINIMAL.replace(
        "[[sink]]",
        "[[source]]\nname = \"lab-in\"\nkind = \"mllp\"\nlisten = \"127.0.0.1:2579\"\n[[sink]]",
    );
    assert!(
        error_of(&twice).contains("\"lab-in\" is already used"),
        "{}",
        error_of(&twice)
    );
    let same_port = MINIMAL.replace(
        "[[sink]]",
        "[[source]]\nname = \"lab-in2\"\nkind = \"mllp\"\nlisten = \"127.0.0.1:2575\"\n[[sink]]",
    );
    assert!(
        error_of(&same_port).contains("127.0.0.1:2575 is already the listen address"),
        "{}",
        error_of(&same_port)
    );
}

#[test]
fn bad_toml_syntax_reports_the_line() {
    let err = error_of("data_dir = \n");
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn on_delivery_needs_exactly_one_mllp_sink() {
    let config = MINIMAL.replace(
        "listen = \"127.0.0.1:2575\"",
        "listen = \"127.0.0.1:2575\"\nack = \"on_delivery\"",
    );
    parse(&config).unwrap();
    let two_sinks = config.replace("to = [\"lab-out\"]", "to = [\"lab-out\", \"copy\"]")
        + "[[sink]]\nname = \"copy\"\nkind = \"mllp\"\nconnect = \"127.0.0.1:2580\"\n";
    assert!(
        error_of(&two_sinks).contains("key `source[0].ack`"),
        "{}",
        error_of(&two_sinks)
    );
}

#[test]
fn an_invalid_connector_name_is_refused_with_the_rule() {
    let err = error_of(
        &MINIMAL
            .replace("name = \"lab-in\"", "name = \"lab in\"")
            .replace("from = \"lab-in\"", "from = \"lab in\""),
    );
    assert!(
        err.contains("key `source[0].name`") && err.contains("may use only"),
        "{err}"
    );
}
