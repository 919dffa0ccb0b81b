//! What one run needs from the rest of the daemon, behind narrow traits: the schedulers
//! ([`Schedulers`]: register, the `AnnouncePeer` response stream as a boxed `Stream`), the
//! data plane ([`DataPlaneLink`]: download, add parents, cancel; its events come over the
//! run's own channel), and the origin ([`Origin`]: everything missing, or some pieces).
//! The real ones are [`SchedulerClient`], [`BridgeLink`] and [`OriginClient`] (the daemon
//! composes them); the unit tests of `TaskRun` build fakes (no sockets, no processes).

use crate::metrics::ControlStats;
use crate::origin::{self, OriginClient, OriginError, PieceSink};
use crate::scheduler::{SchedulerClient, SchedulerError};
use crate::store::MetaStore;
use crate::task::TaskSpec;
use dataplane::{Bridge, Command, Storage, TaskStore};
use futures::Stream;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use wire::proto::scheduler::{AnnouncePeerRequest, AnnouncePeerResponse, Host};
use wire::{PieceLayout, TaskId};

/// A boxed future that can cross threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The scheduler's answers on one `AnnouncePeer` stream; it ends (`None`) when the stream
/// does.
pub type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<AnnouncePeerResponse, tonic::Status>> + Send>>;

/// The schedulers a run registers with.
pub trait Schedulers: Send + Sync {
    /// The addresses of the schedulers of task `id`, in the order to try them.
    fn ordered(&self, id: &TaskId) -> Vec<String>;
    /// Opens an `AnnouncePeer` stream of task `id` with scheduler `addr`: `requests` are the
    /// messages to it (the first one registers). The error says which scheduler and why.
    fn announce_peer(
        &self,
        id: TaskId,
        addr: String,
        requests: ReceiverStream<AnnouncePeerRequest>,
    ) -> BoxFuture<'_, Result<ResponseStream, SchedulerError>>;
    /// Tells the task's scheduler this host holds task `id` completely (no stream open).
    fn announce_complete(&self, id: TaskId, layout: PieceLayout) -> BoxFuture<'_, ()>;
}

/// The data plane, as a run commands it.
pub trait DataPlaneLink: Send + Sync {
    /// Sends `cmd` about `task` to the data-plane thread that runs the task; fails when its
    /// queue is full.
    fn send(&self, task: &TaskId, cmd: Command) -> Result<(), CommandRefused>;
}

/// The data plane did not take a command (its queue is full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("data plane command queue is full")]
pub struct CommandRefused;

/// The origin of a task.
pub trait Origin: Send + Sync {
    /// Fetches every missing piece of `spec` into `existing` (or a new store, created once
    /// the size is known, given to `sink.layout`), reporting each piece to `sink`. Returns
    /// the complete store.
    fn fetch<'a>(
        &'a self,
        spec: &'a TaskSpec,
        existing: Option<Arc<TaskStore>>,
        sink: &'a mut (dyn PieceSink + Send),
    ) -> BoxFuture<'a, Result<Arc<TaskStore>, OriginError>>;
    /// Fetches the pieces numbered in `pieces` that `store` lacks, reporting each to `sink`.
    fn fetch_pieces<'a>(
        &'a self,
        spec: &'a TaskSpec,
        store: Arc<TaskStore>,
        pieces: &'a [u32],
        sink: &'a mut (dyn PieceSink + Send),
    ) -> BoxFuture<'a, Result<(), OriginError>>;
}

/// The settings of the daemon's config a run reads.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// `scheduler.schedule_timeout`: wait for parents before going back to source.
    pub schedule_timeout: Duration,
    /// `download.stall_timeout`: a running download that stores no piece for this long asks
    /// for parents again (then goes to the origin).
    pub stall_timeout: Duration,
    /// `data_plane.verify_pieces`: check pieces from parents against the scheduler's digests.
    pub verify_pieces: bool,
}

/// Everything one run uses.
#[derive(Clone)]
pub struct RunServices {
    /// The schedulers.
    pub schedulers: Arc<dyn Schedulers>,
    /// The data plane.
    pub dataplane: Arc<dyn DataPlaneLink>,
    /// The origin.
    pub origin: Arc<dyn Origin>,
    /// Task storage.
    pub storage: Arc<Storage>,
    /// Task metadata that survives restarts (a finished task is recorded there).
    pub meta: Arc<MetaStore>,
    /// Control-plane counters.
    pub stats: Arc<ControlStats>,
    /// This host as announced to schedulers.
    pub host: Host,
    /// Config the run reads.
    pub settings: RunSettings,
}

impl std::fmt::Debug for RunServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunServices")
            .field("host", &self.host.id)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The daemon's schedulers (replaced at run time when the manager names others).
impl Schedulers for SchedulerClient {
    fn ordered(&self, id: &TaskId) -> Vec<String> {
        let pool = self.pool();
        pool.ordered(id).into_iter().map(|(a, _)| a).collect()
    }

    fn announce_peer(
        &self,
        id: TaskId,
        addr: String,
        requests: ReceiverStream<AnnouncePeerRequest>,
    ) -> BoxFuture<'_, Result<ResponseStream, SchedulerError>> {
        Box::pin(async move {
            let resp = SchedulerClient::announce_peer(self, &id, &addr, requests).await?;
            Ok(Box::pin(resp) as ResponseStream)
        })
    }

    fn announce_complete(&self, id: TaskId, layout: PieceLayout) -> BoxFuture<'_, ()> {
        Box::pin(SchedulerClient::announce_complete(self, id, layout))
    }
}

/// The plane bridge.
#[derive(Debug)]
pub struct BridgeLink(pub Arc<Bridge>);

impl DataPlaneLink for BridgeLink {
    fn send(&self, task: &TaskId, cmd: Command) -> Result<(), CommandRefused> {
        let bridge = &self.0;
        bridge
            .send(bridge.thread_of(task), cmd)
            .map_err(|_| CommandRefused)
    }
}

/// HTTP(S) and object-storage origins.
impl Origin for OriginClient {
    fn fetch<'a>(
        &'a self,
        spec: &'a TaskSpec,
        existing: Option<Arc<TaskStore>>,
        sink: &'a mut (dyn PieceSink + Send),
    ) -> BoxFuture<'a, Result<Arc<TaskStore>, OriginError>> {
        Box::pin(origin::fetch(self, spec, existing, sink))
    }

    fn fetch_pieces<'a>(
        &'a self,
        spec: &'a TaskSpec,
        store: Arc<TaskStore>,
        pieces: &'a [u32],
        sink: &'a mut (dyn PieceSink + Send),
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        Box::pin(origin::fetch_pieces(self, spec, store, pieces, sink))
    }
}
