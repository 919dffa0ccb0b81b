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
//! * Rogue data-plane certificates, over TCP and over QUIC: a daemon that registers with the
//!   scheduler (its gRPC certificate is good) but whose data-plane certificate is signed by
//!   the rogue CA. As a parent it is refused by a child that checks its certificate (the
//!   child goes to the origin; `tls_parent_handshakes_failed` moves); as a child it is
//!   refused by a parent with `client_auth` (`tls_handshakes_failed` moves). The rogue
//!   trusts the real CA and does not ask for client certificates, so in each direction only
//!   the check under test stands between it and the bytes.
//! * Manager: with mTLS on the manager's gRPC, a scheduler without a client certificate is
//!   refused (never listed by the manager, `damselfly_manager_tls_handshakes_total{result=
//!   "refused"}` moves); the same scheduler with its certificate then registers.

use std::path::Path;
use std::time::Duration;
use testkit::cluster::{free_port, Proc};
use testkit::manager::{ManagerOptions, ManagerProc};
use testkit::pki::{tls_yaml, Leaf, TestCa};
use testkit::poll::{metric, scrape, wait_until};
use testkit::{bin_path, Cluster, ClusterOptions, Daemon, Origin};

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
    // TLS was used on the data plane, not just configured.
    assert!(counter(seed, "damselfly_tls_handshakes").await >= 1.0);
    assert!(counter(cluster.peer(1), "damselfly_tls_parent_handshakes").await >= 1.0);
    assert_eq!(
        counter(cluster.peer(1), "damselfly_tls_parent_handshakes_failed").await,
        0.0
    );

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
    let text = scrape(sched_metrics).await.expect("scheduler metrics");
    let hs = |result: &str| {
        metric(
            &text,
            &format!("damselfly_scheduler_tls_handshakes_total{{result=\"{result}\"}}"),
        )
        .unwrap_or_else(|| panic!("no TLS handshake counter in the scheduler's metrics:\n{text}"))
    };
    assert!(hs("refused") >= 1.0, "the refusal was not counted");
    assert!(
        hs("accepted") >= 2.0,
        "the good daemons' handshakes were not counted"
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
    assert!(counter(cluster.seed(1), "damselfly_tls_handshakes").await >= 1.0);
    assert!(counter(cluster.peer(1), "damselfly_tls_parent_handshakes").await >= 1.0);
}

/// dfdaemon config whose gRPC to the scheduler is good (mTLS with the CA's daemon
/// certificate) and whose data plane trusts the real CA but presents `leaf`.
fn data_plane_yaml(pki: &Pki, leaf: &Leaf, client_auth: bool, quic: bool) -> String {
    let mut y = format!(
        "scheduler:\n{}data_plane:\n{}",
        tls_yaml(2, &pki.ca.cert_path, Some(&pki.daemon), false),
        tls_yaml(2, &pki.ca.cert_path, Some(leaf), client_auth)
    );
    if quic {
        y += "  transport: quic\n  quic_listen: \"127.0.0.1:0\"\n";
    }
    y
}

/// peer-1 has a rogue data-plane certificate; peer-2 a good one and `client_auth`.
/// (a) peer-1 holds a file and peer-2 downloads it: peer-2 must refuse peer-1 as parent
/// and fetch every byte from the origin. (b) peer-2 holds a file and peer-1 downloads it:
/// peer-2 must refuse peer-1 as child, which then fetches from the origin.
async fn rogue_data_plane_certificates_are_refused(quic: bool) {
    let pki = pki();
    let origin = Origin::start().await.expect("origin");
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let sched = write(
        cfg_dir.path(),
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
    let rogue_cfg = write(
        cfg_dir.path(),
        "rogue.yaml",
        &data_plane_yaml(&pki, &pki.rogue, false, quic),
    );
    cluster
        .add_daemon(false, &rogue_cfg)
        .await
        .expect("peer-1 (rogue data plane)");
    let good_cfg = write(
        cfg_dir.path(),
        "good.yaml",
        &data_plane_yaml(&pki, &pki.daemon, true, quic),
    );
    cluster.add_daemon(false, &good_cfg).await.expect("peer-2");
    let (rogue, good) = (cluster.peer(1), cluster.peer(2));
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");
    let size = 4 << 20;

    // (a) A rogue parent.
    let a = origin.add_file("/a.bin", size, 21);
    cluster
        .download_verified(rogue, &origin.url("/a.bin"), &out.join("a.rogue"), &a)
        .await
        .expect("peer-1 downloads a.bin");
    let s = rogue.stats().await.expect("Stats of peer-1");
    assert_eq!(s.bytes_from_origin, size, "peer-1 should hold a.bin: {s:?}");
    cluster
        .download_verified(good, &origin.url("/a.bin"), &out.join("a.good"), &a)
        .await
        .expect("peer-2 downloads a.bin");
    let s = good.stats().await.expect("Stats of peer-2");
    assert_eq!(
        s.bytes_from_peers + s.bytes_from_seed,
        0,
        "peer-2 took bytes from the rogue parent: {s:?}"
    );
    assert_eq!(s.bytes_from_origin, size, "{s:?}");
    // It was offered the rogue parent and refused it (not just never offered it).
    let refused = counter(good, "damselfly_tls_parent_handshakes_failed").await;
    assert!(
        refused >= 1.0,
        "peer-2 never refused a parent:\n{}",
        good.proc.log_tail(40)
    );
    assert_eq!(counter(rogue, "damselfly_bytes_uploaded").await, 0.0);
    assert_eq!(counter(good, "damselfly_tls_handshakes_failed").await, 0.0);

    // (b) A rogue child.
    let b = origin.add_file("/b.bin", size, 22);
    cluster
        .download_verified(good, &origin.url("/b.bin"), &out.join("b.good"), &b)
        .await
        .expect("peer-2 downloads b.bin");
    cluster
        .download_verified(rogue, &origin.url("/b.bin"), &out.join("b.rogue"), &b)
        .await
        .expect("peer-1 downloads b.bin");
    let s = rogue.stats().await.expect("Stats of peer-1");
    assert_eq!(
        s.bytes_from_peers + s.bytes_from_seed,
        0,
        "peer-1 (rogue) got bytes from peer-2: {s:?}"
    );
    assert_eq!(s.bytes_from_origin, 2 * size, "{s:?}");
    let failed = counter(good, "damselfly_tls_handshakes_failed").await;
    assert!(
        failed >= 1.0,
        "peer-2 never refused a child:\n{}",
        good.proc.log_tail(40)
    );
    assert_eq!(counter(good, "damselfly_bytes_uploaded").await, 0.0);
    if quic {
        // The refused child came over QUIC.
        let log = good.proc.log_tail(400);
        assert!(
            log.contains("data-plane QUIC handshake with"),
            "peer-2 logged no refused QUIC handshake:\n{log}"
        );
    } else {
        let log = good.proc.log_tail(400);
        assert!(
            log.contains("data-plane TLS handshake with"),
            "peer-2 logged no refused TLS handshake:\n{log}"
        );
    }
    eprintln!(
        "refused: {refused} rogue parent handshake(s), {failed} rogue child handshake(s) ({})",
        if quic { "QUIC" } else { "TCP" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_data_plane_certificate_is_refused_over_tcp() {
    rogue_data_plane_certificates_are_refused(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_data_plane_certificate_is_refused_over_quic() {
    rogue_data_plane_certificates_are_refused(true).await;
}

/// A scheduler process pointed at `manager` with `config` (its `manager:` section).
fn scheduler_for(dir: &Path, name: &str, manager: &ManagerProc, config: &str) -> Proc {
    let cfg = write(dir, &format!("{name}.yaml"), config);
    let listen = format!("127.0.0.1:{}", free_port().expect("port"));
    let metrics = format!("127.0.0.1:{}", free_port().expect("port"));
    let mut args = vec![
        "--listen".to_string(),
        listen,
        "--metrics".into(),
        metrics,
        "--manager".into(),
        manager.grpc_addr.to_string(),
    ];
    args.extend(cfg);
    Proc::spawn(
        name,
        &bin_path("scheduler").expect("scheduler binary"),
        &args,
        dir.join(format!("{name}.log")),
        "info",
    )
    .expect("starting a scheduler")
}

async fn manager_handshakes(m: &ManagerProc, result: &str) -> f64 {
    let text = scrape(m.metrics_addr).await.expect("manager metrics");
    metric(
        &text,
        &format!("damselfly_manager_tls_handshakes_total{{result=\"{result}\"}}"),
    )
    .unwrap_or_else(|| panic!("no TLS handshake counter in the manager's metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_with_mtls_refuses_a_scheduler_without_a_client_certificate() {
    let pki = pki();
    let dir = tempfile::tempdir().expect("tempdir");
    let manager_leaf = pki
        .ca
        .leaf("manager", &["127.0.0.1", "localhost"])
        .expect("manager cert");
    let m = ManagerProc::spawn(
        dir.path(),
        &ManagerOptions {
            server_tls_yaml: tls_yaml(2, &pki.ca.cert_path, Some(&manager_leaf), true),
            ..ManagerOptions::default()
        },
        "info",
    )
    .expect("starting the manager");
    m.wait_ready(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.proc.log_tail(30)));

    // Trusts the manager's CA, but has no certificate of its own.
    let bare = scheduler_for(
        dir.path(),
        "scheduler-bare",
        &m,
        &format!("manager:\n{}", tls_yaml(2, &pki.ca.cert_path, None, false)),
    );
    wait_until(
        "the manager refuses the scheduler's handshake",
        Duration::from_secs(20),
        || async { Ok(manager_handshakes(&m, "refused").await >= 1.0) },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nmanager:\n{}\nscheduler:\n{}",
            m.proc.log_tail(30),
            bare.log_tail(30)
        )
    });
    let log = m.proc.log_tail(200);
    let refusal = log
        .lines()
        .find(|l| l.contains("manager: TLS handshake with"))
        .unwrap_or_default()
        .to_string();
    assert!(
        refusal.contains("refused") && refusal.contains("peer sent no certificates"),
        "the manager does not say the scheduler had no certificate: {refusal}\n{log}"
    );
    assert!(bare.is_running(), "the scheduler should keep running");
    let listed = m.rest().schedulers().await.expect("GET /api/v1/schedulers");
    assert!(
        listed.is_empty(),
        "a scheduler without a certificate registered: {listed:?}"
    );
    assert_eq!(manager_handshakes(&m, "accepted").await, 0.0);
    bare.kill();

    // Control: the same manager takes the scheduler once it presents its certificate.
    let _good = scheduler_for(
        dir.path(),
        "scheduler-cert",
        &m,
        &format!(
            "manager:\n{}",
            tls_yaml(2, &pki.ca.cert_path, Some(&pki.scheduler), false)
        ),
    );
    m.rest()
        .wait_active_schedulers(1, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.proc.log_tail(30)));
    assert!(manager_handshakes(&m, "accepted").await >= 1.0);
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
