//! [`ManagerState`]: what the gRPC service, the REST API and the background tasks share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::Config;
use crate::model::{Cluster, InstanceKind, InstanceState};
use crate::preheat::Preheater;
use crate::searcher::{self, HostQuery};
use crate::store::{Store, StoreError, StoreResult};

/// Shared state of one manager process.
pub struct ManagerState {
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// Configuration in force.
    pub config: Config,
    /// Tokens for REST writes.
    pub auth: Auth,
    /// Preheat job runner and the schedulers' preheat streams.
    pub preheat: Preheater,
    /// Bumped on every cluster change made through this manager; wakes `GetConfig` waiters.
    config_changed: watch::Sender<u64>,
    /// Turns true when the manager shuts down; long-lived calls end on it.
    shutdown: watch::Receiver<bool>,
    /// Generation of the open keepalive stream of each instance, so that a stream ending
    /// after its instance reconnected does not mark the new one inactive.
    streams: Mutex<HashMap<(InstanceKind, u64), u64>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// `GetConfig` calls parked right now, waiting for a change (see [`ConfigWaiter`]).
    config_waiters: std::sync::atomic::AtomicUsize,
}

/// Counts one `GetConfig` call as parked (waiting for a change, its deadline or shutdown)
/// while it lives; from [`ManagerState::config_waiter`].
#[derive(Debug)]
pub struct ConfigWaiter<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ConfigWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for ManagerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ManagerState {
    /// Builds the shared state.
    pub fn new(
        store: Arc<dyn Store>,
        config: Config,
        auth: Auth,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let preheat = Preheater::new(store.clone(), config.preheat.clone(), shutdown.clone());
        Arc::new(Self {
            store,
            config,
            auth,
            preheat,
            config_changed: watch::channel(0).0,
            shutdown,
            streams: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            config_waiters: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Tells `GetConfig` waiters that some cluster changed.
    pub fn notify_config_changed(&self) {
        self.config_changed.send_modify(|v| *v += 1);
    }

    /// A receiver that sees [`notify_config_changed`](Self::notify_config_changed).
    pub fn subscribe_config_changes(&self) -> watch::Receiver<u64> {
        self.config_changed.subscribe()
    }

    /// Marks a `GetConfig` call as parked until the returned guard drops.
    pub fn config_waiter(&self) -> ConfigWaiter<'_> {
        self.config_waiters
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ConfigWaiter(&self.config_waiters)
    }

    /// `GetConfig` calls parked right now, waiting for a change (so that a test can make the
    /// change only once a call is really waiting for it).
    pub fn config_waiters(&self) -> usize {
        self.config_waiters
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver that turns true at shutdown.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Keepalive streams open now.
    pub fn open_streams(&self) -> usize {
        self.streams.lock().map_or(0, |s| s.len())
    }

    /// Records that a keepalive stream opened for an instance; returns its generation.
    pub fn stream_opened(&self, kind: InstanceKind, id: u64) -> u64 {
        let generation = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut streams) = self.streams.lock() {
            streams.insert((kind, id), generation);
        }
        generation
    }

    /// Records that a keepalive stream ended; true if it was the instance's latest stream
    /// (then the instance is to be marked inactive).
    pub fn stream_closed(&self, kind: InstanceKind, id: u64, generation: u64) -> bool {
        let Ok(mut streams) = self.streams.lock() else {
            return false;
        };
        if streams.get(&(kind, id)) == Some(&generation) {
            streams.remove(&(kind, id));
            true
        } else {
            false
        }
    }

    /// The cluster with this id, or the default cluster for id 0.
    pub async fn cluster_or_default(&self, id: u64) -> StoreResult<Option<Cluster>> {
        if id == 0 {
            self.store.default_cluster().await
        } else {
            self.store.get_cluster(id).await
        }
    }

    /// Searcher: the best cluster for a host among clusters with an active scheduler; the
    /// default cluster when none has one.
    pub async fn search_cluster(&self, host: &HostQuery) -> StoreResult<Option<Cluster>> {
        let clusters = self.store.list_clusters().await?;
        let schedulers = self
            .store
            .list_instances(InstanceKind::Scheduler, None)
            .await?;
        let live: Vec<Cluster> = clusters
            .iter()
            .filter(|c| {
                schedulers
                    .iter()
                    .any(|s| s.cluster_id == c.id && s.state == InstanceState::Active)
            })
            .cloned()
            .collect();
        if let Some(best) = searcher::best(&live, host) {
            return Ok(Some(best.clone()));
        }
        Ok(clusters.into_iter().find(|c| c.is_default))
    }

    /// Makes sure a default cluster exists (named `default`), as a fresh database has none.
    pub async fn ensure_default_cluster(&self) -> StoreResult<Cluster> {
        if let Some(c) = self.store.default_cluster().await? {
            return Ok(c);
        }
        match self
            .store
            .create_cluster(crate::model::NewCluster {
                name: "default".into(),
                is_default: true,
                ..Default::default()
            })
            .await
        {
            Ok(c) => Ok(c),
            // Another manager on the same database created it meanwhile.
            Err(StoreError::Conflict(_)) => self
                .store
                .default_cluster()
                .await?
                .ok_or_else(|| StoreError::Invalid("no default cluster".into())),
            Err(e) => Err(e),
        }
    }
}
