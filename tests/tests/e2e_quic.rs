//! Daemons configured with `data_plane.transport: quic` move pieces between each other over
//! QUIC: a peer downloads a file of several pieces that the seed fetched from the origin, the
//! file is checked by its digest, and the daemons' metrics show that the pieces came over
//! QUIC (fetch connections opened over QUIC on the peer, QUIC streams served by the seed).

use testkit::{Cluster, ClusterOptions, Daemon, Origin};

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
    let cfg = cfg_dir.path().join("quic.yaml");
    std::fs::write(
        &cfg,
        "data_plane:\n  transport: quic\n  quic_listen: \"127.0.0.1:0\"\n",
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
}
