//! Talking to the manager: finding this host's schedulers (searcher), following the cluster's
//! dynamic config, and, for seed peers, registering and keeping alive.
//!
//! Everything here is best effort: when the manager is down the daemon keeps the schedulers
//! and config it had (or its static `scheduler.addrs`) and picks up again when it returns.

use crate::config::ManagerConfig;
use crate::scheduler::SchedulerClient;
use dataplane::shaper::{Shaping, ShapingConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use wire::proto::manager::{
    get_config_request::Target, manager_client::ManagerClient, DaemonClusterConfig,
    GetConfigRequest, HostInfo, InstanceState, KeepAliveRequest, ListSchedulersRequest,
    RegisterSeedPeerRequest, SourceType,
};

/// What talking to the manager uses: its settings, this host's kind, the schedulers (the
/// searcher replaces them; this host's identity is theirs), the rate limits the dynamic
/// config updates and the version applied.
#[derive(Debug)]
pub struct ManagerLink {
    /// `manager` settings.
    pub config: ManagerConfig,
    /// `seed_peer.enable`: registers and keeps alive as a seed peer.
    pub seed_peer: bool,
    /// The rate limits of this daemon's own config (what the cluster config leaves unset).
    pub local_shaping: ShapingConfig,
    /// The schedulers.
    pub schedulers: Arc<SchedulerClient>,
    /// Rate limits (shared with the data plane).
    pub shaping: Arc<Shaping>,
    /// Version of the manager's dynamic config applied (0: none yet).
    pub config_version: Arc<AtomicU64>,
}

/// Starts the manager loops (searcher refresh, config follow, seed keepalive).
pub fn start(ctx: Arc<ManagerLink>) {
    let channels: Vec<Channel> = ctx
        .config
        .addrs
        .iter()
        .filter_map(
            |a| match wire::tls::grpc_endpoint(a, ctx.config.tls.as_ref()) {
                Ok(ep) => Some(
                    ep.connect_timeout(Duration::from_secs(3))
                        .tcp_nodelay(true)
                        .connect_lazy(),
                ),
                Err(e) => {
                    tracing::error!("manager {e}");
                    None
                }
            },
        )
        .collect();
    let Some(channel) = channels.into_iter().next() else {
        return;
    };
    tokio::spawn(searcher_loop(ctx.clone(), channel.clone()));
    tokio::spawn(config_loop(ctx.clone(), channel.clone()));
    if ctx.seed_peer {
        tokio::spawn(seed_keepalive_loop(ctx, channel));
    }
}

fn host_info(ctx: &ManagerLink) -> HostInfo {
    HostInfo {
        hostname: ctx.schedulers.host().hostname.clone(),
        ip: ctx.schedulers.host().ip.clone(),
        idc: ctx.schedulers.host().idc.clone(),
        location: ctx.schedulers.host().location.clone(),
    }
}

fn source_type(ctx: &ManagerLink) -> i32 {
    if ctx.seed_peer {
        SourceType::SeedPeer as i32
    } else {
        SourceType::Peer as i32
    }
}

/// Asks the manager which schedulers serve this host, now and every `refresh_interval`.
async fn searcher_loop(ctx: Arc<ManagerLink>, channel: Channel) {
    let mut client = ManagerClient::new(channel);
    loop {
        let req = ListSchedulersRequest {
            source_type: source_type(&ctx),
            host: Some(host_info(&ctx)),
        };
        match client.list_schedulers(req).await {
            Ok(resp) => {
                let r = resp.into_inner();
                let addrs: Vec<String> = r
                    .schedulers
                    .iter()
                    .filter(|s| s.state == InstanceState::Active as i32)
                    .map(|s| format!("{}:{}", s.ip, s.port))
                    .collect();
                if addrs.is_empty() {
                    tracing::warn!(
                        "manager knows no active scheduler for this host; keeping {:?}",
                        ctx.schedulers.addrs()
                    );
                } else {
                    match ctx.schedulers.replace(&addrs) {
                        Ok(true) => tracing::info!(
                            "manager: scheduler cluster {} -> {addrs:?}",
                            r.cluster_id
                        ),
                        Ok(false) => {}
                        Err(e) => tracing::warn!("manager sent a bad scheduler address: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!(
                "manager searcher: {}; keeping {:?}",
                e.message(),
                ctx.schedulers.addrs()
            ),
        }
        tokio::time::sleep(ctx.config.refresh_interval).await;
    }
}

/// Applies the cluster's daemon config over the local one: a field the manager leaves unset
/// keeps the value from this daemon's config file.
pub fn apply(ctx: &ManagerLink, c: &DaemonClusterConfig) {
    let local = ctx.local_shaping;
    let shaping = ShapingConfig {
        upload: c.upload_rate_limit.unwrap_or(local.upload),
        download: c.download_rate_limit.unwrap_or(local.download),
        per_peer_upload: c
            .per_peer_upload_rate_limit
            .unwrap_or(local.per_peer_upload),
        per_peer_download: c
            .per_peer_download_rate_limit
            .unwrap_or(local.per_peer_download),
    };
    ctx.shaping.update(shaping);
    let pieces = c.pieces_in_flight.map_or(0, |p| p as usize);
    ctx.shaping.set_pieces_in_flight(pieces);
}

/// First wait before asking the manager again after a failure (jittered, doubling).
const RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between tries to reach the manager (before jitter); the fixed pause was 2 s.
const RETRY_MAX: Duration = Duration::from_secs(4);

/// Follows the cluster's dynamic config with long polls; applies each new version.
async fn config_loop(ctx: Arc<ManagerLink>, channel: Channel) {
    let mut client = ManagerClient::new(channel);
    let wait = ctx.config.config_wait;
    let new_backoff = || damselfly_common::reconnect_backoff(RETRY_MIN, RETRY_MAX);
    let mut backoff = new_backoff();
    loop {
        let known = ctx.config_version.load(Ordering::Relaxed);
        let req = GetConfigRequest {
            source_type: source_type(&ctx),
            target: Some(Target::Host(host_info(&ctx))),
            known_version: known,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(wait + Duration::from_secs(10));
        match client.get_config(request).await {
            Ok(resp) => {
                backoff = new_backoff();
                let r = resp.into_inner();
                if r.version != known {
                    if let Some(d) = r.config.as_ref().and_then(|c| c.daemon.as_ref()) {
                        apply(&ctx, d);
                    }
                    ctx.config_version.store(r.version, Ordering::Relaxed);
                    tracing::info!(
                        "manager: cluster {} config version {} applied",
                        r.cluster_id,
                        r.version
                    );
                }
            }
            Err(e) => {
                tracing::debug!("manager config: {}", e.message());
                tokio::time::sleep(backoff.next().unwrap_or(RETRY_MAX)).await;
            }
        }
    }
}

/// Seed peers register with the manager and keep a keepalive stream open; on any error they
/// register again after a pause.
async fn seed_keepalive_loop(ctx: Arc<ManagerLink>, channel: Channel) {
    let mut client = ManagerClient::new(channel);
    let new_backoff = || damselfly_common::reconnect_backoff(RETRY_MIN, RETRY_MAX);
    let mut backoff = new_backoff();
    loop {
        let req = RegisterSeedPeerRequest {
            cluster_id: ctx.config.cluster_id,
            hostname: ctx.schedulers.host().hostname.clone(),
            ip: ctx.schedulers.host().ip.clone(),
            port: ctx.schedulers.host().data_port,
            download_port: ctx.schedulers.host().data_port,
            idc: ctx.schedulers.host().idc.clone(),
            location: ctx.schedulers.host().location.clone(),
        };
        match client.register_seed_peer(req).await {
            Ok(resp) => {
                backoff = new_backoff();
                let r = resp.into_inner();
                let every = Duration::from_millis(r.keepalive_interval_ms.max(100));
                tracing::info!(
                    "manager: seed peer registered as {} in cluster {}",
                    r.id,
                    r.cluster_id
                );
                let id = r.id;
                let beats = futures::stream::unfold((), move |()| async move {
                    tokio::time::sleep(every).await;
                    Some((
                        KeepAliveRequest {
                            source_type: SourceType::SeedPeer as i32,
                            id,
                        },
                        (),
                    ))
                });
                let first = futures::stream::once(async move {
                    KeepAliveRequest {
                        source_type: SourceType::SeedPeer as i32,
                        id,
                    }
                });
                use futures::StreamExt;
                if let Err(e) = client.keep_alive(first.chain(beats)).await {
                    tracing::warn!("manager keepalive ended: {}", e.message());
                }
            }
            Err(e) => tracing::debug!("manager register: {}", e.message()),
        }
        tokio::time::sleep(backoff.next().unwrap_or(RETRY_MAX)).await;
    }
}
