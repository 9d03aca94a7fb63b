//! Writing a blob's bytes to disk without the page cache where the OS allows it.
//!
//! A blob is written once, synced, and read back later (often much later, by a sink), so
//! caching it buys nothing. Measured on the test VM for a 0.5 MB instance: a buffered
//! write then `fdatasync` took about 1.8 ms, the same bytes written with `O_DIRECT` then
//! `fdatasync` about 0.6 ms, because the kernel neither allocates and fills page-cache
//! pages nor writes them back later. Intake answers each instance only after that sync, so
//! this is most of the time a modality waits per instance.
//!
//! Direct writes need the buffer address, the file offset and the length aligned to the
//! device's block size. The caller lays its bytes out in an [`AlignedBuf`] exactly as they
//! will lie in the file, after `lead` bytes of room at the front: the part of the file's
//! last block that the previous write could not finish. [`BlobFile::write`] fills that room
//! from what it kept, writes every whole block, and keeps the rest for next time; the
//! final partial block goes through an ordinary handle, so the file is exactly as long as
//! its content and readers need not know how it was written. Where direct writes are not
//! available (another OS, or a file system such as tmpfs that refuses them) the same calls
//! write through the page cache.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Alignment that satisfies every common logical block size (512 and 4096).
pub(crate) const ALIGN: usize = 4096;

/// A buffer whose usable part starts on an [`ALIGN`] boundary. It never grows, so the
/// boundary never moves.
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    capacity: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(capacity: usize) -> AlignedBuf {
        let capacity = capacity.next_multiple_of(ALIGN);
        let raw = vec![0u8; capacity + ALIGN];
        let address = raw.as_ptr() as usize;
        let start = (ALIGN - address % ALIGN) % ALIGN;
        AlignedBuf {
            raw,
            start,
            capacity,
            len: 0,
        }
    }

    /// A buffer of no bytes, which allocates nothing: a stand-in for one moved out.
    pub(crate) fn empty() -> AlignedBuf {
        AlignedBuf {
            raw: Vec::new(),
            start: 0,
            capacity: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The filled part.
    pub(crate) fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    fn filled(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// Appends `bytes`; the caller keeps within the capacity it asked for.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let at = self.start + self.len;
        self.raw[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Appends `count` zero bytes, as room to fill in later.
    pub(crate) fn push_zeros(&mut self, count: usize) {
        let at = self.start + self.len;
        self.raw[at..at + count].fill(0);
        self.len += count;
    }
}

/// Aligned buffers kept for reuse: each is over a MiB, and a fresh one per blob would be
/// mapped and zeroed by the kernel page by page.
#[derive(Clone, Default)]
pub(crate) struct AlignedBuffers(Arc<Mutex<Vec<AlignedBuf>>>);

impl std::fmt::Debug for AlignedBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AlignedBuffers")
    }
}

/// Buffers kept at most.
const KEPT_BUFFERS: usize = 8;

impl AlignedBuffers {
    /// An empty buffer of at least `capacity` bytes.
    pub(crate) fn take(&self, capacity: usize) -> AlignedBuf {
        let kept = self.0.lock().ok().and_then(|mut kept| kept.pop());
        match kept {
            Some(mut buf) if buf.capacity >= capacity => {
                buf.len = 0;
                buf
            }
            _ => AlignedBuf::new(capacity),
        }
    }

    pub(crate) fn give_back(&self, buf: AlignedBuf) {
        if buf.capacity == 0 {
            return;
        }
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < KEPT_BUFFERS {
                kept.push(buf);
            }
        }
    }
}

/// A new file being written front to back, directly to the disk where possible.
pub(crate) struct BlobFile {
    file: File,
    path: PathBuf,
    /// Whether `file` bypasses the page cache (and so takes only whole blocks).
    direct: bool,
    /// Bytes past the last whole block written: the start of the next block.
    kept: Vec<u8>,
    /// Bytes in the file, or about to be once `kept` is written.
    offset: u64,
}

impl BlobFile {
    /// Creates `path`, which must not exist.
    pub(crate) fn create(path: &Path) -> std::io::Result<BlobFile> {
        let (file, direct) = match open_direct(path)? {
            Some(file) => (file, true),
            // A refused direct open may already have made the file (the check comes after
            // the create), so this open may find it; the name is random and new.
            None => (
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)?,
                false,
            ),
        };
        Ok(BlobFile {
            file,
            path: path.to_owned(),
            direct,
            kept: Vec::with_capacity(ALIGN),
            offset: 0,
        })
    }

    /// The room a buffer for the next write must leave at its front: where the next byte
    /// falls within its block.
    pub(crate) fn lead_for(offset: u64) -> usize {
        (offset % ALIGN as u64) as usize
    }

    /// Appends what `buf` holds after its first `lead` bytes, which must be
    /// [`BlobFile::lead_for`] the file's length so far. With `last`, everything is written;
    /// otherwise a partial last block may be kept for the next call.
    pub(crate) fn write(
        &mut self,
        buf: &mut AlignedBuf,
        lead: usize,
        last: bool,
    ) -> std::io::Result<()> {
        if lead != Self::lead_for(self.offset) || lead > buf.len() {
            return Err(std::io::Error::other(
                "blob buffer laid out for another place in the file",
            ));
        }
        self.offset += (buf.len() - lead) as u64;
        if !self.direct {
            // Bytes kept before a fall back to the page cache go first.
            let kept = std::mem::take(&mut self.kept);
            self.write_through(&kept)?;
            return self.write_through(&buf.filled()[lead..]);
        }
        // The kept bytes are the first `lead` bytes of this block; with them the buffer
        // starts on a block boundary of the file.
        buf.filled_mut()[..lead].copy_from_slice(&self.kept);
        self.kept.clear();
        let whole = buf.len() - buf.len() % ALIGN;
        if whole > 0 {
            self.write_direct(&buf.filled()[..whole])?;
        }
        let rest = &buf.filled()[whole..];
        if last {
            if !rest.is_empty() {
                // Direct writes take whole blocks only, so the partial last block goes
                // through the page cache, appended where the direct writes ended.
                let mut tail = std::fs::OpenOptions::new().append(true).open(&self.path)?;
                tail.write_all(rest)?;
            }
        } else {
            self.kept.extend_from_slice(rest);
        }
        Ok(())
    }

    /// Syncs the file's data to the disk.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        // One inode: syncing this handle syncs what a tail handle wrote too.
        self.file.sync_data()
    }

    fn write_through(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)
    }

    fn write_direct(&mut self, blocks: &[u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < blocks.len() {
            match self.file.write(&blocks[done..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(written) => done += written,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                // A file system that opened the file for direct writes but refuses them:
                // go on through the page cache, appending what the refused write did not
                // write (a refused write writes nothing; earlier ones in this loop may have).
                Err(err) if err.kind() == std::io::ErrorKind::InvalidInput => {
                    self.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
                    self.direct = false;
                    return self.write_through(&blocks[done..]);
                }
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// Syncs a folder for many writers at once, so new names in it are durable. A writer that
/// asks while a sync is under way waits for the next one, which covers every request made
/// before it started: one writer at a time gets a sync each, and writers on several
/// associations share one.
#[derive(Debug)]
pub(crate) struct FolderSync {
    dir: PathBuf,
    state: Mutex<FolderState>,
    done: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct FolderState {
    /// Requests made so far.
    requested: u64,
    /// Every request up to this one is covered by a sync that succeeded.
    covered: u64,
    running: bool,
}

impl FolderSync {
    pub(crate) fn new(dir: &Path) -> FolderSync {
        FolderSync {
            dir: dir.to_owned(),
            state: Mutex::new(FolderState::default()),
            done: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FolderState> {
        // The state is plain counters, consistent after any panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns once a sync of the folder that started after this call has succeeded.
    pub(crate) async fn sync(&self) -> std::io::Result<()> {
        let ticket = {
            let mut state = self.state();
            state.requested += 1;
            state.requested
        };
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let covers = {
                let mut state = self.state();
                if state.covered >= ticket {
                    return Ok(());
                }
                if state.running {
                    None
                } else {
                    state.running = true;
                    Some(state.requested)
                }
            };
            let Some(covers) = covers else {
                notified.await;
                continue;
            };
            let mut running = Running {
                folder: self,
                covers,
                succeeded: false,
            };
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || sync_dir(&dir))
                .await
                .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())))?;
            running.succeeded = true;
        }
    }
}

/// The sync under way: however it ends (even cancelled), the next may start and waiters
/// look again.
struct Running<'a> {
    folder: &'a FolderSync,
    covers: u64,
    succeeded: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        {
            let mut state = self.folder.state();
            state.running = false;
            if self.succeeded {
                state.covered = state.covered.max(self.covers);
            }
        }
        self.folder.done.notify_waiters();
    }
}

/// Makes new names in `dir` durable: on Unix the folder itself must be synced.
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Windows cannot open a folder as a file; NTFS journals new names itself.
#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Creates `path` for direct writes, or `None` where they are not available.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match opened {
        Ok(file) => Ok(Some(file)),
        // tmpfs and some network file systems refuse O_DIRECT at open.
        Err(err) if err.kind() == std::io::ErrorKind::InvalidInput => Ok(None),
        Err(err) => Err(err),
    }
}

/// Elsewhere blobs go through the page cache (Windows' unbuffered mode needs sector-sized
/// writes too, and is left until it can be measured on a Windows server).
#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> std::io::Result<Option<File>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn any_sequence_of_writes_leaves_exactly_those_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let buffers = AlignedBuffers::default();
        for (n, (size, piece)) in [
            (0usize, 1usize),
            (1, 1),
            (ALIGN - 1, 100),
            (ALIGN, 4096),
            (ALIGN + 1, 333),
            (3 * ALIGN * 5 + 77, 10_000),
            (5 * ALIGN * 7 + 1, 65_536),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            let path = dir.path().join(format!("f{n}"));
            let mut file = BlobFile::create(&path).unwrap();
            let pieces: Vec<&[u8]> = data.chunks(piece).collect();
            let mut offset = 0u64;
            for (i, part) in pieces.iter().enumerate() {
                let lead = BlobFile::lead_for(offset);
                let mut buf = buffers.take(lead + part.len());
                buf.push_zeros(lead);
                buf.push(part);
                file.write(&mut buf, lead, i + 1 == pieces.len()).unwrap();
                buffers.give_back(buf);
                offset += part.len() as u64;
            }
            file.sync().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "size {size}");
        }
        assert!(BlobFile::create(&dir.path().join("f0")).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_at_once_share_folder_syncs_and_each_waits_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let folder = std::sync::Arc::new(FolderSync::new(dir.path()));
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let folder = folder.clone();
            writers.spawn(async move { folder.sync().await });
        }
        while let Some(result) = writers.join_next().await {
            result.unwrap().unwrap();
        }
        {
            let state = folder.state();
            assert_eq!(state.requested, 32);
            assert_eq!(state.covered, 32);
            assert!(!state.running);
        }

        let gone = FolderSync::new(&dir.path().join("missing"));
        assert!(gone.sync().await.is_err());
        assert!(
            !gone.state().running,
            "a failed sync lets the next one start"
        );
    }

    /// A direct write the file system refuses (here: one not a whole number of blocks,
    /// which Linux refuses on any file system) goes on through the page cache, after the
    /// blocks already written and without repeating them.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_refused_direct_write_goes_on_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = BlobFile::create(&path).unwrap();
        if !file.direct {
            eprintln!("this file system refuses O_DIRECT at open; nothing to test");
            return;
        }
        let buffers = AlignedBuffers::default();
        let mut blocks = buffers.take(2 * ALIGN);
        blocks.push(&[1; ALIGN]);
        file.write_direct(blocks.filled()).unwrap();
        assert!(file.direct);
        let mut odd = buffers.take(ALIGN);
        odd.push(&[2; 100]);
        file.write_direct(odd.filled()).unwrap();
        assert!(!file.direct, "fell back to the page cache");
        file.sync().unwrap();
        let mut expected = vec![1; ALIGN];
        expected.extend_from_slice(&[2; 100]);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn a_buffer_laid_out_for_another_offset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = BlobFile::create(&dir.path().join("f")).unwrap();
        let mut buf = AlignedBuffers::default().take(ALIGN);
        buf.push(&[1; 10]);
        assert!(file.write(&mut buf, 3, false).is_err());
    }
}
