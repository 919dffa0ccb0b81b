//! Piece fetcher: downloads a task's missing pieces from several parents at once.
//!
//! A download is a [`Session`] living on the data-plane thread that owns the task. Each
//! parent gets its own connection task, which keeps requests outstanding on the connection
//! (responses come back in order): as many as that connection delivers in
//! `request_queue_time` plus the piece on the wire, at most `pieces_in_flight`
//! ([`RequestWindow`](crate::window::RequestWindow)), so a parent whose uplink is shared by many children is not handed a
//! queue of pieces that other parents could send sooner. The parent's bitmap is
//! learnt with bitmap requests; when a parent has nothing new for us, the request is a long
//! poll, so a parent that is itself still downloading hands out each piece as soon as it has
//! it. Piece choice is rarest first over the parents' bitmaps (random tie-break), and a piece
//! is in flight from one parent at a time.
//!
//! Every piece is written through its claim (`TaskStore::claim`) and checked against its
//! crc32c (a transport check) and, when the task has trusted digests, against its BLAKE3
//! digest from the scheduler, before it is marked stored (`PieceWriter::finish`); a corrupt
//! or forged piece is counted, reported, and the parent that sent it is dropped. With
//! digests, the crc and the hash are computed by the thread's [`HashWorker`] from the chunk
//! buffers handed over, while the connection reads the next piece; the piece is committed
//! in its own task when the verdict is back ([`Session::settle`]).
//!
//! By concern: this file holds the configuration, the [`Session`] (its state, starting
//! parents, completion) and [`emit`]; the piece picker (rarest first, endgame, the in-flight
//! and availability bookkeeping) is in `fetch/picker.rs`; the sans-IO state machine of one
//! parent connection (pending requests, the parent's bitmap, the request window, backoffs,
//! deadlines; `now` passed in, picker and shaping behind a small trait) is in
//! `fetch/machine.rs`; its monoio driver (connect through one `Connector`, socket reads
//! and writes, sleeps) in `fetch/parent.rs`; receiving a piece and settling it (claim,
//! hash, commit or reject) in `fetch/receive.rs`; and this thread's table of downloads with
//! the entry points the runtime calls ([`start_download`], [`add_parents`], [`cancel`],
//! [`reap`]) in `fetch/downloads.rs`.

mod downloads;
mod machine;
mod parent;
mod picker;
mod receive;

pub use downloads::{add_parents, cancel, reap, start_download, FetchEnv};

use parent::run_parent;

use crate::bridge::{Bridge, Event, Full, Parent};
use crate::conn::ConnError;
use crate::counters::Counters;
use crate::hasher::HashWorker;
use crate::shaper::{RateLimiter, Shaping};
use crate::storage::TaskStore;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::frame::ErrorCode;
use wire::TaskId;

/// Tunables of the fetcher.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Piece requests kept outstanding per parent connection (at most; see
    /// `request_queue_time` for how many are kept below that).
    pub pieces_in_flight: usize,
    /// Delivery time a parent connection's request window covers beyond the piece on the
    /// wire, at the rate that connection delivers ([`crate::window::RequestWindow`]); zero:
    /// always `pieces_in_flight`.
    pub request_queue_time: Duration,
    /// Bytes of piece requests kept outstanding per parent connection (at most; one piece is
    /// always allowed, however long). Bounds the window when pieces are long.
    pub bytes_in_flight: u64,
    /// Time allowed to connect to a parent.
    pub connect_timeout: Duration,
    /// Time allowed for one response (a whole piece) before the parent is dropped.
    pub piece_timeout: Duration,
    /// Longest silence of a parent connection with a request outstanding: no byte for this
    /// long drops the parent (reported as stalled, [`Event::ParentFailed`]). Unlike
    /// `piece_timeout` it does not grow with the piece: a live parent sends the bytes of a
    /// piece as it goes (a rate-limited one pays for them in small steps), so silence
    /// means it stopped. A long poll alone on the connection gets `bitmap_wait` more. Zero:
    /// off.
    pub parent_idle_timeout: Duration,
    /// Long-poll time of a bitmap request when a parent has nothing new.
    pub bitmap_wait: Duration,
    /// Transport to parents. QUIC is used for a parent that announces a QUIC address when
    /// this data plane runs a QUIC endpoint; otherwise TCP.
    pub transport: Transport,
    /// TLS of the data plane's TCP connections, fetching and serving alike (the upload
    /// server takes it from here too); `None`: plaintext.
    pub tls: Option<Arc<crate::tls::DataTls>>,
    /// Longest a received piece waits for its trusted digest (the source's report still on
    /// its way through the scheduler) before it is dropped and asked for again later.
    pub digest_wait: Duration,
}

/// Transport of fetch connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TCP (the parent sends pieces with `sendfile`).
    #[default]
    Tcp,
    /// QUIC streams.
    Quic,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            pieces_in_flight: 8,
            request_queue_time: DEFAULT_REQUEST_QUEUE_TIME,
            bytes_in_flight: DEFAULT_BYTES_IN_FLIGHT,
            connect_timeout: Duration::from_secs(5),
            piece_timeout: Duration::from_secs(30),
            parent_idle_timeout: DEFAULT_PARENT_IDLE_TIMEOUT,
            bitmap_wait: Duration::from_secs(1),
            transport: Transport::Tcp,
            tls: None,
            digest_wait: DEFAULT_DIGEST_WAIT,
        }
    }
}

/// Default of [`FetchConfig::request_queue_time`]: two pieces (one on the wire, one queued)
/// up to ~400 Mbit/s with 1 MiB pieces, the `pieces_in_flight` cap from ~3 Gbit/s.
pub const DEFAULT_REQUEST_QUEUE_TIME: Duration = Duration::from_millis(20);

/// Default of [`FetchConfig::parent_idle_timeout`]: far above the gaps of a live parent
/// (a busy uplink shared by tens of connections still sends each of them bytes every few
/// milliseconds; a rate-limited one pays in 128 KiB steps: 40 children of a 2 MB/s limit
/// see a step each every 2.6 s), short enough that a stopped parent is replaced within
/// seconds: with 5 s the stalled-seed lab fault took 2.07× the no-fault burst (tuning.md,
/// "Faults during a burst").
pub const DEFAULT_PARENT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Default of [`FetchConfig::digest_wait`].
pub const DEFAULT_DIGEST_WAIT: Duration = Duration::from_secs(10);

/// Default of [`FetchConfig::bytes_in_flight`].
pub const DEFAULT_BYTES_IN_FLIGHT: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
enum ParentError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("write: {0}")]
    Write(std::io::Error),
    #[error("parent closed the connection")]
    Closed,
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("parent refused: {0:?} {1}")]
    Refused(ErrorCode, String),
    #[error("corrupt piece {0}: {1}")]
    Corrupt(u32, String),
    /// A piece with a matching crc32c but not the source's bytes (its trusted digest).
    #[error("corrupt piece {0}: {1}")]
    Forged(u32, String),
    #[error("storing piece {0}: {1}")]
    Storage(u32, crate::bridge::StorageFailure),
    #[error("the task was removed")]
    Retired,
}

impl ParentError {
    /// A corrupt piece that was forged ([`Self::Forged`]); any other error as it is.
    fn forged(self) -> Self {
        match self {
            Self::Corrupt(n, reason) => Self::Forged(n, reason),
            e => e,
        }
    }
}

/// One download on one data-plane thread.
pub struct Session {
    store: Arc<TaskStore>,
    bridge: Arc<Bridge>,
    counters: Arc<Counters>,
    cfg: FetchConfig,
    shaping: Arc<Shaping>,
    /// QUIC endpoint to reach parents with, when QUIC is on.
    quic: Option<quinn::Endpoint>,
    /// This download's own limit (dfget `--rate-limit`).
    limiter: RateLimiter,
    /// This thread's piece hasher.
    hasher: Option<Arc<HashWorker>>,
    state: RefCell<State>,
    changed: event_listener::Event,
}

struct State {
    /// Requests outstanding per piece (at most 2: one, plus an endgame duplicate).
    in_flight: Vec<u8>,
    /// When the first outstanding request of each piece was sent.
    requested_at: Vec<Option<Instant>>,
    availability: Vec<u32>,
    parents: HashMap<String, bool>,
    active: usize,
    done: bool,
}

impl Session {
    /// A session for `store` in `env`, limited to `rate_limit` bytes per second on top of
    /// the daemon's limits (0: no own limit).
    pub fn new(store: Arc<TaskStore>, env: FetchEnv, rate_limit: u64) -> Rc<Self> {
        let FetchEnv {
            bridge,
            counters,
            cfg,
            shaping,
            quic,
            hasher,
        } = env;
        let count = store.layout().piece_count() as usize;
        let limiter = shaping.limiter(rate_limit);
        Rc::new(Self {
            store,
            bridge,
            counters,
            cfg,
            shaping,
            quic,
            limiter,
            hasher,
            state: RefCell::new(State {
                in_flight: vec![0; count],
                requested_at: vec![None; count],
                availability: vec![0; count],
                parents: HashMap::new(),
                active: 0,
                done: false,
            }),
            changed: event_listener::Event::new(),
        })
    }

    /// Task id.
    pub fn task(&self) -> TaskId {
        self.store.id()
    }

    /// Whether the session ended (complete or cancelled).
    pub fn is_done(&self) -> bool {
        self.state.borrow().done
    }

    /// Starts connection tasks for parents not already in use. Returns how many started.
    pub fn add_parents(self: &Rc<Self>, parents: Vec<Parent>) -> usize {
        let mut started = 0;
        for p in parents {
            {
                let mut st = self.state.borrow_mut();
                if st.done || st.parents.get(&p.host_id).copied().unwrap_or(false) {
                    continue;
                }
                st.parents.insert(p.host_id.clone(), true);
                st.active += 1;
            }
            started += 1;
            monoio::spawn(run_parent(self.clone(), p));
        }
        started
    }

    /// Ends the session; connection tasks stop at their next step.
    pub fn cancel(&self) {
        self.state.borrow_mut().done = true;
        self.changed.notify(usize::MAX);
    }

    /// Checks for completion; emits [`Event::DownloadFinished`] once. Returns whether done.
    pub async fn check_complete(&self) -> bool {
        if !self.store.is_complete() {
            return false;
        }
        let first = {
            let mut st = self.state.borrow_mut();
            !std::mem::replace(&mut st.done, true)
        };
        if first {
            self.changed.notify(usize::MAX);
            emit(&self.bridge, Event::DownloadFinished { task: self.task() }).await;
        }
        true
    }
}

/// Queues an event for the control plane, waiting while the queue is full (the control plane
/// drains it continuously; events are never dropped).
pub async fn emit(bridge: &Bridge, ev: Event) {
    let mut ev = ev;
    let mut warned = false;
    loop {
        match bridge.emit(ev) {
            Ok(()) => return,
            Err(Full(e)) => {
                if !warned {
                    tracing::warn!("bridge event queue full; data plane waits");
                    warned = true;
                }
                ev = e;
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}
