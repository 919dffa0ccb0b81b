//! Unit tests of the origin fetch. What needs no socket is tested alone: the span an attempt
//! resumes from, the `Range` header, what an answer's status and headers mean. The fetch
//! itself runs against a real HTTP server on loopback in this process (hyper), which serves
//! the content honouring `Range`, ignores it, breaks a body, or answers an error status; a
//! real `Storage` in a temporary directory.

use super::*;
use crate::config::ByteSize;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use wire::range::{parse_range, RangeAsk};
use wire::TaskId;

const P: u64 = 16 << 10;

/// 3.5 pieces, bytes that differ between pieces.
fn content() -> Vec<u8> {
    (0..(7 * P / 2)).map(|i| (i * 7 % 251) as u8).collect()
}

fn temp_storage() -> (tempfile::TempDir, Arc<Storage>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
    (dir, storage)
}

/// A store of `data` in pieces of `P` holding the pieces in `held`.
fn store_holding(storage: &Storage, data: &[u8], held: &[u32]) -> Arc<TaskStore> {
    let layout = PieceLayout::new(data.len() as u64, P).expect("layout");
    let s = storage
        .create(TaskId::from_cache_id("origin-test", "", ""), layout)
        .expect("create");
    for &n in held {
        let r = layout.piece_range(n).expect("piece");
        let bytes = &data[r.start as usize..r.end as usize];
        s.write_piece(n, bytes, wire::piece_crc(bytes))
            .expect("write");
    }
    s
}

// ---- no socket ----

#[test]
fn a_task_of_unknown_size_is_fetched_whole() {
    assert_eq!(resume_span(None, None), (0, None));
}

#[test]
fn resume_starts_at_the_first_missing_piece_and_stops_at_the_first_held_one() {
    let (_dir, storage) = temp_storage();
    let data = content();
    let len = data.len() as u64;
    let s = store_holding(&storage, &data, &[0, 2]);
    // Piece 1 is missing, piece 2 held: only piece 1.
    assert_eq!(resume_span(Some(&s), None), (P, Some(2 * P)));
    {
        let (_dir, storage) = temp_storage();
        let s = store_holding(&storage, &data, &[0, 1]);
        // The last two pieces, to the end of the content (the last one is short).
        assert_eq!(resume_span(Some(&s), None), (2 * P, Some(len)));
    }
    // Only piece 3 asked for (pieces 1 and 3 missing): just it.
    let only = [false, false, false, true];
    assert_eq!(resume_span(Some(&s), Some(&only)), (3 * P, Some(len)));
    // Pieces 1 and 3 asked for: the run that starts at 1 ends at the held piece 2.
    let only = [false, true, false, true];
    assert_eq!(resume_span(Some(&s), Some(&only)), (P, Some(2 * P)));
}

#[test]
fn range_header_is_inclusive() {
    assert_eq!(range_value(5, Some(10)), "bytes=5-9");
    assert_eq!(range_value(0, None), "bytes=0-");
    assert_eq!(range_value(P, None), format!("bytes={P}-"));
}

/// What an answer means, by status and headers.
#[test]
fn answers_are_read_by_status_and_headers() {
    let url = "http://origin.test/f";
    let span = |status: u16, cr: Option<&str>, cl: Option<&str>, start: u64| {
        answer_span(
            StatusCode::from_u16(status).expect("status"),
            cr,
            cl,
            start,
            url,
        )
    };
    assert_eq!(
        span(206, Some("bytes 100-199/1000"), None, 100).expect("206"),
        (1000, 100)
    );
    assert_eq!(span(200, None, Some("1000"), 100).expect("200"), (1000, 0));
    // An empty file asked for from byte 0.
    assert_eq!(span(416, Some("bytes */0"), None, 0).expect("416"), (0, 0));

    let fatal = |r: Result<(u64, u64), Attempt>| match r {
        Err(Attempt::Fatal(e)) => e,
        other => panic!("not fatal: {other:?}"),
    };
    assert!(matches!(
        fatal(span(206, None, Some("10"), 0)),
        OriginError::Inconsistent(m) if m.contains("without Content-Range")
    ));
    assert!(matches!(
        fatal(span(206, Some("bytes 0-9/*"), None, 0)),
        OriginError::Inconsistent(m) if m.contains("bad Content-Range")
    ));
    assert!(matches!(
        fatal(span(206, Some("items 0-9/10"), None, 0)),
        OriginError::Inconsistent(_)
    ));
    assert!(matches!(
        fatal(span(200, None, None, 0)),
        OriginError::UnknownLength
    ));
    assert!(matches!(
        fatal(span(200, None, Some("ten"), 0)),
        OriginError::UnknownLength
    ));
    // 416 other than for an empty file, and client errors: the status, no retry.
    assert!(matches!(
        fatal(span(416, Some("bytes */10"), None, 20)),
        OriginError::Status(s, _) if s.as_u16() == 416
    ));
    assert!(matches!(
        fatal(span(404, None, Some("9"), 0)),
        OriginError::Status(s, u) if s.as_u16() == 404 && u == url
    ));
    assert!(matches!(
        fatal(span(403, None, None, 0)),
        OriginError::Status(s, _) if s.as_u16() == 403
    ));
    // Server errors and 429: retried.
    for status in [500, 502, 503, 429] {
        assert!(
            matches!(span(status, None, None, 0), Err(Attempt::Retry(m)) if m.contains(&status.to_string())),
            "{status}"
        );
    }
}

#[test]
fn content_range_values_from_an_origin() {
    assert_eq!(content_range_total(" bytes 0-99/100 "), Some(100));
    assert_eq!(content_range_start("bytes  7-99/100"), Some(7));
    assert_eq!(content_range_start("bytes */100"), None);
    assert_eq!(content_range_total("bytes 0-99/-1"), None);
    assert_eq!(content_range_total("bytes 0-99/18446744073709551616"), None);
    assert_eq!(content_range_total(""), None);
    assert_eq!(content_range_start("bytes -5-9/10"), None);
}

// ---- a real HTTP origin on loopback ----

/// How the test origin answers.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Honours `Range` (206), else 200.
    Ranges,
    /// Always 200 with the whole content.
    IgnoresRange,
    /// The first answer announces the whole content but its body breaks after this many
    /// bytes; later ones honour `Range`.
    BreaksFirstAfter(usize),
    /// Every body breaks after this many bytes of what it announced.
    AlwaysBreaksAfter(usize),
    /// Answers this status with an empty body.
    Status(u16),
}

/// What the origin saw of one request: its `Range` and `X-Token` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    range: Option<String>,
    token: Option<String>,
}

struct TestOrigin {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Body = BoxBody<Bytes, std::io::Error>;

/// The answer to one request of the test origin (`index`: how many came before).
fn answer(mode: Mode, data: &[u8], index: usize, range: Option<&str>) -> hyper::Response<Body> {
    let len = data.len() as u64;
    let full = |status: u16, from: u64, to: u64| {
        let mut b = hyper::Response::builder()
            .status(status)
            .header("content-length", to - from);
        if status == 206 {
            b = b.header("content-range", format!("bytes {from}-{}/{len}", to - 1));
        }
        (b, data[from as usize..to as usize].to_vec())
    };
    let honour = || match range.map_or(RangeAsk::Full, |r| parse_range(r, len)) {
        RangeAsk::Part(a, b) => full(206, a, b),
        _ => full(200, 0, len),
    };
    let (builder, bytes, cut) = match mode {
        Mode::Ranges => {
            let (b, d) = honour();
            (b, d, None)
        }
        Mode::IgnoresRange => {
            let (b, d) = full(200, 0, len);
            (b, d, None)
        }
        Mode::BreaksFirstAfter(n) if index == 0 => {
            let (b, d) = full(200, 0, len);
            (b, d, Some(n))
        }
        Mode::BreaksFirstAfter(_) => {
            let (b, d) = honour();
            (b, d, None)
        }
        Mode::AlwaysBreaksAfter(n) => {
            let (b, d) = honour();
            (b, d, Some(n))
        }
        Mode::Status(s) => (hyper::Response::builder().status(s), Vec::new(), None),
    };
    let body: Body = match cut {
        None => http_body_util::Full::new(Bytes::from(bytes))
            .map_err(|never| match never {})
            .boxed(),
        Some(n) => {
            let part = Bytes::from(bytes[..n.min(bytes.len())].to_vec());
            // The part, then (after a pause, which makes the server flush what it has: the
            // head and the part reach the client) the error that aborts the connection.
            let frames = futures::stream::unfold(Some(Some(part)), |next| async move {
                match next? {
                    Some(p) => Some((Ok(Frame::data(p)), Some(None))),
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let e = std::io::Error::other("test origin breaks the body");
                        Some((Err(e), None))
                    }
                }
            });
            BodyExt::boxed(StreamBody::new(frames))
        }
    };
    builder.body(body).expect("response")
}

/// Serves `data` on a loopback port in this process, as `mode` says.
async fn serve(mode: Mode, data: Vec<u8>) -> TestOrigin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let data = Arc::new(data);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (log, data) = (log.clone(), data.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let s = Seen {
                        range: header("range"),
                        token: header("x-token"),
                    };
                    let index = {
                        let mut l = log.lock().expect("lock");
                        l.push(s.clone());
                        l.len() - 1
                    };
                    let resp = answer(mode, &data, index, s.range.as_deref());
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    TestOrigin {
        url: format!("http://{addr}/data.bin"),
        seen,
    }
}

impl TestOrigin {
    fn ranges(&self) -> Vec<Option<String>> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.range.clone())
            .collect()
    }
}

/// Records what the fetch reports.
#[derive(Default)]
struct Sink {
    layouts: usize,
    pieces: Vec<(u32, u32, u64)>,
}

impl PieceSink for Sink {
    fn layout(&mut self, _store: &Arc<TaskStore>) {
        self.layouts += 1;
    }

    fn piece(&mut self, number: u32, crc32c: u32, length: u64, _cost_us: u64) {
        self.pieces.push((number, crc32c, length));
    }
}

fn client(storage: Arc<Storage>, retries: u32) -> OriginClient {
    OriginClient {
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client"),
        download: DownloadConfig {
            origin_retries: retries,
            origin_timeout: Duration::from_secs(10),
            piece_length_min: ByteSize(P),
            ..DownloadConfig::default()
        },
        origin: OriginConfig::default(),
        origin_slots: None,
        storage,
        shaping: Arc::new(Shaping::new(Default::default())),
        counters: Arc::new(Counters::default()),
        stats: Arc::new(ControlStats::default()),
    }
}

fn spec(url: &str) -> TaskSpec {
    TaskSpec {
        id: TaskId::from_cache_id("origin-test", "", ""),
        url: url.into(),
        headers: vec![("X-Token".into(), "secret".into())],
        piece_length: P,
        back_to_source: true,
        disable_back_to_source: false,
        rate_limit: 0,
        scheduler: None,
        priority: 0,
        digest: None,
        s3: None,
    }
}

/// Every piece of `data` as the sink should see it: (number, crc32c, length).
fn reports(data: &[u8], pieces: impl IntoIterator<Item = u32>) -> Vec<(u32, u32, u64)> {
    pieces
        .into_iter()
        .map(|n| {
            let c = data
                .chunks(P as usize)
                .nth(n as usize)
                .expect("piece of the content");
            (n, wire::piece_crc(c), c.len() as u64)
        })
        .collect()
}

#[tokio::test]
async fn fetch_stores_every_piece_sends_the_users_headers_and_reports_each_piece() {
    let data = content();
    let origin = serve(Mode::Ranges, data.clone()).await;
    let (_dir, storage) = temp_storage();
    let ctx = client(storage.clone(), 0);
    let mut sink = Sink::default();
    let store = fetch(&ctx, &spec(&origin.url), None, &mut sink)
        .await
        .expect("fetch");
    assert!(store.is_complete());
    assert_eq!(std::fs::read(store.path()).expect("task file"), data);
    assert_eq!(store.layout().piece_length(), P);
    assert_eq!(sink.layouts, 1);
    assert_eq!(sink.pieces, reports(&data, 0..4));
    assert_eq!(
        *origin.seen.lock().expect("lock"),
        vec![Seen {
            range: Some("bytes=0-".into()),
            token: Some("secret".into()),
        }]
    );
    assert_eq!(
        Counters::get(&ctx.counters.bytes_from_origin),
        data.len() as u64
    );
    // Stored with the digest of what was read (trusted, as for an import).
    assert!(store.all_digests().is_some());
}

#[tokio::test]
async fn a_broken_transfer_resumes_from_the_first_missing_piece() {
    let data = content();
    // Breaks in piece 1: piece 0 is kept, the retry asks for the rest from piece 1.
    let origin = serve(Mode::BreaksFirstAfter((P + 100) as usize), data.clone()).await;
    let (_dir, storage) = temp_storage();
    let ctx = client(storage, 2);
    let mut sink = Sink::default();
    let store = fetch(&ctx, &spec(&origin.url), None, &mut sink)
        .await
        .expect("fetch");
    assert_eq!(std::fs::read(store.path()).expect("task file"), data);
    let len = data.len();
    assert_eq!(
        origin.ranges(),
        vec![
            Some("bytes=0-".into()),
            Some(format!("bytes={P}-{}", len - 1))
        ]
    );
    // Each piece reported once.
    assert_eq!(sink.pieces, reports(&data, 0..4));
    assert_eq!(ctx.stats.origin_retries.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_origin_that_ignores_range_fills_only_the_missing_pieces() {
    let data = content();
    let origin = serve(Mode::IgnoresRange, data.clone()).await;
    let (_dir, storage) = temp_storage();
    let existing = store_holding(&storage, &data, &[0, 1]);
    let ctx = client(storage, 0);
    let mut sink = Sink::default();
    let store = fetch(&ctx, &spec(&origin.url), Some(existing), &mut sink)
        .await
        .expect("fetch");
    assert!(store.is_complete());
    assert_eq!(std::fs::read(store.path()).expect("task file"), data);
    assert_eq!(
        origin.ranges(),
        vec![Some(format!("bytes={}-{}", 2 * P, data.len() - 1))]
    );
    assert_eq!(sink.layouts, 0, "the size was known");
    assert_eq!(sink.pieces, reports(&data, [2, 3]));
}

#[tokio::test]
async fn fetch_pieces_asks_for_the_run_of_missing_pieces_asked_for() {
    let data = content();
    let origin = serve(Mode::Ranges, data.clone()).await;
    let (_dir, storage) = temp_storage();
    let store = store_holding(&storage, &data, &[0]);
    let ctx = client(storage, 0);
    let mut sink = Sink::default();
    fetch_pieces(
        &ctx,
        &spec(&origin.url),
        store.clone(),
        &[1, 2, 9],
        &mut sink,
    )
    .await
    .expect("fetch pieces");
    assert!(store.has(1) && store.has(2) && !store.has(3));
    assert_eq!(
        origin.ranges(),
        vec![Some(format!("bytes={P}-{}", 3 * P - 1))]
    );
    assert_eq!(sink.pieces, reports(&data, [1, 2]));
    // Nothing missing of what is asked: no request.
    fetch_pieces(&ctx, &spec(&origin.url), store, &[0, 1], &mut sink)
        .await
        .expect("nothing to fetch");
    assert_eq!(origin.ranges().len(), 1);
}

#[tokio::test]
async fn a_client_error_is_fatal_at_once_and_a_server_error_is_retried_then_given_up() {
    let (_dir, storage) = temp_storage();
    let ctx = client(storage.clone(), 2);

    let origin = serve(Mode::Status(404), content()).await;
    let e = fetch(&ctx, &spec(&origin.url), None, &mut Sink::default())
        .await
        .expect_err("404");
    assert!(
        matches!(&e, OriginError::Status(s, _) if s.as_u16() == 404),
        "{e:?}"
    );
    assert_eq!(origin.ranges().len(), 1, "a 404 was retried");

    let origin = serve(Mode::Status(503), content()).await;
    let e = fetch(&ctx, &spec(&origin.url), None, &mut Sink::default())
        .await
        .expect_err("503");
    assert!(
        matches!(&e, OriginError::Exhausted { retries: 2, last } if last.contains("503")),
        "{e:?}"
    );
    assert_eq!(origin.ranges().len(), 3);
    assert!(storage.is_empty(), "a task was created without a size");
}

#[tokio::test]
async fn a_body_that_keeps_breaking_is_never_a_complete_task() {
    let data = content();
    let origin = serve(Mode::AlwaysBreaksAfter((P / 2) as usize), data.clone()).await;
    let (_dir, storage) = temp_storage();
    let ctx = client(storage.clone(), 1);
    let mut sink = Sink::default();
    let e = fetch(&ctx, &spec(&origin.url), None, &mut sink)
        .await
        .expect_err("broken body");
    assert!(
        matches!(e, OriginError::Exhausted { retries: 1, .. }),
        "{e:?}"
    );
    let store = storage.get(&spec(&origin.url).id).expect("created");
    assert!(!store.is_complete());
    assert_eq!(store.finished_count(), 0, "a partial piece was committed");
    assert!(sink.pieces.is_empty());
}

#[tokio::test]
async fn a_content_length_that_changed_is_inconsistent() {
    let data = content();
    let origin = serve(Mode::Ranges, data[..data.len() - 10].to_vec()).await;
    let (_dir, storage) = temp_storage();
    let existing = store_holding(&storage, &data, &[0]);
    let ctx = client(storage, 2);
    let e = fetch(
        &ctx,
        &spec(&origin.url),
        Some(existing),
        &mut Sink::default(),
    )
    .await
    .expect_err("another length");
    assert!(
        matches!(&e, OriginError::Inconsistent(m) if m.contains("content length changed")),
        "{e:?}"
    );
    assert_eq!(
        origin.ranges().len(),
        1,
        "an inconsistent answer was retried"
    );
}

#[tokio::test]
async fn a_header_that_is_not_http_is_refused_before_any_request() {
    let origin = serve(Mode::Ranges, content()).await;
    let (_dir, storage) = temp_storage();
    let ctx = client(storage, 2);
    let mut s = spec(&origin.url);
    s.headers = vec![("bad header".into(), "v".into())];
    let e = fetch(&ctx, &s, None, &mut Sink::default())
        .await
        .expect_err("bad header");
    assert!(
        matches!(&e, OriginError::BadHeader(h) if h == "bad header"),
        "{e:?}"
    );
    assert!(origin.ranges().is_empty());
}
