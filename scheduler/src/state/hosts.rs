//! Hosts: the live `AnnounceHost` streams, and the interned table of host ids with what the
//! scheduler measured of each host as a parent (a peer names its host by index).

use super::{
    is_seed, CostWindow, HashMap, HostKey, InvalidRequest, Output, PeerKey, SchedulerState,
};
use tracing::{info, warn};
use wire::proto::scheduler::Host;

/// What the scheduler measured of one host as a parent.
#[derive(Debug)]
pub(super) struct HostStats {
    /// The host id.
    pub(super) id: String,
    /// Live peers on the host plus live `AnnounceHost` streams of it.
    pub(super) refs: usize,
    /// Its measured piece costs as a parent.
    pub(super) costs: CostWindow,
}

/// Index of a host in [`HostTable`], valid while the host has references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HostIx(u32);

/// The live hosts' ids, interned: a peer names its host by index, so that checking a
/// candidate parent compares two integers and reads its host's measurements by index
/// instead of hashing and comparing id strings (with 10,000 peers those strings are cache
/// misses, and they were the largest part of a decision).
#[derive(Debug, Default)]
pub(super) struct HostTable {
    by_id: HashMap<String, HostIx>,
    slots: Vec<Option<HostStats>>,
    free: Vec<HostIx>,
}

impl HostTable {
    /// Adds a reference to host `id` (interning it if new) and returns its index.
    pub(super) fn acquire(&mut self, id: &str) -> HostIx {
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
    pub(super) fn release(&mut self, ix: HostIx) {
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

    pub(super) fn get(&self, ix: HostIx) -> Option<&HostStats> {
        self.slots.get(ix.0 as usize).and_then(Option::as_ref)
    }

    pub(super) fn by_id_mut(&mut self, id: &str) -> Option<&mut HostStats> {
        let ix = *self.by_id.get(id)?;
        self.slots.get_mut(ix.0 as usize).and_then(Option::as_mut)
    }

    #[cfg(test)]
    pub(super) fn by_id(&self, id: &str) -> Option<&HostStats> {
        self.get(*self.by_id.get(id)?)
    }
}

impl SchedulerState {
    pub(super) fn host_ref(&mut self, host_id: &str) -> HostIx {
        self.host_stats.acquire(host_id)
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
}
