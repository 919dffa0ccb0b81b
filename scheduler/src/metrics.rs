//! Prometheus metrics of the scheduler and its `/metrics` + `/healthy` endpoint.
//!
//! The counters live in one process-wide [`Metrics`] ([`metrics()`]), so the gRPC service
//! only needs one-line hooks ([`registered`], [`announced`], [`output`], [`error`]); the
//! gauges (hosts, tasks, peers) are read from the swarm state at scrape time.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `damselfly_scheduler_registrations_total` | counter | `result` = `ok` / `invalid` |
//! | `damselfly_scheduler_announcements_total` | counter | `kind` (peer message kind) |
//! | `damselfly_scheduler_scheduling_seconds` | histogram | — (state time of one registration or report) |
//! | `damselfly_scheduler_registration_seconds` | histogram | — (state time of one registration: the parent decision; 1 µs buckets doubling up to ~8 s) |
//! | `damselfly_scheduler_responses_total` | counter | `kind` = `candidate_parents` / `need_back_to_source` / `host_command` / `close_peer` |
//! | `damselfly_scheduler_errors_total` | counter | `kind` = `invalid_request` / `stream_full` / `stream_failed` |
//! | `damselfly_scheduler_hosts`, `_tasks`, `_peers` | gauge | — |
//! | `damselfly_build_info` | gauge (1) | `version`, `revision`, `role` = `scheduler` |
//! | `damselfly_scheduler_tls_handshakes_total` | counter | `result` = `accepted` / `refused` (incoming gRPC with `server.tls`) |

use crate::service::SchedulerService;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, LazyLock};
use std::time::Instant;
use tokio::net::TcpListener;
use wire::proto::scheduler::announce_peer_request::Request as PeerRequest;
use wire::proto::scheduler::announce_peer_response::Response as PeerResponse;

type Label = [(&'static str, &'static str); 1];

/// The scheduler's counters.
#[derive(Debug)]
pub struct Metrics {
    registrations: Family<Label, Counter>,
    announcements: Family<Label, Counter>,
    scheduling: Histogram,
    registration: Histogram,
    responses: Family<Label, Counter>,
    errors: Family<Label, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    registrations: Family::default(),
    announcements: Family::default(),
    // 10 µs .. ~1.3 s.
    scheduling: Histogram::new(exponential_buckets(0.000_01, 2.0, 18)),
    // 1 µs .. ~8 s: decisions take microseconds, the finer low end shows it.
    registration: Histogram::new(exponential_buckets(0.000_001, 2.0, 24)),
    responses: Family::default(),
    errors: Family::default(),
});

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// A peer registration was handled in `since.elapsed()`; `ok` tells whether it was valid.
pub fn registered(ok: bool, since: Instant) {
    let m = metrics();
    let result = if ok { "ok" } else { "invalid" };
    m.registrations.get_or_create(&[("result", result)]).inc();
    let secs = since.elapsed().as_secs_f64();
    m.scheduling.observe(secs);
    m.registration.observe(secs);
    if !ok {
        error("invalid_request");
    }
}

/// The label of a peer message kind.
pub fn kind(request: &PeerRequest) -> &'static str {
    match request {
        PeerRequest::Register(_) => "register",
        PeerRequest::TaskMetadata(_) => "task_metadata",
        PeerRequest::PieceFinished(_) => "piece_finished",
        PeerRequest::PieceFailed(_) => "piece_failed",
        PeerRequest::Reschedule(_) => "reschedule",
        PeerRequest::Finished(_) => "finished",
        PeerRequest::Failed(_) => "failed",
    }
}

/// The `piece_finished` announcement counter, looked up once: it is bumped for nearly every
/// message the scheduler handles, and the family lookup (a lock and a hash of the labels) cost
/// more than the increment.
static PIECE_FINISHED: LazyLock<Counter> = LazyLock::new(|| {
    metrics()
        .announcements
        .get_or_create(&[("kind", "piece_finished")])
        .clone()
});

/// A peer report of `kind` (see [`kind`]) was handled in `since.elapsed()`.
pub fn announced(kind: &'static str, since: Instant) {
    let m = metrics();
    if kind == "piece_finished" {
        PIECE_FINISHED.inc();
    } else {
        m.announcements.get_or_create(&[("kind", kind)]).inc();
    }
    m.scheduling.observe(since.elapsed().as_secs_f64());
}

/// A message the state sends out (parents, back to source, a host command, a close).
pub fn output(o: &crate::state::Output) {
    use crate::state::Output;
    let kind = match o {
        Output::Peer { response, .. } => match &response.response {
            Some(PeerResponse::CandidateParents(_)) => "candidate_parents",
            Some(PeerResponse::NeedBackToSource(_)) => "need_back_to_source",
            Some(PeerResponse::PieceDigests(_)) => "piece_digests",
            None => "empty",
        },
        Output::Host { .. } => "host_command",
        Output::ClosePeer { .. } => "close_peer",
    };
    metrics().responses.get_or_create(&[("kind", kind)]).inc();
}

/// Counts an error of `kind` (`invalid_request`, `stream_full`, `stream_failed`).
pub fn error(kind: &'static str) {
    metrics().errors.get_or_create(&[("kind", kind)]).inc();
}

/// Gauges read from the state at scrape time.
#[derive(Debug)]
struct StateCollector {
    service: SchedulerService,
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (hosts, tasks, peers) = self.service.counts();
        for (name, help, v) in [
            ("damselfly_scheduler_hosts", "Hosts announced", hosts),
            ("damselfly_scheduler_tasks", "Tasks known", tasks),
            ("damselfly_scheduler_peers", "Peers registered", peers),
        ] {
            let g = ConstGauge::new(v as i64);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let hs = &wire::tls::GRPC_HANDSHAKES;
        let mut family = enc.encode_descriptor(
            "damselfly_scheduler_tls_handshakes",
            "TLS handshakes of incoming gRPC connections (server.tls) by result",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (result, n) in [("accepted", &hs.accepted), ("refused", &hs.refused)] {
            let c = ConstCounter::new(n.load(std::sync::atomic::Ordering::Relaxed));
            c.encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}

/// The registry of every scheduler metric, gauges reading `service`.
pub fn registry(service: SchedulerService) -> Registry {
    let m = metrics();
    let mut r = Registry::default();
    r.register(
        "damselfly_scheduler_registrations",
        "Peer registrations by result",
        m.registrations.clone(),
    );
    r.register(
        "damselfly_scheduler_announcements",
        "Peer reports by kind",
        m.announcements.clone(),
    );
    r.register(
        "damselfly_scheduler_scheduling_seconds",
        "Time the swarm state took for one registration or report",
        m.scheduling.clone(),
    );
    r.register(
        "damselfly_scheduler_registration_seconds",
        "Time the swarm state took for one registration (choosing its parents)",
        m.registration.clone(),
    );
    r.register(
        "damselfly_scheduler_responses",
        "Messages sent to peers and hosts by kind",
        m.responses.clone(),
    );
    // Every error kind from the start (at 0), so that dashboards and alerts find the series.
    for kind in ["invalid_request", "stream_full", "stream_failed"] {
        drop(m.errors.get_or_create(&[("kind", kind)]));
    }
    r.register(
        "damselfly_scheduler_errors",
        "Errors by kind",
        m.errors.clone(),
    );
    r.register_collector(Box::new(StateCollector { service }));
    wire::metrics_http::register_build_info(
        &mut r,
        env!("CARGO_PKG_VERSION"),
        damselfly_common::REVISION,
        "scheduler",
    );
    r
}

/// Serves `/metrics` and `/healthy` on `listener` until the process exits.
pub async fn serve(service: SchedulerService, listener: TcpListener) {
    wire::metrics_http::serve(Arc::new(registry(service)), listener).await;
}
