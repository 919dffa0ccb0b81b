//! The daemon's proxy as an HTTPS proxy (`CONNECT`, issue 22), driven by `curl` with
//! `HTTPS_PROXY`:
//!
//! * a host named by `proxy.hijack_hosts` (an HTTPS `docker-registry` signed by a test CA):
//!   the proxy terminates TLS with a leaf from its own generated CA
//!   (`<storage.dir>/proxy-ca.pem`); a blob `GET` goes through P2P (the registry's access log
//!   shows one GET of it, by the seed peer, after two downloads), the manifest is passed
//!   through; a client that does not trust the proxy's CA fails its handshake and gets
//!   nothing;
//! * any other host (an HTTPS origin with its own CA) is tunnelled untouched: the client
//!   verifies the origin's own certificate, and one that trusts only the proxy's CA fails.
//!
//! * `skopeo` with `HTTPS_PROXY` and the proxy's CA pulls the image: every blob equals the
//!   pushed one and the registry still served each blob once. Go clients never send
//!   requests for loopback hosts through `HTTPS_PROXY`, so the registry listens on this
//!   host's own (non-loopback) address; a host without one skips this part (a failure in
//!   strict mode).

use std::path::Path;
use std::process::Output;
use std::time::Duration;
use testkit::pki::TestCa;
use testkit::registry::{self, skopeo, skopeo_env, OciImage, Registry, REGISTRY_BIN};
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;
const TEST: &str = "https_proxy_intercepts_named_hosts_and_tunnels_the_rest";

async fn curl(proxy: std::net::SocketAddr, ca: Option<&Path>, url: &str, out: &Path) -> Output {
    curl_with(proxy, ca, url, out, &[]).await
}

async fn curl_with(
    proxy: std::net::SocketAddr,
    ca: Option<&Path>,
    url: &str,
    out: &Path,
    extra: &[&str],
) -> Output {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(extra)
        .args(["-sS", "--fail", "--max-time", "60", "-o"])
        .arg(out)
        .env("HTTPS_PROXY", format!("http://{proxy}"))
        .env("https_proxy", format!("http://{proxy}"))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env("CURL_CA_BUNDLE", "/nonexistent");
    match ca {
        Some(ca) => cmd.arg("--cacert").arg(ca),
        None => cmd.arg("--cacert").arg("/nonexistent-ca.pem"),
    };
    cmd.arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("running curl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_intercepts_named_hosts_and_tunnels_the_rest() {
    let Some(tmp) = registry::work_dir_if_tools(
        TEST,
        &[REGISTRY_BIN, "skopeo", "curl"],
        "damselfly-connect-",
    ) else {
        return;
    };
    let work = tmp.path();
    let reg_ca = TestCa::new(work, "registry").expect("registry CA");
    // This host's address towards the outside (no packet is sent), when it has one.
    let host_ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    let reg_ip = host_ip.unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    let reg_ip_s = reg_ip.to_string();
    let reg_leaf = reg_ca
        .leaf("registry", &["127.0.0.1", "localhost", &reg_ip_s])
        .expect("registry certificate");
    let reg = Registry::start_on(work, reg_ip, None, Some(&reg_leaf))
        .await
        .expect("HTTPS docker-registry");
    let image =
        OciImage::build(&work.join("image"), "v1", 55, &[3 * MIB + 1]).expect("building the image");
    let certs = work.join("skopeo-certs");
    std::fs::create_dir_all(&certs).expect("cert dir");
    std::fs::copy(&reg_ca.cert_path, certs.join("ca.crt")).expect("copying the CA");
    let o = skopeo(
        work,
        &[
            "copy",
            "--dest-cert-dir",
            &certs.display().to_string(),
            &format!("oci:{}:v1", image.dir.display()),
            &format!("docker://{}/px/img:v1", reg.addr),
        ],
        Duration::from_secs(60),
    )
    .await
    .expect("running skopeo");
    assert!(
        o.status.success(),
        "push: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let other_ca = TestCa::new(work, "other").expect("other CA");
    let other_leaf = other_ca
        .leaf("other", &["127.0.0.1", "localhost"])
        .expect("other certificate");
    let other = Origin::start_tls(&other_leaf).await.expect("HTTPS origin");
    let file = other.add_file("/f.bin", MIB + 3, 8);

    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 0,
        proxy: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    let hijack = format!("^{}$", regex_escape(&reg.addr.to_string()));
    let cfg = testkit::poll::daemon_config(
        &dir,
        "daemon.yaml",
        &format!(
            "origin:\n  ca_certs: [{}]\nproxy:\n  hijack_hosts: ['{hijack}']\n",
            reg_ca.cert_path.display()
        ),
    )
    .expect("config");
    cluster.add_daemon(true, &cfg).await.expect("seed-1");
    cluster.add_daemon(false, &cfg).await.expect("peer-1");
    let peer = cluster.peer(1);
    let proxy = peer.proxy_addr.expect("peer-1 proxy");
    let proxy_ca = peer.data_dir.join("proxy-ca.pem");
    assert!(proxy_ca.is_file(), "the proxy wrote its CA for clients");

    // Intercepted host: blob through P2P, twice, the registry asked once (by the seed).
    let layer = &image.layers[0];
    let want = std::fs::read(image.blob_path(&layer.digest)).expect("pushed layer");
    let blob_url = format!("https://{}/v2/px/img/blobs/{}", reg.addr, layer.digest);
    for n in 1..=2 {
        let out = dir.join(format!("blob-{n}"));
        let o = curl(proxy, Some(&proxy_ca), &blob_url, &out).await;
        assert!(
            o.status.success(),
            "curl {n} through the proxy: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            cluster.log_tails(20)
        );
        assert!(
            std::fs::read(&out).expect("blob") == want,
            "blob {n} differs"
        );
    }
    assert_eq!(
        reg.blob_gets(&layer.digest).expect("log"),
        1,
        "the registry served the blob once"
    );
    let seed = cluster.seed(1).stats().await.expect("seed stats");
    assert_eq!(
        seed.bytes_from_origin, layer.size,
        "the seed fetched the blob"
    );
    let text = testkit::poll::scrape(peer.metrics_addr)
        .await
        .expect("metrics");
    assert!(
        testkit::poll::metric(&text, "damselfly_proxy_p2p_requests_total").unwrap_or(0.0) >= 2.0,
        "both blob GETs went through P2P"
    );

    // The manifest is passed through to the registry.
    let manifests = reg.requests("GET", "/v2/px/img/manifests/v1").expect("log");
    let out = dir.join("manifest");
    let o = curl_with(
        proxy,
        Some(&proxy_ca),
        &format!("https://{}/v2/px/img/manifests/v1", reg.addr),
        &out,
        &["-H", "Accept: application/vnd.oci.image.manifest.v1+json"],
    )
    .await;
    assert!(
        o.status.success(),
        "manifest: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        reg.requests("GET", "/v2/px/img/manifests/v1").expect("log"),
        manifests + 1,
        "the manifest request reached the registry"
    );

    // A client that does not trust the proxy's CA (only the registry's) fails cleanly.
    let out = dir.join("untrusted");
    let o = curl(proxy, Some(&reg_ca.cert_path), &blob_url, &out).await;
    assert!(
        !o.status.success(),
        "a client trusted the proxy's leaf without its CA"
    );
    assert_eq!(
        o.status.code(),
        Some(60),
        "curl: certificate problem: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists(), "nothing written");

    // Any other host is tunnelled: the origin's own certificate reaches the client.
    let out = dir.join("tunnelled");
    let o = curl(proxy, Some(&other_ca.cert_path), &other.url("/f.bin"), &out).await;
    assert!(
        o.status.success(),
        "tunnel: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        testkit::content::file_sha256_hex(&out).expect("file"),
        file.sha256_hex()
    );
    let out = dir.join("tunnelled-proxy-ca");
    let o = curl(proxy, Some(&proxy_ca), &other.url("/f.bin"), &out).await;
    assert!(!o.status.success(), "a tunnelled host was intercepted");
    assert_eq!(other.gets_of("/f.bin"), 1, "one GET through the tunnel");

    // skopeo through HTTPS_PROXY (the registry on a non-loopback address).
    if host_ip.is_none() {
        needs::skip(
            &format!("{TEST} (skopeo part)"),
            "no non-loopback address on this host (Go clients do not proxy loopback)",
        );
        return;
    }
    let proxy_certs = work.join("proxy-certs");
    std::fs::create_dir_all(&proxy_certs).expect("cert dir");
    std::fs::copy(&proxy_ca, proxy_certs.join("ca.crt")).expect("copying the proxy CA");
    let out = work.join("pull");
    let proxy_url = format!("http://{proxy}");
    let o = skopeo_env(
        work,
        &[
            "copy",
            "--src-cert-dir",
            &proxy_certs.display().to_string(),
            &format!("docker://{}/px/img:v1", reg.addr),
            &format!("oci:{}:v1", out.display()),
        ],
        &[
            ("HTTPS_PROXY", &proxy_url),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
        ],
        Duration::from_secs(60),
    )
    .await
    .expect("running skopeo");
    assert!(
        o.status.success(),
        "skopeo through HTTPS_PROXY: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        cluster.log_tails(20)
    );
    for b in image.blobs() {
        let got = std::fs::read(registry::blob_path(&out, &b.digest)).expect("pulled blob");
        let want = std::fs::read(image.blob_path(&b.digest)).expect("pushed blob");
        assert!(got == want, "blob {} differs", b.digest);
        assert_eq!(
            reg.blob_gets(&b.digest).expect("log"),
            1,
            "the registry served blob {} once",
            b.digest
        );
    }
}

/// `s` as a regex matching itself (an address: digits, `.` and `:`).
fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}

const USER_CA_TEST: &str = "https_proxy_signs_leaves_with_the_users_ca";

/// Runs `openssl args` in `dir`, panicking with its stderr when it fails.
async fn openssl(dir: &Path, args: &[&str]) {
    let o = tokio::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .kill_on_drop(true)
        .output()
        .await
        .expect("running openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `proxy.ca_cert` / `proxy.ca_key`: a CA the user made with `openssl` (a subject of several
/// parts, as corporate CAs have) signs the leaves of an intercepted HTTPS origin. A `curl`
/// with `HTTPS_PROXY` that trusts only that CA gets the file through P2P from two peers'
/// proxies while the origin serves it once (to the seed); no CA is generated. A daemon whose
/// `ca_key` is not the certificate's key refuses to start and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_signs_leaves_with_the_users_ca() {
    let Some(tmp) =
        registry::work_dir_if_tools(USER_CA_TEST, &["curl", "openssl"], "damselfly-userca-")
    else {
        return;
    };
    let work = tmp.path();
    openssl(
        work,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "corp-ca-key.pem",
        ],
    )
    .await;
    openssl(
        work,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "corp-ca-key.pem",
            "-out",
            "corp-ca.pem",
            "-days",
            "2",
            "-subj",
            "/C=DE/O=Example Corp/OU=Platform/CN=Example Corp Proxy CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
    .await;
    openssl(
        work,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "stray-key.pem",
        ],
    )
    .await;
    let corp_ca = work.join("corp-ca.pem");
    let corp_key = work.join("corp-ca-key.pem");

    let origin_ca = TestCa::new(work, "origin").expect("origin CA");
    let origin_leaf = origin_ca
        .leaf("origin", &["127.0.0.1", "localhost"])
        .expect("origin certificate");
    let origin = Origin::start_tls(&origin_leaf).await.expect("HTTPS origin");
    let size = 2 * MIB + 5;
    let file = origin.add_file("/artefacts/model.bin", size, 21);

    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 0,
        proxy: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    let hijack = format!("^{}$", regex_escape(&origin.addr().to_string()));
    let section = |key: &Path| {
        format!(
            "origin:\n  ca_certs: [{}]\nproxy:\n  rules: ['/artefacts/']\n  hijack_hosts: \
             ['{hijack}']\n  ca_cert: {}\n  ca_key: {}\n",
            origin_ca.cert_path.display(),
            corp_ca.display(),
            key.display()
        )
    };
    let cfg =
        testkit::poll::daemon_config(&dir, "daemon.yaml", &section(&corp_key)).expect("config");
    cluster.add_daemon(true, &cfg).await.expect("seed-1");
    cluster.add_daemon(false, &cfg).await.expect("peer-1");
    cluster.add_daemon(false, &cfg).await.expect("peer-2");

    let url = origin.url("/artefacts/model.bin");
    for n in 1..=2 {
        let peer = cluster.peer(n);
        assert!(
            !peer.data_dir.join("proxy-ca.pem").exists(),
            "peer-{n} generated a CA although one was configured"
        );
        let proxy = peer.proxy_addr.expect("proxy");
        let out = dir.join(format!("model-{n}.bin"));
        let o = curl(proxy, Some(&corp_ca), &url, &out).await;
        assert!(
            o.status.success(),
            "curl through peer-{n}'s proxy trusting only the user's CA: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            cluster.log_tails(20)
        );
        assert_eq!(
            testkit::content::file_sha256_hex(&out).expect("file"),
            file.sha256_hex(),
            "file {n}"
        );
        let text = testkit::poll::scrape(peer.metrics_addr)
            .await
            .expect("metrics");
        assert!(
            testkit::poll::metric(&text, "damselfly_proxy_p2p_requests_total").unwrap_or(0.0)
                >= 1.0,
            "peer-{n}'s proxy served the request through P2P"
        );
    }
    assert_eq!(
        origin.gets_of("/artefacts/model.bin"),
        1,
        "the origin served the file once"
    );
    let seed = cluster.seed(1).stats().await.expect("seed stats");
    assert_eq!(seed.bytes_from_origin, size, "the seed fetched the file");

    // A client trusting only the origin's CA does not accept the user's CA's leaf.
    let out = dir.join("untrusted.bin");
    let proxy = cluster.peer(1).proxy_addr.expect("proxy");
    let o = curl(proxy, Some(&origin_ca.cert_path), &url, &out).await;
    assert_eq!(
        o.status.code(),
        Some(60),
        "curl: certificate problem: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A key that is not the certificate's: the daemon refuses to start.
    let bad = testkit::poll::daemon_config(
        &dir,
        "daemon-bad.yaml",
        &section(&work.join("stray-key.pem")),
    )
    .expect("config");
    let err = cluster
        .add_daemon(false, &bad)
        .await
        .expect_err("a daemon started with a CA key that is not its certificate's");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("is not the key of the certificate in proxy.ca_cert"),
        "{msg}"
    );
}
