//! The registry mirror proxy (`proxy:` section, default `127.0.0.1:4001`).
//!
//! containerd (`hosts.toml`) or docker (`registry-mirrors`) send their registry API requests
//! here, in plain HTTP. The upstream registry is `proxy.registry_mirror`, or the
//! `X-Dragonfly-Registry` header of the request.
//!
//! * A `GET` whose upstream URL matches one of `proxy.rules` (default `blobs/sha256.*`) goes
//!   through P2P: the blob's digest (`sha256:…` in the path) is the task id, so one blob is
//!   one task whatever the repository or registry it is asked from. The task runs through the
//!   usual machinery (scheduler, seed peer and peers, or back to the registry with the
//!   client's headers, `Authorization` included). The response starts as soon as the task's
//!   size is known and streams each piece as soon as it is stored. The whole body is hashed
//!   on the way and the last chunk is held back until the digest matches: a mismatch aborts
//!   the connection, so a client never gets a complete body with wrong content. `Range`
//!   requests are answered `206` from the pieces (only crc32c-checked per piece: a part of a
//!   blob has no digest). When the task fails before the response starts, the request is
//!   passed through instead, so the registry's own answer (`401` with `WWW-Authenticate`,
//!   `404`, …) reaches the client.
//! * Everything else (`/v2/` ping, manifests, `HEAD` on blobs, token challenges) is passed to
//!   the upstream unchanged: headers (minus hop-by-hop ones), status, redirects (not
//!   followed) and body, streamed.
//!
//! The P2P blob stream is in `proxy/blob.rs` (a `task_reader::TaskReader`, the reader
//! delivery and ranges use too; it keeps the task from eviction until the last byte is
//! sent), header and error helpers in `proxy/http_util.rs`.

mod blob;
mod http_util;

use crate::config::{DaemonConfig, ProxyConfig};
use crate::error::DownloadError;
use crate::task::{TaskManager, TaskSpec};
use crate::task_reader::{wait_store, ReadError, TaskReader};
use anyhow::Context as _;
use blob::stream_blob;
use dataplane::Storage;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyDataStream, BodyExt, Full, StreamBody};
pub use http_util::blob_digest;
use http_util::{body_less, error_response, forwardable, hop_by_hop, parse_upstream};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use regex::Regex;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use wire::range::{parse_range, RangeAsk};
use wire::TaskId;

/// Header naming the upstream registry of one request (`https://registry.example.com`).
pub const REGISTRY_HEADER: &str = "x-dragonfly-registry";

/// Body chunks buffered between the file reader and the client connection.
const BODY_QUEUE: usize = 4;

/// Body of every proxy response.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counters of the proxy (exposed on `/metrics`).
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Requests answered from P2P (the response started from a task).
    pub p2p_requests: AtomicU64,
    /// Requests passed to the upstream registry (including P2P fallbacks).
    pub pass_through_requests: AtomicU64,
    /// Body bytes sent to clients from P2P tasks.
    pub p2p_bytes: AtomicU64,
    /// Blob streams aborted because the content did not match its digest.
    pub digest_mismatches: AtomicU64,
}

/// The proxy: validated configuration and the HTTP client for passed-through requests.
#[derive(Debug)]
pub struct Proxy {
    /// `download.origin_timeout`, for the upstream too.
    origin_timeout: Duration,
    tasks: Arc<TaskManager>,
    storage: Arc<Storage>,
    counters: Arc<ProxyCounters>,
    rules: Vec<Regex>,
    upstream: url::Url,
    client: reqwest::Client,
    ca: Option<crate::proxy_ca::ProxyCa>,
}

/// Why a request could not be served; answered with a registry-style JSON error.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("upstream registry: {0}")]
    Upstream(String),
}

impl Proxy {
    /// Checks the `proxy:` section (rules compile, upstream URL and CA files are valid) and
    /// builds the client for passed-through requests (redirects are not followed). Blobs
    /// are downloaded through `tasks`, read from `storage`; `counters` are its metrics.
    pub fn new(
        config: &DaemonConfig,
        tasks: Arc<TaskManager>,
        storage: Arc<Storage>,
        counters: Arc<ProxyCounters>,
    ) -> anyhow::Result<Self> {
        let cfg: &ProxyConfig = &config.proxy;
        let rules = cfg
            .rules
            .iter()
            .map(|r| Regex::new(r).with_context(|| format!("proxy.rules: {r:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let upstream = parse_upstream(&cfg.registry_mirror)
            .map_err(|e| anyhow::anyhow!("proxy.registry_mirror: {e}"))?;
        if cfg.insecure_skip_verify {
            tracing::warn!(
                "proxy.insecure_skip_verify is on: the upstream registry's TLS certificate is \
                 NOT verified on passed-through requests"
            );
        }
        let b = crate::trust::apply(
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(config.download.origin_timeout),
            &config.origin,
            &cfg.ca_certs,
            cfg.insecure_skip_verify,
            "proxy",
        )?;
        let client = b.build().context("building the proxy's HTTP client")?;
        let user_ca = cfg.user_ca()?;
        // A user's CA is loaded (and so checked) even without hosts to intercept.
        let ca = if cfg.hijack_hosts.is_empty() && user_ca.is_none() {
            None
        } else {
            Some(crate::proxy_ca::ProxyCa::open(
                &config.storage.dir,
                &cfg.hijack_hosts,
                user_ca,
            )?)
        };
        Ok(Self {
            origin_timeout: config.download.origin_timeout,
            tasks,
            storage,
            counters,
            rules,
            upstream,
            client,
            ca,
        })
    }

    /// Serves HTTP/1.1 connections from `listener` forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("proxy accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    async move {
                        let resp = if req.method() == Method::CONNECT {
                            proxy.connect(req).await
                        } else {
                            proxy.handle(req).await
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!("proxy connection: {e}");
                }
            });
        }
    }

    /// `CONNECT host:port`: for a host of `proxy.hijack_hosts`, terminates the client's TLS
    /// with a leaf from the proxy's CA and serves the requests inside like mirror requests
    /// to `https://host:port` (blobs through P2P, the rest passed through); any other host
    /// is tunnelled untouched (the client sees the host's own certificate).
    async fn connect(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let Some(authority) = req.uri().authority().cloned() else {
            return error_response(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let ok = || {
            let mut r = Response::new(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            );
            *r.status_mut() = StatusCode::OK;
            r
        };
        if let Some(ca) = self
            .ca
            .as_ref()
            .filter(|c| c.intercepts(&host, authority.as_str()))
        {
            let tls = match ca.server_config(&host) {
                Ok(t) => t,
                Err(e) => {
                    return error_response(StatusCode::BAD_GATEWAY, &format!("{e:#}"));
                }
            };
            let upstream = format!("https://{authority}");
            let Ok(upstream_value) = HeaderValue::from_str(&upstream) else {
                return error_response(StatusCode::BAD_REQUEST, "bad CONNECT authority");
            };
            tracing::debug!("proxy: intercepting CONNECT {authority}");
            let proxy = self.clone();
            tokio::spawn(async move {
                let upgraded = match hyper::upgrade::on(req).await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!("proxy CONNECT {upstream}: upgrade: {e}");
                        return;
                    }
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let stream = match acceptor
                    .accept(hyper_util::rt::TokioIo::new(upgraded))
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(
                            "proxy CONNECT {upstream}: TLS handshake with the client failed \
                             ({e}); does it trust {}?",
                            proxy
                                .ca
                                .as_ref()
                                .map_or_else(String::new, |c| c.cert_path.display().to_string())
                        );
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let v = upstream_value.clone();
                    async move {
                        req.headers_mut().insert(REGISTRY_HEADER, v);
                        Ok::<_, std::convert::Infallible>(proxy.handle(req).await)
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!("proxy intercepted connection: {e}");
                }
            });
            return ok();
        }
        let mut target = match tokio::time::timeout(
            self.origin_timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("CONNECT {authority}: {e}"),
                )
            }
            Err(_) => {
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("CONNECT {authority}: no connection in time"),
                )
            }
        };
        tracing::debug!("proxy: tunnelling CONNECT {authority}");
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(u) => {
                    let mut client = hyper_util::rt::TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
                }
                Err(e) => tracing::debug!("proxy CONNECT {authority}: upgrade: {e}"),
            }
        });
        ok()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        match self.route(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("proxy {method} {path}: {e}");
                let status = match e {
                    ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
                    ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
                };
                error_response(status, &e.to_string())
            }
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let upstream = match req.headers().get(REGISTRY_HEADER) {
            Some(v) => {
                let s = v.to_str().map_err(|_| {
                    ProxyError::BadRequest(format!("{REGISTRY_HEADER} is not ASCII"))
                })?;
                parse_upstream(s)
                    .map_err(|e| ProxyError::BadRequest(format!("{REGISTRY_HEADER}: {e}")))?
            }
            None => self.upstream.clone(),
        };
        let path_q = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let target = format!("{}{path_q}", upstream.as_str().trim_end_matches('/'));
        let url = url::Url::parse(&target)
            .map_err(|e| ProxyError::BadRequest(format!("url {target:?}: {e}")))?;
        if req.method() == Method::GET && self.rules.iter().any(|r| r.is_match(url.as_str())) {
            let (parts, _body) = req.into_parts();
            return self.p2p(parts, url).await;
        }
        let (parts, body) = req.into_parts();
        let body = if body_less(&parts.method, &parts.headers) {
            None
        } else {
            Some(reqwest::Body::wrap_stream(BodyDataStream::new(body)))
        };
        self.pass_through(&parts.method, &parts.headers, body, url)
            .await
    }

    /// Forwards a request to the upstream and streams its answer back unchanged.
    async fn pass_through(
        &self,
        method: &Method,
        headers: &HeaderMap,
        body: Option<reqwest::Body>,
        url: url::Url,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        dataplane::Counters::add(&self.counters.pass_through_requests, 1);
        let mut rb = self.client.request(method.clone(), url.clone());
        for (name, value) in headers {
            if forwardable(name) {
                rb = rb.header(name, value);
            }
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = match tokio::time::timeout(self.origin_timeout, rb.send()).await {
            Err(_) => {
                return Err(ProxyError::Upstream(format!(
                    "{url}: no response headers within {:?}",
                    self.origin_timeout
                )))
            }
            Ok(Err(e)) => {
                return Err(ProxyError::Upstream(format!(
                    "{url}: {}",
                    crate::trust::describe(&e)
                )))
            }
            Ok(Ok(r)) => r,
        };
        tracing::debug!("proxy {method} {url} → {}", resp.status());
        let mut out = Response::builder().status(resp.status());
        for (name, value) in resp.headers() {
            if !hop_by_hop(name) {
                out = out.header(name, value);
            }
        }
        let stream = resp
            .bytes_stream()
            .map(|r| r.map(Frame::data).map_err(|e| -> BoxError { Box::new(e) }));
        out.body(StreamBody::new(stream).boxed())
            .map_err(|e| ProxyError::Upstream(format!("building the response: {e}")))
    }

    /// Serves a blob from its P2P task, or passes the request through when the task fails
    /// before the response starts.
    async fn p2p(
        &self,
        parts: hyper::http::request::Parts,
        url: url::Url,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let digest = blob_digest(url.path());
        // The task identity rule (wire::task): a blob is its content digest's task, whoever
        // asks for it (preheat, dfget, dfcache, another mirror).
        let id = TaskId::for_download(url.as_str(), "", &wire::task::TaskIdOptions::default())
            .map_err(|e| ProxyError::BadRequest(format!("url {url}: {e}")))?;
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| forwardable(n) && *n != header::RANGE && *n != header::ACCEPT_ENCODING)
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let spec = TaskSpec {
            id,
            url: url.to_string(),
            headers,
            piece_length: 0,
            back_to_source: false,
            disable_back_to_source: false,
            rate_limit: 0,
            scheduler: None,
            priority: 0,
            digest: digest.as_ref().map(|(text, _)| text.clone()),
            s3: None,
        };
        let mut state = self.tasks.start_or_join(spec);
        let store = match wait_store(&self.storage, &id, &mut state).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(task = %id, "proxy: P2P download of {url} failed before the response started ({e}); passing the request through");
                return self
                    .pass_through(&parts.method, &parts.headers, None, url)
                    .await;
            }
        };
        let len = store.layout().content_length();
        let asked = parts
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok());
        let range = match asked.map_or(RangeAsk::Full, |v| parse_range(v, len)) {
            RangeAsk::Full => None,
            RangeAsk::Part(a, b) => Some((a, b)),
            RangeAsk::Unsatisfiable => {
                let mut r = error_response(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    &format!("range not satisfiable for a blob of {len} bytes"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(r);
            }
        };
        let (start, end) = range.unwrap_or((0, len));
        // The reader keeps the task from eviction until the last byte is streamed; a task
        // evicted since the download found it is fetched by passing the request through.
        let mut reader = match TaskReader::new(store.clone(), state, start..end) {
            Ok(r) => r,
            Err(e @ DownloadError::NotFound(_)) => {
                tracing::warn!(task = %id, "proxy: {e}; passing the request for {url} through");
                return self
                    .pass_through(&parts.method, &parts.headers, None, url)
                    .await;
            }
            Err(e) => return Err(ProxyError::BadRequest(e.to_string())),
        };
        dataplane::Counters::add(&self.counters.p2p_requests, 1);
        let mut out = Response::builder()
            .status(if range.is_some() {
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            })
            .header(header::CONTENT_LENGTH, end - start)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::ACCEPT_RANGES, "bytes");
        if range.is_some() {
            out = out.header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{len}", end - 1),
            );
        }
        if let Some((text, _)) = &digest {
            out = out.header("docker-content-digest", text.as_str());
        }
        // A part of a blob has no digest to check; the whole blob has.
        let want = if range.is_none() {
            digest.map(|(_, d)| d)
        } else {
            None
        };
        if let Some(want) = want {
            reader = reader.expect_sha256(want);
        }
        let (tx, rx) = mpsc::channel(BODY_QUEUE);
        let (counters, storage) = (self.counters.clone(), self.storage.clone());
        tokio::spawn(async move {
            let res = stream_blob(&counters, reader, &tx).await;
            if let Err(e) = res {
                tracing::warn!(task = %id, "proxy: aborting the response of {url}: {e}");
                if matches!(e, ReadError::Digest { .. }) {
                    dataplane::Counters::add(&counters.digest_mismatches, 1);
                    if store.is_complete() {
                        // Keep nobody else from being served the bad content.
                        let _ = storage.remove(&id);
                    }
                }
                let _ = tx.send(Err(Box::new(e) as BoxError)).await;
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        out.body(body.boxed())
            .map_err(|e| ProxyError::Upstream(format!("building the response: {e}")))
    }
}

#[cfg(test)]
mod tests;
