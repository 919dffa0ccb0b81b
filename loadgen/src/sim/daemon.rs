//! The daemon model of `loadgen simulate`: the swarm as the data plane runs it.
//!
//! The flow model ([`super`]) lets every connection pick its next piece, rarest over the whole
//! swarm, the moment the previous one arrives. The daemon does not work like that, and the
//! difference decides whether a scarce seed's uplink is spent well (lab, 20 hosts at
//! 100 Mbit: the flow model said 1.6× T* where the daemon took 9×). This model runs what the
//! daemon runs, with the data plane's own sans-IO parts on the virtual clock:
//!
//! - **Request queues.** A child keeps requests outstanding at each parent; the parent sends
//!   them in order, one at a time per connection, and a piece requested at one parent is
//!   fetched from no other. The window is [`RequestWindow`] (sized by the connection's
//!   measured rate) or fixed (`queue_time` zero: the daemon before 2026-12-06).
//! - **A local view, learnt in band.** A piece is chosen when it is requested, rarest among
//!   the child's own parents, from the bitmaps it has learnt, not over the swarm. As in the
//!   fetcher, a child learns a parent's bitmap only from bitmap requests on the same
//!   connection: one queued behind its outstanding piece requests when the window has room
//!   (answered when the parent reaches it), or a long poll when nothing is outstanding
//!   (answered as soon as the parent has something new); no piece request is sent while one
//!   is pending. A child busy at a parent therefore knows that parent's pieces as of a
//!   queue's length ago: with a fixed window of 8 at a seed that serves many children, each
//!   child learns the seed's pieces a few at a time and asks for them in about the order the
//!   seed got them, so all children fetch the same pieces at the same time and have little
//!   to trade (the lab's 4-10x before 2026-12-06).
//! - **Store and forward from a sequential origin fetch.** The seed (and a peer sent back to
//!   source) reads the origin from the first missing piece on, one stream.
//! - **Super-seeding.** A seed parent shows each child only what its [`SuperSeed`] plan
//!   reveals and answers requests beyond its copy slots `Busy` (the child pauses
//!   [`BUSY_PAUSE`] on that connection, as the daemon does).
//!
//! Not modelled: endgame duplicates, TCP slow start, request turnaround (requests reach the
//! parent at once), CPU limits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dataplane::seeding::{Admit, ChildId, SuperSeed};
use dataplane::window::RequestWindow;
use rand::Rng as _;

use super::{Bits, Sim, State, ORIGIN};

/// Pause of a connection whose request the parent answered `Busy` (the fetcher's 50 ms).
pub const BUSY_PAUSE: f64 = 0.05;

/// How the simulated daemons fetch and serve (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct DaemonModel {
    /// Most piece requests outstanding per connection (`data_plane.pieces_in_flight`).
    pub pieces_in_flight: usize,
    /// Most bytes of piece requests outstanding per connection (one piece always fits).
    pub bytes_in_flight: u64,
    /// `data_plane.request_queue_time`; zero: always `pieces_in_flight` (a fixed window).
    pub queue_time: Duration,
    /// The seed super-seeds with this many copy slots (`seed_peer.copy_slots`); `None`: it
    /// answers every request as it comes.
    pub super_seed: Option<u32>,
    /// The daemon before 2026-12-06 (fixed in commit 371627e): parents the scheduler added
    /// while the data plane had not yet made the download's session were dropped (an
    /// `AddParents` drained together with its `Download`); and the cost reported per piece
    /// was the time since the request, its wait in the parent's queue included (today: the
    /// parent's service time). In the model, the session exists from the step after the
    /// first parents arrived, so parents added in the same step are lost.
    pub old_daemon: bool,
}

impl DaemonModel {
    /// Today's daemon with its default configuration.
    pub fn current() -> Self {
        Self {
            pieces_in_flight: 8,
            bytes_in_flight: dataplane::fetch::DEFAULT_BYTES_IN_FLIGHT,
            queue_time: dataplane::fetch::DEFAULT_REQUEST_QUEUE_TIME,
            super_seed: Some(dataplane::seeding::COPY_SLOTS),
            old_daemon: false,
        }
    }

    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        let window = if self.queue_time.is_zero() {
            format!("fixed window {}", self.pieces_in_flight)
        } else {
            format!(
                "window {} ms of rate, at most {}",
                self.queue_time.as_millis(),
                self.pieces_in_flight
            )
        };
        let seed = match self.super_seed {
            _ if self.old_daemon => {
                "seed answers every request; added parents lost at start, cost with queue wait"
                    .to_owned()
            }
            Some(slots) => format!("super-seeding, {slots} copy slots"),
            None => "seed answers every request".to_owned(),
        };
        format!("daemon: {window}; {seed}")
    }

    /// The daemon before the scarce-seed work (commit 6c8a9ae): 8 requests outstanding at
    /// every parent, a seed that answers every request, and the two faults of
    /// [`DaemonModel::old_daemon`].
    pub fn fixed_window() -> Self {
        Self {
            pieces_in_flight: 8,
            bytes_in_flight: dataplane::fetch::DEFAULT_BYTES_IN_FLIGHT,
            queue_time: Duration::ZERO,
            super_seed: None,
            old_daemon: true,
        }
    }
}

/// A request on a connection, in the order the parent answers them.
#[derive(Debug, Clone, Copy)]
enum Req {
    /// A piece and the virtual time it was requested.
    Piece(u32, f64),
    /// A bitmap request (answered when it reaches the head of the queue).
    Bitmap,
}

/// The daemon model's state of one connection.
#[derive(Debug, Clone)]
pub(super) struct Fetching {
    /// Requests sent and not yet answered (the piece on the wire is not in it).
    queue: VecDeque<Req>,
    /// A long poll (bitmap request with nothing else outstanding) is pending.
    long_poll: bool,
    /// What the child knows the (not super-seeding) parent holds, from its last bitmap.
    known: Option<Bits>,
    known_count: u32,
    window: RequestWindow,
    /// This connection's child id in the seed's plan, when the parent super-seeds.
    seed_child: Option<ChildId>,
    /// What the plan said of the piece on the wire.
    admit: Option<Admit>,
    /// No requests before this virtual time (after `Busy`).
    paused_until: f64,
    /// Pieces of a super-seeding parent this connection has been shown.
    shown: Option<Bits>,
    shown_count: u32,
}

/// The daemon model's state of the whole swarm.
#[derive(Debug)]
pub(super) struct Swarm {
    model: DaemonModel,
    /// Virtual time 0 as an `Instant`, for the data plane's clock arguments.
    base: Instant,
    /// Per peer and piece: how many of its parents it knows to hold the piece.
    avail: Vec<Vec<u16>>,
    /// The seed's super-seeding plan.
    plan: Option<SuperSeed>,
    /// Per peer: the virtual time its first parents came (for [`DaemonModel::old_daemon`]).
    first_parents: Vec<Option<f64>>,
    /// Parents lost to the old daemon's `AddParents` race.
    pub(super) parents_lost: u64,
}

impl Swarm {
    pub(super) fn new(model: DaemonModel, peers: usize, pieces: u32) -> Self {
        Self {
            model,
            base: Instant::now(),
            avail: (0..peers).map(|_| vec![0; pieces as usize]).collect(),
            plan: model.super_seed.map(|slots| SuperSeed::new(pieces, slots)),
            first_parents: vec![None; peers],
            parents_lost: 0,
        }
    }

    fn at(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t.max(0.0))
    }
}

impl Sim {
    /// One line per peer: what its connections are doing (`LOADGEN_TRACE`).
    pub(super) fn d_dump(&self) {
        for i in 0..=self.n {
            let conns: Vec<String> = self.conns[i]
                .iter()
                .map(|c| {
                    let f = c.fetching.as_ref();
                    let held = if c.parent == ORIGIN {
                        self.pieces
                    } else {
                        self.count[c.parent as usize]
                    };
                    format!(
                        "{}:{}{}{}{}",
                        if c.parent == ORIGIN {
                            "o".to_owned()
                        } else {
                            c.parent.to_string()
                        },
                        held,
                        c.piece.map_or_else(String::new, |k| format!(" >{k}")),
                        f.map_or_else(String::new, |f| format!(
                            " q{}{}",
                            f.queue.len(),
                            if f.long_poll { " poll" } else { "" }
                        )),
                        f.and_then(|f| f
                            .shown
                            .as_ref()
                            .map(|_| format!(" shown{}", f.shown_count)))
                            .unwrap_or_default()
                    )
                })
                .collect();
            eprintln!(
                "  p{i} {:?} {} pieces, {} in flight: {}",
                self.state[i],
                self.count[i],
                self.inflight[i]
                    .0
                    .iter()
                    .map(|w| w.count_ones())
                    .sum::<u32>(),
                conns.join(", ")
            );
        }
    }

    /// Parents for peer `i` arrived at virtual time `t`: whether the modelled daemon drops
    /// them (the old daemon's race: they came in the step its first parents came, before the
    /// download had its session).
    pub(super) fn d_loses_parents(&mut self, i: usize, t: f64, count: usize) -> bool {
        let s = self.swarm();
        let Some(first) = s.first_parents.get_mut(i) else {
            return false;
        };
        match *first {
            None => {
                *first = Some(t);
                false
            }
            Some(at) if s.model.old_daemon && at == t => {
                s.parents_lost += count as u64;
                true
            }
            Some(_) => false,
        }
    }

    fn swarm(&mut self) -> &mut Swarm {
        self.daemon
            .as_mut()
            .expect("daemon-model methods run only with the daemon model")
    }

    /// The daemon model: connection `c` of peer `i` was just added.
    pub(super) fn d_connect(&mut self, i: usize, c: usize) {
        let parent = self.conns[i][c].parent;
        let seed = self.n as u32;
        let pieces = self.pieces;
        let super_seeding = parent == seed && self.swarm().plan.is_some();
        let mut f = Fetching {
            queue: VecDeque::new(),
            long_poll: false,
            known: None,
            known_count: 0,
            window: {
                let m = self.swarm().model;
                RequestWindow::new(m.pieces_in_flight, m.bytes_in_flight, m.queue_time)
            },
            seed_child: None,
            admit: None,
            paused_until: 0.0,
            shown: None,
            shown_count: 0,
        };
        if parent != ORIGIN {
            if super_seeding {
                f.seed_child = self.swarm().plan.as_mut().map(SuperSeed::open);
                f.shown = Some(Bits::new(pieces, false));
            } else {
                // The first bitmap request is answered at once (nothing queued before it).
                f.known = Some(Bits::new(pieces, false));
            }
        }
        self.conns[i][c].fetching = Some(f);
        if parent != ORIGIN && !super_seeding {
            self.d_learn(i, c);
        }
    }

    /// Connection `c` of peer `i` gets a bitmap answer from a parent that does not super-seed:
    /// what the parent holds now. Whether it showed anything new.
    fn d_learn(&mut self, i: usize, c: usize) -> bool {
        let parent = self.conns[i][c].parent as usize;
        let pieces = self.pieces;
        let mut new = Vec::new();
        if let (Some(f), Some(have)) = (self.conns[i][c].fetching.as_mut(), self.have.get(parent)) {
            if let Some(known) = f.known.as_mut() {
                if f.known_count < self.count[parent] {
                    for k in 0..pieces {
                        if have.get(k) && !known.get(k) {
                            known.set(k, true);
                            new.push(k);
                        }
                    }
                    f.known_count = self.count[parent];
                }
            }
        }
        for &k in &new {
            self.daemon_avail_add(i, k);
        }
        !new.is_empty()
    }

    /// Answers the bitmap request of connection `c` of peer `i` (a super-seeding parent shows
    /// what its plan reveals). Whether it showed anything new.
    fn d_answer_bitmap(&mut self, i: usize, c: usize, t: f64) -> bool {
        let seeding = self.conns[i][c]
            .fetching
            .as_ref()
            .is_some_and(|f| f.seed_child.is_some());
        if seeding {
            self.d_reveal(i, c, t)
        } else {
            self.d_learn(i, c)
        }
    }

    /// Whether the child believes connection `c`'s parent holds every piece (it then sends
    /// no more bitmap requests).
    fn d_parent_known_complete(&self, i: usize, c: usize) -> bool {
        self.conns[i][c].fetching.as_ref().is_some_and(|f| {
            if f.seed_child.is_some() {
                f.shown_count >= self.pieces
            } else {
                f.known_count >= self.pieces
            }
        })
    }

    fn daemon_avail_add(&mut self, i: usize, k: u32) {
        if let Some(a) = self.swarm().avail[i].get_mut(k as usize) {
            *a = a.saturating_add(1);
        }
    }

    /// Updates what a super-seeding parent shows connection `c` of peer `i`; whether it grew.
    fn d_reveal(&mut self, i: usize, c: usize, t: f64) -> bool {
        let seed = self.n;
        let complete = self.count[seed] == self.pieces;
        let Some(child) = self.conns[i][c]
            .fetching
            .as_ref()
            .and_then(|f| f.seed_child)
        else {
            return false;
        };
        let now = self.swarm().at(t);
        let have = &self.have[seed];
        let Some(plan) = self.daemon.as_mut().and_then(|d| d.plan.as_mut()) else {
            return false;
        };
        let count = plan.reveal(child, now, complete, |k| have.get(k));
        let Some(f) = self.conns[i][c].fetching.as_mut() else {
            return false;
        };
        if count == f.shown_count {
            return false;
        }
        f.shown_count = count;
        let bitmap = plan.bitmap(child);
        let mut new = Vec::new();
        if let Some(shown) = f.shown.as_mut() {
            for k in 0..self.pieces {
                if wire::frame::bitmap_get(&bitmap, k) && !shown.get(k) {
                    shown.set(k, true);
                    new.push(k);
                }
            }
        }
        for k in new {
            self.daemon_avail_add(i, k);
        }
        true
    }

    /// Keeps connection `c` of peer `i` as busy as the daemon would at virtual time `t`:
    /// its window full of requests, the first of them on the wire.
    pub(super) fn d_refill(&mut self, i: usize, c: usize, t: f64) {
        if self.state[i] == State::Done {
            return;
        }
        let Some(conn) = self.conns[i].get(c) else {
            return;
        };
        let Some(f) = conn.fetching.as_ref() else {
            return;
        };
        if f.paused_until > t {
            return;
        }
        if conn.parent == ORIGIN {
            // One sequential stream from the first missing piece.
            if conn.piece.is_none() {
                if let Some(k) = self.d_next_in_order(i) {
                    self.d_start(i, c, k, t);
                }
            }
            return;
        }
        if f.long_poll {
            // The parent answers a long poll as soon as it has something new to show.
            if !self.d_answer_bitmap(i, c, t) {
                return;
            }
            if let Some(f) = self.conns[i][c].fetching.as_mut() {
                f.long_poll = false;
            }
        }
        let piece_length = self.p.piece_length;
        let mut full = false;
        loop {
            let conn = &self.conns[i][c];
            let Some(f) = conn.fetching.as_ref() else {
                return;
            };
            // No piece request queues behind a bitmap request.
            if f.queue.iter().any(|r| matches!(r, Req::Bitmap)) {
                full = true;
                break;
            }
            let outstanding = f.queue.len() + usize::from(conn.piece.is_some());
            // Bounded by `pieces_in_flight` and `bytes_in_flight` inside the window.
            if outstanding >= f.window.limit(piece_length) {
                full = true;
                break;
            }
            let Some(k) = self.d_pick(i, c) else { break };
            if let Some(f) = self.conns[i][c].fetching.as_mut() {
                f.queue.push_back(Req::Piece(k, t));
            }
        }
        // Room in the window: ask what else the parent has (behind the requests, or a long
        // poll when nothing is outstanding).
        if !full && !self.d_parent_known_complete(i, c) {
            let idle = self.conns[i][c].piece.is_none();
            if let Some(f) = self.conns[i][c].fetching.as_mut() {
                if idle && f.queue.is_empty() {
                    f.long_poll = true;
                } else {
                    f.queue.push_back(Req::Bitmap);
                }
            }
        }
        self.d_promote(i, c, t);
    }

    /// First piece peer `i` neither holds nor fetches.
    fn d_next_in_order(&mut self, i: usize) -> Option<u32> {
        let k = (0..self.pieces).find(|&k| !self.have[i].get(k) && !self.inflight[i].get(k))?;
        self.mark_in_flight(i, k);
        Some(k)
    }

    fn d_start(&mut self, i: usize, c: usize, k: u32, requested: f64) {
        let size = self.piece_size(k);
        let conn = &mut self.conns[i][c];
        conn.piece = Some(k);
        conn.remaining = size;
        conn.started = requested;
    }

    /// Puts the next queued request of connection `c` on the wire, if none is; a super-seeding
    /// parent may answer `Busy` (the piece is released and the connection pauses).
    fn d_promote(&mut self, i: usize, c: usize, t: f64) {
        while self.conns[i][c].piece.is_none() {
            let Some(req) = self.conns[i][c]
                .fetching
                .as_mut()
                .and_then(|f| f.queue.pop_front())
            else {
                return;
            };
            let (k, requested) = match req {
                Req::Piece(k, requested) => (k, requested),
                Req::Bitmap => {
                    self.d_answer_bitmap(i, c, t);
                    continue;
                }
            };
            let child = self.conns[i][c]
                .fetching
                .as_ref()
                .and_then(|f| f.seed_child);
            let admit = match (child, self.daemon.as_mut().and_then(|d| d.plan.as_mut())) {
                (Some(child), Some(plan)) => Some(plan.sending(child, k)),
                _ => None,
            };
            if admit == Some(Admit::Busy) {
                self.release(i, k);
                if let Some(f) = self.conns[i][c].fetching.as_mut() {
                    f.paused_until = t + BUSY_PAUSE;
                }
                continue;
            }
            if let Some(f) = self.conns[i][c].fetching.as_mut() {
                f.admit = admit;
            }
            self.d_start(i, c, k, requested);
        }
    }

    /// Rarest piece among peer `i`'s parents that connection `c`'s parent shows it, that it
    /// neither holds nor fetches (random start, the first of the lowest count, as the
    /// fetcher's `pick`); marks it in flight.
    fn d_pick(&mut self, i: usize, c: usize) -> Option<u32> {
        let parent = self.conns[i][c].parent;
        let f = self.conns[i][c].fetching.as_ref()?;
        let ph = match (f.shown.as_ref(), f.known.as_ref()) {
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => &self.have[parent as usize],
        };
        let ch = &self.have[i];
        let fl = &self.inflight[i];
        let avail = &self.daemon.as_ref()?.avail[i];
        let words = ph.0.len();
        if words == 0 {
            return None;
        }
        // From a random piece on, wrapping around: the first word is visited twice, its
        // high bits first and its low bits last.
        let start = self.rng.random_range(0..self.pieces.max(1));
        let (first, shift) = ((start / 64) as usize, start % 64);
        let mut best: Option<(u16, u32)> = None;
        'scan: for w in 0..=words {
            let wi = (first + w) % words;
            let mask = match w {
                0 => u64::MAX << shift,
                w if w == words => (1u64 << shift) - 1,
                _ => u64::MAX,
            };
            let mut bits = ph.0[wi] & !ch.0[wi] & !fl.0[wi] & mask;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                let k = (wi as u32) * 64 + b;
                let a = avail.get(k as usize).copied().unwrap_or(0);
                if best.is_none_or(|(ba, _)| a < ba) {
                    best = Some((a, k));
                    if a <= 1 {
                        break 'scan;
                    }
                }
            }
        }
        let (_, k) = best?;
        self.mark_in_flight(i, k);
        Some(k)
    }

    /// Connection `c` of peer `i` received its piece at `at`: the window learns, the plan
    /// counts the copy, the announcement goes out (the peer's children learn of the piece
    /// from their next bitmap answer), and the connection asks for more.
    pub(super) fn d_finish(&mut self, i: usize, c: usize, at: f64) {
        let Some(k) = self.conns[i][c].piece else {
            return;
        };
        let size = self.piece_size(k) as u64;
        let requested = self.conns[i][c].started;
        let (req_at, now) = {
            let s = self.swarm();
            (s.at(requested), s.at(at))
        };
        // The old daemon reported the time since the request (queue wait included).
        let mut cost = (at - requested).max(0.0);
        let old_daemon = self.swarm().model.old_daemon;
        let mut sent = None;
        if let Some(f) = self.conns[i][c].fetching.as_mut() {
            let more = f.queue.iter().any(|r| matches!(r, Req::Piece(..)));
            let service = f.window.on_piece(size, req_at, now, more).as_secs_f64();
            if !old_daemon {
                cost = service;
            }
            sent = f.seed_child.zip(f.admit.take());
        }
        if let (Some((child, admit)), Some(plan)) =
            (sent, self.daemon.as_mut().and_then(|d| d.plan.as_mut()))
        {
            plan.sent(child, k, admit, true);
        }
        self.complete(i, c, at, cost);
        // Children learn of the new piece from their next bitmap answer.
        if self.state[i] == State::Done {
            self.d_close_all(i);
            return;
        }
        self.d_promote(i, c, at);
        self.d_refill(i, c, at);
    }

    /// Peer `i` stops fetching (done, or sent back to source): its requests are dropped and
    /// the seed's plan forgets its connections.
    pub(super) fn d_close_all(&mut self, i: usize) {
        for c in 0..self.conns[i].len() {
            let mut queued = Vec::new();
            let (mut child, mut admit) = (None, None);
            if let Some(f) = self.conns[i][c].fetching.as_mut() {
                queued.extend(f.queue.drain(..).filter_map(|r| match r {
                    Req::Piece(k, _) => Some(k),
                    Req::Bitmap => None,
                }));
                f.long_poll = false;
                child = f.seed_child.take();
                admit = f.admit.take();
            }
            let head = self.conns[i][c].piece.take();
            if let (Some(child), Some(plan)) =
                (child, self.daemon.as_mut().and_then(|d| d.plan.as_mut()))
            {
                // The piece on the wire was cut off: it does not count as a copy.
                if let (Some(k), Some(admit)) = (head, admit) {
                    plan.sent(child, k, admit, false);
                }
                plan.close(child);
            }
            for k in queued.into_iter().chain(head) {
                self.release(i, k);
            }
        }
    }
}
