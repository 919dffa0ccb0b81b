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
    /// Write logs to rotated files `manager.log.<date>` in this directory instead of stderr;
    /// overrides `log.dir`.
    #[arg(long, value_name = "DIR", env = "MANAGER_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// When a new log file starts (with --log-dir): hourly, daily (default) or never;
    /// overrides `log.rotation`.
    #[arg(long, env = "MANAGER_LOG_ROTATION")]
    log_rotation: Option<damselfly_common::LogRotation>,
    /// Rotated log files kept (with --log-dir), the oldest deleted first; 0 keeps all;
    /// overrides `log.max_files` (default 7).
    #[arg(long, value_name = "N", env = "MANAGER_LOG_MAX_FILES")]
    log_max_files: Option<usize>,
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
    let Some((mut config, _log_guard)) = damselfly_common::load_config_and_logs(
        "manager",
        args.config.as_deref(),
        Config::load,
        |c: &Config| c.log.clone(),
        damselfly_common::LogFlags {
            format: args.log_format,
            dir: args.log_dir.clone(),
            rotation: args.log_rotation,
            max_files: args.log_max_files,
        },
    ) else {
        return ExitCode::FAILURE;
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
