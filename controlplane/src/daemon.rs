//! Starting dfdaemon: storage, data plane, scheduler sessions, local API, metrics.

use crate::cache::DfCache;
use crate::config::{DaemonConfig, TransportKind};
use crate::local_api::LocalApi;
use crate::manager::ManagerLink;
use crate::metrics::{ControlStats, MetricsSources};
use crate::origin::OriginClient;
use crate::proxy::ProxyCounters;
use crate::retention::Retention;
use crate::scheduler::SchedulerClient;
use crate::store::MetaStore;
use crate::task::{BridgeLink, RunServices, RunSettings, TaskManager};
use anyhow::Context as _;
use dataplane::fetch::{FetchConfig, Transport};
use dataplane::quic::QuicConfig;
use dataplane::shaper::Shaping;
use dataplane::{Bridge, Counters, DataPlane, DataPlaneConfig, Storage};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use wire::proto::scheduler::{Host, HostType};

/// A running dfdaemon: the composition root. It builds the services (storage, metadata
/// store, [`SchedulerClient`], [`TaskManager`], [`Retention`], the origin client...) and
/// hands each module the narrow ones it needs; no module names the daemon.
#[derive(Debug)]
pub struct Daemon {
    config: DaemonConfig,
    dataplane: DataPlane,
    storage: Arc<Storage>,
    meta: Arc<MetaStore>,
    counters: Arc<Counters>,
    shaping: Arc<Shaping>,
    bridge: Arc<Bridge>,
    schedulers: Arc<SchedulerClient>,
    tasks: Arc<TaskManager>,
    retention: Arc<Retention>,
    stats: Arc<ControlStats>,
    proxy_counters: Arc<ProxyCounters>,
    origin_slots: Option<Arc<tokio::sync::Semaphore>>,
    config_version: Arc<AtomicU64>,
}

/// The local address this host uses to reach `target` (no packet is sent).
fn route_ip(target: &str) -> Option<IpAddr> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

impl Daemon {
    /// Opens storage, starts the data plane and builds the services. Nothing is served
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
        let meta = Arc::new(MetaStore::open(&config.storage.dir)?);
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
        let schedulers = Arc::new(SchedulerClient::new(
            host,
            &config.scheduler.addrs,
            config.scheduler.tls.clone(),
        )?);
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
        let stats = Arc::new(ControlStats::default());
        let bridge = dataplane.bridge().clone();
        let origin = Arc::new(OriginClient {
            http,
            download: config.download.clone(),
            origin: config.origin.clone(),
            origin_slots: origin_slots.clone(),
            storage: storage.clone(),
            shaping: shaping.clone(),
            counters: counters.clone(),
            stats: stats.clone(),
        });
        let tasks = Arc::new(TaskManager::new(RunServices {
            schedulers: schedulers.clone(),
            dataplane: Arc::new(BridgeLink(bridge.clone())),
            origin,
            storage: storage.clone(),
            meta: meta.clone(),
            stats: stats.clone(),
            host: schedulers.host().clone(),
            settings: RunSettings {
                schedule_timeout: config.scheduler.schedule_timeout,
                stall_timeout: config.download.stall_timeout,
                verify_pieces: config.data_plane.verify_pieces,
            },
        }));
        let retention = Arc::new(Retention::new(
            storage.clone(),
            meta.clone(),
            tasks.clone(),
            schedulers.clone(),
        ));
        Ok(Self {
            config,
            dataplane,
            storage,
            meta,
            counters,
            shaping,
            bridge,
            schedulers,
            tasks,
            retention,
            stats,
            proxy_counters: Arc::default(),
            origin_slots,
            config_version: Arc::default(),
        })
    }

    /// Serves until `shutdown` resolves, then stops the data plane and removes the socket.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let cfg = &self.config;
        // Data-plane events → task runs.
        let (bridge, tasks) = (self.bridge.clone(), self.tasks.clone());
        tokio::spawn(async move {
            loop {
                let ev = bridge.next_event().await;
                tasks.route(ev).await;
            }
        });
        // Piece progress → metadata store, in batches.
        let (meta, storage) = (self.meta.clone(), self.storage.clone());
        let interval = cfg.storage.persist_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let (m, s) = (meta.clone(), storage.clone());
                let res = tokio::task::spawn_blocking(move || m.flush(&s)).await;
                if let Ok(Err(e)) = res {
                    tracing::warn!("writing task metadata: {e:#}");
                }
            }
        });
        tokio::spawn(crate::gc::run(self.retention.clone(), cfg.gc.clone()));
        self.schedulers.start(Arc::new(self.tasks.clone()));
        if !cfg.manager.addrs.is_empty() {
            crate::manager::start(Arc::new(ManagerLink {
                config: cfg.manager.clone(),
                seed_peer: cfg.seed_peer.enable,
                local_shaping: cfg.data_plane.shaping(),
                schedulers: self.schedulers.clone(),
                shaping: self.shaping.clone(),
                config_version: self.config_version.clone(),
            }));
        }
        if !cfg.metrics.listen.is_empty() {
            let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
                .await
                .with_context(|| format!("binding metrics on {}", cfg.metrics.listen))?;
            tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
            let sources = MetricsSources {
                seed_peer: cfg.seed_peer.enable,
                stats: self.stats.clone(),
                counters: self.counters.clone(),
                proxy: self.proxy_counters.clone(),
                origin_slots: self
                    .origin_slots
                    .clone()
                    .map(|s| (s, cfg.download.origin_concurrency)),
                tasks: self.tasks.clone(),
                bridge: self.bridge.clone(),
                storage: self.storage.clone(),
                gc: cfg.gc.clone(),
            };
            tokio::spawn(crate::metrics::serve(sources, l));
        }
        if cfg.proxy.enable {
            let proxy = Arc::new(crate::proxy::Proxy::new(
                cfg,
                self.tasks.clone(),
                self.storage.clone(),
                self.proxy_counters.clone(),
            )?);
            let l = tokio::net::TcpListener::bind(cfg.proxy.listen)
                .await
                .with_context(|| format!("binding the proxy on {}", cfg.proxy.listen))?;
            tracing::info!(
                "registry mirror proxy on http://{} (upstream {})",
                l.local_addr()?,
                cfg.proxy.registry_mirror
            );
            tokio::spawn(proxy.serve(l));
        }
        let socket = cfg.local_api.socket.clone();
        let api = LocalApi {
            hard_link: cfg.download.hard_link,
            pieces_in_flight: cfg.data_plane.pieces_in_flight,
            tasks: self.tasks.clone(),
            storage: self.storage.clone(),
            cache: Arc::new(DfCache {
                storage: self.storage.clone(),
                meta: self.meta.clone(),
                schedulers: self.schedulers.clone(),
                retention: self.retention.clone(),
                piece_length_min: cfg.download.piece_length_min.0,
                piece_length_max: cfg.download.piece_length_max.0,
            }),
            schedulers: self.schedulers.clone(),
            counters: self.counters.clone(),
            shaping: self.shaping.clone(),
            config_version: self.config_version.clone(),
        };
        let api = crate::local_api::serve(api, &socket, shutdown);
        let host = self.schedulers.host();
        tracing::info!(
            "dfdaemon {} ({}) ready: local API {}, data plane {}:{}",
            host.id,
            if cfg.seed_peer.enable {
                "seed peer"
            } else {
                "peer"
            },
            socket.display(),
            host.ip,
            host.data_port
        );
        let res = api.await;
        let _ = std::fs::remove_file(&socket);
        self.dataplane.shutdown();
        if let Err(e) = self.meta.flush(&self.storage) {
            tracing::warn!("writing task metadata at shutdown: {e:#}");
        }
        res
    }
}
