//! Super-seeding: how a parent whose uplink is the swarm's bottleneck spends it.
//!
//! A seed peer usually sits on the same NIC class as every other host. If it answers every
//! child's requests as they come, its children all ask for the newest pieces, and the seed
//! sends the same piece to many children before any of them can trade it: the swarm waits
//! on the seed's uplink, and the seed's children finish last (`../shared/LAB-NOTES.md`).
//!
//! [`SuperSeed`] is the seed's plan, without I/O or clock reads (the caller passes `now`),
//! in the spirit of BitTorrent's super-seeding. Each child connection sees, in the bitmap the
//! seed sends it, only the pieces *assigned* to it: pieces that the seed has stored and never
//! sent to anyone, at most [`FIRST_COPIES_PER_CHILD`] at a time. So every piece leaves the
//! seed once, to one child, which then serves it to the others at its own uplink rate. An
//! assignment a child does not request within [`ASSIGNMENT_TTL`] goes back to the pool.
//! Only when the seed holds the whole task and every piece has gone out once does it show
//! every child everything (its uplink then serves what children still ask for: the second
//! copies, which are welcome when the seed's uplink is larger than a peer's).
//!
//! Call order, per child connection: [`SuperSeed::open`] once, then [`SuperSeed::reveal`]
//! for every bitmap request (and [`SuperSeed::bitmap`] for the answer), then
//! [`SuperSeed::sending`] / [`SuperSeed::sent`] around every piece sent, and
//! [`SuperSeed::close`] when the connection ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use wire::TaskId;

/// Pieces assigned to one child and not yet sent in full, at most. Two keep a child's link
/// busy across the request turnaround (the next piece is queued while one is on the wire);
/// more would split the seed's uplink over pieces that nobody can forward yet.
pub const FIRST_COPIES_PER_CHILD: usize = 2;

/// An assigned piece that its child has not requested within this time is assigned again
/// (the child may have left, or be busy with other parents).
pub const ASSIGNMENT_TTL: Duration = Duration::from_secs(2);

/// Default of the second and later copies the seed sends at once ([`Seeding::new`]); more requests for them are
/// answered `Busy` (the child asks another parent, or again shortly). Pieces that went out
/// once are on their way through the swarm: a seed that served every request for them at
/// once would share its uplink over dozens of children, and each of those pieces would take
/// seconds to arrive, parked at the seed while peers could send it sooner (lab, 20 hosts:
/// the last pieces waited 2.4–4.5 s on the seed).
/// A seed whose uplink is many times a peer's can send more at once without slowing each
/// (`seed_peer.copy_slots`).
pub const COPY_SLOTS: u32 = 4;

/// Plans of tasks without a child connection that a [`Seeding`] keeps (a plan costs a few
/// dozen bytes per piece).
pub const IDLE_PLANS: usize = 256;

/// Names one child connection of a [`SuperSeed`].
pub type ChildId = u64;

/// How the seed answers one piece request ([`SuperSeed::sending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it: no copy of the piece has left the seed yet.
    First,
    /// Send it: a later copy, within the copy slots.
    Copy,
    /// Answer `Busy`: as many later copies as there are copy slots are on the wire already.
    Busy,
}

#[derive(Debug, Default)]
struct Child {
    /// Pieces shown to this child (its bitmap, as a set).
    revealed: Vec<bool>,
    /// Number of `true`s in `revealed`.
    revealed_count: u32,
    /// Pieces assigned to this child as first copies and not yet sent in full.
    owed: Vec<u32>,
    /// Assignments of this child that expired unrequested.
    declined: u32,
}

impl Child {
    /// A child that let [`FIRST_COPIES_PER_CHILD`] assignments expire unrequested holds
    /// (or gets elsewhere) the pieces the plan picks for it, lowest first: it came with
    /// pieces of its own, e.g. re-parented to this seed after its first seed died. Shown
    /// only those, it would never ask for anything (its long polls answered with pieces it
    /// has, no byte moving, until the daemon's stall watchdog sent it to the origin: the
    /// flaky `a_seed_killed_mid_transfer_is_replaced_and_the_download_finishes`). It is
    /// shown every stored piece instead and asks for what it lacks.
    fn sees_everything(&self) -> bool {
        self.declined >= FIRST_COPIES_PER_CHILD as u32
    }
}

/// The seed's plan for one task: which pieces each child may see and ask for.
#[derive(Debug)]
pub struct SuperSeed {
    /// Copies of each piece started (and not failed).
    copies: Vec<u32>,
    /// Pieces never sent, and to whom each is assigned (with when), if to anyone.
    assigned: Vec<Option<(ChildId, Instant)>>,
    /// Pieces with no copy yet.
    unsent: u32,
    /// Later copies ([`Admit::Copy`]) being sent.
    copies_in_flight: u32,
    /// Most later copies sent at once.
    copy_slots: u32,
    children: HashMap<ChildId, Child>,
    next_id: ChildId,
}

impl SuperSeed {
    /// A plan for a task of `piece_count` pieces, none sent yet, that sends at most
    /// `copy_slots` (at least 1) second or later copies at once.
    pub fn new(piece_count: u32, copy_slots: u32) -> Self {
        let n = piece_count as usize;
        Self {
            copies: vec![0; n],
            assigned: vec![None; n],
            unsent: piece_count,
            copies_in_flight: 0,
            copy_slots: copy_slots.max(1),
            children: HashMap::new(),
            next_id: 0,
        }
    }

    /// A new child connection.
    pub fn open(&mut self) -> ChildId {
        let id = self.next_id;
        self.next_id += 1;
        self.children.insert(
            id,
            Child {
                revealed: vec![false; self.copies.len()],
                ..Child::default()
            },
        );
        id
    }

    /// The child connection ended: its unrequested assignments go back to the pool.
    pub fn close(&mut self, child: ChildId) {
        if let Some(c) = self.children.remove(&child) {
            for n in c.owed {
                if let Some(slot) = self.assigned.get_mut(n as usize) {
                    if slot.is_some_and(|(owner, _)| owner == child) {
                        *slot = None;
                    }
                }
            }
        }
    }

    /// Pieces of the task.
    pub fn piece_count(&self) -> u32 {
        self.copies.len() as u32
    }

    /// Child connections open.
    pub fn children(&self) -> usize {
        self.children.len()
    }

    /// Whether the seed shows everything: it holds the whole task (`complete`) and every
    /// piece has gone out at least once.
    pub fn everything_shown(&self, complete: bool) -> bool {
        complete && self.unsent == 0
    }

    /// Pieces sent at least once.
    pub fn sent_pieces(&self) -> u32 {
        self.piece_count() - self.unsent
    }

    /// Copies of piece `n` sent so far.
    pub fn copies(&self, n: u32) -> u32 {
        self.copies.get(n as usize).copied().unwrap_or(0)
    }

    /// Updates what `child` may see, given which pieces the seed holds (`stored`) and whether
    /// it holds them all (`complete`); returns how many pieces the child sees. Assigns the
    /// child never-sent stored pieces (lowest number first, the order they came from the
    /// origin) until it owes [`FIRST_COPIES_PER_CHILD`]; expired assignments of any child
    /// are released first.
    pub fn reveal(
        &mut self,
        child: ChildId,
        now: Instant,
        complete: bool,
        stored: impl Fn(u32) -> bool,
    ) -> u32 {
        self.expire(now);
        let everything = self.everything_shown(complete);
        let Some(c) = self.children.get_mut(&child) else {
            return 0;
        };
        if everything || c.sees_everything() {
            for (n, seen) in c.revealed.iter_mut().enumerate() {
                if !*seen && stored(n as u32) {
                    *seen = true;
                    c.revealed_count += 1;
                }
            }
            return c.revealed_count;
        }
        let mut n = 0;
        while c.owed.len() < FIRST_COPIES_PER_CHILD && n < self.copies.len() {
            let free = self.copies[n] == 0 && self.assigned[n].is_none() && stored(n as u32);
            if free {
                self.assigned[n] = Some((child, now));
                c.owed.push(n as u32);
                if !c.revealed[n] {
                    c.revealed[n] = true;
                    c.revealed_count += 1;
                }
            }
            n += 1;
        }
        c.revealed_count
    }

    fn expire(&mut self, now: Instant) {
        for (n, slot) in self.assigned.iter_mut().enumerate() {
            let Some((owner, at)) = *slot else { continue };
            if now.saturating_duration_since(at) < ASSIGNMENT_TTL {
                continue;
            }
            *slot = None;
            if let Some(c) = self.children.get_mut(&owner) {
                c.owed.retain(|&k| k as usize != n);
                c.declined += 1;
            }
        }
    }

    /// The bitmap `child` sees (wire format: bit `n % 8` of byte `n / 8`).
    pub fn bitmap(&self, child: ChildId) -> Vec<u8> {
        let mut out = vec![0u8; wire::frame::bitmap_len(self.copies.len() as u32)];
        if let Some(c) = self.children.get(&child) {
            for (n, _) in c.revealed.iter().enumerate().filter(|(_, s)| **s) {
                out[n / 8] |= 1 << (n % 8);
            }
        }
        out
    }

    /// `child` asks for piece `n`: whether the seed sends it now. A send counts as one more
    /// copy until [`Self::sent`] says it was cut off. The first copy is always sent; a later
    /// one only within the copy slots.
    pub fn sending(&mut self, child: ChildId, n: u32) -> Admit {
        let Some(copies) = self.copies.get_mut(n as usize) else {
            return Admit::Busy;
        };
        let admit = if *copies == 0 {
            self.unsent -= 1;
            Admit::First
        } else if self.copies_in_flight < self.copy_slots {
            self.copies_in_flight += 1;
            Admit::Copy
        } else {
            return Admit::Busy;
        };
        *copies += 1;
        if let Some(slot) = self.assigned.get_mut(n as usize) {
            if slot.is_some_and(|(owner, _)| owner == child) {
                *slot = None;
            } else if let Some((owner, _)) = slot.take() {
                // Someone else got the first copy: the owner's assignment is void.
                if let Some(c) = self.children.get_mut(&owner) {
                    c.owed.retain(|&k| k != n);
                }
            }
        }
        admit
    }

    /// The send of piece `n` to `child`, admitted as `admit`, ended: `delivered` whole, or
    /// cut off (the copy does not count and the piece may be assigned again).
    pub fn sent(&mut self, child: ChildId, n: u32, admit: Admit, delivered: bool) {
        match admit {
            Admit::Busy => return,
            Admit::Copy => self.copies_in_flight = self.copies_in_flight.saturating_sub(1),
            Admit::First => {}
        }
        if let Some(c) = self.children.get_mut(&child) {
            c.owed.retain(|&k| k != n);
        }
        if delivered {
            return;
        }
        if let Some(copies) = self.copies.get_mut(n as usize) {
            if *copies > 0 {
                *copies -= 1;
                if *copies == 0 {
                    self.unsent += 1;
                }
            }
        }
    }
}

/// The super-seeding plans of the tasks one data plane serves, shared by its threads. A
/// plan exists while at least one child connection of its task is open.
#[derive(Debug)]
pub struct Seeding {
    plans: Mutex<HashMap<TaskId, Arc<SeedPlan>>>,
    copy_slots: u32,
}

/// One task's [`SuperSeed`] and the event its long polls wait on.
#[derive(Debug)]
pub struct SeedPlan {
    plan: Mutex<SuperSeed>,
    changed: event_listener::Event,
}

impl SeedPlan {
    /// Runs `f` on the plan (under its lock; a poisoned lock is taken as it is: the plan
    /// holds counters only, no invariant a panic could break halfway).
    pub fn with<R>(&self, f: impl FnOnce(&mut SuperSeed) -> R) -> R {
        let mut g = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g)
    }

    /// A listener that fires the next time a send ends (a child may be owed less, or the
    /// seed may now show everything).
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }

    /// Wakes the long polls of this task.
    pub fn notify(&self) {
        self.changed.notify(usize::MAX);
    }
}

impl Seeding {
    /// Plans whose seed sends at most `copy_slots` second or later copies of a task at once
    /// ([`COPY_SLOTS`] is the default).
    pub fn new(copy_slots: u32) -> Self {
        Self {
            plans: Mutex::new(HashMap::new()),
            copy_slots,
        }
    }

    /// Joins a new child connection to the plan of `task` (made for `piece_count` pieces if
    /// none exists). An existing plan of another piece count is replaced, and so is one that
    /// has sent more pieces than the seed now holds (`stored`): the task was removed and is
    /// being fetched again.
    pub fn join(&self, task: TaskId, piece_count: u32, stored: u32) -> (Arc<SeedPlan>, ChildId) {
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let plan = plans
            .entry(task)
            .and_modify(|p| {
                let stale = p.with(|s| s.piece_count() != piece_count || s.sent_pieces() > stored);
                if stale {
                    *p = Arc::new(SeedPlan::new(piece_count, self.copy_slots));
                }
            })
            .or_insert_with(|| Arc::new(SeedPlan::new(piece_count, self.copy_slots)))
            .clone();
        let child = plan.with(SuperSeed::open);
        (plan, child)
    }

    /// The child connection ended. The plan stays when its last child goes: a child that
    /// reconnects (or a new one) must not find every piece unsent again, or the seed sends
    /// first copies twice (seen under load: 48 first copies of 24 pieces). Plans without
    /// children are dropped only when more than [`IDLE_PLANS`] tasks have one.
    pub fn leave(&self, task: &TaskId, plan: &Arc<SeedPlan>, child: ChildId) {
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        plan.with(|s| s.close(child));
        plan.notify();
        if plans.len() > IDLE_PLANS {
            plans.retain(|t, p| t == task || p.with(|s| s.children()) > 0);
        }
    }

    /// Tasks with a plan (for tests and metrics).
    pub fn len(&self) -> usize {
        self.plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no task has a plan.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SeedPlan {
    fn new(piece_count: u32, copy_slots: u32) -> Self {
        Self {
            plan: Mutex::new(SuperSeed::new(piece_count, copy_slots)),
            changed: event_listener::Event::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's view: what it holds and what the seed showed it.
    struct Kid {
        id: ChildId,
        has: Vec<bool>,
    }

    fn shown(s: &SuperSeed, id: ChildId, n: u32) -> bool {
        s.bitmap(id)[n as usize / 8] & (1 << (n % 8)) != 0
    }

    /// Every child asks the seed for one shown piece it lacks per round, in turn; returns the
    /// order of the pieces the seed sent.
    fn run(seed: &mut SuperSeed, kids: &mut [Kid], stored: &[bool], rounds: usize) -> Vec<u32> {
        let complete = stored.iter().all(|s| *s);
        let now = Instant::now();
        let mut order = Vec::new();
        for _ in 0..rounds {
            for k in kids.iter_mut() {
                seed.reveal(k.id, now, complete, |n| stored[n as usize]);
                let want =
                    (0..stored.len() as u32).find(|&n| shown(seed, k.id, n) && !k.has[n as usize]);
                if let Some(n) = want {
                    let admit = seed.sending(k.id, n);
                    seed.sent(k.id, n, admit, true);
                    if admit != Admit::Busy {
                        k.has[n as usize] = true;
                        order.push(n);
                    }
                }
            }
        }
        order
    }

    fn kids(seed: &mut SuperSeed, count: usize, pieces: usize) -> Vec<Kid> {
        (0..count)
            .map(|_| Kid {
                id: seed.open(),
                has: vec![false; pieces],
            })
            .collect()
    }

    #[test]
    fn a_seed_with_three_children_sends_each_of_16_pieces_once_before_any_twice() {
        let mut seed = SuperSeed::new(16, COPY_SLOTS);
        let mut kids = kids(&mut seed, 3, 16);
        let order = run(&mut seed, &mut kids, &[true; 16], 20);
        assert!(
            order.len() > 16,
            "the seed goes on serving once all went out: {order:?}"
        );
        let mut first: Vec<u32> = order[..16].to_vec();
        first.sort_unstable();
        assert_eq!(first, (0..16).collect::<Vec<_>>(), "order {order:?}");
        // Each child was shown only its own pieces until then.
        assert!((0..16).all(|n| seed.copies(n) >= 1));
    }

    #[test]
    fn while_the_seed_is_still_downloading_no_piece_goes_out_twice() {
        let mut seed = SuperSeed::new(32, COPY_SLOTS);
        let mut kids = kids(&mut seed, 5, 32);
        let mut stored = vec![false; 32];
        let mut order = Vec::new();
        // The seed gets pieces from the origin one at a time (the last one stays missing).
        for n in 0..31 {
            stored[n] = true;
            order.extend(run(&mut seed, &mut kids, &stored, 3));
        }
        // Until the seed holds everything, each piece left once.
        let mut sorted = order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), order.len(), "a duplicate in {order:?}");
        assert_eq!(order.len(), 31);
        // A child is shown nothing it was not assigned.
        let shown_total: usize = kids
            .iter()
            .map(|k| (0..32).filter(|&n| shown(&seed, k.id, n)).count())
            .sum();
        assert_eq!(shown_total, 31);
        // The last piece arrives: it goes out once, then the seed shows everything.
        stored[31] = true;
        let order = run(&mut seed, &mut kids, &stored, 1);
        assert_eq!(order[0], 31, "the new piece first: {order:?}");
        assert!(seed.everything_shown(true));
    }

    #[test]
    fn a_child_owes_at_most_two_pieces_and_gets_more_as_they_go_out() {
        let mut seed = SuperSeed::new(8, COPY_SLOTS);
        let a = seed.open();
        let now = Instant::now();
        assert_eq!(seed.reveal(a, now, true, |_| true), 2);
        // Asking again without sending shows nothing more.
        assert_eq!(seed.reveal(a, now, true, |_| true), 2);
        assert_eq!(seed.sending(a, 0), Admit::First);
        assert_eq!(
            seed.reveal(a, now, true, |_| true),
            2,
            "piece 0 still on the wire"
        );
        seed.sent(a, 0, Admit::First, true);
        assert_eq!(seed.reveal(a, now, true, |_| true), 3);
    }

    #[test]
    fn unrequested_assignments_expire_and_a_closed_child_gives_its_back() {
        let mut seed = SuperSeed::new(4, COPY_SLOTS);
        let (a, b) = (seed.open(), seed.open());
        let t0 = Instant::now();
        assert_eq!(seed.reveal(a, t0, true, |_| true), 2);
        assert_eq!(seed.reveal(b, t0, true, |_| true), 2);
        // Nothing left for a third child until something is released.
        let c = seed.open();
        assert_eq!(seed.reveal(c, t0, true, |_| true), 0);
        seed.close(a);
        assert_eq!(seed.reveal(c, t0, true, |_| true), 2, "a's pieces go to c");
        // b never asks: after the TTL its pieces are free for c too.
        let d = seed.open();
        assert_eq!(seed.reveal(d, t0 + ASSIGNMENT_TTL, true, |_| true), 2);
        assert!(shown(&seed, d, 2) || shown(&seed, d, 3) || shown(&seed, d, 0));
    }

    /// The flake of `a_seed_killed_mid_transfer_is_replaced_and_the_download_finishes`: a
    /// child that already holds the pieces the plan assigns it (lowest first; it got them
    /// from a seed that died) never asks for them. After its assignments expire it is shown
    /// every stored piece, so it asks for the ones it lacks; before, it was shown the same
    /// two held pieces again after every expiry, and nothing moved.
    #[test]
    fn a_child_that_holds_its_assignments_is_shown_everything_after_they_expire() {
        let mut seed = SuperSeed::new(16, COPY_SLOTS);
        let mut late = kids(&mut seed, 1, 16);
        // It holds pieces 0..10 already.
        for n in 0..10 {
            late[0].has[n] = true;
        }
        let mut t = Instant::now();
        let stored = |_| true;
        assert_eq!(seed.reveal(late[0].id, t, true, stored), 2);
        assert!(shown(&seed, late[0].id, 0) && shown(&seed, late[0].id, 1));
        // It asks for nothing it holds; a few TTLs pass.
        for _ in 0..3 {
            t += ASSIGNMENT_TTL;
            seed.reveal(late[0].id, t, true, stored);
        }
        let lacking: Vec<u32> = (10..16).filter(|&n| shown(&seed, late[0].id, n)).collect();
        assert_eq!(
            lacking,
            (10..16).collect::<Vec<_>>(),
            "the late child should see the pieces it lacks"
        );
        // And gets them, each a first copy.
        for n in 10..16 {
            assert_eq!(seed.sending(late[0].id, n), Admit::First);
            seed.sent(late[0].id, n, Admit::First, true);
        }
        // A child that asks for its assignments keeps being shown them two at a time.
        let mut fresh = SuperSeed::new(16, COPY_SLOTS);
        let mut kid = kids(&mut fresh, 1, 16);
        let order = run(&mut fresh, &mut kid, &[true; 16], 4);
        assert_eq!(order, vec![0, 1, 2, 3]);
        assert_eq!(fresh.reveal(kid[0].id, Instant::now(), true, stored), 6);
    }

    #[test]
    fn a_cut_off_send_does_not_count_as_a_copy() {
        let mut seed = SuperSeed::new(2, COPY_SLOTS);
        let a = seed.open();
        let now = Instant::now();
        assert_eq!(seed.reveal(a, now, true, |_| true), 2);
        let admit = seed.sending(a, 0);
        assert_eq!(admit, Admit::First);
        seed.sent(a, 0, admit, false);
        assert_eq!(seed.copies(0), 0);
        assert!(!seed.everything_shown(true));
        // a's connection died with it; piece 0 is a first copy again, for the next child.
        seed.close(a);
        let b = seed.open();
        assert_eq!(seed.reveal(b, now, true, |_| true), 2);
        assert!(shown(&seed, b, 0));
        assert_eq!(seed.sending(b, 0), Admit::First);
    }

    #[test]
    fn once_everything_went_out_every_child_sees_every_piece() {
        let mut seed = SuperSeed::new(3, COPY_SLOTS);
        let a = seed.open();
        let now = Instant::now();
        for _ in 0..2 {
            seed.reveal(a, now, true, |_| true);
            for n in 0..3 {
                if shown(&seed, a, n) && seed.copies(n) == 0 {
                    assert_eq!(seed.sending(a, n), Admit::First);
                    seed.sent(a, n, Admit::First, true);
                }
            }
        }
        assert!(seed.everything_shown(true));
        let b = seed.open();
        assert_eq!(seed.reveal(b, now, true, |_| true), 3);
        // Not while the seed itself still lacks pieces.
        assert!(!seed.everything_shown(false));
    }

    #[test]
    fn later_copies_are_sent_a_few_at_a_time() {
        let mut seed = SuperSeed::new(1, COPY_SLOTS);
        let first = seed.open();
        assert_eq!(seed.sending(first, 0), Admit::First);
        seed.sent(first, 0, Admit::First, true);
        let kids: Vec<ChildId> = (0..COPY_SLOTS + 2).map(|_| seed.open()).collect();
        let admits: Vec<Admit> = kids.iter().map(|&k| seed.sending(k, 0)).collect();
        let copies = admits.iter().filter(|a| **a == Admit::Copy).count();
        assert_eq!(copies, COPY_SLOTS as usize, "{admits:?}");
        assert_eq!(admits.last(), Some(&Admit::Busy));
        // One ends: the next request is served.
        seed.sent(kids[0], 0, Admit::Copy, true);
        assert_eq!(seed.sending(kids[COPY_SLOTS as usize], 0), Admit::Copy);
        assert_eq!(seed.copies(0), 1 + COPY_SLOTS + 1);
    }

    #[test]
    fn a_plan_outlives_its_last_child_unless_the_task_was_fetched_again() {
        let seeding = Seeding::new(COPY_SLOTS);
        let task = TaskId([7; 32]);
        let (plan, a) = seeding.join(task, 4, 2);
        let now = Instant::now();
        plan.with(|s| {
            s.reveal(a, now, false, |n| n < 2);
            let admit = s.sending(a, 0);
            s.sent(a, 0, admit, true);
        });
        seeding.leave(&task, &plan, a);
        // The only child left; a child that comes (back) must not get piece 0 as a first
        // copy again.
        let (again, b) = seeding.join(task, 4, 2);
        assert!(
            Arc::ptr_eq(&plan, &again),
            "the plan was dropped with its last child"
        );
        assert_eq!(again.with(|s| s.copies(0)), 1);
        assert_eq!(again.with(|s| s.sending(b, 0)), Admit::Copy);
        seeding.leave(&task, &again, b);
        // The seed now holds nothing of a task whose pieces went out: removed and fetched
        // anew, so the plan starts over.
        let (fresh, _) = seeding.join(task, 4, 0);
        assert!(!Arc::ptr_eq(&plan, &fresh));
        assert_eq!(fresh.with(|s| s.copies(0)), 0);
    }
}
