//! TLS on the data plane's TCP connections, in process on loopback with certificates made at
//! run time: a child with a certificate from the configured CA fetches a task; a child with
//! a certificate from another CA, with none, or speaking plaintext is refused by the parent;
//! a parent whose certificate is from another CA is refused by the child.

use damselfly_dataplane::fetch::{FetchConfig, Transport};
use damselfly_dataplane::quic::QuicConfig;
use damselfly_dataplane::shaper::{Shaping, ShapingConfig};
use damselfly_dataplane::tls::DataTls;
use damselfly_dataplane::{Command, Counters, DataPlane, DataPlaneConfig, Event, Parent, Storage};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::tls::TlsConfig;
use wire::{PieceLayout, TaskId};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    path: PathBuf,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).expect("CA");
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).expect("write CA");
    Ca { cert, key, path }
}

/// A leaf for 127.0.0.1 signed by `ca`: (cert, key) files.
fn leaf(dir: &Path, ca: &Ca, name: &str) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("leaf");
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, key.serialize_pem()).expect("write key");
    (c, k)
}

struct Node {
    _dir: tempfile::TempDir,
    storage: Arc<Storage>,
    counters: Arc<Counters>,
    dp: DataPlane,
}

fn node(tls: Option<DataTls>) -> Node {
    node_with(tls, None)
}

/// A node serving and fetching over QUIC with `tls` (the `data_plane.tls` section).
fn quic_node(tls: &TlsConfig) -> Node {
    node_with(None, Some(tls.clone()))
}

fn node_with(tls: Option<DataTls>, quic_tls: Option<TlsConfig>) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
    let counters = Arc::new(Counters::default());
    let cfg = DataPlaneConfig {
        threads: 1,
        listen: "127.0.0.1:0".parse().expect("addr"),
        fetch: FetchConfig {
            connect_timeout: Duration::from_secs(3),
            tls: tls.map(Arc::new),
            transport: if quic_tls.is_some() {
                Transport::Quic
            } else {
                Transport::Tcp
            },
            ..FetchConfig::default()
        },
        quic: quic_tls.map(|t| QuicConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            tls: Some(t),
            ..QuicConfig::default()
        }),
        ..DataPlaneConfig::default()
    };
    let dp = DataPlane::start(
        cfg,
        storage.clone(),
        counters.clone(),
        Arc::new(Shaping::new(ShapingConfig::default())),
    )
    .expect("start");
    Node {
        _dir: dir,
        storage,
        counters,
        dp,
    }
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

const PIECE: u64 = 64 << 10;

fn seed(n: &Node, id: TaskId, data: &[u8]) {
    seed_with(n, id, data, PIECE);
}

fn seed_with(n: &Node, id: TaskId, data: &[u8], piece: u64) {
    let layout = PieceLayout::new(data.len() as u64, piece).expect("layout");
    let store = n.storage.create(id, layout).expect("create");
    for p in 0..layout.piece_count() {
        let r = layout.piece_range(p).expect("range");
        let bytes = &data[r.start as usize..r.end as usize];
        store
            .write_piece(p, bytes, wire::piece_crc(bytes))
            .expect("write");
    }
}

/// Child fetches `id` from `parent`; returns the first terminal event: finished, or the
/// parent failed.
fn fetch(child: &Node, parent: &Node, id: TaskId, len: usize) -> Event {
    fetch_with(child, parent, id, len, PIECE)
}

fn fetch_with(child: &Node, parent: &Node, id: TaskId, len: usize, piece: u64) -> Event {
    let layout = PieceLayout::new(len as u64, piece).expect("layout");
    let store = child.storage.create(id, layout).expect("create");
    let t = child.dp.bridge().thread_of(&id);
    child
        .dp
        .bridge()
        .send(
            t,
            Command::Download {
                store,
                parents: vec![Parent {
                    host_id: "parent".into(),
                    addr: parent.dp.local_addr(),
                    quic_addr: parent.dp.quic_addr(),
                    is_seed: true,
                }],
                rate_limit: 0,
            },
        )
        .expect("send");
    futures::executor::block_on(async {
        loop {
            let ev = child.dp.bridge().next_event().await;
            if matches!(
                ev,
                Event::DownloadFinished { .. } | Event::ParentFailed { .. }
            ) {
                return ev;
            }
        }
    })
}

fn tls(ca: &Path, leaf: Option<&(PathBuf, PathBuf)>) -> TlsConfig {
    TlsConfig {
        ca_cert: Some(ca.to_path_buf()),
        cert: leaf.map(|l| l.0.clone()),
        key: leaf.map(|l| l.1.clone()),
        client_auth: true,
        server_name: String::new(),
    }
}

/// Waits (bounded) until `counter` reaches `n` and returns its value: the parent counts
/// after the child has its bytes (or, for a bad client certificate, after the child's side
/// of the handshake is done).
fn wait_counter(counter: &std::sync::atomic::AtomicU64, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = counter.load(Ordering::Relaxed);
        if got >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_failed_handshakes(parent: &Node, n: u64) -> u64 {
    wait_counter(&parent.counters.tls_handshakes_failed, n)
}

#[test]
fn only_children_with_a_certificate_from_the_ca_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = ca(dir.path(), "good-ca");
    let rogue = ca(dir.path(), "rogue-ca");
    let parent_leaf = leaf(dir.path(), &good, "parent");
    let child_leaf = leaf(dir.path(), &good, "child");
    let rogue_leaf = leaf(dir.path(), &rogue, "rogue");

    let parent = node(Some(
        DataTls::new(&tls(&good.path, Some(&parent_leaf))).expect("parent TLS"),
    ));
    let id = TaskId([41; 32]);
    let data = content(5 * PIECE as usize + 1234);
    seed(&parent, id, &data);

    // A child with a certificate from the CA gets every byte.
    let child = node(Some(
        DataTls::new(&tls(&good.path, Some(&child_leaf))).expect("child TLS"),
    ));
    let ev = fetch(&child, &parent, id, data.len());
    assert!(matches!(ev, Event::DownloadFinished { .. }), "{ev:?}");
    let got = std::fs::read(child.storage.get(&id).expect("task").path()).expect("read");
    assert_eq!(got, data, "content fetched over TLS differs");
    assert_eq!(
        child.counters.bytes_from_seed.load(Ordering::Relaxed),
        data.len() as u64
    );
    assert_eq!(
        wait_counter(&parent.counters.bytes_uploaded, data.len() as u64),
        data.len() as u64
    );
    assert_eq!(
        parent
            .counters
            .tls_handshakes_failed
            .load(Ordering::Relaxed),
        0
    );

    // A child whose certificate is signed by another CA is refused.
    let rogue_child = node(Some(
        DataTls::new(&TlsConfig {
            ca_cert: Some(good.path.clone()),
            ..tls(&good.path, Some(&rogue_leaf))
        })
        .expect("rogue child TLS"),
    ));
    let ev = fetch(&rogue_child, &parent, id, data.len());
    assert!(matches!(ev, Event::ParentFailed { .. }), "{ev:?}");
    assert_eq!(wait_failed_handshakes(&parent, 1), 1);

    // A child with no certificate at all is refused.
    let anonymous = node(Some(
        DataTls::client_only(&tls(&good.path, None)).expect("anonymous child TLS"),
    ));
    let ev = fetch(&anonymous, &parent, id, data.len());
    assert!(matches!(ev, Event::ParentFailed { .. }), "{ev:?}");
    assert_eq!(wait_failed_handshakes(&parent, 2), 2);

    // A plaintext child gets nothing either.
    let plain = node(None);
    let ev = fetch(&plain, &parent, id, data.len());
    assert!(matches!(ev, Event::ParentFailed { .. }), "{ev:?}");
    assert_eq!(wait_failed_handshakes(&parent, 3), 3);

    for n in [&rogue_child, &anonymous, &plain] {
        assert_eq!(n.counters.bytes_from_seed.load(Ordering::Relaxed), 0);
        assert_eq!(n.counters.pieces_downloaded.load(Ordering::Relaxed), 0);
    }
    // Only the good child was served.
    assert_eq!(
        parent.counters.bytes_uploaded.load(Ordering::Relaxed),
        data.len() as u64
    );
    for n in [parent, child, rogue_child, anonymous, plain] {
        n.dp.shutdown();
    }
}

#[test]
fn a_parent_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = ca(dir.path(), "good-ca");
    let rogue = ca(dir.path(), "rogue-ca");
    let rogue_parent = leaf(dir.path(), &rogue, "rogue-parent");
    let child_leaf = leaf(dir.path(), &good, "child");
    // The rogue parent trusts the good CA's children, but its own certificate is rogue.
    let parent = node(Some(
        DataTls::new(&TlsConfig {
            client_auth: false,
            ..tls(&good.path, Some(&rogue_parent))
        })
        .expect("parent TLS"),
    ));
    let id = TaskId([42; 32]);
    let data = content(2 * PIECE as usize);
    seed(&parent, id, &data);
    let child = node(Some(
        DataTls::new(&tls(&good.path, Some(&child_leaf))).expect("child TLS"),
    ));
    let ev = fetch(&child, &parent, id, data.len());
    match &ev {
        Event::ParentFailed { reason, .. } => assert!(
            reason.contains("certificate") || reason.contains("UnknownIssuer"),
            "unexpected reason: {reason}"
        ),
        other => panic!("expected the parent to be refused, got {other:?}"),
    }
    assert_eq!(child.counters.bytes_from_seed.load(Ordering::Relaxed), 0);
    assert_eq!(parent.counters.bytes_uploaded.load(Ordering::Relaxed), 0);
    parent.dp.shutdown();
    child.dp.shutdown();
}

#[test]
fn quic_serves_only_children_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = ca(dir.path(), "good-ca");
    let rogue = ca(dir.path(), "rogue-ca");
    let parent_leaf = leaf(dir.path(), &good, "parent");
    let child_leaf = leaf(dir.path(), &good, "child");
    let rogue_leaf = leaf(dir.path(), &rogue, "rogue");
    let parent = quic_node(&tls(&good.path, Some(&parent_leaf)));
    let id = TaskId([43; 32]);
    let data = content(3 * PIECE as usize + 99);
    seed(&parent, id, &data);

    let child = quic_node(&tls(&good.path, Some(&child_leaf)));
    let ev = fetch(&child, &parent, id, data.len());
    assert!(matches!(ev, Event::DownloadFinished { .. }), "{ev:?}");
    let got = std::fs::read(child.storage.get(&id).expect("task").path()).expect("read");
    assert_eq!(got, data);
    assert!(child.counters.quic_connections.load(Ordering::Relaxed) >= 1);

    // Rogue certificate: the QUIC handshake fails, nothing is served.
    let rogue_child = quic_node(&tls(&good.path, Some(&rogue_leaf)));
    let ev = fetch(&rogue_child, &parent, id, data.len());
    assert!(matches!(ev, Event::ParentFailed { .. }), "{ev:?}");
    assert_eq!(
        rogue_child.counters.bytes_from_seed.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        wait_counter(&parent.counters.bytes_uploaded, data.len() as u64),
        data.len() as u64,
        "the parent served more than the good child"
    );
    for n in [parent, child, rogue_child] {
        n.dp.shutdown();
    }
}

#[test]
fn a_bad_certificate_file_is_reported_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = ca(dir.path(), "good-ca");
    let bad = dir.path().join("broken.pem");
    std::fs::write(&bad, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    let e = DataTls::new(&TlsConfig {
        cert: Some(bad.clone()),
        key: Some(bad),
        ..tls(&good.path, None)
    })
    .expect_err("a broken certificate file is an error");
    assert!(e.to_string().contains("broken.pem"), "{e}");
}

/// CPU seconds (user + system) of this process so far, from `/proc/self/stat` (100 Hz
/// ticks).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Not a test: what TLS costs on the data plane. Moves a 512 MiB task (4 MiB pieces) between two data
/// planes on loopback, plaintext (parent uses sendfile) and over TLS (parent reads and
/// encrypts, child decrypts), and prints CPU seconds per GB of both sides together.
/// `cargo test --release -p damselfly-dataplane --test tls -- --ignored --nocapture tls_cost`
#[test]
#[ignore]
fn tls_cost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = ca(dir.path(), "good-ca");
    let p_leaf = leaf(dir.path(), &good, "parent");
    let c_leaf = leaf(dir.path(), &good, "child");
    let len = 512usize << 20;
    let data = content(len);
    for (i, with_tls) in [false, true, false, true].into_iter().enumerate() {
        let mk = |l: &(PathBuf, PathBuf)| {
            with_tls.then(|| DataTls::new(&tls(&good.path, Some(l))).expect("TLS"))
        };
        let parent = node(mk(&p_leaf));
        let child = node(mk(&c_leaf));
        let id = TaskId([60 + i as u8; 32]);
        seed_with(&parent, id, &data, 4 << 20);
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let ev = fetch_with(&child, &parent, id, len, 4 << 20);
        let (cpu, wall) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
        assert!(matches!(ev, Event::DownloadFinished { .. }), "{ev:?}");
        let gb = len as f64 / 1e9;
        println!(
            "{}: {:.2} CPU s/GB (both sides), {:.2} GB/s wall",
            if with_tls { "TLS  " } else { "plain" },
            cpu / gb,
            gb / wall
        );
        parent.dp.shutdown();
        child.dp.shutdown();
    }
}
