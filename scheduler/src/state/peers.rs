//! Peers joining and leaving a task: registration (with its identity checks and the
//! replacement of an older registration of the same peer id), `AnnounceTask` of a complete
//! imported task, `StatTask`, and removal of a peer with its edges.

use super::{
    is_seed, DigestSources, HashSet, InvalidRequest, Output, Peer, PeerKey, PieceSet, Recorded,
    SchedulerState, TaskDigests,
};
use tracing::{debug, info, warn};
use wire::proto::scheduler::{AnnounceTaskRequest, Host, PeerInfo, RegisterPeer, TaskInfo};
use wire::PieceLayout;

impl SchedulerState {
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

        let digest_sources = self.config.digest_sources;
        let task = self.task_entry(&task_id);
        let task_serial = task.serial;
        if task.source.is_none() && source.is_some() {
            task.source = source;
            task.piece_length = piece_length;
            // Digests a normal host imported while no origin was known describe what that
            // host said the task is; the origin is the authority now.
            if task.digests.from_import {
                warn!(task_id = %task_id, "the task has an origin now: dropping the piece digests a normal host imported for it");
                task.digests = TaskDigests::default();
            }
        }
        task.peers.insert(key);
        task.by_peer_id.insert(peer_id.clone(), key);
        let digests_from_it = is_seed(&host) || digest_sources == DigestSources::Any;
        if back_to_source && !digests_from_it {
            info!(task_id = %task_id, peer_id = %peer_id, host_id = %host.id, ?digest_sources, "peer registered as back-to-source on its own: its piece digests are not trusted (scheduling.digest_sources)");
        }
        if back_to_source {
            if digests_from_it {
                task.digests.trusted = true;
            }
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
                sent_to_source: false,
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
            piece_crcs,
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
        let digest_sources = self.config.digest_sources;
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
        // An import brings the digest of every piece: its host read the file itself. Taken
        // from a seed host; with `scheduled` also from a normal host for a task without a
        // known origin (a dfcache task: its importer defines the content); with `any` always.
        let from_seed = is_seed(&host);
        let accepted = from_seed
            || match digest_sources {
                DigestSources::SeedPeers => false,
                DigestSources::Scheduled => task.source.is_none(),
                DigestSources::Any => true,
            };
        let complete =
            piece_digests.len() == piece_count as usize * wire::PIECE_DIGEST_LEN && piece_count > 0;
        if complete && !accepted {
            info!(task_id = %task_id, host_id = %host.id, ?digest_sources, "piece digests announced by a normal host for a task with an origin are not trusted (scheduling.digest_sources)");
        }
        if complete && accepted {
            if !from_seed && digest_sources != DigestSources::Any && !task.digests.trusted {
                task.digests.from_import = true;
            }
            task.digests.trusted = true;
            // The crcs come with the digests or not at all (an older daemon sends none).
            let crcs =
                wire::split_piece_crcs(piece_count as usize, &piece_crcs).unwrap_or_default();
            for (n, d) in (0..piece_count).zip(piece_digests.chunks_exact(wire::PIECE_DIGEST_LEN)) {
                let crc = crcs.get(n as usize).copied();
                if task.digests.record(n, d, crc, piece_count) == Some(Recorded::Conflict) {
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
                sent_to_source: false,
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

    /// Forgets a peer. If it was fetching the task from the origin for everyone (the source
    /// of a task of unknown size, or the triggered seed), someone else must take over.
    pub(super) fn remove_peer(&mut self, key: PeerKey, out: &mut Vec<Output>) {
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
}
