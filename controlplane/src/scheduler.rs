//! Talking to schedulers: choosing the scheduler of a task ([`SchedulerPool`]), and
//! [`SchedulerClient`], the one owner of every scheduler RPC: the host announcement stream
//! that keeps this host known and delivers seed-peer triggers ([`host`]), and the per-task
//! calls.

pub mod host;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use wire::proto::scheduler::{
    scheduler_client::SchedulerClient as Grpc, AnnouncePeerRequest, AnnouncePeerResponse,
    AnnounceTaskRequest, DownloadTask, Host, LeaveTaskRequest, StatTaskRequest, TaskInfo,
    TaskMetadata,
};
use wire::tls::TlsConfig;
use wire::{PieceLayout, TaskId};

/// Why a call to the schedulers failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// No scheduler is configured.
    #[error("no scheduler configured")]
    NoneConfigured,
    /// The scheduler asked for is no longer configured (the manager named others).
    #[error("scheduler {addr}: no longer configured")]
    Gone {
        /// The scheduler's address.
        addr: String,
    },
    /// The scheduler refused the call or could not be reached.
    #[error("scheduler {addr}: {message}")]
    Failed {
        /// The scheduler's address.
        addr: String,
        /// The gRPC code of its answer (`Unavailable` when it could not be reached).
        code: Code,
        /// What it said.
        message: String,
    },
    /// Every scheduler tried failed; each one's failure, in the order tried.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    All(Vec<SchedulerError>),
}

impl SchedulerError {
    /// The failure of the call to `addr` that answered `status`.
    pub fn status(addr: &str, status: &tonic::Status) -> Self {
        Self::Failed {
            addr: addr.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Lazily connected channels to a list of schedulers.
#[derive(Debug, Clone, Default)]
pub struct SchedulerPool {
    schedulers: Vec<(String, Channel)>,
}

fn endpoint(addr: &str, tls: Option<&TlsConfig>) -> anyhow::Result<Channel> {
    let ep = wire::tls::grpc_endpoint(addr, tls)
        .map_err(|e| anyhow::anyhow!("scheduler {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(ep.connect_lazy())
}

/// Rendezvous weight of (scheduler address, task).
fn weight(addr: &str, task: &TaskId) -> u64 {
    let mut h = Sha256::new();
    h.update(addr.as_bytes());
    h.update(task.0);
    let d = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&d[..8]);
    u64::from_be_bytes(w)
}

impl SchedulerPool {
    /// Channels to `addrs` (`host:port`), connected on first use.
    pub fn new(addrs: &[String]) -> anyhow::Result<Self> {
        Self::with_tls(addrs, None)
    }

    /// Like [`SchedulerPool::new`], over TLS (`https://`) when `tls` is given.
    pub fn with_tls(addrs: &[String], tls: Option<&TlsConfig>) -> anyhow::Result<Self> {
        let mut schedulers = Vec::new();
        for a in addrs {
            schedulers.push((a.clone(), endpoint(a, tls)?));
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
        self.ordered(task).into_iter().next()
    }

    /// Every scheduler in the order a task tries them: its own first, then the next best.
    pub fn ordered(&self, task: &TaskId) -> Vec<(String, Channel)> {
        let mut v = self.schedulers.clone();
        v.sort_by_key(|(addr, _)| std::cmp::Reverse(weight(addr, task)));
        v
    }
}

/// Every scheduler RPC this daemon makes, in one place: the schedulers in use (replaceable
/// at run time: the manager's searcher feeds them), one host announcement loop per scheduler
/// ([`host`]), and the per-task calls — `AnnouncePeer` streams of the runs, `AnnounceTask`
/// of held and imported tasks, `StatTask`, `LeaveTask`.
pub struct SchedulerClient {
    host: Host,
    pool: ArcSwap<SchedulerPool>,
    loops: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    tls: Option<TlsConfig>,
    /// What runs the schedulers' commands; host loops start once it is set.
    commands: OnceLock<Arc<dyn HostCommands>>,
}

impl std::fmt::Debug for SchedulerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerClient")
            .field("host", &self.host.id)
            .field("addrs", &self.addrs())
            .finish_non_exhaustive()
    }
}

/// What a scheduler's host stream asks of this host, and what this host re-announces when
/// that stream is (re)established.
pub trait HostCommands: Send + Sync {
    /// Runs a `DownloadTask` (seed trigger or preheat) sent by the scheduler at `addr`.
    /// Returns the task and its layout when this host already holds it completely: the
    /// client then announces it to `addr` instead of downloading.
    fn download(&self, addr: &str, task: DownloadTask) -> Option<(TaskId, PieceLayout)>;
    /// The complete tasks this host holds that no download keeps registered (restored after
    /// a restart, or whose stream ended).
    fn held_tasks(&self) -> Vec<(TaskId, PieceLayout)>;
    /// Every piece digest of the held task `id`, in order (32 bytes each), and every piece's
    /// crc32c (4 bytes little-endian each), for a seed host's announcement; empty when the
    /// task is gone or a piece cannot be read.
    fn piece_digests(&self, id: TaskId) -> futures::future::BoxFuture<'static, (Vec<u8>, Vec<u8>)>;
}

impl SchedulerClient {
    /// A client of the schedulers at `addrs` announcing `host`, every channel over TLS when
    /// `tls` is given (`scheduler.tls`). No host loop runs before [`SchedulerClient::start`].
    pub fn new(host: Host, addrs: &[String], tls: Option<TlsConfig>) -> anyhow::Result<Self> {
        Ok(Self {
            host,
            pool: ArcSwap::from_pointee(SchedulerPool::with_tls(addrs, tls.as_ref())?),
            loops: Mutex::new(HashMap::new()),
            tls,
            commands: OnceLock::new(),
        })
    }

    /// This host as announced to schedulers.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The current pool.
    pub fn pool(&self) -> Arc<SchedulerPool> {
        self.pool.load_full()
    }

    /// Addresses in use.
    pub fn addrs(&self) -> Vec<String> {
        self.pool
            .load()
            .all()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Starts the host announcement loops; `commands` runs what the schedulers send.
    pub fn start(self: &Arc<Self>, commands: Arc<dyn HostCommands>) {
        let _ = self.commands.set(commands);
        self.reconcile();
    }

    /// Switches to `addrs` (keeping the channels of addresses already in use) and starts or
    /// stops host announcement loops to match. Returns whether anything changed.
    pub fn replace(self: &Arc<Self>, addrs: &[String]) -> anyhow::Result<bool> {
        let old = self.pool.load_full();
        let mut sorted_new: Vec<&String> = addrs.iter().collect();
        sorted_new.sort();
        sorted_new.dedup();
        let mut sorted_old: Vec<&String> = old.all().iter().map(|(a, _)| a).collect();
        sorted_old.sort();
        if sorted_new == sorted_old {
            return Ok(false);
        }
        let mut schedulers = Vec::new();
        for a in sorted_new {
            let ch = match old.all().iter().find(|(o, _)| o == a) {
                Some((_, ch)) => ch.clone(),
                None => endpoint(a, self.tls.as_ref())?,
            };
            schedulers.push((a.clone(), ch));
        }
        tracing::info!(
            "schedulers now {:?}",
            schedulers.iter().map(|(a, _)| a).collect::<Vec<_>>()
        );
        self.pool.store(Arc::new(SchedulerPool { schedulers }));
        self.reconcile();
        Ok(true)
    }

    /// Starts a host loop for every scheduler without one, stops loops of schedulers that
    /// left (nothing before [`SchedulerClient::start`]).
    fn reconcile(self: &Arc<Self>) {
        let Some(commands) = self.commands.get() else {
            return;
        };
        let pool = self.pool.load_full();
        let Ok(mut loops) = self.loops.lock() else {
            return;
        };
        loops.retain(|addr, h| {
            let keep = pool.all().iter().any(|(a, _)| a == addr);
            if !keep {
                h.abort();
            }
            keep
        });
        for (addr, ch) in pool.all() {
            loops.entry(addr.clone()).or_insert_with(|| {
                tokio::spawn(host::host_loop(
                    self.clone(),
                    commands.clone(),
                    addr.clone(),
                    ch.clone(),
                ))
            });
        }
    }

    /// Opens an `AnnouncePeer` stream of task `id` with scheduler `addr`; the error says
    /// which scheduler and why.
    pub async fn announce_peer(
        &self,
        id: &TaskId,
        addr: &str,
        requests: ReceiverStream<AnnouncePeerRequest>,
    ) -> Result<tonic::Streaming<AnnouncePeerResponse>, SchedulerError> {
        let channel = self
            .pool()
            .ordered(id)
            .into_iter()
            .find_map(|(a, c)| (a == addr).then_some(c))
            .ok_or_else(|| SchedulerError::Gone {
                addr: addr.to_string(),
            })?;
        let resp = Grpc::new(channel)
            .announce_peer(requests)
            .await
            .map_err(|e| SchedulerError::status(addr, &e))?;
        Ok(resp.into_inner())
    }

    /// Tells the task's own scheduler that this host holds the whole task `id`.
    pub async fn announce_complete(&self, id: TaskId, layout: PieceLayout) {
        if let Some((addr, channel)) = self.pool().pick(&id) {
            self.announce_complete_to(addr, channel, id, layout).await;
        }
    }

    /// Tells the scheduler at `addr` that this host holds the whole task `id`
    /// (`AnnounceTask`): it serves as a done parent while this host's announcement stream
    /// stays open.
    pub(crate) async fn announce_complete_to(
        &self,
        addr: String,
        channel: Channel,
        id: TaskId,
        layout: PieceLayout,
    ) {
        // A seed host's digests are trusted by the scheduler (it fetched the task from the
        // origin): sent, with the crcs, so a scheduler that restarted (or forgot the task)
        // hands them out again. Other hosts send none.
        let (piece_digests, piece_crcs) = match self.commands.get() {
            Some(c) if self.host.r#type() == wire::proto::scheduler::HostType::Seed => {
                c.piece_digests(id).await
            }
            _ => (Vec::new(), Vec::new()),
        };
        let req = AnnounceTaskRequest {
            task_id: id.to_hex(),
            peer_id: format!("{}-{:016x}", self.host.id, rand::random::<u64>()),
            host: Some(self.host.clone()),
            metadata: Some(TaskMetadata {
                content_length: layout.content_length(),
                piece_length: layout.piece_length(),
            }),
            piece_count: layout.piece_count(),
            piece_digests,
            piece_crcs,
        };
        if let Err(e) = Grpc::new(channel).announce_task(req).await {
            tracing::warn!(task = %id, "announcing a held task to {addr}: {}", e.message());
        }
    }

    /// Peer id this host uses for an imported task (stable, so a second import replaces the
    /// first at the scheduler).
    fn cache_peer_id(&self, id: &TaskId) -> String {
        format!("{}-cache-{}", self.host.id, &id.to_hex()[..16])
    }

    /// Announces the complete imported task `id` to its scheduler (the next ones by
    /// rendezvous order when it does not answer), with the digest of every piece when this
    /// host read them itself (`piece_digests`, else empty), and their crc32cs (`piece_crcs`,
    /// 4 bytes little-endian each, else empty). Returns the scheduler that accepted it.
    pub async fn announce_cached(
        &self,
        id: &TaskId,
        layout: PieceLayout,
        piece_digests: Vec<u8>,
        piece_crcs: Vec<u8>,
    ) -> Result<String, SchedulerError> {
        let order = self.pool().ordered(id);
        if order.is_empty() {
            return Err(SchedulerError::NoneConfigured);
        }
        let mut errors = Vec::new();
        for (addr, ch) in order {
            let req = AnnounceTaskRequest {
                task_id: id.to_hex(),
                peer_id: self.cache_peer_id(id),
                host: Some(self.host.clone()),
                metadata: Some(TaskMetadata {
                    content_length: layout.content_length(),
                    piece_length: layout.piece_length(),
                }),
                piece_count: layout.piece_count(),
                piece_digests: piece_digests.clone(),
                piece_crcs: piece_crcs.clone(),
            };
            match Grpc::new(ch).announce_task(req).await {
                Ok(_) => return Ok(addr),
                Err(e) => errors.push(SchedulerError::status(&addr, &e)),
            }
        }
        Err(SchedulerError::All(errors))
    }

    /// Asks the task's scheduler (then the next ones) what it knows of `id`: `Ok(None)`
    /// when a scheduler answered that it does not know the task, `Err` when none answered.
    pub async fn stat_task(&self, id: &TaskId) -> Result<Option<TaskInfo>, SchedulerError> {
        let order = self.pool().ordered(id);
        if order.is_empty() {
            return Err(SchedulerError::NoneConfigured);
        }
        let mut errors = Vec::new();
        for (addr, ch) in order {
            let req = StatTaskRequest {
                task_id: id.to_hex(),
            };
            match Grpc::new(ch).stat_task(req).await {
                Ok(r) => return Ok(Some(r.into_inner())),
                Err(s) if s.code() == Code::NotFound => return Ok(None),
                Err(s) => errors.push(SchedulerError::status(&addr, &s)),
            }
        }
        Err(SchedulerError::All(errors))
    }

    /// Sends `LeaveTask` for task `id` of this host to every scheduler. Returns whether at
    /// least one scheduler took it, and the errors of the others.
    pub async fn leave_task(&self, id: &TaskId) -> (bool, String) {
        let mut told = false;
        let mut errors = Vec::new();
        for (addr, ch) in self.pool().all().iter().cloned() {
            let req = LeaveTaskRequest {
                task_id: id.to_hex(),
                host_id: self.host.id.clone(),
            };
            match Grpc::new(ch).leave_task(req).await {
                Ok(_) => told = true,
                Err(s) => errors.push(format!("scheduler {addr}: {}", s.message())),
            }
        }
        (told, errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(n: usize) -> Vec<TaskId> {
        (0..n)
            .map(|i| TaskId::from_content_digest(&format!("sha256:{i}")))
            .collect()
    }

    #[tokio::test]
    async fn adding_a_scheduler_moves_about_one_nth_of_the_tasks() {
        let three: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}:8002")).collect();
        let mut four = three.clone();
        four.push("10.0.0.4:8002".into());
        let a = SchedulerPool::new(&three).expect("pool");
        let b = SchedulerPool::new(&four).expect("pool");
        let ts = tasks(4000);
        let moved = ts
            .iter()
            .filter(|t| a.pick(t).map(|p| p.0) != b.pick(t).map(|p| p.0))
            .count();
        // Expected 1/4 of the tasks; every moved task moved to the new scheduler.
        assert!((800..1200).contains(&moved), "moved {moved} of 4000");
        for t in &ts {
            let (before, after) = (a.pick(t).map(|p| p.0), b.pick(t).map(|p| p.0));
            if before != after {
                assert_eq!(after.as_deref(), Some("10.0.0.4:8002"));
            }
        }
    }

    #[tokio::test]
    async fn every_scheduler_gets_a_share_and_order_is_stable() {
        let addrs: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:8002")).collect();
        let p = SchedulerPool::new(&addrs).expect("pool");
        let mut counts = HashMap::new();
        for t in tasks(4000) {
            let order = p.ordered(&t);
            assert_eq!(order.len(), 4);
            assert_eq!(Some(order[0].0.clone()), p.pick(&t).map(|x| x.0));
            *counts.entry(order[0].0.clone()).or_insert(0) += 1;
        }
        for a in &addrs {
            let c = counts.get(a).copied().unwrap_or(0);
            assert!((800..1200).contains(&c), "{a} got {c} of 4000");
        }
    }
}
