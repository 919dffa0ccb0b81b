//! The run loop of one task: the scheduler's answers, data-plane events, stalls, and the
//! end of a run.

use super::services::{ResponseStream, RunServices};
use super::session::{next_response, REREGISTER_FIRST, REREGISTER_MAX};
use super::source::OriginMsg;
use super::*;

/// One download of one task (see the module docs of [`crate::task`]).
pub(super) struct TaskRun {
    pub(super) svc: RunServices,
    pub(super) spec: TaskSpec,
    pub(super) state: watch::Sender<TaskState>,
    pub(super) events: mpsc::Receiver<Event>,
    pub(super) progress: Progress,
    pub(super) store: Option<Arc<TaskStore>>,
    pub(super) announce: Option<crate::announce::Announcer>,
    pub(super) responses: Option<ResponseStream>,
    pub(super) dispatched: bool,
    pub(super) bad_parents: HashSet<String>,
    /// What the fetches of lost pieces from the origin (partial `NeedBackToSource`) report;
    /// unbounded, but each piece is reported at most once per fetch.
    pub(super) origin_tx: mpsc::UnboundedSender<OriginMsg>,
    pub(super) origin_rx: mpsc::UnboundedReceiver<OriginMsg>,
    /// Those fetches still running (aborted when the run ends).
    pub(super) origin_fetches: Vec<tokio::task::JoinHandle<()>>,
    /// Fetches of lost pieces started and not reported done yet.
    pub(super) origin_running: usize,
    /// Pieces one of those fetches is asked for: never asked of the origin twice at once.
    pub(super) origin_pending: HashSet<u32>,
    /// Stall periods in a row without a stored piece (see `download.stall_timeout`).
    pub(super) stalls: u32,
    /// Waits before the next tries to register the running download again after its
    /// scheduler stream ended: jittered, doubling from [`REREGISTER_FIRST`] up to
    /// [`REREGISTER_MAX`], so daemons that lost the same scheduler do not retry in lockstep.
    pub(super) reregister_backoff: Box<dyn Iterator<Item = std::time::Duration> + Send>,
}

impl TaskRun {
    /// Runs the download to its end and publishes it: on success the task is recorded
    /// (`RunServices::meta`), then `Done`, then the scheduler stream stays open
    /// ([`Self::keep_serving`]); on failure the partial file goes, the scheduler is told, then
    /// `Failed`. The run leaves `tasks` before its end is published.
    pub(super) async fn drive(mut self, tasks: &TaskManager) {
        let id = self.spec.id;
        let started = std::time::Instant::now();
        let result = self.run().await;
        self.abort_origin_fetches();
        if result.is_err() {
            // A failed task's partial file goes (before the run is forgotten, so no new
            // run can be using it): it holds disk space (a full disk must not stay
            // full), and its layout may be wrong (an origin that announced a wrong
            // length); the next try starts afresh.
            self.cancel_dataplane();
            if self.svc.storage.get(&id).is_some_and(|s| !s.is_complete()) {
                if let Err(e) = self.svc.storage.remove(&id) {
                    tracing::warn!(task = %id, "removing the failed task's file: {e}");
                }
            }
        }
        if let Ok(mut runs) = tasks.runs.lock() {
            runs.remove(&id);
        }
        match result {
            Ok(store) => {
                // Most recently used: GC takes it last until it is delivered.
                store.touch();
                // Record the finished task before reporting it done.
                let (meta, storage) = (self.svc.meta.clone(), self.svc.storage.clone());
                let res = tokio::task::spawn_blocking(move || meta.flush(&storage)).await;
                if let Ok(Err(e)) = res {
                    tracing::warn!(task = %id, "writing task metadata: {e:#}");
                }
                dataplane::Counters::add(&self.svc.stats.downloads_succeeded, 1);
                self.svc
                    .stats
                    .download_seconds
                    .observe(true, started.elapsed());
                let p = progress_of(&store, &self.progress);
                self.state.send_replace(TaskState::Done(store, p));
                tracing::info!(task = %id, "download finished");
                // Stay registered as a peer of the task so others can fetch from us.
                self.keep_serving(tasks).await;
            }
            Err(e) => {
                tracing::warn!(task = %id, "download failed: {e}");
                self.svc.stats.failed(&e);
                self.svc
                    .stats
                    .download_seconds
                    .observe(false, started.elapsed());
                self.announce(Request::Failed(PeerFailed {
                    reason: e.to_string(),
                }));
                self.cancel_dataplane();
                self.state.send_replace(TaskState::Failed(e));
            }
        }
    }

    pub(super) fn new(
        svc: RunServices,
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
            reregister_backoff: Box::new(damselfly_common::reconnect_backoff(
                REREGISTER_FIRST,
                REREGISTER_MAX,
            )),
            svc,
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
    pub(super) fn announce(&self, r: Request) {
        if let Some(tx) = &self.announce {
            tx.send(AnnouncePeerRequest { request: Some(r) });
        }
    }

    pub(super) fn publish(&mut self) {
        let p = match &self.store {
            Some(s) => progress_of(s, &self.progress),
            None => self.progress.clone(),
        };
        self.progress = p.clone();
        self.state.send_replace(TaskState::Running(p));
    }

    pub(super) async fn run(&mut self) -> Result<Arc<TaskStore>, DownloadError> {
        // Pieces kept from before (a restart, a cancelled run): only the missing ones are
        // fetched.
        self.store = self.svc.storage.get(&self.spec.id);
        if let Err(e) = self.connect_scheduler().await {
            dataplane::Counters::add(&self.svc.stats.scheduler_unreachable, 1);
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
        let timeout = tokio::time::sleep(self.svc.settings.schedule_timeout);
        tokio::pin!(timeout);
        let stall_timeout = self
            .svc
            .settings
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
                        Some(Response::CandidateParents(cp)) => self.on_parents(cp)?,
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
                        dataplane::Counters::add(&self.svc.stats.scheduler_streams_lost, 1);
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
                        self.reregister_backoff = Box::new(damselfly_common::reconnect_backoff(REREGISTER_FIRST, REREGISTER_MAX));
                        let wait = self.reregister_backoff.next().unwrap_or(REREGISTER_FIRST);
                        reregister.as_mut().reset(tokio::time::Instant::now() + wait);
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
                        let wait = self.reregister_backoff.next().unwrap_or(REREGISTER_MAX);
                        reregister.as_mut().reset(tokio::time::Instant::now() + wait);
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
                        return Err(DownloadError::NoSource(format!("no parents within {:?} and back-to-source is disabled", self.svc.settings.schedule_timeout)));
                    }
                    tracing::warn!(task = %self.spec.id, "no parents within the schedule timeout; back to source");
                    return self.back_to_source().await;
                }
            }
        }
    }

    /// Pieces stored so far (0 before the size is known).
    pub(super) fn stored(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| {
            u64::from(progress_of(s, &Progress::default()).finished_pieces)
        })
    }

    /// No piece stored for `stall_timeout`: ask the scheduler again the first time; the
    /// second time in a row, or without a scheduler, fetch what is missing from the origin.
    pub(super) async fn on_stall(
        &mut self,
        stall_timeout: std::time::Duration,
    ) -> Option<Result<Arc<TaskStore>, DownloadError>> {
        self.stalls += 1;
        dataplane::Counters::add(&self.svc.stats.download_stalls, 1);
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

    pub(super) fn on_parents(
        &mut self,
        cp: wire::proto::scheduler::CandidateParents,
    ) -> Result<(), DownloadError> {
        if let (Some(store), Some(md)) = (&self.store, &cp.metadata) {
            let l = store.layout();
            if (l.content_length(), l.piece_length()) != (md.content_length, md.piece_length) {
                return Err(DownloadError::Internal(format!(
                    "the scheduler's task size ({} bytes, pieces of {}) differs from the pieces kept here ({} bytes, pieces of {})",
                    md.content_length, md.piece_length, l.content_length(), l.piece_length()
                )));
            }
        }
        if self.store.is_none() {
            let md = cp.metadata.ok_or_else(|| {
                DownloadError::Internal("scheduler sent parents without the task's size".into())
            })?;
            let layout = PieceLayout::new(md.content_length, md.piece_length)
                .map_err(|e| DownloadError::Internal(format!("task layout: {e}")))?;
            let store = self
                .svc
                .storage
                .create(self.spec.id, layout)
                .map_err(|e| DownloadError::io("creating task file", &e))?;
            self.store = Some(store);
            self.publish();
        }
        if let Some(d) = &cp.digests {
            self.on_digests(d);
        }
        let parents: Vec<Parent> = cp
            .parents
            .into_iter()
            .filter(|p| p.host_id != self.svc.host.id && !self.bad_parents.contains(&p.host_id))
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
        self.svc
            .dataplane
            .send(&self.spec.id, cmd)
            .map_err(|e| DownloadError::Internal(e.to_string()))?;
        self.dispatched = true;
        Ok(())
    }

    /// Trusted piece digests from the scheduler: from now on every piece from a parent must
    /// match its digest (`TaskStore::commit_verified`), unless `data_plane.verify_pieces` is
    /// off. A digest that differs from one already known is logged; the first stays. The
    /// crcs sent with them (when any) become the pieces' trusted crc32cs, with the digest
    /// they came with.
    pub(super) fn on_digests(&mut self, d: &wire::proto::scheduler::PieceDigests) {
        if !self.svc.settings.verify_pieces {
            return;
        }
        let Some(store) = &self.store else {
            return;
        };
        let Some(pairs) = wire::split_piece_digests(&d.numbers, &d.digests) else {
            tracing::warn!(task = %self.spec.id, "scheduler sent piece digests of the wrong length; ignored");
            return;
        };
        let crcs = wire::split_piece_crcs(d.numbers.len(), &d.crcs).unwrap_or_default();
        for (i, (n, digest)) in pairs.into_iter().enumerate() {
            match store.set_digest(n, digest) {
                Ok(_) => {
                    if let Some(c) = crcs.get(i) {
                        store.set_trusted_crc(n, *c);
                    }
                }
                Err(known) => {
                    tracing::warn!(task = %self.spec.id, piece = n, known = %hex::encode(known), got = %hex::encode(digest), "conflicting piece digest from the scheduler; the first stays");
                }
            }
        }
        store.require_digests();
    }

    /// Handles a data-plane event; returns the end of the run when there is one.
    pub(super) async fn on_event(
        &mut self,
        ev: Event,
    ) -> Option<Result<Arc<TaskStore>, DownloadError>> {
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
                forged,
                ..
            } => {
                let new = self.bad_parents.insert(parent.clone());
                // A parent that sent forged bytes is named to the scheduler at once, so it
                // is handed to nobody else as this peer's parent and the piece is fetched
                // elsewhere.
                if new && forged && self.announce.is_some() {
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
            Event::StorageFailed { failure, .. } => {
                return Some(Err(DownloadError::from(failure).context("storage")))
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

    pub(super) fn cancel_dataplane(&self) {
        let _ = self
            .svc
            .dataplane
            .send(&self.spec.id, Command::Cancel { task: self.spec.id });
    }
}
