//! Starting and stopping the data-plane threads.

use crate::bridge::{Bridge, Command};
use crate::counters::Counters;
use crate::fetch::{self, FetchConfig, FetchEnv};
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
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            listen: SocketAddr::from(([0, 0, 0, 0], 4005)),
            queue_capacity: 4096,
            io_uring: true,
            fetch: FetchConfig::default(),
        }
    }
}

/// The running data plane: its threads and the bridge to them.
#[derive(Debug)]
pub struct DataPlane {
    bridge: Arc<Bridge>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<()>>,
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
        let mut handles = Vec::with_capacity(threads);
        for (i, l) in listeners.into_iter().enumerate() {
            let ctx = ThreadContext {
                index: i,
                bridge: bridge.clone(),
                upload: UploadContext {
                    storage: storage.clone(),
                    counters: counters.clone(),
                    shaping: shaping.clone(),
                },
                fetch: FetchEnv {
                    bridge: bridge.clone(),
                    counters: counters.clone(),
                    cfg: cfg.fetch.clone(),
                    shaping: shaping.clone(),
                },
            };
            let uring = cfg.io_uring;
            let h = std::thread::Builder::new()
                .name(format!("dataplane-{i}"))
                .spawn(move || {
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
    }
}

struct ThreadContext {
    index: usize,
    bridge: Arc<Bridge>,
    upload: UploadContext,
    fetch: FetchEnv,
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

async fn thread_main(listener: std::net::TcpListener, ctx: ThreadContext) -> io::Result<()> {
    let listener = monoio::net::TcpListener::from_std(listener)?;
    let upload = ctx.upload.clone();
    monoio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    monoio::spawn(serve_connection(stream, upload.clone()));
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
                monoio::spawn(fetch::start_download(
                    store,
                    parents,
                    rate_limit,
                    ctx.fetch.clone(),
                ));
            }
            Command::AddParents { task, parents } => fetch::add_parents(&task, parents),
            Command::Cancel { task } => fetch::cancel(&task),
            Command::Shutdown => return Ok(()),
        }
    }
}
