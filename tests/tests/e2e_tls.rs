//! TLS and mTLS end to end, with certificates made at run time (rcgen): a CA signing the
//! scheduler's and the daemons' certificates, and a rogue CA.
//!
//! * Over TCP: the scheduler requires client certificates on gRPC, the daemons require them
//!   on the data plane; a peer downloads a file from the seed (digest checked, every byte
//!   from the seed, none from the origin, no refused handshake). A daemon whose certificate
//!   is signed by the rogue CA is refused by the scheduler: it never becomes one of the
//!   scheduler's hosts, its log says the announcement failed over TLS, and the scheduler's
//!   log names the reason (`UnknownIssuer`).
//! * Manager: with mTLS on the manager's gRPC, the scheduler registers over TLS with its
//!   certificate and becomes an active scheduler of the manager.
//! * Over QUIC: the same cluster with `transport: quic`: pieces move over QUIC between
//!   daemons that verify each other against the CA.

use std::path::Path;
use std::time::Duration;
use testkit::manager::ManagerOptions;
use testkit::pki::{tls_yaml, Leaf, TestCa};
use testkit::poll::{metric, scrape, wait_until};
use testkit::{Cluster, ClusterOptions, Daemon, Origin};

struct Pki {
    _dir: tempfile::TempDir,
    ca: TestCa,
    scheduler: Leaf,
    daemon: Leaf,
    rogue: Leaf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "good").expect("CA");
    let rogue_ca = TestCa::new(dir.path(), "rogue").expect("rogue CA");
    let scheduler = ca
        .leaf("scheduler", &["127.0.0.1", "localhost"])
        .expect("scheduler cert");
    let daemon = ca
        .leaf("daemon", &["127.0.0.1", "localhost"])
        .expect("daemon cert");
    let rogue = rogue_ca
        .leaf("rogue", &["127.0.0.1", "localhost"])
        .expect("rogue cert");
    Pki {
        _dir: dir,
        ca,
        scheduler,
        daemon,
        rogue,
    }
}

fn write(dir: &Path, name: &str, yaml: &str) -> Vec<String> {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("writing a config");
    vec!["--config".into(), path.display().to_string()]
}

/// dfdaemon config: gRPC to the scheduler and the data plane over TLS with `leaf`.
fn daemon_yaml(pki: &Pki, leaf: &Leaf, quic: bool) -> String {
    let mut y = format!(
        "scheduler:\n{}data_plane:\n{}",
        tls_yaml(2, &pki.ca.cert_path, Some(leaf), false),
        tls_yaml(2, &pki.ca.cert_path, Some(leaf), true)
    );
    if quic {
        y += "  transport: quic\n  quic_listen: \"127.0.0.1:0\"\n";
    }
    y
}

async fn counter(d: &Daemon, name: &str) -> f64 {
    let text = scrape(d.metrics_addr).await.expect("daemon metrics");
    metric(&text, &format!("{name}_total"))
        .or_else(|| metric(&text, name))
        .unwrap_or_else(|| panic!("no {name} in the metrics of {}", d.name))
}

async fn tls_cluster(pki: &Pki, cfg_dir: &Path, quic: bool) -> Cluster {
    let sched = write(
        cfg_dir,
        "scheduler.yaml",
        &format!(
            "server:\n{}",
            tls_yaml(2, &pki.ca.cert_path, Some(&pki.scheduler), true)
        ),
    );
    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 0,
        scheduler_args: sched,
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the scheduler");
    let good = write(cfg_dir, "daemon.yaml", &daemon_yaml(pki, &pki.daemon, quic));
    cluster.add_daemon(true, &good).await.expect("seed-1");
    cluster.add_daemon(false, &good).await.expect("peer-1");
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_downloads_peer_to_peer_and_refuses_a_rogue_daemon() {
    let pki = pki();
    let origin = Origin::start().await.expect("origin");
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = tls_cluster(&pki, cfg_dir.path(), false).await;
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");

    let size = 6 << 20;
    let content = origin.add_file("/tls.bin", size, 11);
    let url = origin.url("/tls.bin");
    cluster
        .download_verified(cluster.peer(1), &url, &out.join("tls.peer-1"), &content)
        .await
        .expect("peer-1 downloads over TLS");
    let s = cluster.peer(1).stats().await.expect("Stats of peer-1");
    assert_eq!(s.bytes_from_origin, 0, "peer-1 went to the origin: {s:?}");
    assert_eq!(
        s.bytes_from_seed + s.bytes_from_peers,
        size,
        "peer-1 did not get every byte from a peer: {s:?}"
    );
    let seed = cluster.seed(1);
    assert_eq!(counter(seed, "damselfly_tls_handshakes_failed").await, 0.0);
    assert!(counter(seed, "damselfly_bytes_uploaded").await >= size as f64);

    // Both daemons announced themselves over mTLS.
    let sched_metrics = cluster.schedulers()[0].metrics_addr;
    let hosts = metric(
        &scrape(sched_metrics).await.expect("scheduler metrics"),
        "damselfly_scheduler_hosts",
    );
    assert_eq!(hosts, Some(2.0), "hosts known to the scheduler");

    // A daemon with a certificate from the rogue CA: the scheduler refuses it.
    let rogue = write(
        cfg_dir.path(),
        "rogue.yaml",
        &daemon_yaml(&pki, &pki.rogue, false),
    );
    cluster
        .add_daemon(false, &rogue)
        .await
        .expect("peer-2 (rogue) starts");
    let rogue = cluster.peer(2);
    wait_until(
        "the rogue daemon logs its refusal",
        Duration::from_secs(15),
        || async {
            Ok(rogue
                .proc
                .log_tail(200)
                .contains("announcing host to scheduler"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rogue.proc.log_tail(30)));
    let log = rogue.proc.log_tail(200);
    let line = log
        .lines()
        .find(|l| l.contains("announcing host to scheduler"))
        .unwrap_or_default()
        .to_string();
    // The alert races the request: the daemon sees either the scheduler's alert or a closed
    // connection, which it then says may be a refused certificate.
    assert!(
        line.contains("received fatal alert: UnknownCA")
            || line.contains("the scheduler may have refused this host's certificate"),
        "the refusal does not say the scheduler refused the certificate: {line}"
    );
    // The scheduler says why: the certificate is not from its CA.
    let sched = &cluster.schedulers()[0].proc;
    wait_until(
        "the scheduler logs the refusal",
        Duration::from_secs(10),
        || async { Ok(sched.log_tail(200).contains("TLS handshake with")) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", sched.log_tail(30)));
    let sched_log = sched.log_tail(200);
    let refusal = sched_log
        .lines()
        .find(|l| l.contains("TLS handshake with"))
        .unwrap_or_default()
        .to_string();
    assert!(
        refusal.contains("refused") && refusal.contains("UnknownIssuer"),
        "unexpected refusal on the scheduler: {refusal}"
    );
    assert!(
        !log.contains("announced host"),
        "the rogue daemon was accepted:\n{log}"
    );
    let hosts = metric(
        &scrape(sched_metrics).await.expect("scheduler metrics"),
        "damselfly_scheduler_hosts",
    );
    assert_eq!(
        hosts,
        Some(2.0),
        "the rogue daemon became a host of the scheduler"
    );
    eprintln!("rogue daemon refused: {line}\nscheduler: {refusal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_moves_pieces_over_quic() {
    let pki = pki();
    let origin = Origin::start().await.expect("origin");
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let cluster = tls_cluster(&pki, cfg_dir.path(), true).await;
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");
    let size = 6 << 20;
    let content = origin.add_file("/quic-tls.bin", size, 12);
    let url = origin.url("/quic-tls.bin");
    cluster
        .download_verified(cluster.peer(1), &url, &out.join("quic.peer-1"), &content)
        .await
        .expect("peer-1 downloads over QUIC with TLS");
    let s = cluster.peer(1).stats().await.expect("Stats of peer-1");
    assert_eq!(s.bytes_from_origin, 0, "peer-1 went to the origin: {s:?}");
    assert_eq!(s.bytes_from_seed + s.bytes_from_peers, size, "{s:?}");
    assert!(counter(cluster.peer(1), "damselfly_quic_connections").await >= 1.0);
    assert!(counter(cluster.seed(1), "damselfly_quic_streams_served").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_registers_with_a_manager_over_mtls() {
    let pki = pki();
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    // The scheduler presents its certificate to the manager (a client) and to daemons.
    let sched = write(
        cfg_dir.path(),
        "scheduler.yaml",
        &format!(
            "server:\n{}manager:\n{}",
            tls_yaml(2, &pki.ca.cert_path, Some(&pki.scheduler), true),
            tls_yaml(2, &pki.ca.cert_path, Some(&pki.scheduler), false)
        ),
    );
    let manager_leaf = pki
        .ca
        .leaf("manager", &["127.0.0.1", "localhost"])
        .expect("manager cert");
    // Cluster::start waits until the manager lists the scheduler as active, which needs
    // its registration and keepalives to go through the manager's mTLS.
    let cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 0,
        scheduler_args: sched,
        manager: Some(ManagerOptions {
            server_tls_yaml: tls_yaml(2, &pki.ca.cert_path, Some(&manager_leaf), true),
            ..ManagerOptions::default()
        }),
        ..ClusterOptions::default()
    })
    .await
    .expect("the scheduler registers with the manager over mTLS");
    let log = cluster.manager().expect("manager").proc.log_tail(200);
    assert!(
        !log.contains("refused"),
        "the manager refused a handshake:\n{log}"
    );
}
