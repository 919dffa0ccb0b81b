//! Damselfly's manager: the registry of scheduler clusters, schedulers and seed peers.
//!
//! * [`store`]: persistent state behind the [`Store`](store::Store) trait: SQLite by default,
//!   Postgres when given a `postgres://` URL.
//! * [`grpc`]: the gRPC service for schedulers, seed peers and daemons (register, keepalive,
//!   dynamic config long-poll, searcher, preheat stream), contract in
//!   `wire/proto/manager.proto`.
//! * [`rest`]: the REST API under `/api/v1/…`, `/healthy`, and the [`status`] page at `/`.
//! * [`searcher`]: which cluster serves a host (CIDR, IDC, location, hostname).
//! * [`preheat`] and [`registry`]: preheat jobs, image manifests to layer blobs.
//!
//! [`start`] runs everything on the current tokio runtime and returns a [`Handle`] with the
//! bound addresses; [`run`] is the binary's whole life (start, wait for a signal, shut down).

pub mod auth;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod oapi;
pub mod preheat;
pub mod registry;
pub mod rest;
pub mod searcher;
pub mod state;
pub mod status;
pub mod store;
pub mod testing;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::Config;
pub use state::ManagerState;

/// gRPC messages and services of `wire/proto/manager.proto`.
pub use wire::proto::manager as proto;

use crate::model::Timestamp;
use crate::store::{SqlStore, Store};

/// A running manager.
#[derive(Debug)]
pub struct Handle {
    /// Where the gRPC server listens.
    pub grpc_addr: SocketAddr,
    /// Where the REST API and status page listen.
    pub rest_addr: SocketAddr,
    /// The API token generated at this start (first start on an empty database without a
    /// bootstrap token), in clear; `None` otherwise.
    pub generated_token: Option<String>,
    /// Shared state (store, config), for embedding and tests.
    pub state: Arc<ManagerState>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Handle {
    /// Stops accepting, ends long-lived streams, waits for the servers to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.state.preheat.close().await;
        let mut result = Ok(());
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(e) if e.is_cancelled() => {}
                Err(e) => result = Err(anyhow::anyhow!("manager task panicked: {e}")),
            }
        }
        result
    }

    /// Waits until a server task ends by itself (an error), for [`run`].
    async fn wait_failure(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(anyhow::anyhow!("manager task failed: {e}")),
            None => Ok(()),
        }
    }
}

/// Opens the store, makes sure a default cluster exists, binds both listeners and serves.
pub async fn start(config: Config) -> anyhow::Result<Handle> {
    config.validate()?;
    let store = SqlStore::open(&config.database.url, config.database.max_connections)
        .await
        .with_context(|| format!("opening database {}", redact(&config.database.url)))?;
    start_with_store(config, Arc::new(store)).await
}

/// Like [`start`], over a store the caller opened.
pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Handle> {
    let (auth, generated_token) = auth::Auth::init(&*store, &config.auth.bootstrap_token).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = ManagerState::new(store, config.clone(), auth, shutdown_rx.clone());
    let default = state.ensure_default_cluster().await?;
    tracing::info!(id = default.id, name = %default.name, "default cluster");
    // Jobs a previous run left unfinished: run again, or failed with the reason.
    let (resumed, failed) = state.preheat.resume_unfinished().await?;
    if resumed + failed > 0 {
        tracing::warn!(
            resumed,
            failed,
            "preheat jobs left unfinished by a previous run"
        );
    }

    let grpc_listener = tokio::net::TcpListener::bind(config.server.grpc)
        .await
        .with_context(|| format!("binding gRPC {}", config.server.grpc))?;
    let rest_listener = tokio::net::TcpListener::bind(config.server.rest)
        .await
        .with_context(|| format!("binding REST {}", config.server.rest))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let rest_addr = rest_listener.local_addr()?;

    let tls = match &config.server.tls {
        Some(t) => Some(t.rustls_server(&[]).context("server.tls")?),
        None => None,
    };
    let mut tasks = JoinSet::new();
    let service = grpc::ManagerService::new(state.clone()).into_server();
    let signal = wait_true(shutdown_rx.clone());
    tasks.spawn(async move {
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(service);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        match tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        wire::tls::grpc_incoming(incoming, tls, "manager"),
                        signal,
                    )
                    .await
            }
            None => router.serve_with_incoming_shutdown(incoming, signal).await,
        }
        .context("gRPC server")
    });
    let app = rest::router(state.clone());
    let signal = wait_true(shutdown_rx.clone());
    tasks.spawn(async move {
        axum::serve(rest_listener, app)
            .with_graceful_shutdown(signal)
            .await
            .context("REST server")
    });
    if config.metrics.enable {
        let l = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .with_context(|| format!("binding metrics {}", config.metrics.listen))?;
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        let app = metrics::router(state.clone());
        let signal = wait_true(shutdown_rx.clone());
        tasks.spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(signal)
                .await
                .context("metrics server")
        });
    }
    tasks.spawn(reaper(state.clone(), shutdown_rx));
    tracing::info!(%grpc_addr, %rest_addr, "manager listening");
    Ok(Handle {
        grpc_addr,
        rest_addr,
        generated_token,
        state,
        shutdown: shutdown_tx,
        tasks,
    })
}

/// The binary's life: start, print a generated token, serve until `signal` resolves (or a
/// server fails), shut down gracefully.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut handle = start(config).await?;
    if let Some(token) = &handle.generated_token {
        tracing::warn!(
            "generated the REST API token (shown once; only its hash is stored): {token}"
        );
    }
    tokio::select! {
        () = signal => {
            tracing::info!("shutting down");
            handle.shutdown().await
        }
        r = handle.wait_failure() => {
            let _ = handle.shutdown().await;
            r.and(Err(anyhow::anyhow!("a server stopped unexpectedly")))
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (the one shared by every process).
pub use damselfly_common::shutdown_signal;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    shutdown_requested(&mut rx).await;
}

/// Resolves when the shutdown flag turns true (or its sender is gone).
pub(crate) async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

/// Marks instances inactive once their last keepalive is older than `keepalive.timeout`;
/// checks four times per timeout (at most once a second).
async fn reaper(
    state: Arc<ManagerState>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let timeout = state.config.keepalive.timeout;
    let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown_requested(&mut shutdown) => return Ok(()),
        }
        match state
            .store
            .expire_instances(Timestamp::now().minus(timeout))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "marked instances inactive after missed keepalives"),
            Err(e) => tracing::warn!("keepalive reaper: {e}"),
        }
    }
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
