//! The data plane of a real dfdaemon against hostile and edge-case input on its TCP port:
//! garbage, unknown tasks, pieces past the end, oversize frame headers. The daemon must answer
//! with the right error frames (or close the connection) and keep serving.

use std::net::SocketAddr;
use testkit::frames::{FrameConn, DEFAULT_REPLY_TIMEOUT};
use testkit::{Cluster, ClusterOptions, Daemon, Origin};
use wire::frame::{ErrorCode, Frame, HEADER_LEN, VERSION};
use wire::task::TaskIdOptions;
use wire::TaskId;

const MIB: u64 = 1 << 20;

async fn one_daemon() -> Cluster {
    Cluster::start(ClusterOptions::sized(0, 1))
        .await
        .expect("starting the cluster")
}

fn unknown_task() -> TaskId {
    TaskId::from_url(
        "http://127.0.0.1:9/never-downloaded",
        &TaskIdOptions::default(),
    )
    .expect("task id")
}

/// Sends one request on a fresh connection and returns the reply (`None`: closed).
async fn ask(addr: SocketAddr, f: &Frame) -> Option<Frame> {
    let mut c = FrameConn::connect(addr).await.expect("connect");
    c.send(f).await.expect("send");
    c.recv_timeout(DEFAULT_REPLY_TIMEOUT)
        .await
        .expect("a reply or a close")
}

fn assert_error(reply: Option<Frame>, code: ErrorCode, what: &str) {
    match reply {
        Some(Frame::Error { code: c, .. }) if c == code => {}
        other => panic!("{what}: expected an Error frame with code {code:?}, got {other:?}"),
    }
}

/// The daemon still runs and answers a BitmapRequest for an unknown task with TaskNotFound.
async fn assert_still_serving(d: &Daemon, after: &str) {
    assert!(d.is_running(), "{} died after {after}", d.name);
    let reply = ask(
        d.data_addr,
        &Frame::BitmapRequest {
            task: unknown_task(),
            known: 0,
            wait_ms: 0,
        },
    )
    .await;
    assert_error(
        reply,
        ErrorCode::TaskNotFound,
        &format!("BitmapRequest for an unknown task after {after}"),
    );
    assert!(d.is_running(), "{} died after {after}", d.name);
}

/// After bad input the daemon either sends Error(Malformed) or closes; nothing else.
async fn expect_malformed_or_close(conn: &mut FrameConn, what: &str) {
    match conn.recv_timeout(DEFAULT_REPLY_TIMEOUT).await {
        Ok(None) => {}
        Ok(Some(Frame::Error {
            code: ErrorCode::Malformed,
            ..
        })) => {
            assert!(
                conn.closed_within(DEFAULT_REPLY_TIMEOUT).await,
                "{what}: the daemon sent Malformed but did not close the connection"
            );
        }
        Ok(Some(other)) => panic!("{what}: expected Error(Malformed) or a close, got {other:?}"),
        Err(e) => panic!("{what}: expected Error(Malformed) or a close: {e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_malformed_or_close_and_the_daemon_keeps_serving() {
    let cluster = one_daemon().await;
    let d = cluster.peer(1);
    let mut c = FrameConn::connect(d.data_addr).await.expect("connect");
    let mut garbage = vec![0xEEu8; 64];
    garbage[0] = VERSION.wrapping_add(41);
    c.send_raw(&garbage).await.expect("send garbage");
    expect_malformed_or_close(&mut c, "garbage with a bad version byte").await;
    assert_still_serving(d, "garbage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piece_request_for_an_unknown_task_is_task_not_found() {
    let cluster = one_daemon().await;
    let d = cluster.peer(1);
    let reply = ask(
        d.data_addr,
        &Frame::PieceRequest {
            task: unknown_task(),
            number: 0,
        },
    )
    .await;
    assert_error(
        reply,
        ErrorCode::TaskNotFound,
        "PieceRequest for an unknown task",
    );
    assert_still_serving(d, "a PieceRequest for an unknown task").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_task_serves_pieces_and_refuses_pieces_past_the_end() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 1))
        .await
        .expect("starting the cluster");
    let d = cluster.peer(1);
    let content = origin.add_file("/dp.bin", 3 * MIB + 5, 5);
    let url = origin.url("/dp.bin");
    let out = cluster.dir().join("dp.out");
    cluster
        .download_verified(d, &url, &out, &content)
        .await
        .expect("download through peer-1");
    let task = TaskId::from_url(&url, &TaskIdOptions::default()).expect("task id");

    let reply = ask(
        d.data_addr,
        &Frame::BitmapRequest {
            task,
            known: 0,
            wait_ms: 0,
        },
    )
    .await;
    let Some(Frame::Bitmap {
        content_length,
        piece_length,
        piece_count,
        bits,
        ..
    }) = reply
    else {
        panic!("BitmapRequest for the downloaded task: expected a Bitmap, got {reply:?}");
    };
    assert_eq!(content_length, content.size, "Bitmap content_length");
    assert!(piece_length > 0, "Bitmap piece_length is 0");
    assert_eq!(
        u64::from(piece_count),
        content.size.div_ceil(u64::from(piece_length)),
        "Bitmap piece_count"
    );
    for n in 0..piece_count {
        assert!(
            wire::frame::bitmap_get(&bits, n),
            "peer-1 finished the download but its bitmap lacks piece {n}"
        );
    }

    // A real piece: header fields and bytes match the content.
    let last = piece_count - 1;
    let mut c = FrameConn::connect(d.data_addr).await.expect("connect");
    c.send(&Frame::PieceRequest { task, number: last })
        .await
        .expect("send");
    let reply = c.recv_timeout(DEFAULT_REPLY_TIMEOUT).await.expect("reply");
    let Some(Frame::Piece(h)) = reply else {
        panic!("PieceRequest for piece {last}: expected a Piece, got {reply:?}");
    };
    let offset = u64::from(last) * u64::from(piece_length);
    assert_eq!((h.task, h.number, h.offset), (task, last, offset));
    assert_eq!(u64::from(h.length), content.size - offset);
    let bytes = c.read_raw(h.length as usize).await.expect("piece bytes");
    assert_eq!(
        h.crc32c,
        wire::piece_crc(&bytes),
        "crc32c in the header vs the bytes"
    );
    assert!(
        bytes == content.range(offset, u64::from(h.length)),
        "piece {last} bytes differ from the origin's"
    );

    // Past the end, on the same connection (it stays usable after a piece).
    c.send(&Frame::PieceRequest {
        task,
        number: piece_count,
    })
    .await
    .expect("send");
    let reply = c.recv_timeout(DEFAULT_REPLY_TIMEOUT).await.expect("reply");
    assert_error(
        reply,
        ErrorCode::PieceOutOfRange,
        "PieceRequest past the end",
    );
    let reply = ask(
        d.data_addr,
        &Frame::PieceRequest {
            task,
            number: u32::MAX,
        },
    )
    .await;
    assert_error(
        reply,
        ErrorCode::PieceOutOfRange,
        "PieceRequest for piece u32::MAX",
    );
    assert!(d.is_running(), "peer-1 died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gib_payload_header_is_refused_without_killing_the_daemon() {
    let cluster = one_daemon().await;
    let d = cluster.peer(1);
    // A Bitmap frame (type 5) claiming a u32::MAX-byte payload, then a trickle of bytes.
    let mut header = [0u8; HEADER_LEN];
    header[0] = VERSION;
    header[1] = 5;
    header[4..].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut c = FrameConn::connect(d.data_addr).await.expect("connect");
    c.send_raw(&header).await.expect("send header");
    // The daemon may already have closed; a failed write is fine here.
    let _ = c.send_raw(&[0u8; 1024]).await;
    expect_malformed_or_close(&mut c, "a header declaring a 4 GiB payload").await;

    // Same for a PieceRequest header with a huge length.
    let mut c = FrameConn::connect(d.data_addr).await.expect("connect");
    header[1] = 1;
    c.send_raw(&header).await.expect("send header");
    expect_malformed_or_close(&mut c, "a PieceRequest header declaring a 4 GiB payload").await;

    assert_still_serving(d, "4 GiB payload headers").await;
}
