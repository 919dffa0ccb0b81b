//! Object storage back to source (issue 22) against a real S3-protocol server process,
//! `s3s-fs` (signature-checked credentials; its debug log counts the requests):
//!
//! * a seed peer fetches `s3://bucket/key` from it, two peers get the object P2P: both files
//!   have the right sha256, the server saw one `GetObject` of the key, the peers fetched
//!   nothing from the origin;
//! * `dfget --recursive s3://bucket/prefix/` lists the prefix and downloads every object
//!   below it (and nothing outside it), keeping the key's path, each object fetched once;
//! * a missing key and bad credentials fail with exact errors and leave no file.

use std::path::Path;
use testkit::content::{file_sha256_hex, Content};
use testkit::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use testkit::{Cluster, ClusterOptions};

const MIB: u64 = 1 << 20;
const TEST: &str = "objects_from_s3_reach_peers_p2p_and_leave_the_store_once";

fn config(dir: &Path, name: &str, endpoint: &str, secret: &str) -> Vec<String> {
    testkit::poll::daemon_config(
        dir,
        name,
        &format!(
            "origin:\n  s3:\n    endpoint: {endpoint}\n    region: us-east-1\n    \
             access_key_id: {ACCESS_KEY}\n    secret_access_key: {secret}\n"
        ),
    )
    .expect("writing a daemon config")
}

fn put(s3: &S3Server, key: &str, c: &Content, size: u64) {
    s3.put("models", key, &c.range(0, size))
        .expect("storing an object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_from_s3_reach_peers_p2p_and_leave_the_store_once() {
    if testkit::s3::s3s_fs().is_none() {
        needs::skip(TEST, "s3s-fs not installed (cargo install s3s-fs --version 0.14.1 --features binary; scripts/test.sh does)");
        return;
    }
    needs::found(TEST);
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-s3-")
        .tempdir()
        .expect("temp dir");
    let s3 = S3Server::start(tmp.path()).await.expect("starting s3s-fs");
    let (a_size, b_size, c_size) = (5 * MIB + 3, MIB + 17, 1000);
    let a = Content::new(31, a_size);
    let b = Content::new(32, b_size);
    let c = Content::new(33, c_size);
    put(&s3, "dir/a.bin", &a, a_size);
    put(&s3, "dir/sub/b.bin", &b, b_size);
    put(&s3, "other/c.bin", &c, c_size);

    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    let good = config(&dir, "s3.yaml", &s3.endpoint(), SECRET_KEY);
    cluster.add_daemon(true, &good).await.expect("seed-1");
    cluster.add_daemon(false, &good).await.expect("peer-1");
    cluster.add_daemon(false, &good).await.expect("peer-2");

    // One object, two peers: the seed fetches it once, the peers get it from the swarm.
    let url = "s3://models/dir/a.bin";
    for n in [1, 2] {
        cluster
            .download_verified(cluster.peer(n), url, &dir.join(format!("a-{n}")), &a)
            .await
            .unwrap_or_else(|e| panic!("peer-{n}: {e:#}\n{}", cluster.log_tails(20)));
    }
    assert_eq!(
        s3.gets_of("dir/a.bin").expect("log"),
        1,
        "one GetObject of dir/a.bin"
    );
    for n in [1, 2] {
        let st = cluster.peer(n).stats().await.expect("stats");
        assert_eq!(
            st.bytes_from_origin, 0,
            "peer-{n} fetched nothing from the store"
        );
    }
    let seed = cluster.seed(1).stats().await.expect("seed stats");
    assert_eq!(
        seed.bytes_from_origin, a_size,
        "the seed fetched the object once"
    );

    // --recursive over a prefix: every object below it, paths kept, nothing outside.
    let out = dir.join("tree");
    let o = cluster
        .run_dfget_with(
            cluster.peer(2),
            "s3://models/dir/",
            &out,
            None,
            &[
                "--recursive",
                "--storage-endpoint",
                &s3.endpoint(),
                "--storage-region",
                "us-east-1",
                "--storage-access-key-id",
                ACCESS_KEY,
                "--storage-secret-access-key",
                SECRET_KEY,
            ],
        )
        .await
        .expect("dfget --recursive");
    testkit::cluster::check_dfget("peer-2 recursive", &o).expect("recursive download");
    assert_eq!(
        file_sha256_hex(&out.join("a.bin")).expect("a.bin"),
        a.sha256_hex()
    );
    assert_eq!(
        file_sha256_hex(&out.join("sub/b.bin")).expect("sub/b.bin"),
        b.sha256_hex()
    );
    assert!(!out.join("c.bin").exists() && !out.join("other").exists());
    assert_eq!(
        s3.gets_of("dir/a.bin").expect("log"),
        1,
        "a.bin came from the swarm"
    );
    assert_eq!(
        s3.gets_of("dir/sub/b.bin").expect("log"),
        1,
        "b.bin fetched once"
    );
    assert_eq!(
        s3.gets_of("other/c.bin").expect("log"),
        0,
        "nothing outside the prefix"
    );

    // A missing key: the exact error, no file.
    let missing = dir.join("missing");
    let o = cluster
        .run_dfget(cluster.peer(1), "s3://models/dir/nope.bin", &missing, None)
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a missing key succeeded");
    assert!(
        stderr.contains("s3://models/dir/nope.bin: no such object in the object store (404)"),
        "{stderr}"
    );
    assert!(!missing.exists(), "no file for a missing key");

    // Bad credentials: a cluster whose only daemon has a wrong secret key.
    let mut other = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("second cluster");
    let odir = other.dir().to_path_buf();
    let bad = config(&odir, "bad.yaml", &s3.endpoint(), "wrong-secret");
    other
        .add_daemon(false, &bad)
        .await
        .expect("peer with bad credentials");
    let denied = odir.join("denied");
    let o = other
        .run_dfget(other.peer(1), "s3://models/other/c.bin", &denied, None)
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "bad credentials succeeded");
    assert!(
        stderr.contains("s3://models/other/c.bin: access denied by the object store (403 Forbidden; check the credentials")
            && stderr.contains("SignatureDoesNotMatch"),
        "{stderr}"
    );
    assert!(!denied.exists(), "no file with bad credentials");

    // The ranged read resumption and lost-piece fetches use: exactly the asked bytes.
    let s3cfg = controlplane::config::S3Config {
        endpoint: s3.endpoint(),
        region: "us-east-1".into(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        ..Default::default()
    };
    let (from, to) = (1000u64, 1_500_000u64);
    let opened = controlplane::s3::open(
        &s3cfg,
        &controlplane::config::OriginConfig::default(),
        std::time::Duration::from_secs(10),
        "s3://models/dir/a.bin",
        from,
        Some(to),
    )
    .await
    .expect("ranged read");
    assert_eq!((opened.total, opened.start), (a_size, from));
    let mut got = Vec::new();
    let mut body = opened.body;
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        got.extend_from_slice(&chunk.expect("ranged body"));
    }
    assert!(
        got == a.range(from, to - from),
        "the ranged read returned other bytes"
    );
    assert_eq!(
        s3.gets_of("dir/a.bin").expect("log"),
        2,
        "one more GetObject"
    );
}
