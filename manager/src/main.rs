//! `manager`: Damselfly's manager process. All logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use damselfly_manager::{run, shutdown_signal, Config};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Damselfly manager: scheduler clusters, keepalive, dynamic config, REST API, preheat.
#[derive(Debug, Parser)]
#[command(
    name = "manager",
    version = damselfly_common::VERSION,
    after_help = "Precedence: config file, then environment variables, then flags. The config file is \
--config, else $MANAGER_CONFIG, else /etc/damselfly/manager.yaml when it exists."
)]
struct Args {
    /// YAML configuration file (every key has a default; unknown keys are errors).
    #[arg(long, value_name = "PATH", env = "MANAGER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text or json (one JSON object per line).
    #[arg(long, env = "MANAGER_LOG_FORMAT", default_value_t = damselfly_common::LogFormat::Text)]
    log_format: damselfly_common::LogFormat,
    /// Write logs to rotated files `manager.log.<date>` in this directory instead of stderr.
    #[arg(long, value_name = "DIR", env = "MANAGER_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// When a new log file starts (with --log-dir): hourly, daily or never.
    #[arg(long, env = "MANAGER_LOG_ROTATION", default_value_t = damselfly_common::LogRotation::Daily)]
    log_rotation: damselfly_common::LogRotation,
    /// Rotated log files kept (with --log-dir), the oldest deleted first; 0 keeps all.
    #[arg(
        long,
        value_name = "N",
        env = "MANAGER_LOG_MAX_FILES",
        default_value_t = 7
    )]
    log_max_files: usize,
    /// gRPC listen address; overrides `server.grpc` (default 0.0.0.0:65003).
    #[arg(long, value_name = "ADDR", env = "MANAGER_GRPC")]
    grpc: Option<SocketAddr>,
    /// REST API and status page listen address; overrides `server.rest` (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR", env = "MANAGER_REST")]
    rest: Option<SocketAddr>,
    /// Database URL; overrides `database.url` (default sqlite:///var/lib/damselfly/manager.db).
    #[arg(long, value_name = "URL", env = "MANAGER_DATABASE")]
    database: Option<String>,
    /// Serve Prometheus metrics (`/metrics`, `/healthy`) on this address; sets
    /// `metrics.enable` and `metrics.listen` (Dragonfly's port: 8000).
    #[arg(long, value_name = "ADDR", env = "MANAGER_METRICS")]
    metrics: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let _log_guard = match damselfly_common::init_logs_with(
        "manager",
        "info",
        &damselfly_common::LogOptions {
            format: args.log_format,
            dir: args.log_dir.clone(),
            rotation: args.log_rotation,
            max_files: args.log_max_files,
        },
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("manager: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = match damselfly_common::config_path(
        args.config.as_deref(),
        &damselfly_common::default_config_path("manager"),
    )
    .as_deref()
    .map(|p| {
        tracing::info!("config file {}", p.display());
        Config::load(p)
    })
    .transpose()
    {
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
