//! `scheduler`: Damselfly's scheduler process. All logic lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use damselfly_scheduler::{run, Config};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Damselfly scheduler: picks parents for peers, triggers seed peers.
#[derive(Debug, Parser)]
#[command(
    name = "scheduler",
    version = damselfly_common::VERSION,
    after_help = "Precedence: config file, then environment variables, then flags. The config file is \
--config, else $SCHEDULER_CONFIG, else /etc/damselfly/scheduler.yaml when it exists."
)]
struct Args {
    /// YAML configuration file (every key has a default).
    #[arg(long, value_name = "PATH", env = "SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text or json (one JSON object per line).
    #[arg(long, env = "SCHEDULER_LOG_FORMAT", default_value_t = damselfly_common::LogFormat::Text)]
    log_format: damselfly_common::LogFormat,
    /// Write logs to rotated files `scheduler.log.<date>` in this directory instead of stderr;
    /// overrides `log.dir`.
    #[arg(long, value_name = "DIR", env = "SCHEDULER_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// When a new log file starts (with --log-dir): hourly, daily (default) or never;
    /// overrides `log.rotation`.
    #[arg(long, env = "SCHEDULER_LOG_ROTATION")]
    log_rotation: Option<damselfly_common::LogRotation>,
    /// Rotated log files kept (with --log-dir), the oldest deleted first; 0 keeps all;
    /// overrides `log.max_files` (default 7).
    #[arg(long, value_name = "N", env = "SCHEDULER_LOG_MAX_FILES")]
    log_max_files: Option<usize>,
    /// gRPC listen address; overrides `server.listen` (default 0.0.0.0:8002).
    #[arg(long, value_name = "ADDR", env = "SCHEDULER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Manager gRPC address host:port; overrides `manager.addr` (default: no manager).
    #[arg(long, value_name = "ADDR", env = "SCHEDULER_MANAGER")]
    manager: Option<String>,
    /// IP daemons reach this scheduler on, registered with the manager; overrides
    /// `manager.advertise_ip` (default: the listen IP, or the one that reaches the manager).
    #[arg(long, value_name = "IP", env = "SCHEDULER_ADVERTISE_IP")]
    advertise_ip: Option<std::net::IpAddr>,
    /// Serve Prometheus metrics (`/metrics`, `/healthy`) on this address; sets
    /// `metrics.enable` and `metrics.listen` (Dragonfly's port: 8000).
    #[arg(long, value_name = "ADDR", env = "SCHEDULER_METRICS")]
    metrics: Option<SocketAddr>,
    /// Tokio worker threads; overrides `server.worker_threads` (default: one per CPU).
    #[arg(long, value_name = "N", env = "SCHEDULER_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let Some((config, _log_guard)) = damselfly_common::load_config_and_logs(
        "scheduler",
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
