//! The lab's origin: a small HTTP/1.1 server (hyper) that serves one file from memory with
//! single-range support (`bytes=a-b`, `bytes=a-`, `bytes=-n`). `loadgen lab-origin` runs it;
//! the lab starts that inside the origin's namespace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Method, Request, Response, StatusCode};

/// Options of `loadgen lab-origin`.
#[derive(Debug, clap::Args)]
pub struct OriginArgs {
    /// File served at every path.
    #[arg(long)]
    pub file: PathBuf,
    /// Listen address.
    #[arg(long)]
    pub listen: SocketAddr,
}

/// Path (without the leading `/`) answering `{"bytes": <body bytes served>, "requests": n}`.
pub const STATS_PATH: &str = "_stats";

/// Counters of the origin.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    requests: AtomicU64,
}

/// What a `Range` header asks of a body of a known size.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// No usable range: 200 with the whole body.
    Full,
    /// Bytes `start..end` (end exclusive): 206.
    Part(u64, u64),
    /// 416.
    Unsatisfiable,
}

fn parse_range(value: &str, size: u64) -> Range {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Full;
    };
    if spec.contains(',') || size == 0 {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return match b.parse::<u64>() {
            Ok(0) => Range::Unsatisfiable,
            Ok(n) => Range::Part(size.saturating_sub(n), size),
            Err(_) => Range::Full,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return Range::Full;
    };
    let end = if b.is_empty() {
        size
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e.saturating_add(1).min(size),
            _ => return Range::Full,
        }
    };
    if start >= size {
        return Range::Unsatisfiable;
    }
    Range::Part(start, end)
}

fn respond(
    data: &Bytes,
    counters: &Counters,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == format!("/{STATS_PATH}") {
        let text = format!(
            "{{\"bytes\": {}, \"requests\": {}}}\n",
            counters.bytes.load(Ordering::Relaxed),
            counters.requests.load(Ordering::Relaxed)
        );
        return Response::new(Full::new(Bytes::from(text)));
    }
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let size = data.len() as u64;
    let mut b = Response::builder().header(ACCEPT_RANGES, "bytes");
    if req.method() != Method::GET && req.method() != Method::HEAD {
        b = b.status(StatusCode::METHOD_NOT_ALLOWED);
        return b.body(Full::new(Bytes::new())).unwrap_or_default();
    }
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(Range::Full, |v| parse_range(v, size));
    let (start, end) = match range {
        Range::Full => {
            b = b.status(StatusCode::OK);
            (0, size)
        }
        Range::Part(s, e) => {
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_RANGE, format!("bytes {s}-{}/{size}", e - 1));
            (s, e)
        }
        Range::Unsatisfiable => {
            return b
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(CONTENT_RANGE, format!("bytes */{size}"))
                .body(Full::new(Bytes::new()))
                .unwrap_or_default();
        }
    };
    b = b.header(CONTENT_LENGTH, end - start);
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        counters.bytes.fetch_add(end - start, Ordering::Relaxed);
        // In range: start < end <= size = data.len().
        data.slice(start as usize..end as usize)
    };
    b.body(Full::new(body)).unwrap_or_default()
}

/// Serves `args.file` on `args.listen` until killed.
pub fn serve(args: OriginArgs) -> anyhow::Result<()> {
    let data = Bytes::from(
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let counters = Arc::new(Counters::default());
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        eprintln!(
            "lab-origin listening on {} ({} bytes)",
            args.listen,
            data.len()
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let data = data.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = respond(&data, &counters, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                // A client going away mid-body is normal.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Range::Part(0, 10));
        assert_eq!(parse_range("bytes=2-4", 10), Range::Part(2, 5));
        assert_eq!(parse_range("bytes=2-40", 10), Range::Part(2, 10));
        assert_eq!(parse_range("bytes=-3", 10), Range::Part(7, 10));
        assert_eq!(parse_range("bytes=10-", 10), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 10), Range::Full);
        assert_eq!(parse_range("items=0-1", 10), Range::Full);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Range::Full);
    }
}
