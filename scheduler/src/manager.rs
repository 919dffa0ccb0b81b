//! The scheduler's side of the manager (`damselfly.manager.v1.Manager`).
//!
//! [`start`] runs three things in the background, all best effort: when the manager is down
//! the scheduler keeps scheduling with the last config it had, and picks up again when the
//! manager returns.
//!
//! * **Registration**: `RegisterScheduler` with the address daemons reach this scheduler on,
//!   then a `KeepAlive` stream with one message every `keepalive_interval_ms` (from the
//!   manager's answer). When the stream fails (`NOT_FOUND`: the manager forgot this
//!   scheduler; or the connection broke) the scheduler registers again, with backoff.
//! * **Dynamic config**: a `GetConfig(cluster_id)` long-poll loop; each new version's
//!   `SchedulerClusterConfig` is laid over the file's `scheduling:` values (an unset field
//!   keeps the file's value) and swapped into the state
//!   ([`SchedulerService::set_scheduling_config`]).
//! * **Preheat**: while registered, a `SubscribePreheat` stream. Each `PreheatRequest` names
//!   a URL and, when known, its digest; its task id is computed exactly as a daemon computes
//!   it ([`wire::TaskId::for_download`] with the request's tag and application: an image
//!   layer's blob URL is its digest's task, the one the registry mirror asks for), a seed
//!   peer (checking the digest) is
//!   triggered unless a peer already holds or fetches the task
//!   ([`SchedulerService::preheat`]), and the outcome is sent with `ReportPreheatResult`:
//!   success once a peer (the seed) holds the whole task, failure when no seed peer can
//!   fetch it or after `manager.preheat_timeout`.
//!
//! The preheat worker is in `manager/preheat.rs`; this file holds the loops.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::IntervalStream;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::Code;
use tracing::{debug, info, warn};
use wire::proto::manager::manager_client::ManagerClient;
use wire::proto::manager::{
    get_config_request::Target, GetConfigRequest, KeepAliveRequest, PreheatRequest,
    RegisterSchedulerRequest, SchedulerClusterConfig, SourceType, SubscribePreheatRequest,
};

mod preheat;

use crate::config::{ManagerConfig, SchedulingConfig};
use crate::service::SchedulerService;
use preheat::handle_preheat;
pub use preheat::{preheat_task_id, PreheatScope};

/// First pause before registering (or subscribing) again; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest pause between attempts to reach the manager.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Keepalive period used when the manager answers 0.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);
/// Shortest keepalive period accepted from the manager.
const MIN_KEEPALIVE: Duration = Duration::from_millis(50);
/// Preheat requests buffered between the subscription and the workers.
const PREHEAT_QUEUE: usize = 256;

/// The manager loops of a running scheduler; dropping it stops them (and the keepalive
/// stream ends, so the manager marks this scheduler inactive).
#[derive(Debug)]
pub struct ManagerHandle {
    task: JoinHandle<()>,
}

impl Drop for ManagerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the loops share.
struct Ctx {
    config: ManagerConfig,
    /// The file's `scheduling:` section: the base the manager's overrides are laid over.
    base: SchedulingConfig,
    /// Port daemons reach the scheduler on.
    listen: SocketAddr,
    service: SchedulerService,
    client: ManagerClient<Channel>,
}

/// Starts registration, keepalive, dynamic config and preheat against the manager at
/// `config.addr`. `base` is the file's scheduling config, `listen` the address the gRPC
/// server is bound to (its port is registered). Fails only for an unusable address.
pub fn start(
    service: SchedulerService,
    config: ManagerConfig,
    base: SchedulingConfig,
    listen: SocketAddr,
) -> anyhow::Result<ManagerHandle> {
    let endpoint = wire::tls::grpc_endpoint(&config.addr, config.tls.as_ref())
        .map_err(|e| anyhow::anyhow!("manager: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let ctx = Arc::new(Ctx {
        client: ManagerClient::new(endpoint.connect_lazy()),
        config,
        base,
        listen,
        service,
    });
    info!(manager = %ctx.config.addr, cluster_id = ctx.config.cluster_id, "using the manager");
    Ok(ManagerHandle {
        task: tokio::spawn(run(ctx)),
    })
}

/// Runs the loops; preheat requests are worked on in a `JoinSet` owned here, so that
/// aborting this task stops them all.
async fn run(ctx: Arc<Ctx>) {
    let (tx, mut rx) = mpsc::channel(PREHEAT_QUEUE);
    let registration = registration_loop(ctx.clone(), tx);
    let config = config_loop(ctx.clone());
    tokio::pin!(registration, config);
    let mut preheats = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut registration => return,
            () = &mut config => return,
            Some(request) = rx.recv() => {
                preheats.spawn(handle_preheat(ctx.clone(), request));
            }
            Some(_) = preheats.join_next(), if !preheats.is_empty() => {}
        }
    }
}

/// Pauses between tries: from [`RETRY_MIN`] doubling up to [`RETRY_MAX`], each with random
/// jitter ([`damselfly_common::reconnect_backoff`]) so that the schedulers of a cluster do
/// not come back to a restarted manager in lockstep. A new one after each success.
fn new_backoff() -> impl Iterator<Item = Duration> {
    damselfly_common::reconnect_backoff(RETRY_MIN, RETRY_MAX)
}

/// The next pause of `backoff`.
fn next_delay(backoff: &mut impl Iterator<Item = Duration>) -> Duration {
    backoff.next().unwrap_or(RETRY_MAX)
}

/// The system's hostname, or `localhost` when it cannot be read.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The IP registered for daemons: `manager.advertise_ip`, else the listen IP, else the
/// local address of a (never used) UDP socket connected towards the manager.
async fn advertise_ip(ctx: &Ctx) -> String {
    if !ctx.config.advertise_ip.is_empty() {
        return ctx.config.advertise_ip.clone();
    }
    if !ctx.listen.ip().is_unspecified() {
        return ctx.listen.ip().to_string();
    }
    let route = async {
        let manager = tokio::net::lookup_host(ctx.config.addr.as_str())
            .await
            .ok()?
            .next()?;
        let any = if manager.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let socket = tokio::net::UdpSocket::bind((any, 0)).await.ok()?;
        socket.connect(manager).await.ok()?;
        Some(socket.local_addr().ok()?.ip())
    };
    match route.await {
        Some(ip) if !ip.is_unspecified() => ip.to_string(),
        _ => {
            warn!("cannot tell which IP reaches the manager; registering 127.0.0.1 (set manager.advertise_ip)");
            "127.0.0.1".to_owned()
        }
    }
}

/// Registers, keeps alive and keeps the preheat subscription while registered; registers
/// again (with backoff) whenever that ends. Never returns.
async fn registration_loop(ctx: Arc<Ctx>, preheats: mpsc::Sender<PreheatRequest>) {
    let mut backoff = new_backoff();
    let hostname = if ctx.config.hostname.is_empty() {
        system_hostname()
    } else {
        ctx.config.hostname.clone()
    };
    loop {
        let request = RegisterSchedulerRequest {
            cluster_id: ctx.config.cluster_id,
            hostname: hostname.clone(),
            ip: advertise_ip(&ctx).await,
            port: u32::from(ctx.listen.port()),
            idc: ctx.config.idc.clone(),
            location: ctx.config.location.clone(),
        };
        let addr = format!("{}:{}", request.ip, request.port);
        match ctx.client.clone().register_scheduler(request).await {
            Ok(response) => {
                let r = response.into_inner();
                info!(
                    id = r.id,
                    cluster_id = r.cluster_id,
                    %addr,
                    "registered with the manager"
                );
                backoff = new_backoff();
                let every = match r.keepalive_interval_ms {
                    0 => DEFAULT_KEEPALIVE,
                    ms => Duration::from_millis(ms).max(MIN_KEEPALIVE),
                };
                let why = tokio::select! {
                    why = keepalive(&ctx, r.id, every) => why,
                    why = subscribe_preheat(&ctx, r.id, &preheats) => why,
                };
                warn!("manager session ended ({why}); registering again");
            }
            Err(status) => warn!(
                manager = %ctx.config.addr,
                "cannot register with the manager: {}; retrying with backoff",
                status.message()
            ),
        }
        tokio::time::sleep(next_delay(&mut backoff)).await;
    }
}

/// Sends a keepalive every `every` until the stream fails; returns why.
async fn keepalive(ctx: &Ctx, id: u64, every: Duration) -> String {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beats = IntervalStream::new(interval).map(move |_| KeepAliveRequest {
        source_type: SourceType::Scheduler as i32,
        id,
    });
    match ctx.client.clone().keep_alive(beats).await {
        Ok(_) => "the manager ended the keepalive stream".to_owned(),
        Err(status) if status.code() == Code::NotFound => {
            format!("the manager does not know scheduler {id}")
        }
        Err(status) => format!("keepalive failed: {}", status.message()),
    }
}

/// Holds a `SubscribePreheat` stream open (subscribing again with backoff when it ends) and
/// forwards each request to `preheats`. Returns only when the manager does not know `id`.
async fn subscribe_preheat(ctx: &Ctx, id: u64, preheats: &mpsc::Sender<PreheatRequest>) -> String {
    let mut backoff = new_backoff();
    loop {
        let request = SubscribePreheatRequest { scheduler_id: id };
        match ctx.client.clone().subscribe_preheat(request).await {
            Ok(response) => {
                debug!("subscribed to preheat requests");
                backoff = new_backoff();
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(request)) => {
                            if preheats.send(request).await.is_err() {
                                return "scheduler stopping".to_owned();
                            }
                        }
                        Ok(None) => {
                            debug!("the manager ended the preheat stream");
                            break;
                        }
                        Err(status) => {
                            debug!("preheat stream failed: {}", status.message());
                            break;
                        }
                    }
                }
            }
            Err(status) if status.code() == Code::NotFound => {
                return format!("the manager does not know scheduler {id}");
            }
            Err(status) => debug!("cannot subscribe to preheat: {}", status.message()),
        }
        tokio::time::sleep(next_delay(&mut backoff)).await;
    }
}

/// The file's scheduling config with the manager's overrides laid over it: a field the
/// manager leaves unset keeps the file's value.
pub fn merge(base: &SchedulingConfig, c: &SchedulerClusterConfig) -> SchedulingConfig {
    let size = |v: Option<u32>, local: usize| {
        v.map_or(local, |v| usize::try_from(v).unwrap_or(usize::MAX))
    };
    SchedulingConfig {
        candidate_parent_limit: size(c.candidate_parent_limit, base.candidate_parent_limit),
        parent_limit: size(c.parent_limit, base.parent_limit),
        filter_parent_limit: size(c.filter_parent_limit, base.filter_parent_limit),
        back_to_source_limit: c.back_to_source_limit.unwrap_or(base.back_to_source_limit),
        retry_limit: c.retry_limit.unwrap_or(base.retry_limit),
        normal_upload_slots: size(c.normal_upload_slots, base.normal_upload_slots),
        seed_upload_slots: size(c.seed_upload_slots, base.seed_upload_slots),
        ..base.clone()
    }
}

/// Follows the cluster's config with long polls and applies each new version. Never
/// returns; on errors it keeps the config in force and tries again with backoff.
async fn config_loop(ctx: Arc<Ctx>) {
    let wait = ctx.config.config_wait;
    let mut known = 0u64;
    let mut backoff = new_backoff();
    loop {
        let mut request = tonic::Request::new(GetConfigRequest {
            source_type: SourceType::Scheduler as i32,
            target: Some(Target::ClusterId(ctx.config.cluster_id)),
            known_version: known,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        });
        request.set_timeout(wait + Duration::from_secs(10));
        match ctx.client.clone().get_config(request).await {
            Ok(response) => {
                backoff = new_backoff();
                let r = response.into_inner();
                if r.version == known {
                    continue;
                }
                let overrides = r.config.and_then(|c| c.scheduler).unwrap_or_default();
                let merged = merge(&ctx.base, &overrides);
                match ctx.service.set_scheduling_config(merged) {
                    Ok(()) => info!(
                        cluster_id = r.cluster_id,
                        version = r.version,
                        "manager: cluster config applied"
                    ),
                    Err(e) => warn!(
                        cluster_id = r.cluster_id,
                        version = r.version,
                        "manager: cluster config refused, keeping the current one: {e:#}"
                    ),
                }
                known = r.version;
            }
            Err(status) => {
                debug!("manager config: {}", status.message());
                tokio::time::sleep(next_delay(&mut backoff)).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_unset_fields() {
        let base = SchedulingConfig {
            parent_limit: 6,
            dag: true,
            ..SchedulingConfig::default()
        };
        let merged = merge(&base, &SchedulerClusterConfig::default());
        assert_eq!(merged, base);
        let merged = merge(
            &base,
            &SchedulerClusterConfig {
                candidate_parent_limit: Some(3),
                back_to_source_limit: Some(0),
                seed_upload_slots: Some(7),
                ..SchedulerClusterConfig::default()
            },
        );
        assert_eq!(merged.candidate_parent_limit, 3);
        assert_eq!(merged.back_to_source_limit, 0);
        assert_eq!(merged.seed_upload_slots, 7);
        assert_eq!(merged.parent_limit, 6);
        assert!(merged.dag);
    }
}
