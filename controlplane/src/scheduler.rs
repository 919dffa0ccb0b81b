//! Talking to schedulers: choosing the scheduler of a task, and the host announcement stream
//! that keeps this host known and delivers seed-peer triggers.

use crate::daemon::Context;
use crate::task::TaskSpec;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use wire::proto::scheduler::{
    host_command, scheduler_client::SchedulerClient, AnnounceHostRequest,
};
use wire::TaskId;

/// Lazily connected channels to every configured scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerPool {
    schedulers: Vec<(String, Channel)>,
}

impl SchedulerPool {
    /// Channels to `addrs` (`host:port`), connected on first use.
    pub fn new(addrs: &[String]) -> anyhow::Result<Self> {
        let mut schedulers = Vec::new();
        for a in addrs {
            let ep = Endpoint::from_shared(format!("http://{a}"))
                .map_err(|e| anyhow::anyhow!("scheduler address {a:?}: {e}"))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10));
            schedulers.push((a.clone(), ep.connect_lazy()));
        }
        Ok(Self { schedulers })
    }

    /// Every scheduler (address, channel).
    pub fn all(&self) -> &[(String, Channel)] {
        &self.schedulers
    }

    /// The scheduler of `task`: highest rendezvous weight of (address, task id), so that every
    /// daemon with the same list sends a task to the same scheduler, and adding a scheduler
    /// moves only about 1/n of the tasks.
    pub fn pick(&self, task: &TaskId) -> Option<(String, Channel)> {
        self.schedulers
            .iter()
            .max_by_key(|(addr, _)| {
                let mut h = Sha256::new();
                h.update(addr.as_bytes());
                h.update(task.0);
                let d = h.finalize();
                let mut w = [0u8; 8];
                w.copy_from_slice(&d[..8]);
                u64::from_be_bytes(w)
            })
            .cloned()
    }
}

/// Keeps this host announced to one scheduler, reconnecting with backoff, and runs the seed
/// triggers it receives. Runs until the process exits.
pub async fn host_loop(ctx: Arc<Context>, addr: String, channel: Channel) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = SchedulerClient::new(channel.clone());
        let req = AnnounceHostRequest {
            host: Some(ctx.host.clone()),
        };
        match client.announce_host(req).await {
            Ok(resp) => {
                tracing::info!("announced host {} to scheduler {addr}", ctx.host.id);
                backoff = Duration::from_millis(100);
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(cmd)) => handle_command(&ctx, cmd.command),
                        Ok(None) => {
                            tracing::warn!("scheduler {addr} closed the host stream");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "host stream to scheduler {addr} failed: {}",
                                e.message()
                            );
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("announcing host to {addr}: {}", e.message()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn handle_command(ctx: &Arc<Context>, cmd: Option<host_command::Command>) {
    match cmd {
        Some(host_command::Command::DownloadTask(t)) => {
            let Ok(id) = TaskId::parse(&t.task_id) else {
                tracing::warn!("scheduler sent a bad task id {:?}", t.task_id);
                return;
            };
            let Some(source) = t.source else {
                tracing::warn!("scheduler sent a seed trigger without a source for {id}");
                return;
            };
            tracing::info!(task = %id, url = %source.url, "seed trigger: fetching from the origin");
            let spec = TaskSpec {
                id,
                url: source.url,
                headers: source
                    .headers
                    .into_iter()
                    .map(|h| (h.name, h.value))
                    .collect(),
                piece_length: t.piece_length,
                back_to_source: true,
                disable_back_to_source: false,
                rate_limit: 0,
            };
            // The run reports through the scheduler; nobody waits on it locally.
            drop(ctx.tasks.start_or_join(ctx.clone(), spec));
        }
        None => tracing::debug!("empty host command"),
    }
}
