//! The scheduler session of a run: registering (with the next scheduler by rendezvous order
//! when one does not answer), registering again after the stream ends, reporting the pieces
//! held, and keeping the stream open after the download so others can fetch from this peer.

use super::services::ResponseStream;
use super::*;
use futures::StreamExt;

pub(super) const REREGISTER_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// Longest wait between tries to register a running download again.
pub(super) const REREGISTER_MAX: std::time::Duration = std::time::Duration::from_secs(4);
/// Bound on one try to register again (a scheduler that accepts and never answers).
pub(super) const REREGISTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a source whose scheduler stream ended during its origin fetch keeps trying to
/// register again once the fetch is done (its pieces and their digests are reported then).
pub(super) const REREGISTER_SOURCE_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl TaskRun {
    pub(super) async fn connect_scheduler(&mut self) -> Result<(), SchedulerError> {
        let mut order = self.svc.schedulers.ordered(&self.spec.id);
        if let Some(first) = &self.spec.scheduler {
            if let Some(i) = order.iter().position(|a| a == first) {
                let preferred = order.remove(i);
                order.insert(0, preferred);
            }
        }
        if order.is_empty() {
            return Err(SchedulerError::NoneConfigured);
        }
        // The task's own scheduler first; when it does not answer, the next one by rendezvous
        // order, so a dead scheduler's tasks move without waiting for the manager to notice.
        let mut errors = Vec::new();
        for addr in order {
            match self.register_with(addr).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(task = %self.spec.id, "{e}");
                    errors.push(e);
                }
            }
        }
        Err(SchedulerError::All(errors))
    }

    pub(super) async fn register_with(&mut self, addr: String) -> Result<(), SchedulerError> {
        let (tx, rx) = crate::announce::channel();
        let register = RegisterPeer {
            task_id: self.spec.id.to_hex(),
            peer_id: format!("{}-{:016x}", self.svc.host.id, rand::random::<u64>()),
            host: Some(self.svc.host.clone()),
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
        let responses = self
            .svc
            .schedulers
            .announce_peer(self.spec.id, addr, rx)
            .await?;
        self.announce = Some(tx);
        self.responses = Some(responses);
        Ok(())
    }

    /// Registers the running download again after its scheduler stream ended (a scheduler
    /// restart), as a resumed download (`RegisterPeer.resume`): no seed trigger, no trip to
    /// the origin, and the pieces held are reported so the swarm can use them. Returns
    /// whether a scheduler took it.
    pub(super) async fn reregister(&mut self) -> bool {
        match tokio::time::timeout(REREGISTER_TIMEOUT, self.connect_scheduler()).await {
            Ok(Ok(())) => {
                tracing::info!(task = %self.spec.id, "running download registered again with a scheduler");
                dataplane::Counters::add(&self.svc.stats.scheduler_reregistrations, 1);
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
    pub(super) fn scheduler_stream_lost(&self) -> bool {
        self.announce
            .as_ref()
            .is_some_and(crate::announce::Announcer::is_closed)
    }

    /// [`Self::reregister`] with jittered exponential backoff, for at most `limit`.
    pub(super) async fn reregister_until(&mut self, limit: std::time::Duration) {
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

    /// Tells the scheduler the size of a task this peer already holds pieces of, and which.
    pub(super) fn announce_held(&mut self, store: &Arc<TaskStore>) {
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
    pub(super) fn held_digest(&self, store: &Arc<TaskStore>, n: u32) -> Vec<u8> {
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
    /// Keeps the scheduler stream open after the download, so the scheduler keeps offering
    /// this peer as a parent, until the scheduler closes it.
    pub(super) async fn keep_serving(mut self, tasks: &TaskManager) {
        let Some(mut responses) = self.responses.take() else {
            // Finished without a scheduler stream (it went away and did not come back in
            // time): tell the task's scheduler this host holds it, as the host stream does
            // when it connects again (if that scheduler is still down, that is when).
            if let Some(store) = self.store.as_ref() {
                let announce = self
                    .svc
                    .schedulers
                    .announce_complete(self.spec.id, store.layout());
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
        if let Ok(mut s) = tasks.serving.lock() {
            s.insert(id, stop.clone());
        }
        loop {
            tokio::select! {
                m = responses.next() => if !matches!(m, Some(Ok(_))) { break },
                _ = stop.notified() => return,
            }
        }
        if let Ok(mut s) = tasks.serving.lock() {
            if s.get(&id).is_some_and(|n| Arc::ptr_eq(n, &stop)) {
                s.remove(&id);
            }
        }
    }
}

/// The next answer on the scheduler stream (pending forever without one).
pub(super) async fn next_response(
    r: &mut Option<ResponseStream>,
) -> Option<Result<Option<wire::proto::scheduler::AnnouncePeerResponse>, tonic::Status>> {
    match r {
        Some(s) => Some(s.next().await.transpose()),
        None => std::future::pending().await,
    }
}
