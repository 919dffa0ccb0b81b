//! The local gRPC API on a Unix socket: what dfget (and later dfcache) call.

use crate::cache::DfCache;
use crate::error::DownloadError;
use crate::scheduler::SchedulerClient;
use crate::task::TaskManager;
use crate::task::{Progress, TaskSpec, TaskState};
use crate::task_reader::{ended_without_result, wait_store, ByteRange, Delivery, TaskReader};
use anyhow::Context as _;
use dataplane::shaper::Shaping;
use dataplane::{Counters, Storage};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use wire::proto::dfdaemon::dfdaemon_server::{Dfdaemon, DfdaemonServer};
use wire::proto::dfdaemon::{
    CacheId, DeleteTaskRequest, DeleteTaskResponse, DownloadProgress, DownloadRequest,
    ExportTaskRequest, ImportTaskRequest, ImportTaskResponse, StatPeer, StatTaskRequest,
    StatTaskResponse, StatsRequest, StatsResponse,
};
use wire::task::TaskIdOptions;
use wire::TaskId;

/// Serves the local API on `socket` until `shutdown` resolves.
pub async fn serve(
    api: LocalApi,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a daemon that died; refuse if a live daemon still answers on it.
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!("another dfdaemon is already serving {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(DfdaemonServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("local API server")
}

/// What the local API serves from: the downloads, storage, dfcache, the schedulers (their
/// addresses, for stats), the counters and rate limits, and two settings.
#[derive(Debug)]
pub struct LocalApi {
    /// `download.hard_link`: deliver by hard link when possible.
    pub hard_link: bool,
    /// `data_plane.pieces_in_flight`: reported while the manager sets none.
    pub pieces_in_flight: usize,
    /// The downloads.
    pub tasks: Arc<TaskManager>,
    /// Task storage.
    pub storage: Arc<Storage>,
    /// dfcache import, export, stat, delete.
    pub cache: Arc<DfCache>,
    /// The schedulers.
    pub schedulers: Arc<SchedulerClient>,
    /// Byte and piece counters (shared with the data plane).
    pub counters: Arc<Counters>,
    /// Rate limits (shared with the data plane).
    pub shaping: Arc<Shaping>,
    /// Version of the manager's dynamic config applied (0: none yet).
    pub config_version: Arc<AtomicU64>,
}

impl LocalApi {
    /// Delivery mode from the configuration.
    fn delivery(&self) -> Delivery {
        if self.hard_link {
            Delivery::HardLinkOrCopy
        } else {
            Delivery::Copy
        }
    }
}

fn to_proto(id: &TaskId, p: &Progress, done: bool) -> DownloadProgress {
    DownloadProgress {
        task_id: id.to_hex(),
        content_length: p.content_length.unwrap_or(0),
        completed_length: p.completed_length,
        piece_count: p.piece_count,
        finished_pieces: p.finished_pieces,
        done,
        bytes_from_origin: p.from_origin,
        bytes_from_seed: p.from_seed,
        bytes_from_peers: p.from_peers,
        output_length: if done {
            p.content_length.unwrap_or(0)
        } else {
            0
        },
    }
}

fn cache_key(c: Option<CacheId>) -> crate::cache::CacheKey {
    let c = c.unwrap_or_default();
    crate::cache::CacheKey {
        cid: c.id,
        tag: c.tag,
        application: c.application,
    }
}

/// Checks that `output` is absolute and its directory exists.
fn check_output(output: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(output);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "output {output:?} must be an absolute path"
        )));
    }
    match path.parent() {
        Some(d) if d.is_dir() => Ok(path),
        _ => Err(Status::invalid_argument(format!(
            "the directory of {} does not exist",
            path.display()
        ))),
    }
}

/// Parses `sha256:<64 hex>`.
fn parse_digest(d: &str) -> Result<[u8; 32], Status> {
    let Some(hexpart) = d.strip_prefix("sha256:") else {
        return Err(Status::invalid_argument(format!(
            "digest {d:?} must look like sha256:<64 hex characters>"
        )));
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut out).map_err(|_| {
        Status::invalid_argument(format!(
            "digest {d:?} must look like sha256:<64 hex characters>"
        ))
    })?;
    Ok(out)
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<DownloadProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Dfdaemon for LocalApi {
    type DownloadStream = ProgressStream;

    async fn download(
        &self,
        req: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let r = req.into_inner();
        let url = url_check(&r.url)?;
        let output = check_output(&r.output)?;
        let range = match r.range {
            Some(br) => {
                if br.end.is_some_and(|e| e < br.start) {
                    return Err(Status::invalid_argument(format!(
                        "range end {} is before its start {}",
                        br.end.unwrap_or(0),
                        br.start
                    )));
                }
                if !r.digest.is_empty() {
                    return Err(Status::invalid_argument(
                        "a digest covers the whole file and cannot be checked on a range",
                    ));
                }
                Some(ByteRange {
                    start: br.start,
                    end: br.end,
                })
            }
            None => None,
        };
        if !(0..=6).contains(&r.priority) {
            return Err(Status::invalid_argument(format!(
                "priority {} is not a level 0..6",
                r.priority
            )));
        }
        if !r.digest.is_empty() {
            parse_digest(&r.digest)?;
        }
        // The task identity rule (wire::task): a registry blob URL is its digest's task
        // (the one the mirror, preheat and dfcache use); any other URL is the URL's. A given
        // digest is checked, never part of the id.
        let opts = TaskIdOptions {
            tag: &r.tag,
            application: &r.application,
            piece_length: r.piece_length,
            filtered_query_params: &r.filtered_query_params,
        };
        let id = TaskId::for_download(&url, &r.digest, &opts)
            .map_err(|e| Status::invalid_argument(format!("url {url:?}: {e}")))?;
        let content = wire::task::content_digest(&url, &r.digest)
            .map_err(|e| Status::invalid_argument(format!("url {url:?}: {e}")))?;
        // The whole file is checked against the content digest, also when only the blob
        // URL names it (a range has no digest to check).
        let digest = match (&content, &range) {
            (Some(d), None) => Some(parse_digest(d)?),
            _ => None,
        };
        if r.piece_length != 0 && wire::PieceLayout::new(0, r.piece_length).is_err() {
            return Err(Status::invalid_argument(format!(
                "piece length {} is out of range",
                r.piece_length
            )));
        }
        // Checked at the origin only when the task is content-addressed (a blob URL): then
        // the content is what the id names for everyone. A user's --digest on any other URL
        // is this request's own check (on delivery), not a claim about the URL's task that
        // could fail other clients of it.
        let origin_check = wire::task::blob_url_digest(&url);
        let s3 = match &r.object_storage {
            Some(o) => crate::s3::S3Request::from_proto(o)
                .map_err(|e| Status::invalid_argument(format!("object storage settings: {e}")))?,
            None => None,
        };
        if s3.is_some() && !crate::s3::is_s3(&url) {
            return Err(Status::invalid_argument(
                "object storage settings are for s3:// URLs only",
            ));
        }
        let spec = TaskSpec {
            id,
            url,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            piece_length: r.piece_length,
            back_to_source: false,
            disable_back_to_source: r.disable_back_to_source,
            rate_limit: r.rate_limit,
            scheduler: None,
            priority: r.priority,
            digest: origin_check,
            s3,
        };
        let rx = self.tasks.start_or_join(spec);
        match range {
            Some(range) => Ok(Response::new(range_stream(
                self.storage.clone(),
                id,
                rx,
                output,
                range,
            ))),
            None => Ok(Response::new(progress_stream(
                id,
                rx,
                output,
                digest,
                self.delivery(),
            ))),
        }
    }

    type ExportTaskStream = ProgressStream;

    async fn import_task(
        &self,
        req: Request<ImportTaskRequest>,
    ) -> Result<Response<ImportTaskResponse>, Status> {
        let r = req.into_inner();
        if r.piece_length != 0 && wire::PieceLayout::new(0, r.piece_length).is_err() {
            return Err(Status::invalid_argument(format!(
                "piece length {} is out of range",
                r.piece_length
            )));
        }
        let imp = crate::cache::import(
            &self.cache,
            PathBuf::from(&r.path),
            cache_key(r.cid),
            r.piece_length,
        )
        .await?;
        Ok(Response::new(ImportTaskResponse {
            task_id: imp.id.to_hex(),
            cid: imp.cid,
            content_length: imp.layout.content_length(),
            piece_count: imp.layout.piece_count(),
            scheduler: imp.scheduler.unwrap_or_default(),
        }))
    }

    async fn export_task(
        &self,
        req: Request<ExportTaskRequest>,
    ) -> Result<Response<Self::ExportTaskStream>, Status> {
        let r = req.into_inner();
        let output = check_output(&r.output)?;
        let key = cache_key(r.cid);
        let digest = if r.digest.is_empty() {
            None
        } else {
            Some(parse_digest(&r.digest)?)
        };
        let spec = crate::cache::export_spec(&self.cache, &key, r.rate_limit).await?;
        let id = spec.id;
        let rx = self.tasks.start_or_join(spec);
        Ok(Response::new(progress_stream(
            id,
            rx,
            output,
            digest,
            self.delivery(),
        )))
    }

    async fn stat_task(
        &self,
        req: Request<StatTaskRequest>,
    ) -> Result<Response<StatTaskResponse>, Status> {
        let key = cache_key(req.into_inner().cid);
        let id = key.task_id()?;
        let mut resp = StatTaskResponse {
            task_id: id.to_hex(),
            ..Default::default()
        };
        if let Some(s) = self.storage.get(&id) {
            let l = s.layout();
            resp.local = true;
            resp.local_complete = s.is_complete();
            resp.local_finished_pieces = s.finished_count();
            resp.content_length = l.content_length();
            resp.piece_count = l.piece_count();
            resp.piece_length = l.piece_length();
        }
        match crate::cache::scheduler_stat(&self.cache, &id).await {
            Ok(Some(info)) => {
                resp.in_scheduler = true;
                if let Some(m) = &info.metadata {
                    if !resp.local {
                        resp.content_length = m.content_length;
                        resp.piece_length = m.piece_length;
                        resp.piece_count = info.piece_count;
                    }
                }
                resp.peers = info
                    .peers
                    .into_iter()
                    .map(|p| StatPeer {
                        host_id: p.host_id,
                        finished_pieces: p.finished_pieces,
                        done: p.done,
                    })
                    .collect();
            }
            Ok(None) => {}
            Err(e) => resp.scheduler_error = e.to_string(),
        }
        Ok(Response::new(resp))
    }

    async fn delete_task(
        &self,
        req: Request<DeleteTaskRequest>,
    ) -> Result<Response<DeleteTaskResponse>, Status> {
        let id = cache_key(req.into_inner().cid).task_id()?;
        let d = crate::cache::delete(&self.cache, &id).await?;
        Ok(Response::new(DeleteTaskResponse {
            task_id: id.to_hex(),
            removed: d.held,
            scheduler_told: d.told,
            scheduler_error: d.errors,
        }))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        use dataplane::Counters as C;
        let c = &self.counters;
        let shaping = self.shaping.config();
        Ok(Response::new(StatsResponse {
            bytes_from_origin: C::get(&c.bytes_from_origin),
            bytes_from_seed: C::get(&c.bytes_from_seed),
            bytes_from_peers: C::get(&c.bytes_from_peers),
            bytes_uploaded: C::get(&c.bytes_uploaded),
            pieces_uploaded: C::get(&c.pieces_uploaded),
            first_copies_uploaded: C::get(&c.first_copies_uploaded),
            pieces_downloaded: C::get(&c.pieces_downloaded),
            pieces_corrupt: C::get(&c.pieces_corrupt),
            pieces_forged: C::get(&c.pieces_forged),
            digest_waits: C::get(&c.digest_waits),
            digest_wait_timeouts: C::get(&c.digest_wait_timeouts),
            tasks: self.storage.len() as u64,
            upload_rate_limit: shaping.upload,
            download_rate_limit: shaping.download,
            per_peer_upload_rate_limit: shaping.per_peer_upload,
            per_peer_download_rate_limit: shaping.per_peer_download,
            shaping_waits: C::get(&c.shaping_waits),
            max_requests_in_flight: C::get(&c.max_requests_in_flight),
            pieces_in_flight: self
                .shaping
                .pieces_in_flight()
                .unwrap_or(self.pieces_in_flight) as u64,
            config_version: self
                .config_version
                .load(std::sync::atomic::Ordering::Relaxed),
            schedulers: self.schedulers.addrs(),
        }))
    }
}

fn url_check(u: &str) -> Result<String, Status> {
    let parsed =
        url::Url::parse(u).map_err(|e| Status::invalid_argument(format!("url {u:?}: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => Ok(u.to_string()),
        "s3" => crate::s3::parse(u, false)
            .map(|_| u.to_string())
            .map_err(Status::invalid_argument),
        s => Err(Status::invalid_argument(format!(
            "url scheme {s:?} is not supported (http, https, s3)"
        ))),
    }
}

/// The answer to a client whose download failed: the failure's gRPC code (the one mapping,
/// [`DownloadError::grpc_code`]; `dfget`'s exit code follows from it) and its message.
fn status(e: &DownloadError) -> Status {
    Status::new(e.grpc_code(), e.to_string())
}

fn progress_stream(
    id: TaskId,
    rx: watch::Receiver<TaskState>,
    output: PathBuf,
    digest: Option<[u8; 32]>,
    how: Delivery,
) -> ProgressStream {
    enum St {
        Watching(watch::Receiver<TaskState>, bool),
        End,
    }
    let stream = futures::stream::unfold(St::Watching(rx, true), move |st| {
        let output = output.clone();
        async move {
            let St::Watching(mut rx, first) = st else {
                return None;
            };
            if !first && rx.changed().await.is_err() {
                let item = Err(status(&ended_without_result()));
                return Some((item, St::End));
            }
            let state = rx.borrow_and_update().clone();
            match state {
                TaskState::Running(p) => {
                    Some((Ok(to_proto(&id, &p, false)), St::Watching(rx, false)))
                }
                TaskState::Failed(e) => Some((Err(status(&e)), St::End)),
                TaskState::Done(store, p) => {
                    let len = store.layout().content_length();
                    let res = match TaskReader::new(store, rx, 0..len) {
                        Ok(reader) => {
                            let reader = match digest {
                                Some(want) => reader.expect_sha256(want),
                                None => reader,
                            };
                            reader
                                .copy_to_file(&output, how)
                                .await
                                .map_err(DownloadError::from)
                        }
                        Err(e) => Err(e),
                    };
                    let item = res.map(|_| to_proto(&id, &p, true)).map_err(|e| status(&e));
                    Some((item, St::End))
                }
            }
        }
    });
    Box::pin(stream)
}

/// Progress of a range download: the task's progress while the range's pieces arrive, then
/// one done message once exactly the range's bytes are in `output` (the rest of the task
/// keeps downloading in the background, so its pieces are there for later).
fn range_stream(
    storage: Arc<Storage>,
    id: TaskId,
    rx: watch::Receiver<TaskState>,
    output: PathBuf,
    range: ByteRange,
) -> ProgressStream {
    let (tx, out_rx) = tokio::sync::mpsc::channel(16);
    let mut progress_rx = rx.clone();
    tokio::spawn(async move {
        let mut waiter = rx;
        let waiting = async {
            let store = wait_store(&storage, &id, &mut waiter).await?;
            let r = range
                .resolve(store.layout().content_length())
                .map_err(DownloadError::BadRequest)?;
            let mut reader = TaskReader::new(store, waiter, r)?;
            reader.wait_all().await?;
            Ok::<_, DownloadError>(reader)
        };
        tokio::pin!(waiting);
        let found = loop {
            tokio::select! {
                r = &mut waiting => break r,
                changed = progress_rx.changed() => {
                    if changed.is_err() {
                        // Only the waiter decides now.
                        break (&mut waiting).await;
                    }
                    let state = progress_rx.borrow_and_update().clone();
                    if let TaskState::Running(p) = state {
                        if tx.send(Ok(to_proto(&id, &p, false))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let item = match found {
            Err(e) => Err(status(&e)),
            Ok(reader) => {
                let store = reader.store().clone();
                let p = Progress {
                    content_length: Some(store.layout().content_length()),
                    piece_count: store.layout().piece_count(),
                    finished_pieces: store.finished_count(),
                    completed_length: store.completed_length(),
                    ..match &*progress_rx.borrow() {
                        TaskState::Running(p) | TaskState::Done(_, p) => p.clone(),
                        TaskState::Failed(_) => Progress::default(),
                    }
                };
                reader
                    .copy_to_file(&output, Delivery::Copy)
                    .await
                    .map(|len| {
                        let mut m = to_proto(&id, &p, true);
                        m.output_length = len;
                        m
                    })
                    .map_err(|e| status(&DownloadError::from(e)))
            }
        };
        let _ = tx.send(item).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))
}

#[cfg(test)]
mod tests;
