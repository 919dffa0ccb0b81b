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

mod digests;
pub mod evaluator;
mod keyset;
mod pieces;
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
use tracing::{debug, info, warn};
use wire::piece::MAX_PIECE_COUNT;
use wire::proto::scheduler::{
    announce_peer_request, announce_peer_response, host_command, AnnouncePeerResponse,
    AnnounceTaskRequest, CandidateParents, DownloadTask, Host, HostCommand, HostType,
    NeedBackToSource, Parent, PeerFinished, PeerInfo, PieceFailed, PieceFinished, RegisterPeer,
    RescheduleRequest, TaskInfo, TaskMetadata, TaskSource,
};
use wire::PieceLayout;

use crate::config::SchedulingConfig;
pub use digests::DIGEST_BATCH;
use digests::{Recorded, TaskDigests};
use evaluator::ParentView;
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

/// What the scheduler measured of one host as a parent.
#[derive(Debug)]
struct HostStats {
    id: String,
    /// Live peers on the host plus live `AnnounceHost` streams of it.
    refs: usize,
    costs: CostWindow,
}

/// Index of a host in [`HostTable`], valid while the host has references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostIx(u32);

/// The live hosts' ids, interned: a peer names its host by index, so that checking a
/// candidate parent compares two integers and reads its host's measurements by index
/// instead of hashing and comparing id strings (with 10,000 peers those strings are cache
/// misses, and they were the largest part of a decision).
#[derive(Debug, Default)]
struct HostTable {
    by_id: HashMap<String, HostIx>,
    slots: Vec<Option<HostStats>>,
    free: Vec<HostIx>,
}

impl HostTable {
    /// Adds a reference to host `id` (interning it if new) and returns its index.
    fn acquire(&mut self, id: &str) -> HostIx {
        if let Some(&ix) = self.by_id.get(id) {
            if let Some(Some(stats)) = self.slots.get_mut(ix.0 as usize) {
                stats.refs += 1;
                return ix;
            }
        }
        let stats = HostStats {
            id: id.to_owned(),
            refs: 1,
            costs: CostWindow::default(),
        };
        let ix = match self.free.pop() {
            Some(ix) => {
                if let Some(slot) = self.slots.get_mut(ix.0 as usize) {
                    *slot = Some(stats);
                }
                ix
            }
            None => {
                self.slots.push(Some(stats));
                HostIx(u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX))
            }
        };
        self.by_id.insert(id.to_owned(), ix);
        ix
    }

    /// Drops a reference; the host is forgotten (measurements included) with its last one.
    fn release(&mut self, ix: HostIx) {
        let Some(slot) = self.slots.get_mut(ix.0 as usize) else {
            return;
        };
        let Some(stats) = slot.as_mut() else {
            return;
        };
        stats.refs = stats.refs.saturating_sub(1);
        if stats.refs == 0 {
            if let Some(stats) = slot.take() {
                self.by_id.remove(&stats.id);
            }
            self.free.push(ix);
        }
    }

    fn get(&self, ix: HostIx) -> Option<&HostStats> {
        self.slots.get(ix.0 as usize).and_then(Option::as_ref)
    }

    fn by_id_mut(&mut self, id: &str) -> Option<&mut HostStats> {
        let ix = *self.by_id.get(id)?;
        self.slots.get_mut(ix.0 as usize).and_then(Option::as_mut)
    }

    #[cfg(test)]
    fn by_id(&self, id: &str) -> Option<&HostStats> {
        self.get(*self.by_id.get(id)?)
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

    /// The manager asks for `task_id` ahead of time (preheat). Unless a peer already holds
    /// or fetches it, a seed host is triggered to fetch it from `source` (as for a new task
    /// that a peer asked for). The task is kept, even without peers, until
    /// [`Self::preheat_finished`] is called once for each call of this method; in between,
    /// [`Self::preheat_status`] tells how it goes.
    pub fn preheat(
        &mut self,
        task_id: &str,
        source: TaskSource,
        piece_length: u64,
    ) -> Result<(PreheatStatus, Vec<Output>), InvalidRequest> {
        if task_id.is_empty() {
            return Err(InvalidRequest::MissingTaskId);
        }
        let mut out = Vec::new();
        let task = self.task_entry(task_id);
        if task.source.is_none() {
            task.source = Some(source);
            task.piece_length = piece_length;
        }
        task.preheats += 1;
        info!(task_id = %task_id, "preheat requested");
        self.ensure_source(task_id, None, &mut out);
        Ok((self.preheat_status(task_id), out))
    }

    /// Where the preheat of `task_id` stands: done when a peer holds the whole task;
    /// pending while a seed trigger is outstanding or a peer still fetches; failed otherwise
    /// (no seed host could be triggered, or every triggered one failed).
    pub fn preheat_status(&self, task_id: &str) -> PreheatStatus {
        let Some(task) = self.tasks.get(task_id) else {
            return PreheatStatus::Failed("task unknown to this scheduler".to_owned());
        };
        let members = || task.peers.iter().filter_map(|k| self.peers.get(k));
        if task.metadata.is_some() && members().any(|p| p.done) {
            return PreheatStatus::Done;
        }
        if task.trigger.is_some() || members().any(|p| !p.done) {
            return PreheatStatus::Pending;
        }
        if task.failed_seeds.is_empty() {
            PreheatStatus::Failed(REASON_NO_SEED.to_owned())
        } else {
            let mut failed: Vec<&String> = task.failed_seeds.iter().collect();
            failed.sort();
            PreheatStatus::Failed(format!(
                "seed peers failed to fetch the task: {failed:?}; no other seed peer available"
            ))
        }
    }

    /// One preheat of `task_id` is over (whatever its outcome): the task is forgotten if no
    /// peer and no other preheat needs it.
    pub fn preheat_finished(&mut self, task_id: &str) {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        task.preheats = task.preheats.saturating_sub(1);
        if task.preheats == 0 && task.peers.is_empty() {
            debug!(task_id = %task_id, "preheated task has no peers; forgotten");
            self.tasks.remove(task_id);
        }
    }

    /// Hosts a scoped preheat puts a task on (Dragonfly's `all_seed_peers` / `all_peers`):
    /// the live hosts (one per host id), seeds only when `seeds_only`; those whose IP is in
    /// `ips` when that is not empty, else at most `count` of them when not 0, else
    /// `percentage` percent (rounded up, at least one) when not 0, else all. Hosts already
    /// holding `task_id` come first, then by host id.
    pub fn preheat_hosts(
        &self,
        task_id: &str,
        seeds_only: bool,
        ips: &[String],
        count: u32,
        percentage: u32,
    ) -> Vec<Host> {
        let mut hosts: Vec<&Host> = Vec::new();
        for h in self.hosts.values() {
            if (!seeds_only || is_seed(h)) && !hosts.iter().any(|o| o.id == h.id) {
                hosts.push(h);
            }
        }
        hosts.sort_by_key(|h| (!self.host_holds(task_id, &h.id), h.id.clone()));
        let n = hosts.len();
        let take = if !ips.is_empty() {
            hosts.retain(|h| ips.iter().any(|ip| ip == &h.ip));
            hosts.len()
        } else if count > 0 {
            usize::try_from(count).unwrap_or(usize::MAX).min(n)
        } else if percentage > 0 {
            let pct = usize::try_from(percentage.min(100)).unwrap_or(100);
            (n * pct).div_ceil(100).max(1).min(n)
        } else {
            n
        };
        hosts.into_iter().take(take).cloned().collect()
    }

    /// Whether a peer of host `host_id` holds all of `task_id`.
    pub fn host_holds(&self, task_id: &str, host_id: &str) -> bool {
        self.tasks.get(task_id).is_some_and(|t| {
            t.metadata.is_some()
                && t.peers
                    .iter()
                    .filter_map(|k| self.peers.get(k))
                    .any(|p| p.done && p.host.id == host_id)
        })
    }

    /// Has each host of `host_ids` that neither holds nor fetches `task_id` download it as a
    /// normal peer (from the peers that hold it), for a scoped preheat. Returns the hosts
    /// asked.
    pub fn preheat_on_hosts(
        &mut self,
        task_id: &str,
        host_ids: &[String],
    ) -> (Vec<String>, Vec<Output>) {
        let mut out = Vec::new();
        let mut asked = Vec::new();
        let Some(task) = self.tasks.get(task_id) else {
            return (asked, out);
        };
        for host_id in host_ids {
            let busy = task
                .peers
                .iter()
                .filter_map(|k| self.peers.get(k))
                .any(|p| &p.host.id == host_id);
            if busy {
                continue;
            }
            let Some(key) = self
                .hosts
                .iter()
                .filter(|(_, h)| &h.id == host_id)
                .map(|(k, _)| *k)
                .max()
            else {
                continue;
            };
            info!(task_id = %task_id, host_id = %host_id, "preheat: asking a host to fetch from peers");
            out.push(Output::Host {
                host: key,
                command: HostCommand {
                    command: Some(host_command::Command::DownloadTask(DownloadTask {
                        task_id: task_id.to_owned(),
                        source: task.source.clone(),
                        piece_length: task.piece_length,
                        from_peers: true,
                    })),
                },
            });
            asked.push(host_id.clone());
        }
        (asked, out)
    }

    fn host_ref(&mut self, host_id: &str) -> HostIx {
        self.host_stats.acquire(host_id)
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

    /// An `AnnounceHost` stream opened: the host is live (a seed host may now be triggered).
    pub fn host_announced(&mut self, key: HostKey, host: Host) -> Result<(), InvalidRequest> {
        if host.id.is_empty() {
            return Err(InvalidRequest::MissingHost);
        }
        if self.hosts.contains_key(&key) {
            return Err(InvalidRequest::DuplicateKey);
        }
        info!(host_id = %host.id, ip = %host.ip, seed = is_seed(&host), "host announced");
        // The stream holds a reference of its own: the host's measurements outlive its
        // peers while it stays connected.
        self.host_ref(&host.id);
        self.hosts.insert(key, host);
        Ok(())
    }

    /// An `AnnounceHost` stream closed. Seed triggers still waiting for that host move to the
    /// next seed (or send a waiting peer back to the origin); tasks the host announced with
    /// `AnnounceTask` are withdrawn when no other stream of that host is open.
    pub fn host_left(&mut self, key: HostKey) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(host) = self.hosts.remove(&key) else {
            return out;
        };
        info!(host_id = %host.id, "host left");
        if let Some(&ix) = self.host_stats.by_id.get(&host.id) {
            self.host_stats.release(ix);
        }
        let mut orphaned = Vec::new();
        for (task_id, task) in &mut self.tasks {
            if task
                .trigger
                .as_ref()
                .is_some_and(|t| t.host == key && t.peer.is_none())
            {
                task.trigger = None;
                task.failed_seeds.insert(host.id.clone());
                orphaned.push(task_id.clone());
            }
        }
        orphaned.sort();
        for task_id in orphaned {
            warn!(task_id = %task_id, host_id = %host.id, "triggered seed host left before registering");
            // Size known (e.g. the seed was triggered again because its own peer just left,
            // and its host stream is closing too): only the pieces no live peer holds.
            if self
                .tasks
                .get(&task_id)
                .is_some_and(|t| t.metadata.is_some())
            {
                self.recover_lost_pieces(&task_id, &mut out);
            } else {
                self.ensure_source(&task_id, None, &mut out);
            }
        }
        if !self.hosts.values().any(|h| h.id == host.id) {
            let mut announced: Vec<PeerKey> = self
                .peers
                .iter()
                .filter(|(_, p)| p.announced && p.host.id == host.id)
                .map(|(k, _)| *k)
                .collect();
            announced.sort();
            for k in announced {
                self.remove_peer(k, &mut out);
            }
        }
        out
    }

    /// Checks what a registration or a task announcement must carry (task id, peer id, a host
    /// with an id, a stream key not in use) and returns the host.
    fn check_identity(
        &self,
        key: PeerKey,
        task_id: &str,
        peer_id: &str,
        host: Option<Host>,
    ) -> Result<Host, InvalidRequest> {
        if task_id.is_empty() {
            return Err(InvalidRequest::MissingTaskId);
        }
        if peer_id.is_empty() {
            return Err(InvalidRequest::MissingPeerId);
        }
        let host = host
            .filter(|h| !h.id.is_empty())
            .ok_or(InvalidRequest::MissingHost)?;
        if self.peers.contains_key(&key) {
            return Err(InvalidRequest::DuplicateKey);
        }
        Ok(host)
    }

    /// The first message of an `AnnouncePeer` stream. A registration with the same task and
    /// peer id as a live one replaces it (the old stream gets [`Output::ClosePeer`]).
    pub fn register_peer(
        &mut self,
        key: PeerKey,
        register: RegisterPeer,
    ) -> Result<Vec<Output>, InvalidRequest> {
        let RegisterPeer {
            task_id,
            peer_id,
            host,
            source,
            piece_length,
            back_to_source,
            priority,
            resume,
        } = register;
        let host = self.check_identity(key, &task_id, &peer_id, host)?;
        if priority != 0 {
            debug!(task_id = %task_id, peer_id = %peer_id, priority, "priority asked (not used for scheduling yet)");
        }
        let mut out = Vec::new();
        self.replace_previous(&task_id, &peer_id, &mut out);

        let task = self.task_entry(&task_id);
        let task_serial = task.serial;
        if task.source.is_none() && source.is_some() {
            task.source = source;
            task.piece_length = piece_length;
        }
        task.peers.insert(key);
        task.by_peer_id.insert(peer_id.clone(), key);
        if back_to_source {
            task.digests.trusted = true;
            if let Some(t) = task.trigger.as_mut() {
                if t.peer.is_none() && t.host_id == host.id {
                    t.peer = Some(key);
                }
            }
        }
        let metadata_known = task.metadata.is_some();
        // A download that goes on with parents it has (its scheduler went away): not waiting,
        // and it can serve at once; its size is the task's if none is known yet.
        let resumed = !back_to_source && resume.is_some();
        let resumed_layout = resume
            .filter(|_| resumed && !metadata_known)
            .and_then(|m| PieceLayout::new(m.content_length, m.piece_length).ok());
        debug!(task_id = %task_id, peer_id = %peer_id, host_id = %host.id, back_to_source, resumed, "peer registered");
        let host_ix = self.host_ref(&host.id);
        self.peers.insert(
            key,
            Box::new(Peer {
                peer_id,
                task_id: task_id.clone(),
                task_serial,
                host,
                host_ix,
                source: back_to_source,
                done: false,
                waiting: !back_to_source && !resumed,
                scheduled: resumed,
                announced: false,
                pieces: PieceSet::default(),
                parents: HashSet::default(),
                children: HashSet::default(),
                bad_hosts: HashSet::default(),
                pieces_failed: 0,
                reschedules: 0,
                origin_pieces: Vec::new(),
                digests_synced: false,
            }),
        );
        self.sync(key, &mut out);

        if resumed {
            info!(task_id = %task_id, host_id = %self.peers.get(&key).map_or("", |p| p.host.id.as_str()), "running download registered again");
            if let Some(layout) = resumed_layout {
                self.set_metadata(&task_id, layout, &mut out);
            }
        } else if back_to_source {
            // Fetches from the origin; it will tell us the size with TaskMetadata.
        } else if metadata_known {
            self.schedule(key, &mut out);
        } else {
            self.ensure_source(&task_id, Some(key), &mut out);
        }
        Ok(out)
    }

    /// Forgets a live peer of `task_id` with `peer_id` (a newer registration replaces it).
    fn replace_previous(&mut self, task_id: &str, peer_id: &str, out: &mut Vec<Output>) {
        let previous = self
            .tasks
            .get(task_id)
            .and_then(|t| t.by_peer_id.get(peer_id).copied());
        if let Some(old) = previous {
            let announced = self.peers.get(&old).is_some_and(|p| p.announced);
            warn!(task_id = %task_id, peer_id = %peer_id, "peer registered again; replacing the old one");
            if !announced {
                out.push(Output::ClosePeer {
                    peer: old,
                    reason: "replaced by a newer registration of the same peer".to_owned(),
                });
            }
            self.remove_peer(old, out);
        }
    }

    /// `AnnounceTask`: `request.host` holds the whole task. The peer serves as a done parent
    /// until its host's `AnnounceHost` stream closes (or a newer announcement of the same peer
    /// id replaces it). Peers of the task that wait for parents get them.
    pub fn announce_task(
        &mut self,
        key: PeerKey,
        request: AnnounceTaskRequest,
    ) -> Result<Vec<Output>, InvalidRequest> {
        let AnnounceTaskRequest {
            task_id,
            peer_id,
            host,
            metadata,
            piece_count,
            piece_digests,
        } = request;
        let host = self.check_identity(key, &task_id, &peer_id, host)?;
        let metadata = metadata
            .ok_or_else(|| InvalidRequest::InvalidMetadata("metadata is required".into()))?;
        let layout = PieceLayout::new(metadata.content_length, metadata.piece_length)
            .map_err(|e| InvalidRequest::InvalidMetadata(e.to_string()))?;
        if layout.piece_count() != piece_count {
            return Err(InvalidRequest::InvalidMetadata(format!(
                "piece_count {piece_count} does not match {} pieces of the metadata",
                layout.piece_count()
            )));
        }
        if let Some(known) = self.tasks.get(&task_id).and_then(|t| t.metadata) {
            if known != layout {
                return Err(InvalidRequest::ConflictingMetadata);
            }
        }
        let mut out = Vec::new();
        self.replace_previous(&task_id, &peer_id, &mut out);
        let task = self.task_entry(&task_id);
        let task_serial = task.serial;
        task.peers.insert(key);
        task.by_peer_id.insert(peer_id.clone(), key);
        // A seed triggered for a task it already holds answers with AnnounceTask.
        if task
            .trigger
            .as_ref()
            .is_some_and(|t| t.peer.is_none() && t.host_id == host.id)
        {
            task.trigger = None;
        }
        let mut pieces = PieceSet::default();
        for n in 0..piece_count {
            pieces.insert(n);
        }
        // An import brings the digest of every piece: its host read the file itself.
        if piece_digests.len() == piece_count as usize * wire::PIECE_DIGEST_LEN && piece_count > 0 {
            task.digests.trusted = true;
            for (n, d) in (0..piece_count).zip(piece_digests.chunks_exact(wire::PIECE_DIGEST_LEN)) {
                if task.digests.record(n, d, piece_count) == Some(Recorded::Conflict) {
                    warn!(task_id = %task_id, number = n, host_id = %host.id, "imported piece digest conflicts with the known one; the first stays");
                }
            }
            self.digests_dirty.insert(task_id.clone());
        }
        info!(task_id = %task_id, peer_id = %peer_id, host_id = %host.id, piece_count, "task announced");
        let host_ix = self.host_ref(&host.id);
        self.peers.insert(
            key,
            Box::new(Peer {
                peer_id,
                task_id: task_id.clone(),
                task_serial,
                host,
                host_ix,
                source: false,
                done: true,
                waiting: false,
                scheduled: false,
                announced: true,
                pieces,
                parents: HashSet::default(),
                children: HashSet::default(),
                bad_hosts: HashSet::default(),
                pieces_failed: 0,
                reschedules: 0,
                origin_pieces: Vec::new(),
                digests_synced: false,
            }),
        );
        let had_metadata = self
            .tasks
            .get(&task_id)
            .is_some_and(|t| t.metadata.is_some());
        if had_metadata {
            self.sync(key, &mut out);
        } else {
            self.set_metadata(&task_id, layout, &mut out);
        }
        Ok(out)
    }

    /// `LeaveTask`: the host `host_id` no longer holds `task_id` (dfcache delete). Every peer
    /// of that host in the task is forgotten; those with an open `AnnouncePeer` stream get
    /// [`Output::ClosePeer`]. Returns how many peers were forgotten and the outputs.
    pub fn leave_task(&mut self, task_id: &str, host_id: &str) -> (u32, Vec<Output>) {
        let mut out = Vec::new();
        let Some(task) = self.tasks.get(task_id) else {
            return (0, out);
        };
        let mut keys: Vec<PeerKey> = task
            .peers
            .iter()
            .copied()
            .filter(|k| self.peers.get(k).is_some_and(|p| p.host.id == host_id))
            .collect();
        keys.sort();
        for key in &keys {
            if self.peers.get(key).is_some_and(|p| !p.announced) {
                out.push(Output::ClosePeer {
                    peer: *key,
                    reason: "the host left the task".to_owned(),
                });
            }
            self.remove_peer(*key, &mut out);
        }
        info!(task_id = %task_id, host_id = %host_id, peers = keys.len(), "host left the task");
        (u32::try_from(keys.len()).unwrap_or(u32::MAX), out)
    }

    /// A later message of the `AnnouncePeer` stream of `key`. Unknown keys are ignored.
    pub fn peer_request(
        &mut self,
        key: PeerKey,
        request: announce_peer_request::Request,
    ) -> Vec<Output> {
        use announce_peer_request::Request;
        let mut out = Vec::new();
        if !self.peers.contains_key(&key) {
            debug!(?key, "message for an unknown peer ignored");
            return out;
        }
        match request {
            Request::Register(_) => warn!(?key, "second RegisterPeer on one stream ignored"),
            Request::PieceFinished(p) => self.piece_finished(key, p, &mut out),
            Request::PieceFailed(p) => self.piece_failed(key, p, &mut out),
            Request::TaskMetadata(m) => self.task_metadata(key, m, &mut out),
            Request::Reschedule(r) => self.reschedule(key, r, &mut out),
            Request::Finished(f) => self.peer_finished(key, f, &mut out),
            Request::Failed(f) => {
                if let Some(p) = self.peers.get(&key) {
                    info!(task_id = %p.task_id, peer_id = %p.peer_id, reason = %f.reason, "peer failed");
                }
                self.remove_peer(key, &mut out);
            }
        }
        out
    }

    /// The `AnnouncePeer` stream of `key` ended (or could not be written): forget the peer.
    pub fn peer_left(&mut self, key: PeerKey) -> Vec<Output> {
        let mut out = Vec::new();
        self.remove_peer(key, &mut out);
        out
    }

    /// What the scheduler knows of a task, or `None` if it has no such task.
    pub fn stat_task(&self, task_id: &str) -> Option<TaskInfo> {
        let task = self.tasks.get(task_id)?;
        let mut keys: Vec<PeerKey> = task.peers.iter().copied().collect();
        keys.sort();
        let peers = keys
            .iter()
            .filter_map(|k| self.peers.get(k))
            .map(|p| PeerInfo {
                peer_id: p.peer_id.clone(),
                host_id: p.host.id.clone(),
                host_type: p.host.r#type,
                finished_pieces: p.pieces.count(),
                done: p.done,
            })
            .collect();
        Some(TaskInfo {
            task_id: task_id.to_owned(),
            metadata: task.metadata_message(),
            piece_count: task.metadata.map_or(0, |m| m.piece_count()),
            peers,
        })
    }

    /// Recomputes `key`'s membership of its task's sets; when it just became able to serve,
    /// offers it to peers short of parents.
    fn sync(&mut self, key: PeerKey, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let Some(task) = self.tasks.get_mut(&p.task_id) else {
            return;
        };
        let metadata_known = task.metadata.is_some();
        let serves = p.can_serve(metadata_known);
        let newly_serving = serves && !task.servers.contains(&key);
        set_member(&mut task.servers, key, serves);
        set_member(
            &mut task.hungry,
            key,
            metadata_known
                && p.scheduled
                && p.wants_parents()
                && p.parents.len() < self.config.parent_limit,
        );
        set_member(&mut task.waiting, key, p.waiting && p.wants_parents());
        if newly_serving {
            self.became_server(key, out);
        }
    }

    fn task_metadata(&mut self, key: PeerKey, metadata: TaskMetadata, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let task_id = peer.task_id.clone();
        let Some(task) = self.tasks.get(&task_id) else {
            return;
        };
        if let Some(known) = task.metadata {
            if known.content_length() != metadata.content_length
                || known.piece_length() != metadata.piece_length
            {
                warn!(task_id = %task_id, ?metadata, "conflicting task metadata ignored (first one wins)");
            }
            return;
        }
        let layout = match PieceLayout::new(metadata.content_length, metadata.piece_length) {
            Ok(layout) => layout,
            Err(e) => {
                warn!(task_id = %task_id, error = %e, "invalid task metadata ignored");
                return;
            }
        };
        self.set_metadata(&task_id, layout, out);
    }

    /// The task's size is known: every waiting peer is scheduled, in registration order.
    fn set_metadata(&mut self, task_id: &str, layout: PieceLayout, out: &mut Vec<Output>) {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        info!(
            task_id = %task_id,
            content_length = layout.content_length(),
            piece_length = layout.piece_length(),
            "task metadata known"
        );
        task.metadata = Some(layout);
        task.digests.truncate(layout.piece_count());
        let keys: Vec<PeerKey> = task.peers.iter().copied().collect();
        let was_batch = std::mem::replace(&mut self.in_batch, true);
        for k in &keys {
            if let Some(p) = self.peers.get_mut(k) {
                p.pieces.truncate(layout.piece_count());
            }
            self.sync(*k, out);
        }
        for k in keys {
            if self
                .peers
                .get(&k)
                .is_some_and(|p| p.waiting && p.wants_parents())
            {
                self.schedule(k, out);
            }
        }
        self.in_batch = was_batch;
    }

    fn piece_finished(&mut self, key: PeerKey, piece: PieceFinished, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(task) = self.tasks.get(&peer.task_id) else {
            return;
        };
        if piece.number >= task.piece_bound() {
            warn!(
                task_id = %peer.task_id,
                peer_id = %peer.peer_id,
                number = piece.number,
                bound = task.piece_bound(),
                "piece number out of range ignored"
            );
            return;
        }
        // A digest counts only from a peer that fetched the piece from the origin.
        if !piece.digest.is_empty()
            && piece.parent_host_id.is_empty()
            && (peer.source || peer.origin_pieces.contains(&piece.number))
        {
            let bound = task.piece_bound();
            if let Some(task) = self.tasks.get_mut(&peer.task_id) {
                task.digests.trusted = true;
                match task.digests.record(piece.number, &piece.digest, bound) {
                    Some(Recorded::New) => {
                        if task.digests.unsent() >= DIGEST_BATCH {
                            let task_id = peer.task_id.clone();
                            self.push_digests(&task_id, out);
                        } else {
                            self.digests_dirty.insert(peer.task_id.clone());
                        }
                    }
                    Some(Recorded::Conflict) => warn!(
                        task_id = %peer.task_id,
                        peer_id = %peer.peer_id,
                        number = piece.number,
                        "piece digest conflicts with the one reported first; the first stays"
                    ),
                    Some(Recorded::Same) | None => {}
                }
            }
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(task) = self.tasks.get(&peer.task_id) else {
            return;
        };
        if !peer.pieces.insert(piece.number) {
            return;
        }
        let first = peer.pieces.count() == 1;
        // A piece shorter than the task's piece length (the last one) costs mostly fixed
        // latency; normalised per MiB it would look like a very slow parent.
        let full_piece = task
            .metadata
            .is_some_and(|m| piece.length >= m.piece_length());
        if !piece.parent_host_id.is_empty() && full_piece {
            if let Some(stats) = self.host_stats.by_id_mut(&piece.parent_host_id) {
                let slow = stats
                    .costs
                    .record(piece.length, piece.cost_us, &self.config.bad_parent);
                if slow {
                    debug!(parent = %piece.parent_host_id, cost_us = piece.cost_us, "slow parent");
                }
            }
        }
        let count = peer.pieces.count();
        let short_of_parents =
            peer.scheduled && peer.wants_parents() && peer.parents.len() < self.config.parent_limit;
        if first {
            self.sync(key, out);
        }
        // Top-up: a peer short of parents (scheduled when few could serve, missed by the
        // pushes, or its parents left) downloads at a fraction of its link while the rest
        // of the swarm is at full speed, and finishes last. Every few pieces it is offered
        // more parents, the least loaded first, which also gives children to the peers that
        // registered last.
        let eager = self
            .peers
            .get(&key)
            .is_some_and(|p| p.parents.len() < EAGER_TOP_UP_BELOW);
        if short_of_parents && (eager || count.is_multiple_of(TOP_UP_EVERY)) {
            let parents = self.rank_parents(key);
            if !parents.is_empty() {
                self.send_parents(key, &parents, out);
            }
        }
    }

    fn piece_failed(&mut self, key: PeerKey, piece: PieceFailed, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.pieces_failed += 1;
        debug!(
            peer_id = %peer.peer_id,
            number = piece.number,
            parent = %piece.parent_host_id,
            reason = %piece.reason,
            failed = peer.pieces_failed,
            "piece failed"
        );
        if piece.parent_host_id.is_empty() {
            return;
        }
        self.block_hosts(key, vec![piece.parent_host_id]);
        self.sync(key, out);
    }

    /// Blocks `host_ids` as parents of `key` and drops its edges to them.
    fn block_hosts(&mut self, key: PeerKey, host_ids: Vec<String>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        for id in host_ids {
            if peer.bad_hosts.len() >= MAX_BAD_PARENTS {
                warn!(peer_id = %peer.peer_id, "too many bad parents; the rest are ignored");
                break;
            }
            peer.bad_hosts.insert(id);
        }
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let drop: Vec<PeerKey> = peer
            .parents
            .iter()
            .copied()
            .filter(|k| {
                self.peers
                    .get(k)
                    .is_none_or(|p| peer.bad_hosts.contains(&p.host.id))
            })
            .collect();
        for parent in drop {
            self.unlink(key, parent);
        }
    }

    fn reschedule(&mut self, key: PeerKey, request: RescheduleRequest, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        peer.reschedules += 1;
        info!(peer_id = %peer.peer_id, bad = ?request.bad_parent_host_ids, reason = %request.reason, reschedules = peer.reschedules, "reschedule");
        let over_limit = peer.reschedules > self.config.retry_limit && peer.wants_parents();
        let task_id = peer.task_id.clone();
        self.block_hosts(key, request.bad_parent_host_ids);
        let Some(task) = self.tasks.get(&task_id) else {
            return;
        };
        let metadata_known = task.metadata.is_some();
        if over_limit && task.back_to_source < self.config.back_to_source_limit {
            self.send_back_to_source(key, REASON_RETRY_LIMIT, out);
            return;
        }
        if metadata_known {
            self.schedule(key, out);
            self.recover_for_peer(key, out);
        } else {
            if let Some(p) = self.peers.get_mut(&key) {
                p.waiting = true;
            }
            self.sync(key, out);
            self.ensure_source(&task_id, Some(key), out);
        }
    }

    fn peer_finished(&mut self, key: PeerKey, finished: PeerFinished, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        if peer.done {
            return;
        }
        let Some(task) = self.tasks.get_mut(&peer.task_id) else {
            return;
        };
        peer.done = true;
        peer.waiting = false;
        if peer.source && task.digests.unsent() > 0 {
            let task_id = peer.task_id.clone();
            self.push_digests(&task_id, out);
        }
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let Some(task) = self.tasks.get_mut(&peer.task_id) else {
            return;
        };
        if task.trigger.as_ref().is_some_and(|t| t.peer == Some(key)) {
            task.trigger = None;
        }
        debug!(
            task_id = %peer.task_id,
            peer_id = %peer.peer_id,
            content_length = finished.content_length,
            "peer finished"
        );
        if task.metadata.is_none() {
            warn!(task_id = %peer.task_id, "peer finished but nobody reported the task's metadata");
        }
        // A finished peer downloads nothing more: its parents' slots are free again.
        let parents: Vec<PeerKey> = peer.parents.iter().copied().collect();
        for parent in parents {
            self.unlink(key, parent);
        }
        self.sync(key, out);
    }

    /// Forgets a peer. If it was fetching the task from the origin for everyone (the source
    /// of a task of unknown size, or the triggered seed), someone else must take over.
    fn remove_peer(&mut self, key: PeerKey, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let parents: Vec<PeerKey> = peer.parents.iter().copied().collect();
        let children: Vec<PeerKey> = peer.children.iter().copied().collect();
        for parent in parents {
            self.unlink(key, parent);
        }
        for child in &children {
            self.unlink(*child, key);
        }
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        self.host_stats.release(peer.host_ix);
        let Some(task) = self.tasks.get_mut(&peer.task_id) else {
            return;
        };
        task.peers.remove(&key);
        task.servers.remove(&key);
        task.hungry.remove(&key);
        task.waiting.remove(&key);
        if task.by_peer_id.get(&peer.peer_id) == Some(&key) {
            task.by_peer_id.remove(&peer.peer_id);
        }
        debug!(task_id = %peer.task_id, peer_id = %peer.peer_id, done = peer.done, "peer left");
        if task.peers.is_empty() && task.preheats == 0 {
            debug!(task_id = %peer.task_id, "task has no peers left; forgotten");
            self.tasks.remove(&peer.task_id);
            return;
        }
        let was_trigger = task.trigger.as_ref().is_some_and(|t| t.peer == Some(key));
        let lost_source = peer.source && !peer.done && (task.metadata.is_none() || was_trigger);
        if was_trigger || (lost_source && is_seed(&peer.host)) {
            task.failed_seeds.insert(peer.host.id.clone());
        }
        if was_trigger {
            task.trigger = None;
        }
        for child in children {
            self.sync(child, out);
        }
        if lost_source {
            warn!(task_id = %peer.task_id, host_id = %peer.host.id, "source peer left before finishing");
        }
        if lost_source
            && self
                .tasks
                .get(&peer.task_id)
                .is_some_and(|t| t.metadata.is_none())
        {
            self.ensure_source(&peer.task_id, None, out);
        } else {
            self.recover_lost_pieces(&peer.task_id, out);
        }
    }

    /// After a peer left a task of known size: if some pieces are now held by no live peer
    /// (and nobody holds the whole task, fetches it from the origin, or was told to fetch
    /// those pieces), someone must fetch them. A live seed host that has not failed the task
    /// is triggered (it fetches the task from the origin, at most one more copy); without
    /// one, the missing pieces are split in contiguous runs among up to
    /// `back_to_source_limit` peers (at least one, whatever the budget says), those holding
    /// the most pieces first, each told with a partial `NeedBackToSource` to fetch its run
    /// from the origin while it goes on fetching the rest from its parents.
    fn recover_lost_pieces(&mut self, task_id: &str, out: &mut Vec<Output>) {
        let Some(task) = self.tasks.get(task_id) else {
            return;
        };
        let Some(layout) = task.metadata else {
            return;
        };
        if task.trigger.is_some() {
            return;
        }
        let mut members: Vec<(PeerKey, &Peer)> = task
            .peers
            .iter()
            .filter_map(|k| self.peers.get(k).map(|p| (*k, &**p)))
            .collect();
        if members.iter().any(|(_, p)| p.done || p.source) {
            return;
        }
        if !members.iter().any(|(_, p)| p.wants_parents()) {
            return;
        }
        let count = layout.piece_count();
        let mut covered = vec![false; count as usize];
        for (_, p) in &members {
            for &n in &p.origin_pieces {
                if let Some(c) = covered.get_mut(n as usize) {
                    *c = true;
                }
            }
        }
        for (n, c) in covered.iter_mut().enumerate() {
            if !*c {
                let n = n as u32;
                *c = members.iter().any(|(_, p)| p.pieces.contains(n));
            }
        }
        let missing: Vec<u32> = (0..count).filter(|&n| !covered[n as usize]).collect();
        if missing.is_empty() {
            return;
        }
        let seed_live = self
            .hosts
            .values()
            .any(|h| is_seed(h) && !task.failed_seeds.contains(&h.id));
        if seed_live {
            warn!(task_id = %task_id, missing = missing.len(), "pieces held by no live peer; triggering a seed peer");
            self.ensure_source(task_id, None, out);
            return;
        }
        members.retain(|(_, p)| p.wants_parents());
        members.sort_by_key(|(k, p)| (std::cmp::Reverse(p.pieces.count()), *k));
        let budget = self
            .config
            .back_to_source_limit
            .saturating_sub(task.back_to_source)
            .max(1) as usize;
        let takers: Vec<PeerKey> = members
            .iter()
            .take(budget.min(missing.len()))
            .map(|(k, _)| *k)
            .collect();
        warn!(task_id = %task_id, missing = missing.len(), peers = takers.len(), "pieces held by no live peer and no seed peer; sending peers to the origin for them");
        let per = missing.len().div_ceil(takers.len().max(1));
        for (taker, run) in takers.iter().zip(missing.chunks(per.max(1))) {
            self.send_pieces_to_source(*taker, run.to_vec(), out);
        }
    }

    /// After a reschedule: the pieces `child` lacks that no peer on a host it has not
    /// reported bad holds (or was sent to the origin for) — e.g. only a parent that stalled
    /// without closing holds them, which the scheduler still counts as live until its
    /// connection times out — are fetched by `child` from the origin (a partial
    /// `NeedBackToSource`), unless a seed trigger or a whole-task source is under way.
    fn recover_for_peer(&mut self, child: PeerKey, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get(&child) else {
            return;
        };
        if !peer.wants_parents() || peer.bad_hosts.is_empty() {
            return;
        }
        let Some(task) = self.tasks.get(&peer.task_id) else {
            return;
        };
        let Some(layout) = task.metadata else {
            return;
        };
        // A seed being triggered brings the pieces, unless it is the bad parent itself.
        if task
            .trigger
            .as_ref()
            .is_some_and(|t| !peer.bad_hosts.contains(&t.host_id))
        {
            return;
        }
        let good_keyed: Vec<(PeerKey, &Peer)> = task
            .peers
            .iter()
            .filter_map(|k| self.peers.get(k).map(|p| (*k, &**p)))
            .filter(|(_, p)| !peer.bad_hosts.contains(&p.host.id))
            .collect();
        let good: Vec<&Peer> = good_keyed.iter().map(|(_, p)| *p).collect();
        if good.iter().any(|p| p.done || p.source) {
            return;
        }
        let count = layout.piece_count();
        let mut covered = vec![false; count as usize];
        for p in &good {
            for &n in &p.origin_pieces {
                if let Some(c) = covered.get_mut(n as usize) {
                    *c = true;
                }
            }
        }
        let missing: Vec<u32> = (0..count)
            .filter(|&n| {
                !covered[n as usize]
                    && !peer.pieces.contains(n)
                    && !good.iter().any(|p| p.pieces.contains(n))
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        // Split like lost pieces: this peer first, then the other downloading peers holding
        // the most, within the back-to-source budget, so that no single downlink (and the
        // uplink that then has to share them) carries them all.
        let mut others: Vec<(PeerKey, &Peer)> = good_keyed
            .iter()
            .filter(|(k, p)| *k != child && p.wants_parents())
            .copied()
            .collect();
        others.sort_by_key(|(k, p)| (std::cmp::Reverse(p.pieces.count()), *k));
        let budget = self
            .config
            .back_to_source_limit
            .saturating_sub(task.back_to_source)
            .max(1) as usize;
        let takers: Vec<PeerKey> = std::iter::once(child)
            .chain(others.iter().map(|(k, _)| *k))
            .take(budget.min(missing.len()))
            .collect();
        warn!(peer_id = %peer.peer_id, missing = missing.len(), peers = takers.len(), bad = ?peer.bad_hosts, "pieces held only by hosts this peer reported bad; sending peers to the origin for them");
        let per = missing.len().div_ceil(takers.len().max(1));
        for (taker, run) in takers.iter().zip(missing.chunks(per.max(1))) {
            self.send_pieces_to_source(*taker, run.to_vec(), out);
        }
    }

    /// Partial `NeedBackToSource` to `child`: fetch `pieces` from the origin. The peer keeps
    /// its parents and stays a downloading peer; counts toward `back_to_source_limit`.
    fn send_pieces_to_source(&mut self, child: PeerKey, pieces: Vec<u32>, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        info!(task_id = %peer.task_id, peer_id = %peer.peer_id, pieces = pieces.len(), "peer sent to the origin for lost pieces");
        peer.origin_pieces.extend_from_slice(&pieces);
        if let Some(task) = self.tasks.get_mut(&peer.task_id) {
            task.back_to_source += 1;
            task.digests.trusted = true;
        }
        out.push(Output::Peer {
            peer: child,
            response: peer_response(announce_peer_response::Response::NeedBackToSource(
                NeedBackToSource {
                    reason: REASON_PIECES_LOST.to_owned(),
                    pieces,
                },
            )),
        });
        self.connect_to_taker(child, out);
    }

    /// Gives `taker`, just sent to the origin for pieces no live peer holds, as a parent to
    /// every other downloading peer of its task that does not have it: it will be the only
    /// holder of those pieces, and a peer whose parents all lack them gets no new parent
    /// from a reschedule once it is at `parent_limit` — it would wait for its stall watchdog
    /// (the lab's stalled seed, issue 23). Past `parent_limit` (by at most
    /// `back_to_source_limit` takers), within the taker's upload slots; with `dag`, not where
    /// it would close a cycle.
    fn connect_to_taker(&mut self, taker: PeerKey, out: &mut Vec<Output>) {
        let Some(t) = self.peers.get(&taker) else {
            return;
        };
        let Some(task) = self.tasks.get(&t.task_id) else {
            return;
        };
        let mut children: Vec<PeerKey> = task
            .peers
            .iter()
            .copied()
            .filter(|k| {
                *k != taker
                    && self.peers.get(k).is_some_and(|c| {
                        c.wants_parents()
                            && c.task_serial == t.task_serial
                            && c.host_ix != t.host_ix
                            && !c.bad_hosts.contains(&t.host.id)
                            && !c.parents.contains(&taker)
                    })
                    && !(self.config.dag && self.is_ancestor(*k, taker))
            })
            .collect();
        children.sort();
        for child in children {
            let room = self
                .peers
                .get(&taker)
                .is_some_and(|t| t.children.len() < self.slots(t));
            if !room {
                break;
            }
            self.send_parents(child, &[taker], out);
        }
    }

    /// Makes sure somebody fetches the task from the origin when peers need it and nobody
    /// does: triggers a seed host, or (without one) sends one waiting peer back to source.
    fn ensure_source(&mut self, task_id: &str, requester: Option<PeerKey>, out: &mut Vec<Output>) {
        let Some(task) = self.tasks.get(task_id) else {
            return;
        };
        if task.trigger.is_some() {
            return;
        }
        let members = || task.peers.iter().filter_map(|k| self.peers.get(k));
        if members().any(|p| p.source && !p.done) {
            return;
        }
        if task.metadata.is_some() && members().any(|p| p.done) {
            return;
        }
        if task.preheats == 0 && !members().any(|p| p.wants_parents()) {
            return;
        }
        let waiting = |k: &PeerKey| {
            self.peers
                .get(k)
                .is_some_and(|p| p.waiting && p.wants_parents())
        };
        let fallback = requester.filter(waiting).or_else(|| {
            let mut w: Vec<PeerKey> = task.waiting.iter().copied().filter(waiting).collect();
            w.sort();
            w.first().copied()
        });

        let seed = self
            .hosts
            .iter()
            .filter(|(_, h)| is_seed(h) && !task.failed_seeds.contains(&h.id))
            .max_by_key(|(k, h)| (rendezvous_weight(task_id, &h.id), **k))
            .map(|(k, h)| (*k, h.id.clone()));
        if let Some((host_key, host_id)) = seed {
            info!(task_id = %task_id, host_id = %host_id, "triggering seed peer");
            let command = HostCommand {
                command: Some(host_command::Command::DownloadTask(DownloadTask {
                    task_id: task_id.to_owned(),
                    source: task.source.clone(),
                    piece_length: task.piece_length,
                    from_peers: false,
                })),
            };
            out.push(Output::Host {
                host: host_key,
                command,
            });
            if let Some(task) = self.tasks.get_mut(task_id) {
                task.trigger = Some(SeedTrigger {
                    host_id,
                    host: host_key,
                    peer: None,
                });
            }
        } else if let Some(target) = fallback {
            // Nobody fetches the task at all: one peer must, whatever the limit says, or the
            // swarm waits forever. It still counts toward the limit.
            self.send_back_to_source(target, REASON_NO_SEED, out);
        }
    }

    /// Sends `child` new candidate parents; with none, its current ones again; with none at
    /// all, back to the origin if the task's budget allows, else it waits.
    fn schedule(&mut self, child: PeerKey, out: &mut Vec<Output>) {
        let mut parents = self.rank_parents(child);
        if parents.is_empty() {
            if let Some(p) = self.peers.get(&child) {
                parents = p.parents.iter().copied().collect();
                parents.sort();
            }
        }
        if !parents.is_empty() {
            self.send_parents(child, &parents, out);
            return;
        }
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        let within_budget = self
            .tasks
            .get(&peer.task_id)
            .is_some_and(|t| t.back_to_source < self.config.back_to_source_limit);
        if within_budget {
            self.send_back_to_source(child, REASON_NO_PARENT, out);
        } else {
            debug!(peer_id = %peer.peer_id, "no parent and back-to-source budget spent; waiting");
            peer.waiting = true;
            self.sync(child, out);
        }
    }

    /// Upload slots of a peer.
    fn slots(&self, peer: &Peer) -> usize {
        if is_seed(&peer.host) {
            self.config.seed_upload_slots
        } else {
            self.config.normal_upload_slots
        }
    }

    /// Whether `parent` may be given to `child` now.
    fn eligible(&self, child: PeerKey, parent: PeerKey) -> bool {
        self.eligible_with(child, parent, false)
    }

    /// [`Self::eligible`], optionally letting hosts flagged slow through (the last resort
    /// when nobody else can serve: a slow parent beats the origin, and serving again is how
    /// a slow host's flag clears).
    fn eligible_with(&self, child: PeerKey, parent: PeerKey, allow_slow: bool) -> bool {
        if child == parent {
            return false;
        }
        let (Some(c), Some(p)) = (self.peers.get(&child), self.peers.get(&parent)) else {
            return false;
        };
        let metadata_known = self
            .tasks
            .get(&c.task_id)
            .is_some_and(|t| t.metadata.is_some());
        if c.task_serial != p.task_serial
            || p.host_ix == c.host_ix
            || c.bad_hosts.contains(&p.host.id)
            || c.parents.contains(&parent)
            || !p.can_serve(metadata_known)
            || p.children.len() >= self.slots(p)
            || (!allow_slow
                && self
                    .host_stats
                    .get(p.host_ix)
                    .is_some_and(|s| s.costs.is_slow()))
        {
            return false;
        }
        !(self.config.dag && self.is_ancestor(child, parent))
    }

    /// Whether `ancestor` can be reached from `of` through parent edges (or the search is too
    /// large to tell, which counts as yes).
    fn is_ancestor(&self, ancestor: PeerKey, of: PeerKey) -> bool {
        // Edges are kept on both ends: a peer nobody downloads from is nobody's ancestor.
        // This is every peer that has just registered, so a burst skips the search.
        if self
            .peers
            .get(&ancestor)
            .is_some_and(|a| a.children.is_empty())
        {
            return false;
        }
        let mut seen: HashSet<PeerKey> = HashSet::default();
        let mut stack = vec![of];
        while let Some(k) = stack.pop() {
            if k == ancestor {
                return true;
            }
            if !seen.insert(k) {
                continue;
            }
            if seen.len() > DAG_SEARCH_LIMIT {
                return true;
            }
            if let Some(p) = self.peers.get(&k) {
                stack.extend(p.parents.iter().copied());
            }
        }
        false
    }

    fn view<'a>(&'a self, peer: &'a Peer, child: &Peer) -> ParentView<'a> {
        let total = self
            .tasks
            .get(&peer.task_id)
            .and_then(|t| t.metadata.as_ref())
            .map_or(0, |m| m.piece_count());
        ParentView {
            pieces_ahead: evaluator::pieces_ahead_score(
                peer.pieces.count(),
                child.pieces.count(),
                total,
            ),
            host: &peer.host,
            children: peer.children.len(),
            slots: self.slots(peer),
            fetching_from_origin: peer.source && !peer.done,
            measured_rate: self
                .host_stats
                .get(peer.host_ix)
                .and_then(|s| s.costs.rate()),
        }
    }

    /// New parents for `child`, best first: a random sample of `filter_parent_limit` serving
    /// peers (resampled a few times if too few pass the filter), filtered by [`Self::eligible`],
    /// ordered by score; at most `candidate_parent_limit`, and no more than `parent_limit`
    /// parents in total.
    fn rank_parents(&mut self, child: PeerKey) -> Vec<PeerKey> {
        let Some(peer) = self.peers.get(&child) else {
            return Vec::new();
        };
        let Some(task) = self.tasks.get(&peer.task_id) else {
            return Vec::new();
        };
        if task.metadata.is_none() {
            return Vec::new();
        }
        let want = self
            .config
            .candidate_parent_limit
            .min(self.config.parent_limit.saturating_sub(peer.parents.len()));
        if want == 0 {
            return Vec::new();
        }
        let filter = self.config.filter_parent_limit;
        let mut seen: HashSet<PeerKey> = HashSet::default();
        let mut candidates: Vec<(f64, PeerKey)> = Vec::new();
        for _round in 0..4 {
            for k in task.servers.sample(filter, &mut self.rng) {
                if !seen.insert(k) || !self.eligible(child, k) {
                    continue;
                }
                if let Some(p) = self.peers.get(&k) {
                    let s = evaluator::score(
                        &self.config.weights,
                        self.config.bandwidth_reference,
                        &peer.host,
                        &self.view(p, peer),
                    );
                    candidates.push((s, k));
                }
            }
            if candidates.len() >= want.min(filter) || seen.len() >= task.servers.len() {
                break;
            }
        }
        if candidates.is_empty() {
            // Nobody usable: fall back to the hosts flagged slow.
            let mut sampled: Vec<PeerKey> = seen.into_iter().collect();
            sampled.sort();
            for k in sampled {
                if !self.eligible_with(child, k, true) {
                    continue;
                }
                if let Some(p) = self.peers.get(&k) {
                    let s = evaluator::score(
                        &self.config.weights,
                        self.config.bandwidth_reference,
                        &peer.host,
                        &self.view(p, peer),
                    );
                    candidates.push((s, k));
                }
            }
        }
        // Stable sort: equal scores keep the random sampling order.
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        candidates.truncate(want);
        candidates.into_iter().map(|(_, k)| k).collect()
    }

    /// Links `child` to `parent`.
    fn link(&mut self, child: PeerKey, parent: PeerKey) {
        if let Some(c) = self.peers.get_mut(&child) {
            c.parents.insert(parent);
        }
        if let Some(p) = self.peers.get_mut(&parent) {
            p.children.insert(child);
        }
    }

    /// Removes the edge `child` → `parent`.
    fn unlink(&mut self, child: PeerKey, parent: PeerKey) {
        if let Some(c) = self.peers.get_mut(&child) {
            c.parents.remove(&parent);
        }
        if let Some(p) = self.peers.get_mut(&parent) {
            p.children.remove(&child);
        }
    }

    /// Sends `parents` to `child` as `CandidateParents` and records the edges.
    fn send_parents(&mut self, child: PeerKey, parents: &[PeerKey], out: &mut Vec<Output>) {
        let messages: Vec<Parent> = parents
            .iter()
            .filter_map(|k| self.peers.get(k))
            .map(|p| Parent {
                host_id: p.host.id.clone(),
                peer_id: p.peer_id.clone(),
                ip: p.host.ip.clone(),
                data_port: p.host.data_port,
                r#type: p.host.r#type,
                quic_port: p.host.quic_port,
            })
            .collect();
        for parent in parents {
            self.link(child, *parent);
        }
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        let task = self.tasks.get(&peer.task_id);
        let metadata = task.and_then(Task::metadata_message);
        // Every digest known with the first parents; later ones come as PieceDigests.
        let digests = task.filter(|t| t.digests.trusted).map(|t| {
            if std::mem::replace(&mut peer.digests_synced, true) {
                Default::default()
            } else {
                t.digests.snapshot()
            }
        });
        peer.waiting = false;
        peer.scheduled = true;
        debug!(
            peer_id = %peer.peer_id,
            parents = ?messages.iter().map(|p| &p.host_id).collect::<Vec<_>>(),
            "candidate parents"
        );
        out.push(Output::Peer {
            peer: child,
            response: peer_response(announce_peer_response::Response::CandidateParents(
                CandidateParents {
                    parents: messages,
                    metadata,
                    digests,
                },
            )),
        });
        self.sync(child, out);
    }

    /// `NeedBackToSource` to `child`, which becomes a source peer; counts toward the limit.
    fn send_back_to_source(&mut self, child: PeerKey, reason: &str, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        peer.source = true;
        peer.waiting = false;
        if let Some(task) = self.tasks.get_mut(&peer.task_id) {
            task.back_to_source += 1;
            task.digests.trusted = true;
        }
        info!(task_id = %peer.task_id, peer_id = %peer.peer_id, reason, "peer sent back to source");
        out.push(Output::Peer {
            peer: child,
            response: peer_response(announce_peer_response::Response::NeedBackToSource(
                NeedBackToSource {
                    reason: reason.to_owned(),
                    pieces: Vec::new(),
                },
            )),
        });
        let parents: Vec<PeerKey> = self
            .peers
            .get(&child)
            .map(|p| p.parents.iter().copied().collect())
            .unwrap_or_default();
        for parent in parents {
            self.unlink(child, parent);
        }
        self.sync(child, out);
    }

    /// `server` just became able to serve: offer it to up to `candidate_parent_limit` peers
    /// that have fewer than `parent_limit` parents; then (outside a batch) schedule peers that were
    /// waiting for any parent.
    fn became_server(&mut self, server: PeerKey, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get(&server) else {
            return;
        };
        let task_id = p.task_id.clone();
        let Some(task) = self.tasks.get(&task_id) else {
            return;
        };
        let limit = self.config.candidate_parent_limit;
        let targets: Vec<PeerKey> = task
            .hungry
            .sample(limit * 4, &mut self.rng)
            .into_iter()
            .filter(|k| self.eligible(*k, server))
            .take(limit)
            .collect();
        for target in targets {
            if self.eligible(target, server) {
                self.send_parents(target, &[server], out);
            }
        }
        if self.in_batch {
            return;
        }
        let Some(task) = self.tasks.get(&task_id) else {
            return;
        };
        if task.metadata.is_none() || task.waiting.is_empty() {
            return;
        }
        let mut waiting: Vec<PeerKey> = task.waiting.iter().copied().collect();
        waiting.sort();
        self.in_batch = true;
        for k in waiting {
            let usable = self.eligible(k, server)
                && self
                    .peers
                    .get(&k)
                    .is_some_and(|p| p.waiting && p.wants_parents());
            if usable {
                self.schedule(k, out);
            }
        }
        self.in_batch = false;
    }
}
