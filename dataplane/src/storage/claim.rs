//! The piece claim: the exclusive right to write one piece ([`PieceWriter`], one bit per
//! piece in `TaskStore::claims`) and the task's users ([`Busy`] guards and writers, one
//! atomic word with the [`RETIRED`] bit), which garbage collection retires in one step.

use super::{StoreError, TaskStore};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wire::PieceDigest;

/// [`TaskStore::users`] bit: evicted or removed; no new use or claim.
pub(super) const RETIRED: u32 = 1 << 31;

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

/// Marks a task in use while it lives (see [`TaskStore::busy`]).
#[derive(Debug)]
pub struct Busy<'a>(&'a TaskStore);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// [`Busy`] that owns a handle of its task, for a user that keeps it across awaits or moves
/// it between threads (see [`TaskStore::busy_owned`]).
#[derive(Debug)]
pub struct OwnedBusy(Arc<TaskStore>);

impl OwnedBusy {
    /// The task kept in use.
    pub fn store(&self) -> &Arc<TaskStore> {
        &self.0
    }
}

impl Drop for OwnedBusy {
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
    /// Running crc32c of the bytes written.
    crc: u32,
    /// The piece's trusted crc32c, when the caller said so ([`PieceWriter::crc_known`]):
    /// then no crc is computed while writing.
    crc_known: Option<u32>,
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

    /// The crc32c of the bytes written so far (the trusted one after
    /// [`PieceWriter::crc_known`]).
    pub fn crc(&self) -> u32 {
        self.crc_known.unwrap_or(self.crc)
    }

    /// The piece's crc32c is `crc`, the trusted one of the piece, and its bytes are checked
    /// against their trusted digest: no crc is computed while writing (call before the first
    /// write); [`PieceWriter::finish`] then requires the digest and commits `crc`.
    pub fn crc_known(&mut self, crc: u32) {
        self.crc_known = Some(crc);
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
            if self.crc_known.is_none() {
                self.crc = wire::piece_crc_append(self.crc, p);
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
        if self.crc() != crc {
            return Err(StoreError::Digest {
                number: self.n,
                expected: crc,
                got: self.crc(),
            });
        }
        Ok(())
    }

    /// Commits bytes from a parent: the whole piece written, its crc32c `crc`, and its BLAKE3
    /// digest `got` (computed by the caller, e.g. off the receiving thread) checked as
    /// [`TaskStore::commit_verified`] does. Returns whether the
    /// piece was new.
    /// After [`PieceWriter::crc_known`] the bytes were not crc-summed: the digest is then
    /// required (`got` and the trusted one), whatever the task requires.
    pub fn finish(self, crc: u32, got: Option<PieceDigest>) -> Result<bool, StoreError> {
        self.check(crc)?;
        if self.crc_known.is_some() && (got.is_none() || self.store.piece_digest(self.n).is_none())
        {
            return Err(StoreError::DigestUnknown(self.n));
        }
        self.store.commit_verified(self.n, crc, got)
    }

    /// Commits bytes from a trusted place (the origin, an imported file): their digest
    /// (computed while writing, [`PieceWriter::hash_here`]) becomes the piece's trusted
    /// digest; a different trusted digest already known (the origin changed under the task)
    /// stores nothing. `crc`: the expected crc32c, when the caller has one. Returns whether
    /// the piece was new.
    pub fn finish_trusted(self, crc: Option<u32>) -> Result<bool, StoreError> {
        let own = self.crc();
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
    /// Marks the task in use (and used now) until the guard is dropped: garbage collection
    /// never evicts a task in use ([`Storage::evict`](super::Storage::evict)). `None` when it was evicted or
    /// removed already (its file is gone from the directory).
    #[must_use]
    pub fn busy(&self) -> Option<Busy<'_>> {
        if !self.enter() {
            return None;
        }
        self.touch();
        Some(Busy(self))
    }

    /// [`TaskStore::busy`] as a guard that holds its own handle of the task.
    #[must_use]
    pub fn busy_owned(self: &Arc<Self>) -> Option<OwnedBusy> {
        if !self.enter() {
            return None;
        }
        self.touch();
        Some(OwnedBusy(self.clone()))
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
    pub(super) fn enter(&self) -> bool {
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

    pub(super) fn leave(&self) {
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
    pub(super) fn retire_now(&self) {
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
            crc: 0,
            crc_known: None,
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
}
