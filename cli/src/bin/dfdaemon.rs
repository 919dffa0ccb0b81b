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
    version = damselfly_common::VERSION,
    about = "Damselfly daemon: P2P peer (or seed peer) of a host",
    after_help = "Precedence: config file, then environment variables, then flags. The config file is \
--config, else $DFDAEMON_CONFIG, else /etc/damselfly/dfdaemon.yaml when it exists."
)]
struct Args {
    /// YAML config file (see the controlplane README for every key and its default);
    /// default /etc/damselfly/dfdaemon.yaml when it exists.
    #[arg(short, long, env = "DFDAEMON_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text or json (one JSON object per line).
    #[arg(long, env = "DFDAEMON_LOG_FORMAT", default_value_t = damselfly_common::LogFormat::Text)]
    log_format: damselfly_common::LogFormat,
    /// Write logs to rotated files `dfdaemon.log.<date>` in this directory instead of stderr;
    /// overrides `log.dir`.
    #[arg(long, value_name = "DIR", env = "DFDAEMON_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// When a new log file starts (with --log-dir): hourly, daily (default) or never;
    /// overrides `log.rotation`.
    #[arg(long, env = "DFDAEMON_LOG_ROTATION")]
    log_rotation: Option<damselfly_common::LogRotation>,
    /// Rotated log files kept (with --log-dir), the oldest deleted first; 0 keeps all;
    /// overrides `log.max_files` (default 7).
    #[arg(long, value_name = "N", env = "DFDAEMON_LOG_MAX_FILES")]
    log_max_files: Option<usize>,
    /// Run as a seed peer (seed_peer.enable).
    #[arg(long, env = "DFDAEMON_SEED")]
    seed: bool,
    /// Scheduler address host:port (scheduler.addrs); repeat, or separate with commas.
    #[arg(long = "scheduler", env = "DFDAEMON_SCHEDULER", value_delimiter = ',')]
    schedulers: Vec<String>,
    /// Storage directory (storage.dir).
    #[arg(long, env = "DFDAEMON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Local API Unix socket (local_api.socket).
    #[arg(long, env = "DFDAEMON_SOCKET")]
    socket: Option<PathBuf>,
    /// Data-plane TCP port (data_plane.listen's port; 0 picks a free one).
    #[arg(long, env = "DFDAEMON_DATA_PORT")]
    data_port: Option<u16>,
    /// IP advertised to other peers (host.ip).
    #[arg(long, env = "DFDAEMON_IP")]
    ip: Option<String>,
    /// Host id (host.id).
    #[arg(long, env = "DFDAEMON_HOST_ID")]
    host_id: Option<String>,
    /// Metrics address (metrics.listen); an empty string disables it.
    #[arg(long, env = "DFDAEMON_METRICS")]
    metrics: Option<String>,
    /// Manager address host:port (manager.addrs); repeat, or separate with commas.
    #[arg(long = "manager", env = "DFDAEMON_MANAGER", value_delimiter = ',')]
    managers: Vec<String>,
    /// Data-plane threads (data_plane.threads; 0 = one per core).
    #[arg(long, env = "DFDAEMON_THREADS")]
    threads: Option<usize>,
    /// Serve the registry mirror proxy on this address (proxy.enable + proxy.listen).
    #[arg(long, env = "DFDAEMON_PROXY")]
    proxy: Option<SocketAddr>,
    /// Default upstream registry of the proxy, e.g. https://index.docker.io
    /// (proxy.registry_mirror).
    #[arg(long, env = "DFDAEMON_REGISTRY_MIRROR")]
    registry_mirror: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // The config file first (its `log:` section says where logs go), then the logs.
    let default = damselfly_common::default_config_path("dfdaemon");
    let path = damselfly_common::config_path(args.config.as_deref(), &default);
    let loaded = match path.as_deref().map(DaemonConfig::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dfdaemon: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cfg = loaded.unwrap_or_default();
    let _log_guard = match damselfly_common::init_logs_with(
        "dfdaemon",
        "info",
        &cfg.log.with_overrides(
            args.log_format,
            args.log_dir.clone(),
            args.log_rotation,
            args.log_max_files,
        ),
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("dfdaemon: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(p) = &path {
        tracing::info!("config file {}", p.display());
    }
    damselfly_cli::raise_nofile_limit();
    match run(args, cfg) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfdaemon: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args, mut cfg: DaemonConfig) -> anyhow::Result<()> {
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
        daemon.run(damselfly_common::shutdown_signal()).await
    })
}
