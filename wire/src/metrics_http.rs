//! The Prometheus endpoint shared by the dfdaemon and the scheduler: `/metrics` (text
//! exposition of a `prometheus-client` registry) and `/healthy` over plain HTTP/1.1.
//!
//! It lives here, in the crate both depend on, so that the two binaries serve the same paths
//! with the same answers (`404` for anything else, `500` with the reason if encoding fails).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Registers `damselfly_build_info{version, revision, role} 1` in `registry`: which build
/// (crate version, git revision) of which binary answers, for dashboards and upgrades.
pub fn register_build_info(registry: &mut Registry, version: &str, revision: &str, role: &str) {
    let info = prometheus_client::metrics::family::Family::<
        [(&'static str, String); 3],
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    info.get_or_create(&[
        ("version", version.to_string()),
        ("revision", revision.to_string()),
        ("role", role.to_string()),
    ])
    .set(1);
    registry.register(
        "damselfly_build_info",
        "Version and git revision of this binary (value 1)",
        info,
    );
}

/// Serves `/metrics` and `/healthy` for `registry` on `listener` until the process exits
/// (or the future is dropped). One task per connection; a failed accept is logged and
/// retried.
pub async fn serve(registry: Arc<Registry>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
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

/// The answer for `path`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn build_info_names_version_revision_and_role() {
        let mut registry = Registry::default();
        register_build_info(&mut registry, "1.2.3", "abc", "scheduler");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(
            out.contains(
                "damselfly_build_info{version=\"1.2.3\",revision=\"abc\",role=\"scheduler\"} 1"
            ),
            "{out}"
        );
    }

    #[test]
    fn routes_metrics_health_and_unknown_paths() {
        let mut registry = Registry::default();
        let c: Counter = Counter::default();
        c.inc();
        registry.register("damselfly_test_things", "Things", c);
        let r = route(&registry, "/metrics");
        assert_eq!(r.status(), StatusCode::OK);
        let r = route(&registry, "/healthy");
        assert_eq!(r.status(), StatusCode::OK);
        let r = route(&registry, "/nope");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
