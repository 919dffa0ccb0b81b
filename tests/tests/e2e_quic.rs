//! Daemons configured with `data_plane.transport: quic` move pieces between each other over
//! QUIC: a peer downloads a file of several pieces that the seed fetched from the origin, the
//! file is checked by its digest, and the daemons' metrics show that the pieces came over
//! QUIC (fetch connections opened over QUIC on the peer, QUIC streams served by the seed,
//! TLS handshakes completed on both). QUIC needs `data_plane.tls` (here server
//! authentication only, no client certificates); a daemon without it refuses to start.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::pki::{tls_yaml, TestCa};
use testkit::{bin_path, Cluster, ClusterOptions, Daemon, Origin};

/// Value of a counter in a daemon's Prometheus metrics (`name_total` or `name`).
async fn metric(d: &Daemon, name: &str) -> u64 {
    let body = reqwest::get(format!("http://{}/metrics", d.metrics_addr))
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics body");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name || k == format!("{name}_total"))
                .then(|| v.trim().parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no {name} in the metrics of {}:\n{body}", d.name)) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_fetches_from_the_seed_over_quic() {
    let origin = Origin::start().await.expect("origin");
    let cfg_dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(cfg_dir.path(), "quic").expect("CA");
    let leaf = ca.leaf("daemon", &["127.0.0.1"]).expect("daemon cert");
    let cfg = cfg_dir.path().join("quic.yaml");
    std::fs::write(
        &cfg,
        format!(
            "data_plane:\n  transport: quic\n  quic_listen: \"127.0.0.1:0\"\n{}",
            tls_yaml(2, &ca.cert_path, Some(&leaf), false)
        ),
    )
    .expect("config");
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 1,
        daemon_args: vec!["--config".into(), cfg.display().to_string()],
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");
    let size = 12 << 20;
    let content = origin.add_file("/quic.bin", size, 5);
    let url = origin.url("/quic.bin");
    cluster
        .download_verified(cluster.peer(1), &url, &out.join("quic.peer-1"), &content)
        .await
        .expect("peer-1 downloads over QUIC");
    let s = cluster.peer(1).stats().await.expect("Stats of peer-1");
    assert_eq!(s.bytes_from_origin, 0, "peer-1 went to the origin: {s:?}");
    assert_eq!(
        s.bytes_from_seed + s.bytes_from_peers,
        size,
        "peer-1 did not get every byte from the seed: {s:?}"
    );
    assert!(
        metric(cluster.peer(1), "damselfly_quic_connections").await >= 1,
        "peer-1 opened no QUIC connection"
    );
    assert!(
        metric(cluster.seed(1), "damselfly_quic_streams_served").await >= 1,
        "the seed served no QUIC stream"
    );
    assert!(metric(cluster.peer(1), "damselfly_tls_parent_handshakes").await >= 1);
    assert!(metric(cluster.seed(1), "damselfly_tls_handshakes").await >= 1);
    assert_eq!(
        metric(cluster.seed(1), "damselfly_tls_handshakes_failed").await,
        0
    );
}

/// Without `data_plane.tls` QUIC could not authenticate parents, so dfdaemon stops at start
/// and says why, instead of serving unauthenticated QUIC.
#[test]
fn quic_without_data_plane_tls_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("quic.yaml");
    std::fs::write(
        &cfg,
        "data_plane:\n  transport: quic\n  quic_listen: \"127.0.0.1:0\"\n",
    )
    .expect("config");
    let mut child = Command::new(bin_path("dfdaemon").expect("dfdaemon"))
        .args(["--config", &cfg.display().to_string()])
        .args(["--data-dir", &dir.path().join("data").display().to_string()])
        .args(["--socket", &dir.path().join("d.sock").display().to_string()])
        .args(["--data-port", "0", "--metrics", "127.0.0.1:0"])
        .args(["--scheduler", "127.0.0.1:9"])
        .env_remove("DFDAEMON_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dfdaemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for dfdaemon") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dfdaemon with QUIC and no data_plane.tls is still running after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(!status.success(), "dfdaemon exited successfully:\n{err}");
    assert!(
        err.contains("data_plane.transport: quic needs data_plane.tls"),
        "the error does not say QUIC needs data_plane.tls:\n{err}"
    );
}
