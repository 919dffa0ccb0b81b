//! The registry mirror proxy against real parts: Debian's `docker-registry` holding an image
//! built here and pushed with `skopeo`, two dfdaemons with proxies, `skopeo` and
//! containerd's `ctr` pulling through them. The registry must serve each blob once (its
//! access log is counted), the second host must get the layers from the first, the pulled
//! blobs must equal the pushed ones, `Range` and `HEAD` and `X-Dragonfly-Registry` must work,
//! a blob whose content does not match its digest must never be served complete, and a
//! blob's first pieces must reach the client while the rest is still held on the registry's
//! side (a relay in front of the real registry passes only part of its answer).

use std::path::Path;
use std::time::Duration;
use testkit::poll::wait_until;
use testkit::registry::{
    self, blob_path, skopeo, Containerd, GatedRelay, OciImage, Registry, REGISTRY_BIN,
};
use testkit::{Cluster, ClusterOptions};

const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// The registry's basic-auth user, password, and the password's bcrypt hash (cost 4).
const USER: &str = "user";
const PASSWORD: &str = "secret";
const BCRYPT: &str = "$2b$04$KWUX7DApuAGMW/841nFwvO2Y2va4L3jsjrmljK6fn2rpZK/EwPdDW";

use testkit::registry::check_output as check;

/// Whether the registry tools are installed; skips (fails in strict mode) naming the missing
/// ones when not.
fn tools_or_skip(test: &str) -> bool {
    let missing = registry::missing_tools(&[REGISTRY_BIN, "skopeo"]);
    if missing.is_empty() {
        needs::found(test);
        return true;
    }
    needs::skip(
        test,
        &format!(
            "{} not installed (apt-get install -y docker-registry skopeo containerd)",
            missing.join(", ")
        ),
    );
    false
}

/// A counter of a daemon's `/metrics` (prometheus-client appends `_total` to counters).
async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    testkit::poll::counter(addr, name)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

async fn push(reg: &Registry, work: &Path, image: &OciImage, repo: &str, creds: &str) {
    reg.push(work, image, repo, Some(creds), TOOL_TIMEOUT)
        .await
        .expect("running skopeo");
}

fn assert_same_blobs(image: &OciImage, out: &Path, who: &str) {
    for b in image.blobs() {
        let got = std::fs::read(blob_path(out, &b.digest))
            .unwrap_or_else(|e| panic!("{who}: blob {} missing from the pull: {e}", b.digest));
        let want = std::fs::read(image.blob_path(&b.digest)).expect("reading a pushed blob");
        assert!(
            got == want,
            "{who}: blob {} differs from the pushed one",
            b.digest
        );
    }
}

fn assert_served_once(reg: &Registry, image: &OciImage, when: &str) {
    for b in image.blobs() {
        let gets = reg.blob_gets(&b.digest).expect("reading the registry log");
        assert_eq!(
            gets, 1,
            "{when}: the registry served blob {} ({} bytes) {gets} times, expected once",
            b.digest, b.size
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pulls_through_two_proxies_leave_the_registry_once() {
    if !tools_or_skip("image_pulls_through_two_proxies_leave_the_registry_once") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-registry-")
        .tempdir()
        .expect("temp dir");
    let work = tmp.path();
    let reg = Registry::start_with_auth(work, Some((USER, BCRYPT)))
        .await
        .expect("starting docker-registry");
    let creds = format!("{USER}:{PASSWORD}");
    let image = OciImage::build(&work.join("image"), "v1", 77, &[3 * MIB + 4321, 2 * MIB])
        .expect("building the image");
    push(&reg, work, &image, "test/img", &creds).await;
    for b in image.blobs() {
        assert_eq!(
            reg.blob_gets(&b.digest).expect("log"),
            0,
            "push fetched a blob"
        );
    }

    let cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 2,
        proxy: true,
        daemon_args: vec!["--registry-mirror".into(), reg.url()],
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let (p1, p2) = (cluster.peer(1), cluster.peer(2));
    let proxy1 = p1.proxy_addr.expect("peer-1 has a proxy");
    let proxy2 = p2.proxy_addr.expect("peer-2 has a proxy");
    let blob_bytes: u64 = image.blobs().iter().map(|b| b.size).sum();
    let http = reqwest::Client::new();

    // Without credentials, the P2P download of a blob fails at the registry (401) and the
    // request is passed through: the client gets the registry's challenge.
    let r = http
        .get(format!(
            "http://{proxy1}/v2/test/img/blobs/{}",
            image.config.digest
        ))
        .send()
        .await
        .expect("unauthenticated blob request");
    assert_eq!(r.status(), 401, "the registry's answer reached the client");
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Basic realm=\"damselfly-test\"")
    );

    // Host 1: skopeo pulls through its proxy (the proxy is the registry endpoint); its
    // Authorization header goes with the P2P task to the registry.
    let out1 = work.join("pull-1");
    let o = skopeo(
        work,
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &format!("docker://{proxy1}/test/img:v1"),
            &format!("oci:{}:v1", out1.display()),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    check("skopeo pull through peer-1's proxy", &o);
    assert_same_blobs(&image, &out1, "skopeo through peer-1");
    assert_served_once(&reg, &image, "after the first pull");
    let s1 = p1.stats().await.expect("stats of peer-1");
    assert_eq!(
        s1.bytes_from_origin, blob_bytes,
        "peer-1 fetched the blobs from the registry once"
    );
    assert!(
        metric(p1.metrics_addr, "damselfly_proxy_p2p_requests").await >= image.blobs().len() as u64,
        "every blob GET went through P2P on peer-1"
    );

    // Host 2: containerd pulls through its proxy (hosts.toml mirror with the
    // X-Dragonfly-Registry header), when containerd can run here.
    let ctr_missing = registry::missing_tools(&["containerd", "ctr"]);
    if ctr_missing.is_empty() {
        let ctd = Containerd::start(&work.join("containerd"))
            .await
            .expect("starting containerd");
        let mirror = format!("http://{proxy2}");
        ctd.pull_through_mirror(work, &reg, &mirror, &["--user", &creds], TOOL_TIMEOUT)
            .await
            .expect("ctr images pull through peer-2's proxy");
        ctd.assert_blobs(&image, "peer-2's proxy", TOOL_TIMEOUT)
            .await;
    } else {
        // Host 2 pulls with skopeo only; in strict mode, containerd must be there.
        needs::skip(
            "image_pulls_through_two_proxies_leave_the_registry_once (containerd part)",
            &format!(
                "{} not installed (apt-get install -y containerd)",
                ctr_missing.join(", ")
            ),
        );
    }
    let out2 = work.join("pull-2");
    let o = skopeo(
        work,
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &format!("docker://{proxy2}/test/img:v1"),
            &format!("oci:{}:v1", out2.display()),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    check("skopeo pull through peer-2's proxy", &o);
    assert_same_blobs(&image, &out2, "skopeo through peer-2");
    assert_served_once(&reg, &image, "after the second host's pulls");
    let s2 = p2.stats().await.expect("stats of peer-2");
    assert_eq!(s2.bytes_from_origin, 0, "peer-2 never went to the registry");
    assert_eq!(
        s2.bytes_from_peers, blob_bytes,
        "peer-2 got every blob byte from peer-1"
    );

    // Range on a proxied blob: 206 from peer-2's pieces, the registry not asked again.
    let layer = &image.layers[0];
    let data = std::fs::read(image.blob_path(&layer.digest)).expect("pushed layer");
    let blob_url = format!("http://{proxy2}/v2/test/img/blobs/{}", layer.digest);
    let (a, b) = (1_000_000u64, 2_100_000u64);
    let r = http
        .get(&blob_url)
        .basic_auth(USER, Some(PASSWORD))
        .header("Range", format!("bytes={a}-{b}"))
        .send()
        .await
        .expect("range request");
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes {a}-{b}/{}", layer.size).as_str())
    );
    let body = r.bytes().await.expect("range body");
    assert!(
        body[..] == data[a as usize..=b as usize],
        "range body differs"
    );
    let r = http
        .get(&blob_url)
        .basic_auth(USER, Some(PASSWORD))
        .header("Range", format!("bytes={}-", layer.size))
        .send()
        .await
        .expect("range request");
    assert_eq!(r.status(), 416);
    assert_served_once(&reg, &image, "after the range requests");

    // HEAD on a blob passes through to the registry.
    let heads = reg
        .requests("HEAD", &format!("/v2/test/img/blobs/{}", layer.digest))
        .expect("log");
    let r = http
        .head(&blob_url)
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(layer.size.to_string().as_str())
    );
    assert_eq!(
        reg.requests("HEAD", &format!("/v2/test/img/blobs/{}", layer.digest))
            .expect("log"),
        heads + 1,
        "HEAD reached the registry"
    );

    // X-Dragonfly-Registry chooses the upstream per request.
    let manifest_url = format!("http://{proxy1}/v2/test/img/manifests/v1");
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let dead = testkit::cluster::free_port().expect("port");
    let r = http
        .get(&manifest_url)
        .header("Accept", accept)
        .header("X-Dragonfly-Registry", format!("http://127.0.0.1:{dead}"))
        .send()
        .await
        .expect("manifest request");
    assert_eq!(r.status(), 502, "the header's (dead) registry was asked");
    let r = http
        .get(&manifest_url)
        .header("Accept", accept)
        .basic_auth(USER, Some(PASSWORD))
        .header("X-Dragonfly-Registry", reg.url())
        .send()
        .await
        .expect("manifest request");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("manifest body");
    let want = std::fs::read(image.blob_path(&image.manifest.digest)).expect("manifest");
    assert!(body[..] == want[..], "manifest through the proxy differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_is_never_served_complete() {
    if !tools_or_skip("a_blob_that_does_not_match_its_digest_is_never_served_complete") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-registry-")
        .tempdir()
        .expect("temp dir");
    let work = tmp.path();
    let reg = Registry::start(work)
        .await
        .expect("starting docker-registry");
    let image = OciImage::build(&work.join("image"), "v1", 91, &[2 * MIB + 100])
        .expect("building the image");
    push(&reg, work, &image, "test/bad", "anyone:anything").await;
    // Corrupt the layer in the registry's storage (same length, a few bytes flipped).
    let layer = &image.layers[0];
    let file = reg.blob_file(&layer.digest).expect("blob file");
    let mut data = std::fs::read(&file).expect("reading the stored blob");
    for i in (0..data.len()).step_by(300_007) {
        data[i] ^= 0x5a;
    }
    std::fs::write(&file, &data).expect("corrupting the stored blob");

    let cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 1,
        proxy: true,
        daemon_args: vec!["--registry-mirror".into(), reg.url()],
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let p1 = cluster.peer(1);
    let proxy = p1.proxy_addr.expect("proxy");
    let r = reqwest::get(format!("http://{proxy}/v2/test/bad/blobs/{}", layer.digest))
        .await
        .expect("blob request");
    let status = r.status();
    match r.bytes().await {
        Ok(b) => assert!(
            !(status.is_success() && b.len() as u64 == layer.size),
            "a corrupt blob was served complete with status {status}"
        ),
        Err(e) => eprintln!("corrupt blob aborted as expected: {e}"),
    }
    assert!(
        metric(p1.metrics_addr, "damselfly_proxy_digest_mismatches").await >= 1,
        "the mismatch was counted"
    );
    // A whole pull fails too (skopeo retries, and every try is aborted).
    let o = skopeo(
        work,
        &[
            "copy",
            "--retry-times",
            "0",
            "--src-tls-verify=false",
            &format!("docker://{proxy}/test/bad:v1"),
            &format!("oci:{}:v1", work.join("pull").display()),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    assert!(
        !o.status.success(),
        "skopeo pulled an image whose layer does not match its digest"
    );
    // The config blob (intact) is served complete.
    let r = reqwest::get(format!(
        "http://{proxy}/v2/test/bad/blobs/{}",
        image.config.digest
    ))
    .await
    .expect("config request");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("config body");
    let want = std::fs::read(image.blob_path(&image.config.digest)).expect("config");
    assert!(body[..] == want[..]);
}

/// The real registry holds a 3 MiB layer; between it and the daemon a relay lets the first
/// 2.5 MiB of the registry's answers through and holds the rest. The client must get the
/// response and its first MiB while the relay is still holding bytes the registry sent (and
/// has passed on less than the blob), then the whole blob once released, and the registry
/// must have served the blob once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_bytes_reach_the_client_while_the_registry_still_holds_the_rest() {
    let test = "blob_bytes_reach_the_client_while_the_registry_still_holds_the_rest";
    let Some(tmp) =
        registry::work_dir_if_tools(test, &[REGISTRY_BIN, "skopeo"], "damselfly-registry-")
    else {
        return;
    };
    let work = tmp.path();
    let reg = Registry::start(work)
        .await
        .expect("starting docker-registry");
    let image = OciImage::build(&work.join("image"), "v1", 55, &[3 * MIB + 777])
        .expect("building the image");
    let o = skopeo(
        work,
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:{}", image.dir.display(), image.tag),
            &format!("docker://{}/test/img:v1", reg.addr),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    check("skopeo push", &o);
    let layer = &image.layers[0];
    let data = std::fs::read(image.blob_path(&layer.digest)).expect("the pushed layer");
    let size = data.len() as u64;
    assert!(size > 3 * MIB, "the layer is {size} bytes");
    // 2.5 MiB of the registry's answers get through (pieces 0 and 1 of 1 MiB).
    let hold_at = 2 * MIB + MIB / 2;
    let gate = GatedRelay::start(reg.addr, hold_at)
        .await
        .expect("relay to the registry");
    let cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 1,
        proxy: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let p1 = cluster.peer(1);
    let proxy = p1.proxy_addr.expect("proxy");
    // Bounded: a proxy that waits for the whole blob would never answer while the relay
    // holds the rest.
    let send = reqwest::Client::new()
        .get(format!("http://{proxy}/v2/test/img/blobs/{}", layer.digest))
        .header("X-Dragonfly-Registry", gate.url())
        .send();
    let mut r = tokio::time::timeout(Duration::from_secs(30), send)
        .await
        .expect("no response headers while the registry's answer is held")
        .expect("blob request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(size));
    let mut got = Vec::new();
    while (got.len() as u64) < MIB {
        match tokio::time::timeout(Duration::from_secs(30), r.chunk()).await {
            Ok(Ok(Some(c))) => got.extend_from_slice(&c),
            other => panic!(
                "no blob bytes while the registry's answer is held ({} so far): {other:?}",
                got.len()
            ),
        }
    }
    // The client has a MiB, and the registry has sent more than the relay let through: the
    // rest of the blob is still on the registry's side of the gate.
    let forwarded = gate.forwarded();
    assert!(
        forwarded <= hold_at && forwarded < size,
        "the relay passed on {forwarded} bytes of a {size}-byte blob"
    );
    wait_until(
        "the relay holds bytes the registry sent",
        Duration::from_secs(30),
        || async { Ok(gate.holding() >= 1) },
    )
    .await
    .expect("the registry never sent more than the gate let through");
    assert!(got[..] == data[..got.len()], "streamed prefix differs");
    gate.release();
    while let Some(c) = r.chunk().await.expect("rest of the body") {
        got.extend_from_slice(&c);
    }
    assert!(got == data, "streamed blob differs from the pushed layer");
    assert_eq!(
        reg.blob_gets(&layer.digest).expect("registry log"),
        1,
        "the registry served the blob once"
    );
    let s = p1.stats().await.expect("stats");
    assert_eq!(s.bytes_from_origin, size);
}
