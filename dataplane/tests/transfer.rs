//! In-process data-plane tests: two data planes on loopback, one fetching from the other, and
//! a hostile client feeding the upload server bad frames.

use damselfly_dataplane::fetch::FetchConfig;
use damselfly_dataplane::shaper::{Clock, Shaping, ShapingConfig, VirtualClock, BURST};
use damselfly_dataplane::{
    Command, Counters, DataPlane, DataPlaneConfig, Event, Parent, Storage, TaskStore,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use wire::frame::{self, ErrorCode, Frame};
use wire::{PieceLayout, TaskId};

struct Node {
    _dir: tempfile::TempDir,
    storage: Arc<Storage>,
    counters: Arc<Counters>,
    dp: DataPlane,
}

fn node(threads: usize) -> Node {
    node_with(threads, ShapingConfig::default(), 4)
}

fn node_with(threads: usize, shaping: ShapingConfig, pieces_in_flight: usize) -> Node {
    node_fetch(
        threads,
        shaping,
        FetchConfig {
            pieces_in_flight,
            ..FetchConfig::default()
        },
    )
}

fn node_fetch(threads: usize, shaping: ShapingConfig, fetch: FetchConfig) -> Node {
    node_cfg(
        DataPlaneConfig {
            threads,
            listen: "127.0.0.1:0".parse().expect("addr"),
            queue_capacity: 64,
            io_uring: true,
            fetch,
            quic: None,
            super_seed: None,
        },
        shaping,
    )
}

fn node_cfg(cfg: DataPlaneConfig, shaping: ShapingConfig) -> Node {
    node_shaping(cfg, Shaping::new(shaping))
}

/// A node whose limiters read `clock`.
fn node_clocked(threads: usize, shaping: ShapingConfig, clock: Clock) -> Node {
    node_shaping(
        DataPlaneConfig {
            threads,
            listen: "127.0.0.1:0".parse().expect("addr"),
            queue_capacity: 64,
            io_uring: true,
            fetch: FetchConfig::default(),
            quic: None,
            super_seed: None,
        },
        Shaping::with_clock(shaping, clock),
    )
}

fn node_shaping(cfg: DataPlaneConfig, shaping: Shaping) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
    let counters = Arc::new(Counters::default());
    let dp =
        DataPlane::start(cfg, storage.clone(), counters.clone(), Arc::new(shaping)).expect("start");
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

fn wait_event(n: &Node, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    futures::executor::block_on(async {
        loop {
            let ev = n.dp.bridge().next_event().await;
            let done = pred(&ev);
            seen.push(ev);
            if done {
                return;
            }
        }
    });
    seen
}

/// [`wait_event`], giving up after `limit` (a liveness bound, not a timing claim): `None`
/// when `pred` matched no event by then.
fn wait_event_within(
    n: &Node,
    limit: Duration,
    pred: impl Fn(&Event) -> bool,
) -> Option<Vec<Event>> {
    let (tx, mut timer) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let _ = tx.send(());
    });
    let mut seen = Vec::new();
    futures::executor::block_on(async {
        loop {
            let ev = std::pin::pin!(n.dp.bridge().next_event());
            match futures::future::select(ev, &mut timer).await {
                futures::future::Either::Left((ev, _)) => {
                    let done = pred(&ev);
                    seen.push(ev);
                    if done {
                        return Some(seen);
                    }
                }
                futures::future::Either::Right(_) => return None,
            }
        }
    })
}

#[test]
fn peer_fetches_every_piece_from_two_parents() {
    let a = node(1);
    let b = node(1);
    let c = node(2);
    let id = TaskId([3; 32]);
    let data = content(5 * 16384 + 777);
    seed_task(&a, id, &data, 16384);
    seed_task(&b, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let parents = vec![
        Parent {
            host_id: "a".into(),
            addr: a.dp.local_addr(),
            quic_addr: None,
            is_seed: true,
        },
        Parent {
            host_id: "b".into(),
            addr: b.dp.local_addr(),
            quic_addr: None,
            is_seed: false,
        },
    ];
    let store = start_download(&c, id, layout, parents, 0);
    let events = wait_event(&c, |e| matches!(e, Event::DownloadFinished { .. }));
    let finished = events
        .iter()
        .filter(|e| matches!(e, Event::PieceFinished { .. }))
        .count();
    assert_eq!(finished, layout.piece_count() as usize);
    let got = std::fs::read(store.path()).expect("read");
    assert_eq!(got, data);
    let from_seed = c.counters.bytes_from_seed.load(Ordering::Relaxed);
    let from_peers = c.counters.bytes_from_peers.load(Ordering::Relaxed);
    assert_eq!(from_seed + from_peers, data.len() as u64);
    assert_eq!(
        a.counters.bytes_uploaded.load(Ordering::Relaxed)
            + b.counters.bytes_uploaded.load(Ordering::Relaxed),
        data.len() as u64
    );
    for n in [a, b, c] {
        n.dp.shutdown();
    }
}

#[test]
fn empty_task_finishes_without_transfer() {
    let c = node(1);
    let id = TaskId([4; 32]);
    let layout = PieceLayout::new(0, 16384).expect("layout");
    let events = download(&c, id, layout, vec![], 0);
    assert_eq!(events.len(), 1);
    c.dp.shutdown();
}

#[test]
fn dead_parent_asks_for_new_parents() {
    let c = node(1);
    let id = TaskId([5; 32]);
    // A port nobody listens on.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let parents = vec![Parent {
        host_id: "dead".into(),
        addr: dead,
        quic_addr: None,
        is_seed: false,
    }];
    let layout = PieceLayout::new(100, 16384).expect("layout");
    let store = start_download(&c, id, layout, parents, 0);
    let events = wait_event(&c, |e| matches!(e, Event::NeedParents { .. }));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::ParentFailed { parent, .. } if parent == "dead")));
    assert!(!store.has(0));
    c.dp.shutdown();
}

fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((f, _))) = frame::decode(&buf) {
            return Some(f);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn send(s: &mut TcpStream, f: &Frame) {
    let mut b = bytes::BytesMut::new();
    frame::encode(f, &mut b);
    s.write_all(&b).expect("write");
}

#[test]
fn upload_server_answers_bad_requests_with_errors() {
    let a = node(1);
    let id = TaskId([6; 32]);
    seed_task(&a, id, &content(20_000), 16384);
    let connect = || {
        let s = TcpStream::connect(a.dp.local_addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    };
    // Garbage: one Malformed error, then the server closes.
    let mut s = connect();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    match read_frame(&mut s) {
        Some(Frame::Error { code, .. }) => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("expected a malformed error, got {other:?}"),
    }
    assert!(read_frame(&mut s).is_none(), "connection must be closed");
    // A header declaring a 4 GiB payload is refused before anything is buffered.
    let mut s = connect();
    s.write_all(&[frame::VERSION, 5, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .expect("write");
    assert!(matches!(
        read_frame(&mut s),
        Some(Frame::Error {
            code: ErrorCode::Malformed,
            ..
        })
    ));
    // Unknown task, piece out of range: errors, and the connection keeps working.
    let mut s = connect();
    send(
        &mut s,
        &Frame::PieceRequest {
            task: TaskId([9; 32]),
            number: 0,
        },
    );
    assert!(matches!(
        read_frame(&mut s),
        Some(Frame::Error {
            code: ErrorCode::TaskNotFound,
            ..
        })
    ));
    send(
        &mut s,
        &Frame::PieceRequest {
            task: id,
            number: 2,
        },
    );
    assert!(matches!(
        read_frame(&mut s),
        Some(Frame::Error {
            code: ErrorCode::PieceOutOfRange,
            ..
        })
    ));
    send(
        &mut s,
        &Frame::PieceRequest {
            task: id,
            number: 1,
        },
    );
    match read_frame(&mut s) {
        Some(Frame::Piece(h)) => assert_eq!((h.number, h.length), (1, 20_000 - 16384)),
        other => panic!("expected a piece, got {other:?}"),
    }
    assert!(a.counters.malformed_frames.load(Ordering::Relaxed) >= 2);
    a.dp.shutdown();
}

/// A fake parent on loopback holding one task of one 16 KiB piece: it accepts one
/// connection, answers bitmap requests with that piece, and hands every piece request to
/// `on_piece` (the stream, task, piece number), which answers it and says whether to go on
/// serving. Returns the parent's address and its thread, which yields the piece requests seen.
fn one_piece_parent(
    mut on_piece: impl FnMut(&mut TcpStream, TaskId, u32) -> bool + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<u32>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut requests = 0;
        while let Some(f) = read_frame(&mut s) {
            match f {
                Frame::BitmapRequest { task, .. } => send(
                    &mut s,
                    &Frame::Bitmap {
                        task,
                        content_length: 16384,
                        piece_length: 16384,
                        piece_count: 1,
                        bits: vec![1],
                    },
                ),
                Frame::PieceRequest { task, number } => {
                    requests += 1;
                    if !on_piece(&mut s, task, number) {
                        break;
                    }
                }
                _ => break,
            }
        }
        requests
    });
    (addr, fake)
}

/// Sends the header of a 16 KiB piece with checksum `crc32c`.
fn send_piece_header(s: &mut TcpStream, task: TaskId, number: u32, crc32c: u32) {
    send(
        s,
        &Frame::Piece(frame::PieceHeader {
            task,
            number,
            offset: 0,
            length: 16384,
            crc32c,
        }),
    );
}

#[test]
fn corrupt_piece_is_never_stored() {
    // A fake parent that sends every piece with a wrong crc32c.
    let id = TaskId([8; 32]);
    let data = content(16384);
    let data2 = data.clone();
    let (addr, fake) = one_piece_parent(move |s, task, number| {
        send_piece_header(s, task, number, wire::piece_crc(&data2) ^ 0xdead);
        s.write_all(&data2).expect("write");
        true
    });
    let c = node(1);
    let parents = vec![Parent {
        host_id: "evil".into(),
        addr,
        quic_addr: None,
        is_seed: false,
    }];
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let store = start_download(&c, id, layout, parents, 0);
    let events = wait_event(&c, |e| matches!(e, Event::NeedParents { .. }));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::PieceFailed { parent, .. } if parent == "evil")));
    assert!(!store.has(0));
    assert_eq!(c.counters.pieces_corrupt.load(Ordering::Relaxed), 1);
    assert_eq!(fake.join().expect("fake parent"), 1);
    c.dp.shutdown();
}

/// A parent that forges a piece: other bytes, with their own (so matching) crc32c. With the
/// piece's trusted digest known, the bytes are never marked stored (so never served), the
/// parent is reported (`PieceFailed`) and dropped, and an honest parent then supplies the
/// piece.
#[test]
fn a_forged_piece_with_a_matching_crc_is_never_stored() {
    let id = TaskId([11; 32]);
    let data = content(16384);
    let mut forged = data.clone();
    forged[100] ^= 0x01;
    let forged_crc = wire::piece_crc(&forged);
    let (evil, evil_thread) = one_piece_parent(move |s, task, number| {
        send_piece_header(s, task, number, forged_crc);
        s.write_all(&forged).expect("write");
        true
    });
    let c = node(1);
    let layout = PieceLayout::new(16384, 16384).expect("layout");
    let store = c.storage.create(id, layout).expect("create");
    store.require_digests();
    assert_eq!(store.set_digest(0, wire::piece_digest(&data)), Ok(true));
    let parent = |host_id: &str, addr| Parent {
        host_id: host_id.into(),
        addr,
        quic_addr: None,
        is_seed: false,
    };
    start_download(&c, id, layout, vec![parent("evil", evil)], 0);
    let events = wait_event(&c, |e| matches!(e, Event::NeedParents { .. }));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::PieceFailed { parent, reason, .. }
            if parent == "evil" && reason.contains("forged"))),
        "{events:?}"
    );
    assert!(events.iter().any(
        |e| matches!(e, Event::ParentFailed { parent, forged: true, .. } if parent == "evil")
    ));
    assert!(!store.has(0), "forged bytes were marked stored");
    assert_eq!(c.counters.pieces_forged.load(Ordering::Relaxed), 1);
    assert_eq!(evil_thread.join().expect("fake parent"), 1);

    let honest_data = data.clone();
    let (honest, honest_thread) = one_piece_parent(move |s, task, number| {
        send_piece_header(s, task, number, wire::piece_crc(&honest_data));
        s.write_all(&honest_data).expect("write");
        true
    });
    c.dp.bridge()
        .send(
            c.dp.bridge().thread_of(&id),
            Command::AddParents {
                task: id,
                parents: vec![parent("honest", honest)],
            },
        )
        .expect("send");
    wait_event(&c, |e| matches!(e, Event::DownloadFinished { .. }));
    let mut buf = Vec::new();
    store.read_piece(0, &mut buf).expect("stored");
    assert_eq!(buf, data);
    assert_eq!(c.counters.pieces_forged.load(Ordering::Relaxed), 1);
    c.dp.shutdown();
    honest_thread.join().expect("honest parent");
}

/// A piece that arrives before its trusted digest is held (not stored) until the digest
/// comes, then checked and stored.
#[test]
fn a_piece_is_held_until_its_digest_arrives() {
    let id = TaskId([12; 32]);
    let data = content(16384);
    let served = data.clone();
    let (addr, fake) = one_piece_parent(move |s, task, number| {
        send_piece_header(s, task, number, wire::piece_crc(&served));
        s.write_all(&served).expect("write");
        true
    });
    let c = node(1);
    let layout = PieceLayout::new(16384, 16384).expect("layout");
    let store = c.storage.create(id, layout).expect("create");
    store.require_digests();
    start_download(
        &c,
        id,
        layout,
        vec![Parent {
            host_id: "early".into(),
            addr,
            quic_addr: None,
            is_seed: false,
        }],
        0,
    );
    // The piece is received and waits for its digest (no fixed sleep: the counter says so).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.counters.digest_waits.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no piece waited for its digest"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!store.has(0), "stored before its digest was known");
    assert_eq!(store.set_digest(0, wire::piece_digest(&data)), Ok(true));
    wait_event(&c, |e| matches!(e, Event::DownloadFinished { .. }));
    assert!(store.has(0));
    assert_eq!(c.counters.pieces_forged.load(Ordering::Relaxed), 0);
    c.dp.shutdown();
    fake.join().expect("fake parent");
}

/// A fake one-piece parent that sends the piece's header and half its bytes, then nothing,
/// keeping the connection open until the returned sender is used (or 60 s pass).
fn half_a_piece_then_silence() -> (
    SocketAddr,
    std::thread::JoinHandle<u32>,
    std::sync::mpsc::Sender<()>,
) {
    let data = content(16384);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (addr, fake) = one_piece_parent(move |s, task, number| {
        send_piece_header(s, task, number, wire::piece_crc(&data));
        s.write_all(&data[..8192]).expect("write");
        let _ = stop_rx.recv_timeout(Duration::from_secs(60));
        false
    });
    (addr, fake, stop_tx)
}

/// A parent that sends a piece header and half the piece, then nothing (connection open):
/// the fetcher drops it after `piece_timeout` of silence mid-piece and asks for parents,
/// with the piece neither stored nor left in flight. Before 2026-12-06 only the wait for a
/// header had a timeout: a parent stalled mid-body held the download until the daemon's
/// stall watchdog.
#[test]
fn a_parent_stalled_mid_piece_is_dropped_after_the_piece_timeout() {
    let id = TaskId([10; 32]);
    let (addr, fake, stop_tx) = half_a_piece_then_silence();
    let c = node_fetch(
        1,
        ShapingConfig::default(),
        FetchConfig {
            piece_timeout: Duration::from_millis(500),
            ..FetchConfig::default()
        },
    );
    let parents = vec![Parent {
        host_id: "stalled".into(),
        addr,
        quic_addr: None,
        is_seed: false,
    }];
    let layout = PieceLayout::new(16384, 16384).expect("layout");
    let store = start_download(&c, id, layout, parents, 0);
    // Without the timeout on the body the fetcher waits as long as the fake parent holds
    // the connection (60 s); the bound below is a liveness bound, 60× the piece timeout.
    let dropped = wait_event_within(&c, Duration::from_secs(30), |e| {
        matches!(e, Event::NeedParents { .. })
    });
    let _ = stop_tx.send(());
    assert!(
        dropped.is_some(),
        "the stalled parent was not dropped while it held the connection open"
    );
    assert!(!store.has(0));
    fake.join().expect("fake parent");
    c.dp.shutdown();
}

/// A parent that sends a header and half the piece, then nothing with the connection open,
/// is dropped on `parent_idle_timeout` alone (the piece timeout here is an hour), reported
/// as stalled (so the daemon tells the scheduler at once), and the fetcher asks for parents.
#[test]
fn a_silent_parent_is_dropped_after_the_idle_timeout_whatever_the_piece_timeout() {
    let id = TaskId([11; 32]);
    let (addr, fake, stop_tx) = half_a_piece_then_silence();
    let c = node_fetch(
        1,
        ShapingConfig::default(),
        FetchConfig {
            piece_timeout: Duration::from_secs(3600),
            parent_idle_timeout: Duration::from_millis(500),
            ..FetchConfig::default()
        },
    );
    let parents = vec![Parent {
        host_id: "silent".into(),
        addr,
        quic_addr: None,
        is_seed: false,
    }];
    let layout = PieceLayout::new(16384, 16384).expect("layout");
    let store = start_download(&c, id, layout, parents, 0);
    // Without idle detection the fetcher waits for the piece timeout (an hour); the bound
    // is a liveness bound, 60× the idle timeout.
    let events = wait_event_within(&c, Duration::from_secs(30), |e| {
        matches!(e, Event::NeedParents { .. })
    });
    let _ = stop_tx.send(());
    let events = events.expect("the silent parent was not dropped while it held the connection");
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::ParentFailed { parent, stalled: true, reason, .. }
                if parent == "silent" && reason.contains("no byte for")
        )),
        "{events:?}"
    );
    assert!(!store.has(0));
    fake.join().expect("fake parent");
    c.dp.shutdown();
}

/// A parent that sends a piece slowly but steadily (a byte run every 100 ms, the whole
/// piece taking longer than the idle timeout) is not dropped: the bound is on silence, not
/// on the piece.
#[test]
fn a_slow_parent_that_keeps_sending_is_not_dropped() {
    let id = TaskId([12; 32]);
    let data = content(16384);
    let data2 = data.clone();
    let (addr, fake) = one_piece_parent(move |s, task, number| {
        send_piece_header(s, task, number, wire::piece_crc(&data2));
        for chunk in data2.chunks(1024) {
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(chunk).expect("write");
        }
        true
    });
    let c = node_fetch(
        1,
        ShapingConfig::default(),
        FetchConfig {
            parent_idle_timeout: Duration::from_secs(1),
            ..FetchConfig::default()
        },
    );
    let parents = vec![Parent {
        host_id: "slow".into(),
        addr,
        quic_addr: None,
        is_seed: false,
    }];
    let layout = PieceLayout::new(16384, 16384).expect("layout");
    let store = start_download(&c, id, layout, parents, 0);
    let events = wait_event(&c, |e| {
        matches!(
            e,
            Event::DownloadFinished { .. } | Event::NeedParents { .. }
        )
    });
    assert!(
        matches!(events.last(), Some(Event::DownloadFinished { .. })),
        "{events:?}"
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, Event::ParentFailed { .. })));
    assert_eq!(std::fs::read(store.path()).expect("read"), data);
    c.dp.shutdown();
    fake.join().expect("fake parent");
}

/// A parent under an upload limit sends a 1 MiB piece at 256 KiB/s (4 s). It pays for the
/// piece in small steps and sends each at once, so a child with a 1.5 s idle timeout sees
/// bytes all along and keeps it. Paying for the whole piece before its header (as before)
/// kept the connection silent for ~4 s and got the parent dropped.
#[test]
fn a_rate_limited_parent_sends_as_it_pays_and_is_not_dropped_for_silence() {
    let a = node_with(
        1,
        ShapingConfig {
            per_peer_upload: 256 << 10,
            ..ShapingConfig::default()
        },
        4,
    );
    let id = TaskId([13; 32]);
    let data = content(1 << 20);
    seed_task(&a, id, &data, 1 << 20);
    let c = node_fetch(
        1,
        ShapingConfig::default(),
        FetchConfig {
            parent_idle_timeout: Duration::from_millis(1500),
            ..FetchConfig::default()
        },
    );
    let layout = PieceLayout::new(data.len() as u64, 1 << 20).expect("layout");
    let store = start_download(&c, id, layout, vec![parent("a", &a, false)], 0);
    let events = wait_event(&c, |e| {
        matches!(
            e,
            Event::DownloadFinished { .. } | Event::NeedParents { .. }
        )
    });
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::ParentFailed { .. })),
        "the limited parent was dropped: {events:?}"
    );
    assert!(
        matches!(events.last(), Some(Event::DownloadFinished { .. })),
        "{events:?}"
    );
    assert_eq!(std::fs::read(store.path()).expect("read"), data);
    for n in [a, c] {
        n.dp.shutdown();
    }
}

/// Creates the task on `c` and starts its download from `parents`.
fn start_download(
    c: &Node,
    id: TaskId,
    layout: PieceLayout,
    parents: Vec<Parent>,
    rate_limit: u64,
) -> Arc<TaskStore> {
    let store = c.storage.create(id, layout).expect("create");
    c.dp.bridge()
        .send(
            c.dp.bridge().thread_of(&id),
            Command::Download {
                store: store.clone(),
                parents,
                rate_limit,
            },
        )
        .expect("send");
    store
}

/// [`start_download`], then waits for the download to finish.
fn download(
    c: &Node,
    id: TaskId,
    layout: PieceLayout,
    parents: Vec<Parent>,
    rate_limit: u64,
) -> Vec<Event> {
    start_download(c, id, layout, parents, rate_limit);
    wait_event(c, |e| matches!(e, Event::DownloadFinished { .. }))
}

#[test]
fn pipelining_keeps_the_window_full() {
    let a = node(1);
    let c = node_with(1, ShapingConfig::default(), 6);
    let id = TaskId([10; 32]);
    let data = content(20 * 16384);
    seed_task(&a, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let parents = vec![Parent {
        host_id: "a".into(),
        addr: a.dp.local_addr(),
        quic_addr: None,
        is_seed: false,
    }];
    download(&c, id, layout, parents, 0);
    // On loopback the request window grows from two to its cap of six as soon as the
    // connection's rate is measured.
    assert_eq!(c.counters.max_requests_in_flight.load(Ordering::Relaxed), 6);
    assert_eq!(
        std::fs::read(c.storage.get(&id).expect("task").path()).expect("read"),
        data
    );
    a.dp.shutdown();
    c.dp.shutdown();
}

#[test]
fn byte_window_bounds_requests_in_flight() {
    let a = node(1);
    let c = node_fetch(
        1,
        ShapingConfig::default(),
        FetchConfig {
            pieces_in_flight: 8,
            bytes_in_flight: 3 * 16384,
            ..FetchConfig::default()
        },
    );
    let id = TaskId([13; 32]);
    let data = content(20 * 16384);
    seed_task(&a, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let parents = vec![Parent {
        host_id: "a".into(),
        addr: a.dp.local_addr(),
        quic_addr: None,
        is_seed: false,
    }];
    download(&c, id, layout, parents, 0);
    // Three pieces fill the byte window before the piece window of eight (the rate-based
    // window would allow more on loopback).
    assert_eq!(c.counters.max_requests_in_flight.load(Ordering::Relaxed), 3);
    assert_eq!(
        std::fs::read(c.storage.get(&id).expect("task").path()).expect("read"),
        data
    );
    a.dp.shutdown();
    c.dp.shutdown();
}

#[test]
fn shaping_settings_reach_both_directions() {
    let id = TaskId([11; 32]);
    let data = content(16 * 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    // Upload limit on the parent, none on the child.
    let a = node_with(
        1,
        ShapingConfig {
            upload: 2_000_000,
            ..ShapingConfig::default()
        },
        4,
    );
    let c = node(1);
    seed_task(&a, id, &data, 16384);
    let parents = vec![Parent {
        host_id: "a".into(),
        addr: a.dp.local_addr(),
        quic_addr: None,
        is_seed: false,
    }];
    download(&c, id, layout, parents, 0);
    assert!(
        a.counters.shaping_waits.load(Ordering::Relaxed) > 0,
        "uploader never waited for its limit"
    );
    assert_eq!(c.counters.shaping_waits.load(Ordering::Relaxed), 0);
    // Download limit on the child, none on the parent.
    let b = node(1);
    let d = node_with(
        1,
        ShapingConfig {
            download: 2_000_000,
            ..ShapingConfig::default()
        },
        4,
    );
    seed_task(&b, id, &data, 16384);
    let parents = vec![Parent {
        host_id: "b".into(),
        addr: b.dp.local_addr(),
        quic_addr: None,
        is_seed: false,
    }];
    download(&d, id, layout, parents, 0);
    assert!(
        d.counters.shaping_waits.load(Ordering::Relaxed) > 0,
        "downloader never waited for its limit"
    );
    assert_eq!(b.counters.shaping_waits.load(Ordering::Relaxed), 0);
    assert_eq!(
        std::fs::read(d.storage.get(&id).expect("task").path()).expect("read"),
        data
    );
    for n in [a, b, c, d] {
        n.dp.shutdown();
    }
}

/// A download's own rate limit (dfget `--rate-limit`) paces every byte. The fetcher's
/// limiters read a virtual clock, so the download runs at full speed and the clock shows how
/// long the limit made it take: the file's bytes at the rate, less the one burst the limiter
/// lets through at once. Nothing here depends on how fast the machine is.
#[test]
fn per_download_rate_limit_applies() {
    let a = node(1);
    let clock = VirtualClock::new();
    let c = node_clocked(1, ShapingConfig::default(), Clock::Virtual(clock.clone()));
    let id = TaskId([12; 32]);
    let data = content(64 * 16384);
    seed_task(&a, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let parents = vec![Parent {
        host_id: "a".into(),
        addr: a.dp.local_addr(),
        quic_addr: None,
        is_seed: false,
    }];
    let rate = 2_000_000u64;
    let events = download(&c, id, layout, parents, rate);
    assert!(
        matches!(events.last(), Some(Event::DownloadFinished { .. })),
        "{events:?}"
    );
    let store = c.storage.get(&id).expect("the task is stored");
    let got = std::fs::read(store.path()).expect("read");
    assert_eq!(got, data);
    // Every piece once (a duplicate would be charged twice).
    assert_eq!(c.counters.pieces_downloaded.load(Ordering::Relaxed), 64);
    // 1 MiB at 2 MB/s is 524.288 ms; the first 50 ms (the burst) need no wait.
    let cost = Duration::from_nanos(data.len() as u64 * 1_000_000_000 / rate);
    assert_eq!(
        clock.now(),
        cost - BURST,
        "time the limit made the download take"
    );
    assert!(c.counters.shaping_waits.load(Ordering::Relaxed) > 0);
    // The same download without a limit takes no time on the clock.
    let id2 = TaskId([13; 32]);
    seed_task(&a, id2, &data, 16384);
    let before = clock.now();
    download(
        &c,
        id2,
        layout,
        vec![Parent {
            host_id: "a".into(),
            addr: a.dp.local_addr(),
            quic_addr: None,
            is_seed: false,
        }],
        0,
    );
    assert_eq!(clock.now(), before);
    a.dp.shutdown();
    c.dp.shutdown();
}

fn parent(id: &str, n: &Node, is_seed: bool) -> Parent {
    Parent {
        host_id: id.into(),
        addr: n.dp.local_addr(),
        quic_addr: None,
        is_seed,
    }
}

/// The control plane often sends `Download` and `AddParents` for a task back to back; the
/// data plane once handled the second before the first had made the session, and the added
/// parents were silently dropped (lab: peers kept 2–3 of the 5 parents the scheduler gave
/// them). Checked by reverting `fetch::start_download` to create the session in its task:
/// `b` then uploads nothing.
#[test]
fn parents_added_right_after_the_download_starts_are_used() {
    // Parent a uploads at 2 MB/s, so the 1 MiB takes it ~0.5 s: long enough that b, added
    // a moment later, is asked for pieces however slowly its connection comes up (an
    // unlimited a could send everything first on a busy machine, and b would rightly be
    // asked for nothing).
    let a = node_with(
        1,
        ShapingConfig {
            upload: 2_000_000,
            ..ShapingConfig::default()
        },
        4,
    );
    let b = node(1);
    let c = node_with(1, ShapingConfig::default(), 2);
    let id = TaskId([21; 32]);
    let data = content(64 * 16384);
    seed_task(&a, id, &data, 16384);
    seed_task(&b, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let store = start_download(&c, id, layout, vec![parent("a", &a, false)], 0);
    // Queued right behind the Download, as the control plane does.
    c.dp.bridge()
        .send(
            c.dp.bridge().thread_of(&id),
            Command::AddParents {
                task: id,
                parents: vec![parent("b", &b, false)],
            },
        )
        .expect("send");
    wait_event(&c, |e| matches!(e, Event::DownloadFinished { .. }));
    assert_eq!(std::fs::read(store.path()).expect("read"), data);
    let from_b = b.counters.bytes_uploaded.load(Ordering::Relaxed);
    assert!(
        from_b > 0,
        "the parent added right after the start was never asked"
    );
    for n in [a, b, c] {
        n.dp.shutdown();
    }
}

/// A super-seeding seed sends every piece once before any twice: three children that can
/// only reach the seed each get the whole file, the seed's first copies are exactly the
/// pieces, and the rest went out as later copies only after that.
#[test]
fn a_super_seed_sends_each_piece_once_before_any_twice() {
    let seed = node_cfg(
        DataPlaneConfig {
            threads: 1,
            listen: "127.0.0.1:0".parse().expect("addr"),
            queue_capacity: 64,
            super_seed: Some(2),
            ..DataPlaneConfig::default()
        },
        ShapingConfig::default(),
    );
    let id = TaskId([22; 32]);
    let data = content(24 * 16384);
    seed_task(&seed, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let kids: Vec<Node> = (0..3).map(|_| node(1)).collect();
    let handles: Vec<_> = kids
        .iter()
        .map(|k| start_download(k, id, layout, vec![parent("seed", &seed, true)], 0))
        .collect();
    for (k, store) in kids.iter().zip(&handles) {
        wait_event(k, |e| matches!(e, Event::DownloadFinished { .. }));
        assert_eq!(std::fs::read(store.path()).expect("read"), data);
    }
    let c = &seed.counters;
    assert_eq!(
        c.first_copies_uploaded.load(Ordering::Relaxed),
        u64::from(layout.piece_count()),
        "each piece left the seed once as a first copy"
    );
    assert_eq!(
        c.pieces_uploaded.load(Ordering::Relaxed),
        3 * u64::from(layout.piece_count())
    );
    for n in kids.into_iter().chain([seed]) {
        n.dp.shutdown();
    }
}

/// A child that already holds the lowest pieces (it got them from a seed that died) and
/// has only a super-seeding seed left: the seed's plan assigns first copies lowest first,
/// so the child is first shown pieces it holds and asks for none. Once those assignments
/// expire it is shown everything and finishes. Before, it was shown the same held pieces
/// after every expiry and waited for the daemon's stall watchdog (60 s in the e2e test
/// `a_seed_killed_mid_transfer_is_replaced_and_the_download_finishes`, 2 runs of 8).
#[test]
fn a_child_holding_the_first_pieces_gets_the_rest_from_a_super_seed() {
    let seed = node_cfg(
        DataPlaneConfig {
            threads: 1,
            listen: "127.0.0.1:0".parse().expect("addr"),
            queue_capacity: 64,
            super_seed: Some(2),
            ..DataPlaneConfig::default()
        },
        ShapingConfig::default(),
    );
    let id = TaskId([23; 32]);
    let data = content(24 * 16384);
    seed_task(&seed, id, &data, 16384);
    let layout = PieceLayout::new(data.len() as u64, 16384).expect("layout");
    let kid = node(1);
    let store = kid.storage.create(id, layout).expect("create");
    for p in 0..10 {
        let r = layout.piece_range(p).expect("range");
        let bytes = &data[r.start as usize..r.end as usize];
        store
            .write_piece(p, bytes, wire::piece_crc(bytes))
            .expect("write");
    }
    kid.dp
        .bridge()
        .send(
            kid.dp.bridge().thread_of(&id),
            Command::Download {
                store: store.clone(),
                parents: vec![parent("seed", &seed, true)],
                rate_limit: 0,
            },
        )
        .expect("send");
    // Without the fix the child long-polls forever; the bound is a liveness bound (the
    // assignments expire after 2 s).
    let finished = wait_event_within(&kid, Duration::from_secs(60), |e| {
        matches!(e, Event::DownloadFinished { .. })
    });
    assert!(
        finished.is_some(),
        "the child never got the pieces it lacked from the super seed"
    );
    assert_eq!(std::fs::read(store.path()).expect("read"), data);
    assert_eq!(
        seed.counters.pieces_uploaded.load(Ordering::Relaxed),
        14,
        "the seed sent exactly the 14 pieces the child lacked"
    );
    for n in [kid, seed] {
        n.dp.shutdown();
    }
}
