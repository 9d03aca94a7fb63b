//! Loading the policy file: the example parses, and every mistake is a load error naming
//! the file, the key and what was expected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{example, parse, EXAMPLE};
use outpost_policy::{Access, Capability, Columns, Policy, PolicyError, MAX_POLICY_BYTES};
use sha2::{Digest, Sha256};

fn load_error(text: &str) -> String {
    match Policy::parse(text, Path::new("policy.toml")) {
        Ok(policy) => panic!("expected a load error, got {policy:?}\n--- policy ---\n{text}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn security_md_example_parses_as_written() {
    let policy = example();
    assert_eq!(policy.access(), Access::Unattended);
    assert_eq!(
        policy.maintenance_window().map(|w| w.as_str()),
        Some("Sun 01:00-04:00 America/New_York")
    );
    for cap in [
        Capability::Health,
        Capability::LogsTail,
        Capability::LogsSearch,
        Capability::ConnectorRestart,
        Capability::Diagnostics,
        Capability::BackupRun,
        Capability::UpdateApply,
        Capability::FilesRead,
        Capability::SqlQuery,
    ] {
        assert!(policy.grant(cap).is_some(), "{cap} should be granted");
    }
    for cap in [
        Capability::ConnectorPause,
        Capability::FilesWrite,
        Capability::BackupRestore,
        Capability::Shell,
    ] {
        assert!(policy.grant(cap).is_none(), "{cap} should not be granted");
    }
    let files = policy.grant(Capability::FilesRead).unwrap();
    assert_eq!(files.roots(), [Path::new("/var/lib/outpost/exports")]);
    let sql = policy.grant(Capability::SqlQuery).unwrap();
    assert!(sql.is_approval_only());
    let sql = sql.sql().unwrap();
    assert_eq!(sql.max_rows(), 500);
    assert_eq!(sql.columns("appointment"), Some(&Columns::All));
    assert_eq!(
        sql.columns("patient"),
        Some(&Columns::Listed(vec![
            "PatNum".into(),
            "LName".into(),
            "FName".into(),
            "Birthdate".into()
        ]))
    );
    assert!(policy
        .grant(Capability::UpdateApply)
        .unwrap()
        .is_window_only());
}

#[test]
fn digest_is_sha256_of_the_file_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let policy = Policy::load(&path).unwrap();
    assert_eq!(
        policy.digest(),
        hex::encode(Sha256::digest(EXAMPLE.as_bytes()))
    );
    assert_eq!(policy.digest().len(), 64);
    assert_eq!(policy.path(), path);

    let changed = parse(&EXAMPLE.replace("max_rows = 500", "max_rows = 50"));
    assert_ne!(changed.digest(), policy.digest());
}

#[test]
fn typo_in_a_capability_name_is_a_load_error_naming_the_key() {
    let err = load_error("[allow]\n\"logs.tial\" = true\n");
    assert!(
        err.starts_with(
            "policy.toml: key `allow.\"logs.tial\"`: unknown capability (known: health, "
        ),
        "{err}"
    );
    let err = load_error("[allow]\nhelth = true\n");
    assert!(
        err.starts_with("policy.toml: key `allow.helth`: unknown capability"),
        "{err}"
    );
}

#[test]
fn unquoted_dotted_capability_gets_a_hint() {
    let err = load_error("[allow]\nfiles.read = { roots = [\"/srv\"] }\n");
    assert!(
        err.contains("key `allow.files`: unknown capability"),
        "{err}"
    );
    assert!(err.contains("must be quoted: \"files.read\""), "{err}");
}

#[test]
fn policy_capabilities_cannot_be_granted() {
    let err = load_error("[allow]\n\"policy.write\" = true\n");
    assert!(
        err.contains("key `allow.\"policy.write\"`: unknown capability"),
        "{err}"
    );
}

#[test]
fn unknown_top_level_key_is_a_load_error() {
    let err = load_error("acess = \"approval\"\n");
    assert_eq!(
        err,
        "policy.toml: key `acess`: not a policy key (known: access, maintenance_window, allow)"
    );
}

#[test]
fn roots_must_be_absolute_paths() {
    let expected =
        "policy.toml: key `allow.\"files.read\".roots`: expected a list of absolute paths";
    for value in [
        "{ roots = [\"exports\"] }",
        "{ roots = [] }",
        "{ roots = \"/srv\" }",
        "{ roots = [1] }",
        "{ approval = true }",
    ] {
        let err = load_error(&format!("[allow]\n\"files.read\" = {value}\n"));
        assert_eq!(err, expected, "for {value}");
    }
}

#[test]
fn files_and_sql_grants_need_their_tables() {
    let err = load_error("[allow]\n\"files.write\" = \"approval\"\n");
    assert!(
        err.contains("key `allow.\"files.write\"`: expected a table with `roots`"),
        "{err}"
    );
    let err = load_error("[allow]\n\"sql.query\" = true\n");
    assert!(
        err.contains("key `allow.\"sql.query\"`: expected a table with `tables` and `max_rows`"),
        "{err}"
    );
    let err = load_error("[allow]\n\"sql.query\" = { tables = { a = \"*\" } }\n");
    assert!(err.contains("key `allow.\"sql.query\".max_rows`"), "{err}");
    let err = load_error("[allow]\n\"sql.query\" = { tables = { a = \"*\" }, max_rows = 0 }\n");
    assert!(
        err.contains("key `allow.\"sql.query\".max_rows`: expected a whole number"),
        "{err}"
    );
}

#[test]
fn unknown_key_inside_a_grant_is_a_load_error() {
    let err = load_error("[allow]\n\"files.read\" = { root = [\"/srv\"] }\n");
    assert!(
        err.contains("key `allow.\"files.read\".root`: not a key of this capability"),
        "{err}"
    );
    let err = load_error("[allow]\nhealth = { roots = [\"/srv\"] }\n");
    assert!(
        err.contains("key `allow.health.roots`: not a key of this capability"),
        "{err}"
    );
}

#[test]
fn sql_identifiers_in_the_policy_are_checked() {
    let err = load_error(
        "[allow]\n\"sql.query\" = { tables = { \"patient; drop table x\" = \"*\" }, max_rows = 5 }\n",
    );
    assert!(
        err.contains(
            "key `allow.\"sql.query\".tables.\"patient; drop table x\"`: expected a table name"
        ),
        "{err}"
    );
    let err = load_error(
        "[allow]\n\"sql.query\" = { tables = { patient = [\"LName--\"] }, max_rows = 5 }\n",
    );
    assert!(
        err.contains("key `allow.\"sql.query\".tables.patient`: expected a list of column names"),
        "{err}"
    );
    // A schema-qualified table is fine.
    parse(
        "[allow]\n\"sql.query\" = { tables = { \"dbo.patient\" = [\"LName\"] }, max_rows = 5 }\n",
    );
}

#[test]
fn window_grant_needs_a_maintenance_window() {
    let err = load_error("[allow]\n\"update.apply\" = \"window\"\n");
    assert!(
        err.contains("key `allow.\"update.apply\"`: expected a top-level `maintenance_window`"),
        "{err}"
    );
}

#[test]
fn malformed_maintenance_window_is_a_load_error() {
    let err = load_error("maintenance_window = \"Sun 01:00-04:00 America/Nowhere\"\n");
    assert!(
        err.starts_with("policy.toml: key `maintenance_window`: expected a window like"),
        "{err}"
    );
    assert!(
        err.ends_with("a known time zone, found `America/Nowhere`"),
        "{err}"
    );
}

#[test]
fn shell_is_never_unattended() {
    for value in ["\"window\"", "{ approval = false }", "\"sometimes\""] {
        let err = load_error(&format!("[allow]\nshell = {value}\n"));
        assert!(
            err.contains("shell is always approval-only"),
            "{value}: {err}"
        );
    }
}

#[test]
fn access_takes_only_its_two_values() {
    let err = load_error("access = \"sometimes\"\n");
    assert_eq!(
        err,
        "policy.toml: key `access`: expected \"unattended\" or \"approval\""
    );
}

#[test]
fn grant_values_of_the_wrong_shape_are_load_errors() {
    let err = load_error("[allow]\nhealth = \"yes\"\n");
    assert_eq!(
        err,
        "policy.toml: key `allow.health`: expected true, false, \"approval\", \"window\" or a table"
    );
    let err = load_error("[allow]\nhealth = { approval = \"yes\" }\n");
    assert!(
        err.contains("key `allow.health.approval`: expected true or false"),
        "{err}"
    );
}

#[test]
fn syntax_errors_give_the_line() {
    let err = load_error("access = \"unattended\"\n[allow\nhealth = true\n");
    assert!(err.starts_with("policy.toml: line 2, column "), "{err}");
    let err = load_error("[allow]\nhealth = true\nhealth = false\n");
    assert!(err.starts_with("policy.toml: line 3"), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let err = Policy::load(&path).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn oversized_file_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let big = format!(
        "# {}\n",
        "x".repeat(usize::try_from(MAX_POLICY_BYTES).unwrap())
    );
    std::fs::write(&path, big).unwrap();
    let err = Policy::load(&path).unwrap_err();
    assert!(matches!(err, PolicyError::TooLarge { .. }), "{err:?}");
}

#[test]
fn empty_policy_loads_and_allows_nothing() {
    let policy = parse("");
    assert!(Capability::ALL.iter().all(|c| policy.grant(*c).is_none()));
}

/// The hub must never be able to read the policy: `Policy` has no `Serialize`. This probe
/// resolves to the inherent method only when the bound holds.
#[test]
fn policy_has_no_serialize_impl() {
    use std::marker::PhantomData;
    struct Probe<T>(PhantomData<T>);
    trait Fallback {
        fn is_serialize(&self) -> bool {
            false
        }
    }
    impl<T> Fallback for Probe<T> {}
    impl<T: serde::Serialize> Probe<T> {
        #[allow(dead_code)]
        fn is_serialize(&self) -> bool {
            true
        }
    }
    assert!(
        Probe::<String>(PhantomData).is_serialize(),
        "the probe must detect Serialize"
    );
    assert!(
        !Probe::<Policy>(PhantomData).is_serialize(),
        "Policy must not be Serialize"
    );
}
