//! Resolving a requested path against the roots a policy names for `files.*`.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::PathRefusal;

/// Resolves a requested path against the policy's roots for `files.*`.
///
/// Refuses any `..` component (even one that would stay inside a root), absolute paths
/// outside every root, and paths that leave every root once symbolic links are followed:
/// the longest existing prefix of the path is canonicalized, and the components after it
/// (which do not exist yet, as for `files.write`) are appended as written. A final
/// component that is a dangling symbolic link is refused, since writing through it could
/// create a file anywhere.
///
/// A relative path is taken relative to the first root; address other roots with an
/// absolute path. The empty path (or `.`) names the first root itself.
///
/// Returns the resolved path, which is inside a canonicalized root. Between this check and
/// the use of the path a local user could still swap in a symbolic link; the caller should
/// resolve again right before use, and open the file without following a final link.
pub fn resolve_under_roots(roots: &[PathBuf], requested: &str) -> Result<PathBuf, PathRefusal> {
    if roots.is_empty() {
        return Err(PathRefusal::NoRoots);
    }
    if requested.contains('\0') {
        return Err(PathRefusal::Nul);
    }
    let requested = Path::new(requested);
    let mut relative = PathBuf::new();
    for component in requested.components() {
        match component {
            Component::ParentDir => return Err(PathRefusal::ParentComponent),
            Component::Prefix(_) if !requested.is_absolute() => {
                return Err(PathRefusal::DriveRelative)
            }
            Component::Normal(part) => relative.push(part),
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
        }
    }

    let canonical_roots = canonicalize_roots(roots)?;
    let candidate = if requested.is_absolute() {
        // Lexically under a root, as the policy writes it or as it resolves.
        let lexical = Path::new(requested);
        let inside = roots
            .iter()
            .chain(canonical_roots.iter())
            .any(|root| lexical.starts_with(root));
        if !inside {
            return Err(PathRefusal::OutsideRoots);
        }
        // Rebuild without `.` components so the prefix walk below sees only real names.
        let mut clean = PathBuf::new();
        for component in lexical.components() {
            match component {
                Component::CurDir => {}
                other => clean.push(other),
            }
        }
        clean
    } else {
        let first = canonical_roots.first().ok_or(PathRefusal::NoRoots)?;
        first.join(&relative)
    };

    let resolved = resolve_existing_prefix(&candidate)?;
    if canonical_roots
        .iter()
        .any(|root| resolved.starts_with(root))
    {
        Ok(resolved)
    } else {
        Err(PathRefusal::SymlinkEscape)
    }
}

/// Canonicalizes every root that exists. A root that does not exist is skipped unless none
/// does, so one missing export folder does not block the others.
fn canonicalize_roots(roots: &[PathBuf]) -> Result<Vec<PathBuf>, PathRefusal> {
    let mut canonical = Vec::with_capacity(roots.len());
    let mut first_error = None;
    for root in roots {
        match std::fs::canonicalize(root) {
            Ok(path) => canonical.push(path),
            Err(err) => {
                first_error.get_or_insert_with(|| PathRefusal::RootUnavailable {
                    root: root.clone(),
                    reason: err.to_string(),
                });
            }
        }
    }
    match (canonical.is_empty(), first_error) {
        (true, Some(err)) => Err(err),
        (true, None) => Err(PathRefusal::NoRoots),
        (false, _) => Ok(canonical),
    }
}

/// Canonicalizes the longest existing prefix of `path` and appends the rest as written.
fn resolve_existing_prefix(path: &Path) -> Result<PathBuf, PathRefusal> {
    let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
    let mut prefix = path;
    loop {
        match std::fs::canonicalize(prefix) {
            Ok(mut resolved) => {
                if let Some(first_missing) = missing.last() {
                    // `canonicalize` failed on prefix/first_missing but the name may still
                    // be there as a link to a missing target.
                    if std::fs::symlink_metadata(prefix.join(first_missing)).is_ok() {
                        return Err(PathRefusal::DanglingSymlink);
                    }
                }
                for part in missing.iter().rev() {
                    resolved.push(part);
                }
                return Ok(resolved);
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (prefix.parent(), prefix.file_name()) else {
                    return Err(PathRefusal::Unresolvable {
                        reason: err.to_string(),
                    });
                };
                missing.push(name);
                prefix = parent;
            }
            Err(err) => {
                return Err(PathRefusal::Unresolvable {
                    reason: err.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("exports");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.csv"), b"x").unwrap();
        (dir, root)
    }

    #[test]
    fn relative_path_resolves_inside_the_first_root() {
        let (_dir, root) = setup();
        let got = resolve_under_roots(std::slice::from_ref(&root), "sub/a.csv").unwrap();
        assert_eq!(got, root.canonicalize().unwrap().join("sub/a.csv"));
    }

    #[test]
    fn empty_path_names_the_root() {
        let (_dir, root) = setup();
        let got = resolve_under_roots(std::slice::from_ref(&root), "").unwrap();
        assert_eq!(got, root.canonicalize().unwrap());
    }

    #[test]
    fn missing_final_components_are_kept_for_writes() {
        let (_dir, root) = setup();
        let got = resolve_under_roots(std::slice::from_ref(&root), "sub/new/b.csv").unwrap();
        assert_eq!(got, root.canonicalize().unwrap().join("sub/new/b.csv"));
    }

    #[test]
    fn parent_components_are_refused_even_inside_a_root() {
        let (_dir, root) = setup();
        assert_eq!(
            resolve_under_roots(&[root], "sub/../sub/a.csv"),
            Err(PathRefusal::ParentComponent)
        );
    }

    #[test]
    fn nul_bytes_are_refused() {
        let (_dir, root) = setup();
        assert_eq!(resolve_under_roots(&[root], "a\0b"), Err(PathRefusal::Nul));
    }

    #[test]
    fn no_roots_refuses_everything() {
        assert_eq!(resolve_under_roots(&[], "a"), Err(PathRefusal::NoRoots));
    }

    #[test]
    fn a_missing_root_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("nope");
        let err = resolve_under_roots(std::slice::from_ref(&root), "a").unwrap_err();
        assert!(
            matches!(&err, PathRefusal::RootUnavailable { root: r, .. } if *r == root),
            "{err:?}"
        );
    }
}
