//! The Grafana dashboards (`deploy/grafana/*.json`) and the alert rules (the PrometheusRule
//! in `deploy/kubernetes/components/monitoring/`) against a real Prometheus (Debian's
//! `prometheus`) scraping a running local cluster (manager, scheduler, a seed peer, two
//! peers) after a few downloads:
//!
//! - every metric a panel or a rule names is exposed by some process's `/metrics` (a
//!   misspelt or removed metric fails here, naming the dashboard and panel);
//! - Prometheus holds series for every such metric, among them `damselfly_build_info`
//!   (with this build's revision) and `damselfly_download_duration_seconds` by outcome;
//! - every panel's query is valid PromQL and returns data; every rule's expression is
//!   valid PromQL.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use testkit::cluster::free_port;
use testkit::manager::ManagerOptions;
use testkit::poll::{http_get, scrape, wait_until};
use testkit::registry::which;
use testkit::{Cluster, ClusterOptions, Origin};

const TEST: &str = "dashboards_and_rules_query_metrics_a_real_prometheus_scrapes";
const MIB: u64 = 1 << 20;
/// What `$__rate_interval` and the other Grafana interval variables become in the test
/// (Prometheus scrapes every second, so a minute holds many samples).
const INTERVAL: &str = "1m";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `damselfly_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("damselfly_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// (dashboard file, panel title, expression) of every panel target of every dashboard.
fn panel_queries() -> Vec<(String, String, String)> {
    let dir = repo().join("deploy/grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "dashboards for dfdaemon, seed peer, scheduler, manager: {files:?}"
    );
    let mut out = Vec::new();
    for f in files {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).expect("dashboard");
        let dash: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        assert!(dash["uid"].is_string(), "{name}: no uid");
        let mut panels: Vec<&serde_json::Value> = Vec::new();
        for p in dash["panels"].as_array().expect("panels") {
            panels.push(p);
            // Rows hold their collapsed panels.
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner);
            }
        }
        let mut n = 0;
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: panel {title:?} has a target without expr"));
                let expr = expr
                    .replace("$__rate_interval", INTERVAL)
                    .replace("$__interval", INTERVAL)
                    .replace("$__range", INTERVAL);
                assert!(
                    !expr.contains('$'),
                    "{name}: panel {title:?} uses a variable the test cannot fill: {expr}"
                );
                out.push((name.clone(), title.clone(), expr));
                n += 1;
            }
        }
        assert!(n > 0, "{name} has no queries");
    }
    out
}

/// (alert name, expression) of every rule of the PrometheusRule.
fn rule_queries() -> Vec<(String, String)> {
    let path = repo().join("deploy/kubernetes/components/monitoring/prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).expect("PrometheusRule");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("PrometheusRule is YAML");
    let mut out = Vec::new();
    for g in doc["spec"]["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .unwrap_or("?")
                .to_string();
            let expr = r["expr"].as_str().expect("expr").to_string();
            out.push((name, expr));
        }
    }
    assert!(!out.is_empty());
    out
}

/// An instant query: the result vector (or an error naming Prometheus's answer).
async fn query(prom: SocketAddr, q: &str) -> Result<Vec<serde_json::Value>, String> {
    let resp = reqwest::Client::new()
        .get(format!("http://{prom}/api/v1/query"))
        .query(&[("query", q)])
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("query request: {e}"))?;
    let text = resp
        .text()
        .await
        .map_err(|e| format!("query answer: {e}"))?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("query answer ({e}): {text}"))?;
    if body["status"] != "success" {
        return Err(format!("Prometheus refused {q:?}: {body}"));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_query_metrics_a_real_prometheus_scrapes() {
    let Some(prometheus) = which("prometheus") else {
        needs::skip(
            TEST,
            "prometheus not installed (apt-get install -y prometheus)",
        );
        return;
    };
    needs::found(TEST);
    let panels = panel_queries();
    let rules = rule_queries();

    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 2,
        manager: Some(ManagerOptions::default()),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let manager = cluster.manager().expect("manager");
    let daemons: Vec<SocketAddr> = cluster
        .seeds()
        .iter()
        .chain(cluster.peers())
        .map(|d| d.metrics_addr)
        .collect();
    let schedulers: Vec<SocketAddr> = cluster
        .schedulers()
        .iter()
        .map(|s| s.metrics_addr)
        .collect();
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let work = cluster.dir().join("prometheus");
    std::fs::create_dir_all(&work).expect("prometheus dir");
    let config = work.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n\
             \x20 - job_name: damselfly-dfdaemon\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: damselfly-scheduler\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: damselfly-manager\n    static_configs:\n      - targets: [\"{}\"]\n",
            list(&daemons),
            list(&schedulers),
            manager.metrics_addr
        ),
    )
    .expect("prometheus.yml");
    let prom = SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
    let log = std::fs::File::create(work.join("prometheus.log")).expect("log");
    let _prom = Prometheus(
        std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let targets = daemons.len() + schedulers.len() + 1;
    wait_until(
        "Prometheus scrapes every target",
        Duration::from_secs(60),
        || async move {
            let up = query(prom, "up == 1").await.unwrap_or_default();
            Ok(up.len() == targets)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}; prometheus log: {}",
            testkit::cluster::tail(&work.join("prometheus.log"), 20)
        )
    });

    // A few downloads (the first through the seed peer, the second from peers), and a
    // REST call to the manager.
    for (i, size) in [(1, 5 * MIB + 3), (2, 2 * MIB)] {
        let path = format!("/f{i}.bin");
        let content = origin.add_file(&path, size, 40 + i);
        for peer in cluster.peers() {
            let out = cluster.dir().join(format!("out-{}-{i}", peer.name));
            cluster
                .download_verified(peer, &origin.url(&path), &out, &content)
                .await
                .expect("download");
        }
    }
    let (status, _) = http_get(manager.rest_addr, "/api/v1/schedulers")
        .await
        .expect("REST call");
    assert_eq!(status, 200);

    // Every metric the dashboards and rules name is exposed by some process.
    let mut exposed = String::new();
    for a in daemons
        .iter()
        .chain(&schedulers)
        .chain([&manager.metrics_addr])
    {
        exposed.push_str(&scrape(*a).await.expect("scrape"));
    }
    let mut names: BTreeSet<String> = BTreeSet::new();
    for (file, title, expr) in &panels {
        for n in metric_names(expr) {
            assert!(
                exposed.contains(&format!("\n{n}{{")) || exposed.contains(&format!("\n{n} ")),
                "{file}: panel {title:?} names {n}, which no Damselfly process exposes"
            );
            names.insert(n);
        }
    }
    for (alert, expr) in &rules {
        for n in metric_names(expr) {
            assert!(
                exposed.contains(&format!("\n{n}{{")) || exposed.contains(&format!("\n{n} ")),
                "rule {alert} names {n}, which no Damselfly process exposes"
            );
            names.insert(n);
        }
    }
    assert!(names.contains("damselfly_build_info"));
    assert!(names.contains("damselfly_download_duration_seconds_bucket"));

    // Prometheus has scraped them after the downloads: wait until the download histogram
    // counts every peer's downloads, then a few more scrapes for rates.
    let downloads = (2 * cluster.peers().len()) as f64;
    wait_until(
        "Prometheus holds the peers' downloads",
        Duration::from_secs(30),
        || async move {
            let r = query(
                prom,
                "sum(damselfly_download_duration_seconds_count{outcome=\"succeeded\"} \
                 * on (instance) group_left () damselfly_build_info{role=\"peer\"})",
            )
            .await
            .unwrap_or_default();
            Ok(r.first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= downloads))
        },
    )
    .await
    .expect("downloads scraped");
    tokio::time::sleep(Duration::from_secs(3)).await;

    for n in &names {
        let r = query(prom, &format!("count({n})")).await.expect("query");
        assert!(!r.is_empty(), "Prometheus has no series of {n}");
    }
    let info = query(prom, "damselfly_build_info")
        .await
        .expect("build_info");
    assert_eq!(info.len(), targets, "one build_info per process: {info:?}");
    for s in &info {
        assert!(
            s["metric"]["revision"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{s}"
        );
        assert_eq!(s["metric"]["version"], env!("CARGO_PKG_VERSION"), "{s}");
    }
    let outcomes = query(
        prom,
        "count by (outcome) (damselfly_download_duration_seconds_count)",
    )
    .await
    .expect("outcomes");
    assert_eq!(outcomes.len(), 2, "succeeded and failed: {outcomes:?}");

    for (file, title, expr) in &panels {
        let r = query(prom, expr)
            .await
            .unwrap_or_else(|e| panic!("{file}: panel {title:?}: {e}"));
        assert!(
            !r.is_empty(),
            "{file}: panel {title:?} returns no data: {expr}"
        );
    }
    for (alert, expr) in &rules {
        query(prom, expr)
            .await
            .unwrap_or_else(|e| panic!("rule {alert}: {e}"));
    }
}
