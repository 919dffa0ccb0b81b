//! Trusted piece digests: the BLAKE3 digest of each piece as the scheduler hands it out (or
//! as computed from origin bytes), whether a task requires them, and
//! [`TaskStore::commit_verified`], where a piece from a parent is checked against its digest
//! before it becomes visible.

use super::{StoreError, TaskStore};
use std::sync::atomic::Ordering;
use wire::PieceDigest;

impl TaskStore {
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

    /// Records the trusted crc32c of piece `n`, from the same source as its trusted digest
    /// (call only after [`TaskStore::set_digest`] accepted that digest). The first one
    /// stays. A piece from a parent whose announced crc differs is refused unread; one whose
    /// crc matches is not crc-summed again (its digest is checked).
    pub fn set_trusted_crc(&self, n: u32, crc: u32) {
        if let Some(slot) = self.trusted_crcs.get(n as usize) {
            let _ = slot.set(crc);
        }
    }

    /// The trusted crc32c of piece `n`, when known (its trusted digest is known then too).
    pub fn trusted_crc(&self, n: u32) -> Option<u32> {
        self.trusted_crcs
            .get(n as usize)
            .and_then(|c| c.get().copied())
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

    /// Every piece's stored crc32c in order (4 bytes little-endian each), when all are
    /// stored: sent with [`TaskStore::all_digests`] when this host announces the task.
    pub fn all_crcs(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(self.crcs.len() * wire::PIECE_CRC_LEN);
        for n in 0..self.layout().piece_count() {
            out.extend_from_slice(&self.piece_crc(n)?.to_le_bytes());
        }
        Some(out)
    }

    /// What this host announces for the task it holds: every piece's trusted digest with
    /// every stored crc32c (empty when not all are stored); `None` unless every digest is
    /// known.
    pub fn digests_and_crcs(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        let digests = self.all_digests()?;
        Some((digests, self.all_crcs().unwrap_or_default()))
    }

    /// A listener that fires the next time a trusted digest becomes known.
    pub fn listen_digests(&self) -> event_listener::EventListener {
        self.digests_changed.listen()
    }

    /// Marks piece `n` as stored with crc32c `crc` after the claim holder wrote bytes whose
    /// BLAKE3 digest is `got` at the piece's offset (and checked them against `crc`): when
    /// digests are required, only if `got` is the piece's trusted digest
    /// ([`PieceWriter::finish`](super::PieceWriter::finish)). This is the one place where
    /// a piece from a parent becomes visible (served, counted); bytes that fail here stay
    /// unmarked, so they are never served and are overwritten by the next copy. Returns
    /// whether the piece was new.
    pub(super) fn commit_verified(
        &self,
        n: u32,
        crc: u32,
        got: Option<PieceDigest>,
    ) -> Result<bool, StoreError> {
        let expected = self.piece_digest(n);
        if self.digests_required() && (expected.is_none() || got.is_none()) {
            return Err(StoreError::DigestUnknown(n));
        }
        // Required, or not required but known: never store bytes that contradict it.
        if let (Some(expected), Some(got)) = (expected, got) {
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
}
