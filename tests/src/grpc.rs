//! gRPC clients for the processes under test: a daemon's local API over its Unix socket and
//! the scheduler over TCP.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};
use wire::proto::dfdaemon::dfdaemon_client::DfdaemonClient;
use wire::proto::dfdaemon::{StatsRequest, StatsResponse};
use wire::proto::scheduler::scheduler_client::SchedulerClient;
use wire::proto::scheduler::{StatTaskRequest, TaskInfo};

/// Opens a gRPC channel over the Unix socket at `socket`.
pub async fn unix_channel(socket: &Path) -> Result<Channel> {
    let path: PathBuf = socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .context("building the gRPC endpoint")?
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connecting to the daemon socket {}", socket.display()))
}

/// A client of the daemon's local API (`Download`, `Stats`) on the Unix socket `socket`.
pub async fn daemon_client(socket: &Path) -> Result<DfdaemonClient<Channel>> {
    Ok(DfdaemonClient::new(unix_channel(socket).await?))
}

/// The daemon's counters, via `Stats` on its Unix socket.
pub async fn daemon_stats(socket: &Path) -> Result<StatsResponse> {
    let mut c = daemon_client(socket).await?;
    let r = c
        .stats(StatsRequest {})
        .await
        .with_context(|| format!("Stats on {}", socket.display()))?;
    Ok(r.into_inner())
}

/// A client of the scheduler at `addr`.
pub async fn scheduler_client(addr: SocketAddr) -> Result<SchedulerClient<Channel>> {
    SchedulerClient::connect(format!("http://{addr}"))
        .await
        .with_context(|| format!("connecting to the scheduler at {addr}"))
}

/// What the scheduler at `addr` knows about `task_id` (hex), via `StatTask`.
pub async fn stat_task(addr: SocketAddr, task_id: &str) -> Result<TaskInfo> {
    let mut c = scheduler_client(addr).await?;
    let r = c
        .stat_task(StatTaskRequest {
            task_id: task_id.to_string(),
        })
        .await
        .with_context(|| format!("StatTask {task_id} on the scheduler at {addr}"))?;
    Ok(r.into_inner())
}
