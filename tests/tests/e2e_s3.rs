//! Object storage back to source (issue 22) against a real S3-protocol server process,
//! `s3s-fs` (signature-checked credentials; its debug log counts the requests):
//!
//! * a seed peer fetches `s3://bucket/key` from it, two peers get the object P2P: both files
//!   have the right sha256, the server saw one `GetObject` of the key, the peers fetched
//!   nothing from the origin;
//! * `dfget --recursive s3://bucket/prefix/` lists the prefix and downloads every object
//!   below it (and nothing outside it), keeping the key's path, each object fetched once;
//! * a missing key and bad credentials fail with exact errors and leave no file;
//! * daemons with no object-storage settings at all (no `origin.s3`, no `AWS_*`): dfget's
//!   `--storage-*` settings go with the request and the daemon fetches with them (one object,
//!   `--recursive` over a prefix), for that request only; a wrong secret and a missing key
//!   give exact errors, exit codes and no file; no daemon log holds the secret;
//! * a seed peer without settings, triggered by the scheduler, fails; the asking peer goes
//!   back to the source with its request's settings.

use std::path::Path;
use testkit::content::{file_sha256_hex, Content};
use testkit::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use testkit::{Cluster, ClusterOptions};

const MIB: u64 = 1 << 20;
const TEST: &str = "objects_from_s3_reach_peers_p2p_and_leave_the_store_once";
const TEST_FLAGS: &str = "dfget_storage_flags_reach_a_daemon_without_s3_settings";

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
        None,
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

/// dfget's `--storage-*` flags for `s3` with `secret`.
fn storage_flags(s3: &S3Server, secret: &str) -> Vec<String> {
    [
        "--storage-endpoint",
        &s3.endpoint(),
        "--storage-region",
        "us-east-1",
        "--storage-access-key-id",
        ACCESS_KEY,
        "--storage-secret-access-key",
        secret,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dfget_storage_flags_reach_a_daemon_without_s3_settings() {
    if testkit::s3::s3s_fs().is_none() {
        needs::skip(TEST_FLAGS, "s3s-fs not installed (cargo install s3s-fs --version 0.14.1 --features binary; scripts/test.sh does)");
        return;
    }
    needs::found(TEST_FLAGS);
    // The daemons inherit this process's environment: it must give them no object store
    // settings (credentials, endpoint, region).
    let aws: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.to_str().map(str::to_owned))
        .filter(|k| {
            k.starts_with("AWS_")
                && [
                    "KEY",
                    "TOKEN",
                    "ENDPOINT",
                    "REGION",
                    "ROLE",
                    "CREDENTIALS",
                    "PROFILE",
                ]
                .iter()
                .any(|w| k.contains(w))
        })
        .collect();
    assert!(
        aws.is_empty(),
        "run this test without AWS_* variables (found {aws:?})"
    );
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-s3-flags-")
        .tempdir()
        .expect("temp dir");
    let s3 = S3Server::start(tmp.path()).await.expect("starting s3s-fs");
    let d_size = 2 * MIB + 5;
    let d = Content::new(41, d_size);
    let (e_size, f_size) = (MIB + 1, 777);
    let e = Content::new(42, e_size);
    let f = Content::new(43, f_size);
    let g = Content::new(44, 4096);
    put(&s3, "creds/d.bin", &d, d_size);
    put(&s3, "tree/e.bin", &e, e_size);
    put(&s3, "tree/sub/f.bin", &f, f_size);
    put(&s3, "creds/g.bin", &g, 4096);

    // No seed peer (a seed the scheduler asks would use its own settings): the peer that
    // asks goes back to the source itself, with the settings of the request. Debug logs, so
    // that the check for the secret in them below means something.
    let mut cluster = Cluster::start(ClusterOptions {
        rust_log: Some("debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info".into()),
        ..ClusterOptions::sized(0, 0)
    })
    .await
    .expect("cluster");
    let dir = cluster.dir().to_path_buf();
    cluster.add_daemon(false, &[]).await.expect("peer-1");
    cluster.add_daemon(false, &[]).await.expect("peer-2");
    let good = storage_flags(&s3, SECRET_KEY);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();

    // One object, with the flags, on both peers: the store saw it once.
    let url = "s3://models/creds/d.bin";
    let digest = format!("sha256:{}", d.sha256_hex());
    for n in [1, 2] {
        let out = dir.join(format!("d-{n}"));
        let o = cluster
            .run_dfget_with(cluster.peer(n), url, &out, Some(&digest), &good)
            .await
            .expect("dfget");
        testkit::cluster::check_dfget(&format!("peer-{n}"), &o)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(20)));
        assert_eq!(file_sha256_hex(&out).expect("d"), d.sha256_hex());
    }
    assert_eq!(
        s3.gets_of("creds/d.bin").expect("log"),
        1,
        "one GetObject of creds/d.bin"
    );
    let st = cluster.peer(1).stats().await.expect("stats");
    assert_eq!(
        st.bytes_from_origin, d_size,
        "peer-1 fetched it from the store"
    );

    // --recursive: the listing and each object's download use the flags.
    let tree = dir.join("tree");
    let mut args = vec!["--recursive"];
    args.extend(&good);
    let o = cluster
        .run_dfget_with(cluster.peer(2), "s3://models/tree/", &tree, None, &args)
        .await
        .expect("dfget --recursive");
    testkit::cluster::check_dfget("peer-2 recursive", &o)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(20)));
    assert_eq!(
        file_sha256_hex(&tree.join("e.bin")).expect("e.bin"),
        e.sha256_hex()
    );
    assert_eq!(
        file_sha256_hex(&tree.join("sub/f.bin")).expect("sub/f.bin"),
        f.sha256_hex()
    );
    assert_eq!(s3.gets_of("tree/e.bin").expect("log"), 1);
    assert_eq!(s3.gets_of("tree/sub/f.bin").expect("log"), 1);

    // A wrong secret: the store's exact error, the "denied" exit code, no file.
    let denied = dir.join("denied");
    let bad = storage_flags(&s3, "wrong-secret");
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let o = cluster
        .run_dfget_with(
            cluster.peer(1),
            "s3://models/creds/g.bin",
            &denied,
            None,
            &bad,
        )
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(4),
        "exit code of access denied: {stderr}"
    );
    assert!(
        stderr.contains("s3://models/creds/g.bin: access denied by the object store (403 Forbidden; check the credentials given with the request")
            && stderr.contains("SignatureDoesNotMatch"),
        "{stderr}"
    );
    assert!(!denied.exists(), "no file with a wrong secret");

    // The settings were that request's only: without flags, this daemon has no credentials.
    let o = cluster
        .run_dfget(cluster.peer(1), "s3://models/creds/g.bin", &denied, None)
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a daemon without credentials fetched: {stderr}"
    );
    assert!(stderr.contains("s3://models/creds/g.bin"), "{stderr}");
    assert!(!denied.exists(), "no file without credentials");
    assert_eq!(
        s3.gets_of("creds/g.bin").expect("log"),
        0,
        "no object was served"
    );

    // A missing key, with good flags: not found, its exit code, no file.
    let missing = dir.join("missing");
    let o = cluster
        .run_dfget_with(
            cluster.peer(2),
            "s3://models/creds/nope.bin",
            &missing,
            None,
            &good,
        )
        .await
        .expect("dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "exit code of not found: {stderr}");
    assert!(
        stderr.contains("s3://models/creds/nope.bin: no such object in the object store (404)"),
        "{stderr}"
    );
    assert!(!missing.exists(), "no file for a missing key");

    // And with good flags after all that: the object.
    let g_out = dir.join("g");
    let o = cluster
        .run_dfget_with(
            cluster.peer(1),
            "s3://models/creds/g.bin",
            &g_out,
            None,
            &good,
        )
        .await
        .expect("dfget");
    testkit::cluster::check_dfget("peer-1 g.bin", &o).expect("g.bin with the right secret");
    assert_eq!(file_sha256_hex(&g_out).expect("g"), g.sha256_hex());

    // No log of any daemon (at the cluster's log level) holds the secret.
    for entry in std::fs::read_dir(&dir).expect("cluster dir").flatten() {
        let path = entry.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".log"))
        {
            let text = std::fs::read(&path).expect("log");
            let text = String::from_utf8_lossy(&text);
            assert!(
                !text.contains(SECRET_KEY) && !text.contains("wrong-secret"),
                "{} holds the secret",
                path.display()
            );
        }
    }
}

const TEST_SEED: &str =
    "a_seed_without_settings_fails_and_the_peer_fetches_with_the_request_settings";

/// The scheduler triggers the seed peer, which has no object-storage settings (the request's
/// are never sent to it): its fetch fails, the scheduler sends the asking peer back to the
/// source, and that peer fetches with the settings of its client's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_without_settings_fails_and_the_peer_fetches_with_the_request_settings() {
    if testkit::s3::s3s_fs().is_none() {
        needs::skip(TEST_SEED, "s3s-fs not installed (cargo install s3s-fs --version 0.14.1 --features binary; scripts/test.sh does)");
        return;
    }
    needs::found(TEST_SEED);
    let tmp = tempfile::Builder::new()
        .prefix("damselfly-s3-seed-")
        .tempdir()
        .expect("temp dir");
    let s3 = S3Server::start(tmp.path()).await.expect("starting s3s-fs");
    let size = 3 * MIB + 1;
    let d = Content::new(51, size);
    put(&s3, "p/d.bin", &d, size);
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("cluster");
    cluster.add_daemon(true, &[]).await.expect("seed-1");
    cluster.add_daemon(false, &[]).await.expect("peer-1");
    let dir = cluster.dir().to_path_buf();
    let good = storage_flags(&s3, SECRET_KEY);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let out = dir.join("d");
    let digest = format!("sha256:{}", d.sha256_hex());
    let o = cluster
        .run_dfget_with(
            cluster.peer(1),
            "s3://models/p/d.bin",
            &out,
            Some(&digest),
            &good,
        )
        .await
        .expect("dfget");
    testkit::cluster::check_dfget("peer-1", &o)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(20)));
    assert_eq!(file_sha256_hex(&out).expect("d"), d.sha256_hex());
    let seed = cluster.seed(1).stats().await.expect("seed stats");
    assert_eq!(seed.bytes_from_origin, 0, "the seed had no credentials");
    let peer = cluster.peer(1).stats().await.expect("peer stats");
    assert_eq!(
        peer.bytes_from_origin, size,
        "the peer fetched it with the request's"
    );
    assert_eq!(s3.gets_of("p/d.bin").expect("log"), 1, "one GetObject");
}
