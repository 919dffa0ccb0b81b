//! Fault matrix, scheduler side, and the degraded swarm: the scheduler down before a
//! download (back to source with a clear log line, or a precise error with
//! `--disable-back-to-source`), killed while two peers download from a seed (they finish
//! with the parents they know, without going to the origin), and many new downloads while
//! it is down (the origin sees at most `download.origin_concurrency` of them at once).

use std::time::Duration;
use testkit::cluster::check_dfget;
use testkit::content::file_sha256_hex;
use testkit::origin::Fault;
use testkit::poll::{daemon_config, wait_until};
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_scheduler_down_dfget_goes_to_the_origin_or_fails_precisely() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 1))
        .await
        .expect("starting the cluster");
    cluster.scheduler().kill();
    let p1 = cluster.peer(1);

    let c = origin.add_file("/a.bin", 5 * MIB + 5, 31);
    cluster
        .download_verified(p1, &origin.url("/a.bin"), &cluster.dir().join("a.out"), &c)
        .await
        .expect("dfget with the scheduler down should fall back to the origin");
    let log = p1.proc.log_tail(200);
    assert!(
        log.contains("fetching from the origin directly"),
        "peer-1 should say it fetches from the origin because no scheduler answers:\n{log}"
    );

    let d = origin.add_file("/b.bin", MIB, 32);
    let out = cluster.dir().join("b.out");
    let o = cluster
        .run_dfget_with(
            p1,
            &origin.url("/b.bin"),
            &out,
            Some(&format!("sha256:{}", d.sha256_hex())),
            &["--disable-back-to-source"],
        )
        .await
        .expect("running dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "no scheduler and no back-to-source must fail: {stderr}"
    );
    assert!(
        stderr.contains("back-to-source is disabled") && stderr.contains("scheduler"),
        "the error should name the unreachable scheduler and the disabled back-to-source: \
         {stderr}"
    );
    assert!(!out.exists(), "a failed dfget left {}", out.display());
    assert_eq!(
        origin.gets_of("/b.bin"),
        0,
        "--disable-back-to-source reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_finish_from_known_parents_when_the_scheduler_dies_mid_download() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 2))
        .await
        .expect("starting the cluster");
    let slow = cluster.slow_upload_config("4MiB").expect("config");
    cluster.add_daemon(true, &slow).await.expect("seed-1");
    let (p1, p2) = (cluster.peer(1), cluster.peer(2));
    let size = 20 * MIB + 11;
    let c = origin.add_file("/d.bin", size, 33);
    let url = origin.url("/d.bin");

    let (o1, o2) = (cluster.dir().join("d1.out"), cluster.dir().join("d2.out"));
    let (r1, r2, killed) = tokio::join!(
        cluster.download_verified(p1, &url, &o1, &c),
        cluster.download_verified(p2, &url, &o2, &c),
        async {
            wait_until(
                "both peers receive pieces",
                Duration::from_secs(30),
                || async move {
                    let (s1, s2) = (p1.stats().await?, p2.stats().await?);
                    Ok(s1.bytes_from_seed + s1.bytes_from_peers > 0
                        && s2.bytes_from_seed + s2.bytes_from_peers > 0)
                },
            )
            .await?;
            let at_kill = (p1.stats().await?, p2.stats().await?);
            cluster.scheduler().kill();
            anyhow::Ok(at_kill)
        }
    );
    let (s1, s2) = killed.expect("waiting for both transfers");
    r1.unwrap_or_else(|e| panic!("peer-1 with the scheduler killed: {e:#}"));
    r2.unwrap_or_else(|e| panic!("peer-2 with the scheduler killed: {e:#}"));
    let got = |s: &wire::proto::dfdaemon::StatsResponse| {
        s.bytes_from_seed + s.bytes_from_peers + s.bytes_from_origin
    };
    assert!(
        got(&s1) < size && got(&s2) < size,
        "the scheduler was killed after a peer had the whole file: {s1:?} {s2:?}"
    );
    assert_eq!(
        origin.bytes_served(),
        size,
        "after the scheduler died the peers kept fetching from the seed and each other; \
         only the seed should have read the origin: {:#?}",
        origin.request_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_downloads_with_the_scheduler_down_do_not_stampede_the_origin() {
    const LIMIT: u64 = 2;
    const FILES: u64 = 8;
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("starting the cluster");
    let cfg = daemon_config(
        cluster.dir(),
        "bounded.yaml",
        &format!("download:\n  origin_concurrency: {LIMIT}\n"),
    )
    .expect("config");
    cluster.add_daemon(false, &cfg).await.expect("peer-1");
    cluster.scheduler().kill();
    let p1 = cluster.peer(1);

    let mut jobs = Vec::new();
    for i in 0..FILES {
        let path = format!("/n{i}.bin");
        let c = origin.add_file(&path, MIB + i, 40 + i);
        // Slow enough (a second or more each) that the downloads overlap: all eight start at
        // once, so the origin sees LIMIT of them at a time whenever the limit admits that many.
        origin.set_fault(&path, Fault::Slow { bytes_per_sec: MIB }, None);
        let out = cluster.dir().join(format!("n{i}.out"));
        let url = origin.url(&path);
        let cluster = &cluster;
        jobs.push(async move {
            let o = cluster
                .run_dfget(p1, &url, &out, Some(&format!("sha256:{}", c.sha256_hex())))
                .await?;
            check_dfget("peer-1", &o)?;
            anyhow::ensure!(
                file_sha256_hex(&out)? == c.sha256_hex(),
                "{path}: wrong file"
            );
            anyhow::Ok(())
        });
    }
    for r in futures::future::join_all(jobs).await {
        r.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(30)));
    }
    assert_eq!(
        origin.faulted_requests(),
        FILES,
        "every file was fetched once"
    );
    // Bounded, and the bound is what held them (the downloads did overlap): exactly LIMIT at
    // a time at most.
    assert_eq!(
        origin.max_in_flight(),
        LIMIT,
        "{FILES} concurrent downloads with the scheduler down reached the origin {} at a time \
         at most; download.origin_concurrency is {LIMIT}",
        origin.max_in_flight()
    );
}

/// A sample of the scheduler's `/metrics` (0 when absent).
async fn scheduler_metric(cluster: &Cluster, series: &str) -> anyhow::Result<f64> {
    let text = testkit::poll::scrape(cluster.schedulers()[0].metrics_addr).await?;
    Ok(testkit::poll::metric(&text, series).unwrap_or(0.0))
}

/// The scheduler is killed and started again (an empty state) while three peers download
/// from a rate-limited seed. The daemons announce their hosts again, re-register the
/// downloads they are running (with the task's size and the pieces they hold) and announce
/// the tasks they hold: every download finishes with the right sha256, the new scheduler
/// hears the running downloads' pieces, triggers no seed and sends nobody to the origin
/// (the origin served the seed's one copy), and a download started afterwards comes from
/// the peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_restarted_mid_burst_resumes_the_swarm_without_a_second_source() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("starting the cluster");
    let slow = cluster.slow_upload_config("3MiB").expect("config");
    cluster.add_daemon(true, &slow).await.expect("seed-1");
    for n in 1..=4 {
        cluster
            .add_daemon(false, &slow)
            .await
            .unwrap_or_else(|e| panic!("peer-{n}: {e:#}"));
    }
    let size = 24 * MIB + 13;
    let c = origin.add_file("/r.bin", size, 35);
    let url = origin.url("/r.bin");
    let peers: Vec<_> = (1..=3).map(|n| cluster.peer(n)).collect();
    let outs: Vec<_> = (1..=3)
        .map(|n| cluster.dir().join(format!("r{n}.out")))
        .collect();

    let cl = &cluster;
    let downloads = futures::future::join_all(
        peers
            .iter()
            .zip(&outs)
            .map(|(p, o)| cl.download_verified(p, &url, o, &c)),
    );
    let restart = async {
        let peers = &peers;
        wait_until(
            "every peer receives pieces",
            Duration::from_secs(30),
            || async move {
                let mut all = true;
                for p in peers {
                    let s = p.stats().await?;
                    all &= s.bytes_from_seed + s.bytes_from_peers > 0;
                }
                Ok(all)
            },
        )
        .await?;
        cl.restart_scheduler(1).await?;
        let mut at_restart = Vec::new();
        for p in peers {
            at_restart.push(p.stats().await?);
        }
        anyhow::Ok(at_restart)
    };
    let (results, at_restart) = tokio::join!(downloads, restart);
    let at_restart = at_restart.expect("restarting the scheduler mid-burst");
    for (n, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| {
            cluster.dump_logs();
            panic!("peer-{} with the scheduler restarted: {e:#}", n + 1)
        });
    }
    assert!(
        at_restart
            .iter()
            .all(|s| s.bytes_from_seed + s.bytes_from_peers < size),
        "a peer had the whole file when the scheduler came back: {at_restart:?}"
    );
    // The running downloads came back to the new scheduler with their pieces.
    let pieces_heard = scheduler_metric(
        &cluster,
        "damselfly_scheduler_announcements_total{kind=\"piece_finished\"}",
    )
    .await
    .expect("scheduler metrics");
    assert!(
        pieces_heard > 0.0,
        "the restarted scheduler heard of no piece: the running downloads did not register again"
    );
    // A download after the burst: the new scheduler knows who holds the task.
    let p4 = cluster.peer(4);
    cluster
        .download_verified(p4, &url, &cluster.dir().join("r4.out"), &c)
        .await
        .unwrap_or_else(|e| {
            cluster.dump_logs();
            panic!("peer-4 after the restart: {e:#}")
        });
    let s4 = p4.stats().await.expect("Stats of peer-4");
    assert_eq!(
        s4.bytes_from_origin, 0,
        "peer-4 went to the origin although peers hold the task: {s4:?}"
    );
    let triggers = scheduler_metric(
        &cluster,
        "damselfly_scheduler_responses_total{kind=\"host_command\"}",
    )
    .await
    .expect("scheduler metrics");
    let to_origin = scheduler_metric(
        &cluster,
        "damselfly_scheduler_responses_total{kind=\"need_back_to_source\"}",
    )
    .await
    .expect("scheduler metrics");
    assert_eq!(
        (triggers, to_origin),
        (0.0, 0.0),
        "the restarted scheduler triggered a seed or sent peers to the origin"
    );
    assert_eq!(
        origin.bytes_served(),
        size,
        "only the seed's one copy should have come from the origin: {:#?}",
        origin.request_log()
    );
}
