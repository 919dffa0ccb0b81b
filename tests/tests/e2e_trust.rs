//! Trusting origins signed by a private CA (issue 22), with certificates made at run time
//! (rcgen):
//!
//! * an HTTPS origin whose certificate comes from a test CA: a daemon without the CA fails
//!   the download with an "unknown authority" error naming `origin.ca_certs`, leaves no file
//!   and never retries into the origin; a daemon with `origin.ca_certs` downloads it
//!   (sha256 right); a daemon with `origin.insecure_skip_verify` downloads it too and says so
//!   in its log at start;
//! * an HTTPS `docker-registry` with a certificate from the test CA, pulled by `skopeo`
//!   through the registry mirror: the seed peer fetches each blob once (the registry's access
//!   log) with the CA from `origin.ca_certs`, the pulled blobs equal the pushed ones; a daemon
//!   without the CA answers a passed-through manifest request `502` naming the unknown
//!   authority.

use std::path::Path;
use std::time::Duration;
use testkit::pki::TestCa;
use testkit::registry::{self, blob_path, skopeo, OciImage, Registry, REGISTRY_BIN};
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn config(dir: &Path, name: &str, yaml: &str) -> Vec<String> {
    testkit::poll::daemon_config(dir, name, yaml).expect("writing a daemon config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_origin_signed_by_a_private_ca_is_trusted_only_with_its_ca() {
    let pki_dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(pki_dir.path(), "private").expect("CA");
    let leaf = ca
        .leaf("origin", &["127.0.0.1", "localhost"])
        .expect("origin certificate");
    let origin = Origin::start_tls(&leaf).await.expect("HTTPS origin");
    let a = origin.add_file("/a.bin", 3 * MIB + 77, 21);
    let b = origin.add_file("/b.bin", MIB + 5, 22);

    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    let plain = config(&dir, "plain.yaml", "download:\n  origin_retries: 3\n");
    let trusting = config(
        &dir,
        "ca.yaml",
        &format!("origin:\n  ca_certs: [{}]\n", ca.cert_path.display()),
    );
    let insecure = config(
        &dir,
        "insecure.yaml",
        "origin:\n  insecure_skip_verify: true\n",
    );
    cluster.add_daemon(false, &plain).await.expect("peer-1");
    cluster.add_daemon(false, &trusting).await.expect("peer-2");
    cluster.add_daemon(false, &insecure).await.expect("peer-3");

    // Without the CA: a clear error, no file, and no request reached the origin's handler.
    let out = dir.join("a-untrusted");
    let o = cluster
        .run_dfget(cluster.peer(1), &origin.url("/a.bin"), &out, None)
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "dfget trusted an unknown CA: {stderr}");
    assert!(
        stderr.contains("unknown authority") && stderr.contains("origin.ca_certs"),
        "the error names the unknown authority and the setting: {stderr}"
    );
    assert!(!out.exists(), "no output file after a refused certificate");
    assert_eq!(origin.gets_of("/a.bin"), 0, "no request was made over TLS");
    let log = std::fs::read_to_string(cluster.peer(1).proc.log_path()).expect("peer-1 log");
    assert!(
        !log.contains("retry 1"),
        "a refused certificate is not retried:\n{log}"
    );

    // With the CA in origin.ca_certs: the download is right.
    cluster
        .download_verified(
            cluster.peer(2),
            &origin.url("/a.bin"),
            &dir.join("a-trusted"),
            &a,
        )
        .await
        .expect("download with the CA trusted");
    assert_eq!(origin.gets_of("/a.bin"), 1, "the origin served /a.bin once");

    // insecure_skip_verify: works, and the daemon said loudly at start that it does not check.
    cluster
        .download_verified(
            cluster.peer(3),
            &origin.url("/b.bin"),
            &dir.join("b-insecure"),
            &b,
        )
        .await
        .expect("download with insecure_skip_verify");
    let log = std::fs::read_to_string(cluster.peer(3).proc.log_path()).expect("peer-3 log");
    assert!(
        log.contains("insecure_skip_verify is on") && log.contains("WARN"),
        "peer-3 warns that certificates are not verified:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_registry_signed_by_a_private_ca_is_pulled_through_the_mirror() {
    const TEST: &str = "an_https_registry_signed_by_a_private_ca_is_pulled_through_the_mirror";
    let Some(tmp) =
        registry::work_dir_if_tools(TEST, &[REGISTRY_BIN, "skopeo"], "damselfly-trust-")
    else {
        return;
    };
    let work = tmp.path();
    let ca = TestCa::new(work, "registry").expect("CA");
    let leaf = ca
        .leaf("registry", &["127.0.0.1", "localhost"])
        .expect("registry certificate");
    let reg = Registry::start_with(work, None, Some(&leaf))
        .await
        .expect("starting docker-registry with TLS");
    assert!(reg.url().starts_with("https://"), "{}", reg.url());
    let image = OciImage::build(&work.join("image"), "v1", 91, &[2 * MIB + 999, MIB])
        .expect("building the image");
    // skopeo trusts the CA through a cert dir (`ca.crt`).
    let certs = work.join("skopeo-certs");
    std::fs::create_dir_all(&certs).expect("cert dir");
    std::fs::copy(&ca.cert_path, certs.join("ca.crt")).expect("copying the CA");
    let o = skopeo(
        work,
        &[
            "copy",
            "--dest-cert-dir",
            &certs.display().to_string(),
            &format!("oci:{}:v1", image.dir.display()),
            &format!("docker://{}/trust/img:v1", reg.addr),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    assert!(
        o.status.success(),
        "skopeo push over TLS: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 0,
        proxy: true,
        daemon_args: vec!["--registry-mirror".into(), reg.url()],
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    let trusting = config(
        &dir,
        "ca.yaml",
        &format!("origin:\n  ca_certs: [{}]\n", ca.cert_path.display()),
    );
    cluster.add_daemon(true, &trusting).await.expect("seed-1");
    cluster.add_daemon(false, &trusting).await.expect("peer-1");
    cluster.add_daemon(false, &[]).await.expect("peer-2");
    let proxy1 = cluster.peer(1).proxy_addr.expect("peer-1 proxy");
    let proxy2 = cluster.peer(2).proxy_addr.expect("peer-2 proxy");

    // A daemon without the CA cannot pass a manifest request through: 502 naming the cause.
    let r = reqwest::Client::new()
        .get(format!("http://{proxy2}/v2/trust/img/manifests/v1"))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .expect("manifest through peer-2");
    let status = r.status();
    let body = r.text().await.expect("body");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("unknown authority"), "{body}");

    // skopeo pulls through peer-1's mirror (plain HTTP to the proxy); the seed fetches each
    // blob from the HTTPS registry once, trusting the CA from origin.ca_certs.
    let out = work.join("pull");
    let o = skopeo(
        work,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{proxy1}/trust/img:v1"),
            &format!("oci:{}:v1", out.display()),
        ],
        TOOL_TIMEOUT,
    )
    .await
    .expect("running skopeo");
    assert!(
        o.status.success(),
        "skopeo pull through the mirror: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        cluster.log_tails(30)
    );
    let mut blob_bytes = 0;
    for b in image.blobs() {
        let got = std::fs::read(blob_path(&out, &b.digest)).expect("pulled blob");
        let want = std::fs::read(image.blob_path(&b.digest)).expect("pushed blob");
        assert!(got == want, "blob {} differs from the pushed one", b.digest);
        assert_eq!(
            reg.blob_gets(&b.digest).expect("registry log"),
            1,
            "the registry served blob {} once",
            b.digest
        );
        blob_bytes += b.size;
    }
    let seed = cluster.seed(1).stats().await.expect("seed stats");
    assert_eq!(
        seed.bytes_from_origin, blob_bytes,
        "the seed fetched the blobs from the HTTPS registry"
    );
    let peer = cluster.peer(1).stats().await.expect("peer-1 stats");
    assert_eq!(
        peer.bytes_from_origin, 0,
        "peer-1 got the blobs from the seed"
    );
}
