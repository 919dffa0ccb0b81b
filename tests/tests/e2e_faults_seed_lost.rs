//! Issue 23: the only seed peer killed mid-burst while the origin is up. Pieces the
//! (super-seeding) seed never sent exist nowhere but at the origin; the scheduler must send
//! peers there for those pieces only (bounded Range requests), so that every download
//! finishes and the origin serves less than two copies. Nothing here asserts a duration: the
//! kill waits for bytes to flow by polling counters.

use std::time::Duration;
use testkit::poll::{daemon_config, metric, scrape, wait_until};
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_seed_killed_mid_burst_costs_the_origin_only_the_lost_pieces() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("starting the cluster");
    // The seed uploads slowly, so that it dies with most pieces never sent to anyone.
    let slow = cluster.slow_upload_config("2MiB").expect("config");
    cluster.add_daemon(true, &slow).await.expect("seed-1");
    for n in 1..=3 {
        cluster
            .add_daemon(false, &[])
            .await
            .unwrap_or_else(|e| panic!("peer-{n}: {e:#}"));
    }
    let peers: Vec<_> = (1..=3).map(|n| cluster.peer(n)).collect();
    let seed = cluster.seed(1);
    let size = 24 * MIB + 5;
    let content = origin.add_file("/lost.bin", size, 31);
    let url = origin.url("/lost.bin");
    let outs: Vec<_> = (1..=3)
        .map(|n| cluster.dir().join(format!("p{n}.out")))
        .collect();

    let cl = &cluster;
    let (r1, r2, r3, killed) = tokio::join!(
        cl.download_verified(peers[0], &url, &outs[0], &content),
        cl.download_verified(peers[1], &url, &outs[1], &content),
        cl.download_verified(peers[2], &url, &outs[2], &content),
        async {
            let peers = &peers;
            wait_until(
                "the peers receive 2 MiB from the seed",
                Duration::from_secs(30),
                || async move {
                    let mut from_seed = 0;
                    for p in peers {
                        from_seed += p.stats().await?.bytes_from_seed;
                    }
                    Ok(from_seed >= 2 * MIB)
                },
            )
            .await?;
            // What each peer holds before the kill (it only grows): a lower bound of what
            // the peers held when the seed died.
            let mut held = 0;
            for p in peers {
                let s = p.stats().await?;
                held = held.max(s.bytes_from_seed + s.bytes_from_peers);
            }
            let uploaded = seed.stats().await?.bytes_uploaded;
            cl.kill(seed);
            anyhow::Ok((uploaded, held))
        }
    );
    let (uploaded, held) = killed.expect("killing the seed mid-burst");
    for (n, r) in [r1, r2, r3].into_iter().enumerate() {
        r.unwrap_or_else(|e| {
            cluster.dump_logs();
            panic!(
                "peer-{} should finish after the only seed died: {e:#}",
                n + 1
            )
        });
    }
    assert!(
        uploaded < size,
        "the seed was killed after it had uploaded a whole copy ({uploaded} of {size} bytes)"
    );
    assert!(!seed.is_running());

    let log: Vec<_> = origin
        .request_log()
        .into_iter()
        .filter(|r| r.path == "/lost.bin")
        .collect();
    // The seed's first request is open-ended (`bytes=0-`: the size is unknown); every later
    // request, made by the peers for the lost pieces, names a bounded run.
    let open_ended = log
        .iter()
        .filter(|r| {
            r.range
                .as_deref()
                .is_none_or(|v| v.trim_end().ends_with('-'))
        })
        .count();
    assert_eq!(
        open_ended, 1,
        "only the seed's first request may be open-ended: {log:#?}"
    );
    assert!(
        log.len() >= 2,
        "the peers should have fetched the lost pieces from the origin: {log:#?}"
    );
    // The peers' requests: each lost piece asked once (no two runs overlap), and none of
    // the pieces some peer already held (the runs add up to at most what the best-stocked
    // peer lacked before the kill).
    let mut runs: Vec<(u64, u64)> = log
        .iter()
        .filter_map(|r| {
            let (a, b) = r
                .range
                .as_deref()?
                .trim()
                .strip_prefix("bytes=")?
                .split_once('-')?;
            Some((a.parse().ok()?, b.parse::<u64>().ok()? + 1))
        })
        .collect();
    runs.sort_unstable();
    assert!(
        runs.windows(2).all(|w| w[0].1 <= w[1].0),
        "a piece was asked of the origin twice: {runs:?}"
    );
    let asked: u64 = runs.iter().map(|(a, b)| b - a).sum();
    assert!(
        asked <= size - held,
        "the peers asked the origin for {asked} bytes, more than the {} some peer lacked \
         before the seed died: pieces a peer held were fetched again ({runs:?})",
        size - held
    );
    let served = origin.bytes_served();
    assert!(
        served < 2 * size,
        "the origin served {served} bytes for a {size}-byte file: more than the seed's copy \
         plus the pieces no live peer had ({log:#?})"
    );
    let mut partial = 0.0;
    for p in &peers {
        let text = scrape(p.metrics_addr).await.expect("metrics");
        partial += metric(&text, "damselfly_lost_piece_fetches_total").unwrap_or(0.0);
    }
    assert!(
        partial >= 1.0,
        "no peer was told to fetch lost pieces from the origin"
    );
}

/// Sends `sig` (`STOP`, `CONT`) to the daemon's process.
fn signal(d: &testkit::Daemon, sig: &str) {
    d.proc
        .signal(sig)
        .unwrap_or_else(|e| panic!("signalling {}: {e:#}", d.name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_whose_only_parent_stalls_with_the_scheduler_gone_goes_to_the_origin() {
    let origin = Origin::start().await.expect("origin");
    // The piece timeout is far beyond dfget's timeout (60 s) and the idle detection is off
    // (a stall timeout this short needs that): only the stall watchdog
    // (`download.stall_timeout`) can save this download.
    let cluster = Cluster::with_slow_seed_and_peer(
        "data_plane:\n  piece_timeout: 10m\n  parent_idle_timeout: 0s\ndownload:\n  stall_timeout: 2s\n",
    )
    .await
    .expect("starting the cluster");
    let (seed, p1) = (cluster.seed(1), cluster.peer(1));
    let size = 16 * MIB + 9;
    let content = origin.add_file("/stall.bin", size, 32);
    let url = origin.url("/stall.bin");
    let out = cluster.dir().join("p1.out");

    let cl = &cluster;
    let (r, stopped) = tokio::join!(cl.download_verified(p1, &url, &out, &content), async {
        wait_until(
            "peer-1 receives bytes from the seed",
            Duration::from_secs(30),
            || async move { Ok(p1.stats().await?.bytes_from_seed > 0) },
        )
        .await?;
        // The seed stops without closing anything: its streams to peer-1 stay open. The
        // scheduler is killed too, so that nothing but peer-1's own stall watchdog can
        // notice (the scheduler's keepalive would otherwise find the stopped seed).
        signal(seed, "STOP");
        cl.scheduler().kill();
        anyhow::Ok(p1.stats().await?)
    });
    let at_stop = stopped.expect("stopping the seed");
    let result = r;
    signal(seed, "CONT");
    result.unwrap_or_else(|e| {
        cluster.dump_logs();
        panic!("peer-1 should finish from the origin once its parent stalled: {e:#}")
    });
    assert!(
        at_stop.bytes_from_seed < size,
        "the seed stopped after peer-1 had everything ({at_stop:?})"
    );
    let s = p1.stats().await.expect("Stats of peer-1");
    assert!(
        s.bytes_from_origin > 0,
        "peer-1 should have fetched the rest from the origin: {s:?}"
    );
    let text = scrape(p1.metrics_addr).await.expect("metrics");
    let stalls = metric(&text, "damselfly_download_stalls_total").unwrap_or(0.0);
    // No scheduler: the first stall goes to the origin for what is missing.
    assert!(
        stalls >= 1.0,
        "the stall watchdog should have fired, saw {stalls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_parent_is_dropped_by_the_piece_timeout_and_replaced() {
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(0, 0))
        .await
        .expect("starting the cluster");
    let slow = cluster.slow_upload_config("2MiB").expect("config");
    // A short piece timeout, and a stall watchdog that never fires in this test: only the
    // piece timeout can tell the stopped parent from a slow one.
    let peer_cfg = daemon_config(
        cluster.dir(),
        "piece-timeout.yaml",
        "data_plane:\n  piece_timeout: 2s\ndownload:\n  stall_timeout: 10m\n",
    )
    .expect("config");
    cluster.add_daemon(true, &slow).await.expect("seed-1");
    cluster.add_daemon(true, &slow).await.expect("seed-2");
    cluster.add_daemon(false, &peer_cfg).await.expect("peer-1");
    let p1 = cluster.peer(1);
    let size = 16 * MIB + 11;
    let content = origin.add_file("/stalled.bin", size, 33);
    let url = origin.url("/stalled.bin");
    let out = cluster.dir().join("p1.out");

    let cl = &cluster;
    let (r, stopped) = tokio::join!(cl.download_verified(p1, &url, &out, &content), async {
        let victim = cl.serving_seed(p1).await?;
        let at_stop = p1.stats().await?;
        signal(victim, "STOP");
        anyhow::Ok((victim, at_stop))
    });
    let (victim, at_stop) = stopped.expect("stopping the serving seed");
    let result = r;
    signal(victim, "CONT");
    result.unwrap_or_else(|e| {
        cluster.dump_logs();
        panic!("peer-1 should finish after its parent stalled: {e:#}")
    });
    assert!(
        at_stop.bytes_from_seed < size,
        "{} stopped after peer-1 had everything ({at_stop:?})",
        victim.name
    );
    let log = std::fs::read_to_string(p1.proc.log_path()).expect("peer-1's log");
    let dropped = log.lines().any(|l| {
        l.contains("parent dropped: no response within")
            && l.contains(&format!("parent={}", victim.name))
    });
    assert!(
        dropped,
        "peer-1 should have dropped the stopped {} on the piece timeout:\n{}",
        victim.name,
        p1.proc.log_tail(30)
    );
    // Counted as bad: the reschedule that replaces it names it.
    let sched_log =
        std::fs::read_to_string(cluster.scheduler().log_path()).expect("the scheduler's log");
    assert!(
        sched_log.lines().any(|l| l.contains("reschedule")
            && l.contains("peer-1")
            && l.contains(&format!("\"{}\"", victim.name))),
        "peer-1 should have reported the stopped {} as a bad parent:\n{}",
        victim.name,
        cluster.scheduler().log_tail(30)
    );
}

/// `need_back_to_source` responses the scheduler has sent so far.
async fn back_to_source_sent(cluster: &Cluster) -> anyhow::Result<f64> {
    let text = scrape(cluster.schedulers()[0].metrics_addr).await?;
    Ok(metric(
        &text,
        "damselfly_scheduler_responses_total{kind=\"need_back_to_source\"}",
    )
    .unwrap_or(0.0))
}

/// A parent dies while its child is stopped, so that the child wakes up to both the
/// scheduler's "fetch the lost pieces" and its own dead connection (which makes it ask again
/// and be sent back to the origin for everything missing). The origin must be asked for
/// each missing byte once: the lost pieces already on their way are not fetched a second
/// time by the whole-task fetch (it used to, sending the origin up to twice the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_parents_missing_pieces_are_asked_of_the_origin_once() {
    let origin = Origin::start().await.expect("origin");
    let size = 24 * MIB + 3;
    // peer-1 gets the file from the origin (there is no seed).
    let (cluster, content, url) = Cluster::with_slow_parent(&origin, "/once.bin", size, 34)
        .await
        .expect("a cluster with a slow parent");
    let (p1, p2) = (cluster.peer(1), cluster.peer(2));
    let served_before = origin.bytes_served();
    let requests_before = origin.request_log().len();

    let cl = &cluster;
    let out2 = cluster.dir().join("p2.out");
    let (r, killed) = tokio::join!(cl.download_verified(p2, &url, &out2, &content), async {
        wait_until(
            "peer-2 receives bytes from peer-1",
            Duration::from_secs(30),
            || async move { Ok(p2.stats().await?.bytes_from_peers > 0) },
        )
        .await?;
        let sent = back_to_source_sent(cl).await?;
        signal(p2, "STOP");
        cl.kill(p1);
        // The scheduler sees peer-1 leave and sends the stopped peer-2 to the origin for the
        // pieces nobody else has.
        let waited = wait_until(
            "the scheduler sends peer-2 to the origin for the lost pieces",
            Duration::from_secs(30),
            || async move { Ok(back_to_source_sent(cl).await? > sent) },
        )
        .await;
        signal(p2, "CONT");
        waited?;
        anyhow::Ok(())
    });
    killed.expect("killing peer-1 while peer-2 is stopped");
    r.unwrap_or_else(|e| {
        cluster.dump_logs();
        panic!("peer-2 should finish after losing its parent: {e:#}")
    });
    let s = p2.stats().await.expect("Stats of peer-2");
    let served = origin.bytes_served() - served_before;
    let log: Vec<_> = origin.request_log().split_off(requests_before);
    assert!(
        s.bytes_from_peers > 0 && s.bytes_from_peers < size,
        "peer-2 should have some pieces from peer-1 and not all: {s:?}"
    );
    // Every byte peer-2 did not get from peer-1, once, and nothing else.
    assert_eq!(
        served,
        size - s.bytes_from_peers,
        "the origin served {served} bytes for the {} peer-2 lacked: {log:#?}",
        size - s.bytes_from_peers
    );
    assert!(
        log.iter().all(|r| r
            .range
            .as_deref()
            .is_some_and(|v| !v.trim_end().ends_with('-'))),
        "every request for missing pieces names a bounded run: {log:#?}"
    );
}

/// The only seed stalls (SIGSTOP: its connections stay open, so the scheduler still counts
/// it as live) while the scheduler runs. The peer drops it on its default
/// `data_plane.parent_idle_timeout` (the piece timeout and the stall watchdog are 10 min
/// here, beyond dfget's timeout: only the idle detection can act) and tells the scheduler,
/// which sends it to the origin for what it lacks at once, not when the seed's connection
/// finally times out there (HTTP/2 keepalive, 20–40 s): the reschedule names the stalled
/// seed, and the peer's bytes are the seed's plus the origin's, exactly the file. This is
/// issue 23's bound on idleness checked on counters, not a clock: with the piece timeout
/// and the watchdog out of reach, the bytes from sources other than the stopped seed grow
/// after the stop, and the stall watchdog never fired (`damselfly_download_stalls_total`
/// is 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_seed_stalled_sends_the_peer_to_the_origin_for_what_it_lacks() {
    let origin = Origin::start().await.expect("origin");
    // Only the idle detection, at its default, notices the stall.
    let cluster = Cluster::with_slow_seed_and_peer(
        "data_plane:\n  piece_timeout: 10m\ndownload:\n  stall_timeout: 10m\n",
    )
    .await
    .expect("starting the cluster");
    let (seed, p1) = (cluster.seed(1), cluster.peer(1));
    let size = 16 * MIB + 13;
    let content = origin.add_file("/only-stalled.bin", size, 36);
    let url = origin.url("/only-stalled.bin");
    let out = cluster.dir().join("p1.out");

    let cl = &cluster;
    let (r, stopped) = tokio::join!(cl.download_verified(p1, &url, &out, &content), async {
        wait_until(
            "peer-1 receives bytes from the seed",
            Duration::from_secs(30),
            || async move { Ok(p1.stats().await?.bytes_from_seed > 0) },
        )
        .await?;
        let at_stop = p1.stats().await?;
        signal(seed, "STOP");
        anyhow::Ok(at_stop)
    });
    let at_stop = stopped.expect("stopping the seed");
    signal(seed, "CONT");
    r.unwrap_or_else(|e| {
        cluster.dump_logs();
        panic!("peer-1 should finish after its only parent stalled: {e:#}")
    });
    let sched_log =
        std::fs::read_to_string(cluster.scheduler().log_path()).expect("the scheduler's log");
    assert!(
        at_stop.bytes_from_seed < size,
        "the seed stopped after peer-1 had everything ({at_stop:?})"
    );
    let told = sched_log
        .lines()
        .any(|l| l.contains("reschedule") && l.contains("peer-1") && l.contains("\"seed-1\""))
        && sched_log
            .lines()
            .any(|l| l.contains("peer-1") && l.contains("sent"));
    assert!(
        told && !sched_log.contains("host left host_id=seed-1"),
        "peer-1 should have reported the stalled seed and been sent to the origin before the \
         scheduler noticed the seed itself:\n{}",
        cluster.scheduler().log_tail(30)
    );
    let s = p1.stats().await.expect("Stats of peer-1");
    assert!(
        s.bytes_from_origin > 0 && s.bytes_from_seed + s.bytes_from_origin == size,
        "peer-1's bytes: the seed's, then the rest from the origin once: {s:?}"
    );
    // The progress counter: bytes from anyone but the stopped seed grew after the stop
    // (the stopped seed's own bytes count only in `bytes_from_seed`).
    assert!(
        s.bytes_from_origin + s.bytes_from_peers
            > at_stop.bytes_from_origin + at_stop.bytes_from_peers,
        "peer-1 made no progress from another source after the stop: {at_stop:?} -> {s:?}"
    );
    let text = scrape(p1.metrics_addr).await.expect("metrics");
    assert_eq!(
        metric(&text, "damselfly_download_stalls_total").unwrap_or(0.0),
        0.0,
        "the stall watchdog fired: the idle detection should have acted first"
    );
    let log = std::fs::read_to_string(p1.proc.log_path()).expect("peer-1's log");
    assert!(
        log.lines()
            .any(|l| l.contains("parent dropped: no byte for") && l.contains("parent=seed-1")),
        "peer-1 should have dropped the stopped seed for silence:\n{}",
        p1.proc.log_tail(30)
    );
}
