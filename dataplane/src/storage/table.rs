//! [`Storage`]: every task this daemon stores (a lock-free map), and creating, restoring,
//! removing and evicting (garbage collection) tasks with their content files.

use super::TaskStore;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use wire::{PieceLayout, TaskId};

/// Every task this daemon stores, readable without locks by all threads.
///
/// Reads (`get`) are a lock-free `ArcSwap` load; inserts and removals copy the map, which is
/// fine because tasks are opened far less often than pieces are served.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    tasks: ArcSwap<HashMap<TaskId, Arc<TaskStore>>>,
    /// Held by `create`, `remove` and `insert` across their map change and file work, so
    /// that a task's file is never unlinked or truncated under a store of the same id
    /// made in between (a remove racing a re-create would otherwise unlink the new file).
    changing: std::sync::Mutex<()>,
    /// Bytes of content files created (a cheap view of disk use).
    allocated: AtomicU64,
}

impl Storage {
    /// Storage under `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tasks: ArcSwap::from_pointee(HashMap::new()),
            changing: std::sync::Mutex::new(()),
            allocated: AtomicU64::new(0),
        })
    }

    /// Directory of the content files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The task `id`, when stored.
    pub fn get(&self, id: &TaskId) -> Option<Arc<TaskStore>> {
        self.tasks.load().get(id).cloned()
    }

    /// Creates the content file of a task and registers it, or returns the existing one when
    /// it has the same layout. One with another layout is removed first (its file unlinked,
    /// so whoever still holds it keeps reading its own bytes, not the new file's).
    pub fn create(&self, id: TaskId, layout: PieceLayout) -> io::Result<Arc<TaskStore>> {
        let _changing = self.lock_changes();
        if let Some(t) = self.get(&id) {
            if t.layout() == layout {
                return Ok(t);
            }
            self.remove_locked(&id)?;
        }
        let store = Arc::new(TaskStore::create(&self.dir, id, layout)?);
        self.allocated
            .fetch_add(layout.content_length(), Ordering::Relaxed);
        let s = store.clone();
        self.tasks.rcu(move |m| {
            let mut m = HashMap::clone(m);
            m.insert(id, s.clone());
            m
        });
        Ok(store)
    }

    /// Forgets a task and removes its content file, whoever still uses it (a removal the
    /// user asked for, or of a failed download): the task is retired, so nothing claims or
    /// marks it busy from now on; current users finish on the unlinked file.
    pub fn remove(&self, id: &TaskId) -> io::Result<()> {
        let _changing = self.lock_changes();
        if let Some(t) = self.get(id) {
            t.retire_now();
        }
        self.remove_locked(id)
    }

    /// Garbage collection's removal: forgets the task and removes its content file only if
    /// nobody uses it, in one atomic step with the users ([`TaskStore::retire`]): a task
    /// with a piece claimed ([`PieceWriter`](super::PieceWriter)) or a [`Busy`](super::Busy) guard (a read, an upload, a
    /// delivery) is kept, and once retired it can be neither claimed nor marked busy.
    /// Returns whether it was evicted (`false`: in use, or not stored).
    pub fn evict(&self, id: &TaskId) -> io::Result<bool> {
        let _changing = self.lock_changes();
        match self.get(id) {
            Some(t) if t.retire() => {
                self.remove_locked(id)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::remove`] with `changing` held.
    fn remove_locked(&self, id: &TaskId) -> io::Result<()> {
        let mut removed = None;
        self.tasks.rcu(|m| {
            let mut m = HashMap::clone(m);
            removed = m.remove(id);
            m
        });
        if let Some(t) = removed {
            self.allocated
                .fetch_sub(t.layout().content_length(), Ordering::Relaxed);
            match std::fs::remove_file(t.path()) {
                // Already gone (removed by hand): what was asked for holds.
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Registers a task restored from disk ([`TaskStore::restore`]), replacing any task of
    /// the same id.
    pub fn insert(&self, store: Arc<TaskStore>) {
        let _changing = self.lock_changes();
        let id = store.id();
        self.allocated
            .fetch_add(store.layout().content_length(), Ordering::Relaxed);
        self.tasks.rcu(move |m| {
            let mut m = HashMap::clone(m);
            m.insert(id, store.clone());
            m
        });
    }

    /// Every task stored now.
    pub fn tasks(&self) -> Vec<Arc<TaskStore>> {
        self.tasks.load().values().cloned().collect()
    }

    /// Sum of the content lengths of the tasks stored (what their files take at most).
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Number of tasks stored.
    pub fn len(&self) -> usize {
        self.tasks.load().len()
    }

    /// Whether no task is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
