//! Talking to schedulers: choosing the scheduler of a task, and the host announcement stream
//! that keeps this host known and delivers seed-peer triggers.

use crate::daemon::Context;
use crate::task::TaskSpec;
use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;
use wire::proto::scheduler::{
    host_command, scheduler_client::SchedulerClient, AnnounceHostRequest, AnnounceTaskRequest,
    TaskMetadata,
};
use wire::tls::TlsConfig;
use wire::TaskId;

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

/// The schedulers in use, replaceable at run time (the manager's searcher feeds it), with one
/// host announcement loop per scheduler.
#[derive(Debug)]
pub struct SchedulerSet {
    pool: ArcSwap<SchedulerPool>,
    loops: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    tls: Option<TlsConfig>,
}

impl SchedulerSet {
    /// A set starting with `addrs`.
    pub fn new(addrs: &[String]) -> anyhow::Result<Self> {
        Self::with_tls(addrs, None)
    }

    /// A set starting with `addrs`, every channel over TLS when `tls` is given
    /// (`scheduler.tls`).
    pub fn with_tls(addrs: &[String], tls: Option<TlsConfig>) -> anyhow::Result<Self> {
        Ok(Self {
            pool: ArcSwap::from_pointee(SchedulerPool::with_tls(addrs, tls.as_ref())?),
            loops: Mutex::new(HashMap::new()),
            tls,
        })
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

    /// Switches to `addrs` (keeping the channels of addresses already in use) and starts or
    /// stops host announcement loops to match. Returns whether anything changed.
    pub fn replace(&self, ctx: &Arc<Context>, addrs: &[String]) -> anyhow::Result<bool> {
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
        self.reconcile(ctx);
        Ok(true)
    }

    /// Starts a host loop for every scheduler without one, stops loops of schedulers that
    /// left.
    pub fn reconcile(&self, ctx: &Arc<Context>) {
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
            loops
                .entry(addr.clone())
                .or_insert_with(|| tokio::spawn(host_loop(ctx.clone(), addr.clone(), ch.clone())));
        }
    }
}

/// First wait before announcing this host to a scheduler again (jittered, doubling).
const HOST_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between tries to announce this host to a scheduler (before jitter).
const HOST_RETRY_MAX: Duration = Duration::from_secs(2);

/// Keeps this host announced to one scheduler, reconnecting with jittered backoff, and runs the seed
/// triggers it receives. Runs until the process exits.
pub async fn host_loop(ctx: Arc<Context>, addr: String, channel: Channel) {
    let new_backoff = || damselfly_common::reconnect_backoff(HOST_RETRY_MIN, HOST_RETRY_MAX);
    let mut backoff = new_backoff();
    let mut last_error: Option<String> = None;
    loop {
        let mut client = SchedulerClient::new(channel.clone());
        let req = AnnounceHostRequest {
            host: Some(ctx.host.clone()),
        };
        match client.announce_host(req).await {
            Ok(resp) => {
                last_error = None;
                tracing::info!("announced host {} to scheduler {addr}", ctx.host.id);
                backoff = new_backoff();
                announce_held_tasks(&ctx, &addr, &channel);
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(cmd)) => handle_command(&ctx, &addr, &channel, cmd.command),
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
            Err(e) => {
                // Said once per distinct error (a TLS rejection repeats at every retry).
                let mut why = error_chain(&e);
                // With TLS 1.3 the server checks the client certificate after the client's
                // side of the handshake is done: the refusal may arrive as a fatal alert or
                // only as a closed connection, depending on timing.
                if ctx.config.scheduler.tls.is_some()
                    && why.contains("transport error")
                    && !why.contains("alert")
                {
                    why.push_str(
                        " (TLS: the scheduler may have refused this host's certificate; its log says why)",
                    );
                }
                if last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!("announcing host to scheduler {addr} failed: {why}");
                    last_error = Some(why);
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(HOST_RETRY_MAX)).await;
    }
}

/// A status's message followed by its sources (a transport error says why only there, e.g.
/// which certificate check failed).
pub fn error_chain(status: &tonic::Status) -> String {
    let mut s = status.message().to_string();
    let mut src = std::error::Error::source(status);
    while let Some(e) = src {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = e.source();
    }
    s
}

/// Runs a command from the scheduler at `addr`. A seed trigger registers with that
/// scheduler first (it waits for this seed's registration); a trigger for a task this host
/// already holds completely is answered with `AnnounceTask` there instead of a download. A
/// `DownloadTask` with `from_peers` (a preheat whose scope takes in this host) is downloaded
/// like `dfget` would: parents from the scheduler, the origin only if it says so.
fn handle_command(
    ctx: &Arc<Context>,
    addr: &str,
    channel: &Channel,
    cmd: Option<host_command::Command>,
) {
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
            if let Some(store) = ctx.storage.get(&id).filter(|s| s.is_complete()) {
                tracing::info!(task = %id, "seed trigger for a task held completely: announcing it to {addr}");
                tokio::spawn(announce_complete(
                    ctx.clone(),
                    addr.to_owned(),
                    channel.clone(),
                    id,
                    store.layout(),
                ));
                return;
            }
            if t.from_peers {
                tracing::info!(task = %id, url = %source.url, "preheat: fetching from peers");
            } else {
                tracing::info!(task = %id, url = %source.url, "seed trigger: fetching from the origin");
            }
            // The content digest travels with the source (or is in a blob URL): what the
            // origin sends is checked against it before this seed counts as holding it.
            let digest = match wire::task::content_digest(&source.url, &source.digest) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(task = %id, "seed trigger with a bad source: {e}");
                    return;
                }
            };
            let spec = TaskSpec {
                id,
                url: source.url,
                headers: source
                    .headers
                    .into_iter()
                    .map(|h| (h.name, h.value))
                    .collect(),
                piece_length: t.piece_length,
                // A preheat's scope beyond the first seed: a normal peer's download.
                back_to_source: !t.from_peers,
                disable_back_to_source: false,
                rate_limit: 0,
                scheduler: Some(addr.to_owned()),
                priority: 0,
                digest,
            };
            // The run reports through the scheduler; nobody waits on it locally.
            drop(ctx.tasks.start_or_join(ctx.clone(), spec));
        }
        None => tracing::debug!("empty host command"),
    }
}

/// Announces to the scheduler at `addr` every complete task it is the scheduler of and that
/// no finished download keeps registered (tasks restored after a restart, or whose stream
/// ended): each time the host stream is (re)established, since such announcements last as
/// long as the host stream.
fn announce_held_tasks(ctx: &Arc<Context>, addr: &str, channel: &Channel) {
    let pool = ctx.schedulers.pool();
    for t in ctx.storage.tasks() {
        let id = t.id();
        if !t.is_complete() || ctx.tasks.is_serving(&id) || ctx.tasks.is_running(&id) {
            continue;
        }
        if pool.pick(&id).is_some_and(|(a, _)| a == addr) {
            tracing::info!(task = %id, "announcing a held task to {addr}");
            tokio::spawn(announce_complete(
                ctx.clone(),
                addr.to_owned(),
                channel.clone(),
                id,
                t.layout(),
            ));
        }
    }
}

/// Tells the scheduler at `addr` that this host holds the whole task `id` (`AnnounceTask`):
/// it serves as a done parent while this host's announcement stream stays open.
pub(crate) async fn announce_complete(
    ctx: Arc<Context>,
    addr: String,
    channel: Channel,
    id: TaskId,
    layout: wire::PieceLayout,
) {
    let req = AnnounceTaskRequest {
        task_id: id.to_hex(),
        peer_id: format!("{}-{:016x}", ctx.host.id, rand::random::<u64>()),
        host: Some(ctx.host.clone()),
        metadata: Some(TaskMetadata {
            content_length: layout.content_length(),
            piece_length: layout.piece_length(),
        }),
        piece_count: layout.piece_count(),
        // A seed host's digests are trusted by the scheduler (it fetched the task from the
        // origin): sent, so a scheduler that restarted (or forgot the task) hands them out
        // again. Other hosts send none.
        piece_digests: if ctx.host.r#type() == wire::proto::scheduler::HostType::Seed {
            seed_piece_digests(&ctx, id).await
        } else {
            Vec::new()
        },
    };
    if let Err(e) = SchedulerClient::new(channel).announce_task(req).await {
        tracing::warn!(task = %id, "announcing a held task to {addr}: {}", e.message());
    }
}

/// Every piece digest of the task `id` this seed host holds, in order: the ones known, and,
/// for pieces whose digest a daemon restart forgot (digests are not persisted), the digest
/// of the bytes on disk (then remembered). Empty when the task is gone or a piece cannot be
/// read.
async fn seed_piece_digests(ctx: &Arc<Context>, id: TaskId) -> Vec<u8> {
    let Some(store) = ctx.storage.get(&id) else {
        return Vec::new();
    };
    if let Some(all) = store.all_digests() {
        return all;
    }
    let computed = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        for n in 0..store.layout().piece_count() {
            if store.piece_digest(n).is_some() {
                continue;
            }
            if let Err(e) = store.read_piece(n, &mut buf) {
                tracing::warn!(task = %id, piece = n, "reading a held piece for its digest: {e}");
                return None;
            }
            let _ = store.set_digest(n, wire::piece_digest(&buf));
        }
        store.all_digests()
    })
    .await;
    computed.ok().flatten().unwrap_or_default()
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
