//! Pieces in the flow model: picking the rarest piece a parent has that a child lacks,
//! in-flight bookkeeping, and what happens when a transfer completes (the piece is held,
//! announced to the scheduler, and the connection starts its next piece).

use std::time::Instant;

use rand::Rng as _;
use wire::proto::scheduler::announce_peer_request::Request;
use wire::proto::scheduler::{PeerFinished, PieceFinished};

use super::{Sim, State, ORIGIN};
use crate::cpu;

impl Sim {
    /// Rarest piece `parent` has that `child` lacks and is not fetching; marks it in flight.
    fn pick(&mut self, child: usize, parent: u32) -> Option<u32> {
        let ph = if parent == ORIGIN {
            &self.full
        } else {
            &self.have[parent as usize]
        };
        let ch = &self.have[child];
        let fl = &self.inflight[child];
        let words = ph.0.len();
        let start = self.rng.random_range(0..words.max(1));
        let mut best: Option<(u32, u32)> = None;
        let mut seen = 0u32;
        for w in 0..words {
            let wi = (start + w) % words;
            let mut bits = ph.0[wi] & !ch.0[wi] & !fl.0[wi];
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let k = (wi as u32) * 64 + b;
                if self.p.random_pieces {
                    // Reservoir sampling: uniform over the candidates.
                    seen += 1;
                    if self.rng.random_range(0..seen) == 0 {
                        best = Some((0, k));
                    }
                    continue;
                }
                let r = self.rarity[k as usize];
                if best.is_none_or(|(br, _)| r < br) {
                    best = Some((r, k));
                }
            }
        }
        let (_, k) = best?;
        self.mark_in_flight(child, k);
        Some(k)
    }

    /// Piece `k` is now fetched by peer `i` (it counts towards the piece's rarity).
    pub(super) fn mark_in_flight(&mut self, i: usize, k: u32) {
        self.inflight[i].set(k, true);
        self.rarity[k as usize] += 1;
    }

    /// Peer `i` gave up fetching piece `k` (not received): no longer in flight, nor counted.
    pub(super) fn release(&mut self, i: usize, k: u32) {
        if self.inflight[i].get(k) {
            self.inflight[i].set(k, false);
            self.rarity[k as usize] -= 1;
        }
    }

    /// `conn` of `child` received its piece at `at`, after the parent spent `cost` seconds on
    /// it: stored, announced.
    pub(super) fn complete(&mut self, child: usize, conn: usize, at: f64, cost: f64) {
        let Some(c) = self.conns[child].get_mut(conn) else {
            return;
        };
        let Some(k) = c.piece.take() else {
            return;
        };
        let parent = c.parent;
        self.inflight[child].set(k, false);
        self.have[child].set(k, true);
        self.count[child] += 1;
        let length = self.piece_size(k);
        if parent == ORIGIN {
            self.origin_bytes += length;
        } else if parent as usize == self.n {
            self.seed_bytes += length;
        }
        let parent_host_id = if parent == ORIGIN {
            String::new()
        } else {
            self.hosts[parent as usize].id.clone()
        };
        let cost_us = (cost * 1e6).max(1.0) as u64;
        if self.first_announce.is_none() {
            self.first_announce = Some(Instant::now());
            self.sched_cpu_at_first_announce = self.scheduler_pid.and_then(cpu::process_cpu_s);
        }
        self.announcements += 1;
        self.send(
            child as u32,
            Request::PieceFinished(PieceFinished {
                number: k,
                crc32c: 0,
                length: length as u64,
                parent_host_id,
                cost_us,
                digest: Vec::new(),
            }),
        );
        if self.count[child] == self.pieces {
            self.done_at[child] = Some(at);
            self.state[child] = State::Done;
            self.send(
                child as u32,
                Request::Finished(PeerFinished {
                    content_length: self.p.size,
                }),
            );
        }
    }

    /// Starts `conn`'s next piece at `at`, if its parent has one for us.
    pub(super) fn start_next(&mut self, child: usize, conn: usize, at: f64) -> bool {
        if self.state[child] == State::Done {
            return false;
        }
        let parent = self.conns[child][conn].parent;
        match self.pick(child, parent) {
            Some(k) => {
                let size = self.piece_size(k);
                let c = &mut self.conns[child][conn];
                c.piece = Some(k);
                c.remaining = size;
                c.started = at;
                true
            }
            None => false,
        }
    }
}
