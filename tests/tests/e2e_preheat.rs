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
use std::process::Output;
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

fn check(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstderr: {}\nstdout: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim(),
        String::from_utf8_lossy(&o.stdout).trim()
    );
}

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
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics body");
    let total = format!("{name}_total");
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let n = it.next()?;
            (n == name || n == total).then(|| it.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    format!("sha256:{}", hex::encode(Sha256::digest(&data)))
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
    let hosts = dir.join("hosts.d");
    registry::write_hosts_toml(
        &hosts,
        &reg.addr.to_string(),
        &reg.url(),
        &format!("http://{proxy}"),
    )
    .expect("hosts.toml");
    let image_ref = format!("{}/test/img:v1", reg.addr);
    let o = ctd
        .ctr(
            &[
                "images",
                "pull",
                "--hosts-dir",
                &hosts.display().to_string(),
                "--plain-http",
                &image_ref,
            ],
            TOOL_TIMEOUT,
        )
        .await
        .expect("running ctr");
    check(&format!("ctr images pull through the mirror {proxy}"), &o);
    for b in image.blobs() {
        let o = ctd
            .ctr(&["content", "get", &b.digest], TOOL_TIMEOUT)
            .await
            .expect("running ctr content get");
        check("ctr content get", &o);
        let want = std::fs::read(image.blob_path(&b.digest)).expect("pushed blob");
        assert!(
            o.stdout == want,
            "containerd's copy of {} (through {proxy}) differs from the pushed blob",
            b.digest
        );
    }
}

/// Bytes a daemon got from the origin, from the seed and from other peers.
async fn sources(d: &Daemon) -> (u64, u64, u64) {
    let s = d.stats().await.expect("daemon stats");
    (s.bytes_from_origin, s.bytes_from_seed, s.bytes_from_peers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_preheat_serves_later_pulls_through_the_mirror_from_peers() {
    let missing = registry::missing_tools(&[REGISTRY_BIN, "skopeo", "containerd", "ctr"]);
    if !missing.is_empty() {
        needs::skip(
            "image_preheat_serves_later_pulls_through_the_mirror_from_peers",
            &format!(
                "{} not installed (apt-get install -y docker-registry skopeo containerd)",
                missing.join(", ")
            ),
        );
        return;
    }
    needs::found("image_preheat_serves_later_pulls_through_the_mirror_from_peers");
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-preheat-")
        .tempdir()
        .expect("temp dir");
    let work = tmp.path();
    let reg = Registry::start(work)
        .await
        .expect("starting docker-registry");
    let image = OciImage::build(&work.join("image"), "v1", 2024, &[3 * MIB + 4321, 2 * MIB])
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
    assert!(
        registry_blob_gets(&reg, &image)
            .iter()
            .all(|(_, n)| *n == 0),
        "the push fetched a blob"
    );

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
    let missing = registry::missing_tools(&[REGISTRY_BIN, "skopeo"]);
    if !missing.is_empty() {
        needs::skip(
            test,
            &format!(
                "{} not installed (apt-get install -y docker-registry skopeo)",
                missing.join(", ")
            ),
        );
        return;
    }
    needs::found(test);
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-preheat-")
        .tempdir()
        .expect("temp dir");
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
