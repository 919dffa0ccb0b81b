//! The origin hand-off of a run: fetching everything missing from the origin (back to
//! source), and fetching only the pieces no live peer holds beside the data plane.

use super::session::REREGISTER_SOURCE_FOR;
use super::*;

/// A report from a fetch of lost pieces from the origin.
pub(super) enum OriginMsg {
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
pub(super) struct ChannelSink(mpsc::UnboundedSender<OriginMsg>);

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
    /// Starts fetching `pieces` (held by no live peer) from the origin beside the data plane.
    /// Pieces a running fetch already asks for, or stored already, are left out: the
    /// scheduler may name the same pieces again (another holder left, a reschedule).
    pub(super) fn fetch_lost_pieces(&mut self, pieces: Vec<u32>) {
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
        dataplane::Counters::add(&self.svc.stats.lost_piece_fetches, 1);
        let origin = self.svc.origin.clone();
        let spec = self.spec.clone();
        let tx = self.origin_tx.clone();
        self.origin_fetches.retain(|h| !h.is_finished());
        self.origin_fetches.push(tokio::spawn(async move {
            let mut sink = ChannelSink(tx.clone());
            let result = origin
                .fetch_pieces(&spec, store, &pieces, &mut sink)
                .await
                .map_err(DownloadError::from);
            let _ = tx.send(OriginMsg::Done { pieces, result });
        }));
    }

    /// Bookkeeping of a fetch of lost `pieces` that ended.
    pub(super) fn origin_done(&mut self, pieces: &[u32]) {
        self.origin_running = self.origin_running.saturating_sub(1);
        for n in pieces {
            self.origin_pending.remove(n);
        }
    }

    /// Lets the fetches of lost pieces still running finish (their pieces announced as they
    /// come), so that a fetch of everything missing started after them does not ask the
    /// origin for the same bytes a second time. Their errors are logged only: the caller
    /// fetches whatever is still missing.
    pub(super) async fn finish_origin_fetches(&mut self) {
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
    pub(super) fn abort_origin_fetches(&mut self) {
        for h in self.origin_fetches.drain(..) {
            h.abort();
        }
        self.origin_running = 0;
        self.origin_pending.clear();
    }

    /// Handles a report of a fetch of lost pieces; returns the end of the run when there is
    /// one (the task is complete, or the origin failed).
    pub(super) fn on_origin(
        &mut self,
        msg: OriginMsg,
    ) -> Option<Result<Arc<TaskStore>, DownloadError>> {
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

    pub(super) async fn back_to_source(&mut self) -> Result<Arc<TaskStore>, DownloadError> {
        if self.spec.url.is_empty() {
            return Err(DownloadError::NotFound(
                "task not found in the P2P network (it has no origin)".into(),
            ));
        }
        dataplane::Counters::add(&self.svc.stats.back_to_source, 1);
        if self.dispatched {
            self.cancel_dataplane();
        }
        // Lost pieces already on their way from the origin are not asked for again.
        self.finish_origin_fetches().await;
        let origin = self.svc.origin.clone();
        let spec = self.spec.clone();
        let existing = self.store.clone();
        let mut result = origin
            .fetch(&spec, existing, self)
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
                dataplane::Counters::add(&self.svc.stats.origin_digest_mismatches, 1);
                tracing::warn!(task = %spec.id, url = %spec.url, "{e}");
                if let Err(re) = self.svc.storage.remove(&spec.id) {
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
