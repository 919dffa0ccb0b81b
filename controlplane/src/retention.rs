//! The one owner of deleting stored tasks. Deleting a task (`dfcache delete`) or evicting
//! it (the [`crate::gc`]) is the same three steps in one place: take it out of storage
//! (its content file is deleted), forget its metadata, and withdraw this host from it at
//! the schedulers (`LeaveTask`), after closing the scheduler stream of a finished download
//! that still serves it.
//!
//! [`Retention`] reaches the schedulers and the downloads through two narrow traits,
//! [`LeaveTask`] (the daemon's [`SchedulerClient`]) and [`Runs`] (its
//! [`TaskManager`]), so its unit tests run against in-memory fakes.

use crate::scheduler::SchedulerClient;
use crate::store::MetaStore;
use crate::task::{BoxFuture, TaskManager};
use dataplane::Storage;
use std::sync::Arc;
use wire::TaskId;

/// Withdrawing this host from a task at the schedulers.
pub trait LeaveTask: Send + Sync {
    /// Sends `LeaveTask` for `id` to every scheduler. Returns whether at least one took it,
    /// and the errors of the others.
    fn leave_task<'a>(&'a self, id: &'a TaskId) -> BoxFuture<'a, (bool, String)>;
}

impl LeaveTask for SchedulerClient {
    fn leave_task<'a>(&'a self, id: &'a TaskId) -> BoxFuture<'a, (bool, String)> {
        Box::pin(SchedulerClient::leave_task(self, id))
    }
}

/// The downloads, as far as deleting a task involves them.
pub trait Runs: Send + Sync {
    /// Whether a download of `id` is running (the GC keeps such a task).
    fn is_running(&self, id: &TaskId) -> bool;
    /// Closes the scheduler stream of a finished download of `id`.
    fn stop_serving(&self, id: &TaskId);
}

impl Runs for TaskManager {
    fn is_running(&self, id: &TaskId) -> bool {
        TaskManager::is_running(self, id)
    }

    fn stop_serving(&self, id: &TaskId) {
        TaskManager::stop_serving(self, id);
    }
}

/// What deleting a task did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    /// It was stored here.
    pub held: bool,
    /// At least one scheduler took the `LeaveTask`.
    pub told: bool,
    /// The errors of the schedulers that did not ("" when none).
    pub errors: String,
}

/// Owner of task deletion and eviction.
pub struct Retention {
    storage: Arc<Storage>,
    meta: Arc<MetaStore>,
    runs: Arc<dyn Runs>,
    schedulers: Arc<dyn LeaveTask>,
}

impl std::fmt::Debug for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retention")
            .field("dir", &self.storage.dir())
            .finish_non_exhaustive()
    }
}

impl Retention {
    /// Deletes from `storage` and `meta`, telling `runs` and `schedulers`.
    pub fn new(
        storage: Arc<Storage>,
        meta: Arc<MetaStore>,
        runs: Arc<dyn Runs>,
        schedulers: Arc<dyn LeaveTask>,
    ) -> Self {
        Self {
            storage,
            meta,
            runs,
            schedulers,
        }
    }

    /// Task storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Whether a download of `id` is running.
    pub fn is_running(&self, id: &TaskId) -> bool {
        self.runs.is_running(id)
    }

    /// Deletes task `id` for good on a user's request, in use or not: stops serving it,
    /// removes it from storage and from the metadata store (off the async threads: an
    /// unlink and a metadata commit, which may wait for a running flush), then tells every
    /// scheduler this host left it.
    pub async fn delete(self: &Arc<Self>, id: &TaskId) -> anyhow::Result<Deleted> {
        let (me, task) = (self.clone(), *id);
        let held = tokio::task::spawn_blocking(move || me.remove(&task))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        if held {
            tracing::info!(task = %id, "deleted");
        }
        let (told, errors) = self.schedulers.leave_task(id).await;
        Ok(Deleted { held, told, errors })
    }

    /// The local part of [`Retention::delete`] (blocking). Returns whether it was stored.
    fn remove(&self, id: &TaskId) -> anyhow::Result<bool> {
        let present = self.storage.get(id).is_some();
        self.runs.stop_serving(id);
        self.storage.remove(id)?;
        self.meta.delete(id)?;
        Ok(present)
    }

    /// Evicts task `id` unless something uses it ([`Storage::evict`] checks its users and
    /// retires it in one atomic step), then stops serving it and forgets its metadata
    /// (blocking). Returns whether it was evicted; the schedulers are told by
    /// [`Retention::leave`].
    pub fn evict(&self, id: &TaskId) -> std::io::Result<bool> {
        if !self.storage.evict(id)? {
            return Ok(false);
        }
        self.runs.stop_serving(id);
        if let Err(e) = self.meta.delete(id) {
            tracing::warn!(task = %id, "gc could not forget task metadata: {e}");
        }
        Ok(true)
    }

    /// Tells every scheduler that this host left task `id` (after [`Retention::evict`]).
    pub async fn leave(&self, id: &TaskId) -> (bool, String) {
        self.schedulers.leave_task(id).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;
    use wire::PieceLayout;

    /// Schedulers that record every `LeaveTask`; `reachable: false` refuses them all.
    #[derive(Default)]
    pub(crate) struct FakeSchedulers {
        pub(crate) left: Mutex<Vec<TaskId>>,
        pub(crate) unreachable: bool,
    }

    impl LeaveTask for FakeSchedulers {
        fn leave_task<'a>(&'a self, id: &'a TaskId) -> BoxFuture<'a, (bool, String)> {
            Box::pin(async move {
                if self.unreachable {
                    return (false, "scheduler fake: unreachable".into());
                }
                self.left.lock().expect("lock").push(*id);
                (true, String::new())
            })
        }
    }

    /// Downloads: `running` are running; records `stop_serving`.
    #[derive(Default)]
    pub(crate) struct FakeRuns {
        pub(crate) running: Vec<TaskId>,
        pub(crate) stopped: Mutex<Vec<TaskId>>,
    }

    impl Runs for FakeRuns {
        fn is_running(&self, id: &TaskId) -> bool {
            self.running.contains(id)
        }

        fn stop_serving(&self, id: &TaskId) {
            self.stopped.lock().expect("lock").push(*id);
        }
    }

    /// A real storage and metadata store in a temporary directory.
    pub(crate) struct Disk {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) storage: Arc<Storage>,
        pub(crate) meta: Arc<MetaStore>,
    }

    impl Disk {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
            let meta = Arc::new(MetaStore::open(dir.path()).expect("metadata store"));
            Self {
                _dir: dir,
                storage,
                meta,
            }
        }

        /// Stores a complete task of `len` bytes and records it in the metadata store.
        pub(crate) fn complete_task(&self, n: u8, len: u64) -> TaskId {
            let id = TaskId([n; 32]);
            let layout = PieceLayout::new(len, wire::piece::MIN_PIECE_LENGTH).expect("layout");
            let store = self.storage.create(id, layout).expect("create");
            for p in 0..layout.piece_count() {
                let r = layout.piece_range(p).expect("range");
                let buf = vec![n; usize::try_from(r.end - r.start).expect("size")];
                store
                    .write_piece(p, &buf, wire::piece_crc(&buf))
                    .expect("write piece");
            }
            assert!(store.is_complete());
            self.meta.flush(&self.storage).expect("flush");
            id
        }

        /// The task ids the metadata store has a record of.
        pub(crate) fn recorded(&self) -> Vec<TaskId> {
            let mut v: Vec<TaskId> = self
                .meta
                .load()
                .expect("load")
                .into_iter()
                .map(|(rec, _, _)| TaskId::parse(&rec.id).expect("id"))
                .collect();
            v.sort_by_key(|t| t.0);
            v
        }
    }

    #[tokio::test]
    async fn deleting_a_task_evicts_storage_forgets_metadata_and_leaves_schedulers() {
        let disk = Disk::new();
        let keep = disk.complete_task(1, 40_000);
        let gone = disk.complete_task(2, 40_000);
        let path = disk
            .storage
            .get(&gone)
            .expect("stored")
            .path()
            .to_path_buf();
        assert_eq!(disk.recorded(), vec![keep, gone]);
        let schedulers = Arc::new(FakeSchedulers::default());
        let runs = Arc::new(FakeRuns::default());
        let r = Arc::new(Retention::new(
            disk.storage.clone(),
            disk.meta.clone(),
            runs.clone(),
            schedulers.clone(),
        ));
        let d = r.delete(&gone).await.expect("delete");
        assert_eq!(
            d,
            Deleted {
                held: true,
                told: true,
                errors: String::new()
            }
        );
        assert!(disk.storage.get(&gone).is_none(), "still in storage");
        assert!(!path.exists(), "content file left behind");
        assert_eq!(disk.recorded(), vec![keep], "metadata not forgotten");
        assert_eq!(*schedulers.left.lock().expect("lock"), vec![gone]);
        assert_eq!(*runs.stopped.lock().expect("lock"), vec![gone]);
        assert!(disk.storage.get(&keep).is_some(), "the other task went too");

        // A task not held here: still withdrawn at the schedulers, reported as not held.
        let d = r.delete(&TaskId([9; 32])).await.expect("delete");
        assert!(!d.held && d.told);
        assert_eq!(schedulers.left.lock().expect("lock").len(), 2);
    }

    #[tokio::test]
    async fn a_delete_no_scheduler_takes_says_so_and_still_removes_locally() {
        let disk = Disk::new();
        let id = disk.complete_task(3, 5000);
        let schedulers = Arc::new(FakeSchedulers {
            unreachable: true,
            ..FakeSchedulers::default()
        });
        let r = Arc::new(Retention::new(
            disk.storage.clone(),
            disk.meta.clone(),
            Arc::new(FakeRuns::default()),
            schedulers,
        ));
        let d = r.delete(&id).await.expect("delete");
        assert!(d.held && !d.told);
        assert!(d.errors.contains("unreachable"), "{}", d.errors);
        assert!(disk.storage.get(&id).is_none());
        assert!(disk.recorded().is_empty());
    }

    #[test]
    fn evicting_keeps_a_task_in_use() {
        let disk = Disk::new();
        let id = disk.complete_task(4, 5000);
        let r = Retention::new(
            disk.storage.clone(),
            disk.meta.clone(),
            Arc::new(FakeRuns::default()),
            Arc::new(FakeSchedulers::default()),
        );
        let store = disk.storage.get(&id).expect("stored");
        let busy = store.busy().expect("not retired");
        assert!(!r.evict(&id).expect("evict"), "evicted a task in use");
        assert!(disk.storage.get(&id).is_some());
        assert_eq!(disk.recorded(), vec![id]);
        drop(busy);
        assert!(r.evict(&id).expect("evict"));
        assert!(disk.storage.get(&id).is_none());
        assert!(disk.recorded().is_empty());
    }
}
