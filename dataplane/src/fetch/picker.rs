//! The piece picker of a [`Session`]: which piece to ask a parent for next (rarest first
//! over the parents' bitmaps, then endgame duplicates), and the bookkeeping behind it
//! (requests in flight per piece, how many parents have each piece). No I/O.

use super::Session;
use rand::Rng;
use std::time::{Duration, Instant};

/// Endgame starts when a download misses at most this many pieces (see
/// [`Session::pick_endgame`]): few enough that a duplicate request costs little, so the
/// last pieces do not wait on one slow or overloaded parent.
const ENDGAME_PIECES: u32 = 4;
/// A piece is asked for a second time only after it has been outstanding this long.
const ENDGAME_AGE: Duration = Duration::from_millis(300);

impl Session {
    /// Rarest piece this parent has that is neither stored nor in flight; marks it in flight.
    pub(super) fn pick(&self, parent_bits: &[bool]) -> Option<u32> {
        let mut st = self.state.borrow_mut();
        let n = parent_bits.len();
        if n == 0 {
            return None;
        }
        let start = rand::rng().random_range(0..n);
        let mut best: Option<(u32, usize)> = None;
        for i in 0..n {
            let k = (start + i) % n;
            if !parent_bits[k] || st.in_flight[k] > 0 || self.store.has(k as u32) {
                continue;
            }
            let a = st.availability[k];
            if best.is_none_or(|(ba, _)| a < ba) {
                best = Some((a, k));
                if a <= 1 {
                    break;
                }
            }
        }
        let (_, k) = best?;
        st.in_flight[k] = 1;
        st.requested_at[k] = Some(Instant::now());
        Some(k as u32)
    }

    /// Endgame: when a connection has nothing else to ask its parent for, and the download
    /// misses at most [`ENDGAME_PIECES`] pieces, a piece this parent has that has been
    /// outstanding at another parent for [`ENDGAME_AGE`] is asked for here too (one duplicate
    /// at most). Whichever copy arrives first is stored. Marks it in flight again.
    pub(super) fn pick_endgame(&self, parent_bits: &[bool], now: Instant) -> Option<u32> {
        let layout = self.store.layout();
        let missing = layout.piece_count() - self.store.finished_count();
        if missing > ENDGAME_PIECES {
            return None;
        }
        let mut st = self.state.borrow_mut();
        let mut best: Option<(Instant, usize)> = None;
        for (k, has) in parent_bits.iter().enumerate() {
            if !*has || st.in_flight[k] != 1 || self.store.has(k as u32) {
                continue;
            }
            let Some(at) = st.requested_at[k] else {
                continue;
            };
            if now.saturating_duration_since(at) >= ENDGAME_AGE && best.is_none_or(|(b, _)| at < b)
            {
                best = Some((at, k));
            }
        }
        let (_, k) = best?;
        st.in_flight[k] = 2;
        Some(k as u32)
    }

    pub(super) fn release(&self, n: u32) {
        {
            let mut st = self.state.borrow_mut();
            if let Some(f) = st.in_flight.get_mut(n as usize) {
                *f = f.saturating_sub(1);
                if *f == 0 {
                    st.requested_at[n as usize] = None;
                }
            }
        }
        self.changed.notify(usize::MAX);
    }

    pub(super) fn learn(&self, n: usize, has: bool) {
        let mut st = self.state.borrow_mut();
        if let Some(a) = st.availability.get_mut(n) {
            if has {
                *a += 1;
            } else {
                *a = a.saturating_sub(1);
            }
        }
    }
}
