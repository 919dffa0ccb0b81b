//! Prometheus metrics and health endpoint of dfdaemon (`/metrics`, `/healthy`).

use crate::daemon::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Exposes the data-plane counters (atomics) at scrape time, without copying them into
/// separate metric objects.
#[derive(Debug)]
struct DaemonCollector {
    ctx: Arc<Context>,
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
        let c = &self.ctx.counters;
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
            "damselfly_malformed_frames",
            "Connections closed for a malformed frame",
            &c.malformed_frames,
        )?;
        let p = &self.ctx.proxy;
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
        let g = ConstGauge::new(self.ctx.storage.len() as i64);
        g.encode(enc.encode_descriptor(
            "damselfly_tasks",
            "Tasks stored",
            None,
            g.metric_type(),
        )?)?;
        let q = ConstGauge::new(self.ctx.bridge.event_depth() as i64);
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
pub async fn serve(ctx: Arc<Context>, listener: TcpListener) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector { ctx }));
    let registry = Arc::new(registry);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&registry, req.uri().path())) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn route(registry: &Registry, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => (StatusCode::OK, out),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics: {e}\n"),
                ),
            }
        }
        "/healthy" => (StatusCode::OK, "OK\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
