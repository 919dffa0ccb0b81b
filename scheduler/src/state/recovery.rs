//! Keeping a task fetchable: triggering a seed host (or sending a peer to the origin) when
//! nobody can serve the task, and recovering pieces whose last live holder left.

use super::{
    is_seed, peer_response, rendezvous_weight, Output, Peer, PeerKey, SchedulerState, SeedTrigger,
    REASON_NO_SEED, REASON_PIECES_LOST,
};
use tracing::{info, warn};
use wire::proto::scheduler::{
    announce_peer_response, host_command, DownloadTask, HostCommand, NeedBackToSource,
};

impl SchedulerState {
    /// After a peer left a task of known size: if some pieces are now held by no live peer
    /// (and nobody holds the whole task, fetches it from the origin, or was told to fetch
    /// those pieces), someone must fetch them. A live seed host that has not failed the task
    /// is triggered (it fetches the task from the origin, at most one more copy); without
    /// one, the missing pieces are split in contiguous runs among up to
    /// `back_to_source_limit` peers (at least one, whatever the budget says), those holding
    /// the most pieces first, each told with a partial `NeedBackToSource` to fetch its run
    /// from the origin while it goes on fetching the rest from its parents.
    pub(super) fn recover_lost_pieces(&mut self, task_id: &str, out: &mut Vec<Output>) {
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
    pub(super) fn recover_for_peer(&mut self, child: PeerKey, out: &mut Vec<Output>) {
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
        let Some(peer) = self.peers.get(&child) else {
            return;
        };
        let gives_digests = self.sent_peer_gives_digests(&peer.host);
        let Some(peer) = self.peers.get_mut(&child) else {
            return;
        };
        info!(task_id = %peer.task_id, peer_id = %peer.peer_id, pieces = pieces.len(), "peer sent to the origin for lost pieces");
        peer.origin_pieces.extend_from_slice(&pieces);
        if let Some(task) = self.tasks.get_mut(&peer.task_id) {
            task.back_to_source += 1;
            task.digests.trusted |= gives_digests;
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
    pub(super) fn ensure_source(
        &mut self,
        task_id: &str,
        requester: Option<PeerKey>,
        out: &mut Vec<Output>,
    ) {
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
}
