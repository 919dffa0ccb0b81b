//! The one reader of a task's bytes: every path that hands task content to a user goes
//! through [`TaskReader`] — the daemon's delivery to `dfget`'s output file, ranged reads
//! (`dfget --range`) and the registry mirror's P2P blob stream. It waits for the pieces of a
//! byte range (woken by the store's piece events; the run's failure or end stops the wait
//! with its error), reads them off the async workers, and optionally keeps a running sha256
//! that is checked before the last byte is handed out: a mismatch is an error, never a
//! complete wrong output. A reader holds its task busy from its creation until it is
//! dropped, so garbage collection never evicts a task while it is read.

use crate::error::DownloadError;
use crate::task::TaskState;
use bytes::Bytes;
use dataplane::storage::OwnedBusy;
use dataplane::{Storage, TaskStore};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use wire::TaskId;

/// A byte range as a client asks for it (HTTP semantics): `start` to `end` inclusive, or to
/// the end of the content when `end` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive; `None`: through the last byte of the content.
    pub end: Option<u64>,
}

impl ByteRange {
    /// Parses `START-END` or `START-` (decimal byte offsets, `END` inclusive, as in an HTTP
    /// `Range: bytes=` header without the `bytes=` prefix; a `bytes=` prefix is accepted too).
    /// Suffix ranges (`-N`) and lists are refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t.strip_prefix("bytes=").unwrap_or(t);
        let bad = || {
            format!("range {s:?} must look like START-END or START- (byte offsets, END inclusive)")
        };
        let (a, b) = t.split_once('-').ok_or_else(bad)?;
        if a.is_empty() {
            return Err(format!(
                "range {s:?}: suffix ranges (-N) are not supported; use START-END or START-"
            ));
        }
        let start: u64 = a.trim().parse().map_err(|_| bad())?;
        let end = if b.trim().is_empty() {
            None
        } else {
            let e: u64 = b.trim().parse().map_err(|_| bad())?;
            if e < start {
                return Err(format!("range {s:?}: END {e} is before START {start}"));
            }
            Some(e)
        };
        Ok(Self { start, end })
    }

    /// The half-open byte range within `content_length` bytes, or an error when the range
    /// starts at or past the end (HTTP 416). An `end` past the content is clamped.
    pub fn resolve(&self, content_length: u64) -> Result<Range<u64>, String> {
        if self.start >= content_length {
            return Err(format!(
                "range start {} is not within the content ({content_length} bytes)",
                self.start
            ));
        }
        let end = self
            .end
            .map_or(content_length, |e| e.saturating_add(1).min(content_length));
        Ok(self.start..end)
    }
}

/// Largest read from a task file per chunk (one proxy body chunk, one copy step).
pub const CHUNK: u64 = 1 << 20;

/// How often a reader waiting for a piece looks at the task again without a wake-up (a
/// store removed under a reader sends no piece event).
const PIECE_POLL: Duration = Duration::from_secs(1);

/// How a finished range reaches an output file ([`TaskReader::copy_to_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A hard link to the task file when the range is the whole task and the output is on
    /// the task file's filesystem, else a copy.
    HardLinkOrCopy,
    /// Always a copy.
    Copy,
}

/// Why a [`TaskReader`] stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// The download failed or ended before the range was stored, the range is outside the
    /// content, or reading or writing a file failed.
    #[error("{0}")]
    Download(DownloadError),
    /// The bytes of the range do not match the expected sha256 (the last chunk was not
    /// handed out, the output file was not put in place).
    #[error(
        "digest mismatch: expected sha256:{}, got sha256:{}",
        hex::encode(expected),
        hex::encode(got)
    )]
    Digest {
        /// The digest asked for.
        expected: [u8; 32],
        /// The digest of the bytes read.
        got: [u8; 32],
    },
}

impl From<DownloadError> for ReadError {
    fn from(e: DownloadError) -> Self {
        Self::Download(e)
    }
}

impl From<ReadError> for DownloadError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Download(d) => d,
            ReadError::Digest { .. } => DownloadError::DigestMismatch(e.to_string()),
        }
    }
}

/// A run that ended without saying how: its task was dropped, which happens when the
/// daemon shuts down.
pub fn ended_without_result() -> DownloadError {
    DownloadError::Cancelled("download ended without a result".into())
}

/// Waits until the store of task `id` (whose download state `state` reports) exists, that
/// is until its size is known, and returns it. Fails when the download fails first.
pub async fn wait_store(
    storage: &Storage,
    id: &TaskId,
    state: &mut watch::Receiver<TaskState>,
) -> Result<Arc<TaskStore>, DownloadError> {
    loop {
        let now = state.borrow_and_update().clone();
        match now {
            TaskState::Done(store, _) => return Ok(store),
            TaskState::Failed(e) => return Err(e),
            TaskState::Running(p) => {
                if p.content_length.is_some() {
                    if let Some(s) = storage.get(id) {
                        return Ok(s);
                    }
                }
            }
        }
        if state.changed().await.is_err() {
            // The run is over; its last state says how.
            let last = state.borrow().clone();
            return match last {
                TaskState::Done(store, _) => Ok(store),
                TaskState::Failed(e) => Err(e),
                TaskState::Running(_) => storage.get(id).ok_or_else(ended_without_result),
            };
        }
    }
}

/// Reads a byte range of a task, waiting for its pieces as they arrive (see the module
/// docs). Chunks come out in order and never cross a piece that is not stored yet.
///
/// A reader keeps its task in use ([`TaskStore::busy_owned`]) from [`TaskReader::new`] until
/// it is dropped: garbage collection does not evict a task while it is read, and a reader
/// of a task evicted already is refused.
#[derive(Debug)]
pub struct TaskReader {
    store: Arc<TaskStore>,
    /// Keeps the task from eviction while it is read.
    _busy: OwnedBusy,
    state: watch::Receiver<TaskState>,
    /// Whether the run still sends state changes.
    state_open: bool,
    pos: u64,
    end: u64,
    sha: Option<(Sha256, [u8; 32])>,
    finished: bool,
}

impl TaskReader {
    /// A reader of bytes `range` (half-open) of `store`, whose download state `state`
    /// reports; the task is in use until the reader is dropped. Fails when the range is not
    /// within the content, or with [`DownloadError::NotFound`] when the task was evicted or
    /// removed already.
    pub fn new(
        store: Arc<TaskStore>,
        state: watch::Receiver<TaskState>,
        range: Range<u64>,
    ) -> Result<Self, DownloadError> {
        let len = store.layout().content_length();
        if range.start > range.end || range.end > len {
            return Err(DownloadError::BadRequest(format!(
                "range {}..{} is not within the content ({len} bytes)",
                range.start, range.end
            )));
        }
        let busy = store.busy_owned().ok_or_else(|| {
            DownloadError::NotFound(format!(
                "task {} was evicted from this daemon's storage before it could be read; \
                 download it again",
                store.id()
            ))
        })?;
        Ok(Self {
            store,
            _busy: busy,
            state,
            state_open: true,
            pos: range.start,
            end: range.end,
            sha: None,
            finished: false,
        })
    }

    /// Checks the bytes read against the sha256 `want`: the check runs before the last
    /// chunk is handed out (or the output file put in place), a mismatch is
    /// [`ReadError::Digest`].
    pub fn expect_sha256(mut self, want: [u8; 32]) -> Self {
        self.sha = Some((Sha256::new(), want));
        self
    }

    /// The task's store.
    pub fn store(&self) -> &Arc<TaskStore> {
        &self.store
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    /// Waits until piece `n` is stored; fails when the download fails or ends first.
    async fn wait_piece(&mut self, n: u32) -> Result<(), DownloadError> {
        loop {
            if self.store.has(n) {
                return Ok(());
            }
            let listener = self.store.listen();
            if self.store.has(n) {
                return Ok(());
            }
            let ended = match &*self.state.borrow() {
                TaskState::Failed(e) => return Err(e.clone()),
                TaskState::Done(..) => true,
                TaskState::Running(_) => !self.state_open,
            };
            if ended {
                // Done means every piece of the run's store is there: look once more,
                // the piece may have landed since.
                if self.store.has(n) {
                    return Ok(());
                }
                return Err(match &*self.state.borrow() {
                    TaskState::Running(_) => ended_without_result(),
                    _ => DownloadError::Storage(format!(
                        "the download ended without piece {n} in the file being read (the \
                         task was removed or replaced meanwhile)"
                    )),
                });
            }
            tokio::select! {
                _ = listener => {}
                r = self.state.changed(), if self.state_open => {
                    if r.is_err() {
                        self.state_open = false;
                    }
                }
                _ = tokio::time::sleep(PIECE_POLL) => {}
            }
        }
    }

    /// Waits until every piece of the bytes not read yet is stored.
    pub async fn wait_all(&mut self) -> Result<(), DownloadError> {
        let l = self.store.layout();
        if self.pos >= self.end {
            return Ok(());
        }
        let first = l.piece_at(self.pos).unwrap_or(0);
        let last = l.piece_at(self.end - 1).unwrap_or(first);
        for n in first..=last {
            self.wait_piece(n).await?;
        }
        Ok(())
    }

    /// The next chunk of the range (at most [`CHUNK`] bytes, within one piece), once its
    /// piece is stored; `None` after the last. With an expected sha256, the last chunk is
    /// returned only when the digest of the whole range matches.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ReadError> {
        if self.finished {
            return Ok(None);
        }
        if self.pos >= self.end {
            self.finish()?;
            return Ok(None);
        }
        let layout = self.store.layout();
        let (n, piece_end) = layout
            .piece_at(self.pos)
            .and_then(|n| Some((n, layout.piece_range(n)?.end)))
            .ok_or_else(|| {
                DownloadError::Internal(format!("offset {} is outside the task", self.pos))
            })?;
        self.wait_piece(n).await?;
        let stop = self.end.min(piece_end).min(self.pos + CHUNK);
        let (offset, len) = (self.pos, (stop - self.pos) as usize);
        let store = self.store.clone();
        let mut sha = self.sha.take();
        let (data, sha) = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            store
                .file()
                .read_exact_at(&mut buf, offset)
                .map_err(|e| DownloadError::io("reading the task file", &e))?;
            if let Some((h, _)) = &mut sha {
                h.update(&buf);
            }
            Ok::<_, DownloadError>((Bytes::from(buf), sha))
        })
        .await
        .map_err(|e| DownloadError::Internal(format!("reader task: {e}")))??;
        self.sha = sha;
        self.pos = stop;
        if self.pos >= self.end {
            self.finish()?;
        }
        Ok(Some(data))
    }

    /// Marks the range read and checks the running digest.
    fn finish(&mut self) -> Result<(), ReadError> {
        self.finished = true;
        match self.sha.take() {
            Some((h, expected)) => check(h, expected),
            None => Ok(()),
        }
    }

    /// Waits for the whole range and puts exactly its bytes at `output` atomically (a
    /// temporary name in the same directory renamed into place, so `output` exists only
    /// when complete and, with an expected sha256, matching). Returns the bytes written.
    /// The task stays busy (garbage collection leaves it alone) until the copy is done.
    pub async fn copy_to_file(mut self, output: &Path, how: Delivery) -> Result<u64, ReadError> {
        self.wait_all().await?;
        let output = output.to_path_buf();
        tokio::task::spawn_blocking(move || self.copy_blocking(&output, how))
            .await
            .map_err(|e| DownloadError::Internal(format!("delivery task: {e}")))?
    }

    /// [`Self::copy_to_file`] once every piece is stored; blocking file I/O.
    fn copy_blocking(self, output: &Path, how: Delivery) -> Result<u64, ReadError> {
        // Garbage collection leaves the task alone while the reader lives (it holds the
        // task busy), so the whole copy below reads a task that is not evicted.
        let store = self.store.clone();
        let len = self.remaining();
        let whole = self.pos == 0 && self.end == store.layout().content_length();
        let dir = output.parent().unwrap_or(Path::new("/"));
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.dfget-{:08x}", rand::random::<u32>()));
        let res = self.write_tmp(&tmp, whole, how).and_then(|()| {
            std::fs::rename(&tmp, output)
                .map_err(|e| DownloadError::io(&format!("writing {}", output.display()), &e).into())
        });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|()| len)
    }

    /// Puts the range at `tmp`: a hard link or an in-kernel copy of the whole task file
    /// when no digest is asked for (a digest is checked on a read first), else one pass
    /// that reads, hashes and writes.
    fn write_tmp(self, tmp: &Path, whole: bool, how: Delivery) -> Result<(), ReadError> {
        let write_err = |e: std::io::Error| -> ReadError {
            DownloadError::io(&format!("writing {}", tmp.display()), &e).into()
        };
        let src = self.store.path();
        let range = self.pos..self.end;
        if whole && how == Delivery::HardLinkOrCopy {
            if let Some((mut h, expected)) = self.sha.clone() {
                pump(&self.store, range, Some(&mut h), None)?;
                check(h, expected)?;
            }
            // A hard link fails across filesystems (EXDEV) or where links are not
            // allowed; the copy is the fallback for any such failure.
            if std::fs::hard_link(src, tmp).is_ok() {
                return Ok(());
            }
            return std::fs::copy(src, tmp).map(|_| ()).map_err(write_err);
        }
        if whole && self.sha.is_none() {
            return std::fs::copy(src, tmp).map(|_| ()).map_err(write_err);
        }
        let mut f = std::fs::File::create(tmp).map_err(write_err)?;
        let mut sha = self.sha;
        let h = sha.as_mut().map(|(h, _)| h);
        pump(&self.store, range, h, Some((&mut f, tmp)))?;
        match sha {
            Some((h, expected)) => check(h, expected),
            None => Ok(()),
        }
    }
}

/// Reads bytes `range` of the task file in chunks, feeding each to `sha` and writing it to
/// `out` (the file and its name for errors). Every piece of the range must be stored;
/// blocking file I/O.
fn pump(
    store: &TaskStore,
    range: Range<u64>,
    mut sha: Option<&mut Sha256>,
    mut out: Option<(&mut std::fs::File, &Path)>,
) -> Result<(), ReadError> {
    use std::io::Write;
    let mut buf = vec![0u8; CHUNK.min(range.end.saturating_sub(range.start)) as usize];
    let mut off = range.start;
    while off < range.end {
        let n = (range.end - off).min(CHUNK) as usize;
        store
            .file()
            .read_exact_at(&mut buf[..n], off)
            .map_err(|e| DownloadError::io("reading the task file", &e))?;
        if let Some(h) = &mut sha {
            h.update(&buf[..n]);
        }
        if let Some((f, name)) = &mut out {
            f.write_all(&buf[..n])
                .map_err(|e| DownloadError::io(&format!("writing {}", name.display()), &e))?;
        }
        off += n as u64;
    }
    Ok(())
}

/// Compares a running digest with the expected one.
fn check(h: Sha256, expected: [u8; 32]) -> Result<(), ReadError> {
    let got: [u8; 32] = h.finalize().into();
    if got == expected {
        Ok(())
    } else {
        Err(ReadError::Digest { expected, got })
    }
}

#[cfg(test)]
mod tests;
