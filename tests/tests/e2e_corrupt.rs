//! A malicious parent: a fake host registered with the scheduler as holding a whole task
//! serves pieces whose bytes do not match their crc32c. A real peer downloading the task must
//! detect the corruption (`pieces_corrupt`), fetch those pieces elsewhere, and still produce
//! the right file.

use testkit::fake_parent::{FakeParent, Mode};
use testkit::frames::task_layout;
use testkit::{Cluster, ClusterOptions, Origin};
use wire::task::TaskIdOptions;
use wire::TaskId;

const MIB: u64 = 1 << 20;
const FAKE_HOST: &str = "fake-parent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pieces_from_a_fake_parent_are_detected_and_refetched() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 2))
        .await
        .expect("starting the cluster");
    let (p1, p2) = (cluster.peer(1), cluster.peer(2));
    let content = origin.add_file("/victim.bin", 16 * MIB + 4321, 4242);
    let url = origin.url("/victim.bin");
    let task = TaskId::from_url(&url, &TaskIdOptions::default()).expect("task id");

    // 1. A real peer downloads the task, so the scheduler and the seed know it.
    cluster
        .download_verified(p1, &url, &cluster.dir().join("p1.out"), &content)
        .await
        .expect("download through peer-1");

    // 2. Learn the layout from peer-1's bitmap.
    let (content_length, piece_length, piece_count) = task_layout(p1.data_addr, task)
        .await
        .expect("peer-1's bitmap");
    assert_eq!(content_length, content.size);

    // 3. The fake parent joins the swarm claiming every piece.
    let mut fake = FakeParent::start(task, content, u64::from(piece_length), Mode::Corrupt)
        .await
        .expect("starting the fake parent");
    fake.join_swarm(cluster.scheduler_addr(), FAKE_HOST, &url, piece_count)
        .await
        .expect("the fake parent joins the swarm");

    // 4. A second real peer downloads; the scheduler offers it the fake among its parents.
    cluster
        .download_verified(p2, &url, &cluster.dir().join("p2.out"), &content)
        .await
        .expect("download through peer-2 with a corrupting parent in the swarm");
    assert!(
        fake.piece_requests() > 0,
        "the fake parent received no PieceRequest (connections {}, bitmap requests {}); \
         with only the seed, peer-1 and the fake holding the task, the scheduler should have \
         offered it to peer-2 (up to 4 candidates) and peer-2 should have used it",
        fake.connections(),
        fake.bitmap_requests()
    );
    let s = p2.stats().await.expect("Stats of peer-2");
    assert!(
        s.pieces_corrupt > 0,
        "the fake parent sent {} corrupt pieces to peer-2 ({} requests) but peer-2 counts \
         pieces_corrupt = 0: {s:?}",
        fake.pieces_sent(),
        fake.piece_requests()
    );
}
