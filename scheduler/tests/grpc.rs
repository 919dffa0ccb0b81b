//! The scheduler over real gRPC on loopback: host stream, peer streams, StatTask, shutdown.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use damselfly_scheduler::{serve, SchedulingConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use wire::proto::scheduler::scheduler_client::SchedulerClient;
use wire::proto::scheduler::{
    announce_peer_request, announce_peer_response, host_command, AnnounceHostRequest,
    AnnouncePeerRequest, AnnouncePeerResponse, Host, HostCommand, HostType, PeerFinished,
    PieceFinished, RegisterPeer, StatTaskRequest, TaskMetadata, TaskSource,
};

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start() -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(listener, SchedulingConfig::default(), async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        done,
    }
}

async fn client(addr: SocketAddr) -> SchedulerClient<Channel> {
    SchedulerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn host(id: &str, seed: bool) -> Host {
    Host {
        id: id.to_owned(),
        ip: "127.0.0.1".to_owned(),
        data_port: 4005,
        r#type: if seed {
            HostType::Seed as i32
        } else {
            HostType::Normal as i32
        },
        ..Host::default()
    }
}

/// Opens an AnnouncePeer stream and sends the registration.
async fn open_peer(
    c: &mut SchedulerClient<Channel>,
    peer_id: &str,
    host_id: &str,
    seed: bool,
    back_to_source: bool,
) -> (
    mpsc::Sender<AnnouncePeerRequest>,
    Streaming<AnnouncePeerResponse>,
) {
    let (tx, rx) = mpsc::channel(16);
    let responses = c
        .announce_peer(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Sent after the call returned: the server must not wait for it before answering.
    send(
        &tx,
        announce_peer_request::Request::Register(RegisterPeer {
            task_id: "t1".to_owned(),
            peer_id: peer_id.to_owned(),
            host: Some(host(host_id, seed)),
            source: Some(TaskSource {
                url: "http://origin/f".to_owned(),
                headers: vec![],
                digest: String::new(),
            }),
            piece_length: 0,
            back_to_source,
            priority: 0,
            resume: None,
        }),
    )
    .await;
    (tx, responses)
}

async fn send(tx: &mpsc::Sender<AnnouncePeerRequest>, r: announce_peer_request::Request) {
    tx.send(AnnouncePeerRequest { request: Some(r) })
        .await
        .unwrap();
}

async fn next_response(
    s: &mut Streaming<AnnouncePeerResponse>,
) -> announce_peer_response::Response {
    tokio::time::timeout(WAIT, s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .response
        .unwrap()
}

async fn next_command(s: &mut Streaming<HostCommand>) -> host_command::Command {
    tokio::time::timeout(WAIT, s.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .command
        .unwrap()
}

#[tokio::test]
async fn seed_trigger_metadata_parents_and_stat() {
    let mut server = start().await;
    let mut c = client(server.addr).await;

    let mut seed_cmds = c
        .announce_host(AnnounceHostRequest {
            host: Some(host("seed-1", true)),
        })
        .await
        .unwrap()
        .into_inner();

    let (_ptx, mut presp) = open_peer(&mut c, "peer-a", "host-a", false, false).await;
    let host_command::Command::DownloadTask(d) = next_command(&mut seed_cmds).await;
    assert_eq!(d.task_id, "t1");
    assert_eq!(d.source.unwrap().url, "http://origin/f");

    let (stx, _sresp) = open_peer(&mut c, "seed-peer", "seed-1", true, true).await;
    send(
        &stx,
        announce_peer_request::Request::TaskMetadata(TaskMetadata {
            content_length: 3 << 20,
            piece_length: 1 << 20,
        }),
    )
    .await;
    match next_response(&mut presp).await {
        announce_peer_response::Response::CandidateParents(p) => {
            assert_eq!(p.parents.len(), 1);
            assert_eq!(p.parents[0].host_id, "seed-1");
            assert_eq!(p.parents[0].peer_id, "seed-peer");
            assert_eq!(p.metadata.unwrap().content_length, 3 << 20);
        }
        other => panic!("unexpected {other:?}"),
    }
    for n in 0..3 {
        send(
            &stx,
            announce_peer_request::Request::PieceFinished(PieceFinished {
                number: n,
                ..PieceFinished::default()
            }),
        )
        .await;
    }
    send(
        &stx,
        announce_peer_request::Request::Finished(PeerFinished {
            content_length: 3 << 20,
        }),
    )
    .await;

    // StatTask sees it (poll: the messages are processed asynchronously).
    let mut done = false;
    for _ in 0..100 {
        let info = c
            .stat_task(StatTaskRequest {
                task_id: "t1".to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.piece_count, 3);
        if info
            .peers
            .iter()
            .any(|p| p.peer_id == "seed-peer" && p.done && p.finished_pieces == 3)
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(done);
    let err = c
        .stat_task(StatTaskRequest {
            task_id: "nope".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Shutdown ends the open streams and returns promptly.
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(WAIT, server.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let end = tokio::time::timeout(WAIT, seed_cmds.message())
        .await
        .unwrap();
    assert!(end.is_err() || end.unwrap().is_none());
}

#[tokio::test]
async fn no_seed_means_back_to_source() {
    let server = start().await;
    let mut c = client(server.addr).await;
    let (_tx, mut resp) = open_peer(&mut c, "peer-a", "host-a", false, false).await;
    match next_response(&mut resp).await {
        announce_peer_response::Response::NeedBackToSource(n) => {
            assert_eq!(n.reason, "no seed peer available")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn first_message_must_register() {
    let server = start().await;
    let mut c = client(server.addr).await;
    let (tx, rx) = mpsc::channel(4);
    send(
        &tx,
        announce_peer_request::Request::Finished(PeerFinished::default()),
    )
    .await;
    let result = c.announce_peer(ReceiverStream::new(rx)).await;
    let status = match result {
        Err(status) => status,
        Ok(resp) => tokio::time::timeout(WAIT, resp.into_inner().message())
            .await
            .unwrap()
            .unwrap_err(),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn dropped_seed_host_stream_retriggers_another_seed() {
    let server = start().await;
    let mut c = client(server.addr).await;
    let mut s1 = c
        .announce_host(AnnounceHostRequest {
            host: Some(host("seed-1", true)),
        })
        .await
        .unwrap()
        .into_inner();
    let mut s2 = c
        .announce_host(AnnounceHostRequest {
            host: Some(host("seed-2", true)),
        })
        .await
        .unwrap()
        .into_inner();
    let (_tx, _resp) = open_peer(&mut c, "peer-a", "host-a", false, false).await;
    // Whichever seed got the trigger goes away; the other one gets it next.
    let first_won = tokio::time::timeout(WAIT, async {
        tokio::select! {
            m = s1.message() => { assert!(m.unwrap().is_some()); true }
            m = s2.message() => { assert!(m.unwrap().is_some()); false }
        }
    })
    .await
    .unwrap();
    let mut other = if first_won {
        drop(s1);
        s2
    } else {
        drop(s2);
        s1
    };
    let host_command::Command::DownloadTask(d) = next_command(&mut other).await;
    assert_eq!(d.task_id, "t1");
}

/// Peer ids StatTask lists for task t1 (empty when the task is gone).
async fn peers_of_t1(c: &mut SchedulerClient<Channel>) -> Vec<String> {
    match c
        .stat_task(StatTaskRequest {
            task_id: "t1".to_owned(),
        })
        .await
    {
        Ok(info) => info
            .into_inner()
            .peers
            .into_iter()
            .map(|p| p.peer_id)
            .collect(),
        Err(status) => {
            assert_eq!(status.code(), Code::NotFound);
            vec![]
        }
    }
}

/// Polls until `peer` is no longer in t1's peers; false after `WAIT`.
async fn left(c: &mut SchedulerClient<Channel>, peer: &str) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if !peers_of_t1(c).await.iter().any(|p| p == peer) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_peer_leaves_when_its_requests_end_or_its_call_is_dropped() {
    let server = start().await;
    let mut c = client(server.addr).await;
    // Two sources (no seed host, so both go back to source and stay registered).
    let (atx, mut aresp) = open_peer(&mut c, "peer-a", "host-a", false, true).await;
    let (btx, bresp) = open_peer(&mut c, "peer-b", "host-b", false, true).await;
    // Reports on the same stream are read after the registration.
    send(
        &atx,
        announce_peer_request::Request::TaskMetadata(TaskMetadata {
            content_length: 2 << 20,
            piece_length: 1 << 20,
        }),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let peers = peers_of_t1(&mut c).await;
        if peers.iter().any(|p| p == "peer-a") && peers.iter().any(|p| p == "peer-b") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "peers never registered: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The daemon closes its side: the peer leaves and the answers end cleanly.
    drop(atx);
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match aresp.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert!(left(&mut c, "peer-a").await, "peer-a still registered");

    // The daemon drops the whole call: the peer leaves too.
    drop((btx, bresp));
    assert!(left(&mut c, "peer-b").await, "peer-b still registered");
    drop(server);
}
