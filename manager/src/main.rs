//! `manager`: Damselfly's manager process. All logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use damselfly_manager::{init_tracing, run, shutdown_signal, Config};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Damselfly manager: scheduler clusters, keepalive, dynamic config, REST API, preheat.
#[derive(Debug, Parser)]
#[command(name = "manager", version)]
struct Args {
    /// YAML configuration file (every key has a default; unknown keys are errors).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// gRPC listen address; overrides `server.grpc` (default 0.0.0.0:65003).
    #[arg(long, value_name = "ADDR")]
    grpc: Option<SocketAddr>,
    /// REST API and status page listen address; overrides `server.rest` (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    rest: Option<SocketAddr>,
    /// Database URL; overrides `database.url` (default sqlite:///var/lib/damselfly/manager.db).
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Serve Prometheus metrics (`/metrics`, `/healthy`) on this address; sets
    /// `metrics.enable` and `metrics.listen` (Dragonfly's port: 8000).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    let mut config = match args.config.as_deref().map(Config::load).transpose() {
        Ok(config) => config.unwrap_or_default(),
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(a) = args.grpc {
        config.server.grpc = a;
    }
    if let Some(a) = args.rest {
        config.server.rest = a;
    }
    if let Some(a) = args.metrics {
        config.metrics.enable = true;
        config.metrics.listen = a;
    }
    if let Some(url) = args.database {
        config.database.url = url;
    }
    match run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
