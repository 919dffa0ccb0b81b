//! What the schedulers' host streams ask of the downloads ([`HostCommands`]): a seed trigger
//! registers with the scheduler that sent it (it waits for this seed's registration); a
//! `DownloadTask` with `from_peers` (a preheat whose scope takes in this host) is downloaded
//! like `dfget` would: parents from the scheduler, the origin only if it says so.

use super::{TaskManager, TaskSpec};
use crate::scheduler::HostCommands;
use wire::proto::scheduler::DownloadTask;
use wire::{PieceLayout, TaskId};

impl HostCommands for std::sync::Arc<TaskManager> {
    fn download(&self, addr: &str, t: DownloadTask) -> Option<(TaskId, PieceLayout)> {
        let Ok(id) = TaskId::parse(&t.task_id) else {
            tracing::warn!("scheduler sent a bad task id {:?}", t.task_id);
            return None;
        };
        let Some(source) = t.source else {
            tracing::warn!("scheduler sent a seed trigger without a source for {id}");
            return None;
        };
        if let Some(store) = self.services.storage.get(&id).filter(|s| s.is_complete()) {
            tracing::info!(task = %id, "seed trigger for a task held completely: announcing it to {addr}");
            return Some((id, store.layout()));
        }
        if t.from_peers {
            tracing::info!(task = %id, url = %source.url, "preheat: fetching from peers");
        } else {
            tracing::info!(task = %id, url = %source.url, "seed trigger: fetching from the origin");
        }
        // The content digest travels with the source (or is in a blob URL): what the
        // origin sends is checked against it before this seed counts as holding it.
        let digest = match wire::task::content_digest(&source.url, &source.digest) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(task = %id, "seed trigger with a bad source: {e}");
                return None;
            }
        };
        let spec = TaskSpec {
            id,
            url: source.url,
            headers: source
                .headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect(),
            piece_length: t.piece_length,
            // A preheat's scope beyond the first seed: a normal peer's download.
            back_to_source: !t.from_peers,
            disable_back_to_source: false,
            rate_limit: 0,
            scheduler: Some(addr.to_owned()),
            priority: 0,
            digest,
        };
        // The run reports through the scheduler; nobody waits on it locally.
        drop(self.start_or_join(spec));
        None
    }

    fn held_tasks(&self) -> Vec<(TaskId, PieceLayout)> {
        self.services
            .storage
            .tasks()
            .into_iter()
            .filter(|t| {
                let id = t.id();
                t.is_complete() && !self.is_serving(&id) && !self.is_running(&id)
            })
            .map(|t| (t.id(), t.layout()))
            .collect()
    }
}
