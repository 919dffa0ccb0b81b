//! Damselfly's scheduler: the per-task swarm brain.
//!
//! Daemons announce their host on a long-lived stream and register one peer per task; the
//! scheduler answers with candidate parents, triggers a seed peer when nobody has a task yet,
//! and tells a peer to go back to the origin only when that is the best option.
//!
//! * [`state`]: the swarm state machine, sans-IO ([`state::SchedulerState`]).
//! * [`service`]: the tonic gRPC service that feeds it ([`service::SchedulerService`]).
//! * [`config`]: the YAML configuration ([`config::Config`]).
//! * [`manager`]: registration with the manager, its dynamic config and preheat requests.
//! * [`metrics`]: Prometheus metrics and the `/metrics` + `/healthy` endpoint.
//!
//! [`run`] is the whole binary: bind, register with the manager (if any), serve until
//! Ctrl-C or SIGTERM.

pub mod config;
pub mod manager;
pub mod metrics;
pub mod service;
pub mod state;

use anyhow::Context as _;

pub use config::{Config, ManagerConfig, SchedulingConfig, ServerConfig};
pub use service::{serve, serve_service, SchedulerService};
pub use state::SchedulerState;

/// Installs the stderr log subscriber, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Binds `config.server.listen`, starts the manager client when `manager.addr` is set, and
/// serves until Ctrl-C or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", config.server.listen))?;
    let service = SchedulerService::new(config.scheduling.clone());
    if config.metrics.enable {
        let l = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot bind metrics on {}: {e}", config.metrics.listen)
            })?;
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(metrics::serve(service.clone(), l));
    }
    let manager = if config.manager.addr.is_empty() {
        None
    } else {
        Some(manager::start(
            service.clone(),
            config.manager.clone(),
            config.scheduling.clone(),
            listener.local_addr()?,
        )?)
    };
    let tls = match &config.server.tls {
        Some(t) => Some(t.rustls_server(&[]).context("server.tls")?),
        None => None,
    };
    let result = service::serve_service_tls(listener, service, tls, shutdown_signal()).await;
    // Ends the keepalive stream: the manager marks this scheduler inactive at once.
    drop(manager);
    result
}

/// Resolves on Ctrl-C or SIGTERM (the one shared by every process).
pub use damselfly_common::shutdown_signal;
