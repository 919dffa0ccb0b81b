//! Prometheus metrics of the manager and its `/metrics` + `/healthy` endpoint
//! (`metrics.enable`, `metrics.listen`, default `0.0.0.0:8000` as in Dragonfly).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `damselfly_manager_grpc_requests_total` | counter | `method` |
//! | `damselfly_manager_rest_requests_total` | counter | `method`, `status` (class: `2xx`, `4xx`, ...) |
//! | `damselfly_manager_keepalives_total` | counter | `kind` = `scheduler` / `seed_peer` (messages received) |
//! | `damselfly_manager_keepalive_streams` | gauge | — (open keepalive streams) |
//! | `damselfly_manager_instances` | gauge | `kind`, `state` = `active` / `inactive` |
//! | `damselfly_manager_preheat_jobs` | gauge | `state` (of the 1,000 most recent jobs) |
//! | `damselfly_build_info` | gauge (1) | `version`, `revision`, `role` = `manager` |
//! | `damselfly_manager_tls_handshakes_total` | counter | `result` = `accepted` / `refused` (incoming gRPC over TLS) |
//!
//! Counters are process-wide ([`grpc`], [`keepalive`], [`track_rest`]); the gauges are read
//! from the store at scrape time.

use crate::model::{InstanceKind, InstanceState, JobState};
use crate::state::ManagerState;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, LazyLock};

type Label = [(&'static str, &'static str); 1];
type Label2 = [(&'static str, String); 2];

struct Metrics {
    grpc: Family<Label, Counter>,
    rest: Family<Label2, Counter>,
    keepalives: Family<Label, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    grpc: Family::default(),
    rest: Family::default(),
    keepalives: Family::default(),
});

/// Counts one gRPC call of `method` (e.g. `"register_scheduler"`).
pub fn grpc(method: &'static str) {
    METRICS.grpc.get_or_create(&[("method", method)]).inc();
}

/// Counts one keepalive message from an instance of `kind`.
pub fn keepalive(kind: InstanceKind) {
    let k = match kind {
        InstanceKind::Scheduler => "scheduler",
        InstanceKind::SeedPeer => "seed_peer",
    };
    METRICS.keepalives.get_or_create(&[("kind", k)]).inc();
}

/// axum middleware counting REST requests by method and status class.
pub async fn track_rest(req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    let class = format!("{}xx", resp.status().as_u16() / 100);
    METRICS
        .rest
        .get_or_create(&[("method", method), ("status", class)])
        .inc();
    resp
}

/// Encodes every metric, reading the gauges from the store.
async fn render(state: &ManagerState) -> Result<String, String> {
    let mut r = Registry::default();
    r.register(
        "damselfly_manager_grpc_requests",
        "gRPC calls by method",
        METRICS.grpc.clone(),
    );
    r.register(
        "damselfly_manager_rest_requests",
        "REST requests by method and status class",
        METRICS.rest.clone(),
    );
    r.register(
        "damselfly_manager_keepalives",
        "Keepalive messages received by instance kind",
        METRICS.keepalives.clone(),
    );
    let streams = Gauge::<i64>::default();
    streams.set(state.open_streams() as i64);
    r.register(
        "damselfly_manager_keepalive_streams",
        "Open keepalive streams",
        streams,
    );
    let instances = Family::<Label2, Gauge>::default();
    for (kind, name) in [
        (InstanceKind::Scheduler, "scheduler"),
        (InstanceKind::SeedPeer, "seed_peer"),
    ] {
        let list = state
            .store
            .list_instances(kind, None)
            .await
            .map_err(|e| format!("listing instances: {e}"))?;
        for st in ["active", "inactive"] {
            let n = list
                .iter()
                .filter(|i| (i.state == InstanceState::Active) == (st == "active"))
                .count();
            instances
                .get_or_create(&[("kind", name.to_owned()), ("state", st.to_owned())])
                .set(n as i64);
        }
    }
    r.register(
        "damselfly_manager_instances",
        "Registered schedulers and seed peers by state",
        instances,
    );
    let jobs = Family::<Label, Gauge>::default();
    let list = state
        .store
        .list_jobs(1000)
        .await
        .map_err(|e| format!("listing jobs: {e}"))?;
    for st in [
        JobState::Pending,
        JobState::Running,
        JobState::Success,
        JobState::Failure,
    ] {
        let n = list.iter().filter(|j| j.state == st).count();
        jobs.get_or_create(&[("state", st.as_str())]).set(n as i64);
    }
    let tls = Family::<Label, Counter>::default();
    let hs = &wire::tls::GRPC_HANDSHAKES;
    for (result, n) in [("accepted", &hs.accepted), ("refused", &hs.refused)] {
        tls.get_or_create(&[("result", result)])
            .inc_by(n.load(std::sync::atomic::Ordering::Relaxed));
    }
    r.register(
        "damselfly_manager_tls_handshakes",
        "TLS handshakes of incoming gRPC connections (server.tls) by result",
        tls,
    );
    r.register(
        "damselfly_manager_preheat_jobs",
        "Preheat jobs by state (of the 1,000 most recent)",
        jobs,
    );
    wire::metrics_http::register_build_info(
        &mut r,
        env!("CARGO_PKG_VERSION"),
        damselfly_common::REVISION,
        "manager",
    );
    let mut out = String::new();
    encode(&mut out, &r).map_err(|e| format!("encoding metrics: {e}"))?;
    Ok(out)
}

async fn metrics_page(State(state): State<Arc<ManagerState>>) -> Response {
    match render(&state).await {
        Ok(body) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// The `/metrics` and `/healthy` router.
pub fn router(state: Arc<ManagerState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthy", get(|| async { "OK" }))
        .with_state(state)
}
