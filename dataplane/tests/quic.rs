//! The data plane over QUIC: two data planes on loopback, one fetching a task from the other
//! over QUIC streams, checked byte for byte (SHA-256 of the whole file) and by the counters
//! that tell QUIC was used, not the TCP fallback.

use damselfly_dataplane::fetch::{FetchConfig, Transport};
use damselfly_dataplane::quic::QuicConfig;
use damselfly_dataplane::shaper::{Shaping, ShapingConfig};
use damselfly_dataplane::{Command, Counters, DataPlane, DataPlaneConfig, Event, Parent, Storage};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wire::{PieceLayout, TaskId};

struct Node {
    _dir: tempfile::TempDir,
    storage: Arc<Storage>,
    counters: Arc<Counters>,
    dp: DataPlane,
}

fn quic_node(threads: usize, pieces_in_flight: usize) -> Node {
    quic_node_with_payload(
        threads,
        pieces_in_flight,
        QuicConfig::default().max_udp_payload,
    )
}

fn quic_node_with_payload(threads: usize, pieces_in_flight: usize, payload: u16) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
    let counters = Arc::new(Counters::default());
    let cfg = DataPlaneConfig {
        threads,
        listen: "127.0.0.1:0".parse().expect("addr"),
        queue_capacity: 64,
        io_uring: true,
        fetch: FetchConfig {
            pieces_in_flight,
            transport: Transport::Quic,
            ..FetchConfig::default()
        },
        quic: Some(QuicConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            max_udp_payload: payload,
            ..QuicConfig::default()
        }),
        super_seed: None,
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
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seed_task(n: &Node, id: TaskId, data: &[u8], plen: u64) {
    let layout = PieceLayout::new(data.len() as u64, plen).expect("layout");
    let store = n.storage.create(id, layout).expect("create");
    for p in 0..layout.piece_count() {
        let r = layout.piece_range(p).expect("range");
        let bytes = &data[r.start as usize..r.end as usize];
        store
            .write_piece(p, bytes, wire::piece_crc(bytes))
            .expect("write");
    }
}

/// Node `a` as the only parent, a seed reachable over QUIC.
fn seed_parent(a: &Node) -> Vec<Parent> {
    vec![Parent {
        host_id: "a".into(),
        addr: a.dp.local_addr(),
        quic_addr: a.dp.quic_addr(),
        is_seed: true,
    }]
}

fn fetch(c: &Node, id: TaskId, layout: PieceLayout, parents: Vec<Parent>) -> Vec<Event> {
    let store = c.storage.create(id, layout).expect("create");
    let t = c.dp.bridge().thread_of(&id);
    c.dp.bridge()
        .send(
            t,
            Command::Download {
                store,
                parents,
                rate_limit: 0,
            },
        )
        .expect("send");
    let mut seen = Vec::new();
    futures::executor::block_on(async {
        loop {
            let ev = c.dp.bridge().next_event().await;
            let end = matches!(
                ev,
                Event::DownloadFinished { .. }
                    | Event::NeedParents { .. }
                    | Event::StorageFailed { .. }
            );
            seen.push(ev);
            if end {
                return;
            }
        }
    });
    seen
}

#[test]
fn task_moves_over_quic_with_its_digest_intact() {
    let a = quic_node(1, 8);
    let c = quic_node(2, 8);
    let id = TaskId([21; 32]);
    // 40 pieces of 256 KiB and a short last one: several pieces in flight at once.
    let plen = 256 << 10;
    let data = content(40 * plen + 12_345);
    seed_task(&a, id, &data, plen as u64);
    let layout = PieceLayout::new(data.len() as u64, plen as u64).expect("layout");
    let parents = seed_parent(&a);
    let events = fetch(&c, id, layout, parents);
    assert!(
        matches!(events.last(), Some(Event::DownloadFinished { .. })),
        "download did not finish: {events:?}"
    );
    let finished = events
        .iter()
        .filter(|e| matches!(e, Event::PieceFinished { .. }))
        .count();
    assert_eq!(finished, layout.piece_count() as usize);
    let got = std::fs::read(c.storage.get(&id).expect("task").path()).expect("read");
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
    // QUIC carried it: one QUIC fetch connection, one stream served, every byte uploaded.
    assert_eq!(c.counters.quic_connections.load(Ordering::Relaxed), 1);
    assert_eq!(a.counters.quic_streams_served.load(Ordering::Relaxed), 1);
    assert_eq!(
        a.counters.bytes_uploaded.load(Ordering::Relaxed),
        data.len() as u64
    );
    assert_eq!(
        c.counters.bytes_from_seed.load(Ordering::Relaxed),
        data.len() as u64
    );
    assert!(c.counters.max_requests_in_flight.load(Ordering::Relaxed) > 1);
    a.dp.shutdown();
    c.dp.shutdown();
}

/// Loopback-sized packets (16,000 and 65,000 bytes): larger than quinn's default initial
/// congestion window (the handshake used to hang) and, in a 10-datagram GSO batch, than a
/// UDP datagram (whole batches used to be dropped). The task must arrive intact.
#[test]
fn task_moves_over_quic_with_large_udp_payloads() {
    for (i, payload) in [16_000u16, 65_000].into_iter().enumerate() {
        let a = quic_node_with_payload(1, 8, payload);
        let c = quic_node_with_payload(1, 8, payload);
        let id = TaskId([30 + i as u8; 32]);
        let plen = 1 << 20;
        let data = content(8 * plen + 777);
        seed_task(&a, id, &data, plen as u64);
        let layout = PieceLayout::new(data.len() as u64, plen as u64).expect("layout");
        let parents = seed_parent(&a);
        let events = fetch(&c, id, layout, parents);
        assert!(
            matches!(events.last(), Some(Event::DownloadFinished { .. })),
            "payload {payload}: download did not finish: {events:?}"
        );
        let got = std::fs::read(c.storage.get(&id).expect("task").path()).expect("read");
        assert_eq!(
            Sha256::digest(&got),
            Sha256::digest(&data),
            "payload {payload}"
        );
        assert_eq!(c.counters.quic_connections.load(Ordering::Relaxed), 1);
        assert_eq!(
            a.counters.bytes_uploaded.load(Ordering::Relaxed),
            data.len() as u64
        );
        a.dp.shutdown();
        c.dp.shutdown();
    }
}

#[test]
fn parent_without_quic_is_reached_over_tcp() {
    let a = quic_node(1, 4);
    let c = quic_node(1, 4);
    let id = TaskId([22; 32]);
    let data = content(5 * 16384 + 99);
    seed_task(&a, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let parents = vec![Parent {
        host_id: "a".into(),
        addr: a.dp.local_addr(),
        quic_addr: None,
        is_seed: false,
    }];
    let events = fetch(&c, id, layout, parents);
    assert!(matches!(
        events.last(),
        Some(Event::DownloadFinished { .. })
    ));
    let got = std::fs::read(c.storage.get(&id).expect("task").path()).expect("read");
    assert_eq!(got, data);
    assert_eq!(c.counters.quic_connections.load(Ordering::Relaxed), 0);
    assert_eq!(a.counters.quic_streams_served.load(Ordering::Relaxed), 0);
    a.dp.shutdown();
    c.dp.shutdown();
}

/// A parent whose file went bad on disk after the piece was stored: over QUIC the piece bytes
/// are checked straight from quinn's buffers (no copy into a fetch buffer), and the check
/// must still catch it: the piece is reported failed and never marked stored.
#[test]
fn corrupt_piece_over_quic_is_never_stored() {
    let a = quic_node(1, 4);
    let c = quic_node(1, 4);
    let id = TaskId([23; 32]);
    let plen = 256 << 10;
    let data = content(8 * plen);
    seed_task(&a, id, &data, plen as u64);
    // Flip one byte in the middle of piece 3 in the parent's task file.
    let path = a
        .storage
        .get(&id)
        .expect("seeded task")
        .path()
        .to_path_buf();
    let mut bytes = std::fs::read(&path).expect("read seed file");
    let at = 3 * plen + plen / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&path, &bytes).expect("corrupt seed file");
    let layout = PieceLayout::new(data.len() as u64, plen as u64).expect("layout");
    let parents = seed_parent(&a);
    let events = fetch(&c, id, layout, parents);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::PieceFailed { number: 3, .. })),
        "no failure reported for the corrupt piece: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::DownloadFinished { .. })),
        "a download with a corrupt piece finished: {events:?}"
    );
    let store = c.storage.get(&id).expect("task");
    assert!(!store.has(3));
    assert_eq!(c.counters.pieces_corrupt.load(Ordering::Relaxed), 1);
    assert_eq!(c.counters.quic_connections.load(Ordering::Relaxed), 1);
    a.dp.shutdown();
    c.dp.shutdown();
}
