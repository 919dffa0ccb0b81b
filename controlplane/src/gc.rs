//! Garbage collection of stored tasks: task TTL, and high/low disk watermarks (bytes of task
//! files and/or percent of the storage dir's filesystem) that evict the least recently used
//! tasks. A task being downloaded (a run of [`crate::task::TaskManager`]) or in use (a
//! delivery holds [`dataplane::storage::Busy`], a writer a piece's
//! [`dataplane::storage::PieceWriter`]) is never evicted: [`dataplane::Storage::evict`]
//! checks the users and retires the task in one atomic step. The policy chooses; evicting
//! a chosen task is [`Retention`]'s.

use crate::config::GcConfig;
use crate::retention::Retention;
use std::sync::Arc;
use wire::TaskId;

/// One stored task as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Task id.
    pub id: TaskId,
    /// Bytes its content file takes (the content length).
    pub size: u64,
    /// Unix time in milliseconds of its last use.
    pub last_access_ms: u64,
    /// Being downloaded, uploaded or delivered: never evicted.
    pub in_use: bool,
    /// Every piece is stored.
    pub finished: bool,
}

/// Disk use at the time of a collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of the sizes of the stored tasks.
    pub task_bytes: u64,
    /// Capacity of the filesystem holding the storage dir, used + available as `df` counts
    /// it (0: unknown).
    pub fs_total: u64,
    /// Bytes used on that filesystem (by anything).
    pub fs_used: u64,
}

/// Bytes to free to get back under the low watermarks, 0 while no high watermark is
/// exceeded. Byte watermarks apply to `task_bytes`, percent ones to the filesystem.
pub fn bytes_to_free(cfg: &GcConfig, u: &Usage) -> u64 {
    let mut need = 0;
    let high = cfg.high_watermark_bytes.0;
    if high > 0 && u.task_bytes > high {
        need = u.task_bytes - cfg.low_watermark_bytes.0.min(high);
    }
    let hp = cfg.high_watermark_percent;
    if hp > 0 && u.fs_total > 0 {
        let high = u.fs_total / 100 * u64::from(hp.min(100));
        if u.fs_used > high {
            let low = u.fs_total / 100 * u64::from(cfg.low_watermark_percent.min(hp));
            need = need.max(u.fs_used - low);
        }
    }
    need
}

/// The tasks to evict, in order: every idle task unused for longer than `ttl_ms` (0: no
/// TTL), then idle tasks by least recent use — finished ones first, then unfinished
/// leftovers — until `to_free` bytes are covered. Tasks in use are never chosen, even when
/// that leaves the disk above its watermark.
pub fn choose_victims(
    candidates: &[Candidate],
    to_free: u64,
    ttl_ms: u64,
    now_ms: u64,
) -> Vec<TaskId> {
    let mut victims = Vec::new();
    let mut freed = 0u64;
    let mut rest: Vec<&Candidate> = Vec::new();
    for c in candidates.iter().filter(|c| !c.in_use) {
        if ttl_ms > 0 && now_ms.saturating_sub(c.last_access_ms) > ttl_ms {
            victims.push(c.id);
            freed = freed.saturating_add(c.size);
        } else {
            rest.push(c);
        }
    }
    rest.sort_by_key(|c| (!c.finished, c.last_access_ms));
    for c in rest {
        if freed >= to_free {
            break;
        }
        victims.push(c.id);
        freed = freed.saturating_add(c.size);
    }
    victims
}

/// One collection: evicts what the policy chooses now, through `retention` (blocking).
/// Returns the tasks evicted; the schedulers are not told yet (see [`collect_once`]).
pub fn collect(retention: &Retention, cfg: &GcConfig) -> Vec<TaskId> {
    let storage = retention.storage();
    let tasks = storage.tasks();
    let candidates: Vec<Candidate> = tasks
        .iter()
        .map(|t| Candidate {
            id: t.id(),
            size: t.layout().content_length(),
            last_access_ms: t.last_access(),
            in_use: t.in_use() || retention.is_running(&t.id()),
            finished: t.is_complete(),
        })
        .collect();
    let (fs_total, fs_used) = match dataplane::sys::fs_space(storage.dir()) {
        Ok((used, avail)) => (used.saturating_add(avail), used),
        Err(e) => {
            tracing::debug!("statvfs of the storage dir: {e}");
            (0, 0)
        }
    };
    let usage = Usage {
        task_bytes: candidates.iter().map(|c| c.size).sum(),
        fs_total,
        fs_used,
    };
    let to_free = bytes_to_free(cfg, &usage);
    let ttl_ms = u64::try_from(cfg.task_ttl.as_millis()).unwrap_or(u64::MAX);
    let victims = choose_victims(
        &candidates,
        to_free,
        ttl_ms,
        dataplane::storage::unix_millis(),
    );
    let mut evicted = Vec::new();
    for id in victims {
        // The candidates are a snapshot: a run may have started since. A delivery, an
        // upload or a piece writer that took the task since keeps it: `Storage::evict`
        // checks its users and retires it in one atomic step.
        if retention.is_running(&id) {
            continue;
        }
        match retention.evict(&id) {
            Ok(true) => {
                tracing::info!(task = %id, ?usage, to_free, "task evicted by gc");
                evicted.push(id);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(task = %id, "gc could not remove task: {e}"),
        }
    }
    evicted
}

/// One collection ([`collect`], on the blocking pool), then the schedulers stop offering
/// this host for what it no longer holds. Returns the tasks evicted.
pub async fn collect_once(retention: &Arc<Retention>, cfg: &GcConfig) -> Vec<TaskId> {
    let (r, c) = (retention.clone(), cfg.clone());
    let Ok(evicted) = tokio::task::spawn_blocking(move || collect(&r, &c)).await else {
        return Vec::new();
    };
    for id in &evicted {
        let (told, errors) = retention.leave(id).await;
        if !told {
            tracing::debug!(task = %id, "no scheduler took the leave: {errors}");
        }
    }
    evicted
}

/// Runs [`collect_once`] every `cfg.interval`.
pub async fn run(retention: Arc<Retention>, cfg: GcConfig) {
    let interval = cfg.interval.max(std::time::Duration::from_millis(10));
    loop {
        tokio::time::sleep(interval).await;
        collect_once(&retention, &cfg).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    fn c(n: u8, size: u64, last: u64, in_use: bool, finished: bool) -> Candidate {
        Candidate {
            id: TaskId([n; 32]),
            size,
            last_access_ms: last,
            in_use,
            finished,
        }
    }

    fn ids(v: &[TaskId]) -> Vec<u8> {
        v.iter().map(|t| t.0[0]).collect()
    }

    #[test]
    fn least_recently_used_finished_tasks_go_first_and_in_use_never() {
        let cands = [
            c(1, 10, 300, false, true),
            c(2, 10, 100, true, true), // oldest, but in use
            c(3, 10, 200, false, true),
            c(4, 10, 50, false, false), // unfinished leftover: after finished ones
            c(5, 10, 400, false, true),
        ];
        assert_eq!(ids(&choose_victims(&cands, 15, 0, 1000)), vec![3, 1]);
        assert_eq!(ids(&choose_victims(&cands, 35, 0, 1000)), vec![3, 1, 5, 4]);
        // Even needing everything, the task in use stays.
        assert_eq!(
            ids(&choose_victims(&cands, 1000, 0, 1000)),
            vec![3, 1, 5, 4]
        );
        assert!(choose_victims(&cands, 0, 0, 1000).is_empty());
    }

    #[test]
    fn ttl_evicts_idle_tasks_regardless_of_space() {
        let cands = [
            c(1, 10, 100, false, true),
            c(2, 10, 100, true, true),
            c(3, 10, 900, false, true),
        ];
        assert_eq!(ids(&choose_victims(&cands, 0, 500, 1000)), vec![1]);
        // TTL victims count towards the bytes to free.
        assert_eq!(ids(&choose_victims(&cands, 10, 500, 1000)), vec![1]);
        assert_eq!(ids(&choose_victims(&cands, 11, 500, 1000)), vec![1, 3]);
    }

    #[test]
    fn watermarks() {
        let cfg = GcConfig {
            high_watermark_bytes: ByteSize(100),
            low_watermark_bytes: ByteSize(60),
            high_watermark_percent: 80,
            low_watermark_percent: 60,
            ..GcConfig::default()
        };
        let u = |task_bytes, fs_used| Usage {
            task_bytes,
            fs_total: 10_000,
            fs_used,
        };
        assert_eq!(bytes_to_free(&cfg, &u(100, 8000)), 0, "at the marks");
        assert_eq!(
            bytes_to_free(&cfg, &u(101, 0)),
            41,
            "down to the low byte mark"
        );
        assert_eq!(bytes_to_free(&cfg, &u(0, 9000)), 3000, "down to 60 %");
        assert_eq!(bytes_to_free(&cfg, &u(150, 8500)), 2500, "the larger need");
        let off = GcConfig {
            high_watermark_bytes: ByteSize(0),
            high_watermark_percent: 0,
            ..cfg
        };
        assert_eq!(bytes_to_free(&off, &u(u64::MAX, 10_000)), 0);
    }

    #[tokio::test]
    async fn a_collection_evicts_the_chosen_tasks_through_the_owner() {
        use crate::retention::tests::{Disk, FakeRuns, FakeSchedulers};
        const LEN: u64 = 40_000;
        let disk = Disk::new();
        let running = disk.complete_task(1, LEN);
        let (old, mid, new) = (
            disk.complete_task(2, LEN),
            disk.complete_task(3, LEN),
            disk.complete_task(4, LEN),
        );
        for (id, at) in [(running, 50), (old, 100), (mid, 200), (new, 300)] {
            disk.storage.get(&id).expect("stored").set_last_access(at);
        }
        let schedulers = Arc::new(FakeSchedulers::default());
        let runs = Arc::new(FakeRuns {
            running: vec![running],
            ..FakeRuns::default()
        });
        let retention = Arc::new(Retention::new(
            disk.storage.clone(),
            disk.meta.clone(),
            runs.clone(),
            schedulers.clone(),
        ));
        // 4 tasks over a high mark of 3: down to 2, the running (oldest) one kept.
        let cfg = GcConfig {
            task_ttl: std::time::Duration::ZERO,
            high_watermark_bytes: ByteSize(3 * LEN),
            low_watermark_bytes: ByteSize(2 * LEN),
            high_watermark_percent: 0,
            ..GcConfig::default()
        };
        let evicted = collect_once(&retention, &cfg).await;
        assert_eq!(evicted, vec![old, mid]);
        assert!(disk.storage.get(&old).is_none() && disk.storage.get(&mid).is_none());
        assert!(disk.storage.get(&running).is_some() && disk.storage.get(&new).is_some());
        assert_eq!(
            disk.recorded(),
            vec![running, new],
            "metadata of the evicted kept"
        );
        assert_eq!(*schedulers.left.lock().expect("lock"), vec![old, mid]);
        assert_eq!(*runs.stopped.lock().expect("lock"), vec![old, mid]);
        // Under the marks now: the next collection evicts nothing.
        assert!(collect_once(&retention, &cfg).await.is_empty());
    }
}
