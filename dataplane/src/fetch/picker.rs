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
    /// Rarest piece this parent has that is neither stored nor in flight; marks it in flight,
    /// requested at `now`.
    pub(super) fn pick(&self, parent_bits: &[bool], now: Instant) -> Option<u32> {
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
        st.requested_at[k] = Some(now);
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

#[cfg(test)]
pub(super) mod tests {
    //! The picker's rules on a real [`Session`] over a real [`TaskStore`] in a temp dir (no
    //! sockets, no connection tasks): the parents' bitmaps are fed through
    //! [`Session::learn`] as the connections do, and "now" is passed in for the endgame.

    use super::*;
    use crate::bridge::Bridge;
    use crate::counters::Counters;
    use crate::fetch::{FetchConfig, FetchEnv};
    use crate::shaper::{Shaping, ShapingConfig};
    use crate::storage::TaskStore;
    use std::rc::Rc;
    use std::sync::Arc;
    use wire::{PieceLayout, TaskId};

    /// Piece length of the test sessions.
    pub(in crate::fetch) const PLEN: u64 = 16384;

    /// A session over a fresh store of `pieces` pieces of [`PLEN`] bytes, none stored.
    pub(in crate::fetch) fn session(pieces: u32) -> (tempfile::TempDir, Rc<Session>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PieceLayout::new(u64::from(pieces) * PLEN, PLEN).expect("layout");
        let store = TaskStore::create(dir.path(), TaskId([5; 32]), layout).expect("create");
        let env = FetchEnv {
            bridge: Arc::new(Bridge::new(1, 16)),
            counters: Arc::new(Counters::default()),
            cfg: FetchConfig::default(),
            shaping: Arc::new(Shaping::new(ShapingConfig::default())),
            quic: None,
            hasher: None,
        };
        (dir, Session::new(Arc::new(store), env, 0))
    }

    /// Stores piece `n` (as if it had been fetched and committed).
    pub(in crate::fetch) fn store_piece(s: &Session, n: u32) {
        let data = vec![n as u8; PLEN as usize];
        assert!(s
            .store
            .write_piece(n, &data, wire::piece_crc(&data))
            .expect("write"));
    }

    /// Tells the session that a parent has the pieces marked in `bits` (as a bitmap answer
    /// does).
    pub(in crate::fetch) fn learn_bits(s: &Session, bits: &[bool]) {
        for (n, has) in bits.iter().enumerate() {
            if *has {
                s.learn(n, true);
            }
        }
    }

    fn in_flight(s: &Session, n: u32) -> u8 {
        s.state.borrow().in_flight[n as usize]
    }

    /// Rarest first: of the pieces this parent has, the one fewest parents have is picked,
    /// whatever the random starting point of the scan (a rarer piece the parent lacks is not).
    #[test]
    fn pick_takes_the_rarest_piece_the_parent_has() {
        let (_d, s) = session(5);
        let all = [true; 5];
        learn_bits(&s, &all);
        learn_bits(&s, &all);
        learn_bits(&s, &[true, false, true, true, true]);
        // Piece 4 is rarer still: only one parent has it.
        s.learn(4, false);
        s.learn(4, false);
        assert_eq!(s.state.borrow().availability, [3, 2, 3, 3, 1]);
        let parent = [true, true, true, true, false];
        for _ in 0..64 {
            assert_eq!(s.pick(&parent, Instant::now()), Some(1));
            s.release(1);
        }
        // A parent that has piece 4 gets it.
        assert_eq!(s.pick(&all, Instant::now()), Some(4));
    }

    /// Ties are broken by the random start, so all equally rare pieces come up: the picker
    /// does not hand every parent the same piece first.
    #[test]
    fn pick_breaks_ties_among_equally_rare_pieces() {
        let (_d, s) = session(4);
        let all = [true; 4];
        learn_bits(&s, &all);
        learn_bits(&s, &all);
        let mut seen = [false; 4];
        for _ in 0..400 {
            let n = s.pick(&all, Instant::now()).expect("a piece");
            seen[n as usize] = true;
            s.release(n);
        }
        assert_eq!(
            seen, [true; 4],
            "every tied piece is picked first sometimes"
        );
    }

    /// Outside the endgame a piece is in flight from one parent at a time: once picked it is
    /// not picked again (for this or another parent), nor is a stored piece, nor one the
    /// parent lacks; picking marks it in flight with the time of the request.
    #[test]
    fn pick_never_hands_out_a_piece_twice_nor_a_stored_one() {
        let (_d, s) = session(6);
        let all = [true; 6];
        learn_bits(&s, &all);
        store_piece(&s, 2);
        let mut picked = Vec::new();
        while let Some(n) = s.pick(&all, Instant::now()) {
            assert_eq!(in_flight(&s, n), 1);
            assert!(s.state.borrow().requested_at[n as usize].is_some());
            picked.push(n);
            assert!(picked.len() <= 5, "picked {picked:?}");
        }
        picked.sort_unstable();
        assert_eq!(picked, [0, 1, 3, 4, 5]);
        assert_eq!(
            s.pick(&all, Instant::now()),
            None,
            "a second parent gets nothing either"
        );
        assert_eq!(s.pick(&[], Instant::now()), None);
        let (_d2, s2) = session(3);
        learn_bits(&s2, &[true, false, true]);
        let parent = [false, false, true];
        assert_eq!(s2.pick(&parent, Instant::now()), Some(2));
        assert_eq!(
            s2.pick(&parent, Instant::now()),
            None,
            "the parent lacks pieces 0 and 1"
        );
    }

    /// Releasing a piece (its parent failed, refused it, or the piece was dropped) makes it
    /// pickable again and forgets when it was requested.
    #[test]
    fn release_makes_a_piece_pickable_again() {
        let (_d, s) = session(2);
        let all = [true; 2];
        learn_bits(&s, &all);
        let a = s.pick(&all, Instant::now()).expect("first");
        let b = s.pick(&all, Instant::now()).expect("second");
        assert_eq!(s.pick(&all, Instant::now()), None);
        s.release(b);
        assert_eq!(in_flight(&s, b), 0);
        assert!(s.state.borrow().requested_at[b as usize].is_none());
        assert_eq!(s.pick(&all, Instant::now()), Some(b));
        assert_eq!(in_flight(&s, a), 1);
        // Releasing what is not in flight, or is out of range, changes nothing.
        s.release(b);
        s.release(b);
        assert_eq!(in_flight(&s, b), 0);
        s.release(99);
    }

    /// `learn` counts the parents that have each piece and unlearning takes one off (never
    /// below zero); the counts steer the next pick.
    #[test]
    fn learn_and_unlearn_change_availability() {
        let (_d, s) = session(3);
        let all = [true; 3];
        learn_bits(&s, &all);
        learn_bits(&s, &[true, false, true]);
        learn_bits(&s, &[true, false, false]);
        assert_eq!(s.state.borrow().availability, [3, 1, 2]);
        assert_eq!(s.pick(&all, Instant::now()), Some(1));
        s.release(1);
        // Two parents that had piece 0 go: it becomes the rarest.
        s.learn(0, false);
        s.learn(0, false);
        assert_eq!(s.state.borrow().availability, [1, 1, 2]);
        s.learn(1, true);
        assert_eq!(s.pick(&all, Instant::now()), Some(0));
        s.learn(2, false);
        s.learn(2, false);
        s.learn(2, false);
        assert_eq!(s.state.borrow().availability, [1, 2, 0], "never below zero");
        s.learn(7, true);
        s.learn(7, false);
        assert_eq!(
            s.state.borrow().availability,
            [1, 2, 0],
            "out of range: ignored"
        );
    }

    /// Endgame begins only when at most [`ENDGAME_PIECES`] pieces are missing.
    #[test]
    fn endgame_starts_when_few_pieces_are_missing() {
        let n = ENDGAME_PIECES + 2;
        let (_d, s) = session(n);
        let all = vec![true; n as usize];
        learn_bits(&s, &all);
        // Piece 0 stays in flight at another parent; every other piece is stored, one by one.
        assert_eq!(s.pick(&[true], Instant::now()), Some(0));
        let later = Instant::now() + 10 * ENDGAME_AGE;
        for k in 1..n {
            let missing = n - k + 1;
            assert_eq!(
                s.pick_endgame(&all, later),
                None,
                "{missing} missing is not the endgame"
            );
            store_piece(&s, k);
            if missing - 1 <= ENDGAME_PIECES {
                break;
            }
        }
        assert!(n - s.store.finished_count() <= ENDGAME_PIECES);
        assert_eq!(s.pick_endgame(&all, later), Some(0));
        assert_eq!(in_flight(&s, 0), 2);
    }

    /// In the endgame a piece is duplicated only after it has been outstanding for
    /// [`ENDGAME_AGE`], the oldest request first, at most once, only at a parent that has it,
    /// and never a stored piece.
    #[test]
    fn endgame_duplicates_the_oldest_request_once() {
        let (_d, s) = session(4);
        let all = [true; 4];
        learn_bits(&s, &all);
        let t0 = Instant::now();
        for _ in 0..4 {
            s.pick(&all, Instant::now()).expect("pick");
        }
        {
            let mut st = s.state.borrow_mut();
            st.requested_at[0] = Some(t0 + Duration::from_millis(30));
            st.requested_at[1] = Some(t0 + Duration::from_millis(10));
            st.requested_at[2] = Some(t0 + Duration::from_millis(20));
            st.requested_at[3] = Some(t0);
        }
        // Piece 3 is the oldest, but stored meanwhile (the other copy arrived).
        store_piece(&s, 3);
        let young = t0 + Duration::from_millis(10) + ENDGAME_AGE - Duration::from_millis(1);
        assert_eq!(
            s.pick_endgame(&all, young),
            None,
            "nothing is old enough yet"
        );
        // Pieces 1 and 2 are old enough now (2 exactly), piece 0 not yet: oldest first.
        let now = t0 + Duration::from_millis(20) + ENDGAME_AGE;
        assert_eq!(
            s.pick_endgame(&all, now),
            Some(1),
            "the oldest request first"
        );
        assert_eq!(s.pick_endgame(&all, now), Some(2), "exactly old enough");
        assert_eq!(s.pick_endgame(&all, now), None, "piece 0 is too young");
        let later = t0 + 10 * ENDGAME_AGE;
        assert_eq!(
            s.pick_endgame(&[false, true, true, true], later),
            None,
            "a parent without piece 0 gets nothing"
        );
        assert_eq!(s.pick_endgame(&all, later), Some(0));
        assert_eq!(s.pick_endgame(&all, later), None, "one duplicate per piece");
        assert_eq!([0, 1, 2].map(|n| in_flight(&s, n)), [2, 2, 2]);
        // The regular picker still hands out nothing: all is in flight or stored.
        assert_eq!(s.pick(&all, Instant::now()), None);
    }

    /// When one copy of a duplicated piece is released the other is still outstanding: the
    /// piece stays in flight (not picked again) with its first request time, until the
    /// second release.
    #[test]
    fn releasing_one_endgame_copy_keeps_the_piece_in_flight() {
        let (_d, s) = session(1);
        let all = [true];
        learn_bits(&s, &all);
        assert_eq!(s.pick(&all, Instant::now()), Some(0));
        let at = s.state.borrow().requested_at[0];
        assert_eq!(s.pick_endgame(&all, Instant::now() + ENDGAME_AGE), Some(0));
        s.release(0);
        assert_eq!(in_flight(&s, 0), 1);
        assert_eq!(s.state.borrow().requested_at[0], at);
        assert_eq!(s.pick(&all, Instant::now()), None);
        s.release(0);
        assert_eq!(s.pick(&all, Instant::now()), Some(0));
    }
}
