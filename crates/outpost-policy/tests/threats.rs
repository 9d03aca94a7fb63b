//! security.md's threat table, the rows that concern the policy: a capability or path the
//! policy does not allow (`../` escapes, absolute escapes, symlinks out of a root) is
//! refused, and a request to change the policy is impossible.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{allowed, assert_refused, decide, example, parse};
use outpost_policy::{resolve_under_roots, PathRefusal, Policy};
use serde_json::json;

/// A temp dir with `exports/` (the root, holding `reports/a.csv`) and `private/secret.txt`
/// beside it, plus a policy granting files.read and files.write on `exports/`.
struct Fixture {
    dir: tempfile::TempDir,
    policy: Policy,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("exports");
        std::fs::create_dir_all(root.join("reports")).unwrap();
        std::fs::write(root.join("reports/a.csv"), "x").unwrap();
        std::fs::create_dir_all(dir.path().join("private")).unwrap();
        std::fs::write(dir.path().join("private/secret.txt"), "s").unwrap();
        let root_toml = toml_string(&root);
        let policy = parse(&format!(
            "[allow]\n\"files.read\" = {{ roots = [{root_toml}] }}\n\
             \"files.list\" = {{ roots = [{root_toml}] }}\n\
             \"files.write\" = {{ roots = [{root_toml}] }}\n"
        ));
        Fixture { dir, policy }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("exports")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("private")
    }

    fn read(&self, path: &str) -> outpost_policy::Decision {
        decide(&self.policy, "files.read", json!({ "path": path }))
    }

    fn write(&self, path: &str) -> outpost_policy::Decision {
        decide(&self.policy, "files.write", json!({ "path": path }))
    }
}

fn toml_string(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[test]
fn capability_not_allowed_is_refused() {
    let policy = example();
    assert_refused(
        &decide(&policy, "files.write", json!({"path": "x"})),
        "default-deny",
        "files.write",
    );
}

#[test]
fn request_to_change_the_policy_is_impossible() {
    let policy = example();
    for cap in [
        "policy.write",
        "policy.read",
        "policy.replace",
        "policy",
        "allow",
    ] {
        assert_refused(
            &decide(&policy, cap, json!({"text": "[allow]\nshell = true\n"})),
            "unknown-capability",
            cap,
        );
    }
}

#[test]
fn path_inside_the_root_is_allowed() {
    let fx = Fixture::new();
    assert_eq!(fx.read("reports/a.csv"), allowed("allow.\"files.read\""));
    let absolute = fx.root().join("reports/a.csv");
    assert_eq!(
        fx.read(&absolute.display().to_string()),
        allowed("allow.\"files.read\"")
    );
    assert_eq!(
        decide(&fx.policy, "files.list", json!({"path": ""})),
        allowed("allow.\"files.list\"")
    );
    assert_eq!(
        fx.write("reports/new/b.csv"),
        allowed("allow.\"files.write\"")
    );
}

#[test]
fn dot_dot_escape_is_refused() {
    let fx = Fixture::new();
    for path in [
        "../private/secret.txt",
        "reports/../../private/secret.txt",
        "reports/..",
        "./../exports/reports/a.csv",
    ] {
        let reason = assert_refused(&fx.read(path), "allow.\"files.read\".roots", "`..`");
        assert!(
            !reason.contains("secret") && !reason.contains("reports"),
            "{reason}"
        );
    }
    let absolute = format!("{}/../private/secret.txt", fx.root().display());
    assert_refused(&fx.read(&absolute), "allow.\"files.read\".roots", "`..`");
}

#[test]
fn absolute_escape_is_refused() {
    let fx = Fixture::new();
    let secret = fx.outside().join("secret.txt");
    for path in [
        secret.display().to_string(),
        "/etc/passwd".to_owned(),
        "/".to_owned(),
    ] {
        let reason = assert_refused(
            &fx.read(&path),
            "allow.\"files.read\".roots",
            "absolute path is outside every root",
        );
        assert!(!reason.contains(&path), "{reason}");
    }
    // A sibling whose name merely starts with the root's name is not inside it.
    std::fs::create_dir_all(fx.dir.path().join("exports-old")).unwrap();
    let sibling = format!("{}-old/x", fx.root().display());
    assert_refused(
        &fx.read(&sibling),
        "allow.\"files.read\".roots",
        "outside every root",
    );
}

#[cfg(unix)]
mod symlinks {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlink_out_of_a_root_is_refused() {
        let fx = Fixture::new();
        symlink(
            fx.outside().join("secret.txt"),
            fx.root().join("innocent.csv"),
        )
        .unwrap();
        assert_refused(
            &fx.read("innocent.csv"),
            "allow.\"files.read\".roots",
            "through a symbolic link",
        );
        let absolute = fx.root().join("innocent.csv").display().to_string();
        assert_refused(
            &fx.read(&absolute),
            "allow.\"files.read\".roots",
            "symbolic link",
        );
    }

    #[test]
    fn symlinked_folder_out_of_a_root_is_refused_for_reads_and_writes() {
        let fx = Fixture::new();
        symlink(fx.outside(), fx.root().join("shared")).unwrap();
        assert_refused(
            &fx.read("shared/secret.txt"),
            "allow.\"files.read\".roots",
            "symbolic link",
        );
        // Writing a new file through the link would land outside the root.
        assert_refused(
            &fx.write("shared/new.txt"),
            "allow.\"files.write\".roots",
            "symbolic link",
        );
        assert_refused(
            &fx.write("shared/a/b/c.txt"),
            "allow.\"files.write\".roots",
            "symbolic link",
        );
        assert_refused(
            &decide(&fx.policy, "files.list", json!({"path": "shared"})),
            "allow.\"files.list\".roots",
            "symbolic link",
        );
    }

    #[test]
    fn dangling_symlink_cannot_be_written_through() {
        let fx = Fixture::new();
        symlink(fx.outside().join("planted.txt"), fx.root().join("drop.txt")).unwrap();
        assert_refused(
            &fx.write("drop.txt"),
            "allow.\"files.write\".roots",
            "symbolic link to a missing target",
        );
    }

    #[test]
    fn symlink_loop_is_refused() {
        let fx = Fixture::new();
        symlink(fx.root().join("loop"), fx.root().join("loop")).unwrap();
        assert_refused(
            &fx.read("loop/x"),
            "allow.\"files.read\".roots",
            "cannot be resolved",
        );
    }

    #[test]
    fn symlink_that_stays_inside_the_root_is_allowed() {
        let fx = Fixture::new();
        symlink(fx.root().join("reports"), fx.root().join("latest")).unwrap();
        assert_eq!(fx.read("latest/a.csv"), allowed("allow.\"files.read\""));
        let resolved = resolve_under_roots(&[fx.root()], "latest/a.csv").unwrap();
        assert_eq!(
            resolved,
            fx.root().canonicalize().unwrap().join("reports/a.csv")
        );
    }

    #[test]
    fn root_that_is_itself_a_symlink_works_by_either_name() {
        let fx = Fixture::new();
        let alias = fx.dir.path().join("alias");
        symlink(fx.root(), &alias).unwrap();
        let roots = [alias.clone()];
        let via_alias = alias.join("reports/a.csv").display().to_string();
        let via_target = fx.root().join("reports/a.csv").display().to_string();
        assert!(resolve_under_roots(&roots, &via_alias).is_ok());
        assert!(resolve_under_roots(&roots, &via_target).is_ok());
        assert_eq!(
            resolve_under_roots(
                &roots,
                &fx.outside().join("secret.txt").display().to_string()
            ),
            Err(PathRefusal::OutsideRoots)
        );
    }
}

#[test]
fn second_root_is_reached_by_absolute_path() {
    let fx = Fixture::new();
    let other = fx.dir.path().join("imports");
    std::fs::create_dir_all(&other).unwrap();
    let roots = [fx.root(), other.clone()];
    let got = resolve_under_roots(&roots, &other.join("x.hl7").display().to_string()).unwrap();
    assert_eq!(got, other.canonicalize().unwrap().join("x.hl7"));
    // Relative paths are taken under the first root.
    let got = resolve_under_roots(&roots, "x.hl7").unwrap();
    assert_eq!(got, fx.root().canonicalize().unwrap().join("x.hl7"));
}
