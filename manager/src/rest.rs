//! REST API (`/api/v1/…`, JSON), the health endpoint and the status page.
//!
//! | Method and path | Auth | What |
//! |---|---|---|
//! | `GET /healthy` | open | `OK` |
//! | `GET /` | open | status page (HTML) |
//! | `GET /api/v1/clusters` | open | clusters |
//! | `POST /api/v1/clusters` | token | create a cluster ([`NewCluster`]) |
//! | `GET /api/v1/clusters/{id}` | open | one cluster |
//! | `PATCH /api/v1/clusters/{id}` | token | change name, default flag, scopes, config ([`ClusterUpdate`]) |
//! | `DELETE /api/v1/clusters/{id}` | token | delete with its schedulers and seed peers |
//! | `GET /api/v1/clusters/{id}/config` | open | `{version, config}` |
//! | `PUT /api/v1/clusters/{id}/config` | token | replace the config ([`ClusterConfig`]); bumps the version |
//! | `GET /api/v1/schedulers[?cluster_id=N]` | open | schedulers with live state |
//! | `GET /api/v1/seed-peers[?cluster_id=N]` | open | seed peers with live state |
//! | `POST /api/v1/jobs` | token | create a preheat job ([`CreateJob`]) |
//! | `GET /api/v1/jobs[?limit=N]` | open | recent jobs, newest first |
//! | `GET /api/v1/jobs/{id}` | open | one job |
//! | `/api/v1/personal-access-tokens…`, `/oapi/v1/jobs…` | see [`crate::oapi`] | tokens, Dragonfly's open API |
//!
//! Writes need `Authorization: Bearer <token>`; without a valid one they answer 401. Errors
//! are `{"message": "…"}` with 400, 401, 404, 409 or 500.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::model::{
    Cluster, ClusterConfig, ClusterUpdate, Instance, InstanceKind, NewCluster, PreheatJob,
    PreheatKind,
};
use crate::preheat::{PreheatArgs, PreheatError};
use crate::registry::Credentials;
use crate::searcher::validate_scopes;
use crate::state::ManagerState;
use crate::store::StoreError;

/// Most jobs one list returns.
const MAX_JOB_LIST: u32 = 1000;

/// The REST router over the shared state.
pub fn router(state: Arc<ManagerState>) -> Router {
    Router::new()
        .route("/", get(crate::status::page))
        .route("/healthy", get(|| async { "OK" }))
        .route("/api/v1/clusters", get(list_clusters).post(create_cluster))
        .route(
            "/api/v1/clusters/{id}",
            get(get_cluster)
                .patch(update_cluster)
                .delete(delete_cluster),
        )
        .route(
            "/api/v1/clusters/{id}/config",
            get(get_config).put(put_config),
        )
        .route("/api/v1/schedulers", get(list_schedulers))
        .route("/api/v1/seed-peers", get(list_seed_peers))
        .route("/api/v1/jobs", get(list_jobs).post(create_job))
        .route("/api/v1/jobs/{id}", get(get_job))
        .merge(crate::oapi::routes())
        .layer(axum::middleware::from_fn(crate::metrics::track_rest))
        .with_state(state)
}

/// An error answer: status and message.
#[derive(Debug)]
pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl ApiError {
    fn not_found(what: &str) -> Self {
        Self(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, m.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(serde_json::json!({ "message": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => Self(StatusCode::CONFLICT, m),
            StoreError::Invalid(m) => Self(StatusCode::BAD_REQUEST, m),
            e => {
                tracing::warn!("store error: {e}");
                Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self(e.status(), e.body_text())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The request's `Authorization` header, when it is text (both token kinds come in it).
pub(crate) fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Proof that the request carries an accepted bearer token; handlers that write take it.
#[derive(Debug)]
pub struct Authorized;

impl FromRequestParts<Arc<ManagerState>> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ManagerState>,
    ) -> Result<Self, Self::Rejection> {
        if state.auth.check_header(authorization(parts)) {
            Ok(Self)
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "a valid `Authorization: Bearer <token>` header is required".into(),
            ))
        }
    }
}

async fn list_clusters(State(s): State<Arc<ManagerState>>) -> ApiResult<Vec<Cluster>> {
    Ok(Json(s.store.list_clusters().await?))
}

async fn create_cluster(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    body: Result<Json<NewCluster>, JsonRejection>,
) -> Result<(StatusCode, Json<Cluster>), ApiError> {
    let Json(new) = body?;
    validate_scopes(&new.scopes).map_err(ApiError::bad_request)?;
    let cluster = s.store.create_cluster(new).await?;
    s.notify_config_changed();
    Ok((StatusCode::CREATED, Json(cluster)))
}

async fn get_cluster(
    State(s): State<Arc<ManagerState>>,
    Path(id): Path<u64>,
) -> ApiResult<Cluster> {
    s.store
        .get_cluster(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("cluster"))
}

async fn update_cluster(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    Path(id): Path<u64>,
    body: Result<Json<ClusterUpdate>, JsonRejection>,
) -> ApiResult<Cluster> {
    let Json(update) = body?;
    if let Some(scopes) = &update.scopes {
        validate_scopes(scopes).map_err(ApiError::bad_request)?;
    }
    let cluster = s
        .store
        .update_cluster(id, update)
        .await?
        .ok_or_else(|| ApiError::not_found("cluster"))?;
    s.notify_config_changed();
    Ok(Json(cluster))
}

async fn delete_cluster(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    if s.store.delete_cluster(id).await? {
        s.notify_config_changed();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("cluster"))
    }
}

/// A cluster's config with its version (`GET/PUT /api/v1/clusters/{id}/config`).
#[derive(Debug, Serialize, Deserialize)]
pub struct VersionedConfig {
    /// Grows with every change.
    pub version: u64,
    /// The config.
    pub config: ClusterConfig,
}

async fn get_config(
    State(s): State<Arc<ManagerState>>,
    Path(id): Path<u64>,
) -> ApiResult<VersionedConfig> {
    let c = s
        .store
        .get_cluster(id)
        .await?
        .ok_or_else(|| ApiError::not_found("cluster"))?;
    Ok(Json(VersionedConfig {
        version: c.config_version,
        config: c.config,
    }))
}

async fn put_config(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    Path(id): Path<u64>,
    body: Result<Json<ClusterConfig>, JsonRejection>,
) -> ApiResult<VersionedConfig> {
    let Json(config) = body?;
    let c = s
        .store
        .update_cluster(
            id,
            ClusterUpdate {
                config: Some(config),
                ..ClusterUpdate::default()
            },
        )
        .await?
        .ok_or_else(|| ApiError::not_found("cluster"))?;
    s.notify_config_changed();
    tracing::info!(
        cluster = id,
        version = c.config_version,
        "cluster config changed"
    );
    Ok(Json(VersionedConfig {
        version: c.config_version,
        config: c.config,
    }))
}

/// Query of the scheduler and seed peer lists.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFilter {
    /// Only this cluster's.
    pub cluster_id: Option<u64>,
}

async fn list_schedulers(
    State(s): State<Arc<ManagerState>>,
    Query(f): Query<ClusterFilter>,
) -> ApiResult<Vec<Instance>> {
    Ok(Json(
        s.store
            .list_instances(InstanceKind::Scheduler, f.cluster_id)
            .await?,
    ))
}

async fn list_seed_peers(
    State(s): State<Arc<ManagerState>>,
    Query(f): Query<ClusterFilter>,
) -> ApiResult<Vec<Instance>> {
    Ok(Json(
        s.store
            .list_instances(InstanceKind::SeedPeer, f.cluster_id)
            .await?,
    ))
}

/// Body of `POST /api/v1/jobs` (Dragonfly's shape: `{"type": "preheat", "args": {…}}`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Must be `preheat`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What to preheat.
    pub args: PreheatJobArgs,
    /// Cluster whose schedulers run it; default: the default cluster.
    #[serde(default)]
    pub cluster_id: Option<u64>,
}

/// `args` of a preheat job.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreheatJobArgs {
    /// `file` (default) or `image`.
    #[serde(rename = "type")]
    pub kind: Option<PreheatKind>,
    /// A URL (file); an image reference or manifest URL (image).
    pub url: String,
    /// More URLs or images of the same type, preheated by the same job.
    pub urls: Vec<String>,
    /// Headers for the origin (file) or the registry (image).
    pub headers: BTreeMap<String, String>,
    /// Registry user (image).
    pub username: String,
    /// Registry password (image).
    pub password: String,
    /// `os/arch[/variant]` of a multi-platform image.
    pub platform: String,
    /// Plain HTTP to the registry for an image reference.
    pub insecure: bool,
    /// Task tag.
    pub tag: String,
    /// Task application.
    pub application: String,
    /// Content digest of a file (`sha256:<hex>`): the seed peer checks what it fetches
    /// against it (the task stays the URL's, as for `dfget URL --digest`). Images: not
    /// allowed (each layer carries its own digest).
    pub digest: String,
    /// `single_seed_peer` (default), `all_seed_peers` or `all_peers`.
    pub scope: String,
    /// With `all_seed_peers` / `all_peers`: at most this many hosts (1-200).
    pub count: Option<u32>,
    /// With `all_seed_peers` / `all_peers`: this share of the hosts (1-100).
    pub percentage: Option<u32>,
    /// With `all_seed_peers` / `all_peers`: exactly the hosts with these IPs.
    pub ips: Vec<String>,
}

/// Query of the job list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFilter {
    /// Most jobs to return (default 100).
    pub limit: Option<u32>,
}

async fn create_job(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    body: Result<Json<CreateJob>, JsonRejection>,
) -> Result<(StatusCode, Json<PreheatJob>), ApiError> {
    let Json(req) = body?;
    if req.kind != "preheat" {
        return Err(ApiError::bad_request(format!(
            "unknown job type {:?} (only \"preheat\")",
            req.kind
        )));
    }
    let a = req.args;
    let credentials = (!a.username.is_empty()).then_some(Credentials {
        username: a.username,
        password: a.password,
    });
    let job = s
        .preheat
        .create(PreheatArgs {
            kind: a.kind,
            url: a.url,
            urls: a.urls,
            headers: a.headers.into_iter().collect(),
            cluster_id: req.cluster_id,
            credentials,
            platform: a.platform,
            insecure: a.insecure,
            tag: a.tag,
            application: a.application,
            digest: a.digest,
            timeout: None,
            scope: a.scope,
            count: nonzero("count", a.count)?,
            percentage: nonzero("percentage", a.percentage)?,
            ips: a.ips,
        })
        .await
        .map_err(|e| match e {
            PreheatError::Invalid(m) => ApiError::bad_request(m),
            PreheatError::Store(e) => e.into(),
        })?;
    Ok((StatusCode::CREATED, Json(job)))
}

/// An optional count that must not be 0 when given; 0 when absent.
pub(crate) fn nonzero(name: &str, v: Option<u32>) -> Result<u32, ApiError> {
    match v {
        Some(0) => Err(ApiError::bad_request(format!("{name} must be at least 1"))),
        Some(n) => Ok(n),
        None => Ok(0),
    }
}

async fn list_jobs(
    State(s): State<Arc<ManagerState>>,
    Query(f): Query<JobFilter>,
) -> ApiResult<Vec<PreheatJob>> {
    let limit = f.limit.unwrap_or(100).min(MAX_JOB_LIST);
    Ok(Json(s.store.list_jobs(limit).await?))
}

async fn get_job(State(s): State<Arc<ManagerState>>, Path(id): Path<u64>) -> ApiResult<PreheatJob> {
    s.store
        .get_job(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("job"))
}

/// Renders an HTML page as a response (used by the status page).
pub fn html(body: String) -> Response {
    Html(body).into_response()
}
