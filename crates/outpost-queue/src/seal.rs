//! Payload sealing: XChaCha20-Poly1305 under a key kept in its own file, so the queue file
//! alone reveals no patient data.
//!
//! XChaCha's 192-bit nonces are drawn at random for every item; at that size random nonces
//! never collide in practice, so there is no counter to persist or get wrong after a crash.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use outpost_core::ItemId;
use rand::RngCore;
use sha2::Sha256;

use crate::QueueError;

/// Bytes in a key file.
pub const KEY_BYTES: usize = 32;
/// Bytes in a nonce.
pub const NONCE_BYTES: usize = 24;

/// The queue's keys: one seals payloads, one (derived) digests patient identifiers so they
/// can be looked up without being stored.
pub struct Keys {
    cipher: XChaCha20Poly1305,
    digest_key: [u8; 32],
}

impl Keys {
    /// Loads the key file, creating it (readable by the owner only) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, QueueError> {
        let key = match fs::File::open(path) {
            Ok(file) => read_key(path, file)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => create_key(path)?,
            Err(source) => return Err(key_error(path, source)),
        };
        Ok(Self::from_key(&key))
    }

    /// Loads an existing key file; never creates one (for inspection tools).
    pub fn load(path: &Path) -> Result<Self, QueueError> {
        let file = fs::File::open(path).map_err(|source| key_error(path, source))?;
        Ok(Self::from_key(&read_key(path, file)?))
    }

    fn from_key(key: &[u8; KEY_BYTES]) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"outpost queue subject digest v1");
        Self {
            cipher: XChaCha20Poly1305::new(key.into()),
            digest_key: mac.finalize().into_bytes().into(),
        }
    }

    /// Seals `plain` for item `id`; the id is bound in as associated data so a sealed
    /// payload moved to another row fails to open.
    pub fn seal(&self, id: ItemId, plain: &[u8]) -> (Vec<u8>, [u8; NONCE_BYTES]) {
        self.seal_bound(&id.0.to_le_bytes(), plain)
    }

    /// Opens a payload sealed by [`Keys::seal`].
    pub fn open(&self, id: ItemId, nonce: &[u8], sealed: &[u8]) -> Result<Vec<u8>, QueueError> {
        self.open_bound(&id.0.to_le_bytes(), nonce, sealed)
            .ok_or(QueueError::Unseal { id })
    }

    /// Seals `plain` bound to `context` (associated data): it opens only with the same
    /// context, so a sealed value moved elsewhere, or a clear column bound into the context
    /// and then altered, fails to open.
    pub(crate) fn seal_bound(&self, context: &[u8], plain: &[u8]) -> (Vec<u8>, [u8; NONCE_BYTES]) {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .unwrap_or_else(|_| {
                unreachable!("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers")
            });
        (sealed, nonce)
    }

    /// Opens a value sealed by [`Keys::seal_bound`] with the same context; `None` when it
    /// does not authenticate (wrong key, altered bytes or context, a bad nonce).
    pub(crate) fn open_bound(
        &self,
        context: &[u8],
        nonce: &[u8],
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        if nonce.len() != NONCE_BYTES {
            return None;
        }
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: context,
                },
            )
            .ok()
    }

    /// A keyed digest of a patient identifier: equal inputs give equal digests, and the
    /// digest says nothing about the input without the key.
    pub fn subject_digest(&self, subject: &[u8]) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.digest_key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(subject);
        mac.finalize().into_bytes().to_vec()
    }
}

fn key_error(path: &Path, source: std::io::Error) -> QueueError {
    QueueError::KeyFile {
        path: path.to_owned(),
        source,
    }
}

fn read_key(path: &Path, mut file: fs::File) -> Result<[u8; KEY_BYTES], QueueError> {
    let mut bytes = Vec::with_capacity(KEY_BYTES);
    Read::by_ref(&mut file)
        .take(KEY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| key_error(path, source))?;
    warn_if_readable_by_others(path, &file);
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| QueueError::KeyLength {
            path: path.to_owned(),
            found: bytes.len() as u64,
        })
}

fn create_key(path: &Path) -> Result<[u8; KEY_BYTES], QueueError> {
    let mut key = [0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut key);
    // Written to a temporary name and renamed, so a crash never leaves a short key file
    // that would make every sealed payload unreadable.
    let tmp: PathBuf = path.with_extension("key.tmp");
    let mut file = owner_only_file(&tmp).map_err(|source| key_error(&tmp, source))?;
    file.write_all(&key)
        .and_then(|()| file.sync_all())
        .map_err(|source| key_error(&tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| key_error(path, source))?;
    sync_parent_dir(path);
    tracing::info!(path = %path.display(), "created queue key file");
    Ok(key)
}

#[cfg(unix)]
fn owner_only_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

// On Windows the file inherits the ACL of the data directory, which the installer restricts
// to SYSTEM and Administrators.
#[cfg(not(unix))]
fn owner_only_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, file: &fs::File) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = file.metadata() {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "queue key file is readable by others; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path, _file: &fs::File) {}

/// Makes a rename durable: on Linux the directory entry lives in the parent's data.
#[cfg(unix)]
pub(crate) fn sync_parent_dir(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(dir) = fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(not(unix))]
pub(crate) fn sync_parent_dir(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_payload_opens_only_for_its_own_item() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load_or_create(&dir.path().join("queue.key")).unwrap();
        let (sealed, nonce) = keys.seal(ItemId(7), b"PID|1||12345");
        assert!(!sealed.windows(5).any(|w| w == b"12345"));
        assert_eq!(
            keys.open(ItemId(7), &nonce, &sealed).unwrap(),
            b"PID|1||12345"
        );
        assert!(matches!(
            keys.open(ItemId(8), &nonce, &sealed),
            Err(QueueError::Unseal { id: ItemId(8) })
        ));
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.key");
        let first = Keys::load_or_create(&path).unwrap();
        let (sealed, nonce) = first.seal(ItemId(1), b"x");
        let second = Keys::load_or_create(&path).unwrap();
        assert_eq!(second.open(ItemId(1), &nonce, &sealed).unwrap(), b"x");
        assert_eq!(fs::metadata(&path).unwrap().len(), KEY_BYTES as u64);
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.key");
        Keys::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_short_key_file_is_refused_with_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.key");
        fs::write(&path, b"short").unwrap();
        let err = Keys::load_or_create(&path).err().unwrap();
        assert!(
            err.to_string()
                .contains("expected exactly 32 bytes, found 5"),
            "{err}"
        );
    }
}
