//! Property: whatever string a job sends as `path`, a resolved path never lies outside the
//! roots, even with symbolic links in and out of them (on Unix).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use outpost_policy::resolve_under_roots;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
    canonical_root: PathBuf,
    outside: PathBuf,
}

fn tree() -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("sub/file"), "x").unwrap();
    std::fs::write(outside.join("secret"), "s").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(&outside, root.join("out")).unwrap();
        symlink(outside.join("secret"), root.join("sub/leak")).unwrap();
        symlink(outside.join("missing"), root.join("dangling")).unwrap();
        symlink(root.join("sub"), root.join("inner")).unwrap();
        symlink(root.join("loop"), root.join("loop")).unwrap();
        symlink("..", root.join("sub/up")).unwrap();
    }
    let canonical_root = root.canonicalize().unwrap();
    Tree {
        _dir: dir,
        root,
        canonical_root,
        outside,
    }
}

/// Path strings built from names that matter here, so escapes are tried often; plus
/// arbitrary strings.
fn requested(tree: &Tree) -> impl Strategy<Value = String> {
    let root = tree.root.display().to_string();
    let outside = tree.outside.display().to_string();
    let segment = prop::sample::select(vec![
        "..", ".", "", "sub", "file", "out", "leak", "dangling", "inner", "loop", "up", "secret",
        "new", "root", "outside", "\\..", "..\\..", "%2e%2e",
    ]);
    let built = (
        prop::sample::select(vec![
            String::new(),
            "/".to_owned(),
            format!("{root}/"),
            format!("{outside}/"),
        ]),
        prop::collection::vec(segment, 0..8),
    )
        .prop_map(|(prefix, parts)| format!("{prefix}{}", parts.join("/")));
    prop_oneof![3 => built, 1 => any::<String>()]
}

/// The deepest ancestor of `path` that exists, canonicalized.
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors().find_map(|a| a.canonicalize().ok())
}

#[test]
fn arbitrary_requested_paths_never_resolve_outside_the_roots() {
    let tree = tree();
    let roots = [tree.root.clone()];
    let mut runner = TestRunner::new(Config {
        cases: 2048,
        failure_persistence: None,
        ..Config::default()
    });
    // (resolved, tried), to show the property was not checked on refusals alone.
    let seen = std::cell::Cell::new((0u32, 0u32));
    let result = runner.run(&requested(&tree), |path| {
        let (ok, all) = seen.get();
        seen.set((ok + u32::from(resolve_under_roots(&roots, &path).is_ok()), all + 1));
        if let Ok(resolved) = resolve_under_roots(&roots, &path) {
            prop_assert!(
                resolved.starts_with(&tree.canonical_root),
                "{path:?} resolved to {resolved:?}, outside {:?}",
                tree.canonical_root
            );
            let anchor = existing_ancestor(&resolved);
            prop_assert!(
                anchor.as_ref().is_some_and(|a| a.starts_with(&tree.canonical_root)),
                "{path:?} resolved to {resolved:?} whose existing part {anchor:?} is outside the root"
            );
            prop_assert!(
                !resolved.components().any(|c| matches!(c, std::path::Component::ParentDir)),
                "{path:?} resolved to {resolved:?} with a `..`"
            );
        }
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
    let (resolved, tried) = seen.get();
    assert!(
        resolved * 10 > tried,
        "only {resolved} of {tried} generated paths resolved; the strategy no longer explores"
    );
}
