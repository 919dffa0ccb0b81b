//! Preheat jobs: have seed peers fetch a URL, or an image's layers, before peers ask.
//!
//! Flow of one job: REST creates it (`pending`); a task resolves it to targets (the URL, or
//! the image's layer blobs through [`registry`](crate::registry)) and marks it `running`;
//! each target is sent as a [`PreheatRequest`] to one scheduler of the job's cluster that
//! holds a `SubscribePreheat` stream open (round robin; waiting up to
//! `preheat.dispatch_timeout` for one to connect); the scheduler has a seed peer fetch it
//! (and, by the job's scope, other hosts get it from peers) and calls `ReportPreheatResult`
//! with each host's outcome. The job ends `success` when every target succeeded,
//! `failure` on the first failed one or after `preheat.job_timeout`.
//!
//! Jobs run in this process; their state is written to the store at every change. A job
//! still pending or running when the manager stops (or dies) is picked up by the next start
//! ([`Preheater::resume_unfinished`]): run again from the start under its id when its
//! arguments were stored ([`ResumeArgs`]: everything but credentials and headers), else
//! failed with [`NOT_RESUMABLE`]. A scheduler must subscribe to the manager that holds the
//! job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Mutex, Notify};
use tonic::Status;

use crate::config::PreheatConfig;
use crate::model::{
    JobState, NewPreheatJob, PreheatJob, PreheatKind, PreheatTarget, TargetHost, Timestamp,
};
use crate::proto;
use crate::registry::{Credentials, ImageRef, Resolver};
use crate::store::{Store, StoreError};

mod run;

/// Capacity of each scheduler's preheat stream; a full stream counts as unavailable.
const STREAM_CAPACITY: usize = 256;

/// Most URLs or images in one job.
pub const MAX_URLS: usize = 100;

impl PreheatArgs {
    /// `url` (when set) then `urls`, without blanks and repeats, in order.
    pub fn all_urls(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for u in std::iter::once(&self.url).chain(&self.urls) {
            let u = u.trim();
            if !u.is_empty() && !out.iter().any(|o| o == u) {
                out.push(u.to_owned());
            }
        }
        out
    }
}

/// What to preheat (the REST request's arguments).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreheatArgs {
    /// File or image.
    pub kind: Option<PreheatKind>,
    /// URL, image reference or manifest URL (may be empty when `urls` is not).
    pub url: String,
    /// More URLs or images of the same kind, preheated by the same job (Dragonfly's
    /// `urls`); the job's targets are those of `url` and of each of these, in order.
    pub urls: Vec<String>,
    /// Headers for the origin requests.
    pub headers: Vec<(String, String)>,
    /// Target cluster; `None`: the default cluster.
    pub cluster_id: Option<u64>,
    /// Registry credentials (images).
    pub credentials: Option<Credentials>,
    /// Platform of a multi-platform image; empty: `preheat.platform`.
    pub platform: String,
    /// Plain HTTP to the registry (image references without a scheme).
    pub insecure: bool,
    /// Task tag, passed on to the scheduler.
    pub tag: String,
    /// Task application, passed on to the scheduler.
    pub application: String,
    /// Content digest of a file (`sha256:<hex>`, any case); empty: unknown (a registry blob
    /// URL still names its own). Passed on to the scheduler: the seed peer checks the content
    /// against it; the task id follows [`wire::TaskId::for_download`].
    pub digest: String,
    /// How long to wait for the job's results once dispatched; `None`: `preheat.job_timeout`
    /// (the open API's `timeout`).
    pub timeout: Option<Duration>,
    /// Which hosts are to hold each target: `single_seed_peer` (or empty), `all_seed_peers`
    /// or `all_peers` (Dragonfly's scopes).
    pub scope: String,
    /// With `all_seed_peers` / `all_peers`: at most this many hosts (1-200; 0: unset).
    pub count: u32,
    /// With `all_seed_peers` / `all_peers`: this share of the hosts (1-100; 0: unset), when
    /// `count` is unset.
    pub percentage: u32,
    /// With `all_seed_peers` / `all_peers`: exactly the hosts with these IPs (before `count`
    /// and `percentage`).
    pub ips: Vec<String>,
}

/// What a restarted manager needs to run a job again: its arguments without credentials
/// and headers (jobs with those are not resumable: secrets are not stored). Stored as JSON
/// in the job's `resume_args`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ResumeArgs {
    /// The job's URLs or images.
    pub urls: Vec<String>,
    /// Platform of a multi-platform image.
    pub platform: String,
    /// Plain HTTP to the registry.
    pub insecure: bool,
    /// Task tag.
    pub tag: String,
    /// Task application.
    pub application: String,
    /// A file's content digest.
    pub digest: String,
    /// The job's own result wait in milliseconds, if any.
    pub timeout_ms: Option<u64>,
    /// Scope.
    pub scope: String,
    /// Scope count.
    pub count: u32,
    /// Scope percentage.
    pub percentage: u32,
    /// Scope IPs.
    pub ips: Vec<String>,
}

impl ResumeArgs {
    /// The resumable part of `args`; `None` when it carries credentials or headers.
    pub fn of(args: &PreheatArgs) -> Option<Self> {
        if args.credentials.is_some() || !args.headers.is_empty() {
            return None;
        }
        Some(Self {
            urls: args.all_urls(),
            platform: args.platform.clone(),
            insecure: args.insecure,
            tag: args.tag.clone(),
            application: args.application.clone(),
            digest: args.digest.clone(),
            timeout_ms: args
                .timeout
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            scope: args.scope.clone(),
            count: args.count,
            percentage: args.percentage,
            ips: args.ips.clone(),
        })
    }

    /// The arguments of the job again (kind and cluster from the job's row).
    pub fn into_args(self, kind: PreheatKind, cluster_id: Option<u64>) -> PreheatArgs {
        PreheatArgs {
            kind: Some(kind),
            url: String::new(),
            urls: self.urls,
            headers: Vec::new(),
            cluster_id,
            credentials: None,
            platform: self.platform,
            insecure: self.insecure,
            tag: self.tag,
            application: self.application,
            digest: self.digest,
            timeout: self.timeout_ms.map(Duration::from_millis),
            scope: self.scope,
            count: self.count,
            percentage: self.percentage,
            ips: self.ips,
        }
    }
}

/// Why a restarted manager failed a job it could not resume.
pub const NOT_RESUMABLE: &str = "manager restarted before the job finished; the job had \
credentials or headers, which are not stored: create it again";

/// Scopes of a preheat (Dragonfly's).
pub const SCOPES: &[&str] = &["single_seed_peer", "all_seed_peers", "all_peers"];

/// Errors creating a job.
#[derive(Debug, thiserror::Error)]
pub enum PreheatError {
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Sender = mpsc::Sender<Result<proto::PreheatRequest, Status>>;

struct Subscriber {
    cluster_id: u64,
    generation: u64,
    tx: Sender,
}

struct RunningJob {
    targets: Vec<PreheatTarget>,
    done: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    subscribers: HashMap<u64, Subscriber>,
    jobs: HashMap<u64, RunningJob>,
    next_generation: u64,
    round_robin: usize,
    closed: bool,
}

struct Shared {
    store: Arc<dyn Store>,
    config: PreheatConfig,
    inner: Mutex<Inner>,
    subscribers_changed: Notify,
    shutdown: watch::Receiver<bool>,
}

/// Runs preheat jobs and holds the schedulers' preheat streams. Cheap to clone.
#[derive(Clone)]
pub struct Preheater {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Preheater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preheater").finish_non_exhaustive()
    }
}

impl Preheater {
    /// A preheater on `store`; its streams end when `shutdown` turns true.
    pub fn new(
        store: Arc<dyn Store>,
        config: PreheatConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                config,
                inner: Mutex::new(Inner::default()),
                subscribers_changed: Notify::new(),
                shutdown,
            }),
        }
    }

    /// Validates and stores a job, then runs it in the background.
    pub async fn create(&self, args: PreheatArgs) -> Result<PreheatJob, PreheatError> {
        let kind = args.kind.unwrap_or(PreheatKind::File);
        let urls = args.all_urls();
        if urls.is_empty() {
            return Err(PreheatError::Invalid("url or urls is required".into()));
        }
        if urls.len() > MAX_URLS {
            return Err(PreheatError::Invalid(format!(
                "at most {MAX_URLS} urls per job, got {}",
                urls.len()
            )));
        }
        if !args.scope.is_empty() && !SCOPES.contains(&args.scope.as_str()) {
            return Err(PreheatError::Invalid(format!(
                "unknown scope {:?} (one of {SCOPES:?})",
                args.scope
            )));
        }
        let spread = matches!(args.scope.as_str(), "all_seed_peers" | "all_peers");
        if !spread && (args.count != 0 || args.percentage != 0 || !args.ips.is_empty()) {
            return Err(PreheatError::Invalid(
                "count, percentage and ips go with the all_seed_peers and all_peers scopes".into(),
            ));
        }
        if args.count > 200 {
            return Err(PreheatError::Invalid(format!(
                "count must be 1-200, got {}",
                args.count
            )));
        }
        if args.percentage > 100 {
            return Err(PreheatError::Invalid(format!(
                "percentage must be 1-100, got {}",
                args.percentage
            )));
        }
        if let Some(bad) = args
            .ips
            .iter()
            .find(|ip| ip.parse::<std::net::IpAddr>().is_err())
        {
            return Err(PreheatError::Invalid(format!(
                "ips: {bad:?} is not an IP address"
            )));
        }
        if !args.digest.is_empty() && (kind == PreheatKind::Image || urls.len() != 1) {
            return Err(PreheatError::Invalid(
                "digest is for a file preheat of one url; an image's blobs carry their own".into(),
            ));
        }
        for u in &urls {
            match kind {
                PreheatKind::File => {
                    let url = url::Url::parse(u)
                        .map_err(|e| PreheatError::Invalid(format!("bad url {u:?}: {e}")))?;
                    if !matches!(url.scheme(), "http" | "https") {
                        return Err(PreheatError::Invalid(format!(
                            "url must be http or https, got {u:?}"
                        )));
                    }
                    if !args.digest.is_empty() && wire::task::sha256_digest(&args.digest).is_none()
                    {
                        return Err(PreheatError::Invalid(format!(
                            "digest {:?} must look like sha256:<64 hex characters>",
                            args.digest
                        )));
                    }
                    wire::task::content_digest(u, &args.digest)
                        .map_err(|e| PreheatError::Invalid(e.to_string()))?;
                }
                PreheatKind::Image => {
                    ImageRef::parse(u, args.insecure)
                        .map_err(|e| PreheatError::Invalid(e.to_string()))?;
                }
            }
        }
        let store = &self.shared.store;
        let cluster = match args.cluster_id {
            Some(id) => store.get_cluster(id).await?,
            None => store.default_cluster().await?,
        }
        .ok_or_else(|| PreheatError::Invalid("no such cluster".into()))?;
        let resume_args = match ResumeArgs::of(&args) {
            Some(r) => {
                serde_json::to_string(&r).map_err(|e| PreheatError::Invalid(e.to_string()))?
            }
            None => String::new(),
        };
        let job = store
            .create_job(
                NewPreheatJob {
                    kind,
                    url: urls.join(" "),
                    cluster_id: Some(cluster.id),
                    resume_args,
                },
                Timestamp::now(),
            )
            .await?;
        let this = self.clone();
        let id = job.id;
        tokio::spawn(async move { this.run(id, kind, cluster.id, args).await });
        Ok(job)
    }

    /// Picks up the jobs a previous run of the manager left pending or running: each one
    /// with stored arguments runs again from the start under its id (targets a seed peer
    /// already holds succeed at once); the others (credentials or headers, not stored; or
    /// rows from before resumption existed) fail with [`NOT_RESUMABLE`]. Returns (resumed,
    /// failed).
    pub async fn resume_unfinished(&self) -> Result<(usize, usize), StoreError> {
        let store = &self.shared.store;
        let (mut resumed, mut failed) = (0, 0);
        for (job, raw) in store.unfinished_jobs().await? {
            let args = (!raw.is_empty())
                .then(|| serde_json::from_str::<ResumeArgs>(&raw).ok())
                .flatten()
                .filter(|a| !a.urls.is_empty());
            let (Some(args), Some(cluster_id)) = (args, job.cluster_id) else {
                store
                    .update_job(
                        job.id,
                        JobState::Failure,
                        &job.targets,
                        NOT_RESUMABLE,
                        Timestamp::now(),
                    )
                    .await?;
                failed += 1;
                continue;
            };
            tracing::info!(job = job.id, url = %job.url, "resuming a preheat job left unfinished by a restart");
            store
                .update_job(job.id, JobState::Pending, &[], "", Timestamp::now())
                .await?;
            let this = self.clone();
            let args = args.into_args(job.kind, Some(cluster_id));
            let (id, kind) = (job.id, job.kind);
            tokio::spawn(async move { this.run(id, kind, cluster_id, args).await });
            resumed += 1;
        }
        Ok((resumed, failed))
    }

    /// Registers a scheduler's preheat stream; returns its receiving end and a guard that
    /// unregisters it when dropped (keep it with the response stream).
    pub async fn subscribe(
        &self,
        scheduler_id: u64,
        cluster_id: u64,
    ) -> (
        mpsc::Receiver<Result<proto::PreheatRequest, Status>>,
        SubscriptionGuard,
    ) {
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        let mut inner = self.shared.inner.lock().await;
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let guard = SubscriptionGuard {
            preheater: self.clone(),
            scheduler_id,
            generation,
        };
        if inner.closed {
            return (rx, guard); // tx dropped: the stream ends at once.
        }
        inner.subscribers.insert(
            scheduler_id,
            Subscriber {
                cluster_id,
                generation,
                tx,
            },
        );
        drop(inner);
        self.shared.subscribers_changed.notify_waiters();
        tracing::info!(scheduler_id, cluster_id, "scheduler subscribed to preheat");
        (rx, guard)
    }

    /// Schedulers with an open preheat stream.
    pub async fn subscribed_schedulers(&self) -> Vec<u64> {
        let inner = self.shared.inner.lock().await;
        let mut ids: Vec<u64> = inner.subscribers.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Ends every preheat stream and refuses new ones (shutdown).
    pub async fn close(&self) {
        let mut inner = self.shared.inner.lock().await;
        inner.closed = true;
        inner.subscribers.clear();
    }

    /// Records a scheduler's result for one target; false when no running job has it.
    pub async fn report(&self, result: &proto::PreheatResult) -> Result<bool, StoreError> {
        let mut inner = self.shared.inner.lock().await;
        let Some(job) = inner.jobs.get_mut(&result.job_id) else {
            return Ok(false);
        };
        let Some(target) = job
            .targets
            .iter_mut()
            .find(|t| t.url == result.url && !t.state.is_final())
        else {
            return Ok(false);
        };
        target.hosts = result
            .hosts
            .iter()
            .map(|h| TargetHost {
                host_id: h.host_id.clone(),
                hostname: h.hostname.clone(),
                ip: h.ip.clone(),
                state: if h.success {
                    JobState::Success
                } else {
                    JobState::Failure
                },
                error: h.error.clone(),
            })
            .collect();
        if result.success {
            target.state = JobState::Success;
        } else {
            target.state = JobState::Failure;
            target.error = if result.error.is_empty() {
                "seed peer failed".into()
            } else {
                result.error.clone()
            };
        }
        let (state, error) = overall(&job.targets);
        let targets = job.targets.clone();
        let done = job.done.clone();
        self.shared
            .store
            .update_job(result.job_id, state, &targets, &error, Timestamp::now())
            .await?;
        if state.is_final() {
            done.notify_one();
        }
        Ok(true)
    }
}

/// Unregisters a scheduler's preheat stream when dropped (the stream ended).
pub struct SubscriptionGuard {
    preheater: Preheater,
    scheduler_id: u64,
    generation: u64,
}

impl std::fmt::Debug for SubscriptionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionGuard")
            .field("scheduler_id", &self.scheduler_id)
            .finish_non_exhaustive()
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let shared = self.preheater.shared.clone();
        let (scheduler_id, generation) = (self.scheduler_id, self.generation);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut inner = shared.inner.lock().await;
                if inner
                    .subscribers
                    .get(&scheduler_id)
                    .is_some_and(|s| s.generation == generation)
                {
                    inner.subscribers.remove(&scheduler_id);
                    tracing::info!(scheduler_id, "scheduler preheat stream closed");
                }
            });
        }
    }
}

/// Overall state from the targets: failure on any failed, success when all succeeded.
fn overall(targets: &[PreheatTarget]) -> (JobState, String) {
    if let Some(failed) = targets.iter().find(|t| t.state == JobState::Failure) {
        return (
            JobState::Failure,
            format!("{}: {}", failed.url, failed.error),
        );
    }
    if targets.iter().all(|t| t.state == JobState::Success) {
        (JobState::Success, String::new())
    } else {
        (JobState::Running, String::new())
    }
}
