//! Trusted per-piece digests of a task: recorded from the peers that fetched pieces from the
//! origin (or imported the file), handed to the task's other peers, which check every piece
//! from a parent against them.
//!
//! Distribution is a flat list, not a Merkle tree: for a 1 GiB task in 1 MiB pieces the
//! list is 32 KiB per peer, once; a Merkle root would need a 320-byte proof sent with each
//! piece (10 levels x 32 bytes), 320 KiB per peer in all (tuning.md, "Piece digests").
//! A peer's first `CandidateParents` carries every digest known; digests reported later
//! are batched per task and pushed as `PieceDigests` by [`super::SchedulerState::flush_digests`]
//! (the service calls it every few milliseconds, and it runs at once when a batch is full or
//! a source peer finishes), so 10,000 peers x 1,024 pieces is a few dozen messages per peer,
//! not one per piece.

use super::{announce_peer_response, peer_response, Output, SchedulerState};
use wire::proto::scheduler::PieceDigests;
use wire::PieceDigest;

impl SchedulerState {
    /// Pushes the digests recorded since the last push to the peers of every task that has
    /// some (one `PieceDigests` per peer and task). Cheap when there are none.
    pub fn flush_digests(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        if self.digests_dirty.is_empty() {
            return out;
        }
        let dirty: Vec<String> = self.digests_dirty.drain().collect();
        for task_id in dirty {
            self.push_digests(&task_id, &mut out);
        }
        out
    }

    /// Pushes `task_id`'s unsent digests to its peers that got the earlier ones and still
    /// download.
    pub(super) fn push_digests(&mut self, task_id: &str, out: &mut Vec<Output>) {
        self.digests_dirty.remove(task_id);
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        let Some(batch) = task.digests.take_unsent() else {
            return;
        };
        // A peer that has had no digests yet (its parents came while the task had no trusted
        // source, e.g. right after a scheduler restart, before the source registered again)
        // gets every digest known, not just this batch: it may already require them.
        let mut snapshot = None;
        for k in task.peers.iter() {
            let Some(p) = self.peers.get_mut(k) else {
                continue;
            };
            if p.done || p.source {
                continue;
            }
            let digests = if p.digests_synced {
                batch.clone()
            } else if task.digests.trusted {
                p.digests_synced = true;
                snapshot
                    .get_or_insert_with(|| task.digests.snapshot())
                    .clone()
            } else {
                continue;
            };
            out.push(Output::Peer {
                peer: *k,
                response: peer_response(announce_peer_response::Response::PieceDigests(digests)),
            });
        }
    }
}

/// One `PieceDigests` message for `entries`; its crcs only when every entry has one (the
/// field is all or nothing).
fn message<'a>(
    entries: impl Iterator<Item = (u32, &'a (PieceDigest, Option<u32>))>,
) -> PieceDigests {
    let mut m = PieceDigests::default();
    let mut all_crcs = true;
    for (n, (d, c)) in entries {
        m.numbers.push(n);
        m.digests.extend_from_slice(d);
        match c {
            Some(c) if all_crcs => m.crcs.extend_from_slice(&c.to_le_bytes()),
            _ => all_crcs = false,
        }
    }
    if !all_crcs {
        m.crcs.clear();
    }
    m
}

/// Digests pushed at once when this many are waiting (before the next periodic flush).
pub const DIGEST_BATCH: usize = 64;

/// What recording a reported digest did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// First digest of the piece.
    New,
    /// The same digest was known.
    Same,
    /// Another digest was known: the first one stays.
    Conflict,
}

/// The digests of one task.
#[derive(Debug, Default)]
pub(crate) struct TaskDigests {
    /// A trusted source (a peer fetching from the origin, an import with digests) serves the
    /// task: its peers are told to require digests.
    pub(crate) trusted: bool,
    /// Each piece's digest, with its crc32c when the source gave it.
    known: Vec<Option<(PieceDigest, Option<u32>)>>,
    /// Recorded and not pushed to the task's peers yet.
    unsent: Vec<u32>,
    /// Conflicting reports seen (logged).
    pub(crate) conflicts: u64,
    /// The digests came from a normal host's import while no origin was known; dropped when
    /// a registration brings the task's origin.
    pub(crate) from_import: bool,
}

impl TaskDigests {
    /// Records the digest of piece `n` (below `bound`, the task's piece bound), with its
    /// crc32c when the source gave it. The crc goes with the digest: a crc reported with the
    /// same digest fills a missing one, a different digest changes nothing.
    pub(crate) fn record(
        &mut self,
        n: u32,
        digest: &[u8],
        crc: Option<u32>,
        bound: u32,
    ) -> Option<Recorded> {
        let d = PieceDigest::try_from(digest).ok()?;
        if n >= bound {
            return None;
        }
        let i = n as usize;
        if self.known.len() <= i {
            self.known.resize(i + 1, None);
        }
        match self.known.get_mut(i)? {
            Some((k, c)) if *k == d => {
                if c.is_none() {
                    *c = crc;
                }
                Some(Recorded::Same)
            }
            Some(_) => {
                self.conflicts += 1;
                Some(Recorded::Conflict)
            }
            slot @ None => {
                *slot = Some((d, crc));
                self.unsent.push(n);
                Some(Recorded::New)
            }
        }
    }

    /// Number of digests waiting to be pushed.
    pub(crate) fn unsent(&self) -> usize {
        self.unsent.len()
    }

    /// Every digest known.
    pub(crate) fn snapshot(&self) -> PieceDigests {
        let entries = self
            .known
            .iter()
            .enumerate()
            .filter_map(|(n, k)| Some((u32::try_from(n).ok()?, k.as_ref()?)));
        message(entries)
    }

    /// The digests recorded since the last call, as one message.
    pub(crate) fn take_unsent(&mut self) -> Option<PieceDigests> {
        if self.unsent.is_empty() {
            return None;
        }
        let numbers = std::mem::take(&mut self.unsent);
        let known = &self.known;
        let entries = numbers
            .iter()
            .filter_map(|n| Some((*n, known.get(*n as usize)?.as_ref()?)));
        Some(message(entries))
    }

    /// Drops digests of pieces numbered `count` or more (the task's size became known).
    pub(crate) fn truncate(&mut self, count: u32) {
        self.known.truncate(count as usize);
        self.unsent.retain(|n| *n < count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_digest_wins_and_batches_are_taken_once() {
        let mut t = TaskDigests::default();
        let (a, b) = (wire::piece_digest(b"a"), wire::piece_digest(b"b"));
        assert_eq!(t.record(3, &a, None, 10), Some(Recorded::New));
        assert_eq!(t.record(3, &a, Some(33), 10), Some(Recorded::Same));
        assert_eq!(t.record(3, &b, Some(99), 10), Some(Recorded::Conflict));
        assert_eq!(t.record(10, &b, None, 10), None, "out of range");
        assert_eq!(t.record(4, &b[..5], None, 10), None, "short digest");
        assert_eq!(t.record(1, &b, Some(11), 10), Some(Recorded::New));
        assert_eq!(t.conflicts, 1);
        let m = t.take_unsent().expect("batch");
        assert_eq!(m.numbers, vec![3, 1]);
        assert_eq!(m.digests, [a, b].concat());
        assert_eq!(m.crcs, [33u32.to_le_bytes(), 11u32.to_le_bytes()].concat());
        assert!(t.take_unsent().is_none());
        let s = t.snapshot();
        assert_eq!(s.numbers, vec![1, 3]);
        assert_eq!(s.digests, [b, a].concat());
        assert_eq!(s.crcs, [11u32.to_le_bytes(), 33u32.to_le_bytes()].concat());
        assert_eq!(t.record(5, &a, None, 10), Some(Recorded::New));
        assert!(
            t.snapshot().crcs.is_empty(),
            "one piece without a crc: none sent"
        );
    }
}
