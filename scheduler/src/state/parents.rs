//! Parent selection: which serving peers are eligible for a child (own host, blocked and
//! slow hosts, upload slots, cycles), how they are ranked, the edges between them, and the
//! `CandidateParents` / `NeedBackToSource` messages that carry the decision.

use super::{
    evaluator, is_seed, peer_response, HashSet, Output, ParentView, Peer, PeerKey, SchedulerState,
    Task, DAG_SEARCH_LIMIT, REASON_NO_PARENT,
};
use tracing::{debug, info};
use wire::proto::scheduler::{announce_peer_response, CandidateParents, NeedBackToSource, Parent};

impl SchedulerState {
    /// Sends `child` new candidate parents; with none, its current ones again; with none at
    /// all, back to the origin if the task's budget allows, else it waits.
    pub(super) fn schedule(&mut self, child: PeerKey, out: &mut Vec<Output>) {
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
    pub(super) fn slots(&self, peer: &Peer) -> usize {
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
    pub(super) fn is_ancestor(&self, ancestor: PeerKey, of: PeerKey) -> bool {
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
    pub(super) fn rank_parents(&mut self, child: PeerKey) -> Vec<PeerKey> {
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
    pub(super) fn unlink(&mut self, child: PeerKey, parent: PeerKey) {
        if let Some(c) = self.peers.get_mut(&child) {
            c.parents.remove(&parent);
        }
        if let Some(p) = self.peers.get_mut(&parent) {
            p.children.remove(&child);
        }
    }

    /// Sends `parents` to `child` as `CandidateParents` and records the edges.
    pub(super) fn send_parents(
        &mut self,
        child: PeerKey,
        parents: &[PeerKey],
        out: &mut Vec<Output>,
    ) {
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
    pub(super) fn send_back_to_source(
        &mut self,
        child: PeerKey,
        reason: &str,
        out: &mut Vec<Output>,
    ) {
        let Some(peer) = self.peers.get(&child) else {
            return;
        };
        let gives_digests = self.sent_peer_gives_digests(&peer.host);
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        peer.source = true;
        peer.sent_to_source = true;
        peer.waiting = false;
        if let Some(task) = self.tasks.get_mut(&peer.task_id) {
            task.back_to_source += 1;
            task.digests.trusted |= gives_digests;
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
    pub(super) fn became_server(&mut self, server: PeerKey, out: &mut Vec<Output>) {
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
