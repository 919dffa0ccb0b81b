//! dfdaemon: the Damselfly daemon running on every host (peer, or seed peer with `--seed`).

use clap::Parser;
use controlplane::{Daemon, DaemonConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command-line flags; each overrides the matching key of the config file.
#[derive(Parser, Debug)]
#[command(
    name = "dfdaemon",
    version,
    about = "Damselfly daemon: P2P peer (or seed peer) of a host"
)]
struct Args {
    /// YAML config file (see the controlplane README for every key and its default).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Run as a seed peer (seed_peer.enable).
    #[arg(long)]
    seed: bool,
    /// Scheduler address host:port (scheduler.addrs); repeat for several.
    #[arg(long = "scheduler")]
    schedulers: Vec<String>,
    /// Storage directory (storage.dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Local API Unix socket (local_api.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Data-plane TCP port (data_plane.listen's port; 0 picks a free one).
    #[arg(long)]
    data_port: Option<u16>,
    /// IP advertised to other peers (host.ip).
    #[arg(long)]
    ip: Option<String>,
    /// Host id (host.id).
    #[arg(long)]
    host_id: Option<String>,
    /// Metrics address (metrics.listen); an empty string disables it.
    #[arg(long)]
    metrics: Option<String>,
    /// Manager address host:port (manager.addrs); repeat for several.
    #[arg(long = "manager")]
    managers: Vec<String>,
    /// Data-plane threads (data_plane.threads; 0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Serve the registry mirror proxy on this address (proxy.enable + proxy.listen).
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// Default upstream registry of the proxy, e.g. https://index.docker.io
    /// (proxy.registry_mirror).
    #[arg(long)]
    registry_mirror: Option<String>,
}

fn main() -> std::process::ExitCode {
    damselfly_cli::init_logs("info");
    damselfly_cli::raise_nofile_limit();
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfdaemon: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    if args.seed {
        cfg.seed_peer.enable = true;
    }
    if !args.schedulers.is_empty() {
        cfg.scheduler.addrs = args.schedulers;
    }
    if let Some(d) = args.data_dir {
        cfg.storage.dir = d;
    }
    if let Some(s) = args.socket {
        cfg.local_api.socket = s;
    }
    if let Some(p) = args.data_port {
        cfg.data_plane.listen = SocketAddr::new(cfg.data_plane.listen.ip(), p);
    }
    if let Some(ip) = args.ip {
        cfg.host.ip = ip;
    }
    if let Some(id) = args.host_id {
        cfg.host.id = id;
    }
    if let Some(m) = args.metrics {
        cfg.metrics.listen = m;
    }
    if !args.managers.is_empty() {
        cfg.manager.addrs = args.managers;
    }
    if let Some(t) = args.threads {
        cfg.data_plane.threads = t;
    }
    if let Some(addr) = args.proxy {
        cfg.proxy.enable = true;
        cfg.proxy.listen = addr;
    }
    if let Some(u) = args.registry_mirror {
        cfg.proxy.registry_mirror = u;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("controlplane")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let daemon = Daemon::start(cfg)?;
        daemon.run(shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
