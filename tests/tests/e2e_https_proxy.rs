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
