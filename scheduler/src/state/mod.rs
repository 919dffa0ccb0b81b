//! The swarm state machine, without I/O.
//!
//! [`SchedulerState`] knows the live hosts, the tasks and their peers. The runtime shell
//! ([`crate::service`]) names every stream with a key ([`HostKey`] for an `AnnounceHost`
//! stream, [`PeerKey`] for an `AnnouncePeer` stream), feeds what arrives on it into one of the
//! `handle`-style methods below, and delivers the [`Output`]s they return:
//!
//! 1. [`SchedulerState::host_announced`] when an `AnnounceHost` stream opens,
//!    [`SchedulerState::host_left`] when it closes.
//! 2. [`SchedulerState::register_peer`] with the first message of an `AnnouncePeer` stream,
//!    then [`SchedulerState::peer_request`] for each later message, and
//!    [`SchedulerState::peer_left`] when the stream ends (or an output to it could not be
//!    delivered).
//! 3. [`SchedulerState::announce_task`] for `AnnounceTask` (a complete task imported on a
//!    host; the runtime picks a fresh [`PeerKey`] for it).
//! 4. [`SchedulerState::stat_task`] to answer `StatTask`.
//! 5. [`SchedulerState::preheat`] when the manager asks for a task ahead of time, then
//!    [`SchedulerState::preheat_status`] until it is done or failed, then
//!    [`SchedulerState::preheat_finished`].
//! 6. [`SchedulerState::set_config`] when the scheduling knobs change at run time (the
//!    manager's dynamic config).
//!
//! Nothing here blocks, reads a clock or panics on peer input; tests drive it directly.
//!
//! Parent selection (see the crate README for the swarm strategy): a peer that has been
//! scheduled once can serve at once (its data plane long-polls parents for new pieces), so
//! every peer of a burst uploads from its first piece on. Candidates are a random sample of
//! the task's serving peers, filtered (own host, blocked hosts, slow hosts, full upload slots,
//! cycles when `dag` is on), scored by the [`evaluator`], and the best are sent. A peer that
//! becomes able to serve is also pushed to a few peers that still have fewer parents than
//! `parent_limit`, so that the last peers of a burst have children too.
//!
//! [`SchedulerState`] is one type; its methods live in files by concern: `hosts.rs` (host
//! streams, the interned host table), `peers.rs` (registration, `AnnounceTask`, removal),
//! `reports.rs` (what a peer reports on its stream), `parents.rs` (parent selection and the
//! messages that carry it), `recovery.rs` (seed triggers, back to source, lost pieces),
//! `preheat.rs` and `digests.rs`. This file holds the types and the bookkeeping they share.

mod digests;
pub mod evaluator;
mod hosts;
mod keyset;
mod parents;
mod peers;
mod pieces;
mod preheat;
mod recovery;
mod reports;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

/// Maps and sets keyed by peer keys and ids: foldhash (randomly seeded per map, several times
/// faster than SipHash on short keys) instead of the standard hasher.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use rand::rngs::SmallRng;
use rand::SeedableRng as _;
use tracing::info;
use wire::piece::MAX_PIECE_COUNT;
use wire::proto::scheduler::{
    announce_peer_response, AnnouncePeerResponse, Host, HostCommand, HostType, TaskMetadata,
    TaskSource,
};
use wire::PieceLayout;

use crate::config::{DigestSources, SchedulingConfig};
pub use digests::DIGEST_BATCH;
use digests::{Recorded, TaskDigests};
use evaluator::ParentView;
use hosts::{HostIx, HostTable};
use keyset::KeySet;
use pieces::PieceSet;
use stats::CostWindow;

/// Most bad parents remembered per peer: enough for any real swarm, bounded against a peer
/// that sends endless reschedule lists.
pub const MAX_BAD_PARENTS: usize = 1024;

/// Most peers visited by one cycle check (`dag` on); beyond it the edge is refused.
pub const DAG_SEARCH_LIMIT: usize = 4096;

/// Reason sent with `NeedBackToSource` when no seed host is live for a new task.
pub const REASON_NO_SEED: &str = "no seed peer available";
/// Reason sent with `NeedBackToSource` when the task's size is known but nobody can serve it.
pub const REASON_NO_PARENT: &str = "no parent available";
/// Reason sent with `NeedBackToSource` when a peer asked for new parents too often.
pub const REASON_RETRY_LIMIT: &str = "reschedule limit reached";
/// Reason sent with a partial `NeedBackToSource` (pieces listed) when the last live holder of
/// some pieces left and no seed peer can be triggered.
pub const REASON_PIECES_LOST: &str = "pieces lost with their last holder";
/// A scheduled peer with fewer than `parent_limit` parents is offered more every this many
/// finished pieces (see [`SchedulerState`]'s top-up in `piece_finished`).
pub const TOP_UP_EVERY: u32 = 8;
/// A scheduled peer with fewer parents than this (or `parent_limit`, if lower) is offered
/// more at every finished piece. A peer with one or two parents downloads at a fraction of
/// its link when the uplinks are as slow as the downlinks (each parent shares its uplink
/// among its children), so waiting [`TOP_UP_EVERY`] pieces for the next parent kept it slow
/// for seconds and it finished last (lab, 5 hosts at 100 Mbit: 16 Mbit for 3.5 s).
pub const EAGER_TOP_UP_BELOW: usize = 4;

/// Where a preheated task stands ([`SchedulerState::preheat_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreheatStatus {
    /// A peer holds the whole task (normally the triggered seed peer).
    Done,
    /// A seed was triggered, or a peer fetches the task; ask again later.
    Pending,
    /// Nobody fetches the task and no seed can be triggered for it.
    Failed(String),
}

/// Names one `AnnounceHost` stream (not the host: a host that reconnects gets a new key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostKey(pub u64);

/// Names one `AnnouncePeer` stream, i.e. one peer of one task (or one `AnnounceTask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub u64);

/// Something the runtime must deliver.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send `response` on the `AnnouncePeer` stream of `peer`. If that fails, call
    /// [`SchedulerState::peer_left`] for it.
    Peer {
        /// Destination stream.
        peer: PeerKey,
        /// Message to send.
        response: AnnouncePeerResponse,
    },
    /// Send `command` on the `AnnounceHost` stream `host`. If that fails, call
    /// [`SchedulerState::host_left`] for it.
    Host {
        /// Destination stream.
        host: HostKey,
        /// Command to send.
        command: HostCommand,
    },
    /// End the `AnnouncePeer` stream of `peer` with an error: the state has already forgotten
    /// it (a newer registration with the same peer id replaced it).
    ClosePeer {
        /// Stream to end.
        peer: PeerKey,
        /// Why, for the error status.
        reason: String,
    },
}

/// A request the state refuses; the runtime answers it with `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The host is absent or has an empty id.
    #[error("host with a non-empty id is required")]
    MissingHost,
    /// `task_id` is empty.
    #[error("task_id is required")]
    MissingTaskId,
    /// `peer_id` is empty.
    #[error("peer_id is required")]
    MissingPeerId,
    /// The stream key is already in use (a bug in the runtime, not in the peer).
    #[error("stream already registered")]
    DuplicateKey,
    /// `AnnounceTask` without valid metadata, or with a piece count that does not match it.
    #[error("invalid task metadata: {0}")]
    InvalidMetadata(String),
    /// `AnnounceTask` metadata differs from what the scheduler already knows of the task.
    #[error("task metadata conflicts with the known size of the task")]
    ConflictingMetadata,
}

/// One peer: a host downloading (or holding) one task.
#[derive(Debug)]
struct Peer {
    peer_id: String,
    task_id: String,
    /// [`Task::serial`] of its task: compared instead of the id in the per-candidate checks.
    task_serial: u64,
    host: Host,
    /// Its host's entry in [`SchedulerState::host_stats`], compared instead of the host id.
    host_ix: HostIx,
    /// Fetches from the origin (registered with `back_to_source`, or told to).
    source: bool,
    /// Reported `PeerFinished` (or was announced complete).
    done: bool,
    /// Needs parents and has none to use: gets them as soon as any appear.
    waiting: bool,
    /// Received `CandidateParents` at least once: it fetches, so it can serve what it gets.
    scheduled: bool,
    /// Came from `AnnounceTask`: no stream; lives until its host's stream closes.
    announced: bool,
    pieces: PieceSet,
    /// Parents it currently downloads from (edges child → parent).
    parents: HashSet<PeerKey>,
    /// Peers that currently download from it; their number is its used upload slots.
    children: HashSet<PeerKey>,
    /// Host ids this peer reported as bad parents (failed or corrupt pieces).
    bad_hosts: HashSet<String>,
    pieces_failed: u64,
    reschedules: u32,
    /// Pieces this peer was told to fetch from the origin (a partial `NeedBackToSource`);
    /// those it does not hold yet are not handed to another peer.
    origin_pieces: Vec<u32>,
    /// Received the task's digests (with its first `CandidateParents` once the task had a
    /// trusted source): later digests are pushed to it.
    digests_synced: bool,
    /// This scheduler sent it to the origin for the whole task (`NeedBackToSource`), as
    /// opposed to a peer that registered as back-to-source on its own.
    sent_to_source: bool,
}

impl Peer {
    /// Whether the peer can be handed out as a parent.
    fn can_serve(&self, metadata_known: bool) -> bool {
        metadata_known && (self.done || self.scheduled || self.source || self.pieces.count() > 0)
    }

    /// Whether the peer still wants parents.
    fn wants_parents(&self) -> bool {
        !self.done && !self.source
    }
}

/// A seed host told to fetch a task.
#[derive(Debug)]
struct SeedTrigger {
    host_id: String,
    host: HostKey,
    /// The seed's peer, once it registered.
    peer: Option<PeerKey>,
}

/// One task and its swarm.
#[derive(Debug, Default)]
struct Task {
    /// Unique among the tasks this state ever held (never 0 once the task is in the map).
    serial: u64,
    /// Origin of the task, from the first registration that named one.
    source: Option<TaskSource>,
    /// Piece length asked for by that registration (0: derive from the content length).
    piece_length: u64,
    metadata: Option<PieceLayout>,
    peers: KeySet<PeerKey>,
    by_peer_id: HashMap<String, PeerKey>,
    /// Peers that can be offered as parents.
    servers: KeySet<PeerKey>,
    /// Scheduled peers that still have fewer than `parent_limit` parents.
    hungry: KeySet<PeerKey>,
    /// Peers waiting for parents (all of them while the size is unknown).
    waiting: KeySet<PeerKey>,
    /// Peers told to go back to the origin.
    back_to_source: u32,
    trigger: Option<SeedTrigger>,
    /// Seed hosts that failed this task (never triggered again for it).
    failed_seeds: HashSet<String>,
    /// Preheats waiting for this task ([`SchedulerState::preheat`]): while non-zero the task
    /// wants a source even without peers, and is kept when its last peer leaves.
    preheats: u32,
    /// Trusted per-piece digests (see `digests.rs`).
    digests: TaskDigests,
}

impl Task {
    fn metadata_message(&self) -> Option<TaskMetadata> {
        self.metadata.map(|m| TaskMetadata {
            content_length: m.content_length(),
            piece_length: m.piece_length(),
        })
    }

    /// Largest piece number + 1 accepted from peers.
    fn piece_bound(&self) -> u32 {
        match self.metadata {
            Some(m) => m.piece_count(),
            None => u32::try_from(MAX_PIECE_COUNT).unwrap_or(u32::MAX),
        }
    }
}

/// The scheduler's whole in-memory state: hosts, tasks, peers. See the module docs for the
/// order of calls.
#[derive(Debug)]
pub struct SchedulerState {
    config: SchedulingConfig,
    hosts: BTreeMap<HostKey, Host>,
    tasks: HashMap<String, Task>,
    /// Boxed: a peer is a few hundred bytes, and growing the map must not move them all
    /// (at 10,000 peers that was a multi-megabyte copy into freshly faulted pages, stalling
    /// every stream for milliseconds).
    peers: HashMap<PeerKey, Box<Peer>>,
    host_stats: HostTable,
    /// Last [`Task::serial`] handed out.
    task_serial: u64,
    /// Set while a batch (metadata arrival, waking waiting peers) schedules many peers, so
    /// that peers scheduled inside it do not start nested batches.
    in_batch: bool,
    /// Tasks with digests not pushed yet ([`SchedulerState::flush_digests`]).
    digests_dirty: HashSet<String>,
    rng: SmallRng,
}

fn is_seed(host: &Host) -> bool {
    host.r#type() == HostType::Seed
}

impl SchedulerState {
    /// Whether `peer`, reporting piece `n` as fetched from the origin, gives its trusted
    /// digest (`scheduling.digest_sources`): a seed peer fetching from the origin always; a
    /// peer this scheduler sent there unless only seeds count; a peer that registered as
    /// back-to-source on its own only with `any`.
    fn gives_digest(&self, peer: &Peer, n: u32) -> bool {
        let from_origin = peer.source || peer.origin_pieces.contains(&n);
        if is_seed(&peer.host) {
            return from_origin;
        }
        match self.config.digest_sources {
            DigestSources::SeedPeers => false,
            DigestSources::Scheduled => peer.sent_to_source || peer.origin_pieces.contains(&n),
            DigestSources::Any => from_origin,
        }
    }

    /// Whether a peer on `host` this scheduler sends to the origin will give digests.
    fn sent_peer_gives_digests(&self, host: &Host) -> bool {
        is_seed(host) || self.config.digest_sources != DigestSources::SeedPeers
    }
}

/// Rendezvous (highest random weight) hash of a (task, host) pair: FNV-1a, then the
/// splitmix64 finaliser to spread the bits. Stable across processes and versions.
fn rendezvous_weight(task_id: &str, host_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.bytes().chain([0xff]).chain(host_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn peer_response(response: announce_peer_response::Response) -> AnnouncePeerResponse {
    AnnouncePeerResponse {
        response: Some(response),
    }
}

fn set_member(set: &mut KeySet<PeerKey>, key: PeerKey, member: bool) {
    if member {
        set.insert(key);
    } else {
        set.remove(&key);
    }
}

impl SchedulerState {
    /// An empty state with a randomly seeded tie-breaker.
    pub fn new(config: SchedulingConfig) -> Self {
        Self::with_rng(config, SmallRng::from_os_rng())
    }

    /// An empty state whose random choices follow `seed` (for reproducible tests).
    pub fn with_seed(config: SchedulingConfig, seed: u64) -> Self {
        Self::with_rng(config, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(config: SchedulingConfig, rng: SmallRng) -> Self {
        Self {
            config,
            hosts: BTreeMap::new(),
            tasks: HashMap::default(),
            peers: HashMap::default(),
            host_stats: HostTable::default(),
            task_serial: 0,
            in_batch: false,
            digests_dirty: HashSet::default(),
            rng,
        }
    }

    /// Number of live `AnnounceHost` streams.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// Number of tasks in memory.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// Number of registered peers (over all tasks).
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Whether `peer` is registered (false after it failed, left or was replaced).
    pub fn has_peer(&self, peer: PeerKey) -> bool {
        self.peers.contains_key(&peer)
    }

    /// The scheduling knobs in force.
    pub fn config(&self) -> &SchedulingConfig {
        &self.config
    }

    /// Replaces the scheduling knobs (the manager's dynamic config). Decisions from now on
    /// use the new values; edges already made stay (a lowered slot or parent limit is reached
    /// as children finish and parents leave). The caller validates `config` first.
    pub fn set_config(&mut self, config: SchedulingConfig) {
        if config == self.config {
            return;
        }
        info!(?config, "scheduling config replaced");
        self.config = config;
        // `hungry` depends on `parent_limit`: recompute it for every peer.
        let parent_limit = self.config.parent_limit;
        for (key, p) in &self.peers {
            let Some(task) = self.tasks.get_mut(&p.task_id) else {
                continue;
            };
            let hungry = task.metadata.is_some()
                && p.scheduled
                && p.wants_parents()
                && p.parents.len() < parent_limit;
            set_member(&mut task.hungry, *key, hungry);
        }
    }

    /// The task `task_id`, created (with a fresh serial) if new.
    fn task_entry(&mut self, task_id: &str) -> &mut Task {
        let serial = &mut self.task_serial;
        self.tasks.entry(task_id.to_owned()).or_insert_with(|| {
            *serial += 1;
            Task {
                serial: *serial,
                ..Task::default()
            }
        })
    }
}
