//! Preheat: manifest resolution against a tiny in-test registry (OCI index, manifests, bearer
//! token flow) and the job flow through REST and a scheduler's preheat stream.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::{eventually, grpc, manager, Rest, BOUND, TOKEN};
use damselfly_manager::proto;
use damselfly_manager::registry::{Credentials, ImageRef, Resolver};
use reqwest::Method;
use serde_json::json;

const TOKEN_VALUE: &str = "registry-token-123";

fn digest(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// The linux/amd64 manifest, as the registry serves it.
fn amd64_manifest() -> String {
    json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(0xc0), "size": 1},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(1), "size": 10},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(2), "size": 20}
        ]
    })
    .to_string()
}

/// The linux/arm64/v8 manifest, as the registry serves it.
fn arm64_manifest() -> String {
    json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": digest(3), "size": 30}]
    })
    .to_string()
}

/// The content digest of a manifest's bytes.
fn sha256(body: &str) -> String {
    use sha2::Digest as _;
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(body.as_bytes()))
    )
}

#[derive(Clone)]
struct Registry {
    addr: std::net::SocketAddr,
    /// Require the bearer token flow (with these basic credentials at the token endpoint).
    auth: bool,
    token_requests: Arc<AtomicUsize>,
    /// Serve another (well-formed) manifest under the amd64 manifest's digest.
    swapped: bool,
}

async fn manifests(
    State(r): State<Registry>,
    Path((ns, name, reference)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if r.auth
        && headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {TOKEN_VALUE}"))
    {
        let challenge = format!(
            "Bearer realm=\"http://{}/token\",service=\"test-registry\",scope=\"repository:{ns}/{name}:pull\"",
            r.addr
        );
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", challenge)],
            "{}",
        )
            .into_response();
    }
    let accept = headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !accept.contains("application/vnd.oci.image.index.v1+json") {
        return (StatusCode::NOT_ACCEPTABLE, "missing Accept").into_response();
    }
    if format!("{ns}/{name}") != "team/app" {
        return (StatusCode::NOT_FOUND, "{}").into_response();
    }
    let body = if reference == "1.0" {
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&arm64_manifest()),
                 "size": 1, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&amd64_manifest()),
                 "size": 1, "platform": {"architecture": "amd64", "os": "linux"}}
            ]
        })
        .to_string()
    } else if reference == sha256(&amd64_manifest()) {
        if r.swapped {
            arm64_manifest()
        } else {
            amd64_manifest()
        }
    } else if reference == sha256(&arm64_manifest()) {
        arm64_manifest()
    } else {
        return (StatusCode::NOT_FOUND, "{}").into_response();
    };
    (
        [("content-type", "application/vnd.oci.image.index.v1+json")],
        body,
    )
        .into_response()
}

async fn token(
    State(r): State<Registry>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    r.token_requests.fetch_add(1, Ordering::SeqCst);
    // "user:pass" in base64.
    let basic_ok =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Basic dXNlcjpwYXNz");
    if !basic_ok || q.get("service").map(String::as_str) != Some("test-registry") {
        return (StatusCode::UNAUTHORIZED, "{}").into_response();
    }
    if q.get("scope").map(String::as_str) != Some("repository:team/app:pull") {
        return (StatusCode::FORBIDDEN, "{}").into_response();
    }
    json!({"token": TOKEN_VALUE}).to_string().into_response()
}

/// A registry imitation on 127.0.0.1:0: `/v2/<ns>/<name>/manifests/<ref>` and `/token`.
async fn registry(auth: bool) -> Registry {
    registry_with(auth, false).await
}

/// [`registry`], optionally serving a swapped manifest under the amd64 digest.
async fn registry_with(auth: bool, swapped: bool) -> Registry {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = Registry {
        addr: listener.local_addr().unwrap(),
        auth,
        token_requests: Arc::new(AtomicUsize::new(0)),
        swapped,
    };
    let app = Router::new()
        .route("/v2/{ns}/{name}/manifests/{reference}", get(manifests))
        .route("/token", get(token))
        .with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    r
}

#[tokio::test]
async fn resolves_index_to_platform_layers_with_token_auth() {
    let reg = registry(true).await;
    let resolver = Resolver::new(Duration::from_secs(10)).unwrap();
    let creds = Credentials {
        username: "user".into(),
        password: "pass".into(),
    };
    let image = ImageRef::parse(&format!("{}/team/app:1.0", reg.addr), true).unwrap();
    let resolved = resolver
        .resolve(&image, "linux/amd64", Some(&creds))
        .await
        .unwrap();
    let base = format!("http://{}/v2/team/app/blobs", reg.addr);
    assert_eq!(
        resolved
            .layers
            .iter()
            .map(|l| (l.url.clone(), l.digest.clone()))
            .collect::<Vec<_>>(),
        vec![
            (format!("{base}/{}", digest(1)), digest(1)),
            (format!("{base}/{}", digest(2)), digest(2)),
        ]
    );
    assert_eq!(
        resolved
            .config
            .as_ref()
            .map(|c| (c.url.clone(), c.digest.clone())),
        Some((format!("{base}/{}", digest(0xc0)), digest(0xc0)))
    );
    assert_eq!(
        resolved.headers,
        vec![("Authorization".to_string(), format!("Bearer {TOKEN_VALUE}"))]
    );
    assert_eq!(reg.token_requests.load(Ordering::SeqCst), 1);

    // The manifest URL form and another platform (with variant).
    let image = ImageRef::parse(
        &format!("http://{}/v2/team/app/manifests/1.0", reg.addr),
        false,
    )
    .unwrap();
    let arm = resolver
        .resolve(&image, "linux/arm64/v8", Some(&creds))
        .await
        .unwrap();
    assert_eq!(arm.layers.len(), 1);
    assert_eq!(arm.layers[0].digest, digest(3));

    // Missing platform, wrong credentials, unknown repository.
    let err = resolver
        .resolve(&image, "windows/amd64", Some(&creds))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("windows/amd64"), "{err}");
    let bad = Credentials {
        username: "user".into(),
        password: "nope".into(),
    };
    assert!(resolver
        .resolve(&image, "linux/amd64", Some(&bad))
        .await
        .is_err());
    let open = registry(false).await;
    let missing = ImageRef::parse(&format!("{}/team/other:1.0", open.addr), true).unwrap();
    let err = resolver
        .resolve(&missing, "linux/amd64", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
}

async fn job(rest: &Rest, id: u64) -> serde_json::Value {
    let (status, j) = rest.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(status, 200);
    j
}

#[tokio::test]
async fn file_preheat_goes_to_a_subscribed_scheduler_and_succeeds() {
    let (m, _dir) = manager(|_| {}).await;
    let rest = Rest::new(&m);
    let mut client = grpc(&m).await;
    let s = client
        .register_scheduler(proto::RegisterSchedulerRequest {
            cluster_id: 0,
            hostname: "s".into(),
            ip: "127.0.0.1".into(),
            port: 8002,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .subscribe_preheat(proto::SubscribePreheatRequest { scheduler_id: s.id })
        .await
        .unwrap()
        .into_inner();

    let (status, created) = rest
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(TOKEN),
            Some(json!({"type": "preheat", "args": {
                "type": "file", "url": "http://origin.local/big.bin",
                "headers": {"X-Test": "1"}, "tag": "t"
            }})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    assert_eq!(created["state"], "pending");

    let req = tokio::time::timeout(BOUND, stream.message())
        .await
        .expect("a preheat request arrives")
        .unwrap()
        .unwrap();
    assert_eq!(req.job_id, id);
    assert_eq!(req.url, "http://origin.local/big.bin");
    assert_eq!(req.tag, "t");
    assert_eq!(
        req.headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()))
            .collect::<Vec<_>>(),
        [("X-Test", "1")]
    );
    assert_eq!(job(&rest, id).await["state"], "running");

    client
        .report_preheat_result(proto::PreheatResult {
            job_id: id,
            url: req.url.clone(),
            success: true,
            error: String::new(),
            hosts: Vec::new(),
        })
        .await
        .unwrap();
    eventually("job succeeds", || async {
        job(&rest, id).await["state"] == "success"
    })
    .await;
    // A report for a finished job is refused.
    let late = client
        .report_preheat_result(proto::PreheatResult {
            job_id: id,
            url: req.url,
            success: true,
            error: String::new(),
            hosts: Vec::new(),
        })
        .await;
    assert_eq!(late.unwrap_err().code(), tonic::Code::NotFound);

    let (_, list) = rest.get("/api/v1/jobs").await;
    assert_eq!(list[0]["id"].as_u64(), Some(id));
    let (_, page) = rest.text("/").await;
    assert!(page.contains("http://origin.local/big.bin") && page.contains("success"));

    // Bad requests.
    for body in [
        json!({"type": "preheat", "args": {"url": "ftp://x/y"}}),
        json!({"type": "sync", "args": {"url": "http://x/y"}}),
        json!({"type": "preheat", "args": {"type": "image", "url": "Not An Image"}}),
        json!({"type": "preheat", "cluster_id": 99, "args": {"url": "http://x/y"}}),
        json!({"type": "preheat", "args": {"url": ""}}),
        json!({"type": "preheat", "args": {"url": "http://x/y", "digest": "md5:abc"}}),
        json!({"type": "preheat", "args": {"urls": ["http://x/y", "http://x/z"], "digest": format!("sha256:{}", "a".repeat(64))}}),
        json!({"type": "preheat", "args": {"type": "image", "url": "x.io/a:1", "digest": format!("sha256:{}", "a".repeat(64))}}),
        // A digest contradicting the blob URL's.
        json!({"type": "preheat", "args": {"url": format!("http://r/v2/a/blobs/sha256:{}", "b".repeat(64)), "digest": format!("sha256:{}", "a".repeat(64))}}),
        json!({"type": "preheat", "args": {"urls": ["http://x/y", "ftp://x/z"]}}),
    ] {
        let (status, _) = rest
            .call(Method::POST, "/api/v1/jobs", Some(TOKEN), Some(body))
            .await;
        assert_eq!(status, 400);
    }
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_job_over_several_urls_sends_each_and_succeeds_when_all_did() {
    let (m, _dir) = manager(|_| {}).await;
    let rest = Rest::new(&m);
    let mut client = grpc(&m).await;
    let s = client
        .register_scheduler(proto::RegisterSchedulerRequest {
            hostname: "s".into(),
            ip: "127.0.0.1".into(),
            port: 8002,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .subscribe_preheat(proto::SubscribePreheatRequest { scheduler_id: s.id })
        .await
        .unwrap()
        .into_inner();
    let blob = format!("http://r.local/v2/a/blobs/sha256:{}", "c".repeat(64));
    let (status, created) = rest
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(TOKEN),
            Some(json!({"type": "preheat", "args": {
                "url": "http://origin.local/a.bin",
                // A repeat is preheated once; a blob URL carries its digest.
                "urls": ["http://origin.local/b.bin", "http://origin.local/a.bin", blob]
            }})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let req = tokio::time::timeout(BOUND, stream.message())
            .await
            .expect("a preheat request arrives")
            .unwrap()
            .unwrap();
        assert_eq!(req.job_id, id);
        got.push((req.url, req.digest));
    }
    assert_eq!(
        got,
        vec![
            ("http://origin.local/a.bin".to_string(), String::new()),
            ("http://origin.local/b.bin".to_string(), String::new()),
            (blob.clone(), format!("sha256:{}", "c".repeat(64))),
        ]
    );
    let j = job(&rest, id).await;
    assert_eq!(j["targets"].as_array().unwrap().len(), 3);
    for (n, (url, _)) in got.iter().enumerate() {
        client
            .report_preheat_result(proto::PreheatResult {
                job_id: id,
                url: url.clone(),
                success: true,
                error: String::new(),
                hosts: Vec::new(),
            })
            .await
            .unwrap();
        if n < 2 {
            // Not done while a target is still out.
            assert_eq!(job(&rest, id).await["state"], "running");
        }
    }
    eventually("job succeeds", || async {
        job(&rest, id).await["state"] == "success"
    })
    .await;
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn image_preheat_sends_each_layer_with_the_registry_token() {
    let reg = registry(true).await;
    let (m, _dir) = manager(|_| {}).await;
    let rest = Rest::new(&m);
    let mut client = grpc(&m).await;
    let s = client
        .register_scheduler(proto::RegisterSchedulerRequest {
            hostname: "s".into(),
            ip: "127.0.0.1".into(),
            port: 8002,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .subscribe_preheat(proto::SubscribePreheatRequest { scheduler_id: s.id })
        .await
        .unwrap()
        .into_inner();
    let (status, created) = rest
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(TOKEN),
            Some(json!({"type": "preheat", "args": {
                "type": "image", "url": format!("{}/team/app:1.0", reg.addr), "insecure": true,
                "username": "user", "password": "pass"
            }})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let req = tokio::time::timeout(BOUND, stream.message())
            .await
            .expect("a layer request arrives")
            .unwrap()
            .unwrap();
        assert_eq!(req.job_id, id);
        assert!(req
            .headers
            .iter()
            .any(|h| h.name == "Authorization" && h.value == format!("Bearer {TOKEN_VALUE}")));
        got.push((req.url, req.digest));
    }
    assert_eq!(got[0].1, digest(1));
    assert_eq!(got[1].1, digest(2));
    assert!(got[1]
        .0
        .ends_with(&format!("/v2/team/app/blobs/{}", digest(2))));
    let j = job(&rest, id).await;
    // The two layers, then the config blob (a pull fetches it through the mirror too).
    assert_eq!(j["targets"].as_array().unwrap().len(), 3);
    assert_eq!(j["targets"][2]["digest"], digest(0xc0));

    client
        .report_preheat_result(proto::PreheatResult {
            job_id: id,
            url: got[0].0.clone(),
            success: true,
            error: String::new(),
            hosts: Vec::new(),
        })
        .await
        .unwrap();
    client
        .report_preheat_result(proto::PreheatResult {
            job_id: id,
            url: got[1].0.clone(),
            success: false,
            error: "origin said 500".into(),
            hosts: Vec::new(),
        })
        .await
        .unwrap();
    eventually("job fails", || async {
        job(&rest, id).await["state"] == "failure"
    })
    .await;
    let j = job(&rest, id).await;
    assert!(j["error"].as_str().unwrap().contains("origin said 500"));
    assert_eq!(j["targets"][0]["state"], "success");
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn jobs_fail_without_a_scheduler_or_a_resolvable_image() {
    let reg = registry(false).await;
    let (m, _dir) = manager(|c| {
        c.preheat.dispatch_timeout = Duration::from_millis(100);
    })
    .await;
    let rest = Rest::new(&m);
    let (_, a) = rest
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(TOKEN),
            Some(json!({"type": "preheat", "args": {"url": "http://origin.local/f"}})),
        )
        .await;
    let (_, b) = rest
        .call(
            Method::POST,
            "/api/v1/jobs",
            Some(TOKEN),
            Some(json!({"type": "preheat", "args": {
                "type": "image", "url": format!("{}/team/missing:1", reg.addr), "insecure": true
            }})),
        )
        .await;
    for (j, why) in [(a, "no scheduler"), (b, "404")] {
        let id = j["id"].as_u64().unwrap();
        eventually("job fails", || async {
            job(&rest, id).await["state"] == "failure"
        })
        .await;
        let error = job(&rest, id).await["error"].as_str().unwrap().to_owned();
        assert!(error.contains(why), "{error}");
    }
    m.shutdown().await.unwrap();
}

/// A job outlives the manager that runs it: stopped while it waits for a scheduler, it is
/// left unfinished and the next start runs it again; a job with headers (not stored) is
/// failed with the reason instead of being left `running` forever.
#[tokio::test]
async fn a_restart_resumes_unfinished_jobs_or_fails_them_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = damselfly_manager::Config::default();
    config.server.grpc = "127.0.0.1:0".parse().unwrap();
    config.server.rest = "127.0.0.1:0".parse().unwrap();
    config.database.url = format!("sqlite://{}", dir.path().join("manager.db").display());
    config.auth.bootstrap_token = TOKEN.into();
    // No scheduler subscribes: the jobs wait for one until the restart.
    config.preheat.dispatch_timeout = Duration::from_secs(600);
    let m = damselfly_manager::start(config.clone()).await.unwrap();
    let rest = Rest::new(&m);
    let mut ids = Vec::new();
    for args in [
        json!({"url": "http://origin.local/x.bin"}),
        json!({"url": "http://origin.local/y.bin", "headers": {"X-Secret": "s"}}),
    ] {
        let (status, created) = rest
            .call(
                Method::POST,
                "/api/v1/jobs",
                Some(TOKEN),
                Some(json!({"type": "preheat", "args": args})),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_u64().unwrap());
    }
    for &id in &ids {
        eventually("the job waits for a scheduler", || async {
            job(&rest, id).await["state"] == "running"
        })
        .await;
    }
    m.shutdown().await.unwrap();

    let m = damselfly_manager::start(config).await.unwrap();
    let rest = Rest::new(&m);
    let resumed = job(&rest, ids[0]).await;
    assert!(
        resumed["state"] == "running" || resumed["state"] == "pending",
        "the job without secrets runs again: {resumed}"
    );
    assert_eq!(resumed["error"], "", "{resumed}");
    let failed = job(&rest, ids[1]).await;
    assert_eq!(failed["state"], "failure", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("restarted before the job finished"),
        "the reason is recorded: {failed}"
    );
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let resolver = Resolver::new(Duration::from_secs(10)).unwrap();
    let reg = registry_with(false, true).await;
    let image = ImageRef::parse(
        &format!("http://{}/v2/team/app/manifests/1.0", reg.addr),
        true,
    )
    .unwrap();
    let err = resolver
        .resolve(&image, "linux/amd64", None)
        .await
        .expect_err("a swapped platform manifest is refused");
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    // Asked by digest directly, the same.
    let by_digest = ImageRef::parse(
        &format!(
            "http://{}/v2/team/app/manifests/{}",
            reg.addr,
            sha256(&amd64_manifest())
        ),
        true,
    )
    .unwrap();
    let err = resolver
        .resolve(&by_digest, "linux/amd64", None)
        .await
        .expect_err("a swapped manifest asked by digest is refused");
    assert!(
        err.to_string().contains("does not match its digest"),
        "{err}"
    );
    // The honest registry's manifests pass the same check.
    let honest = registry_with(false, false).await;
    let image = ImageRef::parse(
        &format!("http://{}/v2/team/app/manifests/1.0", honest.addr),
        true,
    )
    .unwrap();
    let resolved = resolver.resolve(&image, "linux/amd64", None).await.unwrap();
    assert_eq!(resolved.layers.len(), 2);
}
