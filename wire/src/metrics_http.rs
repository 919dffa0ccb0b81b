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
