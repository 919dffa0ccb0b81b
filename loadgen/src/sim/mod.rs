//! The flow-level swarm model driven by a real scheduler.
//!
//! Virtual time advances in fixed steps. In each step every peer connection with a piece to
//! fetch is a flow from the parent's uplink (or the origin) to the child's downlink; rates are
//! max-min fair ([`crate::flow`]); bytes move; finished pieces are announced to the scheduler
//! at once (with their virtual cost), and the connection picks its next piece, rarest first
//! over the whole swarm (holders plus transfers in flight), random tie-break. A parent has a
//! piece only once it has all of it (store and forward). Parents come only from the
//! scheduler's `CandidateParents`; `NeedBackToSource` makes a peer fetch from the origin.
//!
//! That is the flow model. With [`Params::daemon`] the peers fetch and the seed serves as the
//! daemon does instead ([`daemon`]): request queues per connection, piece choice from the
//! child's own parents when the request is sent, super-seeding at the seed.
//!
//! Wall time and virtual time meet at one point: before the clock moves on, every request
//! that needs an answer (registrations, reschedules) must have been answered, so the
//! scheduler's decisions are applied at the virtual instant they were asked for.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use wire::proto::scheduler::scheduler_client::SchedulerClient;
use wire::proto::scheduler::{
    announce_peer_request::Request, announce_peer_response::Response, host_command,
    AnnouncePeerRequest, Host, HostType, PeerFinished, PieceFinished, RegisterPeer,
    StatTaskRequest, TaskMetadata, TaskSource,
};

use crate::client::{self, Inbound};
use crate::cpu;
use crate::flow::Solver;
use crate::report::{Percentiles, Report};

mod daemon;
pub use daemon::DaemonModel;

/// Parent index of the origin.
const ORIGIN: u32 = u32::MAX;
/// Longest wait for the scheduler's answers before the run is declared broken.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// One virtual host's links, in bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct Links {
    /// Upload capacity.
    pub up: f64,
    /// Download capacity.
    pub down: f64,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Params {
    /// Task size in bytes.
    pub size: u64,
    /// Piece length in bytes.
    pub piece_length: u64,
    /// Links of each normal peer (their number is the swarm size).
    pub hosts: Vec<Links>,
    /// IDC and location of each normal peer (empty strings: none).
    pub placement: Vec<(String, String)>,
    /// Origin upload rate (bytes/s).
    pub origin_rate: f64,
    /// The seed peer's up and down rate (bytes/s).
    pub seed_rate: f64,
    /// Peers fetch and the seed serves as the daemon does (request queues, a local view,
    /// super-seeding); `None`: the flow model.
    pub daemon: Option<DaemonModel>,
    /// Virtual time step in seconds.
    pub step: f64,
    /// Peers arrive uniformly over this many virtual seconds (0: all at once).
    pub arrival: f64,
    /// Decision requests (registrations) outstanding at once.
    pub window: usize,
    /// Give up after this much virtual time.
    pub max_time: f64,
    /// Seed of the simulator's random choices.
    pub seed: u64,
    /// Piece choice: rarest first over the swarm, or uniformly random.
    pub random_pieces: bool,
    /// Parent-side upload ordering: each parent serves its `upload_first` oldest piece
    /// requests first (0: all requests share its uplink max-min fairly).
    pub upload_first: usize,
    /// With `upload_first`: the other requests wait (true) or get the upload the first ones
    /// leave unused (false, work-conserving strict priority).
    pub upload_queue: bool,
    /// With `upload_first`: the order is per (parent, piece): each parent's first
    /// `upload_first` requests of every piece come first.
    pub upload_per_piece: bool,
    /// With `upload_first`: children holding the fewest pieces come first (else the oldest
    /// requests).
    pub upload_poorest: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unregistered,
    Waiting,
    Active,
    Source,
    Done,
}

#[derive(Debug, Clone)]
struct Conn {
    parent: u32,
    /// The piece on the wire.
    piece: Option<u32>,
    remaining: f64,
    /// When the piece on the wire was requested.
    started: f64,
    /// The daemon model's request queue and window.
    fetching: Option<daemon::Fetching>,
}

impl Conn {
    fn to(parent: u32) -> Self {
        Self {
            parent,
            piece: None,
            remaining: 0.0,
            started: 0.0,
            fetching: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u32, full: bool) -> Self {
        let words = n.div_ceil(64) as usize;
        let mut v = vec![if full { u64::MAX } else { 0 }; words];
        if full && n & 63 != 0 {
            if let Some(last) = v.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        Self(v)
    }
    fn get(&self, k: u32) -> bool {
        self.0
            .get((k / 64) as usize)
            .is_some_and(|w| w & (1u64 << (k % 64)) != 0)
    }
    fn set(&mut self, k: u32, on: bool) {
        if let Some(w) = self.0.get_mut((k / 64) as usize) {
            if on {
                *w |= 1u64 << (k % 64);
            } else {
                *w &= !(1u64 << (k % 64));
            }
        }
    }
}

/// The whole simulation.
struct Sim {
    p: Params,
    pieces: u32,
    /// Normal peers 0..n, the seed at n.
    n: usize,
    hosts: Vec<Host>,
    links: Vec<Links>,
    arrival: Vec<f64>,
    state: Vec<State>,
    have: Vec<Bits>,
    inflight: Vec<Bits>,
    count: Vec<u32>,
    conns: Vec<Vec<Conn>>,
    done_at: Vec<Option<f64>>,
    tx: Vec<Option<mpsc::UnboundedSender<Box<AnnouncePeerRequest>>>>,
    /// Completed holders plus in-flight transfers, per piece (the rarity measure).
    rarity: Vec<u32>,
    full: Bits,
    rng: SmallRng,
    t: f64,
    metadata_sent: bool,
    pending: HashMap<u32, (Instant, bool)>,
    decision_us: Vec<f64>,
    woken_us: Vec<f64>,
    announcements: u64,
    first_announce: Option<Instant>,
    /// Scheduler CPU seconds when the first announcement was sent.
    sched_cpu_at_first_announce: Option<f64>,
    scheduler_pid: Option<u32>,
    origin_bytes: f64,
    seed_bytes: f64,
    closed_with_error: u64,
    back_to_source: u64,
    parents_received: u64,
    task_id: String,
    /// The daemon model's swarm-wide state.
    daemon: Option<daemon::Swarm>,
}

fn host_index(id: &str, n: usize) -> Option<u32> {
    if id == "seed" {
        return u32::try_from(n).ok();
    }
    id.strip_prefix('p')?.parse().ok()
}

impl Sim {
    fn new(p: Params) -> anyhow::Result<Self> {
        if p.piece_length == 0 || p.size == 0 {
            bail!("size and piece length must be positive");
        }
        let pieces = u32::try_from(p.size.div_ceil(p.piece_length)).context("too many pieces")?;
        let n = p.hosts.len();
        let mut rng = SmallRng::seed_from_u64(p.seed);
        let mut hosts = Vec::with_capacity(n + 1);
        let mut links = p.hosts.clone();
        for (i, l) in p.hosts.iter().enumerate() {
            let (idc, location) = p.placement.get(i).cloned().unwrap_or_default();
            hosts.push(Host {
                id: format!("p{i}"),
                hostname: format!("p{i}"),
                ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                data_port: 4005,
                r#type: HostType::Normal as i32,
                idc,
                location,
                quic_port: 0,
                upload_rate_limit: l.up as u64,
            });
        }
        hosts.push(Host {
            id: "seed".to_owned(),
            hostname: "seed".to_owned(),
            ip: "10.255.255.254".to_owned(),
            data_port: 4005,
            r#type: HostType::Seed as i32,
            idc: String::new(),
            location: String::new(),
            quic_port: 0,
            upload_rate_limit: p.seed_rate as u64,
        });
        links.push(Links {
            up: p.seed_rate,
            down: p.seed_rate,
        });
        let arrival = (0..n)
            .map(|_| {
                if p.arrival > 0.0 {
                    rng.random_range(0.0..p.arrival)
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            pieces,
            n,
            hosts,
            links,
            arrival,
            state: vec![State::Unregistered; n + 1],
            have: (0..=n).map(|_| Bits::new(pieces, false)).collect(),
            inflight: (0..=n).map(|_| Bits::new(pieces, false)).collect(),
            count: vec![0; n + 1],
            conns: vec![Vec::new(); n + 1],
            done_at: vec![None; n + 1],
            tx: (0..=n).map(|_| None).collect(),
            rarity: vec![0; pieces as usize],
            full: Bits::new(pieces, true),
            rng,
            t: 0.0,
            metadata_sent: false,
            pending: HashMap::new(),
            decision_us: Vec::with_capacity(n),
            woken_us: Vec::new(),
            announcements: 0,
            first_announce: None,
            sched_cpu_at_first_announce: None,
            scheduler_pid: None,
            origin_bytes: 0.0,
            seed_bytes: 0.0,
            closed_with_error: 0,
            back_to_source: 0,
            parents_received: 0,
            task_id: format!("loadgen-{:016x}", p.seed ^ 0x5eed),
            daemon: p.daemon.map(|m| daemon::Swarm::new(m, n + 1, pieces)),
            p,
        })
    }

    fn piece_size(&self, k: u32) -> f64 {
        let start = u64::from(k) * self.p.piece_length;
        (self.p.size - start).min(self.p.piece_length) as f64
    }

    fn send(&mut self, i: u32, r: Request) {
        if let Some(tx) = self.tx.get(i as usize).and_then(Option::as_ref) {
            let _ = tx.send(Box::new(AnnouncePeerRequest { request: Some(r) }));
        }
    }

    fn register(&mut self, i: u32, io: &Io<'_>, back_to_source: bool) {
        let channel = io.channels[i as usize % io.channels.len()].clone();
        let tx = client::open_peer(io.rt.handle(), channel, i, io.inbound.clone());
        self.tx[i as usize] = Some(tx);
        let host = self.hosts[i as usize].clone();
        self.send(
            i,
            Request::Register(RegisterPeer {
                task_id: self.task_id.clone(),
                peer_id: format!("{}-peer", host.id),
                host: Some(host),
                source: Some(TaskSource {
                    url: "http://origin.invalid/blob".to_owned(),
                    headers: vec![],
                    digest: String::new(),
                }),
                piece_length: self.p.piece_length,
                back_to_source,
                priority: 0,
                resume: None,
            }),
        );
        if back_to_source {
            self.become_source(i);
        } else {
            self.state[i as usize] = State::Waiting;
            self.pending.insert(i, (Instant::now(), self.metadata_sent));
        }
    }

    fn become_source(&mut self, i: u32) {
        self.state[i as usize] = State::Source;
        self.conns[i as usize] = vec![Conn::to(ORIGIN)];
        if self.daemon.is_some() {
            self.d_connect(i as usize, 0);
        }
    }

    fn handle(&mut self, ev: Inbound, io: &Io<'_>) {
        match ev {
            Inbound::Host(cmd) => {
                if let Some(host_command::Command::DownloadTask(_)) = cmd.command {
                    let seed = self.n as u32;
                    if self.state[self.n] == State::Unregistered {
                        self.register(seed, io, true);
                        self.send(
                            seed,
                            Request::TaskMetadata(TaskMetadata {
                                content_length: self.p.size,
                                piece_length: self.p.piece_length,
                            }),
                        );
                        self.metadata_sent = true;
                    }
                }
            }
            Inbound::PeerClosed { peer, error } => {
                if let Some(e) = error {
                    self.closed_with_error += 1;
                    if self.closed_with_error <= 5 {
                        eprintln!("peer p{peer}: stream ended: {e}");
                    }
                }
                self.pending.remove(&peer);
            }
            Inbound::Peer { peer, response, at } => {
                if let Some((sent, metadata_known)) = self.pending.remove(&peer) {
                    let us = at.saturating_duration_since(sent).as_secs_f64() * 1e6;
                    if metadata_known {
                        self.decision_us.push(us);
                    } else {
                        self.woken_us.push(us);
                    }
                }
                let i = peer as usize;
                match response.response {
                    Some(Response::CandidateParents(c)) => {
                        if matches!(self.state[i], State::Waiting) {
                            self.state[i] = State::Active;
                        }
                        if self.state[i] != State::Active {
                            return;
                        }
                        for parent in c.parents {
                            let Some(j) = host_index(&parent.host_id, self.n) else {
                                continue;
                            };
                            self.parents_received += 1;
                            if j as usize != i && !self.conns[i].iter().any(|c| c.parent == j) {
                                self.conns[i].push(Conn::to(j));
                                if self.daemon.is_some() {
                                    self.d_connect(i, self.conns[i].len() - 1);
                                }
                            }
                        }
                    }
                    Some(Response::NeedBackToSource(_)) => {
                        if matches!(self.state[i], State::Waiting | State::Active) {
                            self.back_to_source += 1;
                            if self.daemon.is_some() {
                                self.d_close_all(i);
                            }
                            for c in std::mem::take(&mut self.conns[i]) {
                                if let Some(k) = c.piece {
                                    self.release(i, k);
                                }
                            }
                            self.become_source(peer);
                        }
                    }
                    // The simulated peers move no real bytes: no digest to check.
                    Some(Response::PieceDigests(_)) | None => {}
                }
            }
        }
    }

    /// Applies whatever arrived; then, while answers are owed, waits for them.
    fn pump(&mut self, io: &Io<'_>, wait_for_all: bool) -> anyhow::Result<()> {
        while let Some(ev) = io.try_next() {
            self.handle(ev, io);
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while wait_for_all && !self.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match io.next_within(left) {
                Some(ev) => self.handle(ev, io),
                None => bail!(
                    "{} requests unanswered after {ANSWER_TIMEOUT:?} (virtual t = {:.2} s)",
                    self.pending.len(),
                    self.t
                ),
            }
            while let Some(ev) = io.try_next() {
                self.handle(ev, io);
            }
        }
        Ok(())
    }

    /// Registers the peers due by now, at most `window` unanswered at a time.
    fn arrivals(&mut self, io: &Io<'_>, next: &mut Vec<u32>) -> anyhow::Result<()> {
        while let Some(&i) = next.last() {
            if self.arrival[i as usize] > self.t {
                break;
            }
            while self.pending.len() >= self.p.window {
                let ev = io
                    .next_within(ANSWER_TIMEOUT)
                    .context("scheduler stopped answering registrations")?;
                self.handle(ev, io);
            }
            next.pop();
            self.register(i, io, false);
            while let Some(ev) = io.queued() {
                self.handle(ev, io);
            }
        }
        Ok(())
    }

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
    fn mark_in_flight(&mut self, i: usize, k: u32) {
        self.inflight[i].set(k, true);
        self.rarity[k as usize] += 1;
    }

    /// Peer `i` gave up fetching piece `k` (not received): no longer in flight, nor counted.
    fn release(&mut self, i: usize, k: u32) {
        if self.inflight[i].get(k) {
            self.inflight[i].set(k, false);
            self.rarity[k as usize] -= 1;
        }
    }

    /// `conn` of `child` received its piece at `at`, after the parent spent `cost` seconds on
    /// it: stored, announced.
    fn complete(&mut self, child: usize, conn: usize, at: f64, cost: f64) {
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
    fn start_next(&mut self, child: usize, conn: usize, at: f64) -> bool {
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

    /// One virtual step: start idle connections, share the links, move the bytes.
    fn step(
        &mut self,
        solver: &mut Solver,
        flows: &mut Vec<(u32, u32)>,
        refs: &mut Vec<(u32, u32)>,
        rates: &mut Vec<f64>,
    ) {
        let total = self.n + 1;
        let origin_link = (2 * total) as u32;
        // Peers take turns from a random one on: the daemons' requests reach a parent in no
        // fixed order (with a fixed order, peer 0 would be the first to ask a super-seeding
        // seed for every new piece).
        let first = self.rng.random_range(0..total);
        for x in 0..total {
            let i = (first + x) % total;
            if !matches!(self.state[i], State::Active | State::Source) {
                continue;
            }
            for j in 0..self.conns[i].len() {
                if self.daemon.is_some() {
                    self.d_refill(i, j, self.t);
                } else if self.conns[i][j].piece.is_none() {
                    self.start_next(i, j, self.t);
                }
            }
        }
        flows.clear();
        refs.clear();
        for i in 0..total {
            for (j, c) in self.conns[i].iter().enumerate() {
                if c.piece.is_some() {
                    let up = if c.parent == ORIGIN {
                        origin_link
                    } else {
                        c.parent
                    };
                    flows.push((up, (total + i) as u32));
                    refs.push((i as u32, j as u32));
                }
            }
        }
        let mut capacity: Vec<f64> = Vec::with_capacity(2 * total + 1);
        capacity.extend(self.links.iter().map(|l| l.up));
        capacity.extend(self.links.iter().map(|l| l.down));
        capacity.push(self.p.origin_rate);
        if self.p.upload_first == 0 {
            solver.solve(&capacity, flows, rates);
        } else {
            self.solve_ordered(solver, &capacity, flows, refs, rates);
        }
        if std::env::var_os("LOADGEN_TRACE").is_some()
            && ((self.t / self.p.step).round() as u64) & 63 == 0
        {
            let total_rate: f64 = rates.iter().sum();
            let cap: f64 = self.links[..self.n].iter().map(|l| l.down).sum();
            let active = (0..self.n)
                .filter(|i| self.state[*i] == State::Active)
                .count();
            let idle_conns: usize = (0..self.n)
                .map(|i| self.conns[i].iter().filter(|c| c.piece.is_none()).count())
                .sum();
            eprintln!(
                "t={:.1} util={:.3} flows={} active_peers={} idle_conns={} done={}",
                self.t,
                total_rate / cap,
                flows.len(),
                active,
                idle_conns,
                self.normal_done()
            );
            if self.daemon.is_some() && std::env::var_os("LOADGEN_DUMP").is_some() {
                self.d_dump();
            }
            if ((self.t / self.p.step).round() as u64).is_multiple_of(640) {
                let mut kids = vec![0usize; total];
                for i in 0..total {
                    for c in &self.conns[i] {
                        if c.parent != ORIGIN {
                            kids[c.parent as usize] += 1;
                        }
                    }
                }
                let mut hist = [0usize; 24];
                for k in &kids[..self.n] {
                    hist[(*k).min(23)] += 1;
                }
                let mut phist = [0usize; 24];
                for i in 0..self.n {
                    phist[self.conns[i].len().min(23)] += 1;
                }
                eprintln!(
                    "  children histogram {hist:?} seed children {}",
                    kids[self.n]
                );
                eprintln!("  parents histogram  {phist:?}");
            }
            if self.n - self.normal_done() <= 3 {
                for i in (0..self.n).filter(|i| self.state[*i] == State::Active) {
                    let rate: f64 = refs
                        .iter()
                        .zip(rates.iter())
                        .filter(|((c, _), _)| *c as usize == i)
                        .map(|(_, r)| *r)
                        .sum();
                    let parents: Vec<String> = self.conns[i]
                        .iter()
                        .map(|c| {
                            let kids = (0..total)
                                .filter(|x| {
                                    self.conns[*x]
                                        .iter()
                                        .any(|cc| cc.parent == c.parent && cc.piece.is_some())
                                })
                                .count();
                            format!(
                                "{}:{}/{}",
                                c.parent,
                                self.count.get(c.parent as usize).copied().unwrap_or(0),
                                kids
                            )
                        })
                        .collect();
                    eprintln!(
                        "  straggler p{i}: {} pieces, {:.1} Mbit/s, parents (id:pieces/active children) {}",
                        self.count[i],
                        rate / 125_000.0,
                        parents.join(" ")
                    );
                }
            }
        }
        let dt = self.p.step;
        for f in 0..refs.len() {
            let (i, j) = (refs[f].0 as usize, refs[f].1 as usize);
            let rate = rates[f];
            if rate <= 0.0 {
                continue;
            }
            let mut budget = rate * dt;
            loop {
                let c = &mut self.conns[i][j];
                if c.piece.is_none() {
                    break;
                }
                if budget < c.remaining {
                    c.remaining -= budget;
                    break;
                }
                budget -= c.remaining;
                c.remaining = 0.0;
                let at = self.t + dt - budget / rate;
                if self.daemon.is_some() {
                    // The next queued request goes on the wire at once (and a pause after
                    // `Busy` ends the step for this connection).
                    self.d_finish(i, j, at);
                    if self.conns[i].get(j).is_none_or(|c| c.piece.is_none()) {
                        break;
                    }
                    continue;
                }
                let started = self.conns[i][j].started;
                self.complete(i, j, at, at - started);
                if !self.start_next(i, j, at) {
                    break;
                }
            }
        }
        self.t += dt;
    }

    /// Rates when every parent serves its `upload_first` oldest requests first: those flows
    /// share the links max-min fairly; the rest get what they leave (or nothing, `queue`).
    fn solve_ordered(
        &mut self,
        solver: &mut Solver,
        capacity: &[f64],
        flows: &[(u32, u32)],
        refs: &[(u32, u32)],
        rates: &mut Vec<f64>,
    ) {
        // Flows sorted by their queue (uplink, and with `per_piece` the piece), then by
        // preference (fewest pieces held with `poorest`, then request time); the first
        // `upload_first` of each queue are the head class. Keys are computed once: sorting
        // 80,000 flows every step must stay cheap.
        let mut keys: Vec<(u64, u32, u64, u32)> = Vec::with_capacity(flows.len());
        for (f, &(up, _)) in flows.iter().enumerate() {
            let (i, j) = refs[f];
            let c = &self.conns[i as usize][j as usize];
            let piece = if self.p.upload_per_piece {
                c.piece.unwrap_or(u32::MAX)
            } else {
                0
            };
            let holds = if self.p.upload_poorest {
                self.count[i as usize]
            } else {
                0
            };
            // Start times are non-negative, so their bit patterns order like the values.
            keys.push((
                (u64::from(up) << 32) | u64::from(piece),
                holds,
                c.started.max(0.0).to_bits(),
                f as u32,
            ));
        }
        keys.sort_unstable();
        let mut head = vec![false; flows.len()];
        let mut run = 0usize;
        for x in 0..keys.len() {
            if x > 0 && keys[x - 1].0 == keys[x].0 {
                run += 1;
            } else {
                run = 0;
            }
            head[keys[x].3 as usize] = run < self.p.upload_first;
        }
        let split = |want: bool| -> (Vec<u32>, Vec<(u32, u32)>) {
            let idx: Vec<u32> = (0..flows.len() as u32)
                .filter(|f| head[*f as usize] == want)
                .collect();
            let fl = idx.iter().map(|f| flows[*f as usize]).collect();
            (idx, fl)
        };
        let (head_idx, head_flows) = split(true);
        let (tail_idx, tail_flows) = split(false);
        rates.clear();
        rates.resize(flows.len(), 0.0);
        let mut sub = Vec::new();
        solver.solve(capacity, &head_flows, &mut sub);
        let mut residual = capacity.to_vec();
        for (f, r) in head_idx.iter().zip(&sub) {
            rates[*f as usize] = *r;
            let (a, b) = flows[*f as usize];
            residual[a as usize] -= r;
            residual[b as usize] -= r;
        }
        if self.p.upload_queue || tail_flows.is_empty() {
            return;
        }
        for r in &mut residual {
            *r = r.max(0.0);
        }
        solver.solve(&residual, &tail_flows, &mut sub);
        for (f, r) in tail_idx.iter().zip(&sub) {
            rates[*f as usize] = *r;
        }
    }

    fn normal_done(&self) -> usize {
        self.done_at[..self.n]
            .iter()
            .filter(|d| d.is_some())
            .count()
    }
}

/// Tasks the runtime runs before it polls the sockets again (tokio's default is 61). A
/// step wakes thousands of peer tasks; with the default, running them all took dozens of
/// turns of [`Io::drive`], each with its own `epoll_wait`.
pub const EVENT_INTERVAL: u32 = 4096;

/// A runtime turn (run up to [`EVENT_INTERVAL`] ready tasks, then poll the sockets without
/// waiting) that takes less than this found nothing to run: an `epoll_wait` and little else.
const IDLE_TURN: Duration = Duration::from_micros(10);
/// Consecutive idle turns after which [`Io::drive`] returns: the tasks the simulation woke
/// have run, their writes are out, and what the sockets had has been read.
const IDLE_TURNS: u32 = 2;
/// Most turns of one [`Io::drive`] (each up to [`EVENT_INTERVAL`] task polls), should the
/// heuristic above never see an idle turn.
const MAX_DRIVE_TURNS: u32 = 1000;

/// The runtime pieces the simulation talks through.
///
/// The runtime is single-threaded and runs only while the simulation waits in one of the
/// methods below: the simulated peers' requests pile up while the simulation computes and
/// go out together when it next waits, and no message ever crosses between threads. (With
/// a runtime thread beside the simulation, every request and answer woke the other thread;
/// on a 2-CPU machine those wake-ups cost the simulator more CPU than the scheduler spent
/// on the decisions.)
pub struct Io<'a> {
    /// Current-thread runtime of the stream tasks.
    pub rt: &'a tokio::runtime::Runtime,
    /// Connections to the scheduler.
    pub channels: Vec<Channel>,
    /// Everything the scheduler sends.
    pub events: RefCell<mpsc::UnboundedReceiver<Inbound>>,
    /// Sender side of `events`, cloned into every stream task.
    pub inbound: mpsc::UnboundedSender<Inbound>,
    /// Process id of the scheduler, when it runs on this machine (for its CPU time).
    pub scheduler_pid: Option<u32>,
    /// The scheduler's `/metrics` endpoint, when this process started it (for the time its
    /// swarm state took per registration).
    pub scheduler_metrics: Option<std::net::SocketAddr>,
}

impl Io<'_> {
    /// Runs the stream tasks until they are idle, without waiting for the network. A step
    /// wakes thousands of peer tasks (one per peer with a finished piece to announce); a
    /// fixed two turns of 61 tasks (until 2026-12-02) left a backlog that grew step after
    /// step, and the scheduler heard of pieces seconds late.
    fn drive(&self) {
        self.rt.block_on(async {
            let mut idle = 0;
            for _ in 0..MAX_DRIVE_TURNS {
                let turn = Instant::now();
                tokio::task::yield_now().await;
                if turn.elapsed() < IDLE_TURN {
                    idle += 1;
                    if idle >= IDLE_TURNS {
                        break;
                    }
                } else {
                    idle = 0;
                }
            }
        });
    }

    /// An event already received, without running the stream tasks.
    fn queued(&self) -> Option<Inbound> {
        self.events.borrow_mut().try_recv().ok()
    }

    /// An event already received or arriving while the stream tasks run once
    /// ([`Self::drive`]); `None` if there is none yet.
    fn try_next(&self) -> Option<Inbound> {
        if let Some(ev) = self.queued() {
            return Some(ev);
        }
        self.drive();
        self.queued()
    }

    /// The next event, waiting for it up to `limit` while the stream tasks run.
    fn next_within(&self, limit: Duration) -> Option<Inbound> {
        if let Some(ev) = self.queued() {
            return Some(ev);
        }
        let mut events = self.events.borrow_mut();
        // The timer is made inside the runtime: it needs the runtime's clock.
        self.rt
            .block_on(async { tokio::time::timeout(limit, events.recv()).await })
            .ok()
            .flatten()
    }
}

/// Runs the whole simulation (blocking; call from a blocking thread).
pub fn run(p: Params, io: Io<'_>) -> anyhow::Result<Report> {
    let wall = Instant::now();
    let load_start = cpu::load_average();
    let own_cpu_start = cpu::own_cpu_s();
    let sched_cpu_start = io.scheduler_pid.and_then(cpu::process_cpu_s);
    let mut sim = Sim::new(p)?;
    sim.scheduler_pid = io.scheduler_pid;
    let seed_host = sim.hosts[sim.n].clone();
    io.rt.block_on(client::announce_host(
        io.channels[0].clone(),
        seed_host,
        io.inbound.clone(),
    ))?;
    // Arrival order: latest first in the vector, so that `pop` yields the earliest.
    let mut next: Vec<u32> = (0..sim.n as u32).collect();
    next.sort_by(|a, b| sim.arrival[*b as usize].total_cmp(&sim.arrival[*a as usize]));
    let mut solver = Solver::default();
    let (mut flows, mut refs, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_report = Instant::now();
    while sim.normal_done() < sim.n {
        if sim.t > sim.p.max_time {
            eprintln!(
                "virtual time limit {:.0} s reached with {} peers unfinished",
                sim.p.max_time,
                sim.n - sim.normal_done()
            );
            break;
        }
        sim.arrivals(&io, &mut next)?;
        sim.pump(&io, true)?;
        sim.step(&mut solver, &mut flows, &mut refs, &mut rates);
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  virtual {:6.1} s  done {:6}/{}  announcements {}  wall {:.0} s",
                sim.t,
                sim.normal_done(),
                sim.n,
                sim.announcements,
                wall.elapsed().as_secs_f64()
            );
        }
    }
    let sim_end = Instant::now();
    // Wait until the scheduler has processed every announcement (StatTask counts them).
    let mut client = SchedulerClient::new(io.channels[0].clone());
    let expected: u64 = sim.count.iter().map(|c| u64::from(*c)).sum();
    let mut processed = 0u64;
    let confirm_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < confirm_deadline {
        let info = io.rt.block_on(client.stat_task(StatTaskRequest {
            task_id: sim.task_id.clone(),
        }));
        processed = match info {
            Ok(r) => r
                .into_inner()
                .peers
                .iter()
                .map(|p| u64::from(p.finished_pieces))
                .sum(),
            Err(e) => {
                eprintln!("StatTask failed: {e}");
                0
            }
        };
        if processed >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_processed = Instant::now();
    let sched_cpu_end = io.scheduler_pid.and_then(cpu::process_cpu_s);
    let own_cpu_end = cpu::own_cpu_s();
    let announce_secs = sim.first_announce.map_or(0.0, |f| {
        all_processed.saturating_duration_since(f).as_secs_f64()
    });

    // Close every stream.
    for tx in &mut sim.tx {
        tx.take();
    }
    let n = sim.n as f64;
    let s = sim.p.size as f64;
    let d_min = sim.links[..sim.n]
        .iter()
        .map(|l| l.down)
        .fold(f64::INFINITY, f64::min);
    let sum_up: f64 = sim.links[..sim.n].iter().map(|l| l.up).sum();
    let t_star = (s / sim.p.origin_rate)
        .max(s / d_min)
        .max(n * s / (sim.p.origin_rate + sum_up));
    let completion: Vec<f64> = sim.done_at[..sim.n]
        .iter()
        .map(|d| d.unwrap_or(f64::INFINITY))
        .collect();
    Ok(Report {
        peers: sim.n,
        size: sim.p.size,
        piece_length: sim.p.piece_length,
        pieces: sim.pieces,
        step_s: sim.p.step,
        t_star_s: t_star,
        completion_s: Percentiles::of(completion),
        unfinished: sim.n - sim.normal_done(),
        decision_latency_us: Percentiles::of(std::mem::take(&mut sim.decision_us)),
        woken_by_metadata_us: Percentiles::of(std::mem::take(&mut sim.woken_us)),
        announcements: sim.announcements,
        announcements_processed: processed,
        announce_wall_s: announce_secs,
        announcements_per_s: if announce_secs > 0.0 {
            processed.min(sim.announcements) as f64 / announce_secs
        } else {
            0.0
        },
        origin_copies: sim.origin_bytes / s,
        seed_copies: sim.seed_bytes / s,
        model: sim
            .p
            .daemon
            .map_or_else(|| "flow".to_owned(), |m| m.describe()),
        back_to_source: sim.back_to_source,
        parents_received: sim.parents_received,
        streams_failed: sim.closed_with_error,
        scheduler_cpu_s: sched_cpu_end.zip(sched_cpu_start).map(|(e, s)| e - s),
        scheduler_cpu_decisions_s: sim
            .sched_cpu_at_first_announce
            .zip(sched_cpu_start)
            .map(|(e, s)| e - s),
        scheduler_cpu_announcements_s: sched_cpu_end
            .zip(sim.sched_cpu_at_first_announce)
            .map(|(e, s)| e - s),
        loadgen_cpu_s: own_cpu_end.zip(own_cpu_start).map(|(e, s)| e - s),
        scheduler_decision_us: io.scheduler_metrics.and_then(|addr| {
            let text = crate::report::scrape(addr)
                .map_err(|e| eprintln!("scraping the scheduler's metrics at {addr}: {e:#}"))
                .ok()?;
            crate::report::histogram_quantiles(
                &text,
                "damselfly_scheduler_registration_seconds",
                1e6,
            )
        }),
        pinned: false,
        scheduler_threads: None,
        load_average_start: load_start,
        load_average_end: cpu::load_average(),
        virtual_s: sim.t,
        sim_wall_s: sim_end.duration_since(wall).as_secs_f64(),
        wall_s: wall.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peer 0 serves piece 5 to peers 1 (asked first, holds 3 pieces) and 2 (asked later,
    /// holds 1); uplinks 10, downlinks 100. Returns the rates of the two flows.
    fn rates(upload_first: usize, per_piece: bool, poorest: bool) -> Vec<f64> {
        let links = Links {
            up: 10.0,
            down: 100.0,
        };
        let mut sim = Sim::new(Params {
            size: 8 * 1024,
            piece_length: 1024,
            hosts: vec![links; 3],
            placement: Vec::new(),
            origin_rate: 10.0,
            seed_rate: 10.0,
            daemon: None,
            step: 0.05,
            arrival: 0.0,
            window: 1,
            max_time: 10.0,
            seed: 1,
            random_pieces: false,
            upload_first,
            upload_queue: false,
            upload_per_piece: per_piece,
            upload_poorest: poorest,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        sim.count[1] = 3;
        sim.count[2] = 1;
        for (child, started) in [(1usize, 0.0), (2, 1.0)] {
            sim.conns[child].push(Conn {
                piece: Some(5),
                remaining: 1024.0,
                started,
                ..Conn::to(0)
            });
        }
        let total = sim.n + 1;
        let flows = vec![(0, (total + 1) as u32), (0, (total + 2) as u32)];
        let refs = vec![(1, 0), (2, 0)];
        let mut capacity: Vec<f64> = sim.links.iter().map(|l| l.up).collect();
        capacity.extend(sim.links.iter().map(|l| l.down));
        capacity.push(sim.p.origin_rate);
        let mut solver = Solver::default();
        let mut out = Vec::new();
        if upload_first == 0 {
            solver.solve(&capacity, &flows, &mut out);
        } else {
            sim.solve_ordered(&mut solver, &capacity, &flows, &refs, &mut out);
        }
        out
    }

    #[test]
    fn upload_ordering() {
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
        // Max-min fair: the uplink is split.
        let r = rates(0, false, false);
        assert!(close(&r, &[5.0, 5.0]), "{r:?}");
        // Oldest request first: peer 1 gets the whole uplink.
        let r = rates(1, true, false);
        assert!(close(&r, &[10.0, 0.0]), "{r:?}");
        // Poorest child first: peer 2.
        let r = rates(1, true, true);
        assert!(close(&r, &[0.0, 10.0]), "{r:?}");
        // Two at a time: both at full share again.
        let r = rates(2, true, true);
        assert!(close(&r, &[5.0, 5.0]), "{r:?}");
    }
}
