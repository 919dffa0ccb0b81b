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
//! 3. [`SchedulerState::stat_task`] to answer `StatTask`.
//!
//! Nothing here blocks, reads a clock or panics on peer input; tests drive it directly.

mod pieces;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use tracing::{debug, info, warn};
use wire::piece::MAX_PIECE_COUNT;
use wire::proto::scheduler::{
    announce_peer_request, announce_peer_response, host_command, AnnouncePeerResponse,
    CandidateParents, DownloadTask, Host, HostCommand, HostType, NeedBackToSource, Parent,
    PeerFinished, PeerInfo, PieceFailed, PieceFinished, RegisterPeer, RescheduleRequest, TaskInfo,
    TaskMetadata, TaskSource,
};
use wire::PieceLayout;

use crate::config::SchedulingConfig;
use pieces::PieceSet;

/// Most bad parents remembered per peer: enough for any real swarm, bounded against a peer
/// that sends endless reschedule lists.
pub const MAX_BAD_PARENTS: usize = 1024;

/// Reason sent with `NeedBackToSource` when no seed host is live for a new task.
pub const REASON_NO_SEED: &str = "no seed peer available";
/// Reason sent with `NeedBackToSource` when the task's size is known but nobody can serve it.
pub const REASON_NO_PARENT: &str = "no parent available";

/// Names one `AnnounceHost` stream (not the host: a host that reconnects gets a new key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostKey(pub u64);

/// Names one `AnnouncePeer` stream, i.e. one peer of one task.
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
    /// `RegisterPeer.task_id` is empty.
    #[error("task_id is required")]
    MissingTaskId,
    /// `RegisterPeer.peer_id` is empty.
    #[error("peer_id is required")]
    MissingPeerId,
    /// The stream key is already in use (a bug in the runtime, not in the peer).
    #[error("stream already registered")]
    DuplicateKey,
}

/// One peer: a host downloading (or holding) one task.
#[derive(Debug)]
struct Peer {
    peer_id: String,
    task_id: String,
    host: Host,
    /// Fetches from the origin (registered with `back_to_source`, or told to).
    source: bool,
    /// Reported `PeerFinished`.
    done: bool,
    /// Needs parents and has none to use: gets them as soon as any appear.
    waiting: bool,
    pieces: PieceSet,
    /// Parents sent to this peer that are still in the task.
    parents: HashSet<PeerKey>,
    /// Host ids this peer reported as bad parents.
    bad_hosts: HashSet<String>,
    pieces_failed: u64,
}

impl Peer {
    /// Whether the peer can be handed out as a parent.
    fn can_serve(&self, metadata_known: bool) -> bool {
        self.done || self.pieces.count() > 0 || (self.source && metadata_known)
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
#[derive(Debug)]
struct Task {
    /// Origin of the task, from the first registration that named one.
    source: Option<TaskSource>,
    /// Piece length asked for by that registration (0: derive from the content length).
    piece_length: u64,
    metadata: Option<PieceLayout>,
    peers: BTreeSet<PeerKey>,
    /// Peers told to go back to the origin.
    back_to_source: u32,
    trigger: Option<SeedTrigger>,
    /// Seed hosts that failed this task (never triggered again for it).
    failed_seeds: HashSet<String>,
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
    peers: HashMap<PeerKey, Peer>,
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

impl SchedulerState {
    /// An empty state with a randomly seeded tie-breaker.
    pub fn new(config: SchedulingConfig) -> Self {
        Self::with_rng(config, SmallRng::from_os_rng())
    }

    /// An empty state whose random tie-breaks follow `seed` (for reproducible tests).
    pub fn with_seed(config: SchedulingConfig, seed: u64) -> Self {
        Self::with_rng(config, SmallRng::seed_from_u64(seed))
    }

    fn with_rng(config: SchedulingConfig, rng: SmallRng) -> Self {
        Self {
            config,
            hosts: BTreeMap::new(),
            tasks: HashMap::new(),
            peers: HashMap::new(),
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

    /// An `AnnounceHost` stream opened: the host is live (a seed host may now be triggered).
    pub fn host_announced(&mut self, key: HostKey, host: Host) -> Result<(), InvalidRequest> {
        if host.id.is_empty() {
            return Err(InvalidRequest::MissingHost);
        }
        if self.hosts.contains_key(&key) {
            return Err(InvalidRequest::DuplicateKey);
        }
        info!(host_id = %host.id, ip = %host.ip, seed = is_seed(&host), "host announced");
        self.hosts.insert(key, host);
        Ok(())
    }

    /// An `AnnounceHost` stream closed. Seed triggers still waiting for that host move to the
    /// next seed (or send a waiting peer back to the origin).
    pub fn host_left(&mut self, key: HostKey) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(host) = self.hosts.remove(&key) else {
            return out;
        };
        info!(host_id = %host.id, "host left");
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
            self.ensure_source(&task_id, None, &mut out);
        }
        out
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
        } = register;
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
        let mut out = Vec::new();

        let previous = self.tasks.get(&task_id).and_then(|t| {
            t.peers
                .iter()
                .copied()
                .find(|k| self.peers.get(k).is_some_and(|p| p.peer_id == peer_id))
        });
        if let Some(old) = previous {
            warn!(task_id = %task_id, peer_id = %peer_id, "peer registered again; replacing the old stream");
            out.push(Output::ClosePeer {
                peer: old,
                reason: "replaced by a newer registration of the same peer".to_owned(),
            });
            self.remove_peer(old, &mut out);
        }

        let task = self.tasks.entry(task_id.clone()).or_insert_with(|| Task {
            source: None,
            piece_length: 0,
            metadata: None,
            peers: BTreeSet::new(),
            back_to_source: 0,
            trigger: None,
            failed_seeds: HashSet::new(),
        });
        if task.source.is_none() && source.is_some() {
            task.source = source;
            task.piece_length = piece_length;
        }
        task.peers.insert(key);
        if back_to_source {
            if let Some(t) = task.trigger.as_mut() {
                if t.peer.is_none() && t.host_id == host.id {
                    t.peer = Some(key);
                }
            }
        }
        let metadata_known = task.metadata.is_some();
        debug!(task_id = %task_id, peer_id = %peer_id, host_id = %host.id, back_to_source, "peer registered");
        self.peers.insert(
            key,
            Peer {
                peer_id,
                task_id: task_id.clone(),
                host,
                source: back_to_source,
                done: false,
                waiting: !back_to_source,
                pieces: PieceSet::default(),
                parents: HashSet::new(),
                bad_hosts: HashSet::new(),
                pieces_failed: 0,
            },
        );

        if back_to_source {
            // Fetches from the origin; it will tell us the size with TaskMetadata.
        } else if metadata_known {
            self.schedule(key, None, &mut out);
        } else {
            self.ensure_source(&task_id, Some(key), &mut out);
        }
        Ok(out)
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
            Request::PieceFailed(p) => self.piece_failed(key, p),
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
        let peers = task
            .peers
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

    fn task_metadata(&mut self, key: PeerKey, metadata: TaskMetadata, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let task_id = peer.task_id.clone();
        let Some(task) = self.tasks.get_mut(&task_id) else {
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
        info!(
            task_id = %task_id,
            content_length = layout.content_length(),
            piece_length = layout.piece_length(),
            "task metadata known"
        );
        task.metadata = Some(layout);
        let keys: Vec<PeerKey> = task.peers.iter().copied().collect();
        for k in &keys {
            if let Some(p) = self.peers.get_mut(k) {
                p.pieces.truncate(layout.piece_count());
            }
        }
        for k in keys {
            if self
                .peers
                .get(&k)
                .is_some_and(|p| p.waiting && p.wants_parents())
            {
                self.schedule(k, Some(key), out);
            }
        }
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
        let metadata_known = task.metadata.is_some();
        if !peer.pieces.insert(piece.number) {
            return;
        }
        if peer.pieces.count() == 1 && metadata_known && !peer.done {
            self.push_parent(key, out);
        }
    }

    fn piece_failed(&mut self, key: PeerKey, piece: PieceFailed) {
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.pieces_failed += 1;
            debug!(
                peer_id = %peer.peer_id,
                number = piece.number,
                parent = %piece.parent_host_id,
                reason = %piece.reason,
                failed = peer.pieces_failed,
                "piece failed"
            );
        }
    }

    fn reschedule(&mut self, key: PeerKey, request: RescheduleRequest, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        info!(peer_id = %peer.peer_id, bad = ?request.bad_parent_host_ids, reason = %request.reason, "reschedule");
        for id in request.bad_parent_host_ids {
            if peer.bad_hosts.len() >= MAX_BAD_PARENTS {
                warn!(peer_id = %peer.peer_id, "too many bad parents; the rest are ignored");
                break;
            }
            peer.bad_hosts.insert(id);
        }
        let Some(peer) = self.peers.get(&key) else {
            return;
        };
        let keep: HashSet<PeerKey> = peer
            .parents
            .iter()
            .copied()
            .filter(|k| {
                self.peers
                    .get(k)
                    .is_some_and(|p| !peer.bad_hosts.contains(&p.host.id))
            })
            .collect();
        let task_id = peer.task_id.clone();
        let metadata_known = self
            .tasks
            .get(&task_id)
            .is_some_and(|t| t.metadata.is_some());
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.parents = keep;
            if !metadata_known {
                peer.waiting = true;
            }
        }
        if metadata_known {
            self.schedule(key, None, out);
        } else {
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
        let metadata_known = task.metadata.is_some();
        let could_serve = peer.can_serve(metadata_known);
        peer.done = true;
        peer.waiting = false;
        if task.trigger.as_ref().is_some_and(|t| t.peer == Some(key)) {
            task.trigger = None;
        }
        debug!(
            task_id = %peer.task_id,
            peer_id = %peer.peer_id,
            content_length = finished.content_length,
            "peer finished"
        );
        if !metadata_known {
            warn!(task_id = %peer.task_id, "peer finished but nobody reported the task's metadata");
        } else if !could_serve {
            self.push_parent(key, out);
        }
    }

    /// Forgets a peer. If it was fetching the task from the origin for everyone (the source
    /// of a task of unknown size, or the triggered seed), someone else must take over.
    fn remove_peer(&mut self, key: PeerKey, out: &mut Vec<Output>) {
        let Some(peer) = self.peers.remove(&key) else {
            return;
        };
        let Some(task) = self.tasks.get_mut(&peer.task_id) else {
            return;
        };
        task.peers.remove(&key);
        for k in &task.peers {
            if let Some(p) = self.peers.get_mut(k) {
                p.parents.remove(&key);
            }
        }
        debug!(task_id = %peer.task_id, peer_id = %peer.peer_id, done = peer.done, "peer left");
        if task.peers.is_empty() {
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
        if lost_source {
            warn!(task_id = %peer.task_id, host_id = %peer.host.id, "source peer left before finishing");
            self.ensure_source(&peer.task_id, None, out);
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
        let members = || {
            task.peers
                .iter()
                .filter_map(|k| self.peers.get(k).map(|p| (*k, p)))
        };
        if members().any(|(_, p)| p.source && !p.done) {
            return;
        }
        if task.metadata.is_some() && members().any(|(_, p)| p.done) {
            return;
        }
        if !members().any(|(_, p)| p.wants_parents()) {
            return;
        }
        let waiting = |k: &PeerKey| {
            self.peers
                .get(k)
                .is_some_and(|p| p.waiting && p.wants_parents())
        };
        let fallback = requester
            .filter(waiting)
            .or_else(|| task.peers.iter().copied().find(waiting));

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

    /// Sends `child` candidate parents (preferring `prefer`), or back to the origin if none
    /// is eligible and the task's back-to-source budget allows, or leaves it waiting.
    fn schedule(&mut self, child: PeerKey, prefer: Option<PeerKey>, out: &mut Vec<Output>) {
        let parents = self.rank_parents(child, prefer);
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
        }
    }

    /// Eligible parents of `child`, best first, at most `candidate_parent_limit`.
    ///
    /// Order: parents not yet given to `child`; then `prefer`; then done peers and seed peers;
    /// then more finished pieces; random tie-break.
    fn rank_parents(&mut self, child: PeerKey, prefer: Option<PeerKey>) -> Vec<PeerKey> {
        let Some(peer) = self.peers.get(&child) else {
            return Vec::new();
        };
        let Some(task) = self.tasks.get(&peer.task_id) else {
            return Vec::new();
        };
        let metadata_known = task.metadata.is_some();
        if !metadata_known {
            return Vec::new();
        }
        let mut ranked = Vec::new();
        for &k in &task.peers {
            let Some(candidate) = self.peers.get(&k) else {
                continue;
            };
            if k == child
                || candidate.host.id == peer.host.id
                || peer.bad_hosts.contains(&candidate.host.id)
                || !candidate.can_serve(metadata_known)
            {
                continue;
            }
            let given = peer.parents.contains(&k);
            let tier = if Some(k) == prefer {
                0u8
            } else if candidate.done || is_seed(&candidate.host) {
                1
            } else {
                2
            };
            let tie: u64 = self.rng.random();
            ranked.push((given, tier, Reverse(candidate.pieces.count()), tie, k));
        }
        ranked.sort_unstable();
        ranked
            .into_iter()
            .take(self.config.candidate_parent_limit)
            .map(|(.., k)| k)
            .collect()
    }

    /// Sends `parents` to `child` as `CandidateParents` and records them as given.
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
            })
            .collect();
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        let metadata = self
            .tasks
            .get(&peer.task_id)
            .and_then(Task::metadata_message);
        peer.parents.extend(parents.iter().copied());
        peer.waiting = false;
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
                },
            )),
        });
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
        }
        info!(task_id = %peer.task_id, peer_id = %peer.peer_id, reason, "peer sent back to source");
        out.push(Output::Peer {
            peer: child,
            response: peer_response(announce_peer_response::Response::NeedBackToSource(
                NeedBackToSource {
                    reason: reason.to_owned(),
                },
            )),
        });
    }

    /// `parent` just became able to serve: offer it to every other peer of the task that
    /// still wants parents, has room for one more and does not have it yet.
    fn push_parent(&mut self, parent: PeerKey, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get(&parent) else {
            return;
        };
        let Some(task) = self.tasks.get(&p.task_id) else {
            return;
        };
        let limit = self.config.parent_limit;
        let targets: Vec<PeerKey> = task
            .peers
            .iter()
            .copied()
            .filter(|k| *k != parent)
            .filter(|k| {
                self.peers.get(k).is_some_and(|q| {
                    q.wants_parents()
                        && q.host.id != p.host.id
                        && q.parents.len() < limit
                        && !q.parents.contains(&parent)
                        && !q.bad_hosts.contains(&p.host.id)
                })
            })
            .collect();
        for target in targets {
            self.send_parents(target, &[parent], out);
        }
    }
}
