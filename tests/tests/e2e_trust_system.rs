//! The system trust store (issue 22): a daemon trusts an origin whose CA is in the
//! operating system's store — here given with `SSL_CERT_FILE`, which the store loader
//! (rustls-native-certs) reads instead of `/etc/ssl/certs` — without any `origin.ca_certs`,
//! and stops trusting it with `origin.system_ca_certs: false`. Its own test binary: the
//! variable is set for the whole process (every daemon it starts inherits it).

use testkit::pki::TestCa;
use testkit::{Cluster, ClusterOptions, Origin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_store_is_trusted_unless_turned_off() {
    let pki_dir = tempfile::tempdir().expect("temp dir");
    let ca = TestCa::new(pki_dir.path(), "system").expect("CA");
    let leaf = ca
        .leaf("origin", &["127.0.0.1", "localhost"])
        .expect("origin certificate");
    // Before any daemon starts; the only test of this binary, so no other thread reads it.
    std::env::set_var("SSL_CERT_FILE", &ca.cert_path);
    let origin = Origin::start_tls(&leaf).await.expect("HTTPS origin");
    let a = origin.add_file("/a.bin", 2 * 1024 * 1024 + 9, 41);
    origin.add_file("/b.bin", 4096, 42);

    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    let off = testkit::poll::daemon_config(&dir, "off.yaml", "origin:\n  system_ca_certs: false\n")
        .expect("config");
    cluster.add_daemon(false, &[]).await.expect("peer-1");
    cluster.add_daemon(false, &off).await.expect("peer-2");

    cluster
        .download_verified(cluster.peer(1), &origin.url("/a.bin"), &dir.join("a"), &a)
        .await
        .expect("the system store's CA is trusted");

    let out = dir.join("b");
    let o = cluster
        .run_dfget(cluster.peer(2), &origin.url("/b.bin"), &out, None)
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "system_ca_certs: false still trusted it"
    );
    assert!(stderr.contains("unknown authority"), "{stderr}");
    assert!(!out.exists(), "no file");
}
