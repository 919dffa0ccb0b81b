//! A forging parent: a fake host (built on the `wire` crate, in this process) registers with
//! the real scheduler as holding a whole task and serves forged pieces whose crc32c matches
//! the forged bytes, and reports forged digests too. Every piece from a parent is checked
//! against the BLAKE3 digest the seed reported when it fetched the task from the origin, so
//! a real peer downloading WITHOUT `--digest` never stores nor serves the forged bytes,
//! reports the forger to the scheduler, finishes from the other parents, and writes the
//! right file.

use testkit::cluster::check_dfget;
use testkit::content::file_sha256_hex_async;
use testkit::fake_parent::{FakeParent, Mode};
use testkit::frames::{task_layout, FrameConn, DEFAULT_REPLY_TIMEOUT};
use testkit::{Cluster, ClusterOptions, Origin};
use wire::frame::Frame;
use wire::task::TaskIdOptions;
use wire::TaskId;

const MIB: u64 = 1 << 20;
const FORGER: &str = "forger";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_pieces_with_a_matching_crc_are_never_stored_and_the_forger_is_reported() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 2))
        .await
        .expect("starting the cluster");
    let (p1, p2) = (cluster.peer(1), cluster.peer(2));
    let content = origin.add_file("/forged.bin", 16 * MIB + 4321, 4343);
    let url = origin.url("/forged.bin");
    let task = TaskId::from_url(&url, &TaskIdOptions::default()).expect("task id");
    let expected = content.sha256_hex();

    // 1. A real peer downloads the task (no --digest): the seed fetches it from the origin
    //    and reports each piece's digest.
    let out1 = cluster.dir().join("p1.out");
    let o = cluster
        .run_dfget(p1, &url, &out1, None)
        .await
        .expect("dfget through peer-1");
    check_dfget("peer-1", &o).expect("peer-1 download");
    assert_eq!(
        file_sha256_hex_async(&out1).await.expect("sha256"),
        expected
    );

    // 2. The layout, from peer-1's bitmap.
    let (_, piece_length, piece_count) = task_layout(p1.data_addr, task)
        .await
        .expect("peer-1's bitmap");

    // 3. The forger joins the swarm claiming every piece (with forged digests).
    let mut fake = FakeParent::start(task, content, u64::from(piece_length), Mode::Forged)
        .await
        .expect("starting the forger");
    fake.join_swarm(cluster.scheduler_addr(), FORGER, &url, piece_count)
        .await
        .expect("the forger joins the swarm");

    // 4. A second real peer downloads WITHOUT --digest; the forger is among its parents.
    let out2 = cluster.dir().join("p2.out");
    let o = cluster
        .run_dfget(p2, &url, &out2, None)
        .await
        .expect("dfget through peer-2");
    check_dfget("peer-2", &o).expect("peer-2 download with a forger in the swarm");
    assert_eq!(
        file_sha256_hex_async(&out2).await.expect("sha256"),
        expected,
        "peer-2 wrote a wrong file: forged pieces were stored"
    );
    assert!(
        fake.pieces_sent() > 0,
        "the forger sent no piece (connections {}, bitmap requests {}, piece requests {}); \
         the scheduler should have offered it to peer-2",
        fake.connections(),
        fake.bitmap_requests(),
        fake.piece_requests()
    );
    let s = p2.stats().await.expect("Stats of peer-2");
    eprintln!(
        "forger: {} connections, {} piece requests, {} forged pieces sent; peer-2: \
         pieces_forged {}, pieces_corrupt {}, pieces_downloaded {}, digest_waits {}",
        fake.connections(),
        fake.piece_requests(),
        fake.pieces_sent(),
        s.pieces_forged,
        s.pieces_corrupt,
        s.pieces_downloaded,
        s.digest_waits
    );
    assert!(
        s.pieces_forged > 0,
        "the forger sent {} forged pieces to peer-2 but peer-2 counts none: {s:?}",
        fake.pieces_sent()
    );
    // Dropped at the first forged piece: one per connection at most.
    assert!(
        s.pieces_forged <= fake.connections(),
        "peer-2 kept using the forger: {} forged pieces over {} connections",
        s.pieces_forged,
        fake.connections()
    );

    // 5. Peer-2 serves only the true bytes: every piece read back from its data plane.
    let mut c2 = FrameConn::connect(p2.data_addr)
        .await
        .expect("connect to peer-2");
    let layout = wire::PieceLayout::new(content.size, u64::from(piece_length)).expect("layout");
    for n in 0..piece_count {
        c2.send(&Frame::PieceRequest { task, number: n })
            .await
            .expect("send");
        let r = layout.piece_range(n).expect("range");
        let reply = c2.recv_timeout(DEFAULT_REPLY_TIMEOUT).await.expect("reply");
        let Some(Frame::Piece(h)) = reply else {
            panic!("peer-2 should serve piece {n}, got {reply:?}");
        };
        assert_eq!(u64::from(h.length), r.end - r.start);
        let bytes = c2.read_raw(h.length as usize).await.expect("piece bytes");
        assert!(
            bytes == content.range(r.start, r.end - r.start),
            "peer-2 serves other bytes than the origin's for piece {n}"
        );
    }

    // 6. Peer-2 named the forger to the scheduler as a bad parent.
    let log = std::fs::read_to_string(cluster.scheduler().log_path()).expect("scheduler log");
    assert!(
        log.lines()
            .any(|l| l.contains("reschedule") && l.contains(FORGER) && l.contains("forged")),
        "the scheduler log has no reschedule naming {FORGER} for a forged piece"
    );
}

/// Digests across restarts: the seed fetched the task and finished; then the seed daemon
/// restarts (its in-memory digests are gone; the task is restored from its metadata store)
/// and the scheduler restarts (its digests are gone too). The seed announces the restored
/// task to the new scheduler with the digest of every piece (computed again from its disk:
/// a seed host's announced digests are trusted), so a peer that downloads afterwards still
/// checks every piece: with a forger in the swarm it counts forged pieces, writes the right
/// file without `--digest`. Before, a restored task was announced without digests and the
/// new scheduler had none: the peer checked crc32c only and stored the forged bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_survive_a_seed_restart_and_a_scheduler_restart() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(1, 2))
        .await
        .expect("starting the cluster");
    let content = origin.add_file("/restart.bin", 12 * MIB + 777, 5151);
    let url = origin.url("/restart.bin");
    let task = TaskId::from_url(&url, &TaskIdOptions::default()).expect("task id");
    let expected = content.sha256_hex();

    let out1 = cluster.dir().join("p1.out");
    let o = cluster
        .run_dfget(cluster.peer(1), &url, &out1, None)
        .await
        .expect("dfget through peer-1");
    check_dfget("peer-1", &o).expect("peer-1 download");
    let (_, piece_length, piece_count) = task_layout(cluster.peer(1).data_addr, task)
        .await
        .expect("peer-1's bitmap");

    // Peer-1 leaves (it would re-announce the task without digests: not a seed); then the
    // seed daemon and the scheduler restart.
    cluster.kill(cluster.peer(1));
    cluster.restart_seed(1).await.expect("restarting the seed");
    cluster
        .restart_scheduler(1)
        .await
        .expect("restarting the scheduler");
    let sched = cluster.scheduler_addr();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let done = testkit::grpc::stat_task(sched, &task.to_hex())
            .await
            .ok()
            .is_some_and(|i| i.peers.iter().any(|p| p.host_id == "seed-1" && p.done));
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted seed did not announce its task to the restarted scheduler\n{}",
            cluster.log_tails(20)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let mut fake = FakeParent::start(task, content, u64::from(piece_length), Mode::Forged)
        .await
        .expect("starting the forger");
    fake.join_swarm(sched, FORGER, &url, piece_count)
        .await
        .expect("the forger joins the swarm");

    let p2 = cluster.peer(2);
    let out2 = cluster.dir().join("p2.out");
    let o = cluster
        .run_dfget(p2, &url, &out2, None)
        .await
        .expect("dfget through peer-2");
    check_dfget("peer-2", &o).expect("peer-2 download with a forger in the swarm");
    assert_eq!(
        file_sha256_hex_async(&out2).await.expect("sha256"),
        expected,
        "peer-2 wrote a wrong file: after the restarts it did not check pieces against digests"
    );
    let s = p2.stats().await.expect("Stats of peer-2");
    assert!(
        fake.pieces_sent() > 0,
        "the forger sent no piece (connections {}); the scheduler should have offered it",
        fake.connections()
    );
    assert!(
        s.pieces_forged > 0,
        "the forger sent {} forged pieces to peer-2 but peer-2 counts none: {s:?}",
        fake.pieces_sent()
    );
    assert_eq!(
        origin.gets_of("/restart.bin"),
        1,
        "the task was fetched from the origin once"
    );
}
