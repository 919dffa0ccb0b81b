//! Per-task downloads: the scheduler session of one task, the data-plane commands it leads
//! to, and going back to the origin when that is the best (or only) option.
//!
//! This file holds what other modules use ([`TaskSpec`], [`TaskState`], [`TaskManager`]);
//! one run (`run::TaskRun`) is split by concern: `run` (the loop, data-plane events,
//! stalls), `session` (the scheduler stream), `source` (back to the origin, lost pieces).

mod run;
mod services;
mod session;
mod source;
#[cfg(test)]
pub(crate) mod tests;
mod triggers;

pub use services::{
    BoxFuture, BridgeLink, CommandRefused, DataPlaneLink, Origin, ResponseStream, RunServices,
    RunSettings, Schedulers,
};

use run::TaskRun;

use crate::error::DownloadError;
use crate::origin::PieceSink;
use crate::scheduler::SchedulerError;
use dataplane::{Command, Event, Parent, PieceSource, TaskStore};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use wire::proto::scheduler::{
    announce_peer_request::Request, announce_peer_response::Response, AnnouncePeerRequest, Header,
    HostType, PeerFailed, PeerFinished, PieceFailed, PieceFinished, RegisterPeer,
    RescheduleRequest, TaskMetadata, TaskSource,
};
use wire::{PieceLayout, TaskId};

/// What to download.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Task id.
    pub id: TaskId,
    /// Origin URL.
    pub url: String,
    /// Headers for the origin request.
    pub headers: Vec<(String, String)>,
    /// Forced piece length (0: derived from the size).
    pub piece_length: u64,
    /// Fetch from the origin right away (seed trigger).
    pub back_to_source: bool,
    /// Never fetch from the origin; fail when no peer can serve.
    pub disable_back_to_source: bool,
    /// This download's own rate limit in bytes per second (0: none).
    pub rate_limit: u64,
    /// Scheduler (address) to register with first: the one that sent a seed trigger, which
    /// waits for this seed's registration. `None`: the task's own scheduler by rendezvous
    /// order.
    pub scheduler: Option<String>,
    /// Dragonfly priority level passed to the scheduler (0: default).
    pub priority: i32,
    /// The content's sha256 digest (`sha256:<hex>`, canonical) when the task is
    /// content-addressed (a registry blob URL) or a preheat job names it (a seed trigger
    /// whose source carries it): bytes fetched from the origin are checked against it before
    /// the task counts as finished, and it travels with the task's source, so a seed peer the
    /// scheduler triggers checks it too. A client's own `--digest` is not put here: it is
    /// checked on delivery to that client.
    pub digest: Option<String>,
    /// Object-storage settings the local client gave with its request (dfget's
    /// `--storage-*`), over this daemon's `origin.s3` when it fetches an `s3://` URL itself.
    /// Never put in the task's source for the scheduler (a seed it triggers uses its own
    /// settings) and not part of the task id; `Debug` redacts the secret.
    pub s3: Option<crate::s3::S3Request>,
}

/// Checks the complete task file of `store` against `digest` (`sha256:<hex>`); the error
/// says what was expected and found.
pub async fn verify_digest(store: &Arc<TaskStore>, digest: &str) -> Result<(), DownloadError> {
    let want = digest.strip_prefix("sha256:").unwrap_or(digest).to_owned();
    let path = store.path().to_path_buf();
    let got = tokio::task::spawn_blocking(move || damselfly_common::file_sha256_hex(&path))
        .await
        .map_err(|e| DownloadError::Internal(format!("hashing the task file: {e}")))?
        .map_err(|e| DownloadError::io("hashing the task file", &e))?;
    if got.eq_ignore_ascii_case(&want) {
        Ok(())
    } else {
        Err(DownloadError::DigestMismatch(format!(
            "digest mismatch: the origin sent content with sha256:{got}, expected {digest}"
        )))
    }
}

/// Progress of a task, as reported to local clients.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Content length, once known.
    pub content_length: Option<u64>,
    /// Pieces in the task.
    pub piece_count: u32,
    /// Pieces stored.
    pub finished_pieces: u32,
    /// Bytes stored.
    pub completed_length: u64,
    /// Bytes of this task fetched from the origin.
    pub from_origin: u64,
    /// Bytes of this task fetched from seed peers.
    pub from_seed: u64,
    /// Bytes of this task fetched from other peers.
    pub from_peers: u64,
}

/// State of a task download, watched by local clients.
#[derive(Debug, Clone)]
pub enum TaskState {
    /// Still downloading.
    Running(Progress),
    /// Every piece is stored.
    Done(Arc<TaskStore>, Progress),
    /// The download failed for good.
    Failed(DownloadError),
}

/// The downloads service: starts runs over its [`RunServices`] and keeps the running
/// downloads of this daemon by task id (and the finished ones still registered).
#[derive(Debug)]
pub struct TaskManager {
    runs: Mutex<HashMap<TaskId, Run>>,
    /// Finished downloads whose scheduler stream stays open; notified to close it.
    serving: Mutex<HashMap<TaskId, Arc<tokio::sync::Notify>>>,
    /// What every run uses.
    services: RunServices,
}

#[derive(Debug)]
struct Run {
    state: watch::Receiver<TaskState>,
    events: mpsc::Sender<Event>,
}

/// Bounded per-task event queue between the event pump and a run.
const RUN_EVENT_QUEUE: usize = 1024;

impl TaskManager {
    /// No downloads yet; runs will use `services`.
    pub fn new(services: RunServices) -> Self {
        Self {
            runs: Mutex::default(),
            serving: Mutex::default(),
            services,
        }
    }

    /// Joins the running download of `spec.id`, or starts one; returns its state.
    pub fn start_or_join(self: &Arc<Self>, spec: TaskSpec) -> watch::Receiver<TaskState> {
        let svc = &self.services;
        svc.meta.note_url(spec.id, &spec.url);
        if let Some(store) = svc.storage.get(&spec.id).filter(|s| s.is_complete()) {
            store.touch();
            let p = progress_of(&store, &Progress::default());
            return watch::channel(TaskState::Done(store, p)).1;
        }
        let Ok(mut runs) = self.runs.lock() else {
            return watch::channel(TaskState::Failed(DownloadError::Internal(
                "task table poisoned".into(),
            )))
            .1;
        };
        if let Some(r) = runs.get(&spec.id) {
            if !matches!(&*r.state.borrow(), TaskState::Failed(_)) {
                return r.state.clone();
            }
        }
        let (state_tx, state_rx) = watch::channel(TaskState::Running(Progress::default()));
        let (ev_tx, ev_rx) = mpsc::channel(RUN_EVENT_QUEUE);
        runs.insert(
            spec.id,
            Run {
                state: state_rx.clone(),
                events: ev_tx,
            },
        );
        drop(runs);
        dataplane::Counters::add(&svc.stats.downloads_started, 1);
        let tasks = self.clone();
        tokio::spawn(async move {
            let run = TaskRun::new(tasks.services.clone(), spec, state_tx, ev_rx);
            run.drive(&tasks).await;
        });
        state_rx
    }

    /// Whether a download of `id` is running.
    pub fn is_running(&self, id: &TaskId) -> bool {
        self.runs.lock().is_ok_and(|r| r.contains_key(id))
    }

    /// Whether a finished download of `id` still has its scheduler stream open.
    pub fn is_serving(&self, id: &TaskId) -> bool {
        self.serving.lock().is_ok_and(|s| s.contains_key(id))
    }

    /// Closes the scheduler stream of a finished download of `id` (the scheduler stops
    /// offering this peer for it).
    pub fn stop_serving(&self, id: &TaskId) {
        if let Some(n) = self.serving.lock().ok().and_then(|mut s| s.remove(id)) {
            n.notify_one();
        }
    }

    /// Downloads running now.
    pub fn running(&self) -> usize {
        self.runs.lock().map_or(0, |r| r.len())
    }

    /// Routes a data-plane event to the run of its task (dropped when no run waits for it).
    pub async fn route(&self, ev: Event) {
        let task = match &ev {
            Event::PieceFinished { task, .. }
            | Event::PieceFailed { task, .. }
            | Event::ParentFailed { task, .. }
            | Event::NeedParents { task }
            | Event::StorageFailed { task, .. }
            | Event::DownloadFinished { task } => *task,
        };
        let tx = self
            .runs
            .lock()
            .ok()
            .and_then(|r| r.get(&task).map(|r| r.events.clone()));
        if let Some(tx) = tx {
            let _ = tx.send(ev).await;
        }
    }
}

fn progress_of(store: &TaskStore, base: &Progress) -> Progress {
    let l = store.layout();
    Progress {
        content_length: Some(l.content_length()),
        piece_count: l.piece_count(),
        finished_pieces: store.finished_count(),
        completed_length: store.completed_length(),
        ..base.clone()
    }
}
