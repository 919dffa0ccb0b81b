//! The gRPC service: thin glue between tonic streams and [`SchedulerState`].
//!
//! Each open stream owns a bounded channel; the state's [`Output`]s are delivered with
//! `try_send` under the state lock, so a slow or vanished daemon never blocks the scheduler:
//! if its channel is full or closed, its peer (or host) is dropped instead, and its stream
//! ends with an error status. A guard inside each response stream tells the state when tonic
//! drops the stream (the client went away).
//!
//! An `AnnouncePeer` call costs one task: its response stream ([`PeerStream`]) also reads
//! the call's requests whenever the HTTP/2 stream task polls it, so a message from the daemon
//! wakes that one task, which updates the state and usually returns the answer in the same
//! poll (no reader task, no hop through a second task per message).
//!
//! Files: this one holds the service and the stream table; `service/outbound.rs` the
//! per-stream outbox and its drop guard; `service/peer_stream.rs` the `AnnouncePeer` stream.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use wire::proto::scheduler::scheduler_server::{Scheduler, SchedulerServer};
use wire::proto::scheduler::{
    AnnounceHostRequest, AnnouncePeerRequest, AnnouncePeerResponse, AnnounceTaskRequest,
    AnnounceTaskResponse, Host, HostCommand, LeaveTaskRequest, LeaveTaskResponse, StatTaskRequest,
    TaskInfo, TaskSource,
};

mod outbound;
mod peer_stream;

use crate::config::SchedulingConfig;
use crate::state::{HostKey, InvalidRequest, Output, PeerKey, PreheatStatus, SchedulerState};
use outbound::{channel, Guard, GuardedStream, Outbound, Slot};
pub use peer_stream::PeerStream;

/// Messages buffered per `AnnouncePeer` stream before the peer counts as stuck and is dropped.
/// A burst of first-piece pushes to one peer is bounded by `parent_limit`, so this is ample.
pub const PEER_CHANNEL_CAPACITY: usize = 64;
/// Commands buffered per `AnnounceHost` stream before the host counts as stuck.
pub const HOST_CHANNEL_CAPACITY: usize = 64;
/// How often piece digests reported since the last push are pushed to the task's peers
/// (`SchedulerState::flush_digests`); a full batch goes at once. Peers hold a piece whose
/// digest has not come yet, so this bounds that wait.
pub const DIGEST_FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// Pushes pending piece digests every `every` while the service lives.
async fn flush_digests_every(shared: std::sync::Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut inner = shared.inner.lock();
        let outputs = inner.state.flush_digests();
        if !outputs.is_empty() {
            inner.dispatch(outputs);
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long shutdown waits for connections to close after ending every stream.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// HTTP/2 pings detect daemons that vanished without closing their connection.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
/// TCP keepalive on accepted connections, for the same reason at the kernel level.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 receive window of one connection. Besides flow control it sets h2's budget of
/// small DATA frames not yet read by the service (half of it, counted as 256 bytes minus
/// each frame's size): a daemon's `PieceFinished` reports are ~10-byte frames, and with
/// hyper's default 1 MiB window ~2,100 of them waiting on one connection (625 peers with
/// three or four each, while the scheduler is behind) made h2 close the whole connection
/// with `ENHANCE_YOUR_CALM` ("too_many_data_frames"), dropping every peer on it. 8 MiB
/// allows ~17,000.
const CONNECTION_WINDOW: u32 = 8 << 20;
/// HTTP/2 receive window of one stream (the protocol's default). Bounds what one peer can
/// leave unread against the connection's budget (~6,000 reports, ~1.5 MB of it), e.g. a
/// daemon that stopped reading its answers while still reporting.
const STREAM_WINDOW: u32 = 64 << 10;

/// Everything behind the lock: the state and the open streams.
struct Inner {
    state: SchedulerState,
    peers: HashMap<PeerKey, Slot<AnnouncePeerResponse>>,
    hosts: HashMap<HostKey, Slot<HostCommand>>,
    /// Set by shutdown: new streams are refused.
    closed: bool,
}

impl Inner {
    /// Delivers outputs without blocking; a stream that cannot take its message is dropped,
    /// which may produce more outputs (delivered in the same loop).
    fn dispatch(&mut self, outputs: Vec<Output>) {
        let mut queue = VecDeque::from(outputs);
        while let Some(output) = queue.pop_front() {
            crate::metrics::output(&output);
            match output {
                Output::Peer { peer, response } => {
                    let sent = self
                        .peers
                        .get(&peer)
                        .is_some_and(|slot| slot.tx.try_send(Box::new(response)).is_ok());
                    if !sent {
                        crate::metrics::error("stream_full");
                        warn!(?peer, "peer stream full or closed; dropping the peer");
                        if let Some(slot) = self.peers.remove(&peer) {
                            slot.close(Some(Status::resource_exhausted(
                                "peer too slow to read scheduler messages",
                            )));
                        }
                        queue.extend(self.state.peer_left(peer));
                    }
                }
                Output::Host { host, command } => {
                    let sent = self
                        .hosts
                        .get(&host)
                        .is_some_and(|slot| slot.tx.try_send(Box::new(command)).is_ok());
                    if !sent {
                        warn!(?host, "host stream full or closed; dropping the host");
                        if let Some(slot) = self.hosts.remove(&host) {
                            slot.close(Some(Status::resource_exhausted(
                                "host too slow to read scheduler commands",
                            )));
                        }
                        queue.extend(self.state.host_left(host));
                    }
                }
                Output::ClosePeer { peer, reason } => {
                    if let Some(slot) = self.peers.remove(&peer) {
                        slot.close(Some(Status::aborted(reason)));
                    }
                }
            }
        }
    }

    /// The peer's stream is over: end it (if still open) and forget the peer.
    fn peer_gone(&mut self, key: PeerKey, status: Option<Status>) {
        if let Some(slot) = self.peers.remove(&key) {
            slot.close(status);
        }
        let outputs = self.state.peer_left(key);
        self.dispatch(outputs);
    }

    /// The host's stream is over: end it (if still open) and forget the host.
    fn host_gone(&mut self, key: HostKey, status: Option<Status>) {
        if let Some(slot) = self.hosts.remove(&key) {
            slot.close(status);
        }
        let outputs = self.state.host_left(key);
        self.dispatch(outputs);
    }
}

struct Shared {
    inner: Mutex<Inner>,
    next_key: AtomicU64,
}

impl Shared {
    fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }
}

/// The `Scheduler` gRPC service. Cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct SchedulerService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SchedulerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerService").finish_non_exhaustive()
    }
}

impl SchedulerService {
    /// A service over an empty state.
    pub fn new(config: SchedulingConfig) -> Self {
        Self::with_state(SchedulerState::new(config))
    }

    /// A service over `state` (e.g. one with a fixed random seed).
    pub fn with_state(state: SchedulerState) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    state,
                    peers: HashMap::new(),
                    hosts: HashMap::new(),
                    closed: false,
                }),
                next_key: AtomicU64::new(1),
            }),
        }
    }

    /// Ends every open stream with `UNAVAILABLE` and refuses new ones, so that a graceful
    /// server shutdown does not wait on daemons' long-lived streams.
    pub fn shutdown(&self) {
        let mut inner = self.shared.inner.lock();
        inner.closed = true;
        for (_, slot) in inner.peers.drain() {
            slot.close(Some(Status::unavailable("scheduler shutting down")));
        }
        for (_, slot) in inner.hosts.drain() {
            slot.close(Some(Status::unavailable("scheduler shutting down")));
        }
    }

    /// The scheduling knobs in force.
    pub fn scheduling_config(&self) -> SchedulingConfig {
        self.shared.inner.lock().state.config().clone()
    }

    /// Replaces the scheduling knobs at run time (the manager's dynamic config); refuses an
    /// invalid config and keeps the current one.
    pub fn set_scheduling_config(&self, config: SchedulingConfig) -> anyhow::Result<()> {
        config.validate()?;
        self.shared.inner.lock().state.set_config(config);
        Ok(())
    }

    /// Starts a preheat of `task_id` (see [`SchedulerState::preheat`]): triggers a seed
    /// host unless a peer holds or fetches the task. Call [`Self::preheat_finished`] once
    /// the caller stops waiting, whatever the outcome.
    pub fn preheat(
        &self,
        task_id: &str,
        source: TaskSource,
    ) -> Result<PreheatStatus, InvalidRequest> {
        let mut inner = self.shared.inner.lock();
        let (status, outputs) = inner.state.preheat(task_id, source, 0)?;
        inner.dispatch(outputs);
        // Delivery may have dropped the triggered seed's host stream: ask again.
        let status = match status {
            PreheatStatus::Pending => inner.state.preheat_status(task_id),
            other => other,
        };
        Ok(status)
    }

    /// Where the preheat of `task_id` stands (see [`SchedulerState::preheat_status`]).
    pub fn preheat_status(&self, task_id: &str) -> PreheatStatus {
        self.shared.inner.lock().state.preheat_status(task_id)
    }

    /// One preheat of `task_id` is over (see [`SchedulerState::preheat_finished`]).
    pub fn preheat_finished(&self, task_id: &str) {
        self.shared.inner.lock().state.preheat_finished(task_id);
    }

    /// Picks the hosts of a scoped preheat of `task_id` (see
    /// [`SchedulerState::preheat_hosts`]) and has those that neither hold nor fetch it
    /// download it from peers. Returns the chosen hosts.
    pub fn preheat_scope(
        &self,
        task_id: &str,
        seeds_only: bool,
        ips: &[String],
        count: u32,
        percentage: u32,
    ) -> Vec<Host> {
        let mut inner = self.shared.inner.lock();
        let hosts = inner
            .state
            .preheat_hosts(task_id, seeds_only, ips, count, percentage);
        let ids: Vec<String> = hosts.iter().map(|h| h.id.clone()).collect();
        let (_, outputs) = inner.state.preheat_on_hosts(task_id, &ids);
        inner.dispatch(outputs);
        hosts
    }

    /// Whether a peer of host `host_id` holds all of `task_id`.
    pub fn host_holds(&self, task_id: &str, host_id: &str) -> bool {
        self.shared.inner.lock().state.host_holds(task_id, host_id)
    }

    /// Hosts whose peer holds all of `task_id`.
    pub fn holders(&self, task_id: &str) -> Vec<Host> {
        let inner = self.shared.inner.lock();
        inner
            .state
            .preheat_hosts(task_id, false, &[], 0, 0)
            .into_iter()
            .filter(|h| inner.state.host_holds(task_id, &h.id))
            .collect()
    }

    /// Hosts, tasks and peers in the swarm state (for the metrics gauges).
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.shared.inner.lock();
        let s = &inner.state;
        (s.host_count(), s.task_count(), s.peer_count())
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> SchedulerServer<Self> {
        SchedulerServer::new(self)
    }

    fn refuse_if_closed(inner: &Inner) -> Result<(), Status> {
        if inner.closed {
            Err(Status::unavailable("scheduler shutting down"))
        } else {
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type AnnounceHostStream = Outbound<HostCommand>;
    type AnnouncePeerStream = PeerStream;

    async fn announce_host(
        &self,
        request: Request<AnnounceHostRequest>,
    ) -> Result<Response<Self::AnnounceHostStream>, Status> {
        let host = request
            .into_inner()
            .host
            .ok_or_else(|| Status::invalid_argument("host is required"))?;
        let key = HostKey(self.shared.next_key());
        let (slot, stream) = channel(HOST_CHANNEL_CAPACITY, || Guard {
            shared: self.shared.clone(),
            stream: GuardedStream::Host(key),
        });
        let registered = {
            let mut inner = self.shared.inner.lock();
            Self::refuse_if_closed(&inner).and_then(|()| {
                inner
                    .state
                    .host_announced(key, host)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                inner.hosts.insert(key, slot);
                Ok(())
            })
        };
        // On error the stream (and its guard, which takes the lock) is dropped here, after
        // the lock was released.
        registered.map(|()| Response::new(stream))
    }

    async fn announce_peer(
        &self,
        request: Request<Streaming<AnnouncePeerRequest>>,
    ) -> Result<Response<Self::AnnouncePeerStream>, Status> {
        Self::refuse_if_closed(&self.shared.inner.lock())?;
        let key = PeerKey(self.shared.next_key());
        let (slot, outbound) = channel(PEER_CHANNEL_CAPACITY, || Guard {
            shared: self.shared.clone(),
            stream: GuardedStream::Peer(key),
        });
        // Answer at once: the registration is read when tonic polls the response stream, so
        // a client that only sends its first message after the call returns works too.
        Ok(Response::new(PeerStream {
            outbound,
            inbound: Some(request.into_inner()),
            unregistered: Some(slot),
            shared: self.shared.clone(),
            key,
        }))
    }

    async fn stat_task(
        &self,
        request: Request<StatTaskRequest>,
    ) -> Result<Response<TaskInfo>, Status> {
        let task_id = request.into_inner().task_id;
        let info = self.shared.inner.lock().state.stat_task(&task_id);
        info.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("task {task_id} not found")))
    }

    async fn announce_task(
        &self,
        request: Request<AnnounceTaskRequest>,
    ) -> Result<Response<AnnounceTaskResponse>, Status> {
        let key = PeerKey(self.shared.next_key());
        let mut inner = self.shared.inner.lock();
        Self::refuse_if_closed(&inner)?;
        let outputs = inner
            .state
            .announce_task(key, request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        inner.dispatch(outputs);
        Ok(Response::new(AnnounceTaskResponse {}))
    }

    async fn leave_task(
        &self,
        request: Request<LeaveTaskRequest>,
    ) -> Result<Response<LeaveTaskResponse>, Status> {
        let r = request.into_inner();
        if r.task_id.is_empty() || r.host_id.is_empty() {
            return Err(Status::invalid_argument("task_id and host_id are required"));
        }
        let mut inner = self.shared.inner.lock();
        let (peers, outputs) = inner.state.leave_task(&r.task_id, &r.host_id);
        inner.dispatch(outputs);
        Ok(Response::new(LeaveTaskResponse { peers }))
    }
}

/// Serves the scheduler on `listener` until `shutdown` resolves, then ends every stream and
/// waits (briefly) for connections to close. Logs `scheduler listening on <addr>` once
/// serving.
pub async fn serve(
    listener: TcpListener,
    config: SchedulingConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.validate()?;
    serve_service(listener, SchedulerService::new(config), shutdown).await
}

/// Like [`serve`], with a service made by the caller (who may keep a clone of it, e.g. for
/// the manager client).
pub async fn serve_service(
    listener: TcpListener,
    service: SchedulerService,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_service_tls(listener, service, None, shutdown).await
}

/// Like [`serve_service`], over TLS when `tls` is given (see `wire::tls::grpc_incoming`: a
/// client without a valid certificate, when the config requires one, is refused and
/// logged).
pub async fn serve_service_tls(
    listener: TcpListener,
    service: SchedulerService,
    tls: Option<wire::tls::rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let flusher = tokio::spawn(flush_digests_every(
        std::sync::Arc::downgrade(&service.shared),
        DIGEST_FLUSH_INTERVAL,
    ));
    let _stop_flusher = AbortOnDrop(flusher);
    let closer = service.clone();
    let (fired_tx, fired_rx) = oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        closer.shutdown();
        let _ = fired_tx.send(());
    };
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    info!(
        "scheduler listening on {addr}{}",
        if tls.is_some() { " (TLS)" } else { "" }
    );
    let router = tonic::transport::Server::builder()
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE))
        .add_service(service.into_server());
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            wire::tls::grpc_incoming(incoming, tls, "scheduler"),
            signal,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(incoming, signal)),
    };
    let grace = async {
        if fired_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result?,
        () = grace => warn!("connections still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
    }
    info!("scheduler stopped");
    Ok(())
}
