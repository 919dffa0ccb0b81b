//! The manager's gRPC service (`damselfly.manager.v1.Manager`) for schedulers, seed peers and
//! daemons. See `wire/proto/manager.proto` for the contract.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::model::{
    Cluster, ClusterConfig, Instance, InstanceKind, InstanceState, NewInstance, Timestamp,
};
use crate::proto;
use crate::searcher::HostQuery;
use crate::state::ManagerState;
use crate::store::StoreError;

/// The gRPC service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ManagerService {
    state: Arc<ManagerState>,
}

impl ManagerService {
    /// A service over the shared state.
    pub fn new(state: Arc<ManagerState>) -> Self {
        Self { state }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> proto::manager_server::ManagerServer<Self> {
        proto::manager_server::ManagerServer::new(self)
    }

    async fn register(
        &self,
        kind: InstanceKind,
        cluster_id: u64,
        mut new: NewInstance,
    ) -> Result<proto::RegisterResponse, Status> {
        if new.hostname.is_empty() || new.ip.is_empty() || new.port == 0 {
            return Err(Status::invalid_argument(
                "hostname, ip and port are required",
            ));
        }
        let cluster = self
            .state
            .cluster_or_default(cluster_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no cluster {cluster_id}")))?;
        new.cluster_id = cluster.id;
        let instance = self
            .state
            .store
            .upsert_instance(kind, new, Timestamp::now())
            .await
            .map_err(internal)?;
        tracing::info!(
            ?kind,
            id = instance.id,
            cluster = cluster.id,
            host = %instance.hostname,
            addr = %format!("{}:{}", instance.ip, instance.port),
            "registered"
        );
        Ok(proto::RegisterResponse {
            id: instance.id,
            cluster_id: cluster.id,
            keepalive_interval_ms: millis(self.state.config.keepalive.interval),
        })
    }

    async fn resolve_cluster(
        &self,
        target: Option<&proto::get_config_request::Target>,
    ) -> Result<Cluster, Status> {
        use proto::get_config_request::Target;
        let cluster = match target {
            None => self.state.cluster_or_default(0).await,
            Some(Target::ClusterId(id)) => self.state.cluster_or_default(*id).await,
            Some(Target::Host(h)) => self.state.search_cluster(&host_query(h)).await,
        }
        .map_err(internal)?;
        cluster.ok_or_else(|| Status::not_found("no such cluster"))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn internal(e: StoreError) -> Status {
    tracing::warn!("store error: {e}");
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::Conflict(m) => Status::already_exists(m),
        e => Status::internal(e.to_string()),
    }
}

fn host_query(h: &proto::HostInfo) -> HostQuery {
    HostQuery {
        hostname: h.hostname.clone(),
        ip: h.ip.clone(),
        idc: h.idc.clone(),
        location: h.location.clone(),
    }
}

fn port(p: u32) -> Result<u16, Status> {
    u16::try_from(p).map_err(|_| Status::invalid_argument(format!("bad port {p}")))
}

fn proto_state(s: InstanceState) -> i32 {
    match s {
        InstanceState::Active => proto::InstanceState::Active as i32,
        InstanceState::Inactive => proto::InstanceState::Inactive as i32,
    }
}

fn scheduler_info(i: &Instance) -> proto::SchedulerInfo {
    proto::SchedulerInfo {
        id: i.id,
        cluster_id: i.cluster_id,
        hostname: i.hostname.clone(),
        ip: i.ip.clone(),
        port: u32::from(i.port),
        idc: i.idc.clone(),
        location: i.location.clone(),
        state: proto_state(i.state),
    }
}

fn seed_peer_info(i: &Instance) -> proto::SeedPeerInfo {
    proto::SeedPeerInfo {
        id: i.id,
        cluster_id: i.cluster_id,
        hostname: i.hostname.clone(),
        ip: i.ip.clone(),
        port: u32::from(i.port),
        download_port: u32::from(i.download_port),
        idc: i.idc.clone(),
        location: i.location.clone(),
        state: proto_state(i.state),
    }
}

/// The proto form of a cluster's config.
pub fn config_to_proto(c: &ClusterConfig) -> proto::ClusterConfig {
    let s = &c.scheduler;
    let d = &c.daemon;
    proto::ClusterConfig {
        scheduler: Some(proto::SchedulerClusterConfig {
            candidate_parent_limit: s.candidate_parent_limit,
            parent_limit: s.parent_limit,
            filter_parent_limit: s.filter_parent_limit,
            back_to_source_limit: s.back_to_source_limit,
            retry_limit: s.retry_limit,
            normal_upload_slots: s.normal_upload_slots,
            seed_upload_slots: s.seed_upload_slots,
        }),
        daemon: Some(proto::DaemonClusterConfig {
            upload_rate_limit: d.upload_rate_limit,
            download_rate_limit: d.download_rate_limit,
            per_peer_upload_rate_limit: d.per_peer_upload_rate_limit,
            per_peer_download_rate_limit: d.per_peer_download_rate_limit,
            pieces_in_flight: d.pieces_in_flight,
        }),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl proto::manager_server::Manager for ManagerService {
    async fn register_scheduler(
        &self,
        request: Request<proto::RegisterSchedulerRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        crate::metrics::grpc("register_scheduler");
        let r = request.into_inner();
        let new = NewInstance {
            cluster_id: 0,
            hostname: r.hostname,
            ip: r.ip,
            port: port(r.port)?,
            download_port: 0,
            idc: r.idc,
            location: r.location,
        };
        let resp = self
            .register(InstanceKind::Scheduler, r.cluster_id, new)
            .await?;
        Ok(Response::new(resp))
    }

    async fn register_seed_peer(
        &self,
        request: Request<proto::RegisterSeedPeerRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        crate::metrics::grpc("register_seed_peer");
        let r = request.into_inner();
        let new = NewInstance {
            cluster_id: 0,
            hostname: r.hostname,
            ip: r.ip,
            port: port(r.port)?,
            download_port: port(r.download_port)?,
            idc: r.idc,
            location: r.location,
        };
        let resp = self
            .register(InstanceKind::SeedPeer, r.cluster_id, new)
            .await?;
        Ok(Response::new(resp))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<proto::KeepAliveRequest>>,
    ) -> Result<Response<proto::KeepAliveResponse>, Status> {
        crate::metrics::grpc("keep_alive");
        let mut stream = request.into_inner();
        let mut shutdown = self.state.shutdown_signal();
        let first = tokio::select! {
            first = stream.message() => first?,
            _ = crate::shutdown_requested(&mut shutdown) => {
                return Err(Status::unavailable("manager is shutting down"));
            }
        };
        let Some(first) = first else {
            return Ok(Response::new(proto::KeepAliveResponse {}));
        };
        let kind = match proto::SourceType::try_from(first.source_type) {
            Ok(proto::SourceType::Scheduler) => InstanceKind::Scheduler,
            Ok(proto::SourceType::SeedPeer) => InstanceKind::SeedPeer,
            _ => {
                return Err(Status::invalid_argument(
                    "keepalive source_type must be scheduler or seed peer",
                ))
            }
        };
        let id = first.id;
        let store = &self.state.store;
        if !store
            .keepalive(kind, id, Timestamp::now())
            .await
            .map_err(internal)?
        {
            return Err(Status::not_found(format!(
                "{kind:?} {id} is not registered"
            )));
        }
        let generation = self.state.stream_opened(kind, id);
        tracing::debug!(?kind, id, "keepalive stream opened");
        let result = loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(_)) => {
                        crate::metrics::keepalive(kind);
                        match store.keepalive(kind, id, Timestamp::now()).await {
                            Ok(true) => {}
                            Ok(false) => break Err(Status::not_found("instance was deleted")),
                            Err(e) => break Err(internal(e)),
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => {
                        tracing::debug!(?kind, id, "keepalive stream broke: {e}");
                        break Ok(());
                    }
                },
                _ = crate::shutdown_requested(&mut shutdown) => break Err(Status::unavailable("manager is shutting down")),
            }
        };
        if self.state.stream_closed(kind, id, generation) {
            tracing::info!(?kind, id, "keepalive stream ended; marking inactive");
            if let Err(e) = store.set_inactive(kind, id).await {
                tracing::warn!("cannot mark {kind:?} {id} inactive: {e}");
            }
        }
        result.map(|()| Response::new(proto::KeepAliveResponse {}))
    }

    async fn get_config(
        &self,
        request: Request<proto::GetConfigRequest>,
    ) -> Result<Response<proto::GetConfigResponse>, Status> {
        crate::metrics::grpc("get_config");
        let r = request.into_inner();
        let max_wait = self.state.config.config.max_wait;
        let wait = Duration::from_millis(r.wait_ms).min(max_wait);
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.state.subscribe_config_changes();
        let mut shutdown = self.state.shutdown_signal();
        let recheck = self.state.config.config.recheck_interval;
        loop {
            changes.borrow_and_update();
            let cluster = self.resolve_cluster(r.target.as_ref()).await?;
            let now = tokio::time::Instant::now();
            if cluster.config_version != r.known_version || now >= deadline || *shutdown.borrow() {
                return Ok(Response::new(proto::GetConfigResponse {
                    cluster_id: cluster.id,
                    version: cluster.config_version,
                    config: Some(config_to_proto(&cluster.config)),
                }));
            }
            let sleep = (deadline - now).min(recheck);
            let _parked = self.state.config_waiter();
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = crate::shutdown_requested(&mut shutdown) => {}
            }
        }
    }

    async fn list_schedulers(
        &self,
        request: Request<proto::ListSchedulersRequest>,
    ) -> Result<Response<proto::ListSchedulersResponse>, Status> {
        crate::metrics::grpc("list_schedulers");
        let r = request.into_inner();
        let host = r.host.as_ref().map(host_query).unwrap_or_default();
        let cluster = self.state.search_cluster(&host).await.map_err(internal)?;
        let Some(cluster) = cluster else {
            return Ok(Response::new(proto::ListSchedulersResponse::default()));
        };
        let store = &self.state.store;
        let active = |v: Vec<Instance>| {
            v.into_iter()
                .filter(|i| i.state == InstanceState::Active)
                .collect::<Vec<_>>()
        };
        let schedulers = active(
            store
                .list_instances(InstanceKind::Scheduler, Some(cluster.id))
                .await
                .map_err(internal)?,
        );
        let seed_peers = active(
            store
                .list_instances(InstanceKind::SeedPeer, Some(cluster.id))
                .await
                .map_err(internal)?,
        );
        Ok(Response::new(proto::ListSchedulersResponse {
            cluster_id: if schedulers.is_empty() { 0 } else { cluster.id },
            schedulers: schedulers.iter().map(scheduler_info).collect(),
            seed_peers: seed_peers.iter().map(seed_peer_info).collect(),
        }))
    }

    type SubscribePreheatStream = BoxStream<proto::PreheatRequest>;

    async fn subscribe_preheat(
        &self,
        request: Request<proto::SubscribePreheatRequest>,
    ) -> Result<Response<Self::SubscribePreheatStream>, Status> {
        crate::metrics::grpc("subscribe_preheat");
        let id = request.into_inner().scheduler_id;
        let scheduler = self
            .state
            .store
            .get_instance(InstanceKind::Scheduler, id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("scheduler {id} is not registered")))?;
        let (rx, guard) = self
            .state
            .preheat
            .subscribe(scheduler.id, scheduler.cluster_id)
            .await;
        // The guard lives as long as the response stream: dropping the stream (client gone,
        // shutdown) unregisters the scheduler.
        let stream = ReceiverStream::new(rx).map(move |item| {
            let _ = &guard;
            item
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_preheat_result(
        &self,
        request: Request<proto::PreheatResult>,
    ) -> Result<Response<proto::ReportPreheatResultResponse>, Status> {
        crate::metrics::grpc("report_preheat_result");
        let r = request.into_inner();
        let known = self.state.preheat.report(&r).await.map_err(internal)?;
        if !known {
            return Err(Status::not_found(format!(
                "no running preheat job {} with url {}",
                r.job_id, r.url
            )));
        }
        Ok(Response::new(proto::ReportPreheatResultResponse {}))
    }
}
