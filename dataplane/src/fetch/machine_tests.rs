//! [`ParentMachine`] driven by hand with a virtual clock (plain `Instant`s advanced by the
//! test): no socket, no runtime. The swarm is a real [`Session`] over a real store in a temp
//! dir (the picker's own tests use the same), wrapped to script the shaping delays.

use super::*;
use crate::fetch::picker::tests::{learn_bits, session, store_piece, PLEN};
use std::cell::RefCell;
use std::rc::Rc;

/// The session's picker, with scripted shaping delays and a settable piece cap.
struct TestSwarm {
    s: Rc<Session>,
    waits: RefCell<VecDeque<Duration>>,
    cap: usize,
}

impl TestSwarm {
    fn new(s: &Rc<Session>) -> Self {
        Self {
            s: s.clone(),
            waits: RefCell::new(VecDeque::new()),
            cap: 8,
        }
    }

    fn in_flight(&self, n: u32) -> u8 {
        self.s.state.borrow().in_flight[n as usize]
    }

    fn availability(&self) -> Vec<u32> {
        self.s.state.borrow().availability.clone()
    }
}

impl Swarm for TestSwarm {
    fn pick(&self, bits: &[bool], now: Instant) -> Option<u32> {
        self.s.pick(bits, now)
    }
    fn pick_endgame(&self, bits: &[bool], now: Instant) -> Option<u32> {
        self.s.pick_endgame(bits, now)
    }
    fn release(&self, n: u32) {
        self.s.release(n);
    }
    fn learn(&self, n: usize, has: bool) {
        self.s.learn(n, has);
    }
    fn reserve(&self, _bytes: u64) -> Duration {
        self.waits
            .borrow_mut()
            .pop_front()
            .unwrap_or(Duration::ZERO)
    }
    fn pieces_in_flight(&self) -> usize {
        self.cap
    }
}

fn cfg() -> MachineConfig {
    MachineConfig {
        bytes_in_flight: 16 << 20,
        request_queue_time: Duration::from_millis(20),
        piece_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(3),
        bitmap_wait: Duration::from_secs(1),
    }
}

fn machine(s: &Session) -> ParentMachine {
    ParentMachine::new(s.task(), s.store.layout(), cfg())
}

/// The parent's bitmap answer with `bits`, in the task's layout.
fn bitmap(s: &Session, bits: &[bool]) -> Frame {
    let layout = s.store.layout();
    let mut b = vec![0u8; wire::frame::bitmap_len(layout.piece_count())];
    for (n, has) in bits.iter().enumerate() {
        if *has {
            b[n / 8] |= 1 << (n % 8);
        }
    }
    Frame::Bitmap {
        task: s.task(),
        content_length: layout.content_length(),
        piece_length: layout.piece_length() as u32,
        piece_count: layout.piece_count(),
        bits: b,
    }
}

/// The parent's header of piece `n` (as a correct parent sends it).
fn piece(s: &Session, n: u32) -> Frame {
    Frame::Piece(PieceHeader {
        task: s.task(),
        number: n,
        offset: u64::from(n) * PLEN,
        length: PLEN as u32,
        crc32c: 7,
    })
}

fn error(code: ErrorCode) -> Frame {
    Frame::Error {
        code,
        message: "no".into(),
    }
}

/// One batch at `now`: the frames and what the machine said.
fn transmit(m: &mut ParentMachine, now: Instant, sw: &TestSwarm) -> (Vec<Frame>, Transmit) {
    let mut out = Vec::new();
    let t = m.poll_transmit(now, sw, &mut out);
    (out, t)
}

/// The piece numbers requested in `frames`.
fn requested(frames: &[Frame]) -> Vec<u32> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::PieceRequest { number, .. } => Some(*number),
            _ => None,
        })
        .collect()
}

fn is_poll(f: &Frame) -> Option<(u32, u32)> {
    match f {
        Frame::BitmapRequest { known, wait_ms, .. } => Some((*known, *wait_ms)),
        _ => None,
    }
}

/// A machine past its first bitmap request, answered with `bits`, at `t0`.
fn connected(s: &Session, sw: &TestSwarm, bits: &[bool], t0: Instant) -> ParentMachine {
    let mut m = machine(s);
    let (frames, t) = transmit(&mut m, t0, sw);
    assert_eq!(t, Transmit::Ready { requests: None });
    assert_eq!(
        frames.iter().filter_map(is_poll).collect::<Vec<_>>(),
        [(0, 0)]
    );
    assert_eq!(
        m.handle_frame(bitmap(s, bits), t0, sw).expect("bitmap"),
        Action::Continue
    );
    m
}

/// Answers the oldest request, piece `n`, whose body arrives at `now`.
fn deliver(m: &mut ParentMachine, s: &Session, sw: &TestSwarm, n: u32, now: Instant) {
    assert_eq!(
        m.handle_frame(piece(s, n), now, sw).expect("piece header"),
        Action::Receive {
            n,
            len: PLEN,
            crc: 7
        }
    );
    assert!(m.piece_landed(PLEN, now).is_some());
    // Settled (as `Session::settled` does for a stored piece).
    store_piece(s, n);
    sw.release(n);
}

/// The request window follows the rate pieces arrive at: two requests at first, the cap
/// (8) once pieces arrive back to back fast, two again once they come slowly.
#[test]
fn the_window_grows_with_fast_pieces_and_shrinks_with_slow_ones() {
    let (_d, s) = session(200);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true; 200], t0);
    let (frames, t) = transmit(&mut m, t0, &sw);
    let mut outstanding: VecDeque<u32> = requested(&frames).into();
    assert_eq!(outstanding.len(), 2, "initial window");
    assert_eq!(t, Transmit::Ready { requests: Some(2) });
    assert!(
        frames.iter().all(|f| is_poll(f).is_none()),
        "a full window sends no bitmap request"
    );
    let mut now = t0;
    let mut most = 0;
    // 16 KiB every 10 µs: 1.6 GB/s.
    for _ in 0..30 {
        now += Duration::from_micros(10);
        let n = outstanding.pop_front().expect("outstanding");
        deliver(&mut m, &s, &sw, n, now);
        let (frames, _) = transmit(&mut m, now, &sw);
        outstanding.extend(requested(&frames));
        most = most.max(outstanding.len());
    }
    assert_eq!(most, 8, "grown to the cap");
    assert_eq!(
        m.window(),
        1024,
        "the rate alone would allow more than the cap"
    );
    // 16 KiB every 100 ms: 160 kB/s, less than one piece in 20 ms.
    for _ in 0..30 {
        now += Duration::from_millis(100);
        let n = outstanding.pop_front().expect("outstanding");
        deliver(&mut m, &s, &sw, n, now);
        let (frames, _) = transmit(&mut m, now, &sw);
        outstanding.extend(requested(&frames));
    }
    assert_eq!(m.window(), 2);
    assert_eq!(outstanding.len(), 2, "back to two requests");
}

/// The machine asks for the rarest pieces the parent has first (the session's
/// availability counts, fed by the other parents' bitmaps and this one's).
#[test]
fn the_machine_picks_rarest_first() {
    let (_d, s) = session(5);
    let sw = TestSwarm::new(&s);
    learn_bits(&s, &[true, true, true, true, true]);
    learn_bits(&s, &[true, false, true, true, true]);
    learn_bits(&s, &[true, false, true, false, true]);
    // With this parent's: pieces 0 and 2 are had by 4 parents, 3 and 4 by 3, 1 by 2.
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true, true, true, true, false], t0);
    assert_eq!(sw.availability(), [4, 2, 4, 3, 3]);
    let (frames, _) = transmit(&mut m, t0, &sw);
    assert_eq!(
        requested(&frames),
        [1, 3],
        "rarest first, within the window"
    );
    // Piece 4 is as rare as 3, but this parent lacks it: never asked for here.
    deliver(&mut m, &s, &sw, 1, t0 + Duration::from_millis(1));
    deliver(&mut m, &s, &sw, 3, t0 + Duration::from_millis(2));
    let (frames, _) = transmit(&mut m, t0 + Duration::from_millis(2), &sw);
    let mut rest = requested(&frames);
    rest.sort_unstable();
    assert_eq!(rest, [0, 2]);
}

/// A request unanswered for `piece_timeout` drops the parent with a timeout, not a moment
/// before; what it owed is then pickable by another parent.
#[test]
fn the_piece_timeout_fires_and_the_piece_is_given_back() {
    let (_d, s) = session(1);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true], t0);
    let t1 = t0 + Duration::from_millis(5);
    let (frames, _) = transmit(&mut m, t1, &sw);
    assert_eq!(requested(&frames), [0]);
    assert_eq!(sw.in_flight(0), 1);
    let due = t1 + cfg().piece_timeout;
    assert_eq!(m.poll_timeout(), Some(due));
    assert!(m.handle_timeout(due - Duration::from_millis(1)).is_none());
    match m.handle_timeout(due) {
        Some(ParentError::Timeout(d)) => assert_eq!(d, cfg().piece_timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    m.give_back(&sw);
    assert_eq!(sw.in_flight(0), 0);
    assert_eq!(sw.availability(), [0]);
    assert_eq!(s.pick(&[true], due), Some(0), "another parent gets it");
}

/// Silence is bounded by `parent_idle_timeout` with a piece request outstanding, and by
/// that plus `bitmap_wait` when a long poll alone is on the connection.
#[test]
fn a_long_poll_alone_gets_the_idle_timeout_plus_its_wait() {
    let (_d, s) = session(2);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut m = machine(&s);
    let _ = transmit(&mut m, t0, &sw);
    assert_eq!(m.idle_bound(), Some(cfg().idle_timeout + cfg().bitmap_wait));
    // The parent has piece 0 only, and we have piece 1: a request, then a plain poll.
    store_piece(&s, 1);
    m.handle_frame(bitmap(&s, &[true, false]), t0, &sw)
        .expect("bitmap");
    let (frames, _) = transmit(&mut m, t0, &sw);
    assert_eq!(requested(&frames), [0]);
    assert_eq!(
        frames.iter().filter_map(is_poll).collect::<Vec<_>>(),
        [(1, 0)],
        "not a long poll: a piece is outstanding"
    );
    assert_eq!(m.idle_bound(), Some(cfg().idle_timeout));
    deliver(&mut m, &s, &sw, 0, t0);
    // Only the poll is left.
    assert_eq!(m.idle_bound(), Some(cfg().idle_timeout + cfg().bitmap_wait));
    m.handle_frame(bitmap(&s, &[true, false]), t0, &sw)
        .expect("bitmap");
    // Nothing more to ask this parent: a long poll.
    let (frames, _) = transmit(&mut m, t0, &sw);
    assert_eq!(
        frames.iter().filter_map(is_poll).collect::<Vec<_>>(),
        [(1, 1000)]
    );
    assert_eq!(m.idle_bound(), Some(cfg().idle_timeout + cfg().bitmap_wait));
    let mut off = ParentMachine::new(
        s.task(),
        s.store.layout(),
        MachineConfig {
            idle_timeout: Duration::ZERO,
            ..cfg()
        },
    );
    let _ = transmit(&mut off, t0, &sw);
    assert_eq!(off.idle_bound(), None, "zero: no bound");
}

/// A parent that dies with pieces requested (one of them mid-piece) gives them all back:
/// another parent picks exactly those next, and the dead parent's bitmap no longer counts
/// toward availability.
#[test]
fn a_parent_that_dies_mid_piece_gives_back_what_it_owed() {
    let (_d, s) = session(4);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut dead = connected(&s, &sw, &[true, true, true, false], t0);
    // Another parent has everything.
    let other = [true; 4];
    learn_bits(&s, &other);
    let (frames, _) = transmit(&mut dead, t0, &sw);
    let mut owed = requested(&frames);
    assert_eq!(owed.len(), 2);
    // The first one's header arrived: its body is being received when the parent dies.
    assert!(matches!(
        dead.handle_frame(piece(&s, owed[0]), t0, &sw),
        Ok(Action::Receive { .. })
    ));
    // The other parent gets what nobody asked for yet, and then nothing.
    let mut rest: Vec<u32> = std::iter::from_fn(|| s.pick(&other, t0)).collect();
    assert_eq!(rest.len(), 2);
    dead.give_back(&sw);
    assert!(dead.is_drained());
    assert_eq!(sw.availability(), [1, 1, 1, 1]);
    let mut again: Vec<u32> = std::iter::from_fn(|| s.pick(&other, t0)).collect();
    again.sort_unstable();
    owed.sort_unstable();
    assert_eq!(
        again, owed,
        "exactly what the dead parent owed is pickable again"
    );
    rest.extend(again);
    rest.sort_unstable();
    assert_eq!(rest, [0, 1, 2, 3]);
}

/// A piece whose body fails mid-way is released at once (not when the connection's
/// settling pieces are done), and only once.
#[test]
fn a_piece_whose_body_fails_is_released_at_once() {
    let (_d, s) = session(2);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true, true], t0);
    let (frames, _) = transmit(&mut m, t0, &sw);
    let asked = requested(&frames);
    assert_eq!(asked.len(), 2);
    assert!(matches!(
        m.handle_frame(piece(&s, asked[0]), t0, &sw),
        Ok(Action::Receive { .. })
    ));
    m.piece_failed(&sw);
    assert_eq!(sw.in_flight(asked[0]), 0, "released");
    assert_eq!(sw.in_flight(asked[1]), 1, "still owed");
    assert_eq!(s.pick(&[true, true], t0), Some(asked[0]));
    m.give_back(&sw);
    assert_eq!(sw.in_flight(asked[0]), 1, "not released twice");
    assert_eq!(sw.in_flight(asked[1]), 0);
}

/// A piece reserved but held back by shaping is requested after the wait (its time counted
/// from then), and is owed meanwhile: given back if the parent dies during the wait.
#[test]
fn a_shaped_request_waits_and_is_owed_meanwhile() {
    let (_d, s) = session(2);
    let mut sw = TestSwarm::new(&s);
    sw.cap = 1;
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true, true], t0);
    sw.waits.borrow_mut().push_back(Duration::from_millis(40));
    let (frames, t) = transmit(&mut m, t0, &sw);
    assert_eq!(t, Transmit::Shaped(Duration::from_millis(40)));
    assert!(frames.is_empty(), "nothing asked before the wait");
    let after = t0 + Duration::from_millis(40);
    let (frames, t) = transmit(&mut m, after, &sw);
    let first = requested(&frames);
    assert_eq!(first.len(), 1);
    assert_eq!(t, Transmit::Ready { requests: Some(1) });
    assert_eq!(m.poll_timeout(), Some(after + cfg().piece_timeout));
    let landed = after + Duration::from_millis(10);
    assert!(matches!(
        m.handle_frame(piece(&s, first[0]), landed, &sw),
        Ok(Action::Receive { .. })
    ));
    let timing = m.piece_landed(PLEN, landed).expect("landed");
    assert_eq!(
        timing.total,
        Duration::from_millis(10),
        "from the request, after the wait"
    );

    // Another connection: it dies while one request is sent and the next waits.
    let (_d, s) = session(2);
    let mut sw = TestSwarm::new(&s);
    sw.cap = 2;
    let mut m = connected(&s, &sw, &[true, true], t0);
    sw.waits
        .borrow_mut()
        .extend([Duration::ZERO, Duration::from_millis(40)]);
    let (frames, t) = transmit(&mut m, t0, &sw);
    assert_eq!(requested(&frames).len(), 1);
    assert_eq!(t, Transmit::Shaped(Duration::from_millis(40)));
    assert_eq!([0, 1].map(|n| sw.in_flight(n)), [1, 1]);
    m.give_back(&sw);
    assert_eq!([0, 1].map(|n| sw.in_flight(n)), [0, 0], "both given back");
}

/// A parent that does not know the task yet is asked again after a pause, up to
/// [`TASK_NOT_FOUND_RETRIES`] times; the next refusal drops it.
#[test]
fn task_not_found_is_retried_then_refused_after_the_limit() {
    let (_d, s) = session(1);
    let sw = TestSwarm::new(&s);
    let mut now = Instant::now();
    let mut m = machine(&s);
    for i in 0..TASK_NOT_FOUND_RETRIES {
        let (frames, _) = transmit(&mut m, now, &sw);
        assert_eq!(
            frames.iter().filter_map(is_poll).collect::<Vec<_>>(),
            [(0, 0)],
            "try {i}"
        );
        let until = now + TASK_NOT_FOUND_BACKOFF;
        assert_eq!(
            m.handle_frame(error(ErrorCode::TaskNotFound), now, &sw)
                .expect("retried"),
            Action::Backoff(until)
        );
        assert_eq!(m.poll_timeout(), Some(until));
        let (frames, _) = transmit(&mut m, until - Duration::from_millis(1), &sw);
        assert!(frames.is_empty(), "nothing asked during the backoff");
        now = until;
    }
    let _ = transmit(&mut m, now, &sw);
    match m.handle_frame(error(ErrorCode::TaskNotFound), now, &sw) {
        Err(ParentError::Refused(ErrorCode::TaskNotFound, _)) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A busy parent's refusal releases the piece and pauses the connection for
/// [`BUSY_BACKOFF`]; then it asks again.
#[test]
fn busy_backs_off_then_asks_again() {
    let (_d, s) = session(1);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true], t0);
    let (frames, _) = transmit(&mut m, t0, &sw);
    assert_eq!(requested(&frames), [0]);
    let until = t0 + BUSY_BACKOFF;
    assert_eq!(
        m.handle_frame(error(ErrorCode::Busy), t0, &sw)
            .expect("busy"),
        Action::Backoff(until)
    );
    assert_eq!(sw.in_flight(0), 0, "released");
    assert_eq!(m.poll_timeout(), Some(until));
    let (frames, _) = transmit(&mut m, until - Duration::from_millis(1), &sw);
    assert!(frames.is_empty(), "nothing asked during the backoff");
    assert!(m.handle_timeout(until).is_none());
    let (frames, _) = transmit(&mut m, until, &sw);
    assert_eq!(requested(&frames), [0], "asked again after it");
}

/// `PieceNotAvailable` releases the piece and unlearns it: this parent is not asked for it
/// again, and it no longer counts toward the piece's availability.
#[test]
fn piece_not_available_unlearns_the_bit() {
    let (_d, s) = session(2);
    let mut sw = TestSwarm::new(&s);
    sw.cap = 1;
    let t0 = Instant::now();
    let mut m = connected(&s, &sw, &[true, true], t0);
    let (frames, _) = transmit(&mut m, t0, &sw);
    let asked = requested(&frames);
    assert_eq!(asked.len(), 1);
    let n = asked[0];
    assert_eq!(
        m.handle_frame(error(ErrorCode::PieceNotAvailable), t0, &sw)
            .expect("not available"),
        Action::Continue
    );
    assert_eq!(sw.in_flight(n), 0);
    assert!(!m.bits()[n as usize]);
    let mut avail = [1, 1];
    avail[n as usize] = 0;
    assert_eq!(sw.availability(), avail);
    let (frames, _) = transmit(&mut m, t0, &sw);
    assert_eq!(requested(&frames), [1 - n], "the other piece, not this one");
}

/// A bitmap for another layout (or task) is a protocol violation.
#[test]
fn a_bitmap_with_the_wrong_layout_is_a_protocol_error() {
    let (_d, s) = session(4);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let bads: [fn(&mut Frame); 4] = [
        |f: &mut Frame| {
            if let Frame::Bitmap { piece_count, .. } = f {
                *piece_count += 1;
            }
        },
        |f: &mut Frame| {
            if let Frame::Bitmap { piece_length, .. } = f {
                *piece_length *= 2;
            }
        },
        |f: &mut Frame| {
            if let Frame::Bitmap { content_length, .. } = f {
                *content_length -= 1;
            }
        },
        |f: &mut Frame| {
            if let Frame::Bitmap { task, .. } = f {
                *task = wire::TaskId([9; 32]);
            }
        },
    ];
    for bad in bads {
        let mut m = machine(&s);
        let _ = transmit(&mut m, t0, &sw);
        let mut f = bitmap(&s, &[true; 4]);
        bad(&mut f);
        match m.handle_frame(f, t0, &sw) {
            Err(ParentError::Protocol(msg)) => assert!(msg.contains("bitmap layout"), "{msg}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert_eq!(sw.availability(), [0; 4], "nothing learnt");
    }
}

/// An answer when nothing was asked, or one that does not answer the oldest request, is a
/// protocol violation; a wrong piece header gives its piece back.
#[test]
fn a_response_without_a_request_is_a_protocol_error() {
    let (_d, s) = session(2);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut m = machine(&s);
    match m.handle_frame(bitmap(&s, &[true, true]), t0, &sw) {
        Err(ParentError::Protocol(msg)) => assert_eq!(msg, "response without a request"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let mut m = connected(&s, &sw, &[true, true], t0);
    let (frames, _) = transmit(&mut m, t0, &sw);
    let asked = requested(&frames);
    assert_eq!(asked.len(), 2);
    let wrong = 1 - asked[0];
    match m.handle_frame(piece(&s, wrong), t0, &sw) {
        Err(ParentError::Protocol(msg)) => assert!(msg.contains("does not answer"), "{msg}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(sw.in_flight(asked[0]), 0, "the asked piece is released");
    match m.handle_frame(bitmap(&s, &[true, true]), t0, &sw) {
        Err(ParentError::Protocol(msg)) => assert!(msg.contains("answer to piece"), "{msg}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// In the endgame, a parent that dies holding a duplicate leaves the piece in flight at
/// the other parent (not handed out a third time, not forgotten).
#[test]
fn a_dead_endgame_duplicate_leaves_the_other_copy_in_flight() {
    let (_d, s) = session(1);
    let sw = TestSwarm::new(&s);
    let t0 = Instant::now();
    let mut first = connected(&s, &sw, &[true], t0);
    let mut dup = connected(&s, &sw, &[true], t0);
    let (frames, _) = transmit(&mut first, t0, &sw);
    assert_eq!(requested(&frames), [0]);
    let later = t0 + Duration::from_secs(10);
    let (frames, _) = transmit(&mut dup, later, &sw);
    assert_eq!(requested(&frames), [0], "the endgame duplicate");
    dup.give_back(&sw);
    assert_eq!(sw.in_flight(0), 1);
    assert_eq!(sw.availability(), [1]);
    assert_eq!(
        s.pick(&[true], later),
        None,
        "still in flight at the first parent"
    );
    first.give_back(&sw);
    assert_eq!(
        s.pick(&[true], later),
        Some(0),
        "both copies gone: pickable again"
    );
}
