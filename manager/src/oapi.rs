//! Dragonfly's open API for jobs (`/oapi/v1/jobs`), the one Harbor's Dragonfly preheat
//! provider calls, and the personal access tokens that authenticate it.
//!
//! | Method and path | Auth | What |
//! |---|---|---|
//! | `POST /api/v1/personal-access-tokens` | admin token | create ([`CreateToken`]); the answer holds the token, shown only then |
//! | `GET /api/v1/personal-access-tokens` | admin token | every token (without the secret) |
//! | `GET /api/v1/personal-access-tokens/{id}` | admin token | one |
//! | `DELETE /api/v1/personal-access-tokens/{id}` | admin token | revoke (state `inactive`; kept for the record) |
//! | `POST /oapi/v1/jobs` | personal token, scope `job` | create a preheat job ([`OapiCreateJob`]) |
//! | `GET /oapi/v1/jobs[?page=N&per_page=M]` | personal token, scope `job` | jobs, newest first |
//! | `GET /oapi/v1/jobs/{id}` | personal token, scope `job` | one job ([`OapiJob`]) |
//!
//! A personal token that is unknown, revoked or past its `expired_at` gets 401; one without
//! the `job` scope gets 403. Job states map to Dragonfly's: `pending` and `running` are
//! `PENDING`, then `SUCCESS` or `FAILURE` (the three states Harbor reads).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::auth::{bearer, new_personal_token, token_sha256_hex};
use crate::model::{
    JobState, NewPersonalAccessToken, PersonalAccessToken, PreheatJob, PreheatKind, Timestamp,
    TokenState,
};
use crate::preheat::{PreheatArgs, PreheatError};
use crate::registry::Credentials;
use crate::rest::{ApiError, Authorized};
use crate::state::ManagerState;

/// The scope a personal token needs for `/oapi/v1/jobs` (Dragonfly's `job`).
pub const SCOPE_JOB: &str = "job";
/// Scopes a personal token may have.
pub const SCOPES: &[&str] = &[SCOPE_JOB];
/// Most jobs one open-API list returns.
const MAX_PER_PAGE: u32 = 1000;

/// The open API's and the personal access tokens' routes (merged into the REST router).
pub fn routes() -> Router<Arc<ManagerState>> {
    Router::new()
        .route(
            "/api/v1/personal-access-tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/api/v1/personal-access-tokens/{id}",
            get(get_token).delete(revoke_token),
        )
        .route("/oapi/v1/jobs", get(list_jobs).post(create_job))
        .route("/oapi/v1/jobs/{id}", get(get_job))
}

fn unauthorized(m: &str) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, m.to_owned())
}

fn bad_request(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m.into())
}

/// Body of `POST /api/v1/personal-access-tokens` (Dragonfly's fields).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Name (required).
    pub name: String,
    /// Description.
    #[serde(default)]
    pub bio: String,
    /// Scopes; only `job` exists (the open API's jobs).
    pub scopes: Vec<String>,
    /// Expiry, RFC 3339 (`2027-01-01T00:00:00Z`); must be in the future.
    pub expired_at: Timestamp,
    /// Dragonfly's owner field; there are no users here, so it is ignored.
    #[serde(default)]
    pub user_id: Option<u64>,
}

/// A created personal access token: the record and, this once, the token.
#[derive(Debug, Serialize)]
pub struct CreatedToken {
    /// The stored record.
    #[serde(flatten)]
    pub record: PersonalAccessToken,
    /// The bearer token; only its sha256 is kept, it is never shown again.
    pub token: String,
}

async fn create_token(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let Json(req) = body?;
    let name = req.name.trim();
    if name.is_empty() {
        return Err(bad_request("name is required"));
    }
    if req.scopes.is_empty() {
        return Err(bad_request(format!(
            "scopes is required (one or more of {SCOPES:?})"
        )));
    }
    if let Some(bad) = req.scopes.iter().find(|x| !SCOPES.contains(&x.as_str())) {
        return Err(bad_request(format!(
            "unknown scope {bad:?} (known: {SCOPES:?})"
        )));
    }
    let now = Timestamp::now();
    if req.expired_at <= now {
        return Err(bad_request(format!(
            "expired_at {} is not in the future",
            req.expired_at.rfc3339()
        )));
    }
    let (token, token_sha256) = new_personal_token();
    let mut scopes = req.scopes;
    scopes.sort();
    scopes.dedup();
    let record = s
        .store
        .create_token(
            NewPersonalAccessToken {
                name: name.to_owned(),
                bio: req.bio,
                scopes,
                expired_at: req.expired_at,
                token_sha256,
            },
            now,
        )
        .await?;
    tracing::info!(id = record.id, name = %record.name, "personal access token created");
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })))
}

async fn list_tokens(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
) -> Result<Json<Vec<PersonalAccessToken>>, ApiError> {
    Ok(Json(s.store.list_tokens().await?))
}

async fn get_token(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    Path(id): Path<u64>,
) -> Result<Json<PersonalAccessToken>, ApiError> {
    s.store
        .get_token(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "token not found".into()))
}

async fn revoke_token(
    State(s): State<Arc<ManagerState>>,
    _: Authorized,
    Path(id): Path<u64>,
) -> Result<StatusCode, ApiError> {
    if s.store.revoke_token(id, Timestamp::now()).await? {
        tracing::info!(id, "personal access token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, "token not found".into()))
    }
}

/// Proof that the request carries an active, unexpired personal access token with the `job`
/// scope.
#[derive(Debug)]
pub struct JobToken;

impl FromRequestParts<Arc<ManagerState>> for JobToken {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ManagerState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(token) = bearer(crate::rest::authorization(parts)) else {
            return Err(unauthorized(
                "an `Authorization: Bearer <personal access token>` header is required",
            ));
        };
        let Some(record) = state.store.token_by_hash(&token_sha256_hex(token)).await? else {
            return Err(unauthorized("unknown personal access token"));
        };
        if record.state != TokenState::Active {
            return Err(unauthorized("personal access token revoked"));
        }
        if record.expired_at <= Timestamp::now() {
            return Err(unauthorized("personal access token expired"));
        }
        if !record.scopes.iter().any(|x| x == SCOPE_JOB) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("personal access token lacks the {SCOPE_JOB:?} scope"),
            ));
        }
        Ok(Self)
    }
}

/// Body of `POST /oapi/v1/jobs`: Dragonfly's `CreatePreheatJobRequest`, as Harbor sends it
/// (`{"type": "preheat", "args": {…}, "scheduler_cluster_ids": [1]}`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OapiCreateJob {
    /// Must be `preheat`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What to preheat.
    #[serde(default)]
    pub args: OapiPreheatArgs,
    /// The cluster to preheat in: empty or absent means the default cluster; at most one.
    #[serde(default)]
    pub scheduler_cluster_ids: Option<Vec<u64>>,
    /// Dragonfly's seed peer clusters: must be empty (seed peers belong to a scheduler
    /// cluster here).
    #[serde(default)]
    pub seed_peer_cluster_ids: Option<Vec<u64>>,
    /// Description (not stored).
    #[serde(default)]
    pub bio: String,
    /// Dragonfly's owner field (ignored: no users here).
    #[serde(default)]
    pub user_id: Option<u64>,
}

/// `args` of [`OapiCreateJob`]: Dragonfly's `PreheatArgs`. Fields Go leaves at their zero
/// value (`""`, `0`, `null`) are accepted; a value asking for something this manager does
/// not do is refused with 400 rather than ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OapiPreheatArgs {
    /// `image` or `file`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Image manifest URL or reference (image), or a URL (file).
    pub url: String,
    /// More URLs or images of the same type.
    pub urls: Option<Vec<String>>,
    /// Forced piece length: refused (preheated tasks use the derived piece length, the one
    /// later downloads ask for).
    pub piece_length: Option<u64>,
    /// Task tag.
    pub tag: String,
    /// Task application.
    pub application: String,
    /// `&`-separated query parameters left out of the task id: empty, or exactly the fixed
    /// set daemons use (`Expires&Signature&ns`).
    pub filtered_query_params: String,
    /// Headers for the origin or registry (Harbor puts the registry token here).
    pub headers: Option<BTreeMap<String, String>>,
    /// Registry user.
    pub username: String,
    /// Registry password.
    pub password: String,
    /// `os/arch[/variant]` of a multi-platform image.
    pub platform: String,
    /// `single_seed_peer` (default, also when empty), `all_seed_peers` or `all_peers`.
    pub scope: String,
    /// Share of the scope's hosts, 1-100 (`all_seed_peers` / `all_peers`).
    pub percentage: Option<u8>,
    /// Number of the scope's hosts, 1-200 (`all_seed_peers` / `all_peers`); before
    /// `percentage`.
    pub count: Option<u32>,
    /// IPs of the scope's hosts (`all_seed_peers` / `all_peers`); before `count`.
    pub ips: Option<Vec<String>>,
    /// Dragonfly's batch size of `all_peers` (accepted, unused: each scheduler asks all the
    /// chosen hosts at once).
    pub concurrent_count: i64,
    /// Job timeout in nanoseconds (Go's `time.Duration`); 0: `preheat.job_timeout`.
    pub timeout: i64,
    /// Dragonfly's cache storage: must be false.
    pub load_to_cache: bool,
    /// Dragonfly's task id override: must be absent.
    pub content_for_calculating_task_id: Option<String>,
}

/// Query of `GET /oapi/v1/jobs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OapiJobFilter {
    /// Page, from 1.
    pub page: Option<u32>,
    /// Jobs per page (default 10, at most 1000).
    pub per_page: Option<u32>,
}

/// A job as Dragonfly's open API answers it (the fields Harbor reads: `id`, `state`,
/// `created_at`, `updated_at`, `result.job_states[].error` and
/// `result.job_states[].results[]`).
#[derive(Debug, Serialize)]
pub struct OapiJob {
    /// Job id.
    pub id: u64,
    /// Always `preheat`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `PENDING`, `SUCCESS` or `FAILURE`.
    pub state: &'static str,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// What it preheats.
    pub args: OapiJobArgs,
    /// The cluster it runs in.
    pub scheduler_cluster_ids: Vec<u64>,
    /// Per-target outcomes.
    pub result: OapiResult,
}

/// `args` of an [`OapiJob`].
#[derive(Debug, Serialize)]
pub struct OapiJobArgs {
    /// `image` or `file`.
    #[serde(rename = "type")]
    pub kind: PreheatKind,
    /// The URLs or images, space-separated.
    pub url: String,
}

/// `result` of an [`OapiJob`].
#[derive(Debug, Serialize)]
pub struct OapiResult {
    /// One entry (the job's cluster).
    pub job_states: Vec<OapiJobState>,
}

/// One entry of `result.job_states`.
#[derive(Debug, Serialize)]
pub struct OapiJobState {
    /// Why the job failed; empty otherwise.
    pub error: String,
    /// Outcomes in the job's cluster.
    pub results: Vec<OapiClusterResult>,
}

/// Outcomes of a job's targets in one cluster.
#[derive(Debug, Serialize)]
pub struct OapiClusterResult {
    /// The cluster.
    pub scheduler_cluster_id: u64,
    /// Targets a seed peer holds.
    pub success_tasks: Vec<OapiTask>,
    /// Targets that failed.
    pub failure_tasks: Vec<OapiTask>,
}

/// One target's outcome on one host (`hostname` and `ip` empty when no host reported, e.g.
/// the target failed before a seed peer got it).
#[derive(Debug, Serialize)]
pub struct OapiTask {
    /// The blob or file URL.
    pub url: String,
    /// Host that holds it (empty: not reported).
    pub hostname: String,
    /// Its IP (empty: not reported).
    pub ip: String,
    /// Why it failed (failures only).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl From<PreheatJob> for OapiJob {
    fn from(job: PreheatJob) -> Self {
        let state = match job.state {
            JobState::Pending | JobState::Running => "PENDING",
            JobState::Success => "SUCCESS",
            JobState::Failure => "FAILURE",
        };
        let cluster = job.cluster_id.unwrap_or(0);
        let (mut success_tasks, mut failure_tasks) = (Vec::new(), Vec::new());
        for t in job.targets {
            // One entry per host that was to hold the target; without host reports (a
            // failure before any seed got it), one for the target.
            if t.hosts.is_empty() {
                let task = OapiTask {
                    url: t.url,
                    hostname: String::new(),
                    ip: String::new(),
                    description: t.error,
                };
                match t.state {
                    JobState::Success => success_tasks.push(task),
                    JobState::Failure => failure_tasks.push(task),
                    JobState::Pending | JobState::Running => {}
                }
                continue;
            }
            for h in t.hosts {
                let task = OapiTask {
                    url: t.url.clone(),
                    hostname: h.hostname,
                    ip: h.ip,
                    description: h.error,
                };
                if h.state == JobState::Success {
                    success_tasks.push(task);
                } else {
                    failure_tasks.push(task);
                }
            }
        }
        Self {
            id: job.id,
            kind: "preheat",
            state,
            created_at: job.created_at,
            updated_at: job.updated_at,
            args: OapiJobArgs {
                kind: job.kind,
                url: job.url,
            },
            scheduler_cluster_ids: job.cluster_id.into_iter().collect(),
            result: OapiResult {
                job_states: vec![OapiJobState {
                    error: job.error,
                    results: vec![OapiClusterResult {
                        scheduler_cluster_id: cluster,
                        success_tasks,
                        failure_tasks,
                    }],
                }],
            },
        }
    }
}

/// Turns the open API's arguments into a job's, refusing what this manager does not do.
fn preheat_args(req: OapiCreateJob) -> Result<PreheatArgs, ApiError> {
    if req.kind != "preheat" {
        return Err(bad_request(format!(
            "unknown job type {:?} (only \"preheat\")",
            req.kind
        )));
    }
    if req.seed_peer_cluster_ids.is_some_and(|v| !v.is_empty()) {
        return Err(bad_request(
            "seed_peer_cluster_ids is not supported: name the scheduler cluster",
        ));
    }
    let clusters = req.scheduler_cluster_ids.unwrap_or_default();
    if clusters.len() > 1 {
        return Err(bad_request(
            "one scheduler cluster per job (create one job per cluster)",
        ));
    }
    let a = req.args;
    let kind = match a.kind.as_str() {
        "image" => PreheatKind::Image,
        "file" => PreheatKind::File,
        other => {
            return Err(bad_request(format!(
                "args.type must be \"image\" or \"file\", got {other:?}"
            )))
        }
    };
    if a.piece_length.is_some() {
        return Err(bad_request(
            "piece_length is not supported: a preheated task must have the piece length later downloads derive",
        ));
    }
    if a.load_to_cache {
        return Err(bad_request("load_to_cache is not supported"));
    }
    if a.content_for_calculating_task_id.is_some() {
        return Err(bad_request(
            "content_for_calculating_task_id is not supported (task ids follow the task identity rule)",
        ));
    }
    if !a.filtered_query_params.is_empty() {
        let mut given: Vec<&str> = a
            .filtered_query_params
            .split('&')
            .filter(|p| !p.is_empty())
            .collect();
        given.sort_unstable();
        let mut fixed = wire::task::DEFAULT_FILTERED_QUERY_PARAMS.to_vec();
        fixed.sort_unstable();
        if given != fixed {
            return Err(bad_request(format!(
                "filtered_query_params must be empty or {:?} (the daemons' fixed set)",
                wire::task::DEFAULT_FILTERED_QUERY_PARAMS.join("&")
            )));
        }
    }
    if a.timeout < 0 {
        return Err(bad_request("timeout must not be negative"));
    }
    let timeout = u64::try_from(a.timeout)
        .ok()
        .filter(|n| *n > 0)
        .map(Duration::from_nanos);
    let credentials = (!a.username.is_empty()).then_some(Credentials {
        username: a.username,
        password: a.password,
    });
    Ok(PreheatArgs {
        kind: Some(kind),
        url: a.url,
        urls: a.urls.unwrap_or_default(),
        headers: a.headers.unwrap_or_default().into_iter().collect(),
        cluster_id: clusters.first().copied(),
        credentials,
        platform: a.platform,
        insecure: false,
        tag: a.tag,
        application: a.application,
        digest: String::new(),
        timeout,
        scope: a.scope,
        count: crate::rest::nonzero("count", a.count)?,
        percentage: crate::rest::nonzero("percentage", a.percentage.map(u32::from))?,
        ips: a.ips.unwrap_or_default(),
    })
}

async fn create_job(
    State(s): State<Arc<ManagerState>>,
    _: JobToken,
    body: Result<Json<OapiCreateJob>, JsonRejection>,
) -> Result<Json<OapiJob>, ApiError> {
    let Json(req) = body?;
    let args = preheat_args(req)?;
    let job = s.preheat.create(args).await.map_err(|e| match e {
        PreheatError::Invalid(m) => bad_request(m),
        PreheatError::Store(e) => e.into(),
    })?;
    // Dragonfly answers a created job with 200.
    Ok(Json(job.into()))
}

async fn list_jobs(
    State(s): State<Arc<ManagerState>>,
    _: JobToken,
    Query(f): Query<OapiJobFilter>,
) -> Result<Json<Vec<OapiJob>>, ApiError> {
    let page = f.page.unwrap_or(1).max(1);
    let per_page = f.per_page.unwrap_or(10).clamp(1, MAX_PER_PAGE);
    let skip = (page - 1).saturating_mul(per_page);
    let jobs = s.store.list_jobs(skip.saturating_add(per_page)).await?;
    Ok(Json(
        jobs.into_iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .map(OapiJob::from)
            .collect(),
    ))
}

async fn get_job(
    State(s): State<Arc<ManagerState>>,
    _: JobToken,
    Path(id): Path<u64>,
) -> Result<Json<OapiJob>, ApiError> {
    s.store
        .get_job(id)
        .await?
        .map(|j| Json(j.into()))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "job not found".into()))
}
