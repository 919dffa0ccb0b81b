//! Starting dfdaemon: storage, data plane, scheduler sessions, local API, metrics.

use crate::config::{DaemonConfig, TransportKind};
use crate::scheduler::SchedulerSet;
use crate::task::TaskManager;
use anyhow::Context as _;
use dataplane::fetch::{FetchConfig, Transport};
use dataplane::quic::QuicConfig;
use dataplane::shaper::Shaping;
use dataplane::{Bridge, Counters, DataPlane, DataPlaneConfig, Storage};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::Arc;
use wire::proto::scheduler::{Host, HostType};

/// Everything the control plane's tasks share.
#[derive(Debug)]
pub struct Context {
    /// Effective configuration.
    pub config: DaemonConfig,
    /// This host as announced to schedulers.
    pub host: Host,
    /// Task storage (shared with the data plane).
    pub storage: Arc<Storage>,
    /// Task metadata that survives restarts (pieces, layout, access times).
    pub meta: Arc<crate::store::MetaStore>,
    /// Byte and piece counters (shared with the data plane).
    pub counters: Arc<Counters>,
    /// Rate limits (shared with the data plane; can change while running).
    pub shaping: Arc<Shaping>,
    /// Queues to the data plane.
    pub bridge: Arc<Bridge>,
    /// Scheduler channels (replaced at run time when the manager names others).
    pub schedulers: SchedulerSet,
    /// HTTP client for origins.
    pub http: reqwest::Client,
    /// Running downloads.
    pub tasks: TaskManager,
    /// Version of the manager's dynamic config applied (0: none yet).
    pub config_version: std::sync::atomic::AtomicU64,
    /// Counters of the registry mirror proxy.
    pub proxy: crate::proxy::ProxyCounters,
    /// Control-plane counters (downloads, failures by kind, back-to-source, scheduler loss).
    pub stats: Arc<crate::metrics::ControlStats>,
    /// Slots for origin fetches (`download.origin_concurrency`; `None`: unlimited).
    pub origin_slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// A running dfdaemon.
#[derive(Debug)]
pub struct Daemon {
    ctx: Arc<Context>,
    dataplane: DataPlane,
}

/// The local address this host uses to reach `target` (no packet is sent).
fn route_ip(target: &str) -> Option<IpAddr> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

impl Daemon {
    /// Opens storage, starts the data plane and builds the shared context. Nothing is served
    /// until [`Daemon::run`].
    pub fn start(config: DaemonConfig) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        if matches!(config.data_plane.transport, TransportKind::Quic)
            && config.data_plane.tls.is_none()
        {
            anyhow::bail!(
                "data_plane.transport: quic needs data_plane.tls (ca_cert, cert, key): without it \
                 a daemon could not tell its parents from impostors. Set data_plane.tls, or use \
                 transport: tcp"
            );
        }
        let storage =
            Arc::new(Storage::open(&config.storage.dir).with_context(|| {
                format!("opening storage dir {}", config.storage.dir.display())
            })?);
        let meta = Arc::new(crate::store::MetaStore::open(&config.storage.dir)?);
        let restored = meta
            .restore(&storage, config.storage.verify_on_start)
            .context("restoring tasks from the metadata store")?;
        for r in &restored {
            tracing::info!(task = %r.id, pieces = r.trusted, of = r.piece_count, recorded = r.recorded, "task restored");
        }
        let counters = Arc::new(Counters::default());
        let shaping = Arc::new(Shaping::new(config.data_plane.shaping()));
        let data_tls = match &config.data_plane.tls {
            Some(t) => Some(Arc::new(
                dataplane::tls::DataTls::new(t).context("data_plane.tls")?,
            )),
            None => None,
        };
        let dp_cfg = DataPlaneConfig {
            threads: if config.data_plane.threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                config.data_plane.threads
            },
            listen: config.data_plane.listen,
            queue_capacity: config.data_plane.queue_capacity,
            io_uring: config.data_plane.io_uring,
            fetch: FetchConfig {
                pieces_in_flight: config.data_plane.pieces_in_flight,
                request_queue_time: config.data_plane.request_queue_time,
                connect_timeout: config.data_plane.connect_timeout,
                piece_timeout: config.data_plane.piece_timeout,
                parent_idle_timeout: config.data_plane.parent_idle_timeout,
                bytes_in_flight: config.data_plane.bytes_in_flight.0,
                transport: match config.data_plane.transport {
                    TransportKind::Tcp => Transport::Tcp,
                    TransportKind::Quic => Transport::Quic,
                },
                tls: data_tls,
                digest_wait: config.data_plane.digest_wait,
                ..FetchConfig::default()
            },
            quic: match config.data_plane.transport {
                TransportKind::Tcp => None,
                TransportKind::Quic => Some(QuicConfig {
                    listen: config.data_plane.quic_listen,
                    tls: config.data_plane.tls.clone(),
                    max_udp_payload: config.data_plane.quic_max_udp_payload,
                    ..QuicConfig::default()
                }),
            },
            super_seed: (config.seed_peer.enable && config.seed_peer.super_seed)
                .then_some(config.seed_peer.copy_slots),
        };
        let dataplane =
            DataPlane::start(dp_cfg, storage.clone(), counters.clone(), shaping.clone())
                .with_context(|| format!("starting data plane on {}", config.data_plane.listen))?;
        let data_port = dataplane.local_addr().port();
        let hostname = if config.host.hostname.is_empty() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or_else(|_| "localhost".into(), |s| s.trim().to_string())
        } else {
            config.host.hostname.clone()
        };
        let ip = if !config.host.ip.is_empty() {
            config
                .host
                .ip
                .parse::<IpAddr>()
                .with_context(|| format!("host.ip {:?}", config.host.ip))?
        } else {
            config
                .scheduler
                .addrs
                .first()
                .and_then(|a| route_ip(a))
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
        };
        let host = Host {
            id: if config.host.id.is_empty() {
                format!("{hostname}-{data_port}")
            } else {
                config.host.id.clone()
            },
            hostname,
            ip: ip.to_string(),
            data_port: u32::from(data_port),
            r#type: if config.seed_peer.enable {
                HostType::Seed
            } else {
                HostType::Normal
            } as i32,
            idc: config.host.idc.clone(),
            location: config.host.location.clone(),
            upload_rate_limit: config.data_plane.upload_rate_limit.0,
            quic_port: dataplane.quic_addr().map_or(0, |a| u32::from(a.port())),
        };
        let schedulers =
            SchedulerSet::with_tls(&config.scheduler.addrs, config.scheduler.tls.clone())?;
        crate::trust::warn_if_insecure(&config.origin, "origin");
        let http = crate::trust::apply(
            reqwest::Client::builder().connect_timeout(config.download.origin_timeout),
            &config.origin,
            &[],
            false,
            "origin",
        )?
        .build()
        .context("building the HTTP client")?;
        let origin_slots = match config.download.origin_concurrency {
            0 => None,
            n => Some(Arc::new(tokio::sync::Semaphore::new(n))),
        };
        let ctx = Arc::new(Context {
            origin_slots,
            stats: Arc::default(),
            bridge: dataplane.bridge().clone(),
            config,
            host,
            storage,
            meta,
            counters,
            shaping,
            schedulers,
            http,
            tasks: TaskManager::default(),
            config_version: std::sync::atomic::AtomicU64::new(0),
            proxy: crate::proxy::ProxyCounters::default(),
        });
        Ok(Self { ctx, dataplane })
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Serves until `shutdown` resolves, then stops the data plane and removes the socket.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let ctx = self.ctx.clone();
        // Data-plane events → task runs.
        let pump_ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                let ev = pump_ctx.bridge.next_event().await;
                pump_ctx.tasks.route(ev).await;
            }
        });
        // Piece progress → metadata store, in batches.
        let flush_ctx = ctx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(flush_ctx.config.storage.persist_interval).await;
                let c = flush_ctx.clone();
                let res = tokio::task::spawn_blocking(move || c.meta.flush(&c.storage)).await;
                if let Ok(Err(e)) = res {
                    tracing::warn!("writing task metadata: {e:#}");
                }
            }
        });
        tokio::spawn(crate::gc::run(ctx.clone()));
        ctx.schedulers.reconcile(&ctx);
        if !ctx.config.manager.addrs.is_empty() {
            crate::manager::start(ctx.clone());
        }
        if !ctx.config.metrics.listen.is_empty() {
            let l = tokio::net::TcpListener::bind(&ctx.config.metrics.listen)
                .await
                .with_context(|| format!("binding metrics on {}", ctx.config.metrics.listen))?;
            tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
            tokio::spawn(crate::metrics::serve(ctx.clone(), l));
        }
        if ctx.config.proxy.enable {
            let proxy = Arc::new(crate::proxy::Proxy::new(ctx.clone())?);
            let l = tokio::net::TcpListener::bind(ctx.config.proxy.listen)
                .await
                .with_context(|| format!("binding the proxy on {}", ctx.config.proxy.listen))?;
            tracing::info!(
                "registry mirror proxy on http://{} (upstream {})",
                l.local_addr()?,
                ctx.config.proxy.registry_mirror
            );
            tokio::spawn(proxy.serve(l));
        }
        let socket = ctx.config.local_api.socket.clone();
        let api = crate::local_api::serve(ctx.clone(), &socket, shutdown);
        tracing::info!(
            "dfdaemon {} ({}) ready: local API {}, data plane {}:{}",
            ctx.host.id,
            if ctx.config.seed_peer.enable {
                "seed peer"
            } else {
                "peer"
            },
            socket.display(),
            ctx.host.ip,
            ctx.host.data_port
        );
        let res = api.await;
        let _ = std::fs::remove_file(&socket);
        self.dataplane.shutdown();
        if let Err(e) = ctx.meta.flush(&ctx.storage) {
            tracing::warn!("writing task metadata at shutdown: {e:#}");
        }
        res
    }
}
