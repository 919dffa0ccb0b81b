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
//!
//! Files: this one holds the model's state and its exchanges with the scheduler;
//! `pieces.rs` piece picking and completion, `step.rs` one virtual step, `daemon.rs` the
//! daemon model, `run.rs` the whole run, `io.rs` the scheduler streams.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::sync::mpsc;
use wire::proto::scheduler::scheduler_client::SchedulerClient;
use wire::proto::scheduler::{
    announce_peer_request::Request, announce_peer_response::Response, host_command,
    AnnouncePeerRequest, Host, HostType, RegisterPeer, StatTaskRequest, TaskMetadata, TaskSource,
};

use crate::client::{self, Inbound};
use crate::cpu;
use crate::flow::Solver;
use crate::report::{Percentiles, Report};

mod daemon;
mod io;
mod pieces;
mod run;
mod step;
#[cfg(test)]
mod tests;
pub use daemon::DaemonModel;
pub use io::{Io, EVENT_INTERVAL};
pub use run::run;

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
                        if self.daemon.is_some() && self.d_loses_parents(i, self.t, c.parents.len())
                        {
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

    fn normal_done(&self) -> usize {
        self.done_at[..self.n]
            .iter()
            .filter(|d| d.is_some())
            .count()
    }
}
