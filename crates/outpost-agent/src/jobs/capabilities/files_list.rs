//! `files.list`: the entries of one folder under the roots of the `files.list` grant.
//!
//! Arguments: `path` (relative to the first root, or absolute under any root; default the
//! first root). Output: a first line `{path, entries, truncated}`, then one line per entry
//! `{name, kind, size, modified_ms}` sorted by name, `kind` being `file`, `dir`, `symlink`
//! or `other` (links are reported, not followed). At most [`MAX_ENTRIES`] are read.
//!
//! The folder's identity is compared before and after reading it; a folder swapped for a
//! link and back while it is being read could go unnoticed, which exposes names and sizes
//! only, never contents.

use std::path::PathBuf;

use async_trait::async_trait;
use outpost_policy::Capability;
use serde::Serialize;
use serde_json::json;

use super::files::{self, lstat, modified_ms, same_file};
use super::{blocking, cut_note, Args};
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// The most entries one listing reads.
pub const MAX_ENTRIES: usize = 10_000;

const CAPABILITY: Capability = Capability::FilesList;

/// The `files.list` capability.
pub struct FilesList;

/// One folder entry.
#[derive(Debug, Clone, Serialize)]
struct Entry {
    name: String,
    kind: &'static str,
    size: Option<u64>,
    modified_ms: Option<i64>,
}

struct Listing {
    path: PathBuf,
    entries: Vec<Entry>,
    truncated: bool,
}

#[async_trait]
impl CapabilityHandler for FilesList {
    fn capability(&self) -> Capability {
        CAPABILITY
    }

    async fn run(
        &self,
        _cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let args = Args::new(job.args, &["path"])?;
        let requested = args.str("path")?.unwrap_or("").to_owned();
        let roots = files::roots(job.policy, CAPABILITY)?;
        let cancel = job.cancel.clone();
        let listing = blocking(move || list(&roots, &requested, &cancel)).await?;

        let header = json!({
            "path": listing.path.display().to_string(),
            "entries": listing.entries.len(),
            "truncated": listing.truncated,
        });
        let mut written = 0usize;
        if out.write_json(&header).await.is_ok() {
            for entry in &listing.entries {
                if out.write_json(entry).await.is_err() {
                    break;
                }
                written += 1;
            }
        }
        let more = if listing.truncated {
            format!(" (the folder has more than {MAX_ENTRIES}; the first read are listed)")
        } else {
            String::new()
        };
        Ok(format!(
            "{written} of {} entries listed{more}{}",
            listing.entries.len(),
            cut_note(out)
        ))
    }
}

fn list(
    roots: &[PathBuf],
    requested: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Listing, CapabilityError> {
    let path = files::resolve(roots, CAPABILITY, requested)?;
    let before = match lstat(&path)? {
        None => {
            return Err(CapabilityError::Failed(format!(
                "no folder at {}",
                path.display()
            )))
        }
        Some(metadata) if metadata.file_type().is_symlink() => {
            return Err(files::changed(CAPABILITY, &path))
        }
        Some(metadata) if !metadata.is_dir() => {
            return Err(CapabilityError::BadArgs(format!(
                "argument `path`: {} is a file, not a folder; use files.read",
                path.display()
            )))
        }
        Some(metadata) => metadata,
    };
    let reader =
        std::fs::read_dir(&path).map_err(|err| files::io_failed("listing", &path, &err))?;
    let mut entries = Vec::new();
    let mut truncated = false;
    for entry in reader {
        if cancel.is_cancelled() {
            return Err(CapabilityError::Cancelled);
        }
        if entries.len() == MAX_ENTRIES {
            truncated = true;
            break;
        }
        let entry = entry.map_err(|err| files::io_failed("listing", &path, &err))?;
        // `DirEntry::metadata` does not follow links, so a link is reported as one.
        let metadata = entry.metadata().ok();
        let kind = match entry.file_type() {
            Ok(t) if t.is_symlink() => "symlink",
            Ok(t) if t.is_dir() => "dir",
            Ok(t) if t.is_file() => "file",
            _ => "other",
        };
        entries.push(Entry {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind,
            size: metadata
                .as_ref()
                .filter(|_| kind != "dir")
                .map(std::fs::Metadata::len),
            modified_ms: metadata.as_ref().and_then(modified_ms),
        });
    }
    files::still_resolves_to_itself(roots, CAPABILITY, &path)?;
    match lstat(&path)? {
        Some(after) if same_file(&before, &after) => {}
        _ => return Err(files::changed(CAPABILITY, &path)),
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing {
        path,
        entries,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::files::tests::setup;
    use crate::jobs::capabilities::testutil;

    #[tokio::test]
    async fn lists_a_folder_sorted_with_kinds_and_sizes() {
        let (dir, root, _outside, policy) = setup("files.list");
        let (cx, _reloads) = testutil::context(dir.path());
        let (result, output) = testutil::run(&FilesList, &cx, &policy, json!({})).await;
        assert_eq!(result.unwrap(), "2 of 2 entries listed");
        let lines = testutil::lines(&output);
        assert_eq!(
            lines[0]["path"],
            root.canonicalize().unwrap().display().to_string()
        );
        assert_eq!(lines[1]["name"], "a.txt");
        assert_eq!(lines[1]["kind"], "file");
        assert_eq!(lines[1]["size"], 5);
        assert!(lines[1]["modified_ms"].as_i64().unwrap() > 0);
        assert_eq!(lines[2]["name"], "sub");
        assert_eq!(lines[2]["kind"], "dir");

        let (result, output) =
            testutil::run(&FilesList, &cx, &policy, json!({"path": "sub"})).await;
        result.unwrap();
        assert_eq!(testutil::lines(&output)[1]["name"], "b.txt");
    }

    #[tokio::test]
    async fn escapes_are_refused_at_run_time() {
        let (dir, _root, outside, policy) = setup("files.list");
        let (cx, _reloads) = testutil::context(dir.path());
        for path in [
            "../outside".to_owned(),
            "sub/../../outside".to_owned(),
            outside.display().to_string(),
        ] {
            let (result, output) =
                testutil::run(&FilesList, &cx, &policy, json!({"path": path})).await;
            match result {
                Err(CapabilityError::Refused { rule, .. }) => {
                    assert_eq!(rule, "allow.\"files.list\".roots", "{path}")
                }
                other => panic!("{path}: expected a refusal, got {other:?}"),
            }
            assert!(output.is_empty());
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_link_out_of_the_root_is_refused_and_listed_as_a_link() {
        let (dir, root, outside, policy) = setup("files.list");
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let (result, _) = testutil::run(&FilesList, &cx, &policy, json!({"path": "out"})).await;
        assert!(
            matches!(result, Err(CapabilityError::Refused { .. })),
            "{result:?}"
        );

        let (result, output) = testutil::run(&FilesList, &cx, &policy, json!({})).await;
        result.unwrap();
        let link = testutil::lines(&output)
            .into_iter()
            .find(|l| l["name"] == "out")
            .unwrap();
        assert_eq!(link["kind"], "symlink");
    }

    #[tokio::test]
    async fn a_file_is_not_a_folder_and_another_grant_does_not_count() {
        let (dir, _root, _outside, policy) = setup("files.list");
        let (cx, _reloads) = testutil::context(dir.path());
        let (result, _) = testutil::run(&FilesList, &cx, &policy, json!({"path": "a.txt"})).await;
        assert!(matches!(result, Err(CapabilityError::BadArgs(m)) if m.contains("files.read")));

        let (_dir2, _root2, _outside2, read_only) = setup("files.read");
        let (result, _) = testutil::run(&FilesList, &cx, &read_only, json!({})).await;
        assert!(
            matches!(result, Err(CapabilityError::Refused { rule, .. }) if rule == "allow.\"files.list\"")
        );
    }
}
