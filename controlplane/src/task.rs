//! Per-task downloads: the scheduler session of one task, the data-plane commands it leads
//! to, and going back to the origin when that is the best (or only) option.

use crate::daemon::Context;
use crate::error::DownloadError;
use crate::origin::{self, PieceSink};
use dataplane::{Command, Event, Parent, PieceSource, TaskStore};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use wire::proto::scheduler::{
    announce_peer_request::Request, announce_peer_response::Response,
    scheduler_client::SchedulerClient, AnnouncePeerRequest, Header, HostType, PeerFailed,
    PeerFinished, PieceFailed, PieceFinished, RegisterPeer, RescheduleRequest, TaskMetadata,
    TaskSource,
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

/// The running downloads of this daemon, by task id.
#[derive(Debug, Default)]
pub struct TaskManager {
    runs: Mutex<HashMap<TaskId, Run>>,
    /// Finished downloads whose scheduler stream stays open; notified to close it.
    serving: Mutex<HashMap<TaskId, Arc<tokio::sync::Notify>>>,
}

#[derive(Debug)]
struct Run {
    state: watch::Receiver<TaskState>,
    events: mpsc::Sender<Event>,
}

/// Bounded per-task event queue between the event pump and a run.
const RUN_EVENT_QUEUE: usize = 1024;

impl TaskManager {
    /// Joins the running download of `spec.id`, or starts one; returns its state.
    pub fn start_or_join(&self, ctx: Arc<Context>, spec: TaskSpec) -> watch::Receiver<TaskState> {
        ctx.meta.note_url(spec.id, &spec.url);
        if let Some(store) = ctx.storage.get(&spec.id).filter(|s| s.is_complete()) {
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
        dataplane::Counters::add(&ctx.stats.downloads_started, 1);
        tokio::spawn(async move {
            let id = spec.id;
            let started = std::time::Instant::now();
            let mut run = TaskRun::new(ctx.clone(), spec, state_tx, ev_rx);
            let result = run.run().await;
            run.abort_origin_fetches();
            if result.is_err() {
                // A failed task's partial file goes (before the run is forgotten, so no new
                // run can be using it): it holds disk space (a full disk must not stay
                // full), and its layout may be wrong (an origin that announced a wrong
                // length); the next try starts afresh.
                run.cancel_dataplane();
                if ctx.storage.get(&id).is_some_and(|s| !s.is_complete()) {
                    if let Err(e) = ctx.storage.remove(&id) {
                        tracing::warn!(task = %id, "removing the failed task's file: {e}");
                    }
                }
            }
            if let Ok(mut runs) = ctx.tasks.runs.lock() {
                runs.remove(&id);
            }
            match result {
                Ok(store) => {
                    // Most recently used: GC takes it last until it is delivered.
                    store.touch();
                    // Record the finished task before reporting it done.
                    let c = ctx.clone();
                    let res = tokio::task::spawn_blocking(move || c.meta.flush(&c.storage)).await;
                    if let Ok(Err(e)) = res {
                        tracing::warn!(task = %id, "writing task metadata: {e:#}");
                    }
                    dataplane::Counters::add(&run.ctx.stats.downloads_succeeded, 1);
                    run.ctx
                        .stats
                        .download_seconds
                        .observe(true, started.elapsed());
                    let p = progress_of(&store, &run.progress);
                    run.state.send_replace(TaskState::Done(store, p));
                    tracing::info!(task = %id, "download finished");
                    // Stay registered as a peer of the task so others can fetch from us.
                    run.keep_serving().await;
                }
                Err(e) => {
                    tracing::warn!(task = %id, "download failed: {e}");
                    run.ctx.stats.failed(&e);
                    run.ctx
                        .stats
                        .download_seconds
                        .observe(false, started.elapsed());
                    run.announce(Request::Failed(PeerFailed {
                        reason: e.to_string(),
                    }));
                    run.cancel_dataplane();
                    run.state.send_replace(TaskState::Failed(e));
                }
            }
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

struct TaskRun {
    ctx: Arc<Context>,
    spec: TaskSpec,
    state: watch::Sender<TaskState>,
    events: mpsc::Receiver<Event>,
    progress: Progress,
    store: Option<Arc<TaskStore>>,
    announce: Option<crate::announce::Announcer>,
    responses: Option<tonic::Streaming<wire::proto::scheduler::AnnouncePeerResponse>>,
    dispatched: bool,
    bad_parents: HashSet<String>,
    /// What the fetches of lost pieces from the origin (partial `NeedBackToSource`) report;
    /// unbounded, but each piece is reported at most once per fetch.
    origin_tx: mpsc::UnboundedSender<OriginMsg>,
    origin_rx: mpsc::UnboundedReceiver<OriginMsg>,
    /// Those fetches still running (aborted when the run ends).
    origin_fetches: Vec<tokio::task::JoinHandle<()>>,
    /// Fetches of lost pieces started and not reported done yet.
    origin_running: usize,
    /// Pieces one of those fetches is asked for: never asked of the origin twice at once.
    origin_pending: HashSet<u32>,
    /// Stall periods in a row without a stored piece (see `download.stall_timeout`).
    stalls: u32,
    /// Wait before the next try to register the running download again after its scheduler
    /// stream ended (doubles up to [`REREGISTER_MAX`]).
    reregister_backoff: std::time::Duration,
}

/// First wait before registering a running download again with a scheduler.
const REREGISTER_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// Longest wait between tries to register a running download again.
const REREGISTER_MAX: std::time::Duration = std::time::Duration::from_secs(4);
/// Bound on one try to register again (a scheduler that accepts and never answers).
const REREGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a source whose scheduler stream ended during its origin fetch keeps trying to
/// register again once the fetch is done (its pieces and their digests are reported then).
const REREGISTER_SOURCE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// A report from a fetch of lost pieces from the origin.
enum OriginMsg {
    /// Piece stored (and new).
    Piece {
        number: u32,
        crc32c: u32,
        length: u64,
        cost_us: u64,
    },
    /// The fetch of `pieces` ended.
    Done {
        /// The pieces it was asked for.
        pieces: Vec<u32>,
        /// How it ended.
        result: Result<(), DownloadError>,
    },
}

/// [`PieceSink`] of a fetch of lost pieces: reports to the run over a channel.
struct ChannelSink(mpsc::UnboundedSender<OriginMsg>);

impl PieceSink for ChannelSink {
    fn layout(&mut self, _store: &Arc<TaskStore>) {}

    fn piece(&mut self, number: u32, crc32c: u32, length: u64, cost_us: u64) {
        let _ = self.0.send(OriginMsg::Piece {
            number,
            crc32c,
            length,
            cost_us,
        });
    }
}

impl TaskRun {
    fn new(
        ctx: Arc<Context>,
        spec: TaskSpec,
        state: watch::Sender<TaskState>,
        events: mpsc::Receiver<Event>,
    ) -> Self {
        let (origin_tx, origin_rx) = mpsc::unbounded_channel();
        Self {
            origin_tx,
            origin_rx,
            origin_fetches: Vec::new(),
            origin_running: 0,
            origin_pending: HashSet::new(),
            stalls: 0,
            reregister_backoff: REREGISTER_FIRST,
            ctx,
            spec,
            state,
            events,
            progress: Progress::default(),
            store: None,
            announce: None,
            responses: None,
            dispatched: false,
            bad_parents: HashSet::new(),
        }
    }

    /// Sends a message to the scheduler on this task's stream (dropped when there is none or
    /// it is gone: the download goes on without the scheduler).
    fn announce(&self, r: Request) {
        if let Some(tx) = &self.announce {
            tx.send(AnnouncePeerRequest { request: Some(r) });
        }
    }

    fn publish(&mut self) {
        let p = match &self.store {
            Some(s) => progress_of(s, &self.progress),
            None => self.progress.clone(),
        };
        self.progress = p.clone();
        self.state.send_replace(TaskState::Running(p));
    }

    async fn connect_scheduler(&mut self) -> Result<(), String> {
        let mut order = self.ctx.schedulers.pool().ordered(&self.spec.id);
        if let Some(first) = &self.spec.scheduler {
            if let Some(i) = order.iter().position(|(a, _)| a == first) {
                let preferred = order.remove(i);
                order.insert(0, preferred);
            }
        }
        if order.is_empty() {
            return Err("no scheduler configured".into());
        }
        // The task's own scheduler first; when it does not answer, the next one by rendezvous
        // order, so a dead scheduler's tasks move without waiting for the manager to notice.
        let mut errors = Vec::new();
        for (addr, channel) in order {
            match self.register_with(&addr, channel).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(task = %self.spec.id, "{e}");
                    errors.push(e);
                }
            }
        }
        Err(errors.join("; "))
    }

    async fn register_with(
        &mut self,
        addr: &str,
        channel: tonic::transport::Channel,
    ) -> Result<(), String> {
        let (tx, rx) = crate::announce::channel();
        let register = RegisterPeer {
            task_id: self.spec.id.to_hex(),
            peer_id: format!("{}-{:016x}", self.ctx.host.id, rand::random::<u64>()),
            host: Some(self.ctx.host.clone()),
            // No origin at all (dfcache export): peers only.
            source: (!self.spec.url.is_empty()).then(|| TaskSource {
                url: self.spec.url.clone(),
                headers: self
                    .spec
                    .headers
                    .iter()
                    .map(|(n, v)| Header {
                        name: n.clone(),
                        value: v.clone(),
                    })
                    .collect(),
                digest: self.spec.digest.clone().unwrap_or_default(),
            }),
            piece_length: self.spec.piece_length,
            back_to_source: self.spec.back_to_source,
            priority: self.spec.priority,
            // A running download registering again: its parents are working, it only
            // tells the scheduler where it stands.
            resume: self
                .store
                .as_ref()
                .filter(|_| self.dispatched)
                .map(|s| TaskMetadata {
                    content_length: s.layout().content_length(),
                    piece_length: s.layout().piece_length(),
                }),
        };
        tx.send(AnnouncePeerRequest {
            request: Some(Request::Register(register)),
        });
        let mut client = SchedulerClient::new(channel);
        let resp = client
            .announce_peer(rx)
            .await
            .map_err(|e| format!("scheduler {addr}: {}", e.message()))?;
        self.announce = Some(tx);
        self.responses = Some(resp.into_inner());
        Ok(())
    }

    async fn run(&mut self) -> Result<Arc<TaskStore>, DownloadError> {
        // Pieces kept from before (a restart, a cancelled run): only the missing ones are
        // fetched.
        self.store = self.ctx.storage.get(&self.spec.id);
        if let Err(e) = self.connect_scheduler().await {
            dataplane::Counters::add(&self.ctx.stats.scheduler_unreachable, 1);
            if self.spec.disable_back_to_source {
                return Err(DownloadError::SchedulerUnavailable(format!(
                    "{e}; back-to-source is disabled"
                )));
            }
            tracing::warn!(task = %self.spec.id, "{e}; fetching from the origin directly");
            return self.back_to_source().await;
        }
        if let Some(store) = self.store.clone() {
            self.announce_held(&store);
        }
        if self.spec.back_to_source {
            return self.back_to_source().await;
        }
        let timeout = tokio::time::sleep(self.ctx.config.scheduler.schedule_timeout);
        tokio::pin!(timeout);
        let stall_timeout = self
            .ctx
            .config
            .download
            .stall_timeout
            .max(std::time::Duration::from_millis(100));
        let stall = tokio::time::sleep(stall_timeout);
        tokio::pin!(stall);
        // Armed when the scheduler stream of a dispatched download ends.
        let reregister = tokio::time::sleep(REREGISTER_FIRST);
        tokio::pin!(reregister);
        let mut lost_scheduler = false;
        let mut stored = self.stored();
        let mut was_dispatched = self.dispatched;
        loop {
            // Any piece stored (from a parent or the origin) is progress; the watch starts
            // when the data plane does.
            let now_stored = self.stored();
            if now_stored != stored || was_dispatched != self.dispatched {
                stored = now_stored;
                was_dispatched = self.dispatched;
                self.stalls = 0;
                stall
                    .as_mut()
                    .reset(tokio::time::Instant::now() + stall_timeout);
            }
            tokio::select! {
                msg = next_response(&mut self.responses) => match msg {
                    Some(Ok(Some(r))) => match r.response {
                        Some(Response::CandidateParents(cp)) => self.on_parents(cp).map_err(DownloadError::Internal)?,
                        Some(Response::PieceDigests(d)) => self.on_digests(&d),
                        Some(Response::NeedBackToSource(n)) if !n.pieces.is_empty() && self.store.is_some() => {
                            if self.spec.disable_back_to_source {
                                return Err(DownloadError::NoSource(format!("pieces {:?} are held by no live peer ({}) and back-to-source is disabled", n.pieces, n.reason)));
                            }
                            tracing::info!(task = %self.spec.id, pieces = n.pieces.len(), "scheduler says fetch lost pieces from the origin: {}", n.reason);
                            self.fetch_lost_pieces(n.pieces);
                        }
                        Some(Response::NeedBackToSource(n)) => {
                            if self.spec.disable_back_to_source {
                                return Err(DownloadError::NoSource(format!("no peer can serve the task ({}) and back-to-source is disabled", n.reason)));
                            }
                            tracing::info!(task = %self.spec.id, "scheduler says back to source: {}", n.reason);
                            return self.back_to_source().await;
                        }
                        None => {}
                    },
                    Some(Ok(None)) | Some(Err(_)) => {
                        tracing::warn!(task = %self.spec.id, dispatched = self.dispatched, "scheduler stream ended; going on with the parents already known");
                        dataplane::Counters::add(&self.ctx.stats.scheduler_streams_lost, 1);
                        self.responses = None;
                        self.announce = None;
                        // No scheduler to hand out the digests still missing: until one
                        // does again, pieces without a known digest are checked by their
                        // crc32c only (known digests are still checked), rather than held
                        // for a digest that cannot come (README, "How pieces are verified").
                        if let Some(store) = &self.store {
                            store.relax_digests();
                        }
                        lost_scheduler = true;
                        self.reregister_backoff = REREGISTER_FIRST;
                        reregister.as_mut().reset(tokio::time::Instant::now() + REREGISTER_FIRST);
                        if !self.dispatched {
                            if self.spec.disable_back_to_source {
                                return Err(DownloadError::SchedulerUnavailable("scheduler went away before naming parents; back-to-source is disabled".into()));
                            }
                            return self.back_to_source().await;
                        }
                    }
                    None => {}
                },
                ev = self.events.recv() => {
                    let Some(ev) = ev else { return Err(DownloadError::Internal("event queue closed".into())) };
                    if let Some(result) = self.on_event(ev).await {
                        return result;
                    }
                }
                Some(msg) = self.origin_rx.recv() => {
                    if let Some(result) = self.on_origin(msg) {
                        return result;
                    }
                }
                _ = &mut reregister, if lost_scheduler && self.dispatched => {
                    if self.reregister().await {
                        lost_scheduler = false;
                    } else {
                        self.reregister_backoff = (self.reregister_backoff * 2).min(REREGISTER_MAX);
                        reregister.as_mut().reset(tokio::time::Instant::now() + self.reregister_backoff);
                    }
                }
                _ = &mut stall, if self.dispatched => {
                    stall.as_mut().reset(tokio::time::Instant::now() + stall_timeout);
                    if let Some(result) = self.on_stall(stall_timeout).await {
                        return result;
                    }
                }
                _ = &mut timeout, if !self.dispatched => {
                    if self.spec.disable_back_to_source {
                        return Err(DownloadError::NoSource(format!("no parents within {:?} and back-to-source is disabled", self.ctx.config.scheduler.schedule_timeout)));
                    }
                    tracing::warn!(task = %self.spec.id, "no parents within the schedule timeout; back to source");
                    return self.back_to_source().await;
                }
            }
        }
    }

    /// Registers the running download again after its scheduler stream ended (a scheduler
    /// restart), as a resumed download (`RegisterPeer.resume`): no seed trigger, no trip to
    /// the origin, and the pieces held are reported so the swarm can use them. Returns
    /// whether a scheduler took it.
    async fn reregister(&mut self) -> bool {
        match tokio::time::timeout(REREGISTER_TIMEOUT, self.connect_scheduler()).await {
            Ok(Ok(())) => {
                tracing::info!(task = %self.spec.id, "running download registered again with a scheduler");
                dataplane::Counters::add(&self.ctx.stats.scheduler_reregistrations, 1);
                if let Some(store) = self.store.clone() {
                    self.announce_held(&store);
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(task = %self.spec.id, "registering the running download again: {e}");
                false
            }
            Err(_) => {
                tracing::debug!(task = %self.spec.id, "registering the running download again: no answer in {REREGISTER_TIMEOUT:?}");
                self.announce = None;
                self.responses = None;
                false
            }
        }
    }

    /// Whether this run had a scheduler stream that has ended since.
    fn scheduler_stream_lost(&self) -> bool {
        self.announce
            .as_ref()
            .is_some_and(crate::announce::Announcer::is_closed)
    }

    /// [`Self::reregister`] with jittered exponential backoff, for at most `limit`.
    async fn reregister_until(&mut self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut backoff = damselfly_common::reconnect_backoff(REREGISTER_FIRST, REREGISTER_MAX);
        loop {
            self.announce = None;
            self.responses = None;
            if self.reregister().await {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                tracing::warn!(task = %self.spec.id, "the scheduler stream ended during the origin fetch and no scheduler took the task again within {limit:?}");
                return;
            }
            let wait = backoff.next().unwrap_or(REREGISTER_MAX);
            tokio::time::sleep(wait.min(deadline - now)).await;
        }
    }

    /// Pieces stored so far (0 before the size is known).
    fn stored(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| {
            u64::from(progress_of(s, &Progress::default()).finished_pieces)
        })
    }

    /// Starts fetching `pieces` (held by no live peer) from the origin beside the data plane.
    /// Pieces a running fetch already asks for, or stored already, are left out: the
    /// scheduler may name the same pieces again (another holder left, a reschedule).
    fn fetch_lost_pieces(&mut self, pieces: Vec<u32>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let pieces: Vec<u32> = pieces
            .into_iter()
            .filter(|n| !store.has(*n) && !self.origin_pending.contains(n))
            .collect();
        if pieces.is_empty() {
            return;
        }
        self.origin_pending.extend(pieces.iter().copied());
        self.origin_running += 1;
        dataplane::Counters::add(&self.ctx.stats.lost_piece_fetches, 1);
        let ctx = self.ctx.clone();
        let spec = self.spec.clone();
        let tx = self.origin_tx.clone();
        self.origin_fetches.retain(|h| !h.is_finished());
        self.origin_fetches.push(tokio::spawn(async move {
            let mut sink = ChannelSink(tx.clone());
            let result = origin::fetch_pieces(&ctx, &spec, store, &pieces, &mut sink)
                .await
                .map_err(DownloadError::from);
            let _ = tx.send(OriginMsg::Done { pieces, result });
        }));
    }

    /// Bookkeeping of a fetch of lost `pieces` that ended.
    fn origin_done(&mut self, pieces: &[u32]) {
        self.origin_running = self.origin_running.saturating_sub(1);
        for n in pieces {
            self.origin_pending.remove(n);
        }
    }

    /// Lets the fetches of lost pieces still running finish (their pieces announced as they
    /// come), so that a fetch of everything missing started after them does not ask the
    /// origin for the same bytes a second time. Their errors are logged only: the caller
    /// fetches whatever is still missing.
    async fn finish_origin_fetches(&mut self) {
        while self.origin_running > 0 {
            match self.origin_rx.recv().await {
                Some(OriginMsg::Piece {
                    number,
                    crc32c,
                    length,
                    cost_us,
                }) => PieceSink::piece(self, number, crc32c, length, cost_us),
                Some(OriginMsg::Done { pieces, result }) => {
                    self.origin_done(&pieces);
                    if let Err(e) = result {
                        tracing::warn!(task = %self.spec.id, "fetching lost pieces from the origin: {e}; fetching what is missing");
                    }
                }
                None => break,
            }
        }
    }

    /// Stops the fetches of lost pieces still running.
    fn abort_origin_fetches(&mut self) {
        for h in self.origin_fetches.drain(..) {
            h.abort();
        }
        self.origin_running = 0;
        self.origin_pending.clear();
    }

    /// Handles a report of a fetch of lost pieces; returns the end of the run when there is
    /// one (the task is complete, or the origin failed).
    fn on_origin(&mut self, msg: OriginMsg) -> Option<Result<Arc<TaskStore>, DownloadError>> {
        match msg {
            OriginMsg::Piece {
                number,
                crc32c,
                length,
                cost_us,
            } => {
                PieceSink::piece(self, number, crc32c, length, cost_us);
                None
            }
            OriginMsg::Done { pieces, result } => {
                self.origin_done(&pieces);
                if let Err(e) = result {
                    return Some(Err(
                        e.context("fetching pieces no peer holds from the origin")
                    ));
                }
                let store = self.store.clone()?;
                if !store.is_complete() {
                    return None;
                }
                // The origin brought the last pieces: the data plane may not notice.
                self.cancel_dataplane();
                self.announce(Request::Finished(PeerFinished {
                    content_length: store.layout().content_length(),
                }));
                Some(Ok(store))
            }
        }
    }

    /// No piece stored for `stall_timeout`: ask the scheduler again the first time; the
    /// second time in a row, or without a scheduler, fetch what is missing from the origin.
    async fn on_stall(
        &mut self,
        stall_timeout: std::time::Duration,
    ) -> Option<Result<Arc<TaskStore>, DownloadError>> {
        self.stalls += 1;
        dataplane::Counters::add(&self.ctx.stats.download_stalls, 1);
        tracing::warn!(task = %self.spec.id, stalls = self.stalls, "no piece stored for {stall_timeout:?}");
        if self.announce.is_some() && self.stalls < 2 {
            self.announce(Request::Reschedule(RescheduleRequest {
                bad_parent_host_ids: self.bad_parents.iter().cloned().collect(),
                reason: format!("no piece for {stall_timeout:?}"),
            }));
            return None;
        }
        if self.spec.disable_back_to_source {
            if self.announce.is_none() {
                return Some(Err(DownloadError::Stalled(format!(
                    "no piece for {stall_timeout:?}, no scheduler, and back-to-source is disabled"
                ))));
            }
            return None;
        }
        tracing::warn!(task = %self.spec.id, "download stalled; fetching what is missing from the origin");
        Some(self.back_to_source().await)
    }

    /// Tells the scheduler the size of a task this peer already holds pieces of, and which.
    fn announce_held(&mut self, store: &Arc<TaskStore>) {
        let l = store.layout();
        self.announce(Request::TaskMetadata(TaskMetadata {
            content_length: l.content_length(),
            piece_length: l.piece_length(),
        }));
        for n in (0..l.piece_count()).filter(|&n| store.has(n)) {
            if let (Some(crc32c), Some(length)) = (store.piece_crc(n), l.piece_size(n)) {
                self.announce(Request::PieceFinished(PieceFinished {
                    number: n,
                    crc32c,
                    length,
                    parent_host_id: String::new(),
                    cost_us: 0,
                    // Counted by the scheduler only when this peer fetches from the origin.
                    digest: self.held_digest(store, n),
                }));
            }
        }
        self.publish();
    }

    /// The digest to report with held piece `n`: the one known, or, for a peer that fetches
    /// from the origin (its pieces came from there; a daemon restart forgot their digests),
    /// the digest of the bytes on disk, so the scheduler can hand it out. Empty otherwise.
    fn held_digest(&self, store: &Arc<TaskStore>, n: u32) -> Vec<u8> {
        if let Some(d) = store.piece_digest(n) {
            return d.to_vec();
        }
        if !self.spec.back_to_source {
            return Vec::new();
        }
        let mut buf = Vec::new();
        match store.read_piece(n, &mut buf) {
            Ok(()) => {
                let d = wire::piece_digest(&buf);
                let _ = store.set_digest(n, d);
                d.to_vec()
            }
            Err(e) => {
                tracing::warn!(task = %self.spec.id, piece = n, "reading a held piece for its digest: {e}");
                Vec::new()
            }
        }
    }

    fn on_parents(&mut self, cp: wire::proto::scheduler::CandidateParents) -> Result<(), String> {
        if let (Some(store), Some(md)) = (&self.store, &cp.metadata) {
            let l = store.layout();
            if (l.content_length(), l.piece_length()) != (md.content_length, md.piece_length) {
                return Err(format!(
                    "the scheduler's task size ({} bytes, pieces of {}) differs from the pieces kept here ({} bytes, pieces of {})",
                    md.content_length, md.piece_length, l.content_length(), l.piece_length()
                ));
            }
        }
        if self.store.is_none() {
            let md = cp
                .metadata
                .ok_or("scheduler sent parents without the task's size")?;
            let layout = PieceLayout::new(md.content_length, md.piece_length)
                .map_err(|e| format!("task layout: {e}"))?;
            let store = self
                .ctx
                .storage
                .create(self.spec.id, layout)
                .map_err(|e| format!("creating task file: {e}"))?;
            self.store = Some(store);
            self.publish();
        }
        if let Some(d) = &cp.digests {
            self.on_digests(d);
        }
        let parents: Vec<Parent> = cp
            .parents
            .into_iter()
            .filter(|p| p.host_id != self.ctx.host.id && !self.bad_parents.contains(&p.host_id))
            .filter_map(|p| {
                let ip: IpAddr = p.ip.parse().ok()?;
                let port = u16::try_from(p.data_port).ok()?;
                let quic_port = u16::try_from(p.quic_port).unwrap_or(0);
                Some(Parent {
                    host_id: p.host_id,
                    addr: SocketAddr::new(ip, port),
                    quic_addr: (quic_port != 0).then(|| SocketAddr::new(ip, quic_port)),
                    is_seed: p.r#type == HostType::Seed as i32,
                })
            })
            .collect();
        tracing::debug!(task = %self.spec.id, "parents: {:?}", parents.iter().map(|p| &p.host_id).collect::<Vec<_>>());
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let bridge = &self.ctx.bridge;
        let thread = bridge.thread_of(&self.spec.id);
        let cmd = if self.dispatched {
            Command::AddParents {
                task: self.spec.id,
                parents,
            }
        } else {
            Command::Download {
                store,
                parents,
                rate_limit: self.spec.rate_limit,
            }
        };
        bridge
            .send(thread, cmd)
            .map_err(|_| "data plane command queue is full".to_string())?;
        self.dispatched = true;
        Ok(())
    }

    /// Trusted piece digests from the scheduler: from now on every piece from a parent must
    /// match its digest (`TaskStore::commit_verified`), unless `data_plane.verify_pieces` is
    /// off. A digest that differs from one already known is logged; the first stays.
    fn on_digests(&mut self, d: &wire::proto::scheduler::PieceDigests) {
        if !self.ctx.config.data_plane.verify_pieces {
            return;
        }
        let Some(store) = &self.store else {
            return;
        };
        let Some(pairs) = wire::split_piece_digests(&d.numbers, &d.digests) else {
            tracing::warn!(task = %self.spec.id, "scheduler sent piece digests of the wrong length; ignored");
            return;
        };
        for (n, digest) in pairs {
            if let Err(known) = store.set_digest(n, digest) {
                tracing::warn!(task = %self.spec.id, piece = n, known = %hex::encode(known), got = %hex::encode(digest), "conflicting piece digest from the scheduler; the first stays");
            }
        }
        store.require_digests();
    }

    /// Handles a data-plane event; returns the end of the run when there is one.
    async fn on_event(&mut self, ev: Event) -> Option<Result<Arc<TaskStore>, DownloadError>> {
        match ev {
            Event::PieceFinished {
                number,
                crc32c,
                length,
                source,
                cost_us,
                ..
            } => {
                match &source {
                    PieceSource::Seed(_) => self.progress.from_seed += length,
                    PieceSource::Peer(_) => self.progress.from_peers += length,
                }
                self.announce(Request::PieceFinished(PieceFinished {
                    number,
                    crc32c,
                    length,
                    parent_host_id: source.host_id().to_string(),
                    cost_us,
                    digest: Vec::new(),
                }));
                self.publish();
            }
            Event::PieceFailed {
                number,
                parent,
                reason,
                ..
            } => {
                self.announce(Request::PieceFailed(PieceFailed {
                    number,
                    parent_host_id: parent,
                    reason,
                }));
            }
            Event::ParentFailed {
                parent,
                reason,
                stalled,
                ..
            } => {
                let new = self.bad_parents.insert(parent.clone());
                // A parent that sent forged bytes is named to the scheduler at once, so it
                // is handed to nobody else as this peer's parent and the piece is fetched
                // elsewhere.
                if new && reason.contains("forged piece") && self.announce.is_some() {
                    self.announce(Request::Reschedule(RescheduleRequest {
                        bad_parent_host_ids: self.bad_parents.iter().cloned().collect(),
                        reason: format!("parent {parent} sent a forged piece: {reason}"),
                    }));
                }
                // A parent that stopped sending (`parent_idle_timeout`, `piece_timeout`)
                // still counts as live at the scheduler until its connection times out
                // there: say so now, so that the pieces only it holds are fetched elsewhere
                // (a dead parent's host stream closes, which tells the scheduler by itself).
                if new && stalled && self.announce.is_some() {
                    self.announce(Request::Reschedule(RescheduleRequest {
                        bad_parent_host_ids: self.bad_parents.iter().cloned().collect(),
                        reason: format!("parent {parent} stalled: {reason}"),
                    }));
                }
            }
            Event::NeedParents { .. } => {
                if self.announce.is_some() {
                    self.announce(Request::Reschedule(RescheduleRequest {
                        bad_parent_host_ids: self.bad_parents.iter().cloned().collect(),
                        reason: "every parent failed or has nothing left for us".into(),
                    }));
                } else if self.spec.disable_back_to_source {
                    return Some(Err(DownloadError::NoSource(
                        "every parent failed, no scheduler, and back-to-source is disabled".into(),
                    )));
                } else {
                    return Some(self.back_to_source().await);
                }
            }
            Event::StorageFailed { reason, .. } => {
                return Some(Err(DownloadError::storage(format!("storage: {reason}"))))
            }
            Event::DownloadFinished { .. } => {
                let store = self.store.clone()?;
                self.announce(Request::Finished(PeerFinished {
                    content_length: store.layout().content_length(),
                }));
                return Some(Ok(store));
            }
        }
        None
    }

    async fn back_to_source(&mut self) -> Result<Arc<TaskStore>, DownloadError> {
        if self.spec.url.is_empty() {
            return Err(DownloadError::NotFound(
                "task not found in the P2P network (it has no origin)".into(),
            ));
        }
        dataplane::Counters::add(&self.ctx.stats.back_to_source, 1);
        if self.dispatched {
            self.cancel_dataplane();
        }
        // Lost pieces already on their way from the origin are not asked for again.
        self.finish_origin_fetches().await;
        let ctx = self.ctx.clone();
        let spec = self.spec.clone();
        let existing = self.store.clone();
        let mut result = origin::fetch(&ctx, &spec, existing, self)
            .await
            .map_err(DownloadError::from);
        // The scheduler stream ended while this host fetched from the origin (a scheduler
        // restart): the announcements, trusted piece digests among them, went nowhere.
        // Register again (as the source it is) so the scheduler learns every piece held and
        // its digest: peers that check digests hold the pieces they got from this host
        // until then.
        if self.scheduler_stream_lost() {
            self.reregister_until(REREGISTER_SOURCE_FOR).await;
        }
        if let (Ok(store), Some(digest)) = (&result, &spec.digest) {
            // A known digest: what the origin sent must be that content before anyone is
            // told this peer holds it (pieces already announced are checked by each
            // consumer's own digest check; the task goes, so no one is served it again).
            if let Err(e) = verify_digest(store, digest).await {
                dataplane::Counters::add(&self.ctx.stats.origin_digest_mismatches, 1);
                tracing::warn!(task = %spec.id, url = %spec.url, "{e}");
                if let Err(re) = self.ctx.storage.remove(&spec.id) {
                    tracing::warn!(task = %spec.id, "removing the mismatching task: {re}");
                }
                self.store = None;
                result = Err(e);
            }
        }
        if let Ok(store) = &result {
            self.announce(Request::Finished(PeerFinished {
                content_length: store.layout().content_length(),
            }));
        }
        result
    }

    fn cancel_dataplane(&self) {
        let bridge = &self.ctx.bridge;
        let _ = bridge.send(
            bridge.thread_of(&self.spec.id),
            Command::Cancel { task: self.spec.id },
        );
    }

    /// Keeps the scheduler stream open after the download, so the scheduler keeps offering
    /// this peer as a parent, until the scheduler closes it.
    async fn keep_serving(mut self) {
        let Some(mut responses) = self.responses.take() else {
            // Finished without a scheduler stream (it went away and did not come back in
            // time): tell the task's scheduler this host holds it, as the host stream does
            // when it connects again (if that scheduler is still down, that is when).
            if let (Some(store), Some((addr, channel))) = (
                self.store.as_ref(),
                self.ctx.schedulers.pool().pick(&self.spec.id),
            ) {
                let announce = crate::scheduler::announce_complete(
                    self.ctx.clone(),
                    addr,
                    channel,
                    self.spec.id,
                    store.layout(),
                );
                if tokio::time::timeout(REREGISTER_TIMEOUT, announce)
                    .await
                    .is_err()
                {
                    tracing::debug!(task = %self.spec.id, "announcing the finished task: no answer in {REREGISTER_TIMEOUT:?}");
                }
            }
            return;
        };
        let _announce = self.announce.take();
        let id = self.spec.id;
        let stop = Arc::new(tokio::sync::Notify::new());
        if let Ok(mut s) = self.ctx.tasks.serving.lock() {
            s.insert(id, stop.clone());
        }
        loop {
            tokio::select! {
                m = responses.message() => if !matches!(m, Ok(Some(_))) { break },
                _ = stop.notified() => return,
            }
        }
        if let Ok(mut s) = self.ctx.tasks.serving.lock() {
            if s.get(&id).is_some_and(|n| Arc::ptr_eq(n, &stop)) {
                s.remove(&id);
            }
        }
    }
}

impl PieceSink for TaskRun {
    fn layout(&mut self, store: &Arc<TaskStore>) {
        self.store = Some(store.clone());
        let l = store.layout();
        self.announce(Request::TaskMetadata(TaskMetadata {
            content_length: l.content_length(),
            piece_length: l.piece_length(),
        }));
        self.publish();
    }

    fn piece(&mut self, number: u32, crc32c: u32, length: u64, cost_us: u64) {
        self.progress.from_origin += length;
        // The BLAKE3 digest taken when the origin's bytes were stored: the scheduler hands
        // it to the other peers as the piece's trusted digest.
        let digest = self
            .store
            .as_ref()
            .and_then(|s| s.piece_digest(number))
            .map(|d| d.to_vec())
            .unwrap_or_default();
        self.announce(Request::PieceFinished(PieceFinished {
            number,
            crc32c,
            length,
            parent_host_id: String::new(),
            cost_us,
            digest,
        }));
        self.publish();
    }
}

async fn next_response(
    r: &mut Option<tonic::Streaming<wire::proto::scheduler::AnnouncePeerResponse>>,
) -> Option<Result<Option<wire::proto::scheduler::AnnouncePeerResponse>, tonic::Status>> {
    match r {
        Some(s) => Some(s.message().await),
        None => std::future::pending().await,
    }
}
