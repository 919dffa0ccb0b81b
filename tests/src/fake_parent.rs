//! A fake parent: a data-plane server that claims to hold a whole task and, in
//! [`Mode::Corrupt`], sends piece bytes that do not match the crc32c in their header, or, in
//! [`Mode::Forged`], altered bytes with their own crc32c (only the trusted per-piece digest
//! catches them).
//!
//! Use:
//! 1. [`FakeParent::start`] with the task id, its generated [`Content`] and piece length (read
//!    them from a real parent's [`Frame::Bitmap`]);
//! 2. [`FakeParent::announce`] to register it with the scheduler as a host holding every
//!    piece, so that the scheduler offers it as a candidate parent;
//! 3. let a real peer download the task and check that it noticed the corruption
//!    (`pieces_corrupt`) and still produced the right file, and that the fake was asked
//!    ([`FakeParent::piece_requests`]).
//!
//! The fake answers `BitmapRequest` for its task with a full bitmap, `PieceRequest` with a
//! piece header and the piece's bytes, and requests for other tasks with `TaskNotFound`.

use crate::content::Content;
use crate::frames::FrameConn;
use crate::grpc;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wire::frame::{bitmap_len, ErrorCode, Frame, PieceHeader};
use wire::proto::scheduler::{
    announce_peer_request, AnnounceHostRequest, AnnouncePeerRequest, AnnouncePeerResponse, Host,
    HostType, PeerFinished, PieceFinished, RegisterPeer, TaskMetadata, TaskSource,
};
use wire::{PieceLayout, TaskId};

/// How the fake parent answers piece requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Correct header (crc32c of the true bytes) followed by altered bytes.
    Corrupt,
    /// Correct header and correct bytes (to test the fake itself).
    Honest,
    /// Forged bytes with their own crc32c in the header (a self-consistent crc: the
    /// transport check passes; only the trusted per-piece digest catches them). The fake
    /// also reports forged digests for its pieces to the scheduler.
    Forged,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bitmap_requests: AtomicU64,
    piece_requests: AtomicU64,
    pieces_sent: AtomicU64,
}

struct Served {
    task: TaskId,
    content: Content,
    layout: PieceLayout,
    mode: Mode,
    counters: Counters,
}

/// Scheduler streams kept open while the fake is announced.
struct Announcement {
    _peer_tx: mpsc::Sender<AnnouncePeerRequest>,
    tasks: Vec<JoinHandle<()>>,
    responses: Arc<Mutex<Vec<AnnouncePeerResponse>>>,
}

/// A running fake parent. Stops serving (and leaves the scheduler) when dropped.
pub struct FakeParent {
    addr: SocketAddr,
    served: Arc<Served>,
    accept: JoinHandle<()>,
    announcement: Option<Announcement>,
}

impl FakeParent {
    /// Starts serving `task` (whose bytes are `content`, cut in pieces of `piece_length`) on
    /// `127.0.0.1:0`.
    pub async fn start(
        task: TaskId,
        content: Content,
        piece_length: u64,
        mode: Mode,
    ) -> Result<Self> {
        let layout = PieceLayout::new(content.size, piece_length).with_context(|| {
            format!(
                "layout of {} bytes in pieces of {piece_length}",
                content.size
            )
        })?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake parent on 127.0.0.1:0")?;
        let addr = listener.local_addr().context("fake parent address")?;
        let served = Arc::new(Served {
            task,
            content,
            layout,
            mode,
            counters: Counters::default(),
        });
        let s = served.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors or similar: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                s.counters.connections.fetch_add(1, Ordering::Relaxed);
                let s = s.clone();
                tokio::spawn(async move {
                    // The downloader may drop the connection at any time.
                    let _ = serve(&s, FrameConn::from_stream(stream)).await;
                });
            }
        });
        Ok(Self {
            addr,
            served,
            accept,
            announcement: None,
        })
    }

    /// Address of its data plane.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The piece layout it claims.
    pub fn layout(&self) -> PieceLayout {
        self.served.layout
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.served.counters.connections.load(Ordering::Relaxed)
    }

    /// `BitmapRequest`s received so far (any task).
    pub fn bitmap_requests(&self) -> u64 {
        self.served.counters.bitmap_requests.load(Ordering::Relaxed)
    }

    /// `PieceRequest`s received so far (any task).
    pub fn piece_requests(&self) -> u64 {
        self.served.counters.piece_requests.load(Ordering::Relaxed)
    }

    /// Pieces (header and bytes) written so far.
    pub fn pieces_sent(&self) -> u64 {
        self.served.counters.pieces_sent.load(Ordering::Relaxed)
    }

    /// What the scheduler said on the peer stream so far (candidate parents, back to source).
    pub fn scheduler_responses(&self) -> Vec<AnnouncePeerResponse> {
        match &self.announcement {
            None => Vec::new(),
            Some(a) => match a.responses.lock() {
                Ok(r) => r.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            },
        }
    }

    /// [`FakeParent::announce`], then waits (at most 10 s) until the scheduler lists this
    /// fake as holding all `piece_count` pieces of the task, so that it is handed out as a
    /// parent.
    pub async fn join_swarm(
        &mut self,
        scheduler: SocketAddr,
        host_id: &str,
        url: &str,
        piece_count: u32,
    ) -> Result<()> {
        self.announce(scheduler, host_id, url).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let info = grpc::stat_task(scheduler, &self.served.task.to_hex()).await?;
            let listed = info.peers.iter().find(|p| p.host_id == host_id);
            if listed.is_some_and(|p| p.done || p.finished_pieces >= piece_count) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the scheduler does not list {host_id} as holding all {piece_count} pieces \
                     within 10 s: {info:?}; its answers to the fake: {:?}",
                    self.scheduler_responses()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Registers with the scheduler at `scheduler` as host `host_id` (an ordinary peer whose
    /// data plane is this fake), and as a peer of the task (source `url`) that finished every
    /// piece. The streams stay open until the fake is dropped.
    pub async fn announce(
        &mut self,
        scheduler: SocketAddr,
        host_id: &str,
        url: &str,
    ) -> Result<()> {
        let mut client = grpc::scheduler_client(scheduler).await?;
        let host = Host {
            id: host_id.to_string(),
            hostname: host_id.to_string(),
            ip: self.addr.ip().to_string(),
            data_port: u32::from(self.addr.port()),
            r#type: HostType::Normal as i32,
            idc: String::new(),
            location: String::new(),
            upload_rate_limit: 0,
            quic_port: 0,
        };
        let mut host_stream = client
            .announce_host(AnnounceHostRequest {
                host: Some(host.clone()),
            })
            .await
            .context("AnnounceHost of the fake parent")?
            .into_inner();
        let mut tasks = vec![tokio::spawn(async move {
            // Keep the host stream open (and drain its commands) while the fake lives.
            while let Ok(Some(_)) = host_stream.message().await {}
        })];

        let layout = self.served.layout;
        let content = self.served.content;
        let task_hex = self.served.task.to_hex();
        let mut msgs: Vec<announce_peer_request::Request> = vec![
            announce_peer_request::Request::Register(RegisterPeer {
                task_id: task_hex.clone(),
                peer_id: format!("{host_id}-{}", &task_hex[..16]),
                host: Some(host),
                source: Some(TaskSource {
                    url: url.to_string(),
                    headers: Vec::new(),
                    digest: String::new(),
                }),
                piece_length: 0,
                back_to_source: false,
                priority: 0,
                resume: None,
            }),
            announce_peer_request::Request::TaskMetadata(TaskMetadata {
                content_length: layout.content_length(),
                piece_length: layout.piece_length(),
            }),
        ];
        for n in 0..layout.piece_count() {
            let r = layout.piece_range(n).context("piece in range")?;
            let mut bytes = content.range(r.start, r.end - r.start);
            // A forger also claims its bytes' digests (the scheduler must ignore them: the
            // fake never fetched from the origin).
            let digest = if self.served.mode == Mode::Forged {
                forge(&mut bytes);
                wire::piece_digest(&bytes).to_vec()
            } else {
                Vec::new()
            };
            msgs.push(announce_peer_request::Request::PieceFinished(
                PieceFinished {
                    number: n,
                    crc32c: wire::piece_crc(&bytes),
                    length: r.end - r.start,
                    parent_host_id: String::new(),
                    cost_us: 1000,
                    digest,
                },
            ));
        }
        msgs.push(announce_peer_request::Request::Finished(PeerFinished {
            content_length: layout.content_length(),
        }));

        // Queue everything before opening the stream: a scheduler may wait for the register
        // message before it answers the call.
        let (tx, rx) = mpsc::channel(msgs.len() + 1);
        for m in msgs {
            tx.send(AnnouncePeerRequest { request: Some(m) })
                .await
                .context("queueing announce messages")?;
        }
        let mut peer_stream = client
            .announce_peer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .context("AnnouncePeer of the fake parent")?
            .into_inner();
        let responses = Arc::new(Mutex::new(Vec::new()));
        let r = responses.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(m)) = peer_stream.message().await {
                match r.lock() {
                    Ok(mut v) => v.push(m),
                    Err(poisoned) => poisoned.into_inner().push(m),
                }
            }
        }));
        self.announcement = Some(Announcement {
            _peer_tx: tx,
            tasks,
            responses,
        });
        Ok(())
    }
}

impl Drop for FakeParent {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(a) = self.announcement.take() {
            for t in a.tasks {
                t.abort();
            }
        }
    }
}

/// Answers requests on one connection until the client closes it.
async fn serve(s: &Served, mut conn: FrameConn) -> Result<()> {
    while let Some(frame) = conn.recv().await? {
        match frame {
            Frame::BitmapRequest { task, .. } => {
                s.counters.bitmap_requests.fetch_add(1, Ordering::Relaxed);
                if task != s.task {
                    conn.send(&not_found(task)).await?;
                    continue;
                }
                let count = s.layout.piece_count();
                let mut bits = vec![0xffu8; bitmap_len(count)];
                // Clear the bits past the last piece in the last byte.
                let spare = bits.len() * 8 - count as usize;
                if let Some(last) = bits.last_mut() {
                    *last >>= spare;
                }
                conn.send(&Frame::Bitmap {
                    task,
                    content_length: s.layout.content_length(),
                    piece_length: s.layout.piece_length() as u32,
                    piece_count: count,
                    bits,
                })
                .await?;
            }
            Frame::PieceRequest { task, number } => {
                s.counters.piece_requests.fetch_add(1, Ordering::Relaxed);
                if task != s.task {
                    conn.send(&not_found(task)).await?;
                    continue;
                }
                let Some(range) = s.layout.piece_range(number) else {
                    conn.send(&Frame::Error {
                        code: ErrorCode::PieceOutOfRange,
                        message: format!("piece {number} past the end"),
                    })
                    .await?;
                    continue;
                };
                let mut bytes = s.content.range(range.start, range.end - range.start);
                let mut crc = wire::piece_crc(&bytes);
                if s.mode != Mode::Honest {
                    forge(&mut bytes);
                }
                if s.mode == Mode::Forged {
                    crc = wire::piece_crc(&bytes);
                }
                conn.send(&Frame::Piece(PieceHeader {
                    task,
                    number,
                    offset: range.start,
                    length: bytes.len() as u32,
                    crc32c: crc,
                }))
                .await?;
                conn.send_raw(&bytes).await?;
                s.counters.pieces_sent.fetch_add(1, Ordering::Relaxed);
            }
            other => bail!("fake parent got an unexpected frame {other:?}"),
        }
    }
    Ok(())
}

/// Alters a piece's bytes (every 4096th byte).
fn forge(bytes: &mut [u8]) {
    for b in bytes.iter_mut().step_by(4096) {
        *b ^= 0x5a;
    }
}

fn not_found(task: TaskId) -> Frame {
    Frame::Error {
        code: ErrorCode::TaskNotFound,
        message: format!("unknown task {task}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn fetch(fake: &FakeParent, task: TaskId, number: u32) -> (PieceHeader, Vec<u8>) {
        let mut c = FrameConn::connect(fake.addr()).await.expect("connect");
        c.send(&Frame::PieceRequest { task, number })
            .await
            .expect("send");
        let f = c
            .recv_timeout(Duration::from_secs(5))
            .await
            .expect("reply")
            .expect("not closed");
        let Frame::Piece(h) = f else {
            panic!("expected a piece, got {f:?}")
        };
        let bytes = c.read_raw(h.length as usize).await.expect("bytes");
        (h, bytes)
    }

    #[tokio::test]
    async fn serves_bitmap_and_pieces_honest_and_corrupt() {
        let task = TaskId([7; 32]);
        let content = Content::new(3, (1 << 20) * 2 + 100);
        for mode in [Mode::Honest, Mode::Corrupt] {
            let fake = FakeParent::start(task, content, 1 << 20, mode)
                .await
                .expect("start");
            let mut c = FrameConn::connect(fake.addr()).await.expect("connect");
            c.send(&Frame::BitmapRequest {
                task,
                known: 0,
                wait_ms: 0,
            })
            .await
            .expect("send");
            let f = c.recv().await.expect("recv").expect("frame");
            assert_eq!(
                f,
                Frame::Bitmap {
                    task,
                    content_length: content.size,
                    piece_length: 1 << 20,
                    piece_count: 3,
                    bits: vec![0b111],
                }
            );
            c.send(&Frame::PieceRequest {
                task: TaskId([8; 32]),
                number: 0,
            })
            .await
            .expect("send");
            let f = c.recv().await.expect("recv").expect("frame");
            assert!(matches!(
                f,
                Frame::Error {
                    code: ErrorCode::TaskNotFound,
                    ..
                }
            ));
            let (h, bytes) = fetch(&fake, task, 2).await;
            assert_eq!(h.offset, 2 << 20);
            assert_eq!(h.length, 100);
            assert_eq!(h.crc32c, wire::piece_crc(&content.range(2 << 20, 100)));
            assert_eq!(wire::piece_crc(&bytes) == h.crc32c, mode == Mode::Honest);
            assert_eq!(fake.piece_requests(), 2);
            assert_eq!(fake.pieces_sent(), 1);
        }
    }
}
