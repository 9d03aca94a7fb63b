//! What `files.list`, `files.read` and `files.write` share: the roots of the job's own
//! grant, resolving a path against them at run time, and opening a file so that a
//! symbolic link swapped in after the check is not followed out of the roots.
//!
//! Without `openat`/`O_NOFOLLOW` (the agent does not depend on `libc`), a swap is caught
//! by comparing identities instead: the final component is checked with `lstat` right
//! before the open, the open file is compared with it, and afterwards the path must still
//! resolve to itself and name that same file. A link swapped into the final component, or
//! into any folder on the way, makes one of those comparisons fail.

use std::fs::{File, Metadata};
use std::io;
use std::path::{Path, PathBuf};

use outpost_policy::{resolve_under_roots, Capability, Policy};

use crate::jobs::capability::CapabilityError;

/// The roots of `capability`'s own grant: `files.read` roots do not open `files.write`.
pub(crate) fn roots(
    policy: &Policy,
    capability: Capability,
) -> Result<Vec<PathBuf>, CapabilityError> {
    match policy.grant(capability) {
        Some(grant) => Ok(grant.roots().to_vec()),
        None => Err(CapabilityError::Refused {
            rule: capability.policy_key(),
            reason: format!("the policy does not allow {capability}"),
        }),
    }
}

/// A refusal by the roots rule of `capability`.
pub(crate) fn refused(capability: Capability, reason: impl Into<String>) -> CapabilityError {
    CapabilityError::Refused {
        rule: format!("{}.roots", capability.policy_key()),
        reason: reason.into(),
    }
}

/// Resolves `requested` under `roots` now (see [`resolve_under_roots`]).
pub(crate) fn resolve(
    roots: &[PathBuf],
    capability: Capability,
    requested: &str,
) -> Result<PathBuf, CapabilityError> {
    resolve_under_roots(roots, requested)
        .map_err(|refusal| refused(capability, format!("{requested:?}: {refusal}")))
}

/// Checks that `resolved` (a path [`resolve`] returned) still resolves to itself: no link
/// has been swapped into any of its components since.
pub(crate) fn still_resolves_to_itself(
    roots: &[PathBuf],
    capability: Capability,
    resolved: &Path,
) -> Result<(), CapabilityError> {
    let text = resolved.to_str().ok_or_else(|| {
        CapabilityError::Failed(format!(
            "the path {} is not valid UTF-8",
            resolved.display()
        ))
    })?;
    let again = resolve(roots, capability, text)?;
    if again == resolved {
        Ok(())
    } else {
        Err(changed(capability, resolved))
    }
}

/// A refusal for a path that changed under the job (a link swapped in).
pub(crate) fn changed(capability: Capability, path: &Path) -> CapabilityError {
    refused(
        capability,
        format!(
            "{} changed while it was being opened (a symbolic link was swapped in?)",
            path.display()
        ),
    )
}

/// The `lstat` of `path`, with errors phrased for the job.
pub(crate) fn lstat(path: &Path) -> Result<Option<Metadata>, CapabilityError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) => Ok(Some(metadata)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_failed("reading the metadata of", path, &err)),
    }
}

/// `Failed` naming the operation, the path and what the OS said.
pub(crate) fn io_failed(what: &str, path: &Path, err: &io::Error) -> CapabilityError {
    CapabilityError::Failed(format!("{what} {}: {err}", path.display()))
}

/// Opens `resolved` for reading without following a link that was swapped in after it
/// was resolved (see the module docs). `before` is its `lstat` taken just now.
pub(crate) fn open_verified(
    roots: &[PathBuf],
    capability: Capability,
    resolved: &Path,
    before: &Metadata,
) -> Result<(File, Metadata), CapabilityError> {
    if before.file_type().is_symlink() {
        return Err(refused(
            capability,
            format!("{} is a symbolic link", resolved.display()),
        ));
    }
    let file = File::open(resolved).map_err(|err| io_failed("opening", resolved, &err))?;
    let opened = file
        .metadata()
        .map_err(|err| io_failed("reading the metadata of", resolved, &err))?;
    if !same_file(before, &opened) {
        return Err(changed(capability, resolved));
    }
    still_resolves_to_itself(roots, capability, resolved)?;
    match std::fs::metadata(resolved) {
        Ok(now) if same_file(&now, &opened) => Ok((file, opened)),
        _ => Err(changed(capability, resolved)),
    }
}

/// Whether two metadata describe the same file: device and inode where the OS has them.
#[cfg(unix)]
pub(crate) fn same_file(a: &Metadata, b: &Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Whether two metadata describe the same file. Stable Rust offers no file identity off
/// unix, so this compares kind, size and modification time: weaker, but a swap to
/// another file almost always differs in one of them.
#[cfg(not(unix))]
pub(crate) fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.is_dir() == b.is_dir()
        && a.is_file() == b.is_file()
        && a.len() == b.len()
        && a.modified().ok() == b.modified().ok()
}

/// A file's modification time (unix ms), if the OS reports one.
pub(crate) fn modified_ms(metadata: &Metadata) -> Option<i64> {
    let modified = metadata.modified().ok()?;
    let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Flushes a folder's entries to disk after a rename, where the OS allows opening a
/// folder (unix); elsewhere the rename itself is the best there is.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A temp dir with `root/` (holding `a.txt` and `sub/b.txt`) and `outside/secret.txt`;
    /// the policy text grants `capability` on `root`.
    pub(crate) fn setup(capability: &str) -> (tempfile::TempDir, PathBuf, PathBuf, Policy) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a.txt"), b"hello").unwrap();
        std::fs::write(root.join("sub/b.txt"), b"inner file").unwrap();
        std::fs::write(outside.join("secret.txt"), b"secret").unwrap();
        let text = format!(
            "[allow]\n\"{capability}\" = {{ roots = [{:?}] }}\n",
            root.to_str().unwrap()
        );
        let policy = Policy::parse(&text, Path::new("policy.toml")).unwrap();
        (dir, root, outside, policy)
    }

    #[test]
    fn roots_come_from_the_capability_s_own_grant() {
        let (_dir, root, _outside, policy) = setup("files.read");
        assert_eq!(roots(&policy, Capability::FilesRead).unwrap(), vec![root]);
        match roots(&policy, Capability::FilesWrite) {
            Err(CapabilityError::Refused { rule, .. }) => assert_eq!(rule, "allow.\"files.write\""),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn open_verified_opens_a_plain_file_and_refuses_a_link() {
        let (_dir, root, _outside, policy) = setup("files.read");
        let roots = roots(&policy, Capability::FilesRead).unwrap();
        let path = resolve(&roots, Capability::FilesRead, "a.txt").unwrap();
        let before = lstat(&path).unwrap().unwrap();
        let (_file, metadata) =
            open_verified(&roots, Capability::FilesRead, &path, &before).unwrap();
        assert_eq!(metadata.len(), 5);

        // Metadata of another file: the open file is not what was checked.
        let other = lstat(&root.join("sub/b.txt")).unwrap().unwrap();
        assert!(matches!(
            open_verified(&roots, Capability::FilesRead, &path, &other),
            Err(CapabilityError::Refused { .. })
        ));
    }
}
