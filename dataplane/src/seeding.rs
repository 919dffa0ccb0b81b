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
mod tests;
