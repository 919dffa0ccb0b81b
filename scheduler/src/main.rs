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
}

#[tokio::main]
async fn main() -> ExitCode {
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
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
