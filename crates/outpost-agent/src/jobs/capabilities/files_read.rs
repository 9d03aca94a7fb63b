//! `files.read`: part or all of one file under the roots of the `files.read` grant, as
//! base64.
//!
//! Arguments: `path` (relative to the first root, or absolute under any root), `offset`
//! (default 0) and `length` (default and at most [`MAX_LENGTH`]). Output: a first line
//! `{path, size, offset, length}` (`length` being what will be sent), then lines
//! `{"offset": n, "base64": "…"}` of at most [`CHUNK_BYTES`] raw bytes each.

use std::io::SeekFrom;

use async_trait::async_trait;
use outpost_policy::Capability;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::files::{self, lstat};
use super::{b64, blocking, cut_note, Args};
use crate::jobs::capability::{CapabilityError, CapabilityHandler, JobContext, JobInput, Output};

/// The most bytes one job reads; read a larger file in several jobs with `offset`.
pub const MAX_LENGTH: u64 = 4 * 1024 * 1024;
/// Raw bytes per output line (64 KiB once in base64, one output chunk).
pub const CHUNK_BYTES: usize = 48 * 1024;

const CAPABILITY: Capability = Capability::FilesRead;

/// The `files.read` capability.
pub struct FilesRead;

#[async_trait]
impl CapabilityHandler for FilesRead {
    fn capability(&self) -> Capability {
        CAPABILITY
    }

    async fn run(
        &self,
        _cx: &JobContext,
        job: &JobInput<'_>,
        out: &mut Output,
    ) -> Result<String, CapabilityError> {
        let args = Args::new(job.args, &["path", "offset", "length"])?;
        let requested = args
            .required_str("path", "a file path under the roots of files.read")?
            .to_owned();
        let offset = args.u64_in("offset", 0..=u64::MAX, 0)?;
        let length = args.u64_in("length", 0..=MAX_LENGTH, MAX_LENGTH)?;
        let roots = files::roots(job.policy, CAPABILITY)?;

        let (path, file, size) = blocking(move || {
            let path = files::resolve(&roots, CAPABILITY, &requested)?;
            let before = match lstat(&path)? {
                None => {
                    return Err(CapabilityError::Failed(format!(
                        "no file at {}",
                        path.display()
                    )))
                }
                Some(metadata) if metadata.is_dir() => {
                    return Err(CapabilityError::BadArgs(format!(
                        "argument `path`: {} is a folder, not a file; use files.list",
                        path.display()
                    )))
                }
                // Checked before opening: opening a FIFO would block until a writer came.
                Some(metadata) if !metadata.is_file() && !metadata.file_type().is_symlink() => {
                    return Err(CapabilityError::BadArgs(format!(
                        "argument `path`: {} is not a regular file",
                        path.display()
                    )))
                }
                Some(metadata) => metadata,
            };
            let (file, metadata) = files::open_verified(&roots, CAPABILITY, &path, &before)?;
            if !metadata.is_file() {
                return Err(CapabilityError::BadArgs(format!(
                    "argument `path`: {} is not a regular file",
                    path.display()
                )));
            }
            Ok((path, file, metadata.len()))
        })
        .await?;

        let start = offset.min(size);
        let end = offset.saturating_add(length).min(size);
        let header = json!({
            "path": path.display().to_string(),
            "size": size,
            "offset": start,
            "length": end - start,
        });
        if out.write_json(&header).await.is_err() {
            return Ok(format!("read 0 of {size} bytes{}", cut_note(out)));
        }

        let mut file = tokio::fs::File::from_std(file);
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|err| files::io_failed("seeking in", &path, &err))?;
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut position = start;
        while position < end {
            if job.cancel.is_cancelled() {
                return Err(CapabilityError::Cancelled);
            }
            let want = usize::try_from(end - position)
                .unwrap_or(CHUNK_BYTES)
                .min(CHUNK_BYTES);
            let mut filled = 0usize;
            // Fill the whole chunk (reads may return less) so lines stay 48 KiB.
            while filled < want {
                let n = file
                    .read(&mut buffer[filled..want])
                    .await
                    .map_err(|err| files::io_failed("reading", &path, &err))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                // The file shrank while being read.
                break;
            }
            let line = json!({"offset": position, "base64": b64::encode(&buffer[..filled])});
            if out.write_json(&line).await.is_err() {
                break;
            }
            position += filled as u64;
        }
        Ok(format!(
            "read {} of {size} bytes{}",
            position - start,
            cut_note(out)
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::jobs::capabilities::files::tests::setup;
    use crate::jobs::capabilities::testutil;

    fn decode_all(output: &str) -> (serde_json::Value, Vec<u8>) {
        let lines = testutil::lines(output);
        let mut bytes = Vec::new();
        let header = lines[0].clone();
        let mut expected_offset = header["offset"].as_u64().unwrap();
        for line in &lines[1..] {
            assert_eq!(line["offset"].as_u64().unwrap(), expected_offset);
            let chunk = b64::decode(line["base64"].as_str().unwrap()).unwrap();
            assert!(chunk.len() <= CHUNK_BYTES);
            expected_offset += chunk.len() as u64;
            bytes.extend(chunk);
        }
        (header, bytes)
    }

    #[tokio::test]
    async fn reads_a_file_whole_and_in_part() {
        let (dir, root, _outside, policy) = setup("files.read");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.join("big.bin"), &big).unwrap();
        let (cx, _reloads) = testutil::context(dir.path());

        let (result, output) =
            testutil::run(&FilesRead, &cx, &policy, json!({"path": "big.bin"})).await;
        assert_eq!(result.unwrap(), "read 200000 of 200000 bytes");
        let (header, bytes) = decode_all(&output);
        assert_eq!(header["size"], 200_000);
        assert_eq!(bytes, big);

        let (result, output) = testutil::run(
            &FilesRead,
            &cx,
            &policy,
            json!({"path": "big.bin", "offset": 100_000, "length": 10}),
        )
        .await;
        assert_eq!(result.unwrap(), "read 10 of 200000 bytes");
        let (header, bytes) = decode_all(&output);
        assert_eq!(header["length"], 10);
        assert_eq!(bytes, &big[100_000..100_010]);

        let (result, output) = testutil::run(
            &FilesRead,
            &cx,
            &policy,
            json!({"path": "sub/b.txt", "offset": 1_000_000}),
        )
        .await;
        assert_eq!(result.unwrap(), "read 0 of 10 bytes");
        assert_eq!(decode_all(&output).1, b"");
    }

    #[tokio::test]
    async fn a_cut_output_says_so() {
        let (dir, root, _outside, policy) = setup("files.read");
        std::fs::write(root.join("big.bin"), vec![7u8; 300_000]).unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        let (result, _) = testutil::run_limited(
            &FilesRead,
            &cx,
            &policy,
            json!({"path": "big.bin"}),
            100_000,
        )
        .await;
        let summary = result.unwrap();
        assert!(summary.contains("output cut"), "{summary}");
    }

    #[tokio::test]
    async fn escapes_folders_and_bad_lengths_are_refused() {
        let (dir, _root, outside, policy) = setup("files.read");
        let (cx, _reloads) = testutil::context(dir.path());
        for path in [
            "../outside/secret.txt".to_owned(),
            outside.join("secret.txt").display().to_string(),
        ] {
            let (result, output) =
                testutil::run(&FilesRead, &cx, &policy, json!({"path": path})).await;
            assert!(
                matches!(&result, Err(CapabilityError::Refused { rule, .. }) if rule == "allow.\"files.read\".roots"),
                "{path}: {result:?}"
            );
            assert!(output.is_empty());
        }
        let (result, _) = testutil::run(&FilesRead, &cx, &policy, json!({"path": "sub"})).await;
        assert!(matches!(result, Err(CapabilityError::BadArgs(m)) if m.contains("folder")));
        let (result, _) = testutil::run(
            &FilesRead,
            &cx,
            &policy,
            json!({"path": "a.txt", "length": MAX_LENGTH + 1}),
        )
        .await;
        assert!(matches!(result, Err(CapabilityError::BadArgs(m)) if m.contains("`length`")));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_link_out_of_the_root_is_refused() {
        let (dir, root, outside, policy) = setup("files.read");
        std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("outdir")).unwrap();
        let (cx, _reloads) = testutil::context(dir.path());
        for path in ["link.txt", "outdir/secret.txt"] {
            let (result, output) =
                testutil::run(&FilesRead, &cx, &policy, json!({"path": path})).await;
            assert!(
                matches!(&result, Err(CapabilityError::Refused { .. })),
                "{path}: {result:?}"
            );
            assert!(!output.contains("c2VjcmV0"), "the secret leaked");
        }
    }
}
