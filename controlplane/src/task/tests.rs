//! Unit tests of one `TaskRun`, in memory: fake schedulers (each `AnnouncePeer` stream is a
//! pair of channels the test holds), a fake data plane (the commands land in a channel; the
//! test stores the pieces and sends the events the real one would) and a fake origin; a real
//! `Storage` in a temporary directory. No sockets, no processes.

use super::run::TaskRun;
use super::services::{
    BoxFuture, CommandRefused, DataPlaneLink, Origin, ResponseStream, RunServices, RunSettings,
    Schedulers,
};
use super::*;
use crate::metrics::ControlStats;
use crate::origin::OriginError;
use dataplane::Storage;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use wire::proto::scheduler::{
    AnnouncePeerResponse, CandidateParents, Host, NeedBackToSource, Parent as ParentPeer,
};

const PIECE: u64 = 16 << 10;
/// Guard against a test that would hang on a broken run (not a timing assertion).
const GUARD: Duration = Duration::from_secs(10);

/// Three pieces, the last one short.
fn content() -> Vec<u8> {
    (0..(2 * PIECE + 100))
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

fn piece_of(content: &[u8], n: u32) -> &[u8] {
    let start = u64::from(n) * PIECE;
    let end = (start + PIECE).min(content.len() as u64);
    &content[start as usize..end as usize]
}

/// One `AnnouncePeer` stream as the fake scheduler sees it.
struct FakeStream {
    requests: ReceiverStream<AnnouncePeerRequest>,
    responses: mpsc::UnboundedSender<Result<AnnouncePeerResponse, tonic::Status>>,
}

impl FakeStream {
    /// The run's next message on this stream.
    async fn next(&mut self) -> Request {
        let msg = tokio::time::timeout(GUARD, self.requests.next())
            .await
            .expect("the run sent nothing")
            .expect("the run closed the stream");
        msg.request.expect("a request without a body")
    }

    /// The run's messages up to and with `Finished`.
    async fn until_finished(&mut self) -> Vec<Request> {
        let mut out = Vec::new();
        loop {
            let r = self.next().await;
            let done = matches!(r, Request::Finished(_));
            out.push(r);
            if done {
                return out;
            }
        }
    }

    fn answer(&self, r: Response) {
        self.responses
            .send(Ok(AnnouncePeerResponse { response: Some(r) }))
            .expect("the run dropped the stream");
    }
}

struct FakeSchedulers {
    addrs: Vec<String>,
    streams: mpsc::UnboundedSender<FakeStream>,
}

impl Schedulers for FakeSchedulers {
    fn ordered(&self, _id: &TaskId) -> Vec<String> {
        self.addrs.clone()
    }

    fn announce_peer(
        &self,
        _id: TaskId,
        _addr: String,
        requests: ReceiverStream<AnnouncePeerRequest>,
    ) -> BoxFuture<'_, Result<ResponseStream, SchedulerError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.streams.send(FakeStream {
            requests,
            responses: tx,
        });
        Box::pin(async move { Ok(Box::pin(UnboundedReceiverStream::new(rx)) as ResponseStream) })
    }

    fn announce_complete(&self, _id: TaskId, _layout: PieceLayout) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

struct FakeDataPlane(mpsc::UnboundedSender<Command>);

impl DataPlaneLink for FakeDataPlane {
    fn send(&self, _task: &TaskId, cmd: Command) -> Result<(), CommandRefused> {
        self.0.send(cmd).map_err(|_| CommandRefused)
    }
}

/// Serves `content` (or fails with `fail`), storing pieces like the real origin fetch.
struct FakeOrigin {
    storage: Arc<Storage>,
    content: Vec<u8>,
    fail: Option<fn() -> OriginError>,
    fetches: AtomicUsize,
}

impl FakeOrigin {
    fn store_missing(
        &self,
        store: &Arc<TaskStore>,
        only: Option<&[u32]>,
        sink: &mut (dyn PieceSink + Send),
    ) -> Result<(), OriginError> {
        for n in 0..store.layout().piece_count() {
            if store.has(n) || only.is_some_and(|o| !o.contains(&n)) {
                continue;
            }
            let data = piece_of(&self.content, n);
            let crc = wire::piece_crc(data);
            store
                .write_piece(n, data, crc)
                .map_err(|e| OriginError::Storage(e.into()))?;
            sink.piece(n, crc, data.len() as u64, 1);
        }
        Ok(())
    }
}

impl Origin for FakeOrigin {
    fn fetch<'a>(
        &'a self,
        spec: &'a TaskSpec,
        existing: Option<Arc<TaskStore>>,
        sink: &'a mut (dyn PieceSink + Send),
    ) -> BoxFuture<'a, Result<Arc<TaskStore>, OriginError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if let Some(fail) = self.fail {
                return Err(fail());
            }
            let store = match existing {
                Some(s) => s,
                None => {
                    let layout = PieceLayout::new(self.content.len() as u64, PIECE)
                        .map_err(OriginError::Layout)?;
                    let s = self
                        .storage
                        .create(spec.id, layout)
                        .map_err(|e| OriginError::Storage(e.into()))?;
                    sink.layout(&s);
                    s
                }
            };
            self.store_missing(&store, None, sink)?;
            Ok(store)
        })
    }

    fn fetch_pieces<'a>(
        &'a self,
        _spec: &'a TaskSpec,
        store: Arc<TaskStore>,
        pieces: &'a [u32],
        sink: &'a mut (dyn PieceSink + Send),
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if let Some(fail) = self.fail {
                return Err(fail());
            }
            self.store_missing(&store, Some(pieces), sink)
        })
    }
}

/// What runs use, for tests of the services above the runs (the local API): no scheduler
/// (every run goes to the origin at once), a data plane that takes every command, and an
/// origin that serves `content` in pieces of 16 KiB, or fails with `fail`.
pub(crate) fn fake_services(
    storage: Arc<Storage>,
    meta: Arc<crate::store::MetaStore>,
    content: Vec<u8>,
    fail: Option<fn() -> OriginError>,
) -> RunServices {
    let (streams, _) = mpsc::unbounded_channel();
    // With no scheduler there are no parents: the data plane gets no work (its commands
    // fail, as a full queue would).
    let (commands, _) = mpsc::unbounded_channel();
    RunServices {
        schedulers: Arc::new(FakeSchedulers {
            addrs: Vec::new(),
            streams,
        }),
        dataplane: Arc::new(FakeDataPlane(commands)),
        origin: Arc::new(FakeOrigin {
            storage: storage.clone(),
            content,
            fail,
            fetches: AtomicUsize::new(0),
        }),
        storage,
        meta,
        stats: Arc::new(ControlStats::default()),
        host: Host {
            id: "me".into(),
            ..Host::default()
        },
        settings: RunSettings {
            schedule_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            verify_pieces: true,
        },
    }
}

/// One run under test and the fakes around it.
struct Harness {
    _dir: tempfile::TempDir,
    id: TaskId,
    content: Vec<u8>,
    streams: mpsc::UnboundedReceiver<FakeStream>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
    origin: Arc<FakeOrigin>,
    stats: Arc<ControlStats>,
    storage: Arc<Storage>,
    tasks: Arc<TaskManager>,
    state: watch::Receiver<TaskState>,
    /// `TaskRun::drive`: the run, its end published, then serving until the stream ends.
    run: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// Starts a run of a 3-piece task; `schedulers`: the addresses the fake offers (none:
    /// the scheduler is unreachable).
    fn start(schedulers: &[&str], fail: Option<fn() -> OriginError>) -> Self {
        Self::start_with(schedulers, fail, Duration::from_secs(30))
    }

    /// [`Self::start`] with `download.stall_timeout` set to `stall_timeout`.
    fn start_with(
        schedulers: &[&str],
        fail: Option<fn() -> OriginError>,
        stall_timeout: Duration,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
        let content = content();
        let id = TaskId::from_content_digest("sha256:00");
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::channel(64);
        let origin = Arc::new(FakeOrigin {
            storage: storage.clone(),
            content: content.clone(),
            fail,
            fetches: AtomicUsize::new(0),
        });
        let stats = Arc::new(ControlStats::default());
        let svc = RunServices {
            schedulers: Arc::new(FakeSchedulers {
                addrs: schedulers.iter().map(|s| s.to_string()).collect(),
                streams: streams_tx,
            }),
            dataplane: Arc::new(FakeDataPlane(commands_tx)),
            origin: origin.clone(),
            storage: storage.clone(),
            meta: Arc::new(crate::store::MetaStore::open(dir.path()).expect("metadata store")),
            stats: stats.clone(),
            host: Host {
                id: "me".into(),
                ..Host::default()
            },
            settings: RunSettings {
                schedule_timeout: Duration::from_secs(30),
                stall_timeout,
                verify_pieces: true,
            },
        };
        let spec = TaskSpec {
            id,
            url: "http://origin.test/file".into(),
            headers: Vec::new(),
            piece_length: 0,
            back_to_source: false,
            disable_back_to_source: false,
            rate_limit: 0,
            scheduler: None,
            priority: 0,
            digest: None,
            s3: None,
        };
        let (state_tx, state) = watch::channel(TaskState::Running(Progress::default()));
        let tasks = Arc::new(TaskManager::new(svc.clone()));
        let t = tasks.clone();
        let run = tokio::spawn(async move {
            TaskRun::new(svc, spec, state_tx, events_rx).drive(&t).await;
        });
        Self {
            _dir: dir,
            id,
            content,
            streams,
            commands,
            events,
            origin,
            stats,
            storage,
            tasks,
            state,
            run,
        }
    }

    async fn stream(&mut self) -> FakeStream {
        tokio::time::timeout(GUARD, self.streams.recv())
            .await
            .expect("the run did not register")
            .expect("fake scheduler gone")
    }

    async fn command(&mut self) -> Command {
        tokio::time::timeout(GUARD, self.commands.recv())
            .await
            .expect("no data-plane command")
            .expect("fake data plane gone")
    }

    /// The end of the run as published to its watchers: `Done` or `Failed`.
    async fn finish(&mut self) -> (Result<Arc<TaskStore>, DownloadError>, Progress) {
        let state = tokio::time::timeout(
            GUARD,
            self.state.wait_for(|s| !matches!(s, TaskState::Running(_))),
        )
        .await
        .expect("the run did not end")
        .expect("the run is gone without an end")
        .clone();
        match state {
            TaskState::Done(store, p) => (Ok(store), p),
            TaskState::Failed(e) => (Err(e), Progress::default()),
            TaskState::Running(_) => unreachable!("waited for the end"),
        }
    }

    fn parents(&self) -> Response {
        Response::CandidateParents(CandidateParents {
            parents: vec![ParentPeer {
                host_id: "parent-1".into(),
                peer_id: "parent-1-peer".into(),
                ip: "127.0.0.1".into(),
                data_port: 4000,
                r#type: HostType::Normal as i32,
                quic_port: 0,
            }],
            metadata: Some(TaskMetadata {
                content_length: self.content.len() as u64,
                piece_length: PIECE,
            }),
            digests: None,
        })
    }

    /// What the data plane does for piece `n` from `parent-1`: store it, then report it.
    async fn deliver(&self, store: &Arc<TaskStore>, n: u32) {
        let data = piece_of(&self.content, n);
        let crc = wire::piece_crc(data);
        store.write_piece(n, data, crc).expect("storing a piece");
        self.events
            .send(Event::PieceFinished {
                task: self.id,
                number: n,
                crc32c: crc,
                length: data.len() as u64,
                source: PieceSource::Peer("parent-1".into()),
                cost_us: 1,
            })
            .await
            .expect("run gone");
    }
}

/// The task's bytes as stored (through its open file: the temporary directory may be gone).
fn file_bytes(store: &TaskStore) -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..store.layout().piece_count() {
        let mut buf = Vec::new();
        store
            .read_piece(n, &mut buf)
            .expect("reading a stored piece");
        out.extend_from_slice(&buf);
    }
    out
}

/// The pieces reported finished in `reqs`, with the parent each came from.
fn pieces_reported(reqs: &[Request]) -> Vec<(u32, String)> {
    reqs.iter()
        .filter_map(|r| match r {
            Request::PieceFinished(p) => Some((p.number, p.parent_host_id.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn parents_then_every_piece_finished_succeeds_with_the_bytes() {
    let mut h = Harness::start(&["s1"], None);
    let mut s = h.stream().await;
    let Request::Register(reg) = s.next().await else {
        panic!("the first message is not a registration");
    };
    assert_eq!(reg.task_id, h.id.to_hex());
    assert!(!reg.back_to_source && reg.resume.is_none());
    s.answer(h.parents());
    let Command::Download { store, parents, .. } = h.command().await else {
        panic!("the first command is not a download");
    };
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0].host_id, "parent-1");
    assert_eq!(parents[0].addr, "127.0.0.1:4000".parse().expect("addr"));
    for n in 0..3 {
        h.deliver(&store, n).await;
    }
    h.events
        .send(Event::DownloadFinished { task: h.id })
        .await
        .expect("run gone");
    let reqs = s.until_finished().await;
    let origin_fetches = h.origin.fetches.load(Ordering::SeqCst);
    let content = h.content.clone();
    let (result, progress) = h.finish().await;
    let store = result.expect("the run failed");
    assert!(store.is_complete());
    assert_eq!(file_bytes(&store), content);
    assert_eq!(
        pieces_reported(&reqs),
        (0..3)
            .map(|n| (n, "parent-1".to_string()))
            .collect::<Vec<_>>()
    );
    let Some(Request::Finished(f)) = reqs.last() else {
        panic!("no PeerFinished");
    };
    assert_eq!(f.content_length, content.len() as u64);
    assert_eq!(progress.from_peers, content.len() as u64);
    assert_eq!(origin_fetches, 0, "a run with parents went to the origin");
    assert_eq!(h.stats.downloads_succeeded.load(Ordering::Relaxed), 1);
    // Done, the peer stays on the scheduler's stream so others can fetch from it, until
    // the scheduler closes it.
    tokio::time::timeout(GUARD, async {
        while !h.tasks.is_serving(&h.id) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the finished run does not serve");
    assert!(!h.run.is_finished(), "serving ended with the stream open");
    drop(s);
    tokio::time::timeout(GUARD, &mut h.run)
        .await
        .expect("serving did not end with the scheduler's stream")
        .expect("the run panicked");
    assert!(!h.tasks.is_serving(&h.id));
}

#[tokio::test]
async fn need_back_to_source_fetches_from_the_origin_and_reports_the_pieces() {
    let mut h = Harness::start(&["s1"], None);
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(Response::NeedBackToSource(NeedBackToSource {
        reason: "no peer has it".into(),
        pieces: Vec::new(),
    }));
    let reqs = s.until_finished().await;
    assert!(
        h.commands.try_recv().is_err(),
        "the data plane was asked to download"
    );
    let origin_fetches = h.origin.fetches.load(Ordering::SeqCst);
    let content = h.content.clone();
    let (result, progress) = h.finish().await;
    let store = result.expect("the run failed");
    assert_eq!(file_bytes(&store), content);
    assert_eq!(origin_fetches, 1);
    let Some(Request::TaskMetadata(md)) = reqs.first() else {
        panic!("the size was not announced first: {reqs:?}");
    };
    assert_eq!(
        (md.content_length, md.piece_length),
        (content.len() as u64, PIECE)
    );
    // From the origin: no parent, and the trusted digest of the stored bytes.
    for r in &reqs {
        if let Request::PieceFinished(p) = r {
            assert!(p.parent_host_id.is_empty());
            let digest = wire::piece_digest(piece_of(&content, p.number));
            assert_eq!(p.digest, digest.to_vec(), "piece {}", p.number);
        }
    }
    assert_eq!(
        pieces_reported(&reqs),
        (0..3).map(|n| (n, String::new())).collect::<Vec<_>>()
    );
    assert_eq!(progress.from_origin, content.len() as u64);
}

#[tokio::test]
async fn scheduler_stream_lost_mid_run_registers_again_and_finishes() {
    let mut h = Harness::start(&["s1", "s2"], None);
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(h.parents());
    let Command::Download { store, .. } = h.command().await else {
        panic!("the first command is not a download");
    };
    h.deliver(&store, 0).await;
    let Request::PieceFinished(p) = s.next().await else {
        panic!("piece 0 not reported");
    };
    assert_eq!(p.number, 0);
    // The scheduler goes away (a restart): its stream ends.
    drop(s);
    let mut s2 = h.stream().await;
    let Request::Register(reg) = s2.next().await else {
        panic!("the new stream does not start with a registration");
    };
    // A resumed download: the scheduler must neither schedule it afresh nor trigger a seed.
    assert!(!reg.back_to_source);
    let resume = reg.resume.expect("registered again without `resume`");
    assert_eq!(
        (resume.content_length, resume.piece_length),
        (h.content.len() as u64, PIECE)
    );
    // It says where it stands: the size, then the piece it holds.
    assert!(matches!(s2.next().await, Request::TaskMetadata(_)));
    let Request::PieceFinished(p) = s2.next().await else {
        panic!("the held piece is not reported again");
    };
    assert_eq!(p.number, 0);
    for n in 1..3 {
        h.deliver(&store, n).await;
    }
    h.events
        .send(Event::DownloadFinished { task: h.id })
        .await
        .expect("run gone");
    let reqs = s2.until_finished().await;
    assert_eq!(
        pieces_reported(&reqs),
        vec![(1, "parent-1".into()), (2, "parent-1".into())]
    );
    // The data plane went on with its parents: no second download, no cancel.
    assert!(
        h.commands.try_recv().is_err(),
        "the data plane was told again"
    );
    assert_eq!(h.origin.fetches.load(Ordering::SeqCst), 0);
    assert_eq!(h.stats.scheduler_reregistrations.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.scheduler_streams_lost.load(Ordering::Relaxed), 1);
    let content = h.content.clone();
    let (result, _) = h.finish().await;
    assert_eq!(file_bytes(&result.expect("the run failed")), content);
}

#[tokio::test]
async fn origin_status_error_ends_in_origin_status() {
    let mut h = Harness::start(
        &["s1"],
        Some(|| {
            OriginError::Status(
                reqwest::StatusCode::NOT_FOUND,
                "http://origin.test/file".into(),
            )
        }),
    );
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(Response::NeedBackToSource(NeedBackToSource {
        reason: "no peer has it".into(),
        pieces: Vec::new(),
    }));
    let (result, _) = h.finish().await;
    match result {
        Err(DownloadError::OriginStatus { status: 404, .. }) => {}
        other => panic!("expected OriginStatus 404, got {other:?}"),
    }
    // The scheduler is told why.
    let Request::Failed(f) = s.next().await else {
        panic!("the scheduler was not told of the failure");
    };
    assert!(f.reason.contains("404"), "{}", f.reason);
    assert_eq!(h.stats.downloads_succeeded.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn no_scheduler_and_an_origin_that_gives_up_ends_in_origin() {
    let mut h = Harness::start(
        &[],
        Some(|| OriginError::Exhausted {
            retries: 3,
            last: "origin answered 500 Internal Server Error".into(),
        }),
    );
    let stats = h.stats.clone();
    let origin = h.origin.clone();
    let (result, _) = h.finish().await;
    assert!(
        matches!(result, Err(DownloadError::Origin(_))),
        "{result:?}"
    );
    assert_eq!(origin.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(stats.scheduler_unreachable.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn lost_pieces_origin_error_ends_the_run_with_its_variant() {
    let mut h = Harness::start(
        &["s1"],
        Some(|| {
            OriginError::Status(
                reqwest::StatusCode::FORBIDDEN,
                "http://origin.test/file".into(),
            )
        }),
    );
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(h.parents());
    let Command::Download { store, .. } = h.command().await else {
        panic!("the first command is not a download");
    };
    h.deliver(&store, 0).await;
    s.answer(Response::NeedBackToSource(NeedBackToSource {
        reason: "the only seed left".into(),
        pieces: vec![1, 2],
    }));
    let (result, _) = h.finish().await;
    match result {
        Err(DownloadError::OriginStatus {
            status: 403,
            message,
        }) => assert!(message.contains("no peer holds"), "{message}"),
        other => panic!("expected OriginStatus 403, got {other:?}"),
    }
    // The partial file goes and the data plane stops.
    assert!(h.storage.get(&h.id).is_none(), "the partial file was kept");
    assert!(matches!(h.command().await, Command::Cancel { .. }));
}

#[tokio::test]
async fn lost_pieces_come_from_the_origin_beside_the_parents_and_finish_the_run() {
    let mut h = Harness::start(&["s1"], None);
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(h.parents());
    let Command::Download { store, .. } = h.command().await else {
        panic!("the first command is not a download");
    };
    h.deliver(&store, 0).await;
    s.answer(Response::NeedBackToSource(NeedBackToSource {
        reason: "the only seed left".into(),
        pieces: vec![1, 2],
    }));
    let reqs = s.until_finished().await;
    // The run handles the event and the answer in either order.
    let mut reported = pieces_reported(&reqs);
    reported.sort();
    assert_eq!(
        reported,
        vec![
            (0, "parent-1".into()),
            (1, String::new()),
            (2, String::new())
        ]
    );
    // The origin brought the last pieces: the data plane is told to stop.
    assert!(matches!(h.command().await, Command::Cancel { .. }));
    assert_eq!(h.origin.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(h.stats.lost_piece_fetches.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.back_to_source.load(Ordering::Relaxed), 0);
    let content = h.content.clone();
    let (result, progress) = h.finish().await;
    assert_eq!(file_bytes(&result.expect("the run failed")), content);
    assert_eq!(progress.from_origin, content.len() as u64 - PIECE);
    assert_eq!(progress.from_peers, PIECE);
}

#[tokio::test]
async fn a_stalled_download_asks_for_parents_then_goes_to_the_origin() {
    let mut h = Harness::start_with(&["s1"], None, Duration::from_millis(200));
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(h.parents());
    assert!(matches!(h.command().await, Command::Download { .. }));
    // No piece comes: first a reschedule request, then the origin.
    let Request::Reschedule(r) = s.next().await else {
        panic!("a stalled download did not ask for parents again");
    };
    assert!(r.reason.contains("no piece for"), "{}", r.reason);
    assert!(matches!(h.command().await, Command::Cancel { .. }));
    let reqs = s.until_finished().await;
    assert_eq!(pieces_reported(&reqs).len(), 3);
    assert_eq!(h.stats.download_stalls.load(Ordering::Relaxed), 2);
    let content = h.content.clone();
    let (result, progress) = h.finish().await;
    assert_eq!(file_bytes(&result.expect("the run failed")), content);
    assert_eq!(progress.from_origin, content.len() as u64);
}

#[tokio::test]
async fn a_stalled_parent_is_named_to_the_scheduler_and_left_out_of_later_parents() {
    let mut h = Harness::start(&["s1"], None);
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(h.parents());
    assert!(matches!(h.command().await, Command::Download { .. }));
    h.events
        .send(Event::ParentFailed {
            task: h.id,
            parent: "parent-1".into(),
            reason: "no byte for 3s".into(),
            stalled: true,
            forged: false,
        })
        .await
        .expect("run gone");
    let Request::Reschedule(r) = s.next().await else {
        panic!("a stalled parent was not reported");
    };
    assert_eq!(r.bad_parent_host_ids, vec!["parent-1".to_string()]);
    // The scheduler still offers it (and this host itself): neither is handed to the data
    // plane.
    let Response::CandidateParents(mut cp) = h.parents() else {
        unreachable!()
    };
    let mut me = cp.parents[0].clone();
    me.host_id = "me".into();
    let mut other = cp.parents[0].clone();
    other.host_id = "parent-2".into();
    cp.parents.extend([me, other]);
    s.answer(Response::CandidateParents(cp));
    let Command::AddParents { parents, .. } = h.command().await else {
        panic!("new parents were not added to the running download");
    };
    let ids: Vec<_> = parents.iter().map(|p| p.host_id.as_str()).collect();
    assert_eq!(ids, vec!["parent-2"]);
}

/// A parent the data plane reports as having sent a forged piece is named to the scheduler
/// at once, by the event's flag (its reason's words are not looked at).
#[tokio::test]
async fn a_forging_parent_is_named_to_the_scheduler_by_the_events_flag() {
    let mut h = Harness::start(&["s1"], None);
    let mut s = h.stream().await;
    assert!(matches!(s.next().await, Request::Register(_)));
    s.answer(h.parents());
    assert!(matches!(h.command().await, Command::Download { .. }));
    h.events
        .send(Event::ParentFailed {
            task: h.id,
            parent: "parent-1".into(),
            reason: "corrupt piece 0: bytes differ".into(),
            stalled: false,
            forged: true,
        })
        .await
        .expect("run gone");
    let Request::Reschedule(r) = s.next().await else {
        panic!("a forging parent was not reported");
    };
    assert_eq!(r.bad_parent_host_ids, vec!["parent-1".to_string()]);
    assert!(r.reason.contains("forged"), "{}", r.reason);
}
