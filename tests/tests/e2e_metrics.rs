//! Observability: after downloads through a real cluster (manager, scheduler, seed, two
//! peers), every service's Prometheus endpoint answers `/healthy` and its counters moved.

use std::net::SocketAddr;
use std::time::Duration;
use testkit::manager::ManagerOptions;
use testkit::poll::{http_get, metric, scrape, wait_until};
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;

/// The value of `series` in `text`, or a panic showing the exposition.
fn value(who: &str, text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or_else(|| panic!("{who} does not expose {series}:\n{text}"))
}

async fn healthy(who: &str, addr: SocketAddr) {
    let (status, body) = http_get(addr, "/healthy").await.expect("GET /healthy");
    assert_eq!((status, body.trim()), (200, "OK"), "{who} /healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exposes_metrics_that_move_with_downloads() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 2,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let (p1, p2) = (cluster.peer(1), cluster.peer(2));
    let content = origin.add_file("/m.bin", 9 * MIB + 1, 51);
    let url = origin.url("/m.bin");
    cluster
        .download_verified(p1, &url, &cluster.dir().join("m1.out"), &content)
        .await
        .expect("download through peer-1");
    cluster
        .download_verified(p2, &url, &cluster.dir().join("m2.out"), &content)
        .await
        .expect("download through peer-2");
    let missing = cluster
        .run_dfget(
            p2,
            &origin.url("/missing"),
            &cluster.dir().join("x.out"),
            None,
        )
        .await
        .expect("dfget of a missing URL");
    assert!(!missing.status.success(), "a 404 should fail dfget");

    // Daemons.
    for (d, source) in [(p1, "any"), (p2, "peers")] {
        healthy(&d.name, d.metrics_addr).await;
        let t = scrape(d.metrics_addr).await.expect("scraping the daemon");
        let who = d.name.as_str();
        assert!(value(who, &t, "damselfly_downloads_succeeded_total") >= 1.0);
        assert!(value(who, &t, "damselfly_downloads_started_total") >= 1.0);
        assert_eq!(
            value(who, &t, "damselfly_downloads_active"),
            0.0,
            "{who}: {t}"
        );
        assert!(value(who, &t, "damselfly_tasks") >= 1.0);
        let down = value(who, &t, "damselfly_bytes_from_origin_total")
            + value(who, &t, "damselfly_bytes_from_seed_total")
            + value(who, &t, "damselfly_bytes_from_peers_total");
        assert!(
            down >= content.size as f64,
            "{who} counts {down} bytes down: {t}"
        );
        if source == "peers" {
            assert!(
                value(who, &t, "damselfly_pieces_downloaded_total") > 0.0,
                "{who} fetched from peers: {t}"
            );
            assert_eq!(
                value(who, &t, "damselfly_downloads_failed_total{kind=\"origin\"}"),
                1.0,
                "{who}: the 404 counts as an origin failure: {t}"
            );
        }
        value(who, &t, "damselfly_bridge_event_depth");
        value(who, &t, "damselfly_bridge_command_depth");
    }
    let seed = cluster.seed(1);
    let t = scrape(seed.metrics_addr).await.expect("scraping the seed");
    let up = value("seed-1", &t, "damselfly_bytes_uploaded_total");
    assert!(up > 0.0, "the seed uploaded to the peers: {t}");

    // Scheduler.
    let s = &cluster.schedulers()[0];
    healthy("scheduler", s.metrics_addr).await;
    let t = scrape(s.metrics_addr)
        .await
        .expect("scraping the scheduler");
    let who = "scheduler";
    assert!(
        value(
            who,
            &t,
            "damselfly_scheduler_registrations_total{result=\"ok\"}"
        ) >= 3.0
    );
    assert!(
        value(
            who,
            &t,
            "damselfly_scheduler_announcements_total{kind=\"piece_finished\"}"
        ) >= 10.0,
        "{t}"
    );
    assert!(value(who, &t, "damselfly_scheduler_scheduling_seconds_count") >= 10.0);
    assert!(
        value(
            who,
            &t,
            "damselfly_scheduler_responses_total{kind=\"candidate_parents\"}"
        ) >= 1.0
    );
    assert!(
        value(
            who,
            &t,
            "damselfly_scheduler_responses_total{kind=\"host_command\"}"
        ) >= 1.0
    );
    assert!(value(who, &t, "damselfly_scheduler_tasks") >= 1.0);
    assert_eq!(
        value(who, &t, "damselfly_scheduler_hosts"),
        3.0,
        "seed + 2 peers: {t}"
    );

    // Manager.
    let m = cluster.manager().expect("manager");
    healthy("manager", m.metrics_addr).await;
    let rest = m.rest();
    rest.get_ok("/api/v1/schedulers").await.expect("REST GET");
    let maddr = m.metrics_addr;
    wait_until(
        "the manager counts keepalives",
        Duration::from_secs(10),
        || async move {
            let t = scrape(maddr).await?;
            Ok(
                metric(&t, "damselfly_manager_keepalives_total{kind=\"scheduler\"}").unwrap_or(0.0)
                    >= 1.0,
            )
        },
    )
    .await
    .expect("keepalives");
    let t = scrape(maddr).await.expect("scraping the manager");
    let who = "manager";
    assert!(
        value(
            who,
            &t,
            "damselfly_manager_grpc_requests_total{method=\"register_scheduler\"}"
        ) >= 1.0
    );
    assert!(
        value(
            who,
            &t,
            "damselfly_manager_instances{kind=\"scheduler\",state=\"active\"}"
        ) == 1.0,
        "{t}"
    );
    assert!(
        value(
            who,
            &t,
            "damselfly_manager_instances{kind=\"seed_peer\",state=\"active\"}"
        ) == 1.0,
        "{t}"
    );
    assert!(
        value(who, &t, "damselfly_manager_keepalive_streams") >= 2.0,
        "{t}"
    );
    assert!(
        value(
            who,
            &t,
            "damselfly_manager_rest_requests_total{method=\"GET\",status=\"2xx\"}"
        ) >= 1.0,
        "{t}"
    );
    value(who, &t, "damselfly_manager_preheat_jobs{state=\"success\"}");
}
