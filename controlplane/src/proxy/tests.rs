//! Unit tests of the registry mirror without a daemon: a `Proxy` on a loopback port in this
//! process, its downloads run by a `TaskManager` over in-memory schedulers, data plane and
//! origin (`task::tests::fake_services`) and a real `Storage`; the upstream registry is a
//! small HTTP server on loopback in this process.

use super::*;
use crate::origin::OriginError;
use crate::retention::tests::Disk;
use sha2::{Digest, Sha256};
use std::sync::Mutex;

/// What the fake origin serves for every blob: 3 pieces of 16 KiB, the last one short.
fn content() -> Vec<u8> {
    (0..(2 * (16 << 10) + 100))
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An upstream registry: `/v2/` asks for a token (401 with `WWW-Authenticate`), anything
/// else is 404 with a body naming the path. Returns its URL and the paths it was asked.
async fn upstream() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let path = req.uri().path().to_string();
                    log.lock().expect("lock").push(path.clone());
                    let resp = if path == "/v2/" {
                        Response::builder()
                            .status(401)
                            .header(
                                "www-authenticate",
                                "Bearer realm=\"http://auth.test/token\"",
                            )
                            .body(Full::new(Bytes::from_static(b"{}")))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from(format!("upstream has no {path}"))))
                    };
                    async move { resp.map_err(|e| std::io::Error::other(e.to_string())) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

struct Fixture {
    disk: Disk,
    url: String,
    counters: Arc<ProxyCounters>,
    upstream_seen: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

/// A proxy whose blob downloads come from an origin that serves [`content`] (or fails
/// with `fail`).
async fn fixture(fail: Option<fn() -> OriginError>) -> Fixture {
    let disk = Disk::new();
    let services =
        crate::task::tests::fake_services(disk.storage.clone(), disk.meta.clone(), content(), fail);
    let tasks = Arc::new(TaskManager::new(services));
    let (upstream_url, upstream_seen) = upstream().await;
    let mut config = DaemonConfig::default();
    config.proxy.registry_mirror = upstream_url;
    config.storage.dir = disk._dir.path().to_path_buf();
    let counters = Arc::new(ProxyCounters::default());
    let proxy = Arc::new(
        Proxy::new(&config, tasks, disk.storage.clone(), counters.clone()).expect("proxy"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(proxy.serve(listener));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    Fixture {
        disk,
        url,
        counters,
        upstream_seen,
        client,
    }
}

impl Fixture {
    fn blob_url(&self, digest: &str) -> String {
        format!("{}/v2/library/app/blobs/{digest}", self.url)
    }

    fn count(c: &AtomicU64) -> u64 {
        dataplane::Counters::get(c)
    }
}

#[tokio::test]
async fn a_blob_is_streamed_from_its_p2p_task_with_its_digest() {
    let f = fixture(None).await;
    let digest = digest_of(&content());
    let resp = f
        .client
        .get(f.blob_url(&digest))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(digest.as_str())
    );
    assert_eq!(resp.bytes().await.expect("body"), content());
    assert_eq!(Fixture::count(&f.counters.p2p_requests), 1);
    assert_eq!(
        Fixture::count(&f.counters.p2p_bytes),
        content().len() as u64
    );
    assert_eq!(Fixture::count(&f.counters.pass_through_requests), 0);
    assert!(f.upstream_seen.lock().expect("lock").is_empty());
    // The blob is the digest's task, held now.
    let id = TaskId::from_content_digest(&digest);
    assert!(f.disk.storage.get(&id).is_some_and(|s| s.is_complete()));
}

#[tokio::test]
async fn a_range_of_a_blob_is_206_with_exactly_its_bytes() {
    let f = fixture(None).await;
    let len = content().len();
    let resp = f
        .client
        .get(f.blob_url(&digest_of(&content())))
        .header("range", "bytes=10-20000")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes 10-20000/{len}").as_str())
    );
    assert_eq!(resp.bytes().await.expect("body"), &content()[10..=20000]);

    let resp = f
        .client
        .get(f.blob_url(&digest_of(&content())))
        .header("range", format!("bytes={len}-"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 416);
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_is_never_served_whole_and_is_dropped() {
    let f = fixture(None).await;
    let digest = digest_of(b"some other blob");
    let resp = f
        .client
        .get(f.blob_url(&digest))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "the head goes out before the bytes");
    let body = resp.bytes().await;
    assert!(
        body.as_ref().map_or(true, |b| b.len() < content().len()),
        "the whole wrong blob was served"
    );
    assert!(
        body.is_err(),
        "a cut body must be an error, not a short success"
    );
    assert_eq!(Fixture::count(&f.counters.digest_mismatches), 1);
    let id = TaskId::from_content_digest(&digest);
    assert!(f.disk.storage.get(&id).is_none(), "the bad content is kept");
}

#[tokio::test]
async fn other_requests_and_blobs_whose_download_fails_go_to_the_upstream() {
    let f = fixture(Some(|| {
        OriginError::Status(reqwest::StatusCode::UNAUTHORIZED, "blob".into())
    }))
    .await;
    // Not a blob: passed through, the upstream's answer unchanged.
    let resp = f
        .client
        .get(format!("{}/v2/", f.url))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("www-authenticate").is_some());

    // A blob whose P2P download fails before the response starts: the upstream answers.
    let digest = digest_of(&content());
    let resp = f
        .client
        .get(f.blob_url(&digest))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 404);
    let body = resp.text().await.expect("body");
    assert!(
        body.contains("upstream has no /v2/library/app/blobs/"),
        "{body}"
    );
    assert_eq!(
        *f.upstream_seen.lock().expect("lock"),
        vec![
            "/v2/".to_string(),
            format!("/v2/library/app/blobs/{digest}")
        ]
    );
    assert_eq!(Fixture::count(&f.counters.pass_through_requests), 2);
    assert_eq!(Fixture::count(&f.counters.p2p_requests), 0);
}
