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

use arc_swap::ArcSwap;
use std::collections::HashMap;
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
    /// Pieces from parents must match their trusted digest (see the module doc).
    require_digests: AtomicBool,
    /// Fires when a digest becomes known.
    digests_changed: event_listener::Event,
    finished: AtomicU32,
    changed: event_listener::Event,
    /// Unix time in milliseconds of the last use (created, served, delivered).
    last_access: AtomicU64,
    /// Users that must not see the task evicted ([`Busy`] guards and [`PieceWriter`]s),
    /// plus [`RETIRED`] once the task was evicted or removed: one word, so that taking a
    /// use and evicting exclude each other atomically.
    users: AtomicU32,
    /// One bit per piece: a [`PieceWriter`] holds it.
    claims: Box<[AtomicU64]>,
}

/// [`TaskStore::users`] bit: evicted or removed; no new use or claim.
const RETIRED: u32 = 1 << 31;

/// Why [`TaskStore::claim`] did not give the piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The piece is stored already.
    #[error("piece is stored already")]
    Stored,
    /// Another writer holds the piece's claim.
    #[error("another writer holds the piece")]
    Held,
    /// The task was evicted or removed: nothing may be written to it any more.
    #[error("task was evicted")]
    Retired,
    /// The piece number is past the end of the task.
    #[error("piece is out of range")]
    OutOfRange,
}

/// Unix time in milliseconds.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Marks a task in use while it lives (see [`TaskStore::busy`]).
#[derive(Debug)]
pub struct Busy<'a>(&'a TaskStore);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The exclusive right to write one piece of a task ([`TaskStore::claim`]): bytes are
/// written in order at the piece's offset with a running crc32c (and, for bytes from a
/// trusted place, a running BLAKE3 digest); [`PieceWriter::finish`] or
/// [`PieceWriter::finish_trusted`] checks and commits the piece. Dropping it without
/// finishing releases the piece unmarked (its bytes, if any, are never served and are
/// overwritten by the next writer). While it lives, the task is in use: never evicted.
#[derive(Debug)]
pub struct PieceWriter {
    store: Arc<TaskStore>,
    n: u32,
    offset: u64,
    len: u64,
    written: u64,
    /// Running crc32c; `None` when the caller checks it elsewhere.
    crc: Option<u32>,
    hasher: Option<wire::PieceHasher>,
}

impl PieceWriter {
    /// Piece number.
    pub fn number(&self) -> u32 {
        self.n
    }

    /// The piece's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the piece is empty (never: pieces have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The crc32c of the bytes written so far (`None` after
    /// [`PieceWriter::crc_checked_elsewhere`]).
    pub fn crc(&self) -> Option<u32> {
        self.crc
    }

    /// The caller computes and checks the crc32c of the bytes itself (the fetcher's hash
    /// worker does, with the digest, off the receiving thread), so writes skip it and
    /// [`PieceWriter::finish`] takes the caller's word for it. Call before the first write.
    pub fn crc_checked_elsewhere(&mut self) {
        self.crc = None;
    }

    /// The task.
    pub fn store(&self) -> &Arc<TaskStore> {
        &self.store
    }

    /// Also computes the BLAKE3 digest of the bytes written from here on (call before the
    /// first write), for [`PieceWriter::finish_trusted`].
    pub fn hash_here(&mut self) {
        self.hasher.get_or_insert_with(wire::PieceHasher::new);
    }

    /// Writes the next bytes of the piece.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.write_parts(&[data])
    }

    /// Writes the next bytes of the piece, given in several buffers (one `pwritev`).
    pub fn write_parts(&mut self, parts: &[&[u8]]) -> Result<(), StoreError> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if self.written + total > self.len {
            return Err(StoreError::Length {
                number: self.n,
                expected: self.len,
                got: self.written + total,
            });
        }
        for p in parts {
            if let Some(c) = self.crc.as_mut() {
                *c = wire::piece_crc_append(*c, p);
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(p);
            }
        }
        let at = self.offset + self.written;
        match parts {
            [] => {}
            [one] => self.store.file.write_all_at(one, at)?,
            many => crate::sys::pwritev_all(&self.store.file, many, at)?,
        }
        self.written += total;
        Ok(())
    }

    fn check(&self, crc: u32) -> Result<(), StoreError> {
        if self.written != self.len {
            return Err(StoreError::Length {
                number: self.n,
                expected: self.len,
                got: self.written,
            });
        }
        match self.crc {
            Some(got) if got != crc => Err(StoreError::Digest {
                number: self.n,
                expected: crc,
                got,
            }),
            _ => Ok(()),
        }
    }

    /// Commits bytes from a parent: the whole piece written, its crc32c `crc` (unless
    /// checked elsewhere), and its BLAKE3 digest `got` (computed by the caller, e.g. off the
    /// receiving thread) checked as [`TaskStore::commit_verified`] does. Returns whether the
    /// piece was new.
    pub fn finish(self, crc: u32, got: Option<PieceDigest>) -> Result<bool, StoreError> {
        self.check(crc)?;
        self.store.commit_verified(self.n, crc, got)
    }

    /// Commits bytes from a trusted place (the origin, an imported file): their digest
    /// (computed while writing, [`PieceWriter::hash_here`]) becomes the piece's trusted
    /// digest; a different trusted digest already known (the origin changed under the task)
    /// stores nothing. `crc`: the expected crc32c, when the caller has one. Returns whether
    /// the piece was new.
    pub fn finish_trusted(self, crc: Option<u32>) -> Result<bool, StoreError> {
        let Some(own) = self.crc else {
            return Err(StoreError::Length {
                number: self.n,
                expected: self.len,
                got: 0,
            });
        };
        self.check(crc.unwrap_or(own))?;
        let digest = match &self.hasher {
            Some(h) => h.finish(),
            None => {
                // Not hashed while written: read the piece back.
                let mut buf = vec![0; usize::try_from(self.len).unwrap_or(0)];
                self.store.file.read_exact_at(&mut buf, self.offset)?;
                wire::piece_digest(&buf)
            }
        };
        if let Some(expected) = self.store.piece_digest(self.n).filter(|d| *d != digest) {
            return Err(StoreError::PieceDigest {
                number: self.n,
                expected,
                got: digest,
            });
        }
        let _ = self.store.set_digest(self.n, digest);
        Ok(self.store.commit(self.n, own))
    }
}

impl Drop for PieceWriter {
    fn drop(&mut self) {
        if let Some(w) = self.store.claims.get(self.n as usize / 64) {
            w.fetch_and(!(1u64 << (self.n % 64)), Ordering::AcqRel);
        }
        self.store.leave();
    }
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

    /// Marks the task in use (and used now) until the guard is dropped: garbage collection
    /// never evicts a task in use ([`Storage::evict`]). `None` when it was evicted or
    /// removed already (its file is gone from the directory).
    #[must_use]
    pub fn busy(&self) -> Option<Busy<'_>> {
        if !self.enter() {
            return None;
        }
        self.touch();
        Some(Busy(self))
    }

    /// Whether some user holds a [`Busy`] guard or a [`PieceWriter`].
    pub fn in_use(&self) -> bool {
        self.users.load(Ordering::Acquire) & !RETIRED > 0
    }

    /// Whether the task was evicted or removed ([`TaskStore::retire`]).
    pub fn is_retired(&self) -> bool {
        self.users.load(Ordering::Acquire) & RETIRED != 0
    }

    /// Takes one use unless the task is retired.
    fn enter(&self) -> bool {
        let mut cur = self.users.load(Ordering::Acquire);
        loop {
            if cur & RETIRED != 0 {
                return false;
            }
            match self.users.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn leave(&self) {
        self.users.fetch_sub(1, Ordering::AcqRel);
    }

    /// Retires the task if nobody uses it (no [`Busy`] guard, no [`PieceWriter`]): from
    /// then on it cannot be claimed or marked busy. One atomic step, so a use taken at the
    /// same time either comes first (and this fails) or fails itself. Returns whether the
    /// task is retired now.
    pub fn retire(&self) -> bool {
        self.users
            .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            || self.is_retired()
    }

    /// Retires the task whatever its users (a removal asked for by the user or after a
    /// failure): current users finish on the unlinked file, new ones are refused.
    fn retire_now(&self) {
        self.users.fetch_or(RETIRED, Ordering::AcqRel);
    }

    /// Takes the exclusive right to write piece `n` ([`PieceWriter`]): refused when the
    /// piece is stored, another writer holds it, or the task was retired (evicted). Every
    /// writer of piece bytes takes it: the fetcher, the origin fetch, `dfcache import`.
    pub fn claim(self: &Arc<Self>, n: u32) -> Result<PieceWriter, ClaimError> {
        let range = self.layout.piece_range(n).ok_or(ClaimError::OutOfRange)?;
        let word = self
            .claims
            .get(n as usize / 64)
            .ok_or(ClaimError::OutOfRange)?;
        if self.has(n) {
            return Err(ClaimError::Stored);
        }
        if !self.enter() {
            return Err(ClaimError::Retired);
        }
        let bit = 1u64 << (n % 64);
        if word.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            self.leave();
            return Err(ClaimError::Held);
        }
        let w = PieceWriter {
            store: self.clone(),
            n,
            offset: range.start,
            len: range.end - range.start,
            written: 0,
            crc: Some(0),
            hasher: None,
        };
        // Committed by a writer that released its claim just before ours was taken.
        if self.has(n) {
            return Err(ClaimError::Stored);
        }
        Ok(w)
    }

    /// Whether some writer holds piece `n`'s claim.
    pub fn is_claimed(&self, n: u32) -> bool {
        self.claims
            .get(n as usize / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (n % 64)) != 0)
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

    /// Checks that `data` is piece `n`: right length and crc32c `crc`.
    pub fn verify(&self, n: u32, data: &[u8], crc: u32) -> Result<(), StoreError> {
        let range = self
            .layout
            .piece_range(n)
            .ok_or(StoreError::OutOfRange(n))?;
        let expected = range.end - range.start;
        if data.len() as u64 != expected {
            return Err(StoreError::Length {
                number: n,
                expected,
                got: data.len() as u64,
            });
        }
        let got = wire::piece_crc(data);
        if got != crc {
            return Err(StoreError::Digest {
                number: n,
                expected: crc,
                got,
            });
        }
        Ok(())
    }

    /// Checks `data` against `crc`, writes it at piece `n`'s offset and marks the piece,
    /// through the piece's claim ([`TaskStore::claim`]). Returns whether the piece was new:
    /// `false` when it is stored already or another writer holds it (that writer stores
    /// it). A digest mismatch stores nothing; a retired task is an error.
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
        self.verify(n, data, crc)?;
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

    /// From now on, pieces from parents are stored only when they match their trusted
    /// digest ([`TaskStore::commit_verified`]).
    pub fn require_digests(&self) {
        self.require_digests.store(true, Ordering::Release);
        self.digests_changed.notify(usize::MAX);
    }

    /// Stops requiring digests for pieces whose digest is not known (those known are still
    /// checked by [`TaskStore::commit_verified`]): while no scheduler can hand out the
    /// missing ones, such pieces are checked by their crc32c only, as before digests
    /// existed, instead of waiting for a digest that cannot come. Pieces held waiting are
    /// woken. [`TaskStore::require_digests`] undoes it.
    pub fn relax_digests(&self) {
        self.require_digests.store(false, Ordering::Release);
        self.digests_changed.notify(usize::MAX);
    }

    /// Whether pieces from parents must match a trusted digest.
    pub fn digests_required(&self) -> bool {
        self.require_digests.load(Ordering::Acquire)
    }

    /// Records the trusted digest of piece `n`. The first one stays: returns `Ok(true)` when
    /// it was new, `Ok(false)` when the same digest was known, `Err(known)` when another one
    /// was (the caller logs the conflict).
    pub fn set_digest(&self, n: u32, digest: PieceDigest) -> Result<bool, PieceDigest> {
        let Some(slot) = self.digests.get(n as usize) else {
            return Ok(false);
        };
        let mut new = false;
        let known = slot.get_or_init(|| {
            new = true;
            digest
        });
        if new {
            self.digests_changed.notify(usize::MAX);
            return Ok(true);
        }
        if *known == digest {
            Ok(false)
        } else {
            Err(*known)
        }
    }

    /// The trusted digest of piece `n`, when known.
    pub fn piece_digest(&self, n: u32) -> Option<PieceDigest> {
        self.digests.get(n as usize).and_then(|d| d.get().copied())
    }

    /// Every piece's trusted digest in order (32 bytes each), when all are known.
    pub fn all_digests(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(self.digests.len() * wire::PIECE_DIGEST_LEN);
        for d in self.digests.iter() {
            out.extend_from_slice(d.get()?);
        }
        Some(out)
    }

    /// A listener that fires the next time a trusted digest becomes known.
    pub fn listen_digests(&self) -> event_listener::EventListener {
        self.digests_changed.listen()
    }

    /// Marks piece `n` as stored with crc32c `crc` after the claim holder wrote bytes whose
    /// BLAKE3 digest is `got` at the piece's offset (and checked them against `crc`): when
    /// digests are required, only if `got` is the piece's trusted digest
    /// ([`PieceWriter::finish`]). This is the one place where
    /// a piece from a parent becomes visible (served, counted); bytes that fail here stay
    /// unmarked, so they are never served and are overwritten by the next copy. Returns
    /// whether the piece was new.
    fn commit_verified(
        &self,
        n: u32,
        crc: u32,
        got: Option<PieceDigest>,
    ) -> Result<bool, StoreError> {
        if self.digests_required() {
            let expected = self.piece_digest(n).ok_or(StoreError::DigestUnknown(n))?;
            let got = got.ok_or(StoreError::DigestUnknown(n))?;
            if got != expected {
                return Err(StoreError::PieceDigest {
                    number: n,
                    expected,
                    got,
                });
            }
        } else if let (Some(expected), Some(got)) = (self.piece_digest(n), got) {
            // Not required, but known: still never store bytes that contradict it.
            if got != expected {
                return Err(StoreError::PieceDigest {
                    number: n,
                    expected,
                    got,
                });
            }
        }
        Ok(self.commit(n, crc))
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

/// Every task this daemon stores, readable without locks by all threads.
///
/// Reads (`get`) are a lock-free `ArcSwap` load; inserts and removals copy the map, which is
/// fine because tasks are opened far less often than pieces are served.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    tasks: ArcSwap<HashMap<TaskId, Arc<TaskStore>>>,
    /// Held by `create`, `remove` and `insert` across their map change and file work, so
    /// that a task's file is never unlinked or truncated under a store of the same id
    /// made in between (a remove racing a re-create would otherwise unlink the new file).
    changing: std::sync::Mutex<()>,
    /// Bytes of content files created (a cheap view of disk use).
    allocated: AtomicU64,
}

impl Storage {
    /// Storage under `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tasks: ArcSwap::from_pointee(HashMap::new()),
            changing: std::sync::Mutex::new(()),
            allocated: AtomicU64::new(0),
        })
    }

    /// Directory of the content files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The task `id`, when stored.
    pub fn get(&self, id: &TaskId) -> Option<Arc<TaskStore>> {
        self.tasks.load().get(id).cloned()
    }

    /// Creates the content file of a task and registers it, or returns the existing one when
    /// it has the same layout. One with another layout is removed first (its file unlinked,
    /// so whoever still holds it keeps reading its own bytes, not the new file's).
    pub fn create(&self, id: TaskId, layout: PieceLayout) -> io::Result<Arc<TaskStore>> {
        let _changing = self.lock_changes();
        if let Some(t) = self.get(&id) {
            if t.layout() == layout {
                return Ok(t);
            }
            self.remove_locked(&id)?;
        }
        let store = Arc::new(TaskStore::create(&self.dir, id, layout)?);
        self.allocated
            .fetch_add(layout.content_length(), Ordering::Relaxed);
        let s = store.clone();
        self.tasks.rcu(move |m| {
            let mut m = HashMap::clone(m);
            m.insert(id, s.clone());
            m
        });
        Ok(store)
    }

    /// Forgets a task and removes its content file, whoever still uses it (a removal the
    /// user asked for, or of a failed download): the task is retired, so nothing claims or
    /// marks it busy from now on; current users finish on the unlinked file.
    pub fn remove(&self, id: &TaskId) -> io::Result<()> {
        let _changing = self.lock_changes();
        if let Some(t) = self.get(id) {
            t.retire_now();
        }
        self.remove_locked(id)
    }

    /// Garbage collection's removal: forgets the task and removes its content file only if
    /// nobody uses it, in one atomic step with the users ([`TaskStore::retire`]): a task
    /// with a piece claimed ([`PieceWriter`]) or a [`Busy`] guard (a read, an upload, a
    /// delivery) is kept, and once retired it can be neither claimed nor marked busy.
    /// Returns whether it was evicted (`false`: in use, or not stored).
    pub fn evict(&self, id: &TaskId) -> io::Result<bool> {
        let _changing = self.lock_changes();
        match self.get(id) {
            Some(t) if t.retire() => {
                self.remove_locked(id)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::remove`] with `changing` held.
    fn remove_locked(&self, id: &TaskId) -> io::Result<()> {
        let mut removed = None;
        self.tasks.rcu(|m| {
            let mut m = HashMap::clone(m);
            removed = m.remove(id);
            m
        });
        if let Some(t) = removed {
            self.allocated
                .fetch_sub(t.layout().content_length(), Ordering::Relaxed);
            match std::fs::remove_file(t.path()) {
                // Already gone (removed by hand): what was asked for holds.
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Registers a task restored from disk ([`TaskStore::restore`]), replacing any task of
    /// the same id.
    pub fn insert(&self, store: Arc<TaskStore>) {
        let _changing = self.lock_changes();
        let id = store.id();
        self.allocated
            .fetch_add(store.layout().content_length(), Ordering::Relaxed);
        self.tasks.rcu(move |m| {
            let mut m = HashMap::clone(m);
            m.insert(id, store.clone());
            m
        });
    }

    /// Every task stored now.
    pub fn tasks(&self) -> Vec<Arc<TaskStore>> {
        self.tasks.load().values().cloned().collect()
    }

    /// Sum of the content lengths of the tasks stored (what their files take at most).
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Number of tasks stored.
    pub fn len(&self) -> usize {
        self.tasks.load().len()
    }

    /// Whether no task is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(len: u64, plen: u64) -> (tempfile::TempDir, Arc<TaskStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PieceLayout::new(len, plen).expect("layout");
        let s = TaskStore::create(dir.path(), TaskId([7; 32]), layout).expect("create");
        (dir, Arc::new(s))
    }

    /// A store replaced by one of another layout keeps its own bytes (its file is unlinked,
    /// not truncated under it); removing a task whose file is already gone is no error.
    #[test]
    fn replacing_a_task_never_truncates_the_old_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("storage");
        let id = TaskId([9; 32]);
        let old = storage
            .create(id, PieceLayout::new(16384, 16384).expect("layout"))
            .expect("create");
        let data = vec![3u8; 16384];
        old.write_piece(0, &data, wire::piece_crc(&data))
            .expect("write");
        let new = storage
            .create(id, PieceLayout::new(2 * 16384, 16384).expect("layout"))
            .expect("create with another layout");
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(Arc::ptr_eq(&new, &storage.get(&id).expect("stored")));
        let mut buf = Vec::new();
        old.read_piece(0, &mut buf)
            .expect("the old store still reads");
        assert_eq!(buf, data);
        assert!(!new.has(0));
        assert_eq!(new.file().metadata().expect("stat").len(), 2 * 16384);

        std::fs::remove_file(new.path()).expect("remove by hand");
        storage
            .remove(&id)
            .expect("removing a task whose file is gone");
        assert!(storage.get(&id).is_none());
    }

    #[test]
    fn corrupt_piece_is_not_stored() {
        let (_d, s) = store(40_000, 16384);
        let data = vec![1u8; 16384];
        let crc = wire::piece_crc(&data);
        assert!(matches!(
            s.write_piece(0, &data, crc ^ 1),
            Err(StoreError::Digest { .. })
        ));
        assert!(!s.has(0));
        assert_eq!(s.finished_count(), 0);
        assert!(s.write_piece(0, &data, crc).expect("stored"));
        assert!(s.has(0));
        assert_eq!(s.piece_crc(0), Some(crc));
    }

    /// With digests required, a piece commits only with its trusted digest: unknown and
    /// mismatching digests leave it unmarked; the first trusted digest wins.
    #[test]
    fn commit_verified_checks_the_trusted_digest() {
        let (_d, s) = store(40_000, 16384);
        let good = vec![5u8; 16384];
        let forged = vec![6u8; 16384];
        let (dg, df) = (wire::piece_digest(&good), wire::piece_digest(&forged));
        s.require_digests();
        assert!(matches!(
            s.commit_verified(0, wire::piece_crc(&good), Some(dg)),
            Err(StoreError::DigestUnknown(0))
        ));
        assert_eq!(s.set_digest(0, dg), Ok(true));
        assert_eq!(s.set_digest(0, dg), Ok(false));
        assert_eq!(s.set_digest(0, df), Err(dg), "the first digest stays");
        assert!(matches!(
            s.commit_verified(0, wire::piece_crc(&forged), Some(df)),
            Err(StoreError::PieceDigest { number: 0, .. })
        ));
        assert!(!s.has(0));
        assert_eq!(
            s.commit_verified(0, wire::piece_crc(&good), Some(dg)).ok(),
            Some(true)
        );
        assert!(s.has(0));
        // Bytes from the origin set the trusted digest; other bytes for that piece later fail.
        let (_d2, o) = store(40_000, 16384);
        assert!(o
            .write_piece(1, &good, wire::piece_crc(&good))
            .expect("origin piece"));
        assert_eq!(o.piece_digest(1), Some(dg));
        assert!(o.all_digests().is_none(), "pieces 0 and 2 have none yet");
    }

    #[test]
    fn wrong_length_and_range_are_errors() {
        let (_d, s) = store(40_000, 16384);
        assert!(matches!(
            s.write_piece(2, &[0; 10], 0),
            Err(StoreError::Length { .. })
        ));
        assert!(matches!(
            s.write_piece(3, &[], 0),
            Err(StoreError::OutOfRange(3))
        ));
        let last = vec![9u8; 40_000 - 2 * 16384];
        assert!(s.write_piece(2, &last, wire::piece_crc(&last)).expect("ok"));
        let mut buf = Vec::new();
        s.read_piece(2, &mut buf).expect("read");
        assert_eq!(buf, last);
        assert!(s.read_piece(1, &mut buf).is_err());
    }

    #[test]
    fn restore_trusts_only_pieces_the_file_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PieceLayout::new(3 * 16384, 16384).expect("layout");
        let id = TaskId([9; 32]);
        let s = Arc::new(TaskStore::create(dir.path(), id, layout).expect("create"));
        let pieces: Vec<Vec<u8>> = (0..3u8).map(|n| vec![n + 1; 16384]).collect();
        for n in [0usize, 2] {
            s.write_piece(n as u32, &pieces[n], wire::piece_crc(&pieces[n]))
                .expect("write");
        }
        let (bits, crcs) = (s.bitmap_bytes(), s.crcs());
        drop(s);
        let r = TaskStore::restore(dir.path(), id, layout, &bits, &crcs, true).expect("restore");
        assert!(r.has(0) && !r.has(1) && r.has(2));
        assert_eq!(r.finished_count(), 2);
        // Piece 0 corrupted on disk: verification drops it; a short file drops piece 2.
        drop(r);
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(format!("{id}.data")))
            .expect("open");
        f.write_all_at(&[0xff; 10], 0).expect("corrupt");
        f.set_len(2 * 16384).expect("truncate");
        let r = TaskStore::restore(dir.path(), id, layout, &bits, &crcs, true).expect("restore");
        assert!(!r.has(0) && !r.has(2));
        assert_eq!(r.finished_count(), 0);
        assert_eq!(
            std::fs::metadata(r.path()).expect("meta").len(),
            3 * 16384,
            "the file is sized back to the content length"
        );
        // Without verification the bit is trusted when the file is long enough.
        drop(r);
        f.set_len(2 * 16384).expect("truncate");
        let r = TaskStore::restore(dir.path(), id, layout, &bits, &crcs, false).expect("restore");
        assert!(r.has(0) && !r.has(2));
        let _b = r.busy().expect("not retired");
        assert!(r.in_use());
    }

    /// Two writers race for one piece, again and again, from two threads: exactly one
    /// takes the claim and commits; the other is refused (held or stored) and never writes.
    #[test]
    fn two_writers_race_exactly_one_commits() {
        let (_d, s) = store(64 * 16384, 16384);
        let good: Vec<Vec<u8>> = (0..64u32).map(|n| vec![n as u8; 16384]).collect();
        let barrier = std::sync::Barrier::new(2);
        let commits = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|sc| {
            for writer in 0..2u8 {
                let (s, good, barrier, commits) = (&s, &good, &barrier, &commits);
                sc.spawn(move || {
                    for n in 0..64u32 {
                        barrier.wait();
                        match s.claim(n) {
                            Ok(mut w) => {
                                // The loser's bytes would differ: a write by it would show.
                                let data = &good[n as usize];
                                w.hash_here();
                                w.write(&data[..1000]).expect("write");
                                std::thread::yield_now();
                                w.write(&data[1000..]).expect("write");
                                assert_eq!(
                                    w.finish_trusted(Some(wire::piece_crc(data))).ok(),
                                    Some(true)
                                );
                                commits.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => assert!(
                                matches!(e, ClaimError::Held | ClaimError::Stored),
                                "writer {writer}: {e}"
                            ),
                        }
                    }
                });
            }
        });
        assert_eq!(commits.load(Ordering::Relaxed), 64, "one commit per piece");
        assert!(s.is_complete());
        let mut buf = Vec::new();
        for n in 0..64u32 {
            s.read_piece(n, &mut buf).expect("read");
            assert_eq!(buf, good[n as usize]);
            assert!(!s.is_claimed(n));
        }
        assert!(!s.in_use(), "every claim released");
    }

    /// A claim excludes every other writer until it is finished or dropped; a dropped
    /// claim leaves the piece unmarked; a short or corrupt piece is not committed.
    #[test]
    fn claim_is_exclusive_and_released_on_drop() {
        let (_d, s) = store(3 * 16384, 16384);
        let data = vec![4u8; 16384];
        let crc = wire::piece_crc(&data);
        let mut w = s.claim(1).expect("claim");
        assert_eq!(s.claim(1).err(), Some(ClaimError::Held));
        assert_eq!(
            s.write_piece(1, &data, crc).ok(),
            Some(false),
            "held elsewhere"
        );
        assert!(s.in_use());
        w.write(&data[..100]).expect("write");
        assert!(matches!(
            w.finish(crc, None),
            Err(StoreError::Length { .. })
        ));
        assert!(!s.has(1) && !s.is_claimed(1) && !s.in_use());
        let mut w = s.claim(1).expect("claim again");
        w.write(&data).expect("write");
        assert!(matches!(
            s.claim(1).expect_err("held").to_string().as_str(),
            "another writer holds the piece"
        ));
        assert!(matches!(
            w.finish(crc ^ 1, None),
            Err(StoreError::Digest { .. })
        ));
        assert!(!s.has(1));
        let mut w = s.claim(1).expect("claim a third time");
        w.write_parts(&[&data[..10], &data[10..]]).expect("write");
        assert!(matches!(w.write(&[0]), Err(StoreError::Length { .. })));
        assert_eq!(w.finish(crc, None).ok(), Some(true));
        assert_eq!(s.claim(1).err(), Some(ClaimError::Stored));
        assert_eq!(s.claim(3).err(), Some(ClaimError::OutOfRange));
    }

    /// Garbage collection never evicts a task with a piece claimed or a reader (`Busy`),
    /// and an evicted task can be neither claimed nor marked busy: eviction and use exclude
    /// each other atomically. Without the claim and the one-word state, the eviction below
    /// would succeed while the writer holds the piece (and its file would vanish under it).
    #[test]
    fn gc_never_evicts_a_claimed_or_read_task() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("storage");
        let id = TaskId([5; 32]);
        let t = storage
            .create(id, PieceLayout::new(2 * 16384, 16384).expect("layout"))
            .expect("create");
        let data = vec![8u8; 16384];
        let w = t.claim(0).expect("claim");
        assert!(!storage.evict(&id).expect("evict"), "claimed: kept");
        assert!(storage.get(&id).is_some() && t.path().exists());
        drop(w);
        let busy = t.busy().expect("busy");
        assert!(!storage.evict(&id).expect("evict"), "being read: kept");
        drop(busy);
        assert!(storage.evict(&id).expect("evict"), "idle: evicted");
        assert!(storage.get(&id).is_none() && !t.path().exists());
        assert_eq!(t.claim(0).err(), Some(ClaimError::Retired));
        assert!(t.busy().is_none());
        assert!(matches!(
            t.write_piece(0, &data, wire::piece_crc(&data)),
            Err(StoreError::Retired)
        ));

        // Racing: a thread that claims and reads in a loop, another that evicts. Whenever a
        // use was taken, the task is still stored while it is held.
        for round in 0..200u8 {
            let id = TaskId([round; 32]);
            let t = storage
                .create(id, PieceLayout::new(16384, 16384).expect("layout"))
                .expect("create");
            let evicted = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    for _ in 0..50 {
                        if let Some(_b) = t.busy() {
                            assert!(!evicted.load(Ordering::Acquire), "evicted while read");
                            assert!(storage.get(&id).is_some());
                        }
                        if let Ok(_w) = t.claim(0) {
                            assert!(!evicted.load(Ordering::Acquire), "evicted while claimed");
                            assert!(storage.get(&id).is_some());
                        }
                    }
                });
                sc.spawn(|| {
                    while !storage.evict(&id).expect("evict") {
                        std::hint::spin_loop();
                    }
                    evicted.store(true, Ordering::Release);
                });
            });
            assert!(t.is_retired() && storage.get(&id).is_none());
        }
    }

    #[test]
    fn bitmap_and_completion() {
        let (_d, s) = store(3 * 16384, 16384);
        for n in [2u32, 0, 1] {
            let data = vec![n as u8; 16384];
            s.write_piece(n, &data, wire::piece_crc(&data)).expect("ok");
        }
        assert!(s.is_complete());
        assert_eq!(s.bitmap_bytes(), vec![0b111]);
        assert_eq!(s.completed_length(), 3 * 16384);
    }
}
