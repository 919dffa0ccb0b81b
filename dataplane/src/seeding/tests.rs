//! Tests of [`SuperSeed`] and the per-thread [`Seeding`] plans, driven without any network.

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
