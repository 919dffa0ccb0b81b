//! dfcache: files put into the P2P network by hand, without an origin.
//!
//! * Import stores a local file as a finished task (pieces cut with the usual length rule,
//!   crc32c per piece) and announces it to the task's scheduler with `AnnounceTask`, so other
//!   peers can fetch it.
//! * Export fetches such a task from peers only: there is no origin to go back to, so a task
//!   nobody holds fails with "task not found in the P2P network".
//! * Stat combines local storage and the scheduler's `StatTask`; delete removes the task
//!   locally and withdraws this host from it at the schedulers (`LeaveTask`).
//!
//! A cached task is named by a content id (by default `sha256:<hex>` of the file), a tag and
//! an application ([`TaskId::from_cache_id`]).

use crate::retention::{Deleted, Retention};
use crate::scheduler::{SchedulerClient, SchedulerError};
use crate::store::MetaStore;
use crate::task::{BoxFuture, TaskSpec};
use dataplane::Storage;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::Status;
use wire::proto::scheduler::TaskInfo;
use wire::{PieceLayout, TaskId};

/// The scheduler calls dfcache makes (the daemon's [`SchedulerClient`]; the unit tests use
/// an in-memory fake).
pub trait CacheSchedulers: Send + Sync + std::fmt::Debug {
    /// This host's id as announced to the schedulers.
    fn host_id(&self) -> &str;
    /// Announces the complete task `id` (with the digest and crc32c of every piece when
    /// known, else empty) to its scheduler, then the next ones; returns the scheduler that took it.
    fn announce_cached<'a>(
        &'a self,
        id: &'a TaskId,
        layout: PieceLayout,
        piece_digests: Vec<u8>,
        piece_crcs: Vec<u8>,
    ) -> BoxFuture<'a, Result<String, SchedulerError>>;
    /// What the task's scheduler (then the next ones) knows of `id`: `Ok(None)` when one
    /// answered that it does not know it, `Err` when none answered.
    fn stat_task<'a>(
        &'a self,
        id: &'a TaskId,
    ) -> BoxFuture<'a, Result<Option<TaskInfo>, SchedulerError>>;
}

impl CacheSchedulers for SchedulerClient {
    fn host_id(&self) -> &str {
        &self.host().id
    }

    fn announce_cached<'a>(
        &'a self,
        id: &'a TaskId,
        layout: PieceLayout,
        piece_digests: Vec<u8>,
        piece_crcs: Vec<u8>,
    ) -> BoxFuture<'a, Result<String, SchedulerError>> {
        Box::pin(SchedulerClient::announce_cached(
            self,
            id,
            layout,
            piece_digests,
            piece_crcs,
        ))
    }

    fn stat_task<'a>(
        &'a self,
        id: &'a TaskId,
    ) -> BoxFuture<'a, Result<Option<TaskInfo>, SchedulerError>> {
        Box::pin(SchedulerClient::stat_task(self, id))
    }
}

/// What dfcache uses: storage and the metadata store (imports), the schedulers (announce,
/// stat), the deletion owner, and the piece length rule's bounds.
#[derive(Debug)]
pub struct DfCache {
    /// Task storage.
    pub storage: Arc<Storage>,
    /// Task metadata (an import is recorded before it is reported).
    pub meta: Arc<MetaStore>,
    /// The schedulers.
    pub schedulers: Arc<dyn CacheSchedulers>,
    /// The owner of task deletion.
    pub retention: Arc<Retention>,
    /// `download.piece_length_min`.
    pub piece_length_min: u64,
    /// `download.piece_length_max`.
    pub piece_length_max: u64,
}

/// Content id, tag and application of a cached task.
#[derive(Debug, Clone, Default)]
pub struct CacheKey {
    /// Content id; empty on import means the file's `sha256:<hex>`.
    pub cid: String,
    /// Tag.
    pub tag: String,
    /// Application.
    pub application: String,
}

impl CacheKey {
    /// The task id of this key (the content id must be set).
    pub fn task_id(&self) -> Result<TaskId, Status> {
        if self.cid.is_empty() {
            return Err(Status::invalid_argument(
                "a content id is required (the sha256:<hex> printed by dfcache import, or your own id)",
            ));
        }
        Ok(TaskId::from_cache_id(
            &canonical_cid(&self.cid),
            &self.tag,
            &self.application,
        ))
    }
}

/// A content id in the form the task id is computed from: a sha256 digest (any case) in its
/// canonical lowercase form, so that `dfcache`, the registry mirror and `dfget --digest` name
/// one blob the same way (the task identity rule in [`wire::task`]); other ids unchanged.
pub fn canonical_cid(cid: &str) -> String {
    wire::task::sha256_digest(cid).unwrap_or_else(|| cid.to_owned())
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Task id.
    pub id: TaskId,
    /// Content id used.
    pub cid: String,
    /// Layout of the stored task.
    pub layout: PieceLayout,
    /// Scheduler that accepted the announcement, if any.
    pub scheduler: Option<String>,
}

/// sha256 of a file, as `sha256:<hex>`.
fn file_digest(path: &Path) -> std::io::Result<String> {
    Ok(format!(
        "sha256:{}",
        hex::encode(damselfly_common::file_sha256(path)?)
    ))
}

/// Copies `path` into the store of `id` piece by piece (blocking).
fn store_file(ctx: &DfCache, id: TaskId, path: &Path, layout: PieceLayout) -> Result<(), String> {
    let store = ctx
        .storage
        .create(id, layout)
        .map_err(|e| format!("creating the task file: {e}"))?;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    for n in 0..layout.piece_count() {
        if store.has(n) {
            continue;
        }
        let Some(r) = layout.piece_range(n) else {
            continue;
        };
        buf.resize(usize::try_from(r.end - r.start).unwrap_or(0), 0);
        f.read_exact_at(&mut buf, r.start).map_err(|e| {
            format!(
                "reading {} at {} (did the file change during the import?): {e}",
                path.display(),
                r.start
            )
        })?;
        let crc = wire::piece_crc(&buf);
        store
            .write_piece(n, &buf, crc)
            .map_err(|e| format!("storing piece {n}: {e}"))?;
    }
    if !store.is_complete() {
        return Err("the imported task is incomplete".into());
    }
    Ok(())
}

/// Announces the complete task `id` to its scheduler (the next ones by rendezvous order when
/// it does not answer). Returns the scheduler that accepted it.
pub async fn announce(
    ctx: &DfCache,
    id: &TaskId,
    layout: PieceLayout,
) -> Result<String, SchedulerError> {
    // This host read the file itself: the digest of every piece, when all are known (an
    // import computes them; a task restored after a restart has none), with their crcs.
    let (digests, crcs) = ctx
        .storage
        .get(id)
        .and_then(|s| s.digests_and_crcs())
        .unwrap_or_default();
    ctx.schedulers
        .announce_cached(id, layout, digests, crcs)
        .await
}

/// Imports the file at `path` (absolute) as a finished task and announces it.
pub async fn import(
    ctx: &Arc<DfCache>,
    path: PathBuf,
    key: CacheKey,
    piece_length: u64,
) -> Result<Imported, Status> {
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "path {} must be absolute",
            path.display()
        )));
    }
    let meta = std::fs::metadata(&path)
        .map_err(|e| Status::invalid_argument(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(Status::invalid_argument(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let len = meta.len();
    if len == 0 {
        return Err(Status::invalid_argument(format!(
            "{} is empty; empty files cannot be imported",
            path.display()
        )));
    }
    let piece_length = if piece_length != 0 {
        piece_length
    } else {
        wire::piece::piece_length_for(len, ctx.piece_length_min, ctx.piece_length_max)
    };
    let layout = PieceLayout::new(len, piece_length)
        .map_err(|e| Status::invalid_argument(format!("{}: {e}", path.display())))?;
    let ctx2 = ctx.clone();
    let (id, cid) = tokio::task::spawn_blocking(move || -> Result<(TaskId, String), Status> {
        let cid = if key.cid.is_empty() {
            file_digest(&path)
                .map_err(|e| Status::invalid_argument(format!("{}: {e}", path.display())))?
        } else {
            let cid = canonical_cid(&key.cid);
            // An id that claims a content digest names that content for every path (mirror,
            // dfget, preheat): the file must be it.
            if wire::task::sha256_digest(&cid).is_some() {
                let got = file_digest(&path)
                    .map_err(|e| Status::invalid_argument(format!("{}: {e}", path.display())))?;
                if got != cid {
                    return Err(Status::invalid_argument(format!(
                        "content id {cid} is a digest, but {} has digest {got}",
                        path.display()
                    )));
                }
            }
            cid
        };
        let id = TaskId::from_cache_id(&cid, &key.tag, &key.application);
        match ctx2.storage.get(&id) {
            Some(s) if s.is_complete() && s.layout() == layout => return Ok((id, cid)),
            Some(s) if s.is_complete() => {
                return Err(Status::already_exists(format!(
                    "task {id} is already held with {} bytes in pieces of {}; delete it first",
                    s.layout().content_length(),
                    s.layout().piece_length()
                )))
            }
            _ => {}
        }
        if let Err(e) = store_file(&ctx2, id, &path, layout) {
            let _ = ctx2.storage.remove(&id);
            return Err(Status::internal(e));
        }
        // Record the task before reporting it imported (as a finished download does): a
        // crash before the next periodic flush would otherwise lose it on restart, while
        // the scheduler was told this host holds it.
        if let Err(e) = ctx2.meta.flush(&ctx2.storage) {
            tracing::warn!(task = %id, "writing task metadata: {e:#}");
        }
        Ok((id, cid))
    })
    .await
    .map_err(|e| Status::internal(format!("import task: {e}")))??;
    tracing::info!(task = %id, %cid, bytes = len, "imported");
    let scheduler = match announce(ctx, &id, layout).await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(task = %id, "announcing the imported task: {e}");
            None
        }
    };
    Ok(Imported {
        id,
        cid,
        layout,
        scheduler,
    })
}

/// Asks the task's scheduler (then the next ones) what it knows of `id`: `Ok(None)` when a
/// scheduler answered that it does not know the task, `Err` when none answered.
pub async fn scheduler_stat(
    ctx: &DfCache,
    id: &TaskId,
) -> Result<Option<TaskInfo>, SchedulerError> {
    ctx.schedulers.stat_task(id).await
}

/// Checks that some other peer holds task `id` before an export, and returns the download
/// spec: no origin, back-to-source disabled.
pub async fn export_spec(
    ctx: &DfCache,
    key: &CacheKey,
    rate_limit: u64,
) -> Result<TaskSpec, Status> {
    let id = key.task_id()?;
    let held_here = ctx.storage.get(&id).is_some_and(|s| s.is_complete());
    if !held_here {
        let info = scheduler_stat(ctx, &id).await.map_err(|e| {
            Status::unavailable(format!("cannot ask the scheduler about task {id}: {e}"))
        })?;
        let holders = info.as_ref().map_or(0, |i| {
            i.peers
                .iter()
                .filter(|p| {
                    p.host_id != ctx.schedulers.host_id() && (p.done || p.finished_pieces > 0)
                })
                .count()
        });
        if holders == 0 || info.as_ref().is_some_and(|i| i.metadata.is_none()) {
            return Err(Status::not_found(format!(
                "task not found in the P2P network: no peer holds {} (task {id})",
                describe(key)
            )));
        }
    }
    Ok(TaskSpec {
        id,
        url: String::new(),
        headers: Vec::new(),
        piece_length: 0,
        back_to_source: false,
        disable_back_to_source: true,
        rate_limit,
        scheduler: None,
        priority: 0,
        // No origin to check: the client's digest (dfcache export checks a digest id by
        // default) is checked on delivery.
        digest: None,
        s3: None,
    })
}

fn describe(key: &CacheKey) -> String {
    let mut s = key.cid.clone();
    if !key.tag.is_empty() {
        s.push_str(&format!(" tag {:?}", key.tag));
    }
    if !key.application.is_empty() {
        s.push_str(&format!(" application {:?}", key.application));
    }
    s
}

/// Removes task `id` from local storage and the metadata store and tells every scheduler
/// that this host left it ([`Retention::delete`]).
pub async fn delete(ctx: &DfCache, id: &TaskId) -> Result<Deleted, Status> {
    ctx.retention
        .delete(id)
        .await
        .map_err(|e| Status::internal(format!("removing task {id}: {e}")))
}

#[cfg(test)]
pub(crate) mod tests;
