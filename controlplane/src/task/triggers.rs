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
            // A scheduler's trigger: this daemon's own object-storage settings.
            s3: None,
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

    fn piece_digests(&self, id: TaskId) -> futures::future::BoxFuture<'static, (Vec<u8>, Vec<u8>)> {
        let store = self.services.storage.get(&id);
        Box::pin(seed_piece_digests(store, id))
    }
}

/// Every piece digest of the task in `store`, in order: the ones known, and, for pieces whose
/// digest a daemon restart forgot (digests are not persisted), the digest of the bytes on
/// disk (then remembered); with every piece's stored crc32c. Empty when the task is gone or
/// a piece cannot be read.
async fn seed_piece_digests(
    store: Option<std::sync::Arc<dataplane::TaskStore>>,
    id: TaskId,
) -> (Vec<u8>, Vec<u8>) {
    let Some(store) = store else {
        return (Vec::new(), Vec::new());
    };
    if store.all_digests().is_none() {
        piece_digests_from_disk(store.clone(), id).await;
    }
    store.digests_and_crcs().unwrap_or_default()
}

/// [`seed_piece_digests`] for pieces whose digest is not known: read from disk and
/// remembered (all of them, or none past the first piece that cannot be read).
async fn piece_digests_from_disk(store: std::sync::Arc<dataplane::TaskStore>, id: TaskId) {
    let _ = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        for n in 0..store.layout().piece_count() {
            if store.piece_digest(n).is_some() {
                continue;
            }
            if let Err(e) = store.read_piece(n, &mut buf) {
                tracing::warn!(task = %id, piece = n, "reading a held piece for its digest: {e}");
                return;
            }
            let _ = store.set_digest(n, wire::piece_digest(&buf));
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ControlStats;
    use crate::origin::{OriginError, PieceSink};
    use crate::retention::tests::Disk;
    use crate::scheduler::SchedulerError;
    use crate::task::{
        BoxFuture, CommandRefused, DataPlaneLink, Origin, ResponseStream, RunServices, RunSettings,
        Schedulers,
    };
    use dataplane::{Command, TaskStore};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use wire::proto::scheduler::{AnnouncePeerRequest, Host, TaskSource};

    /// Guard against a hang (not a timing assertion).
    const GUARD: Duration = Duration::from_secs(10);

    /// Schedulers `a:1` then `b:2` by rendezvous order; every registration is refused and
    /// its address reported.
    struct Refusing(mpsc::UnboundedSender<String>);

    impl Schedulers for Refusing {
        fn ordered(&self, _id: &TaskId) -> Vec<String> {
            vec!["a:1".into(), "b:2".into()]
        }

        fn announce_peer(
            &self,
            _id: TaskId,
            addr: String,
            _requests: ReceiverStream<AnnouncePeerRequest>,
        ) -> BoxFuture<'_, Result<ResponseStream, SchedulerError>> {
            let _ = self.0.send(addr.clone());
            Box::pin(async move {
                Err(SchedulerError::Failed {
                    addr,
                    code: tonic::Code::Unavailable,
                    message: "refused by the fake".into(),
                })
            })
        }

        fn announce_complete(&self, _id: TaskId, _layout: PieceLayout) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    struct NoDataPlane;

    impl DataPlaneLink for NoDataPlane {
        fn send(&self, _task: &TaskId, _cmd: Command) -> Result<(), CommandRefused> {
            Ok(())
        }
    }

    struct FailingOrigin;

    impl Origin for FailingOrigin {
        fn fetch<'a>(
            &'a self,
            _spec: &'a TaskSpec,
            _existing: Option<Arc<TaskStore>>,
            _sink: &'a mut (dyn PieceSink + Send),
        ) -> BoxFuture<'a, Result<Arc<TaskStore>, OriginError>> {
            Box::pin(async {
                Err(OriginError::Storage(dataplane::StorageFailure::Other(
                    "fake origin".into(),
                )))
            })
        }

        fn fetch_pieces<'a>(
            &'a self,
            _spec: &'a TaskSpec,
            _store: Arc<TaskStore>,
            _pieces: &'a [u32],
            _sink: &'a mut (dyn PieceSink + Send),
        ) -> BoxFuture<'a, Result<(), OriginError>> {
            Box::pin(async {
                Err(OriginError::Storage(dataplane::StorageFailure::Other(
                    "fake origin".into(),
                )))
            })
        }
    }

    /// Downloads over `disk`; the addresses the runs register with come out of the receiver.
    fn manager(
        disk: &Disk,
    ) -> (
        Arc<TaskManager>,
        Arc<ControlStats>,
        mpsc::UnboundedReceiver<String>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ControlStats::default());
        let svc = RunServices {
            schedulers: Arc::new(Refusing(tx)),
            dataplane: Arc::new(NoDataPlane),
            origin: Arc::new(FailingOrigin),
            storage: disk.storage.clone(),
            meta: disk.meta.clone(),
            stats: stats.clone(),
            host: Host {
                id: "me".into(),
                ..Host::default()
            },
            settings: RunSettings {
                schedule_timeout: Duration::from_secs(30),
                stall_timeout: Duration::from_secs(30),
                verify_pieces: true,
            },
        };
        (Arc::new(TaskManager::new(svc)), stats, rx)
    }

    fn trigger(id: &str) -> DownloadTask {
        DownloadTask {
            task_id: id.into(),
            source: Some(TaskSource {
                url: "http://origin.test/file".into(),
                ..TaskSource::default()
            }),
            piece_length: 0,
            from_peers: false,
        }
    }

    fn started(stats: &ControlStats) -> u64 {
        dataplane::Counters::get(&stats.downloads_started)
    }

    #[tokio::test]
    async fn a_trigger_for_a_task_held_completely_is_announced_not_downloaded() {
        let disk = Disk::new();
        let id = disk.complete_task(5, 40_000);
        let layout = disk.storage.get(&id).expect("stored").layout();
        let (tasks, stats, _rx) = manager(&disk);
        assert_eq!(tasks.held_tasks(), vec![(id, layout)]);
        assert_eq!(
            tasks.download("b:2", trigger(&id.to_hex())),
            Some((id, layout))
        );
        assert_eq!(started(&stats), 0, "a download started for a held task");
    }

    /// A seed's announcement of a held task whose digests a restart forgot: every piece's
    /// digest, read from disk, and every piece's stored crc32c, in order.
    #[tokio::test]
    async fn a_held_tasks_announcement_carries_every_digest_and_crc() {
        let disk = Disk::new();
        let id = disk.complete_task(5, 40_000);
        let store = disk.storage.get(&id).expect("stored");
        let layout = store.layout();
        let (tasks, _stats, _rx) = manager(&disk);
        let (digests, crcs) = tasks.piece_digests(id).await;
        let (mut want_digests, mut want_crcs) = (Vec::new(), Vec::new());
        for n in 0..layout.piece_count() {
            let r = layout.piece_range(n).expect("range");
            let buf = vec![5u8; usize::try_from(r.end - r.start).expect("size")];
            want_digests.extend_from_slice(&wire::piece_digest(&buf));
            want_crcs.extend_from_slice(&wire::piece_crc(&buf).to_le_bytes());
        }
        assert!(layout.piece_count() > 1);
        assert_eq!(digests, want_digests);
        assert_eq!(crcs, want_crcs);
    }

    #[tokio::test]
    async fn a_seed_trigger_registers_with_the_scheduler_that_sent_it_first() {
        let disk = Disk::new();
        let (tasks, stats, mut registered) = manager(&disk);
        let id = TaskId([6; 32]);
        assert_eq!(tasks.download("b:2", trigger(&id.to_hex())), None);
        assert_eq!(started(&stats), 1);
        let first = tokio::time::timeout(GUARD, registered.recv())
            .await
            .expect("the run did not register")
            .expect("fake gone");
        assert_eq!(first, "b:2", "not the triggering scheduler first");
    }

    #[tokio::test]
    async fn a_bad_trigger_starts_nothing() {
        let disk = Disk::new();
        let (tasks, stats, _rx) = manager(&disk);
        assert_eq!(tasks.download("a:1", trigger("not-a-task-id")), None);
        let mut no_source = trigger(&TaskId([7; 32]).to_hex());
        no_source.source = None;
        assert_eq!(tasks.download("a:1", no_source), None);
        assert_eq!(started(&stats), 0);
    }
}
