//! Persistence and garbage collection with real processes: a restarted daemon keeps serving
//! the tasks it had finished, resumes a half-done download from the pieces on disk, and its
//! GC evicts least recently used tasks under a small disk limit but never one in use.

use std::path::{Path, PathBuf};
use std::time::Duration;
use testkit::cluster::check_dfget;
use testkit::content::file_sha256_hex_async;
use testkit::{grpc, Cluster, ClusterOptions, Origin};
use wire::task::TaskIdOptions;
use wire::{PieceLayout, TaskId};

const MIB: u64 = 1 << 20;

fn task_of(url: &str) -> TaskId {
    TaskId::from_url(url, &TaskIdOptions::default()).expect("task id")
}

/// Waits until the scheduler lists a done peer of `task` on host `host`.
async fn wait_done_peer(cluster: &Cluster, task: &TaskId, host: &str) {
    for _ in 0..400 {
        if let Ok(info) = grpc::stat_task(cluster.scheduler_addr(), &task.to_hex()).await {
            if info.peers.iter().any(|p| p.host_id == host && p.done) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the scheduler never listed {host} as holding {task}; logs:\n{}",
        cluster.log_tails(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_keeps_and_serves_its_finished_tasks() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 2))
        .await
        .expect("starting the cluster");
    let content = origin.add_file("/kept.bin", 8 * MIB + 777, 71);
    let url = origin.url("/kept.bin");
    let task = task_of(&url);
    cluster
        .download_verified(
            cluster.peer(1),
            &url,
            &cluster.dir().join("a.out"),
            &content,
        )
        .await
        .expect("download through peer-1");
    let served = origin.bytes_served();

    // SIGKILL, same data dir: no chance to write anything at exit.
    cluster.restart_peer(1).await.expect("restarting peer-1");
    wait_done_peer(&cluster, &task, "peer-1").await;

    // peer-2 may only use peers: the restarted peer-1 is the only one holding the task.
    let out = cluster.dir().join("b.out");
    let o = cluster
        .run_dfget_with(
            cluster.peer(2),
            &url,
            &out,
            Some(&content.digest()),
            &["--disable-back-to-source"],
        )
        .await
        .expect("dfget on peer-2");
    check_dfget("peer-2", &o).expect("peer-2 fetches the task from the restarted peer-1");
    assert_eq!(
        file_sha256_hex_async(&out).await.expect("sha256"),
        content.sha256_hex()
    );
    assert_eq!(
        origin.bytes_served(),
        served,
        "the origin must not be asked again"
    );
    let s2 = cluster.peer(2).stats().await.expect("Stats of peer-2");
    assert_eq!(s2.bytes_from_peers, content.size, "{s2:?}");
    let s1 = cluster.peer(1).stats().await.expect("Stats of peer-1");
    assert!(s1.bytes_uploaded >= content.size, "{s1:?}");
    assert_eq!(s1.bytes_from_origin, 0, "{s1:?}");

    // A dfget on the restarted peer itself is served from its disk.
    cluster
        .download_verified(
            cluster.peer(1),
            &url,
            &cluster.dir().join("a2.out"),
            &content,
        )
        .await
        .expect("dfget on the restarted peer-1");
    assert_eq!(origin.bytes_served(), served);
}

/// Pieces the metadata store of a (stopped) daemon recorded for `task`: (bytes, pieces,
/// piece count).
fn recorded(data_dir: &Path, task: &TaskId) -> (u64, u32, u32) {
    let meta = controlplane::store::MetaStore::open(data_dir).expect("opening metadata store");
    let (rec, bits, _) = meta
        .load()
        .expect("reading metadata store")
        .into_iter()
        .find(|(r, _, _)| r.id == task.to_hex())
        .expect("a record of the task");
    let layout = PieceLayout::new(rec.content_length, rec.piece_length).expect("layout");
    let mut bytes = 0;
    let mut pieces = 0;
    for n in 0..layout.piece_count() {
        if bits
            .get(n as usize / 8)
            .is_some_and(|b| b & (1 << (n % 8)) != 0)
        {
            bytes += layout.piece_size(n).expect("piece");
            pieces += 1;
        }
    }
    assert_eq!(pieces, rec.finished_pieces);
    (bytes, pieces, layout.piece_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_killed_midway_resumes_with_only_the_missing_pieces() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 1))
        .await
        .expect("starting the cluster");
    let size = 24 * MIB + 5;
    let content = origin.add_file("/resume.bin", size, 99);
    let url = origin.url("/resume.bin");
    let task = task_of(&url);
    let out = cluster.dir().join("resume.out");

    // A slow download, killed once some but not all of it is stored.
    {
        let dl =
            cluster.run_dfget_with(cluster.peer(1), &url, &out, None, &["--rate-limit", "4MiB"]);
        tokio::pin!(dl);
        loop {
            tokio::select! {
                r = &mut dl => panic!("the rate-limited download ended before the kill: {r:?}"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            let s = cluster.peer(1).stats().await.expect("Stats");
            if s.bytes_from_origin >= 6 * MIB {
                assert!(s.bytes_from_origin < size, "already complete: {s:?}");
                cluster.peer(1).kill();
                break;
            }
        }
        let _ = dl.await;
    }
    let (have, pieces, count) = recorded(&cluster.peer(1).data_dir, &task);
    assert!(
        pieces > 0 && pieces < count,
        "{pieces} of {count} pieces recorded at the kill"
    );
    let served_before = origin.bytes_served();

    cluster.restart_peer(1).await.expect("restarting peer-1");
    cluster
        .download_verified(cluster.peer(1), &url, &out, &content)
        .await
        .expect("resumed download");
    let s = cluster.peer(1).stats().await.expect("Stats");
    assert_eq!(
        s.bytes_from_origin,
        size - have,
        "after the restart only the {} missing pieces are fetched ({pieces} of {count} were kept): {s:?}",
        count - pieces
    );
    let served_after = origin.bytes_served() - served_before;
    assert!(
        served_after < size && served_after >= size - have,
        "the origin sent {served_after} bytes after the restart for {} missing",
        size - have
    );
}

/// A resumed download announces every piece it kept, however many: the run announces the
/// pieces it holds in one burst when it registers, and that burst used to be cut at the
/// 4,096-message queue (the rest dropped silently), so the scheduler never learnt them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_download_announces_all_of_its_more_than_4096_kept_pieces() {
    const PIECE: u64 = 16 << 10;
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 1))
        .await
        .expect("starting the cluster");
    // 5,400 pieces of 16 KiB (the smallest piece length a user may force).
    let size = 5_400 * PIECE - 3;
    let content = origin.add_file("/many.bin", size, 17);
    let url = origin.url("/many.bin");
    let task = TaskId::from_url(
        &url,
        &TaskIdOptions {
            piece_length: PIECE,
            ..TaskIdOptions::default()
        },
    )
    .expect("task id");
    let out = cluster.dir().join("many.out");
    let piece_arg = PIECE.to_string();
    let args = ["--piece-length", piece_arg.as_str()];

    // A rate-limited download killed once well over 4,096 pieces are stored.
    {
        let mut slow = args.to_vec();
        slow.extend(["--rate-limit", "8MiB"]);
        let dl = cluster.run_dfget_with(cluster.peer(1), &url, &out, None, &slow);
        tokio::pin!(dl);
        loop {
            tokio::select! {
                r = &mut dl => panic!("the rate-limited download ended before the kill: {r:?}"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            let s = cluster.peer(1).stats().await.expect("Stats");
            if s.bytes_from_origin >= 4_700 * PIECE {
                assert!(s.bytes_from_origin < size, "already complete: {s:?}");
                cluster.peer(1).kill();
                break;
            }
        }
        let _ = dl.await;
    }
    let (_, kept, count) = recorded(&cluster.peer(1).data_dir, &task);
    assert_eq!(count, 5_400);
    assert!(
        kept > 4_096 && kept < count,
        "{kept} of {count} pieces recorded at the kill: the test needs more than 4,096 kept"
    );

    cluster.restart_peer(1).await.expect("restarting peer-1");
    let o = cluster
        .run_dfget_with(cluster.peer(1), &url, &out, None, &args)
        .await
        .expect("running dfget");
    check_dfget("resumed dfget", &o).expect("resumed download");
    assert_eq!(
        file_sha256_hex_async(&out).await.expect("sha256"),
        content.sha256_hex()
    );
    // Every piece was announced: the kept ones at registration, the rest as they arrived.
    let mut learnt = 0;
    for _ in 0..400 {
        let info = grpc::stat_task(cluster.scheduler_addr(), &task.to_hex())
            .await
            .expect("StatTask");
        learnt = info
            .peers
            .iter()
            .filter(|p| p.host_id == "peer-1")
            .map(|p| p.finished_pieces)
            .max()
            .unwrap_or(0);
        if learnt == count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        learnt,
        count,
        "the scheduler learnt {learnt} of {count} pieces of the resumed peer ({kept} kept); logs:\n{}",
        cluster.log_tails(40)
    );
}

fn write_gc_config(dir: &Path) -> PathBuf {
    let path = dir.join("gc.yaml");
    std::fs::write(
        &path,
        "gc:\n  interval: 100ms\n  task_ttl: 0s\n  high_watermark_bytes: 20MiB\n  \
         low_watermark_bytes: 4MiB\n  high_watermark_percent: 0\n",
    )
    .expect("writing the gc config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_evicts_old_finished_tasks_but_never_the_one_being_downloaded() {
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cfg = write_gc_config(cfg_dir.path());
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 1,
        daemon_args: vec!["--config".into(), cfg.display().to_string()],
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let p = cluster.peer(1);
    let a = origin.add_file("/a.bin", 6 * MIB, 1);
    let b = origin.add_file("/b.bin", 6 * MIB, 2);
    let d = origin.add_file("/d.bin", 12 * MIB, 3);
    let dir = cluster.dir().to_path_buf();
    cluster
        .download_verified(p, &origin.url("/a.bin"), &dir.join("a.out"), &a)
        .await
        .expect("a");
    cluster
        .download_verified(p, &origin.url("/b.bin"), &dir.join("b.out"), &b)
        .await
        .expect("b");
    assert_eq!(
        p.stats().await.expect("Stats").tasks,
        2,
        "12 MiB is under the 20 MiB mark"
    );

    // d (12 MiB) takes the total to 24 MiB > 20: GC wants 20 MiB freed (down to 4), which
    // would take d too, but d is being downloaded.
    let d_out = dir.join("d.out");
    let (d_url, d_digest) = (origin.url("/d.bin"), d.digest());
    {
        let dl = cluster.run_dfget_with(
            p,
            &d_url,
            &d_out,
            Some(&d_digest),
            &["--rate-limit", "3MiB"],
        );
        tokio::pin!(dl);
        let mut evicted_while_running = false;
        let o = loop {
            tokio::select! {
                r = &mut dl => break r.expect("dfget d"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if !evicted_while_running && p.stats().await.expect("Stats").tasks == 1 {
                evicted_while_running = true;
            }
        };
        check_dfget("peer-1", &o).expect("d is downloaded while GC runs");
        assert!(
            evicted_while_running,
            "a and b should have been evicted while d was still downloading"
        );
    }
    assert_eq!(
        file_sha256_hex_async(&d_out).await.expect("sha256"),
        d.sha256_hex()
    );
    assert!(!p
        .data_dir
        .join(format!("{}.data", task_of(&origin.url("/a.bin"))))
        .exists());
    assert!(!p
        .data_dir
        .join(format!("{}.data", task_of(&origin.url("/b.bin"))))
        .exists());
    assert!(p
        .data_dir
        .join(format!("{}.data", task_of(&origin.url("/d.bin"))))
        .exists());

    // d is still stored (served from disk), a was evicted (the origin is asked again).
    let served = origin.bytes_served();
    cluster
        .download_verified(p, &origin.url("/d.bin"), &dir.join("d2.out"), &d)
        .await
        .expect("d again");
    assert_eq!(origin.bytes_served(), served, "d must still be stored");
    cluster
        .download_verified(p, &origin.url("/a.bin"), &dir.join("a2.out"), &a)
        .await
        .expect("a again");
    assert_eq!(origin.bytes_served(), served + a.size, "a was evicted");
}
