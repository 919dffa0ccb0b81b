//! Persistent state behind one trait, [`Store`], with one SQL implementation for SQLite (the
//! default: a file created on first start) and Postgres (when given a `postgres://` URL).
//!
//! Why `sqlx`: one async API and one connection pool for both databases (its `Any` driver),
//! so every query is written once with `$N` placeholders, which SQLite accepts too; only the
//! schema migrations differ per dialect. rusqlite would need `spawn_blocking` around every
//! call and a second client for Postgres.

mod sql;

use async_trait::async_trait;

use crate::model::{
    Cluster, ClusterUpdate, Instance, InstanceKind, JobState, NewCluster, NewInstance,
    NewPersonalAccessToken, NewPreheatJob, PersonalAccessToken, PreheatJob, PreheatTarget,
    Timestamp,
};

pub use sql::SqlStore;

/// Errors of a [`Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique name or key is taken.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request is not valid (e.g. an unknown cluster).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored JSON column does not parse.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// Result of a [`Store`] call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the manager persists. All methods are safe to call concurrently; a `None` or
/// `false` answer means the row does not exist.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a cluster. The first cluster ever created becomes the default one.
    async fn create_cluster(&self, new: NewCluster) -> StoreResult<Cluster>;
    /// One cluster.
    async fn get_cluster(&self, id: u64) -> StoreResult<Option<Cluster>>;
    /// All clusters, by id.
    async fn list_clusters(&self) -> StoreResult<Vec<Cluster>>;
    /// The default cluster, if any.
    async fn default_cluster(&self) -> StoreResult<Option<Cluster>>;
    /// Changes a cluster; a new `config` bumps `config_version` even if equal.
    async fn update_cluster(&self, id: u64, update: ClusterUpdate) -> StoreResult<Option<Cluster>>;
    /// Deletes a cluster with its schedulers and seed peers. The default cluster cannot be
    /// deleted while other clusters exist (make another one the default first).
    async fn delete_cluster(&self, id: u64) -> StoreResult<bool>;

    /// Registers (or re-registers) a scheduler or seed peer, keyed by (cluster, hostname,
    /// ip, port); it becomes active with `now` as its last keepalive.
    async fn upsert_instance(
        &self,
        kind: InstanceKind,
        new: NewInstance,
        now: Timestamp,
    ) -> StoreResult<Instance>;
    /// One scheduler or seed peer.
    async fn get_instance(&self, kind: InstanceKind, id: u64) -> StoreResult<Option<Instance>>;
    /// Schedulers or seed peers, of one cluster or all, by id.
    async fn list_instances(
        &self,
        kind: InstanceKind,
        cluster_id: Option<u64>,
    ) -> StoreResult<Vec<Instance>>;
    /// Records a keepalive: active, last keepalive `now`. `false` if unknown.
    async fn keepalive(&self, kind: InstanceKind, id: u64, now: Timestamp) -> StoreResult<bool>;
    /// Marks one instance inactive (its keepalive stream ended).
    async fn set_inactive(&self, kind: InstanceKind, id: u64) -> StoreResult<bool>;
    /// Marks inactive every active instance whose last keepalive is before `deadline`;
    /// returns how many.
    async fn expire_instances(&self, deadline: Timestamp) -> StoreResult<u64>;

    /// Creates a pending preheat job.
    async fn create_job(&self, new: NewPreheatJob, now: Timestamp) -> StoreResult<PreheatJob>;
    /// One job.
    async fn get_job(&self, id: u64) -> StoreResult<Option<PreheatJob>>;
    /// The most recent jobs first, at most `limit`.
    async fn list_jobs(&self, limit: u32) -> StoreResult<Vec<PreheatJob>>;
    /// Writes a job's state, targets and error.
    async fn update_job(
        &self,
        id: u64,
        state: JobState,
        targets: &[PreheatTarget],
        error: &str,
        now: Timestamp,
    ) -> StoreResult<bool>;
    /// The pending and running jobs, oldest first, each with its `resume_args` (empty: not
    /// resumable).
    async fn unfinished_jobs(&self) -> StoreResult<Vec<(PreheatJob, String)>>;
    /// Marks every pending or running job failed with `error`; returns how many.
    async fn fail_unfinished_jobs(&self, error: &str, now: Timestamp) -> StoreResult<u64>;

    /// Stores a new personal access token (active).
    async fn create_token(
        &self,
        new: NewPersonalAccessToken,
        now: Timestamp,
    ) -> StoreResult<PersonalAccessToken>;
    /// One personal access token.
    async fn get_token(&self, id: u64) -> StoreResult<Option<PersonalAccessToken>>;
    /// The personal access token whose sha256 (hex) is `sha256`.
    async fn token_by_hash(&self, sha256: &str) -> StoreResult<Option<PersonalAccessToken>>;
    /// Every personal access token, by id (revoked ones too).
    async fn list_tokens(&self) -> StoreResult<Vec<PersonalAccessToken>>;
    /// Revokes a personal access token (state `inactive`, kept for the record).
    async fn revoke_token(&self, id: u64, now: Timestamp) -> StoreResult<bool>;

    /// A setting (e.g. the hash of the generated API token).
    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>>;
    /// Stores a setting unless the key exists; returns whether it was stored.
    async fn insert_setting(&self, key: &str, value: &str) -> StoreResult<bool>;
}
