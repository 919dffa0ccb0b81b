//! The manager with real processes: a manager (SQLite) + 2 schedulers + a seed peer + peers
//! that know only the manager (no `--scheduler`). The peers find both schedulers through the
//! manager; a rate limit changed through REST reaches every daemon without a restart; a
//! killed scheduler is marked inactive and downloads go on through the other one; a preheat
//! job has the seed peer hold a file before any peer asks; REST writes need the token.
//!
//! No timing assertions: every wait is a bounded poll.

use serde_json::{json, Value};
use std::future::Future;
use std::time::{Duration, Instant};
use testkit::manager::{ManagerOptions, Rest};
use testkit::{grpc, Cluster, ClusterOptions, Daemon, Origin};
use wire::proto::dfdaemon::StatsResponse;
use wire::proto::scheduler::HostType;
use wire::task::TaskIdOptions;
use wire::TaskId;

const MIB: u64 = 1 << 20;
/// Longest wait of any poll below.
const WAIT: Duration = Duration::from_secs(60);

/// Polls `check` every 100 ms until it returns `Some`; panics with `what` and the last
/// observation after [`WAIT`].
async fn poll<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (Option<T>, String)>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let (done, seen) = check().await;
        if let Some(v) = done {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {WAIT:?}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stats(d: &Daemon) -> Option<StatsResponse> {
    d.stats().await.ok()
}

/// Waits until `d` reports exactly `want` (sorted) as its schedulers.
async fn wait_schedulers(d: &Daemon, want: &[String]) {
    poll(&format!("{} uses schedulers {want:?}", d.name), || async {
        match stats(d).await {
            Some(s) => {
                let mut got = s.schedulers.clone();
                got.sort();
                ((got == want).then_some(()), format!("{got:?}"))
            }
            None => (None, "no Stats answer".into()),
        }
    })
    .await
}

fn task_id(url: &str) -> String {
    TaskId::from_url(url, &TaskIdOptions::default())
        .expect("task id")
        .to_hex()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_drives_schedulers_daemons_and_preheat() {
    let origin = Origin::start().await.expect("origin");
    let first = origin.add_file("/first.bin", 6 * MIB + 333, 61);
    let after_kill = origin.add_file("/after-kill.bin", 5 * MIB + 7, 62);
    let preheated = origin.add_file("/preheated.bin", 7 * MIB + 11, 63);
    let (first_url, after_kill_url, preheat_url) = (
        origin.url("/first.bin"),
        origin.url("/after-kill.bin"),
        origin.url("/preheated.bin"),
    );

    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 2,
        schedulers: 2,
        manager: Some(ManagerOptions::default()),
        // Daemons know only the manager: they must learn the schedulers from it.
        static_schedulers: false,
        manager_refresh: Duration::from_millis(300),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let manager = cluster.manager().expect("the cluster has a manager");
    let rest: Rest = manager.rest();
    let mut both: Vec<String> = cluster
        .schedulers()
        .iter()
        .map(|s| s.addr.to_string())
        .collect();
    both.sort();

    // 1. Both schedulers registered and active; the seed peer registered too.
    let listed = rest.schedulers().await.expect("GET /api/v1/schedulers");
    for addr in &both {
        assert!(
            listed.contains(&(addr.clone(), "active".to_string())),
            "{addr} should be an active scheduler in {listed:?}"
        );
    }
    poll("the seed peer is active in the manager", || async {
        let seeds = rest.seed_peers().await.unwrap_or_default();
        let ok = seeds.iter().any(|(_, state)| state == "active");
        (ok.then_some(()), format!("{seeds:?}"))
    })
    .await;

    // 2. Every daemon found both schedulers through the manager's searcher.
    for d in cluster.seeds().iter().chain(cluster.peers()) {
        wait_schedulers(d, &both).await;
    }
    cluster
        .download_verified(
            cluster.peer(1),
            &first_url,
            &cluster.dir().join("first.out"),
            &first,
        )
        .await
        .expect("download through schedulers found via the manager");

    // 3. REST writes need the token.
    let cluster_id = rest.default_cluster_id().await.expect("default cluster");
    let config_path = format!("/api/v1/clusters/{cluster_id}/config");
    let limit: u64 = 987_654_321;
    let body = json!({"daemon": {"download_rate_limit": limit}, "scheduler": {"candidate_parent_limit": 3}});
    let (status, _) = rest
        .write("PUT", &config_path, &body, false)
        .await
        .expect("PUT without token");
    assert_eq!(status, 401, "PUT config without a token");
    let (status, _) = rest
        .write(
            "POST",
            "/api/v1/jobs",
            &json!({"type": "preheat", "args": {"type": "file", "url": preheat_url}}),
            false,
        )
        .await
        .expect("POST without token");
    assert_eq!(status, 401, "POST job without a token");
    for d in cluster.peers() {
        let s = stats(d).await.expect("Stats");
        assert_ne!(
            s.download_rate_limit, limit,
            "an unauthorised write must change nothing"
        );
    }

    // 4. A rate limit changed through REST reaches every daemon without a restart.
    let (status, answer) = rest
        .write("PUT", &config_path, &body, true)
        .await
        .expect("PUT config");
    assert_eq!(status, 200, "PUT config with the token: {answer}");
    let version = answer["version"].as_u64().expect("config version");
    for d in cluster.seeds().iter().chain(cluster.peers()) {
        poll(
            &format!("{} applies download_rate_limit {limit}", d.name),
            || async {
                match stats(d).await {
                    Some(s) => (
                        (s.download_rate_limit == limit && s.config_version == version)
                            .then_some(()),
                        format!(
                            "download_rate_limit {} config_version {}",
                            s.download_rate_limit, s.config_version
                        ),
                    ),
                    None => (None, "no Stats answer".into()),
                }
            },
        )
        .await;
    }
    // The schedulers apply the scheduler part (they log it; they have no Stats RPC).
    for s in cluster.schedulers() {
        let log = s.proc.log_path().to_path_buf();
        poll(
            &format!("{} applies config version {version}", s.proc.name()),
            || async {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let line = format!("version={version}");
                let ok = text
                    .lines()
                    .any(|l| l.contains("cluster config applied") && l.contains(&line));
                (ok.then_some(()), "no such log line".to_string())
            },
        )
        .await;
    }

    // 5. Killing a scheduler marks it inactive; the daemons drop it and keep downloading
    //    through the other one.
    let (dead, alive) = (&cluster.schedulers()[0], &cluster.schedulers()[1]);
    dead.proc.kill();
    let (dead_addr, alive_addr) = (dead.addr.to_string(), alive.addr.to_string());
    poll("the killed scheduler is inactive", || async {
        let list = rest.schedulers().await.unwrap_or_default();
        let ok = list.contains(&(dead_addr.clone(), "inactive".into()))
            && list.contains(&(alive_addr.clone(), "active".into()));
        (ok.then_some(()), format!("{list:?}"))
    })
    .await;
    let only_alive = vec![alive_addr.clone()];
    for d in cluster.seeds().iter().chain(cluster.peers()) {
        wait_schedulers(d, &only_alive).await;
    }
    let served_before = origin.bytes_served();
    cluster
        .download_verified(
            cluster.peer(2),
            &after_kill_url,
            &cluster.dir().join("after-kill.out"),
            &after_kill,
        )
        .await
        .expect("download after a scheduler was killed");
    assert_eq!(
        origin.bytes_served() - served_before,
        after_kill.size,
        "the file left the origin once (through the seed peer)"
    );
    let info = grpc::stat_task(alive.addr, &task_id(&after_kill_url))
        .await
        .expect("the surviving scheduler knows the new download");
    assert!(
        info.peers.iter().any(|p| p.host_id == "peer-2" && p.done),
        "peer-2's download should be on the surviving scheduler: {info:?}"
    );

    // 6. Preheat: the seed peer holds the file before any peer asks.
    let served_before_preheat = origin.bytes_served();
    let (status, job) = rest
        .write(
            "POST",
            "/api/v1/jobs",
            &json!({"type": "preheat", "args": {"type": "file", "url": preheat_url}}),
            true,
        )
        .await
        .expect("POST job");
    assert!(
        status == 200 || status == 201,
        "POST job with the token: {status} {job}"
    );
    let job_id = job["id"].as_u64().expect("job id");
    let job: Value = poll(&format!("preheat job {job_id} succeeds"), || async {
        match rest.get_ok(&format!("/api/v1/jobs/{job_id}")).await {
            Ok(j) => {
                assert_ne!(j["state"], "failure", "preheat job failed: {j}");
                ((j["state"] == "success").then(|| j.clone()), j.to_string())
            }
            Err(e) => (None, format!("{e:#}")),
        }
    })
    .await;
    assert_eq!(job["url"], preheat_url.as_str());
    let info = grpc::stat_task(alive.addr, &task_id(&preheat_url))
        .await
        .expect("the surviving scheduler knows the preheated task");
    assert!(
        info.peers
            .iter()
            .any(|p| p.host_type == HostType::Seed as i32 && p.done),
        "a seed peer should hold the preheated task: {info:?}"
    );
    assert!(
        info.peers
            .iter()
            .all(|p| p.host_type == HostType::Seed as i32),
        "no ordinary peer asked for the task yet: {info:?}"
    );
    assert_eq!(
        origin.bytes_served() - served_before_preheat,
        preheated.size,
        "the seed fetched the preheated file from the origin once"
    );
    // A peer now gets it from the seed, not from the origin.
    cluster
        .download_verified(
            cluster.peer(1),
            &preheat_url,
            &cluster.dir().join("preheated.out"),
            &preheated,
        )
        .await
        .expect("download of the preheated file");
    assert_eq!(
        origin.bytes_served() - served_before_preheat,
        preheated.size,
        "the preheated file must not leave the origin again"
    );

    // A preheat of a file the seed already holds (downloaded before the kill, possibly via
    // the dead scheduler): the seed announces it instead of fetching it again.
    let served = origin.bytes_served();
    let (status, job) = rest
        .write(
            "POST",
            "/api/v1/jobs",
            &json!({"type": "preheat", "args": {"type": "file", "url": first_url}}),
            true,
        )
        .await
        .expect("POST job");
    assert!(status == 200 || status == 201, "{status} {job}");
    let job_id = job["id"].as_u64().expect("job id");
    poll(&format!("preheat job {job_id} succeeds"), || async {
        match rest.get_ok(&format!("/api/v1/jobs/{job_id}")).await {
            Ok(j) => {
                assert_ne!(j["state"], "failure", "preheat job failed: {j}");
                ((j["state"] == "success").then_some(()), j.to_string())
            }
            Err(e) => (None, format!("{e:#}")),
        }
    })
    .await;
    let info = grpc::stat_task(alive.addr, &task_id(&first_url))
        .await
        .expect("the surviving scheduler knows the held task");
    assert!(
        info.peers
            .iter()
            .any(|p| p.host_type == HostType::Seed as i32 && p.done),
        "the seed peer should be a done peer of the held task: {info:?}"
    );
    assert_eq!(
        origin.bytes_served(),
        served,
        "a held task is not fetched again"
    );

    // 7. The status page shows the live scheduler.
    let (status, page) = rest.get("/").await.expect("GET /");
    assert_eq!(status, 200);
    let page = page.as_str().unwrap_or_default().to_string();
    assert!(
        page.contains(&alive.addr.port().to_string()),
        "the status page should list the surviving scheduler {alive_addr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_down_keeps_the_last_config_and_everyone_registers_again() {
    let origin = Origin::start().await.expect("origin");
    let during = origin.add_file("/during-outage.bin", 3 * MIB + 5, 71);
    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 1,
        manager: Some(ManagerOptions::default()),
        static_schedulers: false,
        manager_refresh: Duration::from_millis(300),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let scheduler = vec![cluster.scheduler_addr().to_string()];
    for d in cluster.seeds().iter().chain(cluster.peers()) {
        wait_schedulers(d, &scheduler).await;
    }
    let rest = cluster.manager().expect("manager").rest();
    let cluster_id = rest.default_cluster_id().await.expect("default cluster");
    let path = format!("/api/v1/clusters/{cluster_id}/config");
    let (status, _) = rest
        .write(
            "PUT",
            &path,
            &json!({"daemon": {"upload_rate_limit": 555_000_000u64}}),
            true,
        )
        .await
        .expect("PUT config");
    assert_eq!(status, 200);
    let peer = cluster.peer(1);
    poll("peer-1 applies the first config", || async {
        let s = stats(peer).await;
        let v = s.as_ref().map(|s| s.upload_rate_limit);
        ((v == Some(555_000_000)).then_some(()), format!("{v:?}"))
    })
    .await;

    // The manager dies: the daemons keep their schedulers and config, downloads go on.
    cluster.manager().expect("manager").proc.kill();
    cluster
        .download_verified(
            cluster.peer(1),
            &origin.url("/during-outage.bin"),
            &cluster.dir().join("during.out"),
            &during,
        )
        .await
        .expect("download while the manager is down");
    let s = stats(cluster.peer(1)).await.expect("Stats");
    assert_eq!(s.schedulers, scheduler, "the last scheduler list is kept");
    assert_eq!(s.upload_rate_limit, 555_000_000, "the last config is kept");

    // It comes back (same database): the scheduler registers again and config changes flow.
    cluster
        .restart_manager()
        .await
        .expect("restarting the manager");
    let log = cluster.scheduler().log_path().to_path_buf();
    poll("the scheduler registers again", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let n = text.matches("registered with the manager").count();
        ((n >= 2).then_some(()), format!("{n} registrations"))
    })
    .await;
    rest.wait_active_schedulers(1, WAIT)
        .await
        .expect("the scheduler is active again");
    let (status, _) = rest
        .write(
            "PUT",
            &path,
            &json!({"daemon": {"upload_rate_limit": 444_000_000u64}}),
            true,
        )
        .await
        .expect("PUT config after the restart");
    assert_eq!(status, 200);
    let peer = cluster.peer(1);
    poll(
        "peer-1 applies the config changed after the restart",
        || async {
            let s = stats(peer).await;
            let v = s.as_ref().map(|s| s.upload_rate_limit);
            ((v == Some(444_000_000)).then_some(()), format!("{v:?}"))
        },
    )
    .await;
}
