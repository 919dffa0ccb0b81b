//! Prometheus metrics and health endpoint of dfdaemon (`/metrics`, `/healthy`).

use crate::config::GcConfig;
use crate::error::DownloadError;
use crate::proxy::ProxyCounters;
use crate::task::TaskManager;
use dataplane::{Bridge, Counters, Storage};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why a download failed, as counted in `damselfly_downloads_failed_total{kind}` (each
/// [`DownloadError`] names its kind: [`DownloadError::metric_kind`]).
pub const FAILURE_KINDS: [&str; 11] = [
    "origin",
    "storage",
    "no_source",
    "scheduler",
    "other",
    "not_found",
    "digest",
    "no_space",
    "stalled",
    "cancelled",
    "bad_request",
];

/// Counters kept by the control plane (the data plane's are in [`dataplane::Counters`]).
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Downloads started (a task run, not a joining client).
    pub downloads_started: AtomicU64,
    /// Downloads that finished with every piece stored.
    pub downloads_succeeded: AtomicU64,
    /// Failed downloads, by [`FAILURE_KINDS`] index.
    pub downloads_failed: [AtomicU64; FAILURE_KINDS.len()],
    /// Downloads that went back to the origin.
    pub back_to_source: AtomicU64,
    /// Downloads that found no scheduler answering and fetched from the origin (or failed).
    pub scheduler_unreachable: AtomicU64,
    /// Scheduler streams that ended while a download was running.
    pub scheduler_streams_lost: AtomicU64,
    /// Running downloads registered again with a scheduler after their stream ended.
    pub scheduler_reregistrations: AtomicU64,
    /// Interrupted origin transfers that were retried.
    pub origin_retries: AtomicU64,
    /// Origin fetches that had to wait for a slot (`download.origin_concurrency`).
    pub origin_slot_waits: AtomicU64,
    /// Origin fetches whose content did not match the task's known digest (the task was
    /// dropped, the download failed).
    pub origin_digest_mismatches: AtomicU64,
    /// Origin requests for a bounded run of pieces (`Range: bytes=a-b`), made when the
    /// scheduler reports pieces that no live peer holds.
    pub origin_range_requests: AtomicU64,
    /// Partial back-to-source orders (`NeedBackToSource` with pieces) received.
    pub lost_piece_fetches: AtomicU64,
    /// Times a running download made no progress for `download.stall_timeout`.
    pub download_stalls: AtomicU64,
    /// How long task runs took, by outcome.
    pub download_seconds: DownloadDurations,
}

/// `damselfly_download_duration_seconds{outcome}`: the time from a task run's start to its
/// end (every piece stored, or failed), 50 ms to ~27 min in doubling buckets.
#[derive(Debug)]
pub struct DownloadDurations {
    succeeded: Histogram,
    failed: Histogram,
}

impl Default for DownloadDurations {
    fn default() -> Self {
        let buckets = || Histogram::new(exponential_buckets(0.05, 2.0, 16));
        Self {
            succeeded: buckets(),
            failed: buckets(),
        }
    }
}

impl DownloadDurations {
    /// Records one finished run.
    pub fn observe(&self, succeeded: bool, took: std::time::Duration) {
        let h = if succeeded {
            &self.succeeded
        } else {
            &self.failed
        };
        h.observe(took.as_secs_f64());
    }
}

impl ControlStats {
    /// Counts a failed download under its kind.
    pub fn failed(&self, error: &DownloadError) {
        let kind = error.metric_kind();
        let i = FAILURE_KINDS
            .iter()
            .position(|k| *k == kind)
            .or_else(|| FAILURE_KINDS.iter().position(|k| *k == "other"))
            .unwrap_or(0);
        dataplane::Counters::add(&self.downloads_failed[i], 1);
    }
}

/// Exposes the data-plane counters (atomics) at scrape time, without copying them into
/// separate metric objects.
#[derive(Debug)]
struct DaemonCollector {
    src: MetricsSources,
}

/// What the metrics are read from at scrape time.
#[derive(Debug)]
pub struct MetricsSources {
    /// `seed_peer.enable` (the `role` label).
    pub seed_peer: bool,
    /// Control-plane counters.
    pub stats: Arc<ControlStats>,
    /// Byte and piece counters (shared with the data plane).
    pub counters: Arc<Counters>,
    /// Counters of the registry mirror proxy.
    pub proxy: Arc<ProxyCounters>,
    /// Slots for origin fetches and their number (`download.origin_concurrency`).
    pub origin_slots: Option<(Arc<tokio::sync::Semaphore>, usize)>,
    /// The downloads.
    pub tasks: Arc<TaskManager>,
    /// Queues to the data plane.
    pub bridge: Arc<Bridge>,
    /// Task storage.
    pub storage: Arc<Storage>,
    /// `gc` settings (the watermarks are exported).
    pub gc: GcConfig,
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: &AtomicU64,
) -> std::fmt::Result {
    let c = ConstCounter::new(dataplane::Counters::get(v));
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut info = enc.encode_descriptor(
            "damselfly_build_info",
            "Version and git revision of this binary (value 1)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(info.encode_family(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", damselfly_common::REVISION),
            (
                "role",
                if self.src.seed_peer {
                    "seed_peer"
                } else {
                    "peer"
                },
            ),
        ])?)?;
        let mut durations = enc.encode_descriptor(
            "damselfly_download_duration_seconds",
            "Time from a download's start to its end, by outcome (succeeded, failed)",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        let d = &self.src.stats.download_seconds;
        for (outcome, h) in [("succeeded", &d.succeeded), ("failed", &d.failed)] {
            h.encode(durations.encode_family(&[("outcome", outcome)])?)?;
        }
        let c = &self.src.counters;
        counter(
            &mut enc,
            "damselfly_bytes_from_origin",
            "Piece bytes fetched from the origin",
            &c.bytes_from_origin,
        )?;
        counter(
            &mut enc,
            "damselfly_bytes_from_seed",
            "Piece bytes fetched from seed peers",
            &c.bytes_from_seed,
        )?;
        counter(
            &mut enc,
            "damselfly_bytes_from_peers",
            "Piece bytes fetched from other peers",
            &c.bytes_from_peers,
        )?;
        counter(
            &mut enc,
            "damselfly_bytes_uploaded",
            "Piece bytes uploaded to other peers",
            &c.bytes_uploaded,
        )?;
        counter(
            &mut enc,
            "damselfly_pieces_uploaded",
            "Pieces uploaded",
            &c.pieces_uploaded,
        )?;
        counter(
            &mut enc,
            "damselfly_first_copies_uploaded",
            "Pieces a super-seeding seed uploaded for the first time",
            &c.first_copies_uploaded,
        )?;
        counter(
            &mut enc,
            "damselfly_pieces_downloaded",
            "Pieces fetched from peers",
            &c.pieces_downloaded,
        )?;
        counter(
            &mut enc,
            "damselfly_pieces_corrupt",
            "Pieces dropped for a digest mismatch",
            &c.pieces_corrupt,
        )?;
        counter(
            &mut enc,
            "damselfly_pieces_forged",
            "Pieces whose crc32c matched but not their trusted BLAKE3 digest (forged by a parent)",
            &c.pieces_forged,
        )?;
        counter(
            &mut enc,
            "damselfly_digest_waits",
            "Received pieces that waited for their trusted digest",
            &c.digest_waits,
        )?;
        counter(
            &mut enc,
            "damselfly_digest_wait_timeouts",
            "Received pieces dropped because their trusted digest did not come within digest_wait",
            &c.digest_wait_timeouts,
        )?;
        counter(
            &mut enc,
            "damselfly_malformed_frames",
            "Connections closed for a malformed frame",
            &c.malformed_frames,
        )?;
        let p = &self.src.proxy;
        counter(
            &mut enc,
            "damselfly_proxy_p2p_requests",
            "Registry proxy requests answered from P2P tasks",
            &p.p2p_requests,
        )?;
        counter(
            &mut enc,
            "damselfly_proxy_pass_through_requests",
            "Registry proxy requests passed to the upstream registry",
            &p.pass_through_requests,
        )?;
        counter(
            &mut enc,
            "damselfly_proxy_p2p_bytes",
            "Body bytes the registry proxy sent from P2P tasks",
            &p.p2p_bytes,
        )?;
        counter(
            &mut enc,
            "damselfly_proxy_digest_mismatches",
            "Proxied blob responses aborted for a digest mismatch",
            &p.digest_mismatches,
        )?;
        counter(
            &mut enc,
            "damselfly_quic_connections",
            "Fetch connections to parents opened over QUIC",
            &c.quic_connections,
        )?;
        counter(
            &mut enc,
            "damselfly_quic_streams_served",
            "QUIC streams accepted by the upload side",
            &c.quic_streams_served,
        )?;
        counter(
            &mut enc,
            "damselfly_tls_handshakes",
            "Incoming data-plane TLS handshakes (TCP and QUIC) that completed",
            &c.tls_handshakes,
        )?;
        counter(
            &mut enc,
            "damselfly_tls_handshakes_failed",
            "Incoming data-plane TLS handshakes (TCP and QUIC) that failed, e.g. no valid client certificate",
            &c.tls_handshakes_failed,
        )?;
        counter(
            &mut enc,
            "damselfly_tls_parent_handshakes",
            "Data-plane TLS handshakes with parents (TCP and QUIC) that completed",
            &c.tls_parent_handshakes,
        )?;
        counter(
            &mut enc,
            "damselfly_tls_parent_handshakes_failed",
            "Data-plane TLS handshakes with parents (TCP and QUIC) that failed, e.g. a certificate not signed by the CA",
            &c.tls_parent_handshakes_failed,
        )?;
        let s = &self.src.stats;
        counter(
            &mut enc,
            "damselfly_downloads_started",
            "Downloads started (task runs)",
            &s.downloads_started,
        )?;
        counter(
            &mut enc,
            "damselfly_downloads_succeeded",
            "Downloads finished with every piece stored",
            &s.downloads_succeeded,
        )?;
        let failed = enc.encode_descriptor(
            "damselfly_downloads_failed",
            "Failed downloads by kind (origin, not_found, digest, no_space, storage, no_source, scheduler, stalled, cancelled, bad_request, other)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        let mut fam = failed;
        for (i, kind) in FAILURE_KINDS.iter().enumerate() {
            let c = ConstCounter::new(dataplane::Counters::get(&s.downloads_failed[i]));
            c.encode(fam.encode_family(&[("kind", *kind)])?)?;
        }
        counter(
            &mut enc,
            "damselfly_back_to_source",
            "Downloads that went back to the origin",
            &s.back_to_source,
        )?;
        counter(
            &mut enc,
            "damselfly_scheduler_unreachable",
            "Downloads that found no scheduler answering",
            &s.scheduler_unreachable,
        )?;
        counter(
            &mut enc,
            "damselfly_scheduler_streams_lost",
            "Scheduler streams that ended during a download",
            &s.scheduler_streams_lost,
        )?;
        counter(
            &mut enc,
            "damselfly_scheduler_reregistrations",
            "Running downloads registered again with a scheduler after their stream ended",
            &s.scheduler_reregistrations,
        )?;
        counter(
            &mut enc,
            "damselfly_origin_retries",
            "Interrupted origin transfers retried",
            &s.origin_retries,
        )?;
        counter(
            &mut enc,
            "damselfly_origin_slot_waits",
            "Origin fetches that waited for a slot (download.origin_concurrency)",
            &s.origin_slot_waits,
        )?;
        counter(
            &mut enc,
            "damselfly_origin_digest_mismatches",
            "Origin fetches whose content did not match the task's known digest",
            &s.origin_digest_mismatches,
        )?;
        counter(
            &mut enc,
            "damselfly_origin_range_requests",
            "Origin requests for a bounded run of pieces no live peer held",
            &s.origin_range_requests,
        )?;
        counter(
            &mut enc,
            "damselfly_lost_piece_fetches",
            "Partial back-to-source orders (pieces no live peer held) received",
            &s.lost_piece_fetches,
        )?;
        counter(
            &mut enc,
            "damselfly_download_stalls",
            "Times a running download made no progress for download.stall_timeout",
            &s.download_stalls,
        )?;
        if let Some((slots, n)) = &self.src.origin_slots {
            let busy = n.saturating_sub(slots.available_permits());
            let g = ConstGauge::new(busy as i64);
            g.encode(enc.encode_descriptor(
                "damselfly_origin_fetches_active",
                "Origin fetches running now",
                None,
                g.metric_type(),
            )?)?;
        }
        let g = ConstGauge::new(self.src.tasks.running() as i64);
        g.encode(enc.encode_descriptor(
            "damselfly_downloads_active",
            "Downloads running now",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(self.src.bridge.command_depth() as i64);
        g.encode(enc.encode_descriptor(
            "damselfly_bridge_command_depth",
            "Commands queued from control plane to data plane",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(self.src.storage.len() as i64);
        g.encode(enc.encode_descriptor(
            "damselfly_tasks",
            "Tasks stored",
            None,
            g.metric_type(),
        )?)?;
        // Disk: what GC measures against its watermarks (crate README, `gc:`).
        let task_bytes: u64 = self
            .src
            .storage
            .tasks()
            .iter()
            .map(|t| t.layout().content_length())
            .sum();
        let (fs_used, fs_size) = match dataplane::sys::fs_space(self.src.storage.dir()) {
            Ok((used, avail)) => (used, used.saturating_add(avail)),
            Err(_) => (0, 0),
        };
        let gc = &self.src.gc;
        for (name, help, v) in [
            (
                "damselfly_storage_task_bytes",
                "Bytes of the stored tasks (what gc.high_watermark_bytes limits)",
                task_bytes as f64,
            ),
            (
                "damselfly_storage_fs_used_bytes",
                "Bytes used on the storage directory's filesystem",
                fs_used as f64,
            ),
            (
                "damselfly_storage_fs_size_bytes",
                "Bytes used plus available on the storage directory's filesystem",
                fs_size as f64,
            ),
            (
                "damselfly_gc_high_watermark_bytes",
                "gc.high_watermark_bytes (0: no byte limit)",
                gc.high_watermark_bytes.0 as f64,
            ),
            (
                "damselfly_gc_high_watermark_ratio",
                "gc.high_watermark_percent / 100 of the filesystem (0: off)",
                f64::from(gc.high_watermark_percent) / 100.0,
            ),
        ] {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let q = ConstGauge::new(self.src.bridge.event_depth() as i64);
        q.encode(enc.encode_descriptor(
            "damselfly_bridge_event_depth",
            "Events queued from data plane to control plane",
            None,
            q.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Serves `/metrics` and `/healthy` on `listener` until the process exits.
pub async fn serve(src: MetricsSources, listener: TcpListener) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector { src }));
    wire::metrics_http::serve(Arc::new(registry), listener).await;
}
