//! Back to source: fetching a task's pieces from its HTTP(S) origin, or from object storage
//! for `s3://` URLs ([`crate::s3`]; the same pieces, resumption and retries).
//!
//! The first request is `GET` with `Range: bytes=0-`; its `Content-Range` (206) or
//! `Content-Length` (200) gives the size, from which the piece layout follows. The body is
//! cut into pieces as it streams in, and each piece is stored and announced as soon as it is
//! complete, so peers can fetch piece 0 while later pieces are still on the wire. An
//! interrupted or short transfer is resumed with a Range request from the first missing
//! piece; pieces already stored are never fetched twice.
//!
//! [`fetch_pieces`] fetches only some pieces of a task whose size is known (those the
//! scheduler reports no live peer holds), one `Range: bytes=a-b` request per contiguous run
//! of them that is not stored yet, while the data plane goes on fetching the rest from peers.

mod content_range;
mod piece;

pub use content_range::{content_range_start, content_range_total};

use crate::config::{DownloadConfig, OriginConfig};
use crate::metrics::ControlStats;
use crate::task::TaskSpec;
use dataplane::shaper::{self, RateLimiter, Shaping};
use dataplane::{Counters, Storage, StorageFailure, TaskStore};
use futures::StreamExt;
use piece::{OriginPiece, ORIGIN_WRITE_BATCH};
use reqwest::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use std::sync::Arc;
use std::time::Duration;
use wire::PieceLayout;

/// What fetching from origins uses: the HTTP client, the `download` and `origin` settings,
/// the origin slots, storage (a new task's store is created once its size is known), the
/// rate limits and the counters.
#[derive(Debug)]
pub struct OriginClient {
    /// HTTP client for origins (`origin` trust settings applied).
    pub http: reqwest::Client,
    /// `download` settings (timeouts, retries, piece lengths, slots).
    pub download: DownloadConfig,
    /// `origin` settings (object storage credentials, trust).
    pub origin: OriginConfig,
    /// Slots for origin fetches (`download.origin_concurrency`; `None`: unlimited).
    pub origin_slots: Option<Arc<tokio::sync::Semaphore>>,
    /// Task storage.
    pub storage: Arc<Storage>,
    /// Rate limits (shared with the data plane).
    pub shaping: Arc<Shaping>,
    /// Byte counters (shared with the data plane).
    pub counters: Arc<Counters>,
    /// Control-plane counters.
    pub stats: Arc<ControlStats>,
}

/// Why a fetch from the origin failed.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The origin answered with an error status that retrying will not fix.
    #[error("origin answered {0} for {1}")]
    Status(StatusCode, String),
    /// The origin did not say how long the content is.
    #[error("origin sent neither Content-Range nor Content-Length; content of unknown length is not supported")]
    UnknownLength,
    /// The origin's answer contradicts itself or the task's known layout.
    #[error("origin answer is inconsistent: {0}")]
    Inconsistent(String),
    /// A request header given by the user is not valid HTTP.
    #[error("invalid header {0:?}")]
    BadHeader(String),
    /// The transfer kept failing after the configured retries.
    #[error("origin transfer failed after {retries} retries: {last}")]
    Exhausted {
        /// Retries made.
        retries: u32,
        /// Last error.
        last: String,
    },
    /// The size is outside what the protocol can carry.
    #[error("{0}")]
    Layout(#[from] wire::piece::LayoutError),
    /// The origin's TLS certificate was refused (unknown authority, wrong name, expired).
    #[error("{0}")]
    Tls(String),
    /// The object store refused the request (no such key, bad credentials, bad settings).
    #[error("{0}")]
    ObjectStore(crate::s3::S3Error),
    /// Storing a piece failed (disk full, I/O error, the task evicted), by class.
    #[error("storing piece: {0}")]
    Storage(dataplane::StorageFailure),
}

/// An origin's answer, whatever the scheme: the content's total size, the offset of the
/// first body byte, and the body in chunks.
pub struct Opened {
    /// Size of the whole content.
    pub total: u64,
    /// Offset of the body's first byte.
    pub start: u64,
    /// The bytes, in chunks; an error says what broke the transfer (worth a retry).
    pub body: futures::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("total", &self.total)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// Receives what an origin fetch produces.
pub trait PieceSink {
    /// The task's storage exists (called once, when the size is first learnt).
    fn layout(&mut self, store: &Arc<TaskStore>);
    /// Piece `number` is stored.
    fn piece(&mut self, number: u32, crc32c: u32, length: u64, cost_us: u64);
}

/// One transfer attempt's failure: retry or give up.
#[derive(Debug)]
enum Attempt {
    Retry(String),
    Fatal(OriginError),
}

/// Fetches every missing piece of `spec` from its origin into `existing` (or a new store
/// created once the size is known). Returns the complete store.
pub async fn fetch(
    ctx: &OriginClient,
    spec: &TaskSpec,
    existing: Option<Arc<TaskStore>>,
    sink: &mut (dyn PieceSink + Send),
) -> Result<Arc<TaskStore>, OriginError> {
    fetch_some(ctx, spec, existing, None, sink).await
}

/// Fetches the pieces of `store` numbered in `pieces` that it does not hold yet from the
/// origin, with one Range request per contiguous run (numbers out of range are ignored).
/// Takes an origin slot like [`fetch`]. Returns when each of them is stored (by this fetch
/// or by the data plane meanwhile).
pub async fn fetch_pieces(
    ctx: &OriginClient,
    spec: &TaskSpec,
    store: Arc<TaskStore>,
    pieces: &[u32],
    sink: &mut (dyn PieceSink + Send),
) -> Result<(), OriginError> {
    let mut wanted = vec![false; store.layout().piece_count() as usize];
    for &n in pieces {
        if let Some(w) = wanted.get_mut(n as usize) {
            *w = true;
        }
    }
    fetch_some(ctx, spec, Some(store), Some(&wanted), sink)
        .await
        .map(|_| ())
}

/// Whether everything asked for is stored: the whole task, or each piece in `only`.
fn satisfied(s: &TaskStore, only: Option<&[bool]>) -> bool {
    match only {
        None => s.is_complete(),
        Some(m) => m.iter().enumerate().all(|(n, w)| !*w || s.has(n as u32)),
    }
}

async fn fetch_some(
    ctx: &OriginClient,
    spec: &TaskSpec,
    existing: Option<Arc<TaskStore>>,
    only: Option<&[bool]>,
    sink: &mut (dyn PieceSink + Send),
) -> Result<Arc<TaskStore>, OriginError> {
    if let Some(s) = &existing {
        if satisfied(s, only) {
            return Ok(s.clone());
        }
    }
    // One slot per task for the whole fetch, retries included.
    let _slot = match &ctx.origin_slots {
        Some(slots) => {
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    tracing::info!(
                        task = %spec.id,
                        "all {} origin slots busy (download.origin_concurrency); waiting",
                        ctx.download.origin_concurrency
                    );
                    Counters::add(&ctx.stats.origin_slot_waits, 1);
                    slots.clone().acquire_owned().await.map_err(|_| {
                        OriginError::Storage(StorageFailure::Other("origin slots closed".into()))
                    })?
                }
            };
            Some(permit)
        }
        None => None,
    };
    let mut store = existing;
    let mut retries = 0u32;
    let limiter = ctx.shaping.limiter(spec.rate_limit);
    loop {
        if let Some(s) = &store {
            if satisfied(s, only) {
                return Ok(s.clone());
            }
        }
        match attempt(ctx, spec, &mut store, only, sink, &limiter).await {
            Ok(()) => {}
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(last)) => {
                retries += 1;
                if retries > ctx.download.origin_retries {
                    return Err(OriginError::Exhausted {
                        retries: retries - 1,
                        last,
                    });
                }
                Counters::add(&ctx.stats.origin_retries, 1);
                tracing::warn!(task = %spec.id, "origin transfer interrupted ({last}); retry {retries}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(retries))).await;
            }
        }
    }
}

async fn attempt(
    ctx: &OriginClient,
    spec: &TaskSpec,
    store: &mut Option<Arc<TaskStore>>,
    only: Option<&[bool]>,
    sink: &mut (dyn PieceSink + Send),
    limiter: &RateLimiter,
) -> Result<(), Attempt> {
    let (start, end) = resume_span(store.as_deref(), only);
    let range = range_value(start, end);
    if end.is_some() {
        Counters::add(&ctx.stats.origin_range_requests, 1);
    }
    let opened = if crate::s3::is_s3(&spec.url) {
        open_s3(ctx, spec, start, end).await?
    } else {
        open_http(ctx, spec, range, start).await?
    };
    let Opened {
        total,
        start: body_start,
        mut body,
    } = opened;
    if body_start > start {
        return Err(Attempt::Fatal(OriginError::Inconsistent(format!(
            "asked for bytes from {start}, got them from {body_start}"
        ))));
    }
    let store = match store {
        Some(s) => {
            if s.layout().content_length() != total {
                return Err(Attempt::Fatal(OriginError::Inconsistent(format!(
                    "content length changed from {} to {total}",
                    s.layout().content_length()
                ))));
            }
            s.clone()
        }
        None => {
            let piece_length = if spec.piece_length != 0 {
                spec.piece_length
            } else {
                wire::piece::piece_length_for(
                    total,
                    ctx.download.piece_length_min.0,
                    ctx.download.piece_length_max.0,
                )
            };
            let layout =
                PieceLayout::new(total, piece_length).map_err(|e| Attempt::Fatal(e.into()))?;
            let s = ctx
                .storage
                .create(spec.id, layout)
                .map_err(|e| Attempt::Fatal(OriginError::Storage(e.into())))?;
            sink.layout(&s);
            *store = Some(s.clone());
            s
        }
    };
    let layout = store.layout();
    let stop = end.unwrap_or(total).min(total);
    let mut pos = body_start;
    // The piece being received: its number and, when this fetch writes it, its claim with
    // the body's buffers not written yet (at most `ORIGIN_WRITE_BATCH` bytes).
    let mut cur: Option<OriginPiece> = None;
    while pos < stop {
        let chunk = match body.next().await {
            Some(Ok(c)) => c,
            None => break,
            Some(Err(e)) => return Err(Attempt::Retry(format!("body: {e}"))),
        };
        let wait = shaper::reserve_all(
            &[Some(&ctx.shaping.download), Some(limiter)],
            chunk.len() as u64,
        );
        if !wait.is_zero() {
            Counters::add(&ctx.counters.shaping_waits, 1);
            tokio::time::sleep(ctx.shaping.clock().pass(wait)).await;
        }
        let mut data = chunk;
        while !data.is_empty() && pos < stop {
            if pos >= total {
                return Err(Attempt::Fatal(OriginError::Inconsistent(format!(
                    "origin sent more than the {total} bytes it announced"
                ))));
            }
            if pos < start {
                // An origin that ignored our Range: skip what we have.
                let skip = ((start - pos) as usize).min(data.len());
                bytes::Buf::advance(&mut data, skip);
                pos += skip as u64;
                continue;
            }
            let Some(n) = layout.piece_at(pos) else { break };
            let Some(range) = layout.piece_range(n) else {
                break;
            };
            if cur.as_ref().is_none_or(|c| c.n != n) {
                cur = Some(OriginPiece::start(&store, n, pos == range.start)?);
            }
            let Some(piece) = cur.as_mut() else { break };
            let take = ((range.end - pos) as usize).min(data.len());
            let part = data.split_to(take);
            pos += take as u64;
            piece.add(part);
            if pos == range.end {
                if let Some(p) = cur.take() {
                    if let Some((crc, len, cost)) = p.finish().await? {
                        Counters::add(&ctx.counters.bytes_from_origin, len);
                        sink.piece(n, crc, len, cost);
                    }
                }
            } else if piece.batched >= ORIGIN_WRITE_BATCH {
                piece.flush().await?;
            }
        }
    }
    if pos < stop {
        return Err(Attempt::Retry(format!(
            "body ended at byte {pos} of {stop} (of {total})"
        )));
    }
    Ok(())
}

/// The bytes an attempt asks for, `start..end` (`None`: to the end of the content): from the
/// first missing piece (of those asked for in `only`) to the end of the run of missing
/// pieces asked for that starts there, so bytes already stored are not fetched again; the
/// whole content when the size is not known yet (`store` is `None`).
fn resume_span(store: Option<&TaskStore>, only: Option<&[bool]>) -> (u64, Option<u64>) {
    let Some(s) = store else {
        return (0, None);
    };
    let layout = s.layout();
    let wanted =
        |n: u32| !s.has(n) && only.is_none_or(|m| m.get(n as usize).copied().unwrap_or(false));
    let first = (0..layout.piece_count()).find(|&n| wanted(n)).unwrap_or(0);
    let start = layout.piece_range(first).map_or(0, |r| r.start);
    let last = (first..layout.piece_count())
        .take_while(|&n| wanted(n))
        .last();
    let end = last.and_then(|l| layout.piece_range(l)).map(|r| r.end);
    (start, end)
}

/// The `Range` header value for bytes `start..end` (`end` exclusive; `None`: to the end).
fn range_value(start: u64, end: Option<u64>) -> String {
    match end {
        Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
        None => format!("bytes={start}-"),
    }
}

/// What an HTTP origin's answer to a request for bytes from `start` says: (the content's
/// total length, the offset of the first body byte), or whether to retry or give up.
/// `content_range` and `content_length` are those headers, if present and text.
fn answer_span(
    status: StatusCode,
    content_range: Option<&str>,
    content_length: Option<&str>,
    start: u64,
    url: &str,
) -> Result<(u64, u64), Attempt> {
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let cr = content_range.ok_or(Attempt::Fatal(OriginError::Inconsistent(
                "206 without Content-Range".into(),
            )))?;
            let bad = || {
                Attempt::Fatal(OriginError::Inconsistent(format!(
                    "bad Content-Range {cr:?}"
                )))
            };
            let total = content_range_total(cr).ok_or_else(bad)?;
            let s = content_range_start(cr).ok_or_else(bad)?;
            Ok((total, s))
        }
        StatusCode::OK => {
            let len = content_length
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(Attempt::Fatal(OriginError::UnknownLength))?;
            Ok((len, 0))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // `bytes=0-` of an empty file.
            match content_range.and_then(content_range_total) {
                Some(0) if start == 0 => Ok((0, 0)),
                _ => Err(Attempt::Fatal(OriginError::Status(status, url.to_owned()))),
            }
        }
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
            Err(Attempt::Retry(format!("origin answered {s}")))
        }
        s => Err(Attempt::Fatal(OriginError::Status(s, url.to_owned()))),
    }
}

/// `GET` of an HTTP(S) origin with `range`; `start` is its first byte.
async fn open_http(
    ctx: &OriginClient,
    spec: &TaskSpec,
    range: String,
    start: u64,
) -> Result<Opened, Attempt> {
    let mut req = ctx.http.get(&spec.url).header(RANGE, range);
    for (k, v) in &spec.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| Attempt::Fatal(OriginError::BadHeader(k.clone())))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| Attempt::Fatal(OriginError::BadHeader(k.clone())))?;
        req = req.header(name, value);
    }
    let resp = match tokio::time::timeout(ctx.download.origin_timeout, req.send()).await {
        Err(_) => return Err(Attempt::Retry("no response headers in time".into())),
        Ok(Err(e)) => {
            // A refused certificate stays refused: fail at once, saying which setting helps.
            if crate::trust::certificate_error(&e).is_some() {
                return Err(Attempt::Fatal(OriginError::Tls(crate::trust::describe(&e))));
            }
            return Err(Attempt::Retry(format!(
                "request failed: {}",
                crate::trust::describe(&e)
            )));
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let (total, body_start) = answer_span(
        status,
        header(CONTENT_RANGE).as_deref(),
        header(CONTENT_LENGTH).as_deref(),
        start,
        &spec.url,
    )?;
    let body = if status == StatusCode::RANGE_NOT_SATISFIABLE {
        futures::stream::empty().boxed()
    } else {
        resp.bytes_stream()
            .map(|r| r.map_err(|e| crate::trust::describe(&e)))
            .boxed()
    };
    Ok(Opened {
        total,
        start: body_start,
        body,
    })
}

/// Ranged read of an `s3://` object (bytes `start` to `end`, exclusive).
async fn open_s3(
    ctx: &OriginClient,
    spec: &TaskSpec,
    start: u64,
    end: Option<u64>,
) -> Result<Opened, Attempt> {
    let res = tokio::time::timeout(
        ctx.download.origin_timeout,
        crate::s3::open(
            &ctx.origin.s3,
            spec.s3.as_ref(),
            &ctx.origin,
            ctx.download.origin_timeout,
            &spec.url,
            start,
            end,
        ),
    )
    .await;
    match res {
        Err(_) => Err(Attempt::Retry("no response headers in time".into())),
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) if e.retryable() => Err(Attempt::Retry(e.to_string())),
        Ok(Err(e)) => Err(Attempt::Fatal(OriginError::ObjectStore(e))),
    }
}

#[cfg(test)]
mod tests;
