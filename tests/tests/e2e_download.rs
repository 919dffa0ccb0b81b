//! End-to-end downloads through a real cluster (scheduler, one seed peer, three peers) from
//! the in-process origin: output digests, the origin sending each byte once, peers serving
//! peers, and dfget failing cleanly on a wrong digest or a missing URL.

use std::path::PathBuf;
use testkit::cluster::check_dfget;
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;

fn out_dir(cluster: &Cluster) -> PathBuf {
    let dir = cluster.dir().join("out");
    std::fs::create_dir_all(&dir).expect("creating the output dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_every_shape_reach_all_peers_and_leave_the_origin_once() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 3))
        .await
        .expect("starting the cluster");
    let out = out_dir(&cluster);
    let (p1, p2, p3) = (cluster.peer(1), cluster.peer(2), cluster.peer(3));

    let files = [
        ("empty", 0),
        ("one-byte", 1),
        ("odd", 3 * MIB + 12_345),
        ("multi", 24 * MIB),
    ];
    let mut total = 0u64;
    for (i, (name, size)) in files.into_iter().enumerate() {
        let path = format!("/{name}.bin");
        let content = origin.add_file(&path, size, 1000 + i as u64);
        let url = origin.url(&path);

        cluster
            .download_verified(p1, &url, &out.join(format!("{name}.peer-1")), &content)
            .await
            .unwrap_or_else(|e| panic!("{name} ({size} bytes) through peer-1: {e:#}"));
        let (out2, out3) = (
            out.join(format!("{name}.peer-2")),
            out.join(format!("{name}.peer-3")),
        );
        let (r2, r3) = tokio::join!(
            cluster.download_verified(p2, &url, &out2, &content),
            cluster.download_verified(p3, &url, &out3, &content),
        );
        r2.unwrap_or_else(|e| panic!("{name} ({size} bytes) through peer-2: {e:#}"));
        r3.unwrap_or_else(|e| panic!("{name} ({size} bytes) through peer-3: {e:#}"));

        total += size;
        assert_eq!(
            origin.bytes_served(),
            total,
            "after {name} ({size} bytes): the origin should have sent each byte of the files \
             so far exactly once; requests: {:#?}",
            origin.request_log()
        );
    }

    let mut from_peers = 0;
    for p in [p1, p2, p3] {
        let s = p.stats().await.expect("Stats");
        let received = s.bytes_from_origin + s.bytes_from_seed + s.bytes_from_peers;
        assert!(
            received >= total,
            "{} downloaded {total} bytes of files but its Stats count {received} bytes \
             received: {s:?}",
            p.name
        );
        if p.name != "peer-1" {
            from_peers += s.bytes_from_peers;
        }
    }
    assert!(
        from_peers > 0,
        "peer-2 and peer-3 got no bytes from other peers although peer-1 held every file: \
         {:?} / {:?}",
        p2.stats().await.expect("Stats"),
        p3.stats().await.expect("Stats"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_digest_and_missing_url_fail_without_leaving_a_file() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 1))
        .await
        .expect("starting the cluster");
    let out = out_dir(&cluster);
    let peer = cluster.peer(1);
    let content = origin.add_file("/f.bin", 2 * MIB + 1, 77);
    let url = origin.url("/f.bin");

    let wrong = format!("sha256:{}", testkit::Content::new(78, 10).sha256_hex());
    let bad_out = out.join("wrong-digest");
    let o = cluster
        .run_dfget(peer, &url, &bad_out, Some(&wrong))
        .await
        .expect("running dfget");
    assert!(
        !o.status.success(),
        "dfget with a wrong --digest exited 0; stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !bad_out.exists(),
        "dfget failed on a wrong digest but left {} behind ({} bytes), as if it had succeeded",
        bad_out.display(),
        std::fs::metadata(&bad_out).map(|m| m.len()).unwrap_or(0)
    );

    let missing_out = out.join("missing");
    let o = cluster
        .run_dfget(peer, &origin.url("/no-such-file"), &missing_out, None)
        .await
        .expect("running dfget");
    assert!(
        !o.status.success(),
        "dfget of a URL answering 404 exited 0; stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !missing_out.exists(),
        "dfget of a 404 URL left {}",
        missing_out.display()
    );

    // The daemon is not poisoned by the failures: the right digest works.
    let good = out.join("good");
    let o = cluster
        .run_dfget(peer, &url, &good, Some(&content.digest()))
        .await
        .expect("running dfget");
    check_dfget(&peer.name, &o).expect("dfget with the right digest after a failure");
    assert_eq!(
        testkit::content::file_sha256_hex(&good).expect("hashing the output"),
        content.sha256_hex()
    );
}
