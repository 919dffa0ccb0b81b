//! Starting and stopping the data-plane threads.

use crate::bridge::{Bridge, Command};
use crate::counters::Counters;
use crate::fetch::{self, FetchConfig, FetchEnv};
use crate::hasher::HashWorker;
use crate::quic::{Incoming, QuicConfig, QuicEndpoint};
use crate::seeding::Seeding;
use crate::shaper::Shaping;
use crate::storage::Storage;
use crate::upload::{serve_connection, UploadContext};
use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Settings of the data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Number of data-plane threads (one monoio runtime each); at least 1.
    pub threads: usize,
    /// TCP address of the upload server (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Capacity of each bridge queue.
    pub queue_capacity: usize,
    /// Use io_uring when the kernel has it (else epoll).
    pub io_uring: bool,
    /// Fetcher tunables.
    pub fetch: FetchConfig,
    /// QUIC endpoint (serving and fetching over QUIC); `None`: TCP only.
    pub quic: Option<QuicConfig>,
    /// Super-seed every task served ([`crate::seeding`]), sending at most this many second or
    /// later copies of a task at once: each child sees only pieces that have not left this
    /// daemon yet, until all have. For seed peers, whose uplink is the swarm's source.
    /// `None`: every child sees every stored piece.
    pub super_seed: Option<u32>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            listen: SocketAddr::from(([0, 0, 0, 0], 4005)),
            queue_capacity: 4096,
            io_uring: true,
            fetch: FetchConfig::default(),
            quic: None,
            super_seed: None,
        }
    }
}

/// The running data plane: its threads and the bridge to them.
#[derive(Debug)]
pub struct DataPlane {
    bridge: Arc<Bridge>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
    quic: Option<QuicEndpoint>,
    tids: Arc<std::sync::Mutex<Vec<u32>>>,
}

/// Kernel thread id of the calling thread (from `/proc/thread-self`), for per-thread CPU
/// accounting; `None` where procfs is absent.
pub fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

impl DataPlane {
    /// Binds the data port once per thread (`SO_REUSEPORT`) and starts the threads.
    pub fn start(
        cfg: DataPlaneConfig,
        storage: Arc<Storage>,
        counters: Arc<Counters>,
        shaping: Arc<Shaping>,
    ) -> io::Result<Self> {
        let threads = cfg.threads.max(1);
        let first = bind_reuseport(cfg.listen)?;
        let local_addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(bind_reuseport(local_addr)?);
        }
        let bridge = Arc::new(Bridge::new(threads, cfg.queue_capacity));
        let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (quic, mut incoming) = match &cfg.quic {
            Some(q) => {
                let (ep, rx) = QuicEndpoint::start(q, threads, tids.clone(), counters.clone())?;
                (Some(ep), rx.into_iter().map(Some).collect())
            }
            None => (None, Vec::new()),
        };
        incoming.resize_with(threads, || None);
        let endpoint = quic.as_ref().map(|q| q.endpoint().clone());
        let seeding = cfg.super_seed.map(|slots| Arc::new(Seeding::new(slots)));
        let mut handles = Vec::with_capacity(threads);
        for ((i, l), quic_streams) in listeners.into_iter().enumerate().zip(incoming) {
            let hash_tids = tids.clone();
            let hasher = HashWorker::start(format!("dataplane-hash-{i}"), move || {
                if let (Some(t), Ok(mut v)) = (current_tid(), hash_tids.lock()) {
                    v.push(t);
                }
            })?;
            let ctx = ThreadContext {
                index: i,
                bridge: bridge.clone(),
                upload: UploadContext {
                    storage: storage.clone(),
                    counters: counters.clone(),
                    shaping: shaping.clone(),
                    seeding: seeding.clone(),
                },
                fetch: FetchEnv {
                    bridge: bridge.clone(),
                    counters: counters.clone(),
                    cfg: cfg.fetch.clone(),
                    shaping: shaping.clone(),
                    quic: endpoint.clone(),
                    hasher: Some(Arc::new(hasher)),
                },
                quic_streams,
            };
            let uring = cfg.io_uring;
            let tids = tids.clone();
            let h = std::thread::Builder::new()
                .name(format!("dataplane-{i}"))
                .spawn(move || {
                    if let (Some(t), Ok(mut v)) = (current_tid(), tids.lock()) {
                        v.push(t);
                    }
                    if let Err(e) = run_thread(uring, l, ctx) {
                        tracing::error!("data-plane thread {i} failed: {e}");
                    }
                })?;
            handles.push(h);
        }
        tracing::info!("data plane listening on {local_addr} with {threads} thread(s)");
        Ok(Self {
            bridge,
            local_addr,
            threads: handles,
            quic,
            tids,
        })
    }

    /// The bridge to the threads.
    pub fn bridge(&self) -> &Arc<Bridge> {
        &self.bridge
    }

    /// Address the upload server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Kernel thread ids of the data plane's threads (monoio threads, their piece hashers
    /// and the QUIC thread)
    /// started so far, to account their CPU time (`/proc/self/task/TID/stat`).
    pub fn thread_ids(&self) -> Vec<u32> {
        self.tids.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// UDP address of the QUIC endpoint, when QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().map(QuicEndpoint::local_addr)
    }

    /// Stops every thread and waits for them.
    pub fn shutdown(self) {
        for i in 0..self.bridge.threads() {
            let mut tries = 0;
            while self.bridge.send(i, Command::Shutdown).is_err() && tries < 1000 {
                tries += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for h in self.threads {
            let _ = h.join();
        }
        if let Some(q) = self.quic {
            q.shutdown();
        }
    }
}

struct ThreadContext {
    index: usize,
    bridge: Arc<Bridge>,
    upload: UploadContext,
    fetch: FetchEnv,
    quic_streams: Option<Incoming>,
}

fn run_thread(uring: bool, listener: std::net::TcpListener, ctx: ThreadContext) -> io::Result<()> {
    if uring {
        match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(mut rt) => {
                tracing::debug!(
                    "data-plane thread {} runs on {}",
                    ctx.index,
                    if monoio::utils::detect_uring() {
                        "io_uring"
                    } else {
                        "epoll"
                    }
                );
                return rt.block_on(thread_main(listener, ctx));
            }
            Err(e) => tracing::warn!("io_uring runtime unavailable ({e}); using epoll"),
        }
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(thread_main(listener, ctx))
}

async fn thread_main(listener: std::net::TcpListener, mut ctx: ThreadContext) -> io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(listener)?;
    if let Some(mut streams) = ctx.quic_streams.take() {
        // QUIC streams accepted by the endpoint thread are served here like TCP connections.
        let upload = ctx.upload.clone();
        monoio::spawn(async move {
            use futures::StreamExt;
            while let Some(stream) = streams.next().await {
                Counters::add(&upload.counters.quic_streams_served, 1);
                monoio::spawn(serve_connection(stream, upload.clone()));
            }
        });
    }
    let upload = ctx.upload.clone();
    let tls = ctx.fetch.cfg.tls.clone();
    monoio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match &tls {
                        None => {
                            monoio::spawn(serve_connection(stream, upload.clone()));
                        }
                        Some(tls) => {
                            let (tls, upload) = (tls.clone(), upload.clone());
                            monoio::spawn(async move {
                                match tls.accept(stream).await {
                                    Ok(s) => {
                                        Counters::add(&upload.counters.tls_handshakes, 1);
                                        serve_connection(s, upload).await;
                                    }
                                    // Closed before a byte: a port probe.
                                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                                        tracing::debug!("{peer} closed during the TLS handshake");
                                    }
                                    Err(e) => {
                                        Counters::add(&upload.counters.tls_handshakes_failed, 1);
                                        tracing::warn!(
                                            "data-plane TLS handshake with {peer} failed: {e}"
                                        );
                                    }
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("data-plane accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
    loop {
        let cmd = futures::future::poll_fn(|cx| ctx.bridge.poll_command(ctx.index, cx)).await;
        match cmd {
            Command::Download {
                store,
                parents,
                rate_limit,
            } => {
                fetch::reap();
                fetch::start_download(store, parents, rate_limit, ctx.fetch.clone());
            }
            Command::AddParents { task, parents } => fetch::add_parents(&task, parents),
            Command::Cancel { task } => fetch::cancel(&task),
            Command::Shutdown => return Ok(()),
        }
    }
}
