//! Small files go peer to peer too: a file of one piece, once a peer holds it, is served to
//! the next peer by that peer, with the origin (and the dead seed) out of the picture.

use testkit::{Cluster, ClusterOptions, Origin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_piece_file_is_served_peer_to_peer() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 2))
        .await
        .expect("starting the cluster");
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");
    let size = 100_000;
    let content = origin.add_file("/small.bin", size, 77);
    let url = origin.url("/small.bin");

    cluster
        .download_verified(cluster.peer(1), &url, &out.join("small.peer-1"), &content)
        .await
        .expect("peer-1 downloads the small file");
    assert_eq!(
        origin.bytes_served(),
        size,
        "the seed fetched the file once"
    );

    // Without the seed, only peer-1 holds the file: peer-2 must get it from peer-1.
    cluster.kill(cluster.seed(1));
    cluster
        .download_verified(cluster.peer(2), &url, &out.join("small.peer-2"), &content)
        .await
        .expect("peer-2 downloads the small file");
    let s2 = cluster.peer(2).stats().await.expect("Stats of peer-2");
    assert_eq!(s2.bytes_from_origin, 0, "peer-2 went to the origin: {s2:?}");
    assert_eq!(
        s2.bytes_from_peers, size,
        "peer-2 did not get the piece from peer-1: {s2:?}"
    );
    assert_eq!(
        origin.bytes_served(),
        size,
        "the origin served the file a second time"
    );
}
