//! Preheat: the manager asks for a task ahead of time, on a seed host (the scheduler
//! triggers one as for a new task) or on chosen hosts (scoped preheat, which fetch from the
//! peers that hold it), and polls until it is done or failed.

use super::{is_seed, InvalidRequest, Output, PreheatStatus, SchedulerState, REASON_NO_SEED};
use tracing::{debug, info};
use wire::proto::scheduler::{host_command, DownloadTask, Host, HostCommand, TaskSource};

impl SchedulerState {
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
}
