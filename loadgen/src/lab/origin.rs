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
use wire::range::{parse_range, RangeAsk};

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
        .map_or(RangeAsk::Full, |v| parse_range(v, size));
    let (start, end) = match range {
        RangeAsk::Full => {
            b = b.status(StatusCode::OK);
            (0, size)
        }
        RangeAsk::Part(s, e) => {
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_RANGE, format!("bytes {s}-{}/{size}", e - 1));
            (s, e)
        }
        RangeAsk::Unsatisfiable => {
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
