//! What a registered peer reports on its `AnnouncePeer` stream: the task's metadata,
//! finished and failed pieces, bad parents, reschedule requests, and the end of its download.

use super::{
    set_member, Output, PeerKey, Recorded, SchedulerState, DIGEST_BATCH, EAGER_TOP_UP_BELOW,
    MAX_BAD_PARENTS, REASON_RETRY_LIMIT, TOP_UP_EVERY,
};
use tracing::{debug, info, warn};
use wire::proto::scheduler::{
    announce_peer_request, PeerFinished, PieceFailed, PieceFinished, RescheduleRequest,
    TaskMetadata,
};
use wire::PieceLayout;

impl SchedulerState {
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

    /// Recomputes `key`'s membership of its task's sets; when it just became able to serve,
    /// offers it to peers short of parents.
    pub(super) fn sync(&mut self, key: PeerKey, out: &mut Vec<Output>) {
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
    pub(super) fn set_metadata(
        &mut self,
        task_id: &str,
        layout: PieceLayout,
        out: &mut Vec<Output>,
    ) {
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
        let Some(peer) = self.peers.get(&key) else {
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
        // A digest counts only from a peer that fetched the piece from the origin, and of
        // those only from the ones `scheduling.digest_sources` trusts.
        let from_origin = !piece.digest.is_empty() && piece.parent_host_id.is_empty();
        let trusted = from_origin && self.gives_digest(peer, piece.number);
        if from_origin && !trusted && (peer.source || peer.origin_pieces.contains(&piece.number)) {
            debug!(task_id = %peer.task_id, peer_id = %peer.peer_id, number = piece.number, "piece digest from an untrusted source ignored (scheduling.digest_sources)");
        }
        if trusted {
            let bound = task.piece_bound();
            if let Some(task) = self.tasks.get_mut(&peer.task_id) {
                task.digests.trusted = true;
                task.digests.from_import = false;
                match task
                    .digests
                    .record(piece.number, &piece.digest, Some(piece.crc32c), bound)
                {
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
}
