//! Large payloads (DICOM instances) as encrypted files beside the queue: the queue item
//! holds only a small sealed record naming the blob and its key, so the queue database
//! stays small however big the instances are, and the blob is unreadable without that
//! record (which is itself sealed under the queue key).
//!
//! Each blob has its own random key. Its content is cut into chunks of [`CHUNK_BYTES`],
//! each sealed under a nonce made of the chunk's index and a flag on the last chunk (the
//! STREAM construction), so chunks cannot be reordered, dropped or the file cut short
//! without the reader noticing. Memory stays at two holds of [`HOLD_CHUNKS`] chunks whatever
//! the blob's size.
//!
//! Blobs are written with AES-256-GCM (ring's, which uses the CPU's AES instructions: about
//! six times XChaCha20-Poly1305's rate here, and sealing was a fifth of intake's CPU). The
//! key is random per blob, so index-and-flag nonces never repeat under one key. Blobs of
//! the first format (`OPBLOB1`, XChaCha20-Poly1305 with a random nonce prefix) still read.
//!
//! A blob is made under its own name in `blobs/` and written straight to the disk, not
//! through the page cache (see `blob_file`); then the file and the folder are synced. A
//! blob is durable only once those syncs have returned, and only then may anyone be told
//! it is stored. Nothing names a blob before its queue record commits, which happens only
//! after every byte is written, so a reader never meets one still being written; one left
//! half-written by a crash is named by nothing and is swept (see the agent's orphan
//! sweep). The record commits while the blob syncs, so a crash in between can leave a
//! record naming a blob cut short: that instance was never acknowledged, and its reader
//! reports the blob damaged rather than reading short data. Earlier versions wrote blobs under `blobs/tmp/` and renamed them; leftovers
//! there are swept too.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::blob_file::{AlignedBuf, AlignedBuffers, BlobFile, FolderSync, ALIGN};

use tokio::io::AsyncReadExt;

/// Plaintext bytes per sealed chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// XChaCha20-Poly1305; the header holds the nonce prefix.
const MAGIC_V1: &[u8; 8] = b"OPBLOB1\0";
/// AES-256-GCM; the header is the magic alone.
const MAGIC_V2: &[u8; 8] = b"OPBLOB2\0";
const PREFIX_BYTES: usize = 19;
const TAG_BYTES: usize = 16;

/// What can go wrong with a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a blob, was cut short, or was changed.
    #[error("{path}: {problem}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A blob name that is not one this store makes.
    #[error("{0:?} is not a blob name")]
    BadName(String),
}

/// How to find and open a blob: kept (sealed) in the queue item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// The file name under `blobs/`.
    pub name: String,
    /// Its key.
    pub key: [u8; 32],
    /// Plaintext length.
    pub len: u64,
}

/// The blob folder of a data directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    buffers: AlignedBuffers,
    folder: std::sync::Arc<FolderSync>,
}

/// Full chunks gathered before they are handed to a sealing job (1 MiB). A blob up to
/// this size (a CT or MR slice) is sealed, written and synced in one job when it is
/// finished: measured here, that beat a job per chunk, whose overlap with receiving was
/// worth less than the extra trips between threads. A larger blob streams, one job per
/// this many chunks while the next ones arrive, so a blob in progress holds at most two
/// holds in memory.
const HOLD_CHUNKS: usize = 4;

impl BlobStore {
    /// The store under `data_dir/blobs`, created if needed.
    pub fn open(data_dir: &Path) -> Result<BlobStore, BlobError> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(BlobStore {
            folder: std::sync::Arc::new(FolderSync::new(&dir)),
            dir,
            buffers: AlignedBuffers::default(),
        })
    }

    /// Starts a new blob. Its file is made by the first sealing job: a small blob then
    /// costs one trip to a blocking thread in all (create, seal, write, sync).
    pub async fn create(&self) -> Result<BlobWriter, BlobError> {
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let name = format!("{}.blob", hex::encode(id));
        let path = self.dir.join(&name);
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let cipher =
            ChunkCipher::aes(&key).map_err(|()| damaged(&path, "AES-256-GCM unavailable"))?;
        Ok(BlobWriter {
            name,
            path,
            sealer: Some(Sealer { file: None, cipher }),
            sealing: None,
            key,
            hold: Hold::new(&self.buffers, 0),
            buffers: self.buffers.clone(),
            folder: self.folder.clone(),
            index: 0,
            offset: 0,
            len: 0,
        })
    }

    /// The path of a blob by name.
    pub fn path(&self, name: &str) -> Result<PathBuf, BlobError> {
        let valid = name.len() == 37
            && name.ends_with(".blob")
            && name[..32].chars().all(|c| c.is_ascii_hexdigit());
        if !valid {
            return Err(BlobError::BadName(name.chars().take(64).collect()));
        }
        Ok(self.dir.join(name))
    }

    /// Opens a blob for reading.
    pub async fn open_reader(&self, blob: &BlobRef) -> Result<BlobReader, BlobError> {
        let path = self.path(&blob.name)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| BlobError::Io {
                path: path.clone(),
                source,
            })?;
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic)
            .await
            .map_err(|_| damaged(&path, "shorter than a blob header"))?;
        let cipher = match &magic {
            MAGIC_V2 => ChunkCipher::aes(&blob.key)
                .map_err(|()| damaged(&path, "AES-256-GCM unavailable"))?,
            MAGIC_V1 => {
                let mut prefix = [0u8; PREFIX_BYTES];
                file.read_exact(&mut prefix)
                    .await
                    .map_err(|_| damaged(&path, "shorter than a blob header"))?;
                ChunkCipher::XChaCha {
                    cipher: XChaCha20Poly1305::new(&blob.key.into()),
                    prefix,
                }
            }
            _ => return Err(damaged(&path, "not an Outpost blob")),
        };
        Ok(BlobReader {
            path,
            file: tokio::io::BufReader::with_capacity(CHUNK_BYTES + 64, file),
            cipher,
            index: 0,
            finished: false,
        })
    }

    /// Deletes a blob (after its item was purged); a missing one is not an error.
    pub async fn remove(&self, name: &str) -> Result<(), BlobError> {
        let path = self.path(name)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BlobError::Io { path, source }),
        }
    }

    /// Names of the blobs, finished or still being written (a caller deciding which are
    /// orphans must spare young ones). Also removes what earlier versions left unfinished
    /// under `blobs/tmp/` once older than `stale` (never acknowledged to anyone).
    pub async fn list(&self, stale: std::time::Duration) -> Result<Vec<String>, BlobError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Io { path, source }
        };
        let tmp = self.dir.join("tmp");
        let mut entries = match tokio::fs::read_dir(&tmp).await {
            Ok(entries) => Some(entries),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => return Err(io(&tmp)(err)),
        };
        while let Some(entry) = match entries.as_mut() {
            Some(entries) => entries.next_entry().await.map_err(io(&tmp))?,
            None => None,
        } {
            let old = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > stale);
            if old {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
        let mut names = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(io(&self.dir))?;
        while let Some(entry) = entries.next_entry().await.map_err(io(&self.dir))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.path(&name).is_ok() {
                names.push(name);
            }
        }
        Ok(names)
    }
}

/// A blob being written.
///
/// Chunks are gathered in an aligned buffer laid out exactly as they will lie in the file
/// (length, ciphertext, tag), so they are sealed in place and written straight from it.
/// When [`HOLD_CHUNKS`] are full they go to a blocking job that seals and writes them while
/// the next ones arrive; a blob that never gathers that many is written whole by `finish`.
pub struct BlobWriter {
    name: String,
    path: PathBuf,
    /// The file (once made) and cipher; `None` while a sealing job holds them, or after a
    /// failure.
    sealer: Option<Sealer>,
    sealing: Option<tokio::task::JoinHandle<SealOutcome>>,
    key: [u8; 32],
    /// The chunks gathered for the next sealing job.
    hold: Hold,
    buffers: AlignedBuffers,
    folder: std::sync::Arc<FolderSync>,
    /// The index of the first chunk in `hold`.
    index: u32,
    /// Bytes of the file before `hold`'s.
    offset: u64,
    len: u64,
}

/// Chunks laid out as in the file: `lead` bytes of room (see [`BlobFile::write`]), the
/// header if the blob starts here, then for each chunk its length, its text and room for
/// its tag. The last chunk's tag room is added when it is sealed.
struct Hold {
    buf: AlignedBuf,
    lead: usize,
    /// Whether the blob starts in this hold (and so its header comes first).
    header: bool,
    /// Where the text of the chunk being filled starts.
    text_start: usize,
    /// Chunks in the hold, counting the one being filled.
    chunks: usize,
}

/// Bytes a hold needs at most: room for the lead, the header, its chunks sealed.
const HOLD_BYTES: usize =
    ALIGN + MAGIC_V2.len() + HOLD_CHUNKS * (CHUNK_HEADER + CHUNK_BYTES + TAG_BYTES);

impl Hold {
    fn new(buffers: &AlignedBuffers, offset: u64) -> Hold {
        let lead = BlobFile::lead_for(offset);
        let mut buf = buffers.take(HOLD_BYTES);
        buf.push_zeros(lead);
        let header = offset == 0;
        if header {
            buf.push(MAGIC_V2);
        }
        buf.push_zeros(CHUNK_HEADER);
        let text_start = buf.len();
        Hold {
            buf,
            lead,
            header,
            text_start,
            chunks: 1,
        }
    }

    /// A stand-in for a hold moved out of a writer that is finishing.
    fn empty() -> Hold {
        Hold {
            buf: AlignedBuf::empty(),
            lead: 0,
            header: false,
            text_start: 0,
            chunks: 0,
        }
    }

    /// Text bytes in the chunk being filled.
    fn text_len(&self) -> usize {
        self.buf.len() - self.text_start
    }

    /// Closes the full chunk being filled and starts the next one.
    fn next_chunk(&mut self) {
        self.buf.push_zeros(TAG_BYTES + CHUNK_HEADER);
        self.text_start = self.buf.len();
        self.chunks += 1;
    }

    /// Bytes this hold adds to the file once sealed.
    fn sealed_len(&self) -> u64 {
        (self.buf.len() - self.lead + TAG_BYTES) as u64
    }
}

/// What a sealing job owns.
struct Sealer {
    /// `None` until the first job makes it.
    file: Option<BlobFile>,
    cipher: ChunkCipher,
}

/// A sealing job's result: the sealer and the hold's buffer back, or what failed.
type SealOutcome = Result<(Sealer, AlignedBuf), BlobError>;

/// Bytes in front of each sealed chunk: its length.
const CHUNK_HEADER: usize = 4;

/// A blob's chunk cipher, by format.
enum ChunkCipher {
    /// `OPBLOB1`: XChaCha20-Poly1305, nonce = random prefix, index, last flag.
    XChaCha {
        cipher: XChaCha20Poly1305,
        prefix: [u8; PREFIX_BYTES],
    },
    /// `OPBLOB2`: AES-256-GCM, nonce = index, last flag, zeros (the key is the blob's own).
    Aes(Box<ring::aead::LessSafeKey>),
}

impl ChunkCipher {
    fn aes(key: &[u8; 32]) -> Result<ChunkCipher, ()> {
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key).map_err(|_| ())?;
        Ok(ChunkCipher::Aes(Box::new(ring::aead::LessSafeKey::new(
            key,
        ))))
    }

    /// Seals `plain` in place; returns the tag.
    fn seal(&self, index: u32, last: bool, plain: &mut [u8]) -> Result<[u8; TAG_BYTES], ()> {
        let mut tag = [0u8; TAG_BYTES];
        match self {
            ChunkCipher::XChaCha { cipher, prefix } => {
                let sealed = cipher
                    .encrypt_in_place_detached(&xnonce(prefix, index, last), b"", plain)
                    .map_err(|_| ())?;
                tag.copy_from_slice(sealed.as_slice());
            }
            ChunkCipher::Aes(key) => {
                let sealed = key
                    .seal_in_place_separate_tag(
                        aes_nonce(index, last),
                        ring::aead::Aad::empty(),
                        plain,
                    )
                    .map_err(|_| ())?;
                tag.copy_from_slice(sealed.as_ref());
            }
        }
        Ok(tag)
    }

    /// Opens `sealed` (ciphertext, then tag) in place, leaving the plaintext.
    fn open(&self, index: u32, last: bool, sealed: &mut Vec<u8>) -> Result<(), ()> {
        let text_len = sealed.len().checked_sub(TAG_BYTES).ok_or(())?;
        match self {
            ChunkCipher::XChaCha { cipher, prefix } => {
                let (text, tag) = sealed.split_at_mut(text_len);
                cipher
                    .decrypt_in_place_detached(
                        &xnonce(prefix, index, last),
                        b"",
                        text,
                        chacha20poly1305::Tag::from_slice(tag),
                    )
                    .map_err(|_| ())?;
            }
            ChunkCipher::Aes(key) => {
                key.open_in_place(aes_nonce(index, last), ring::aead::Aad::empty(), sealed)
                    .map_err(|_| ())?;
            }
        }
        sealed.truncate(text_len);
        Ok(())
    }
}

impl BlobWriter {
    /// The file name the blob will have under `blobs/` once finished.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The blob's key.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Appends plaintext.
    pub async fn write(&mut self, mut bytes: &[u8]) -> Result<(), BlobError> {
        while !bytes.is_empty() {
            let take = (CHUNK_BYTES - self.hold.text_len()).min(bytes.len());
            self.hold.buf.push(&bytes[..take]);
            self.len += take as u64;
            bytes = &bytes[take..];
            if self.hold.text_len() == CHUNK_BYTES {
                if self.hold.chunks == HOLD_CHUNKS {
                    self.seal_held().await?;
                } else {
                    self.hold.next_chunk();
                }
            }
        }
        Ok(())
    }

    /// Plaintext bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Seals and writes the last chunk and syncs the file and its folder. Returns what the
    /// queue item must keep to read it back.
    pub async fn finish(self) -> Result<BlobRef, BlobError> {
        self.finish_alongside(std::future::ready(())).await.0
    }

    /// Seals and writes the last chunk, so readers can open the whole blob; then runs
    /// `alongside` (typically committing the record that names the blob) while the file and
    /// its folder are synced, so the two waits for the disk overlap.
    ///
    /// Returns the blob's outcome and `alongside`'s output, which is `None` if the blob
    /// failed before `alongside` started. The blob is durable only when the first is `Ok`:
    /// a caller that committed a record alongside a failed blob must withdraw that record,
    /// and must not tell anyone the blob is stored.
    pub async fn finish_alongside<T>(
        mut self,
        alongside: impl std::future::Future<Output = T>,
    ) -> (Result<BlobRef, BlobError>, Option<T>) {
        let path = self.path.clone();
        let sealer = match self.settle().await {
            Ok(sealer) => sealer,
            Err(err) => {
                self.abort().await;
                return (Err(err), None);
            }
        };
        let hold = std::mem::replace(&mut self.hold, Hold::empty());
        let index = self.index;
        let target = path.clone();
        let (made_tx, made) = tokio::sync::oneshot::channel();
        let (written_tx, written) = tokio::sync::oneshot::channel();
        // One job seals and writes what is left and syncs the file. The folder is synced
        // (for the blob's new name) as soon as the file exists, beside the writing; once
        // every byte is written `alongside` runs too, so the waits for the disk overlap.
        let job = tokio::task::spawn_blocking(move || {
            let (sealer, buf) = seal_and_write(sealer, hold, index, true, &target, Some(made_tx))?;
            let file = sealer
                .file
                .ok_or_else(|| damaged(&target, "the sealing job made no file"))?;
            let _ = written_tx.send(());
            file.sync().map_err(|source| BlobError::Io {
                path: target.clone(),
                source,
            })?;
            Ok(buf)
        });
        let (folder, dir) = (self.folder.clone(), self.path.clone());
        let folder_synced = tokio::spawn(async move {
            made.await
                .map_err(|_| damaged(&dir, "the sealing job made no file"))?;
            folder.sync().await.map_err(|source| BlobError::Io {
                path: dir.parent().map(Path::to_path_buf).unwrap_or_default(),
                source,
            })
        });
        if written.await.is_err() {
            let failed = joined(job.await, &path).err().unwrap_or_else(|| {
                damaged(&path, "the sealing job ended without writing the blob")
            });
            let _ = tokio::fs::remove_file(&path).await;
            return (Err(failed), None);
        }
        let (done, output, folder_done) = tokio::join!(job, alongside, folder_synced);
        let blob = joined(done, &path)
            .and_then(|buf| joined(folder_done, &path).map(|()| buf))
            .map(|buf| {
                self.buffers.give_back(buf);
                BlobRef {
                    name: self.name,
                    key: self.key,
                    len: self.len,
                }
            });
        (blob, Some(output))
    }

    /// Throws the blob away.
    pub async fn abort(mut self) {
        let _ = self.settle().await;
        self.sealer = None;
        self.buffers
            .give_back(std::mem::replace(&mut self.hold, Hold::empty()).buf);
        let _ = tokio::fs::remove_file(&self.path).await;
    }

    /// Waits for the sealing job in flight, if any, and takes back the sealer.
    async fn settle(&mut self) -> Result<Sealer, BlobError> {
        if let Some(job) = self.sealing.take() {
            let (sealer, buf) = joined(job.await, &self.path)?;
            self.buffers.give_back(buf);
            return Ok(sealer);
        }
        self.sealer
            .take()
            .ok_or_else(|| damaged(&self.path, "an earlier write to this blob failed"))
    }

    /// Hands the full hold to a blocking job that seals and writes it, and starts the
    /// next. Waits only for the previous job.
    async fn seal_held(&mut self) -> Result<(), BlobError> {
        let sealer = self.settle().await?;
        let index = self.index;
        self.index = u32::try_from(self.hold.chunks)
            .ok()
            .and_then(|n| self.index.checked_add(n))
            .ok_or_else(|| damaged(&self.path, "blob too large"))?;
        self.offset += self.hold.sealed_len();
        let next = Hold::new(&self.buffers, self.offset);
        let hold = std::mem::replace(&mut self.hold, next);
        let path = self.path.clone();
        self.sealing = Some(tokio::task::spawn_blocking(move || {
            seal_and_write(sealer, hold, index, false, &path, None)
        }));
        Ok(())
    }
}

/// Seals the chunks of `hold` in place (the first has index `index`, and the final one is
/// the blob's last when `ends_blob`) and writes them, making the file first if the blob
/// starts here (and telling `made` once it exists). Returns the sealer and the hold's
/// buffer.
fn seal_and_write(
    mut sealer: Sealer,
    mut hold: Hold,
    index: u32,
    ends_blob: bool,
    path: &Path,
    made: Option<tokio::sync::oneshot::Sender<()>>,
) -> SealOutcome {
    let io = |source| BlobError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = match sealer.file.take() {
        Some(file) => file,
        None => BlobFile::create(path).map_err(io)?,
    };
    if let Some(made) = made {
        let _ = made.send(());
    }
    hold.buf.push_zeros(TAG_BYTES);
    let bytes = hold.buf.filled_mut();
    let mut at = hold.lead + if hold.header { MAGIC_V2.len() } else { 0 };
    for offset in 0..hold.chunks {
        let final_chunk = offset + 1 == hold.chunks;
        let text_len = if final_chunk {
            bytes.len() - at - CHUNK_HEADER - TAG_BYTES
        } else {
            CHUNK_BYTES
        };
        let text = at + CHUNK_HEADER..at + CHUNK_HEADER + text_len;
        let chunk_index = index.wrapping_add(offset as u32);
        let tag = sealer
            .cipher
            .seal(
                chunk_index,
                ends_blob && final_chunk,
                &mut bytes[text.clone()],
            )
            .map_err(|()| damaged(path, "sealing failed"))?;
        let sealed_len = (text_len + TAG_BYTES) as u32;
        bytes[at..at + CHUNK_HEADER].copy_from_slice(&sealed_len.to_be_bytes());
        bytes[text.end..text.end + TAG_BYTES].copy_from_slice(&tag);
        at = text.end + TAG_BYTES;
    }
    file.write(&mut hold.buf, hold.lead, ends_blob)
        .map_err(io)?;
    sealer.file = Some(file);
    Ok((sealer, hold.buf))
}

/// The result of a blocking job, with a panicked or cancelled job as an I/O error.
fn joined<T>(
    result: Result<Result<T, BlobError>, tokio::task::JoinError>,
    path: &Path,
) -> Result<T, BlobError> {
    match result {
        Ok(inner) => inner,
        Err(join) => Err(BlobError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

/// A blob being read, chunk by chunk.
pub struct BlobReader {
    path: PathBuf,
    file: tokio::io::BufReader<tokio::fs::File>,
    cipher: ChunkCipher,
    index: u32,
    finished: bool,
}

impl BlobReader {
    /// The next chunk of plaintext, or `None` after the last one. A file cut short,
    /// reordered or edited is an error, never silently short data.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, BlobError> {
        if self.finished {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.file
            .read_exact(&mut len)
            .await
            .map_err(|_| damaged(&self.path, "cut short: the last chunk is missing"))?;
        let len = u32::from_be_bytes(len) as usize;
        if !(TAG_BYTES..=CHUNK_BYTES + TAG_BYTES).contains(&len) {
            return Err(damaged(&self.path, "a chunk has an impossible length"));
        }
        let mut sealed = vec![0u8; len];
        self.file
            .read_exact(&mut sealed)
            .await
            .map_err(|_| damaged(&self.path, "cut short inside a chunk"))?;
        let index = self.index;
        // Only the last chunk is ever short (a blob whose length is a multiple of the
        // chunk size ends with an empty one), so the length says which it claims to be; a
        // chunk opens only as what it was sealed as, so a claim that is not true (a chunk
        // changed, moved, from another blob, or a file cut short) fails here.
        let last = len < CHUNK_BYTES + TAG_BYTES;
        self.cipher
            .open(index, last, &mut sealed)
            .map_err(|()| damaged(&self.path, "a chunk does not open: changed or out of order"))?;
        if last {
            self.finished = true;
            let mut rest = [0u8; 1];
            if self.file.read(&mut rest).await.unwrap_or(0) != 0 {
                return Err(damaged(&self.path, "bytes after the last chunk"));
            }
        }
        let plain = sealed;
        self.index = index.wrapping_add(1);
        Ok(Some(plain))
    }

    /// The whole blob as an `AsyncRead` (for sending it somewhere).
    pub fn into_async_read(self) -> impl tokio::io::AsyncRead + Send + Unpin {
        let chunks = futures_lite_unfold(self);
        tokio_util::io::StreamReader::new(chunks)
    }
}

fn futures_lite_unfold(
    reader: BlobReader,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send>> {
    Box::pin(futures::stream::unfold(reader, |mut reader| async move {
        match reader.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(bytes::Bytes::from(chunk)), reader)),
            Ok(None) => None,
            Err(err) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    err.to_string(),
                )),
                reader,
            )),
        }
    }))
}

fn aes_nonce(index: u32, last: bool) -> ring::aead::Nonce {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&index.to_be_bytes());
    nonce[4] = u8::from(last);
    ring::aead::Nonce::assume_unique_for_key(nonce)
}

fn xnonce(prefix: &[u8; PREFIX_BYTES], index: u32, last: bool) -> XNonce {
    let mut nonce = [0u8; 24];
    nonce[..PREFIX_BYTES].copy_from_slice(prefix);
    nonce[PREFIX_BYTES..PREFIX_BYTES + 4].copy_from_slice(&index.to_be_bytes());
    nonce[23] = u8::from(last);
    nonce.into()
}

fn damaged(path: &Path, problem: &str) -> BlobError {
    BlobError::Damaged {
        path: path.to_owned(),
        problem: problem.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn write_blob(store: &BlobStore, data: &[u8], piece: usize) -> BlobRef {
        let mut writer = store.create().await.unwrap();
        for part in data.chunks(piece.max(1)) {
            writer.write(part).await.unwrap();
        }
        writer.finish().await.unwrap()
    }

    async fn read_all(store: &BlobStore, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
        let mut reader = store.open_reader(blob).await?;
        let mut all = Vec::new();
        while let Some(chunk) = reader.next_chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn blobs_of_any_size_round_trip_and_are_not_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for size in [
            0,
            1,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            3 * CHUNK_BYTES + 17,
            HOLD_CHUNKS * CHUNK_BYTES,
            // Streams: several sealing jobs, each while the next chunks arrive.
            3 * HOLD_CHUNKS * CHUNK_BYTES + 5,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let blob = write_blob(&store, &data, 7_001).await;
            assert_eq!(blob.len, size as u64);
            assert_eq!(read_all(&store, &blob).await.unwrap(), data, "size {size}");
            let on_disk = std::fs::read(store.path(&blob.name).unwrap()).unwrap();
            if size > 64 {
                assert!(
                    !on_disk.windows(64).any(|w| w == &data[..64]),
                    "plaintext on disk"
                );
            }
        }
        let mut async_read = store
            .open_reader(&write_blob(&store, b"hello blob", 3).await)
            .await
            .unwrap()
            .into_async_read();
        let mut text = String::new();
        async_read.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "hello blob");
    }

    #[tokio::test]
    async fn a_cut_edited_or_wrongly_keyed_blob_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = vec![7u8; 2 * CHUNK_BYTES + 5];
        let blob = write_blob(&store, &data, 65_536).await;
        let path = store.path(&blob.name).unwrap();
        let original = std::fs::read(&path).unwrap();

        // Cut at a chunk boundary: the last chunk is missing.
        let boundary = MAGIC_V2.len() + 2 * (4 + CHUNK_BYTES + TAG_BYTES);
        std::fs::write(&path, &original[..boundary]).unwrap();
        assert!(read_all(&store, &blob).await.is_err());
        // One byte changed.
        let mut edited = original.clone();
        edited[100] ^= 1;
        std::fs::write(&path, &edited).unwrap();
        assert!(read_all(&store, &blob).await.is_err());
        // The wrong key.
        std::fs::write(&path, &original).unwrap();
        let wrong = BlobRef {
            key: [9; 32],
            ..blob.clone()
        };
        assert!(read_all(&store, &wrong).await.is_err());
        assert_eq!(read_all(&store, &blob).await.unwrap(), data);
        assert!(matches!(
            store.path("../x.blob"),
            Err(BlobError::BadName(_))
        ));
    }

    /// A blob as the first format wrote it: XChaCha20-Poly1305 with a nonce prefix.
    fn write_first_format(store: &BlobStore, name: &str, key: [u8; 32], data: &[u8]) {
        let prefix = [5u8; PREFIX_BYTES];
        let cipher = ChunkCipher::XChaCha {
            cipher: XChaCha20Poly1305::new(&key.into()),
            prefix,
        };
        let mut file = MAGIC_V1.to_vec();
        file.extend_from_slice(&prefix);
        let chunks: Vec<&[u8]> = data.chunks(CHUNK_BYTES).collect();
        let mut pieces: Vec<(&[u8], bool)> = chunks.iter().map(|c| (*c, false)).collect();
        // The writer always ends with a short (possibly empty) last chunk.
        if data.len().is_multiple_of(CHUNK_BYTES) {
            pieces.push((&[], true));
        } else if let Some(last) = pieces.last_mut() {
            last.1 = true;
        }
        for (index, (piece, last)) in pieces.into_iter().enumerate() {
            let mut text = piece.to_vec();
            let tag = cipher.seal(index as u32, last, &mut text).unwrap();
            file.extend_from_slice(&((text.len() + TAG_BYTES) as u32).to_be_bytes());
            file.extend_from_slice(&text);
            file.extend_from_slice(&tag);
        }
        std::fs::write(store.path(name).unwrap(), file).unwrap();
    }

    #[tokio::test]
    async fn blobs_of_the_first_format_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for (n, size) in [0, 10, CHUNK_BYTES, 2 * CHUNK_BYTES + 3]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
            let name = format!("{n:032x}.blob");
            write_first_format(&store, &name, [3; 32], &data);
            let blob = BlobRef {
                name,
                key: [3; 32],
                len: size as u64,
            };
            assert_eq!(read_all(&store, &blob).await.unwrap(), data, "size {size}");
            let wrong = BlobRef {
                key: [4; 32],
                ..blob
            };
            assert!(read_all(&store, &wrong).await.is_err());
        }
    }

    #[tokio::test]
    async fn aborted_blobs_leave_nothing_and_stale_ones_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut writer = store.create().await.unwrap();
        writer
            .write(&vec![1u8; HOLD_CHUNKS * CHUNK_BYTES + 1])
            .await
            .unwrap();
        writer.abort().await;
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs")).unwrap().count(),
            0
        );

        // One still being written is listed: the orphan sweep spares it by its age.
        // Two holds' worth: the second waits for the first job, which made the file.
        let mut left = store.create().await.unwrap();
        left.write(&vec![2u8; 2 * HOLD_CHUNKS * CHUNK_BYTES])
            .await
            .unwrap();
        // What an earlier version left unfinished under tmp/ is removed once stale.
        std::fs::create_dir(dir.path().join("blobs/tmp")).unwrap();
        std::fs::write(dir.path().join("blobs/tmp/old.blob"), b"partial").unwrap();
        assert_eq!(
            store.list(std::time::Duration::ZERO).await.unwrap(),
            vec![left.name().to_owned()]
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0
        );
        left.abort().await;
    }
}
