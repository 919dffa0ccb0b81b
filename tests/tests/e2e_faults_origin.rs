//! Fault matrix, origin side: an origin answering 5xx (for a while, or for good), streaming
//! slowly, closing the connection early, or announcing a wrong length; and a daemon whose
//! disk is full. Every case ends either with the right file (digest checked) or with a
//! precise error and no output file — never exit 0 with a wrong file.

use std::path::Path;
use std::process::Output;
use std::time::Duration;
use testkit::cluster::check_dfget;
use testkit::content::file_sha256_hex;
use testkit::origin::Fault;
use testkit::{Cluster, ClusterOptions, Content, Origin};

const MIB: u64 = 1 << 20;

/// A scheduler and one peer, no seed: the peer goes back to the origin itself, so the
/// origin's faults reach it directly.
async fn cluster() -> Cluster {
    Cluster::start(ClusterOptions::sized(0, 1))
        .await
        .expect("starting the cluster")
}

async fn dfget(cluster: &Cluster, url: &str, out: &Path, content: &Content) -> Output {
    cluster
        .run_dfget(
            cluster.peer(1),
            url,
            out,
            Some(&format!("sha256:{}", content.sha256_hex())),
        )
        .await
        .expect("running dfget")
}

fn assert_ok(cluster: &Cluster, o: &Output, out: &Path, content: &Content) {
    check_dfget("peer-1", o).unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(30)));
    assert_eq!(
        file_sha256_hex(out).expect("hashing the output"),
        content.sha256_hex(),
        "dfget exited 0 but {} is not the file",
        out.display()
    );
}

/// dfget failed, said `needle` on stderr, and left no output file.
fn assert_failed(o: &Output, out: &Path, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "dfget should have failed but exited 0; stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "dfget failed ({}) but its error does not say {needle:?}: {stderr}",
        o.status
    );
    assert!(
        !out.exists(),
        "dfget failed but left an output file {}",
        out.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_the_origin_recovers_or_reported_when_it_does_not() {
    let origin = Origin::start().await.expect("origin");
    let cluster = cluster().await;

    // Two 503s, then the origin recovers: the daemon retries and gets the file.
    let c = origin.add_file("/flaky.bin", 3 * MIB + 17, 1);
    origin.set_fault("/flaky.bin", Fault::Status(503), Some(2));
    let out = cluster.dir().join("flaky.out");
    let o = dfget(&cluster, &origin.url("/flaky.bin"), &out, &c).await;
    assert_ok(&cluster, &o, &out, &c);
    assert_eq!(
        origin.faulted_requests(),
        2,
        "both 503s should have been served"
    );
    assert_eq!(
        origin.gets_of("/flaky.bin"),
        3,
        "two failed GETs and one good one: {:#?}",
        origin.request_log()
    );

    // 500 for good: dfget fails with the origin's status after the configured retries.
    let c = origin.add_file("/broken.bin", MIB, 2);
    origin.set_fault("/broken.bin", Fault::Status(500), None);
    let out = cluster.dir().join("broken.out");
    let o = dfget(&cluster, &origin.url("/broken.bin"), &out, &c).await;
    assert_failed(&o, &out, "500 Internal Server Error");
    assert_failed(&o, &out, "after 3 retries");
    assert_eq!(origin.gets_of("/broken.bin"), 4, "one try and 3 retries");

    // A 404 is not retried.
    let out = cluster.dir().join("missing.out");
    let o = dfget(&cluster, &origin.url("/missing.bin"), &out, &c).await;
    assert_failed(&o, &out, "404 Not Found");
    assert_eq!(origin.gets_of("/missing.bin"), 1, "a 404 is final");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_bodies_are_resumed_or_reported_never_delivered() {
    let origin = Origin::start().await.expect("origin");
    let cluster = cluster().await;

    // The first answer closes after 5 MiB: the daemon resumes with a Range request.
    let size = 16 * MIB + 999;
    let c = origin.add_file("/cut-once.bin", size, 3);
    origin.set_fault("/cut-once.bin", Fault::Truncate { after: 5 * MIB }, Some(1));
    let out = cluster.dir().join("cut-once.out");
    let o = dfget(&cluster, &origin.url("/cut-once.bin"), &out, &c).await;
    assert_ok(&cluster, &o, &out, &c);
    let log = origin.request_log();
    let resumed = log
        .iter()
        .filter(|r| r.path == "/cut-once.bin")
        .filter_map(|r| r.range.as_deref())
        .any(|r| r != "bytes=0-" && r.starts_with("bytes="));
    assert!(
        resumed,
        "after the cut the daemon should resume from the first missing piece: {log:#?}"
    );
    assert!(
        origin.bytes_served() < 2 * size,
        "resuming should not fetch the file twice: {} bytes served for {size}",
        origin.bytes_served()
    );

    // Every answer closes after 100 KiB (less than a piece): a precise error, no file.
    let c = origin.add_file("/cut-always.bin", 8 * MIB, 4);
    origin.set_fault(
        "/cut-always.bin",
        Fault::Truncate { after: 100 << 10 },
        None,
    );
    let out = cluster.dir().join("cut-always.out");
    let o = dfget(&cluster, &origin.url("/cut-always.bin"), &out, &c).await;
    assert_failed(&o, &out, "origin transfer failed after 3 retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_content_lengths_never_give_a_wrong_file() {
    let origin = Origin::start().await.expect("origin");
    let cluster = cluster().await;

    // Longer than the body (every time): the body always ends early; dfget fails.
    let c = origin.add_file("/long.bin", 4 * MIB + 5, 5);
    origin.set_fault("/long.bin", Fault::WrongLength { delta: 1 << 20 }, None);
    let out = cluster.dir().join("long.out");
    let o = dfget(&cluster, &origin.url("/long.bin"), &out, &c).await;
    assert_failed(&o, &out, "origin");

    // Longer once, then right: the size changed between answers, which the daemon reports;
    // the next try starts afresh and gets the file.
    let c = origin.add_file("/long-once.bin", 4 * MIB + 5, 6);
    origin.set_fault(
        "/long-once.bin",
        Fault::WrongLength { delta: 1 << 20 },
        Some(1),
    );
    let out = cluster.dir().join("long-once.out");
    let o = dfget(&cluster, &origin.url("/long-once.bin"), &out, &c).await;
    assert_failed(&o, &out, "content length changed");
    let o = dfget(&cluster, &origin.url("/long-once.bin"), &out, &c).await;
    assert_ok(&cluster, &o, &out, &c);

    // Shorter, and self-consistent: only the digest can tell; dfget refuses the file.
    let c = origin.add_file("/short.bin", 4 * MIB + 5, 7);
    origin.set_fault("/short.bin", Fault::WrongLength { delta: -1000 }, None);
    let out = cluster.dir().join("short.out");
    let o = dfget(&cluster, &origin.url("/short.bin"), &out, &c).await;
    assert_failed(&o, &out, "digest mismatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_origin_still_gives_the_whole_file() {
    let origin = Origin::start().await.expect("origin");
    let cluster = cluster().await;
    let c = origin.add_file("/slow.bin", 3 * MIB + 3, 8);
    origin.set_fault(
        "/slow.bin",
        Fault::Slow {
            bytes_per_sec: 2 * MIB,
        },
        None,
    );
    let out = cluster.dir().join("slow.out");
    let o = dfget(&cluster, &origin.url("/slow.bin"), &out, &c).await;
    assert_ok(&cluster, &o, &out, &c);
    assert_eq!(
        origin.gets_of("/slow.bin"),
        1,
        "a slow but steady origin needs no retry: {:#?}",
        origin.request_log()
    );
}

/// Unmounts a tmpfs when dropped (also when the test panics), before the cluster's temp dir
/// is removed.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a 4 MiB tmpfs on `peer-1`'s data dir (before the daemon starts); `None` (skipped
/// through `needs`) when this machine cannot mount one.
fn small_disk_for_peer_1(cluster: &Cluster, test: &str) -> Option<Mount> {
    let data = cluster.dir().join("peer-1").join("data");
    std::fs::create_dir_all(&data).expect("creating the data dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&data)
        .output();
    match mounted {
        Ok(o) if o.status.success() => {
            needs::found(test);
            Some(Mount(data))
        }
        Ok(o) => {
            needs::skip(
                test,
                &format!(
                    "cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
            None
        }
        Err(e) => {
            needs::skip(
                test,
                &format!("no mount command (apt-get install -y mount): {e}"),
            );
            None
        }
    }
}

/// dfget's exit code for a full disk (cli README, "Exit codes").
const EXIT_NO_SPACE: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_download_cleanly_and_frees_its_space() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("starting the cluster");
    // peer-1's data dir is a 4 MiB tmpfs.
    let Some(_mount) = small_disk_for_peer_1(
        &cluster,
        "a_full_disk_fails_the_download_cleanly_and_frees_its_space",
    ) else {
        return;
    };
    cluster
        .add_daemon(false, &[])
        .await
        .expect("starting peer-1");

    let big = origin.add_file("/big.bin", 16 * MIB, 9);
    let out = cluster.dir().join("big.out");
    let o = dfget(&cluster, &origin.url("/big.bin"), &out, &big).await;
    assert_failed(&o, &out, "No space left on device");
    assert_eq!(
        o.status.code(),
        Some(EXIT_NO_SPACE),
        "a full disk has its own exit code; stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The failed task's file is gone: a file that fits downloads fine.
    let small = origin.add_file("/small.bin", 2 * MIB, 10);
    let out = cluster.dir().join("small.out");
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        dfget(&cluster, &origin.url("/small.bin"), &out, &small),
    )
    .await
    .expect("dfget of the small file");
    assert_ok(&cluster, &o, &out, &small);
}

/// The same full disk on a peer that fetches from a seed: the data plane's write fails, it
/// reports the failure over the plane bridge by class, and dfget exits with the disk-full
/// code (not the generic failure) with the OS error's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_a_peer_fetching_from_a_seed_has_the_disk_full_exit_code() {
    let test = "a_full_disk_on_a_peer_fetching_from_a_seed_has_the_disk_full_exit_code";
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(1, 0))
        .await
        .expect("starting the cluster");
    let Some(_mount) = small_disk_for_peer_1(&cluster, test) else {
        return;
    };
    cluster
        .add_daemon(false, &[])
        .await
        .expect("starting peer-1");
    let big = origin.add_file("/big-from-seed.bin", 16 * MIB, 11);
    let out = cluster.dir().join("big-from-seed.out");
    let o = dfget(&cluster, &origin.url("/big-from-seed.bin"), &out, &big).await;
    assert_failed(&o, &out, "No space left on device");
    assert_eq!(
        o.status.code(),
        Some(EXIT_NO_SPACE),
        "a full disk has its own exit code; stderr: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        cluster.log_tails(30)
    );
}
