//! `scheduler`: Damselfly's scheduler process. All logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use damselfly_scheduler::{init_tracing, run, Config};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Damselfly scheduler: picks parents for peers, triggers seed peers.
#[derive(Debug, Parser)]
#[command(name = "scheduler", version)]
struct Args {
    /// YAML configuration file (every key has a default).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// gRPC listen address; overrides `server.listen` (default 0.0.0.0:8002).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Manager gRPC address host:port; overrides `manager.addr` (default: no manager).
    #[arg(long, value_name = "ADDR")]
    manager: Option<String>,
    /// IP daemons reach this scheduler on, registered with the manager; overrides
    /// `manager.advertise_ip` (default: the listen IP, or the one that reaches the manager).
    #[arg(long, value_name = "IP")]
    advertise_ip: Option<std::net::IpAddr>,
    /// Serve Prometheus metrics (`/metrics`, `/healthy`) on this address; sets
    /// `metrics.enable` and `metrics.listen` (Dragonfly's port: 8000).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Tokio worker threads; overrides `server.worker_threads` (default: one per CPU).
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    let config = match args.config.as_deref().map(Config::load).transpose() {
        Ok(config) => config.unwrap_or_default(),
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = Config {
        server: damselfly_scheduler::ServerConfig {
            listen: args.listen.unwrap_or(config.server.listen),
            ..config.server.clone()
        },
        ..config
    };
    if let Some(addr) = args.manager {
        config.manager.addr = addr;
    }
    if let Some(addr) = args.metrics {
        config.metrics.enable = true;
        config.metrics.listen = addr;
    }
    if let Some(ip) = args.advertise_ip {
        config.manager.advertise_ip = ip.to_string();
    }
    if let Some(n) = args.worker_threads {
        config.server.worker_threads = n;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if config.server.worker_threads > 0 {
        builder.worker_threads(config.server.worker_threads);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
