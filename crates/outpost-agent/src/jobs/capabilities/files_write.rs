//! `files.write`: write one file under the roots of the `files.write` grant, atomically.
//!
//! Arguments: `path` (relative to the first root, or absolute under any root; its folder
//! must exist), exactly one of `base64` or `text` (at most [`MAX_BYTES`] once decoded),
//! and `mode`: `"create"` (default; refused if the file exists) or `"replace"`. Output:
//! `{path, bytes, sha256, mode}`.
//!
//! The bytes go to a new temporary file in the same folder, are flushed to disk, and
//! then take the target's name in one step (a hard link for `create`, which fails if the
//! name is taken, a rename for `replace`), so readers see the old file or the new one,
//! never half of one. The path is resolved again right before that step; a target that is
//! a symbolic link is never written through or replaced.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use outpost_policy::Capability;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::files::{self, lstat, same_file};
use super::{b64, blocking, Args};
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// The largest file one job may write.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

const CAPABILITY: Capability = Capability::FilesWrite;

/// The `files.write` capability.
pub struct FilesWrite;

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Replace,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Create => "create",
            Mode::Replace => "replace",
        }
    }
}

#[async_trait]
impl CapabilityHandler for FilesWrite {
    fn capability(&self) -> Capability {
        CAPABILITY
    }

    async fn run(
        &self,
        _cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let args = Args::new(job.args, &["path", "base64", "text", "mode"])?;
        let requested = args
            .required_str("path", "a file path under the roots of files.write")?
            .to_owned();
        let mode = match args.str("mode")?.unwrap_or("create") {
            "create" => Mode::Create,
            "replace" => Mode::Replace,
            other => {
                return Err(CapabilityError::BadArgs(format!(
                    "argument `mode`: expected \"create\" or \"replace\", found {other:?}"
                )))
            }
        };
        let data = match (args.str("base64")?, args.str("text")?) {
            (Some(encoded), None) => {
                // Checked before decoding so an oversized argument is not decoded at all.
                if encoded.len() / 4 * 3 > MAX_BYTES + 3 {
                    return Err(too_large("base64", encoded.len() / 4 * 3));
                }
                b64::decode(encoded)
                    .map_err(|err| CapabilityError::BadArgs(format!("argument `base64`: {err}")))?
            }
            (None, Some(text)) => text.as_bytes().to_vec(),
            (Some(_), Some(_)) => {
                return Err(CapabilityError::BadArgs(
                    "arguments `base64` and `text`: give one, not both".to_owned(),
                ))
            }
            (None, None) => {
                return Err(CapabilityError::BadArgs(
                    "arguments `base64` and `text`: missing; give the file's bytes in one of them"
                        .to_owned(),
                ))
            }
        };
        if data.len() > MAX_BYTES {
            return Err(too_large(
                if args.has("text") { "text" } else { "base64" },
                data.len(),
            ));
        }
        let roots = files::roots(job.policy, CAPABILITY)?;
        if job.cancel.is_cancelled() {
            return Err(CapabilityError::Cancelled);
        }
        let sha256 = hex::encode(Sha256::digest(&data));
        let bytes = data.len();
        let path = blocking(move || write(&roots, &requested, &data, mode)).await?;
        let _ = out
            .write_json(&json!({
                "path": path.display().to_string(),
                "bytes": bytes,
                "sha256": sha256,
                "mode": mode.as_str(),
            }))
            .await;
        let done = match mode {
            Mode::Create => "created",
            Mode::Replace => "replaced",
        };
        Ok(format!("{done} a file of {bytes} bytes (sha256 {sha256})"))
    }
}

fn too_large(argument: &str, bytes: usize) -> CapabilityError {
    CapabilityError::BadArgs(format!(
        "argument `{argument}`: at most {MAX_BYTES} bytes may be written, found {bytes}"
    ))
}

/// Removes the temporary file unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn write(
    roots: &[PathBuf],
    requested: &str,
    data: &[u8],
    mode: Mode,
) -> Result<PathBuf, CapabilityError> {
    // Resolving the whole path first gives escapes their refusal (`..`, outside, links).
    let resolved = files::resolve(roots, CAPABILITY, requested)?;
    let requested_path = Path::new(requested);
    let name = match requested_path.components().next_back() {
        Some(Component::Normal(name)) => name.to_owned(),
        _ => {
            return Err(CapabilityError::BadArgs(format!(
                "argument `path`: {requested:?} must end in a file name"
            )))
        }
    };
    let parent_requested = requested_path.parent().and_then(Path::to_str).unwrap_or("");
    let parent = files::resolve(roots, CAPABILITY, parent_requested)?;
    let target = parent.join(&name);
    if resolved != target {
        // The final name is a link (to somewhere inside the roots, or it would have been
        // refused above); writing would change the file it points to.
        return Err(files::refused(
            CAPABILITY,
            format!(
                "{} is a symbolic link; refusing to write through or replace it",
                target.display()
            ),
        ));
    }
    match lstat(&parent)? {
        Some(metadata) if metadata.is_dir() => {}
        Some(_) => {
            return Err(CapabilityError::BadArgs(format!(
                "argument `path`: {} is not a folder",
                parent.display()
            )))
        }
        None => {
            return Err(CapabilityError::BadArgs(format!(
                "argument `path`: the folder {} does not exist",
                parent.display()
            )))
        }
    }
    let existing = check_target(&target, mode)?;

    let temp_path = parent.join(format!(".outpost-write-{:016x}.tmp", rand::random::<u64>()));
    let mut temp_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(|err| files::io_failed("creating", &temp_path, &err))?;
    let mut temp = TempFile {
        path: temp_path,
        armed: true,
    };
    let written = temp_file
        .metadata()
        .map_err(|err| files::io_failed("reading the metadata of", &temp.path, &err))?;
    // The temporary file must be where it was meant to be: in the resolved folder, not
    // behind a link swapped in for the folder meanwhile.
    files::still_resolves_to_itself(roots, CAPABILITY, &parent)?;
    match lstat(&temp.path)? {
        Some(now) if same_file(&now, &written) => {}
        _ => return Err(files::changed(CAPABILITY, &parent)),
    }
    write_and_sync(&mut temp_file, data, &temp.path)?;
    if let Some(existing) = &existing {
        // A replaced file keeps its permissions (a restricted export stays restricted).
        temp_file
            .set_permissions(existing.permissions())
            .map_err(|err| files::io_failed("setting the permissions of", &temp.path, &err))?;
    }

    // Right before the file takes its name: the folder still resolves to itself and the
    // target is still acceptable.
    files::still_resolves_to_itself(roots, CAPABILITY, &parent)?;
    check_target(&target, mode)?;
    match mode {
        Mode::Create => match std::fs::hard_link(&temp.path, &target) {
            // The temporary name is removed when `temp` drops.
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(exists(&target));
            }
            // File systems without hard links (FAT, some shares): check, then rename. A
            // file created in between would be replaced; the window is a few microseconds.
            Err(_) => {
                check_target(&target, mode)?;
                rename(&mut temp, &target)?;
            }
        },
        Mode::Replace => rename(&mut temp, &target)?,
    }
    match lstat(&target)? {
        Some(now) if same_file(&now, &written) => {}
        _ => {
            return Err(CapabilityError::Failed(format!(
                "{} was changed by someone else right after it was written",
                target.display()
            )))
        }
    }
    files::sync_dir(&parent);
    Ok(target)
}

/// Checks what is at `target` now: nothing (any mode) or a regular file (`replace`).
/// Returns its metadata if there is one.
fn check_target(target: &Path, mode: Mode) -> Result<Option<std::fs::Metadata>, CapabilityError> {
    match lstat(target)? {
        None => Ok(None),
        Some(metadata) if metadata.file_type().is_symlink() => Err(files::refused(
            CAPABILITY,
            format!(
                "{} is a symbolic link; refusing to write through or replace it",
                target.display()
            ),
        )),
        Some(metadata) if metadata.is_dir() => Err(CapabilityError::BadArgs(format!(
            "argument `path`: {} is a folder",
            target.display()
        ))),
        Some(metadata) if !metadata.is_file() => Err(CapabilityError::BadArgs(format!(
            "argument `path`: {} is not a regular file",
            target.display()
        ))),
        Some(_) if mode == Mode::Create => Err(exists(target)),
        Some(metadata) => Ok(Some(metadata)),
    }
}

fn exists(target: &Path) -> CapabilityError {
    CapabilityError::BadArgs(format!(
        "argument `path`: {} already exists; pass `mode` = \"replace\" to replace it",
        target.display()
    ))
}

fn write_and_sync(file: &mut File, data: &[u8], path: &Path) -> Result<(), CapabilityError> {
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|err| files::io_failed("writing", path, &err))
}

fn rename(temp: &mut TempFile, target: &Path) -> Result<(), CapabilityError> {
    std::fs::rename(&temp.path, target)
        .map_err(|err| files::io_failed("renaming the new file to", target, &err))?;
    temp.armed = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::files::tests::setup;
    use crate::jobs::capabilities::files_read::FilesRead;
    use crate::jobs::capabilities::testutil;
    use outpost_policy::Policy;

    fn leftover_temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".outpost-write-"))
            .collect()
    }

    #[tokio::test]
    async fn writes_then_reads_back_the_same_bytes() {
        let (dir, root, _outside, policy) = setup("files.write");
        let (cx, _reloads) = testutil::context(dir.path());
        let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let (result, output) = testutil::run(
            &FilesWrite,
            &cx,
            &policy,
            json!({"path": "sub/new.bin", "base64": b64::encode(&bytes)}),
        )
        .await;
        assert!(result
            .unwrap()
            .starts_with("created a file of 100000 bytes"));
        let line = &testutil::lines(&output)[0];
        assert_eq!(line["bytes"], 100_000);
        assert_eq!(line["sha256"], hex::encode(Sha256::digest(&bytes)));
        assert_eq!(std::fs::read(root.join("sub/new.bin")).unwrap(), bytes);
        assert!(leftover_temp_files(&root.join("sub")).is_empty());

        // Round trip through files.read with a policy granting both on the same root.
        let both = Policy::parse(
            &format!(
                "[allow]\n\"files.read\" = {{ roots = [{:?}] }}\n",
                root.to_str().unwrap()
            ),
            Path::new("policy.toml"),
        )
        .unwrap();
        let (result, output) =
            testutil::run(&FilesRead, &cx, &both, json!({"path": "sub/new.bin"})).await;
        result.unwrap();
        let read: Vec<u8> = testutil::lines(&output)[1..]
            .iter()
            .flat_map(|l| b64::decode(l["base64"].as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(read, bytes);
    }

    #[tokio::test]
    async fn create_refuses_an_existing_file_and_replace_replaces_it() {
        let (dir, root, _outside, policy) = setup("files.write");
        let (cx, _reloads) = testutil::context(dir.path());
        let (result, _) = testutil::run(
            &FilesWrite,
            &cx,
            &policy,
            json!({"path": "a.txt", "text": "new"}),
        )
        .await;
        assert!(
            matches!(&result, Err(CapabilityError::BadArgs(m)) if m.contains("already exists") && m.contains("replace")),
            "{result:?}"
        );
        assert_eq!(std::fs::read(root.join("a.txt")).unwrap(), b"hello");

        let (result, _) = testutil::run(
            &FilesWrite,
            &cx,
            &policy,
            json!({"path": "a.txt", "text": "new", "mode": "replace"}),
        )
        .await;
        assert!(result.unwrap().starts_with("replaced"));
        assert_eq!(std::fs::read(root.join("a.txt")).unwrap(), b"new");
        assert!(leftover_temp_files(&root).is_empty());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_replaced_file_keeps_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, root, _outside, policy) = setup("files.write");
        std::fs::set_permissions(root.join("a.txt"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let (result, _) = testutil::run(
            &FilesWrite,
            &cx,
            &policy,
            json!({"path": "a.txt", "text": "new", "mode": "replace"}),
        )
        .await;
        result.unwrap();
        let mode = std::fs::metadata(root.join("a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn escapes_and_bad_arguments_are_refused() {
        let (dir, _root, outside, policy) = setup("files.write");
        let (cx, _reloads) = testutil::context(dir.path());
        for path in [
            "../outside/x.txt".to_owned(),
            outside.join("x.txt").display().to_string(),
        ] {
            let (result, _) = testutil::run(
                &FilesWrite,
                &cx,
                &policy,
                json!({"path": path, "text": "x"}),
            )
            .await;
            assert!(
                matches!(&result, Err(CapabilityError::Refused { rule, .. }) if rule == "allow.\"files.write\".roots"),
                "{path}: {result:?}"
            );
        }
        assert!(!outside.join("x.txt").exists());

        let cases = [
            (json!({"path": "n.txt"}), "missing"),
            (
                json!({"path": "n.txt", "text": "a", "base64": "YQ=="}),
                "not both",
            ),
            (json!({"path": "n.txt", "base64": "!!"}), "`base64`"),
            (
                json!({"path": "n.txt", "text": "a", "mode": "append"}),
                "`mode`",
            ),
            (
                json!({"path": "missing/n.txt", "text": "a"}),
                "does not exist",
            ),
            (
                json!({"path": "sub", "text": "a", "mode": "replace"}),
                "is a folder",
            ),
            (json!({"path": "", "text": "a"}), "file name"),
        ];
        for (args, expected) in cases {
            let (result, _) = testutil::run(&FilesWrite, &cx, &policy, args.clone()).await;
            assert!(
                matches!(&result, Err(CapabilityError::BadArgs(m)) if m.contains(expected)),
                "{args}: {result:?}"
            );
        }
        let too_big = "a".repeat(MAX_BYTES + 1);
        let (result, _) = testutil::run(
            &FilesWrite,
            &cx,
            &policy,
            json!({"path": "big.txt", "text": too_big}),
        )
        .await;
        assert!(matches!(&result, Err(CapabilityError::BadArgs(m)) if m.contains("at most")));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlink_targets_are_never_written_through() {
        let (dir, root, outside, policy) = setup("files.write");
        // A link inside the root to a file inside the root, a link out of the root, a
        // dangling link, and a folder link out of the root.
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("inside-link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("out-link")).unwrap();
        std::os::unix::fs::symlink(outside.join("nothing"), root.join("dangling")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out-dir")).unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        for path in ["inside-link", "out-link", "dangling", "out-dir/new.txt"] {
            for mode in ["create", "replace"] {
                let (result, _) = testutil::run(
                    &FilesWrite,
                    &cx,
                    &policy,
                    json!({"path": path, "text": "pwned", "mode": mode}),
                )
                .await;
                assert!(
                    matches!(&result, Err(CapabilityError::Refused { .. })),
                    "{path} {mode}: {result:?}"
                );
            }
        }
        assert_eq!(std::fs::read(root.join("a.txt")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read(outside.join("secret.txt")).unwrap(),
            b"secret"
        );
        assert!(!outside.join("nothing").exists());
        assert!(!outside.join("new.txt").exists());
        assert!(std::fs::symlink_metadata(root.join("inside-link"))
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
