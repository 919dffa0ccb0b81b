//! Piece storage: one content file per task, pieces written at their offsets.
//!
//! A [`TaskStore`] is shared (`Arc`) by the control plane and every data-plane thread. Which
//! pieces are present is a bitmap of atomics: a piece's bit is set only after its bytes are
//! in the file and its digest was verified, so a reader that sees the bit can serve the
//! bytes. A piece whose digest failed is never marked, whatever was written at its offset.
//!
//! Besides the crc32c (a transport check the sending parent supplies), a task can hold the
//! trusted BLAKE3 digest of each piece ([`TaskStore::set_digest`], from the scheduler, or
//! computed here when the piece came from the origin). Once digests are required for a task
//! ([`TaskStore::require_digests`]), a piece from a parent is committed only through
//! [`TaskStore::commit_verified`], which refuses bytes whose digest differs or is not known.
//!
//! Every writer of piece bytes (the fetcher, the origin fetch, `dfcache import`) goes through
//! the piece's claim ([`TaskStore::claim`] → [`PieceWriter`]): one writer per piece at a
//! time, and the piece is marked only by [`PieceWriter::finish`] or
//! [`PieceWriter::finish_trusted`] after its checks. Claims and [`Busy`] guards are the
//! task's users; [`Storage::evict`] (garbage collection) retires a task only when it has
//! none, in the same atomic word, so a task is never evicted under a writer or a reader.
//!
//! By concern: this file holds [`TaskStore`] (its file, the piece bitmap, reads and
//! [`TaskStore::write_piece`]); the piece claim ([`PieceWriter`], the claim bits, the
//! users/retired word and [`Busy`]) is in `storage/claim.rs`, the trusted digests in
//! `storage/digests.rs`, and [`Storage`] (every task, eviction and removal) in
//! `storage/table.rs`.

mod claim;
mod digests;
mod table;
#[cfg(test)]
mod tests;

pub use claim::{Busy, ClaimError, OwnedBusy, PieceWriter};
pub use table::Storage;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use wire::{PieceDigest, PieceLayout, TaskId};

/// Why a piece could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The piece number is past the end of the task.
    #[error("piece {0} is out of range")]
    OutOfRange(u32),
    /// The bytes given do not have the piece's length.
    #[error("piece {number} must have {expected} bytes, got {got}")]
    Length {
        /// Piece number.
        number: u32,
        /// Expected length.
        expected: u64,
        /// Length given.
        got: u64,
    },
    /// The bytes do not match the expected crc32c.
    #[error("piece {number} digest mismatch: expected crc32c {expected:08x}, got {got:08x}")]
    Digest {
        /// Piece number.
        number: u32,
        /// Digest announced.
        expected: u32,
        /// Digest of the bytes.
        got: u32,
    },
    /// The bytes do not have the piece's trusted BLAKE3 digest (forged or corrupt bytes
    /// with a matching crc32c).
    #[error("piece {number} does not match its trusted digest (expected blake3 {}, got {})", hex::encode(.expected), hex::encode(.got))]
    PieceDigest {
        /// Piece number.
        number: u32,
        /// Trusted digest.
        expected: PieceDigest,
        /// Digest of the bytes.
        got: PieceDigest,
    },
    /// The parent announced a crc32c other than the piece's trusted one: its bytes cannot
    /// have the trusted digest either (a forging or badly broken parent). Nothing stored.
    #[error("piece {number}: announced crc32c {got:08x} is not the trusted {expected:08x}")]
    TrustedCrc {
        /// Piece number.
        number: u32,
        /// Trusted crc32c (from the digests' source).
        expected: u32,
        /// crc32c the parent announced.
        got: u32,
    },
    /// Digests are required for the task and piece `0`'s is not known yet.
    #[error("piece {0}: trusted digest not known yet")]
    DigestUnknown(u32),
    /// The task was evicted or removed while it was being written.
    #[error("the task was evicted")]
    Retired,
    /// Reading or writing the task file failed (disk full, I/O error).
    #[error("task file I/O: {0}")]
    Io(#[from] io::Error),
}

/// The content file and piece bitmap of one task.
#[derive(Debug)]
pub struct TaskStore {
    id: TaskId,
    layout: PieceLayout,
    path: PathBuf,
    file: File,
    bits: Box<[AtomicU64]>,
    crcs: Box<[AtomicU32]>,
    /// Trusted BLAKE3 digest of each piece, once known (set once).
    digests: Box<[OnceLock<PieceDigest>]>,
    /// Trusted crc32c of each piece, once known (set once, only with its trusted digest).
    trusted_crcs: Box<[OnceLock<u32>]>,
    /// Pieces from parents must match their trusted digest (see the module doc).
    require_digests: AtomicBool,
    /// Fires when a digest becomes known.
    digests_changed: event_listener::Event,
    finished: AtomicU32,
    changed: event_listener::Event,
    /// Unix time in milliseconds of the last use (created, served, delivered).
    last_access: AtomicU64,
    /// Users that must not see the task evicted ([`Busy`] guards and [`PieceWriter`]s),
    /// plus [`claim::RETIRED`] once the task was evicted or removed: one word, so that taking a
    /// use and evicting exclude each other atomically.
    users: AtomicU32,
    /// One bit per piece: a [`PieceWriter`] holds it.
    claims: Box<[AtomicU64]>,
}

/// Unix time in milliseconds.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl TaskStore {
    /// Creates (or truncates) the content file of `id` in `dir`, sized to the content length
    /// (sparse until pieces arrive).
    pub fn create(dir: &Path, id: TaskId, layout: PieceLayout) -> io::Result<Self> {
        let path = dir.join(format!("{id}.data"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.set_len(layout.content_length())?;
        let count = layout.piece_count() as usize;
        Ok(Self {
            id,
            layout,
            path,
            file,
            bits: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            crcs: (0..count).map(|_| AtomicU32::new(0)).collect(),
            digests: (0..count).map(|_| OnceLock::new()).collect(),
            trusted_crcs: (0..count).map(|_| OnceLock::new()).collect(),
            require_digests: AtomicBool::new(false),
            digests_changed: event_listener::Event::new(),
            finished: AtomicU32::new(0),
            changed: event_listener::Event::new(),
            last_access: AtomicU64::new(unix_millis()),
            users: AtomicU32::new(0),
            claims: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Re-opens the content file of a task stored before a restart, with the pieces a
    /// metadata store recorded: `bitmap` in the wire format of [`TaskStore::bitmap_bytes`],
    /// `crcs` one crc32c per piece. A recorded piece is trusted only when the file reaches its
    /// end, and, with `verify`, when its bytes still have its crc32c; others count as missing.
    /// The file is (re)sized to the content length; a missing file gives a store with no
    /// pieces.
    pub fn restore(
        dir: &Path,
        id: TaskId,
        layout: PieceLayout,
        bitmap: &[u8],
        crcs: &[u32],
        verify: bool,
    ) -> io::Result<Self> {
        let path = dir.join(format!("{id}.data"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let file_len = file.metadata()?.len();
        if file_len != layout.content_length() {
            file.set_len(layout.content_length())?;
        }
        let count = layout.piece_count() as usize;
        let store = Self {
            id,
            layout,
            path,
            file,
            bits: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            crcs: (0..count).map(|_| AtomicU32::new(0)).collect(),
            digests: (0..count).map(|_| OnceLock::new()).collect(),
            trusted_crcs: (0..count).map(|_| OnceLock::new()).collect(),
            require_digests: AtomicBool::new(false),
            digests_changed: event_listener::Event::new(),
            finished: AtomicU32::new(0),
            changed: event_listener::Event::new(),
            last_access: AtomicU64::new(unix_millis()),
            users: AtomicU32::new(0),
            claims: (0..count.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        };
        let mut buf = Vec::new();
        for n in 0..layout.piece_count() {
            let recorded = bitmap
                .get(n as usize / 8)
                .is_some_and(|b| b & (1 << (n % 8)) != 0);
            let (Some(&crc), Some(range)) = (crcs.get(n as usize), layout.piece_range(n)) else {
                continue;
            };
            if !recorded || range.end > file_len {
                continue;
            }
            if verify {
                buf.resize((range.end - range.start) as usize, 0);
                if store.file.read_exact_at(&mut buf, range.start).is_err()
                    || wire::piece_crc(&buf) != crc
                {
                    continue;
                }
            }
            store.commit(n, crc);
        }
        Ok(store)
    }

    /// Unix time in milliseconds of the last use.
    pub fn last_access(&self) -> u64 {
        self.last_access.load(Ordering::Relaxed)
    }

    /// Sets the time of the last use (restoring a task's recorded time).
    pub fn set_last_access(&self, unix_ms: u64) {
        self.last_access.store(unix_ms, Ordering::Relaxed);
    }

    /// Records a use now.
    pub fn touch(&self) {
        self.last_access.store(unix_millis(), Ordering::Relaxed);
    }

    /// The crc32c of every piece (0 for a piece not stored).
    pub fn crcs(&self) -> Vec<u32> {
        (0..self.layout.piece_count())
            .map(|n| self.piece_crc(n).unwrap_or(0))
            .collect()
    }

    /// Task id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Piece layout.
    pub fn layout(&self) -> PieceLayout {
        self.layout
    }

    /// The content file, for zero-copy reads (`sendfile`) by the upload server.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Path of the content file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether piece `n` is stored and verified.
    pub fn has(&self, n: u32) -> bool {
        self.bits
            .get(n as usize / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (n % 64)) != 0)
    }

    /// Number of pieces stored.
    pub fn finished_count(&self) -> u32 {
        self.finished.load(Ordering::Acquire)
    }

    /// Whether every piece is stored.
    pub fn is_complete(&self) -> bool {
        self.finished_count() == self.layout.piece_count()
    }

    /// Bytes stored so far.
    pub fn completed_length(&self) -> u64 {
        (0..self.layout.piece_count())
            .filter(|&n| self.has(n))
            .filter_map(|n| self.layout.piece_size(n))
            .sum()
    }

    /// crc32c of piece `n` when stored.
    pub fn piece_crc(&self, n: u32) -> Option<u32> {
        self.has(n)
            .then(|| self.crcs.get(n as usize).map(|c| c.load(Ordering::Acquire)))
            .flatten()
    }

    /// The bitmap in the wire format of [`wire::Frame::Bitmap`].
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        let count = self.layout.piece_count();
        let mut out = vec![0u8; wire::frame::bitmap_len(count)];
        for n in 0..count {
            if self.has(n) {
                out[n as usize / 8] |= 1 << (n % 8);
            }
        }
        out
    }

    /// A listener that fires the next time a piece is stored.
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }

    /// Writes `data` at piece `n`'s offset and marks the piece, through the piece's claim
    /// ([`TaskStore::claim`]), whose running crc32c and length are checked against `crc` and
    /// the piece's length before the mark (one pass over the bytes). Returns whether the
    /// piece was new: `false` when it is stored already or another writer holds it (that
    /// writer stores it). A wrong length or crc32c leaves the piece unmarked and released; a
    /// retired task is an error.
    ///
    /// For bytes from a trusted place (the origin, an imported file): their BLAKE3 digest
    /// becomes the piece's trusted digest ([`TaskStore::piece_digest`]), which this host
    /// reports to the scheduler. A trusted digest already known and different (the origin
    /// changed under the task) stores nothing.
    pub fn write_piece(
        self: &Arc<Self>,
        n: u32,
        data: &[u8],
        crc: u32,
    ) -> Result<bool, StoreError> {
        let mut w = match self.claim(n) {
            Ok(w) => w,
            Err(ClaimError::Stored | ClaimError::Held) => return Ok(false),
            Err(ClaimError::Retired) => return Err(StoreError::Retired),
            Err(ClaimError::OutOfRange) => return Err(StoreError::OutOfRange(n)),
        };
        w.hash_here();
        w.write(data)?;
        w.finish_trusted(Some(crc))
    }

    /// Marks piece `n` as stored with crc32c `crc`. Only for the holder of the piece's claim
    /// ([`PieceWriter`]), after it wrote bytes of the right length whose crc32c is `crc`, and
    /// for [`TaskStore::restore`]. Returns whether the piece was new.
    fn commit(&self, n: u32, crc: u32) -> bool {
        let (Some(word), Some(slot)) = (self.bits.get(n as usize / 64), self.crcs.get(n as usize))
        else {
            return false;
        };
        slot.store(crc, Ordering::Release);
        let bit = 1u64 << (n % 64);
        let new = word.fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if new {
            self.finished.fetch_add(1, Ordering::AcqRel);
            self.changed.notify(usize::MAX);
        }
        new
    }

    /// Reads piece `n` into `buf` (resized to the piece length). Fails for a piece that is not
    /// stored.
    pub fn read_piece(&self, n: u32, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let range = self
            .layout
            .piece_range(n)
            .ok_or(StoreError::OutOfRange(n))?;
        if !self.has(n) {
            return Err(StoreError::OutOfRange(n));
        }
        buf.resize((range.end - range.start) as usize, 0);
        self.file.read_exact_at(buf, range.start)?;
        Ok(())
    }
}
