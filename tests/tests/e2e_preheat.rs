//! Preheat that later pulls actually use (issue 24), with real processes: a manager, a
//! scheduler, a seed peer and two peers with registry mirrors, Debian's `docker-registry`
//! holding a two-layer image pushed with `skopeo`, and containerd's `ctr` pulling through the
//! mirrors.
//!
//! * An image preheat through the manager's REST API makes the seed peer fetch every blob the
//!   image's pull needs (layers and config) under the blob's content-digest task; two hosts
//!   then pull the image through their mirrors and the registry serves **no** blob after the
//!   preheat's own GETs: every byte comes from peers. `dfget` of a blob URL and `dfcache
//!   export` of a blob digest find the same tasks; a blob put in with `dfcache import` is
//!   served by the mirror without the registry (the task identity rule of `wire::task`).
//! * A file preheat followed by `dfget` on two hosts: the origin serves the file once; a file
//!   preheat whose digest does not match the origin's content fails (the seed checks it) and
//!   leaves no task behind.
//!
//! * A multi-platform image (an OCI index of linux/amd64 and linux/arm64, pushed with
//!   `skopeo copy --all`) in a `docker-registry` protected by htpasswd: the job's credentials
//!   answer the registry's `Basic` challenge, the default platform's blobs (and only those)
//!   are preheated, `platform: linux/arm64` picks the other; wrong or missing credentials
//!   fail the job with an error that says so, and no blob is fetched.
//!
//! No timing assertions: every wait is a bounded poll.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::manager::{ManagerOptions, Rest};
use testkit::registry::{self, skopeo, Containerd, OciImage, OciIndex, Registry, REGISTRY_BIN};
use testkit::{Cluster, ClusterOptions, Daemon, Origin};

const MIB: u64 = 1 << 20;
/// The registry's basic-auth user, password, and the password's bcrypt hash (cost 4).
const USER: &str = "user";
const PASSWORD: &str = "secret";
const BCRYPT: &str = "$2b$04$KWUX7DApuAGMW/841nFwvO2Y2va4L3jsjrmljK6fn2rpZK/EwPdDW";
const TOOL_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait of any poll below.
const WAIT: Duration = Duration::from_secs(90);

use testkit::registry::check_output as check;

/// Polls `check` every 100 ms until it returns `Some`; panics with `what` and the last
/// observation after [`WAIT`].
async fn poll<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (Option<T>, String)>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let (done, seen) = check().await;
        if let Some(v) = done {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {WAIT:?}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a preheat job with `args`; returns its id.
async fn create_preheat(rest: &Rest, args: Value) -> u64 {
    let (status, job) = rest
        .write(
            "POST",
            "/api/v1/jobs",
            &json!({"type": "preheat", "args": args}),
            true,
        )
        .await
        .expect("POST /api/v1/jobs");
    assert_eq!(status, 201, "creating the preheat job: {job}");
    job["id"].as_u64().expect("job id")
}

/// Waits until job `id` is final; returns it.
async fn final_job(rest: &Rest, id: u64) -> Value {
    poll(&format!("preheat job {id} ends"), || async {
        match rest.get_ok(&format!("/api/v1/jobs/{id}")).await {
            Ok(j) => {
                let done = j["state"] == "success" || j["state"] == "failure";
                (done.then(|| j.clone()), j.to_string())
            }
            Err(e) => (None, format!("{e:#}")),
        }
    })
    .await
}

/// A counter of a daemon's `/metrics` (prometheus-client appends `_total` to counters).
async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    testkit::poll::counter(addr, name)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn sha256_file(path: &Path) -> String {
    let hex = testkit::content::file_sha256_hex(path).unwrap_or_else(|e| panic!("{e:#}"));
    format!("sha256:{hex}")
}

/// Blob GETs the registry answered with success, per blob of `image`.
fn registry_blob_gets(reg: &Registry, image: &OciImage) -> Vec<(String, usize)> {
    image
        .blobs()
        .iter()
        .map(|b| {
            (
                b.digest.clone(),
                reg.blob_gets(&b.digest).expect("reading the registry log"),
            )
        })
        .collect()
}

/// `ctr images pull --hosts-dir` of `image_ref` through the mirror at `proxy`, on a
/// containerd of its own under `dir`; checks every blob containerd stored against `image`.
async fn ctr_pull(dir: &Path, reg: &Registry, proxy: std::net::SocketAddr, image: &OciImage) {
    let ctd = Containerd::start(&dir.join("containerd"))
        .await
        .expect("starting containerd");
    let mirror = format!("http://{proxy}");
    ctd.pull_through_mirror(dir, reg, &mirror, &[], TOOL_TIMEOUT)
        .await
        .expect("running ctr");
    ctd.assert_blobs(image, &format!("through {proxy}"), TOOL_TIMEOUT)
        .await;
}

/// Bytes a daemon got from the origin, from the seed and from other peers.
async fn sources(d: &Daemon) -> (u64, u64, u64) {
    let s = d.stats().await.expect("daemon stats");
    (s.bytes_from_origin, s.bytes_from_seed, s.bytes_from_peers)
}

/// A `docker-registry` under `work` holding a two-layer image as `test/img:v1` (pushed with
/// `skopeo`, which fetches no blob).
async fn registry_with_image(work: &Path) -> (Registry, OciImage) {
    let reg = Registry::start(work)
        .await
        .expect("starting docker-registry");
    let image = OciImage::build(&work.join("image"), "v1", 2024, &[3 * MIB + 4321, 2 * MIB])
        .expect("building the image");
    reg.push(work, &image, "test/img", None, TOOL_TIMEOUT)
        .await
        .expect("running skopeo");
    assert!(
        registry_blob_gets(&reg, &image)
            .iter()
            .all(|(_, n)| *n == 0),
        "the push fetched a blob"
    );
    (reg, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_preheat_serves_later_pulls_through_the_mirror_from_peers() {
    let Some(tmp) = registry::work_dir_if_tools(
        "image_preheat_serves_later_pulls_through_the_mirror_from_peers",
        &[REGISTRY_BIN, "skopeo", "containerd", "ctr"],
        "damselfly-preheat-",
    ) else {
        return;
    };
    let work = tmp.path();
    let (reg, image) = registry_with_image(work).await;

    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 2,
        proxy: true,
        manager: Some(ManagerOptions::default()),
        daemon_args: vec!["--registry-mirror".into(), reg.url()],
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let rest = cluster.manager().expect("manager").rest();
    let (seed, p1, p2) = (cluster.seed(1), cluster.peer(1), cluster.peer(2));
    let blobs = image.blobs();
    let blob_bytes: u64 = blobs.iter().map(|b| b.size).sum();

    // 1. Preheat the image through the manager, as a user would with curl.
    let id = create_preheat(
        &rest,
        json!({"type": "image", "url": format!("{}/test/img:v1", reg.addr), "insecure": true}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "image preheat: {job}");
    let targets = job["targets"].as_array().expect("targets");
    let mut preheated: Vec<String> = targets
        .iter()
        .filter_map(|t| t["digest"].as_str().map(str::to_owned))
        .collect();
    preheated.sort();
    let mut wanted: Vec<String> = blobs.iter().map(|b| b.digest.clone()).collect();
    wanted.sort();
    assert_eq!(
        preheated, wanted,
        "the job preheats every blob of a pull (layers and config)"
    );
    let after_preheat = registry_blob_gets(&reg, &image);
    for (digest, n) in &after_preheat {
        assert_eq!(
            *n, 1,
            "the preheat fetched blob {digest} {n} times, expected once"
        );
    }
    assert_eq!(
        sources(seed).await.0,
        blob_bytes,
        "the seed peer fetched each blob from the registry once"
    );

    // 2. Two hosts pull the image through their mirrors with containerd.
    ctr_pull(
        &work.join("host-1"),
        &reg,
        p1.proxy_addr.expect("peer-1 proxy"),
        &image,
    )
    .await;
    ctr_pull(
        &work.join("host-2"),
        &reg,
        p2.proxy_addr.expect("peer-2 proxy"),
        &image,
    )
    .await;
    assert_eq!(
        registry_blob_gets(&reg, &image),
        after_preheat,
        "the registry served a blob after the preheat: the pulls missed the preheated tasks"
    );
    for p in [p1, p2] {
        let (origin, from_seed, from_peers) = sources(p).await;
        assert_eq!(origin, 0, "{} went to the registry for blob bytes", p.name);
        assert_eq!(
            from_seed + from_peers,
            blob_bytes,
            "{} got every blob byte from peers",
            p.name
        );
        assert!(
            metric(p.metrics_addr, "damselfly_proxy_p2p_requests").await >= blobs.len() as u64,
            "{}: every blob GET went through P2P",
            p.name
        );
    }

    // 3. The same blobs by the other paths: dfget of the blob URL, dfcache export of the
    //    digest. Neither reaches the registry.
    let layer = &image.layers[0];
    let out = work.join("layer-0.dfget");
    let o = cluster
        .run_dfget(
            p1,
            &format!("{}/v2/test/img/blobs/{}", reg.url(), layer.digest),
            &out,
            None,
        )
        .await
        .expect("running dfget");
    check("dfget of a preheated blob URL", &o);
    assert_eq!(sha256_file(&out), layer.digest);
    let layer1 = &image.layers[1];
    let out = work.join("layer-1.export");
    let o = cluster
        .run_dfcache(
            p2,
            &["export", &layer1.digest, "-O", &out.display().to_string()],
        )
        .await
        .expect("running dfcache export");
    check("dfcache export of a preheated blob", &o);
    assert_eq!(sha256_file(&out), layer1.digest);
    assert_eq!(
        registry_blob_gets(&reg, &image),
        after_preheat,
        "dfget of a blob URL or dfcache export of its digest reached the registry"
    );

    // 4. dfcache import → registry mirror: a blob imported on host 1 is served by host 2's
    //    mirror from P2P, although the registry has never held it.
    let mut data = vec![0u8; (MIB + 99) as usize];
    testkit::content::fill(4242, 0, &mut data);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    let file = work.join("imported.blob");
    std::fs::write(&file, &data).expect("writing the file to import");
    let o = cluster
        .run_dfcache(p1, &["import", &file.display().to_string()])
        .await
        .expect("running dfcache import");
    check("dfcache import", &o);
    let r = reqwest::get(format!(
        "http://{}/v2/test/img/blobs/{digest}",
        p2.proxy_addr.expect("peer-2 proxy")
    ))
    .await
    .expect("blob request through the mirror");
    assert_eq!(r.status(), 200, "the mirror serves the imported blob");
    let body = r.bytes().await.expect("blob body");
    assert!(
        body[..] == data[..],
        "the mirror's copy of the imported blob differs"
    );
    assert_eq!(
        reg.requests("GET", &format!("/v2/test/img/blobs/{digest}"))
            .expect("registry log"),
        0,
        "the mirror asked the registry for a blob a peer holds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_preheat_then_dfget_leaves_the_origin_once_and_the_seed_checks_the_digest() {
    let origin = Origin::start().await.expect("origin");
    let plain = origin.add_file("/plain.bin", 5 * MIB + 17, 71);
    let checked = origin.add_file("/checked.bin", 3 * MIB + 5, 72);
    let other = origin.add_file("/other.bin", MIB + 3, 73);
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 2,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let rest = cluster.manager().expect("manager").rest();
    let seed = cluster.seed(1);

    // A file preheat without a digest; dfget with --digest on two hosts finds it (a given
    // digest checks content, it does not make another task).
    let url = origin.url("/plain.bin");
    let id = create_preheat(&rest, json!({"type": "file", "url": url})).await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "file preheat: {job}");
    assert_eq!(
        origin.gets_of("/plain.bin"),
        1,
        "the seed fetched the file once"
    );
    for (i, p) in [cluster.peer(1), cluster.peer(2)].into_iter().enumerate() {
        cluster
            .download_verified(
                p,
                &url,
                &cluster.dir().join(format!("plain-{i}.out")),
                &plain,
            )
            .await
            .expect("dfget of the preheated file");
        assert_eq!(sources(p).await.0, 0, "{} went to the origin", p.name);
    }
    assert_eq!(
        origin.gets_of("/plain.bin"),
        1,
        "the origin served the preheated file again"
    );

    // A file preheat with the right digest: the seed checks it; dfget without --digest
    // finds the task.
    let url = origin.url("/checked.bin");
    let id = create_preheat(
        &rest,
        json!({"type": "file", "url": url, "digest": checked.digest()}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "file preheat with a digest: {job}");
    assert_eq!(job["targets"][0]["digest"], checked.digest().as_str());
    let out = cluster.dir().join("checked.out");
    let o = cluster
        .run_dfget(cluster.peer(1), &url, &out, None)
        .await
        .expect("running dfget");
    check("dfget of the preheated, digest-checked file", &o);
    assert_eq!(sha256_file(&out), checked.digest());
    assert_eq!(origin.gets_of("/checked.bin"), 1);

    // A file preheat whose digest is not the content's: the seed refuses the content, the
    // job fails, and no task is left for a peer to be served.
    let url = origin.url("/other.bin");
    let wrong = checked.digest();
    let id = create_preheat(&rest, json!({"type": "file", "url": url, "digest": wrong})).await;
    let job = final_job(&rest, id).await;
    assert_eq!(
        job["state"], "failure",
        "a preheat whose content does not match its digest succeeded: {job}"
    );
    assert!(
        metric(seed.metrics_addr, "damselfly_origin_digest_mismatches").await >= 1,
        "the seed counted the mismatch"
    );
    let seed_bytes_before = sources(seed).await.0;
    cluster
        .download_verified(
            cluster.peer(2),
            &url,
            &cluster.dir().join("other.out"),
            &other,
        )
        .await
        .expect("dfget of the file whose preheat failed");
    assert!(
        sources(seed).await.0 > seed_bytes_before || sources(cluster.peer(2)).await.0 > 0,
        "the content was fetched again after the failed preheat (nothing kept the bad task)"
    );
}

/// The digests a job preheated, sorted.
fn job_digests(job: &Value) -> Vec<String> {
    let mut d: Vec<String> = job["targets"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["digest"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    d.sort();
    d
}

/// The config and layer digests of `image`, sorted.
fn image_digests(image: &OciImage) -> Vec<String> {
    let mut d: Vec<String> = image.blobs().iter().map(|b| b.digest.clone()).collect();
    d.sort();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_preheat_picks_one_platform_of_an_index_behind_basic_auth() {
    let test = "image_preheat_picks_one_platform_of_an_index_behind_basic_auth";
    let Some(tmp) =
        registry::work_dir_if_tools(test, &[REGISTRY_BIN, "skopeo"], "damselfly-preheat-")
    else {
        return;
    };
    let work = tmp.path();
    let reg = Registry::start_with_auth(work, Some((USER, BCRYPT)))
        .await
        .expect("starting docker-registry with htpasswd");
    let index = OciIndex::build(
        &work.join("multi"),
        "v1",
        &[
            ("amd64", 3100, &[MIB + 11, MIB / 2]),
            ("arm64", 3200, &[MIB + 33]),
        ],
    )
    .expect("building the image index");
    let o = skopeo(
        work,
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("oci:{}:{}", index.dir.display(), index.tag),
            &format!("docker://{}/test/multi:v1", reg.addr),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    check("skopeo copy --all", &o);
    let amd = index.platform("linux/amd64").expect("amd64 image");
    let arm = index.platform("linux/arm64").expect("arm64 image");
    // The registry holds both platforms, and wants credentials for them.
    let r = reqwest::get(format!(
        "{}/v2/test/multi/manifests/{}",
        reg.url(),
        arm.manifest.digest
    ))
    .await
    .expect("manifest request");
    assert_eq!(r.status(), 401, "the registry serves without credentials");

    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 0,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let rest = cluster.manager().expect("manager").rest();
    let seed = cluster.seed(1);
    let image_ref = format!("{}/test/multi:v1", reg.addr);
    let no_blob_fetched = |what: &str| {
        for image in [amd, arm] {
            for (digest, n) in registry_blob_gets(&reg, image) {
                assert_eq!(n, 0, "{what}: blob {digest} was fetched");
            }
        }
    };

    // 1. Wrong password, then none: the job fails and says why; nothing is fetched.
    let id = create_preheat(
        &rest,
        json!({"type": "image", "url": image_ref, "insecure": true,
               "username": USER, "password": "wrong"}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "failure", "wrong password: {job}");
    let error = job.to_string();
    assert!(
        error.contains("refused the job's credentials"),
        "the failed job does not say the credentials were refused: {job}"
    );
    let id = create_preheat(
        &rest,
        json!({"type": "image", "url": image_ref, "insecure": true}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "failure", "no credentials: {job}");
    assert!(
        job.to_string()
            .contains("registry wants basic auth; no credentials"),
        "the failed job does not say credentials are needed: {job}"
    );
    no_blob_fetched("after the refused jobs");
    assert_eq!(sources(seed).await.0, 0);

    // 2. Right credentials, the default platform (linux/amd64): its blobs, only its.
    let id = create_preheat(
        &rest,
        json!({"type": "image", "url": image_ref, "insecure": true,
               "username": USER, "password": PASSWORD}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "amd64 preheat: {job}");
    assert_eq!(job_digests(&job), image_digests(amd), "{job}");
    for (digest, n) in registry_blob_gets(&reg, amd) {
        assert_eq!(n, 1, "amd64 blob {digest} fetched {n} times");
    }
    for (digest, n) in registry_blob_gets(&reg, arm) {
        assert_eq!(n, 0, "arm64 blob {digest} fetched by the amd64 preheat");
    }
    let amd_bytes: u64 = amd.blobs().iter().map(|b| b.size).sum();
    assert_eq!(
        sources(seed).await.0,
        amd_bytes,
        "the seed fetched the amd64 blobs"
    );

    // 3. The other platform by name.
    let id = create_preheat(
        &rest,
        json!({"type": "image", "url": image_ref, "insecure": true,
               "username": USER, "password": PASSWORD, "platform": "linux/arm64"}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "arm64 preheat: {job}");
    assert_eq!(job_digests(&job), image_digests(arm), "{job}");
    for (digest, n) in registry_blob_gets(&reg, arm) {
        assert_eq!(n, 1, "arm64 blob {digest} fetched {n} times");
    }
    let arm_bytes: u64 = arm.blobs().iter().map(|b| b.size).sum();
    assert_eq!(sources(seed).await.0, amd_bytes + arm_bytes);
}

/// One request to the manager at `base` with `Authorization: Bearer <token>` (when given)
/// and a JSON body (when given): status and body (JSON, or the text as a JSON string).
async fn call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method.clone(), format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(b).expect("JSON body"));
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("response body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

/// RFC 3339 of now + `d`.
fn rfc3339_in(d: Duration) -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now() + d).to_string()
}

/// Creates a personal access token with the `job` scope that expires after `ttl`; returns
/// its id and the token.
async fn personal_token(base: &str, admin: &str, name: &str, ttl: Duration) -> (u64, String) {
    let (status, t) = call(
        base,
        reqwest::Method::POST,
        "/api/v1/personal-access-tokens",
        Some(admin),
        Some(
            &json!({"name": name, "bio": "harbor preheat", "scopes": ["job"],
                     "expired_at": rfc3339_in(ttl)}),
        ),
    )
    .await;
    assert_eq!(status, 201, "creating a personal access token: {t}");
    let token = t["token"]
        .as_str()
        .expect("the token, shown once")
        .to_owned();
    (t["id"].as_u64().expect("token id"), token)
}

/// Harbor's Dragonfly provider (goharbor/harbor `src/pkg/p2p/preheat/provider/dragonfly.go`)
/// against a real manager, scheduler and seed peer and a real `docker-registry`: its health
/// check, `POST /oapi/v1/jobs` with the body it marshals (every field, zero values included,
/// the registry token in `headers`, a manifest URL), and polling `GET /oapi/v1/jobs/{id}`
/// until `SUCCESS`, authenticated by a personal access token. Revoked and expired tokens get
/// 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_preheats_through_the_open_api_with_a_personal_access_token() {
    let test = "harbor_preheats_through_the_open_api_with_a_personal_access_token";
    let Some(tmp) =
        registry::work_dir_if_tools(test, &[REGISTRY_BIN, "skopeo"], "damselfly-harbor-")
    else {
        return;
    };
    let work = tmp.path();
    let (reg, image) = registry_with_image(work).await;
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 1,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let m = cluster.manager().expect("manager");
    let base = format!("http://{}", m.rest_addr);
    let admin = m.token.as_str();
    let cluster_id = m
        .rest()
        .default_cluster_id()
        .await
        .expect("default cluster");

    // Tokens are managed with the admin token only.
    let new_token = json!({"name": "x", "scopes": ["job"], "expired_at": rfc3339_in(Duration::from_secs(3600))});
    let (status, _) = call(
        &base,
        reqwest::Method::POST,
        "/api/v1/personal-access-tokens",
        None,
        Some(&new_token),
    )
    .await;
    assert_eq!(status, 401, "creating a token without the admin token");
    for (bad, why) in [
        (
            json!({"name": "x", "scopes": ["job"], "expired_at": "2001-01-01T00:00:00Z"}),
            "an expiry in the past",
        ),
        (
            json!({"name": "x", "scopes": ["root"], "expired_at": rfc3339_in(Duration::from_secs(60))}),
            "an unknown scope",
        ),
    ] {
        let (status, body) = call(
            &base,
            reqwest::Method::POST,
            "/api/v1/personal-access-tokens",
            Some(admin),
            Some(&bad),
        )
        .await;
        assert_eq!(status, 400, "a token with {why}: {body}");
    }
    let (token_id, token) = personal_token(&base, admin, "harbor", Duration::from_secs(3600)).await;
    let (status, list) = call(
        &base,
        reqwest::Method::GET,
        "/api/v1/personal-access-tokens",
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    let listed = list
        .as_array()
        .and_then(|l| l.iter().find(|t| t["id"].as_u64() == Some(token_id)))
        .unwrap_or_else(|| panic!("token {token_id} not listed: {list}"));
    assert_eq!(listed["state"], "active");
    assert_eq!(listed["scopes"], json!(["job"]));
    assert!(
        listed.get("token").is_none() && !list.to_string().contains(&token),
        "the list shows the secret: {list}"
    );

    // Harbor's health check, then its create request, exactly as it marshals it.
    let (status, _) = call(&base, reqwest::Method::GET, "/healthy", Some(&token), None).await;
    assert_eq!(status, 200, "Harbor's health check");
    let harbor_job = json!({
        "type": "preheat",
        "args": {
            "type": "image",
            "url": format!("{}/v2/test/img/manifests/v1", reg.url()),
            "tag": "",
            "filtered_query_params": "",
            "headers": {"Authorization": "Bearer harbor-robot-registry-token"},
            "scope": "single_seed_peer",
            "concurrent_count": 0,
            "timeout": 0
        },
        "scheduler_cluster_ids": [cluster_id]
    });
    for (t, why) in [
        (None, "no token"),
        (Some(admin), "the admin token (not a personal one)"),
    ] {
        let (status, body) = call(
            &base,
            reqwest::Method::POST,
            "/oapi/v1/jobs",
            t,
            Some(&harbor_job),
        )
        .await;
        assert_eq!(status, 401, "POST /oapi/v1/jobs with {why}: {body}");
    }
    let (status, created) = call(
        &base,
        reqwest::Method::POST,
        "/oapi/v1/jobs",
        Some(&token),
        Some(&harbor_job),
    )
    .await;
    assert_eq!(status, 200, "Harbor's create request: {created}");
    assert_eq!(created["state"], "PENDING", "{created}");
    let id = created["id"].as_u64().expect("job id");
    let job = poll(&format!("open-API job {id} ends"), || {
        let (base, token) = (base.clone(), token.clone());
        async move {
            let (status, j) = call(
                &base,
                reqwest::Method::GET,
                &format!("/oapi/v1/jobs/{id}"),
                Some(&token),
                None,
            )
            .await;
            let done = status == 200 && j["state"] != "PENDING";
            (done.then(|| j.clone()), format!("{status} {j}"))
        }
    })
    .await;
    assert_eq!(job["state"], "SUCCESS", "{job}");
    let results = &job["result"]["job_states"][0]["results"][0];
    assert_eq!(results["scheduler_cluster_id"].as_u64(), Some(cluster_id));
    assert_eq!(results["failure_tasks"], json!([]), "{job}");
    let mut done: Vec<String> = results["success_tasks"]
        .as_array()
        .expect("success_tasks")
        .iter()
        .filter_map(|t| t["url"].as_str().map(str::to_owned))
        .collect();
    done.sort();
    let mut wanted: Vec<String> = image
        .blobs()
        .iter()
        .map(|b| format!("{}/v2/test/img/blobs/{}", reg.url(), b.digest))
        .collect();
    wanted.sort();
    assert_eq!(done, wanted, "every blob of the image is a success task");
    for t in results["success_tasks"].as_array().expect("success_tasks") {
        assert!(
            t["hostname"].as_str().is_some_and(|h| !h.is_empty())
                && t["ip"].as_str().is_some_and(|ip| !ip.is_empty()),
            "each success task names the seed peer that holds it: {t}"
        );
    }
    for (digest, n) in registry_blob_gets(&reg, &image) {
        assert_eq!(
            n, 1,
            "the seed fetched blob {digest} {n} times, expected once"
        );
    }
    let (status, list) = call(
        &base,
        reqwest::Method::GET,
        "/oapi/v1/jobs?page=1&per_page=10",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list[0]["id"].as_u64(), Some(id), "newest job first: {list}");

    // A preheated blob is served to a peer without the registry.
    let layer = &image.layers[0];
    let out = work.join("layer.dfget");
    let o = cluster
        .run_dfget(
            cluster.peer(1),
            &format!("{}/v2/test/img/blobs/{}", reg.url(), layer.digest),
            &out,
            None,
        )
        .await
        .expect("running dfget");
    check("dfget of a blob preheated through the open API", &o);
    assert_eq!(sha256_file(&out), layer.digest);
    assert_eq!(reg.blob_gets(&layer.digest).expect("registry log"), 1);

    // Refused requests: an unknown scope, several clusters.
    let mut bad_scope = harbor_job.clone();
    bad_scope["args"]["scope"] = json!("everyone");
    let mut two_clusters = harbor_job.clone();
    two_clusters["scheduler_cluster_ids"] = json!([cluster_id, cluster_id + 1]);
    for (body, why) in [
        (bad_scope, "an unknown scope"),
        (two_clusters, "two clusters"),
    ] {
        let (status, answer) = call(
            &base,
            reqwest::Method::POST,
            "/oapi/v1/jobs",
            Some(&token),
            Some(&body),
        )
        .await;
        assert_eq!(status, 400, "{why}: {answer}");
        assert!(answer["message"].is_string(), "{why}: a reason: {answer}");
    }

    // Revoked: 401 from then on, and listed as inactive.
    let (status, _) = call(
        &base,
        reqwest::Method::DELETE,
        &format!("/api/v1/personal-access-tokens/{token_id}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 204, "revoking the token");
    let (status, body) = call(
        &base,
        reqwest::Method::GET,
        &format!("/oapi/v1/jobs/{id}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 401, "a revoked token: {body}");
    assert!(body.to_string().contains("revoked"), "{body}");
    let (_, t) = call(
        &base,
        reqwest::Method::GET,
        &format!("/api/v1/personal-access-tokens/{token_id}"),
        Some(admin),
        None,
    )
    .await;
    assert_eq!(t["state"], "inactive", "{t}");

    // Expired: accepted before its expiry, 401 after.
    let (_, short) = personal_token(&base, admin, "short", Duration::from_secs(2)).await;
    let (status, body) = call(
        &base,
        reqwest::Method::GET,
        "/oapi/v1/jobs",
        Some(&short),
        None,
    )
    .await;
    assert_eq!(status, 200, "a token before its expiry: {body}");
    let body = poll("the short-lived token expires", || {
        let (base, short) = (base.clone(), short.clone());
        async move {
            let (status, body) = call(
                &base,
                reqwest::Method::GET,
                "/oapi/v1/jobs",
                Some(&short),
                None,
            )
            .await;
            (
                (status == 401).then(|| body.clone()),
                format!("{status} {body}"),
            )
        }
    })
    .await;
    assert!(body.to_string().contains("expired"), "{body}");
}

/// A manager killed (SIGKILL) while preheat jobs are in flight, then started again on the
/// same SQLite database: the job without secrets is run again and succeeds once the origin
/// answers (a peer then gets the file without the origin); the job with headers (not
/// stored) is recorded as failed with the reason, not left `running` forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_flight_when_the_manager_dies_are_resumed_or_failed_with_the_reason() {
    let data = {
        let mut d = vec![0u8; (2 * MIB + 7) as usize];
        testkit::content::fill(77, 0, &mut d);
        d
    };
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    // The origin sends the first 64 KiB and stalls: the seed's fetches, and so the jobs,
    // stay in flight until released.
    let gated = registry::GatedBlob::start(data.clone(), 64 * 1024)
        .await
        .expect("gated origin");
    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 1,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let rest = cluster.manager().expect("manager").rest();
    let url = format!("{}/stalled.bin", gated.url());
    let resumable = create_preheat(&rest, json!({"type": "file", "url": url})).await;
    let secret = create_preheat(
        &rest,
        json!({"type": "file", "url": format!("{}/secret.bin", gated.url()),
               "headers": {"X-Origin-Token": "s3cret"}}),
    )
    .await;
    poll("the seed is fetching both jobs' files", || {
        let (rest, gated) = (rest.clone(), &gated);
        async move {
            let mut seen = String::new();
            let mut running = gated.requests() >= 2;
            for id in [resumable, secret] {
                let j = rest
                    .get_ok(&format!("/api/v1/jobs/{id}"))
                    .await
                    .unwrap_or_default();
                running &= j["state"] == "running";
                seen.push_str(&j.to_string());
            }
            (running.then_some(()), seen)
        }
    })
    .await;

    cluster
        .restart_manager()
        .await
        .expect("restarting the manager");
    let rest = cluster.manager().expect("manager").rest();
    let j = rest
        .get_ok(&format!("/api/v1/jobs/{secret}"))
        .await
        .expect("the job with headers after the restart");
    assert_eq!(
        j["state"], "failure",
        "a job with headers the dead manager ran: {j}"
    );
    assert!(
        j["error"]
            .as_str()
            .unwrap_or_default()
            .contains("manager restarted before the job finished"),
        "the reason is recorded: {j}"
    );
    let j = rest
        .get_ok(&format!("/api/v1/jobs/{resumable}"))
        .await
        .expect("the resumable job after the restart");
    assert!(
        j["state"] == "pending" || j["state"] == "running",
        "the job without secrets runs again: {j}"
    );

    // The origin answers: the resumed job succeeds, and a peer gets the file from the seed.
    gated.release();
    let j = final_job(&rest, resumable).await;
    assert_eq!(j["state"], "success", "the resumed job: {j}");
    let before = gated.requests();
    let out = cluster.dir().join("stalled.out");
    let o = cluster
        .run_dfget(cluster.peer(1), &url, &out, Some(&digest))
        .await
        .expect("running dfget");
    check("dfget of the file the resumed job preheated", &o);
    assert_eq!(sha256_file(&out), digest);
    assert_eq!(
        gated.requests(),
        before,
        "the peer went to the origin for a preheated file"
    );
}

/// Host ids (`seed-1`, `peer-2`, …) holding all of the task of `url` (a file URL), by the
/// scheduler's `StatTask`.
async fn holders(cluster: &Cluster, url: &str) -> Vec<String> {
    let id = wire::TaskId::from_url(url, &wire::task::TaskIdOptions::default())
        .expect("task id")
        .to_hex();
    let info = testkit::grpc::stat_task(cluster.scheduler_addr(), &id)
        .await
        .expect("StatTask");
    let mut hosts: Vec<String> = info
        .peers
        .iter()
        .filter(|p| p.done)
        .map(|p| p.host_id.clone())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Host ids of a finished job's first target's host reports, with their states.
fn reported_hosts(job: &Value) -> Vec<(String, String)> {
    let mut hosts: Vec<(String, String)> = job["targets"][0]["hosts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    (
                        h["host_id"].as_str().unwrap_or_default().to_owned(),
                        h["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    hosts.sort();
    hosts
}

/// Dragonfly's preheat scopes with real processes (a manager, a scheduler, two seed peers and
/// three peers): `single_seed_peer` puts a file on exactly one seed peer; `all_seed_peers` on
/// both seeds and no peer; `all_peers` on every host before any of them asks (the scheduler's
/// `StatTask` lists a finished peer on each, the origin served the file once, and a later
/// `dfget` finds it locally); `all_peers` with `count: 2` on exactly two hosts. The job
/// reports each host's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_scopes_put_the_file_on_the_chosen_hosts_only() {
    let origin = Origin::start().await.expect("origin");
    let files: Vec<_> = (0..4u64)
        .map(|i| origin.add_file(&format!("/scope-{i}.bin"), 2 * MIB + 100 * i, 90 + i))
        .collect();
    let cluster = Cluster::start(ClusterOptions {
        seeds: 2,
        peers: 3,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let rest = cluster.manager().expect("manager").rest();
    let seeds = ["seed-1", "seed-2"];
    let everyone = ["peer-1", "peer-2", "peer-3", "seed-1", "seed-2"];

    // single_seed_peer: one seed, nobody else.
    let url = origin.url("/scope-0.bin");
    let id = create_preheat(
        &rest,
        json!({"type": "file", "url": url, "scope": "single_seed_peer"}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "single_seed_peer: {job}");
    let held = holders(&cluster, &url).await;
    assert_eq!(
        held.len(),
        1,
        "single_seed_peer: exactly one host holds it: {held:?}"
    );
    assert!(
        seeds.contains(&held[0].as_str()),
        "a seed peer holds it: {held:?}"
    );
    assert_eq!(
        reported_hosts(&job),
        [(held[0].clone(), "success".to_owned())],
        "the job names the seed: {job}"
    );

    // all_seed_peers: both seeds, no peer.
    let url = origin.url("/scope-1.bin");
    let id = create_preheat(
        &rest,
        json!({"type": "file", "url": url, "scope": "all_seed_peers"}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "all_seed_peers: {job}");
    assert_eq!(holders(&cluster, &url).await, seeds, "all_seed_peers");
    assert_eq!(
        reported_hosts(&job),
        seeds.map(|h| (h.to_owned(), "success".to_owned())),
        "{job}"
    );
    assert_eq!(
        origin.gets_of("/scope-1.bin"),
        1,
        "the origin served it once"
    );

    // all_peers: every host holds it before any of them asks.
    let url = origin.url("/scope-2.bin");
    let id = create_preheat(
        &rest,
        json!({"type": "file", "url": url, "scope": "all_peers"}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "all_peers: {job}");
    assert_eq!(holders(&cluster, &url).await, everyone, "all_peers");
    assert_eq!(
        reported_hosts(&job),
        everyone.map(|h| (h.to_owned(), "success".to_owned())),
        "{job}"
    );
    assert_eq!(
        origin.gets_of("/scope-2.bin"),
        1,
        "the origin served it once"
    );
    let before = sources(cluster.peer(2)).await;
    cluster
        .download_verified(
            cluster.peer(2),
            &url,
            &cluster.dir().join("scope-2.out"),
            &files[2],
        )
        .await
        .expect("dfget of a file preheated onto this host");
    assert_eq!(
        sources(cluster.peer(2)).await,
        before,
        "peer-2 fetched bytes again for a file it already held"
    );
    assert_eq!(origin.gets_of("/scope-2.bin"), 1);

    // all_peers with a count: exactly that many hosts.
    let url = origin.url("/scope-3.bin");
    let id = create_preheat(
        &rest,
        json!({"type": "file", "url": url, "scope": "all_peers", "count": 2}),
    )
    .await;
    let job = final_job(&rest, id).await;
    assert_eq!(job["state"], "success", "all_peers count 2: {job}");
    let held = holders(&cluster, &url).await;
    assert_eq!(held.len(), 2, "all_peers with count 2: {held:?}");
    assert_eq!(
        reported_hosts(&job),
        held.iter()
            .map(|h| (h.clone(), "success".to_owned()))
            .collect::<Vec<_>>(),
        "the job names the hosts that hold it: {job}"
    );

    // Bad scopes are refused with a reason.
    for (args, why) in [
        (
            json!({"type": "file", "url": url, "scope": "everyone"}),
            "an unknown scope",
        ),
        (
            json!({"type": "file", "url": url, "count": 2}),
            "a count without a scope",
        ),
        (
            json!({"type": "file", "url": url, "scope": "all_peers", "percentage": 101}),
            "a percentage over 100",
        ),
    ] {
        let (status, body) = rest
            .write(
                "POST",
                "/api/v1/jobs",
                &json!({"type": "preheat", "args": args}),
                true,
            )
            .await
            .expect("POST /api/v1/jobs");
        assert_eq!(status, 400, "{why}: {body}");
    }
}
