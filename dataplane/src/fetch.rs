//! Piece fetcher: downloads a task's missing pieces from several parents at once.
//!
//! A download is a [`Session`] living on the data-plane thread that owns the task. Each
//! parent gets its own connection task, which keeps requests outstanding on the connection
//! (responses come back in order): as many as that connection delivers in
//! `request_queue_time` plus the piece on the wire, at most `pieces_in_flight`
//! ([`RequestWindow`]), so a parent whose uplink is shared by many children is not handed a
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

use crate::bridge::{Bridge, Event, Full, Parent, PieceSource};
use crate::conn::{encode_frames, ConnError, FetchStream, FrameReader, RawChunk};
use crate::counters::Counters;
use crate::hasher::{HashWorker, PieceHash};
use crate::shaper::{self, RateLimiter, Shaping};
use crate::storage::{ClaimError, PieceWriter, StoreError, TaskStore};
use crate::window::RequestWindow;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use rand::Rng;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::frame::{ErrorCode, Frame};
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

/// Endgame starts when a download misses at most this many pieces (see
/// [`Session::pick_endgame`]): few enough that a duplicate request costs little, so the
/// last pieces do not wait on one slow or overloaded parent.
const ENDGAME_PIECES: u32 = 4;
/// Longest piece an endgame duplicate keeps in memory while the first copy is being written
/// (a longer one is read and dropped unless it holds the claim).
const MAX_ENDGAME_BUFFER: u64 = 16 << 20;
/// A piece is asked for a second time only after it has been outstanding this long.
const ENDGAME_AGE: Duration = Duration::from_millis(300);

/// How often a parent that does not know the task yet is asked again before it is dropped.
const TASK_NOT_FOUND_RETRIES: u32 = 50;
/// Pause between those tries.
const TASK_NOT_FOUND_BACKOFF: Duration = Duration::from_millis(100);

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
    #[error("storing piece {0}: {1}")]
    Storage(u32, String),
    #[error("the task was removed")]
    Retired,
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

    /// Rarest piece this parent has that is neither stored nor in flight; marks it in flight.
    fn pick(&self, parent_bits: &[bool]) -> Option<u32> {
        let mut st = self.state.borrow_mut();
        let n = parent_bits.len();
        if n == 0 {
            return None;
        }
        let start = rand::rng().random_range(0..n);
        let mut best: Option<(u32, usize)> = None;
        for i in 0..n {
            let k = (start + i) % n;
            if !parent_bits[k] || st.in_flight[k] > 0 || self.store.has(k as u32) {
                continue;
            }
            let a = st.availability[k];
            if best.is_none_or(|(ba, _)| a < ba) {
                best = Some((a, k));
                if a <= 1 {
                    break;
                }
            }
        }
        let (_, k) = best?;
        st.in_flight[k] = 1;
        st.requested_at[k] = Some(Instant::now());
        Some(k as u32)
    }

    /// Endgame: when a connection has nothing else to ask its parent for, and the download
    /// misses at most [`ENDGAME_PIECES`] pieces, a piece this parent has that has been
    /// outstanding at another parent for [`ENDGAME_AGE`] is asked for here too (one duplicate
    /// at most). Whichever copy arrives first is stored. Marks it in flight again.
    fn pick_endgame(&self, parent_bits: &[bool], now: Instant) -> Option<u32> {
        let layout = self.store.layout();
        let missing = layout.piece_count() - self.store.finished_count();
        if missing > ENDGAME_PIECES {
            return None;
        }
        let mut st = self.state.borrow_mut();
        let mut best: Option<(Instant, usize)> = None;
        for (k, has) in parent_bits.iter().enumerate() {
            if !*has || st.in_flight[k] != 1 || self.store.has(k as u32) {
                continue;
            }
            let Some(at) = st.requested_at[k] else {
                continue;
            };
            if now.saturating_duration_since(at) >= ENDGAME_AGE && best.is_none_or(|(b, _)| at < b)
            {
                best = Some((at, k));
            }
        }
        let (_, k) = best?;
        st.in_flight[k] = 2;
        Some(k as u32)
    }

    /// Receives the `len` raw bytes of piece `n` chunk by chunk. With the piece's claim
    /// ([`TaskStore::claim`]) each chunk is written at its place while it is still hot in
    /// the cache, extending the crc32c as it goes (a transport's several buffers, QUIC
    /// packets, with one `pwritev`). Without it (an endgame duplicate while the first copy
    /// is being written) the bytes are kept aside, to be stored only if they check out while
    /// the piece is still missing. When the piece has (or must have) a trusted digest, each
    /// chunk buffer is then handed to this thread's [`HashWorker`], which computes its crc32c
    /// and BLAKE3 digest while the connection reads on, and a fresh buffer comes back.
    /// Returns the piece landed (its crc checked here when computed here);
    /// [`Session::settle`] checks the rest and commits it. The last chunk buffer is handed
    /// back for reuse.
    async fn receive_piece<S: FetchStream>(
        &self,
        reader: &mut FrameReader,
        stream: &mut S,
        n: u32,
        len: u64,
        crc: u32,
        buf: RawChunk,
    ) -> (Result<Landed, Received>, RawChunk) {
        let mut writer = match self.store.claim(n) {
            Ok(w) => Some(w),
            Err(ClaimError::Retired) => return (Err(Received::Store(StoreError::Retired)), buf),
            Err(ClaimError::OutOfRange) => {
                return (Err(Received::Store(StoreError::OutOfRange(n))), buf)
            }
            Err(ClaimError::Stored | ClaimError::Held) => None,
        };
        let mut buf = buf;
        // Without the claim, keep the bytes aside while another writer holds the piece: if
        // this copy checks out and the other does not, it is stored then.
        let mut aside: Option<Vec<u8>> =
            (writer.is_none() && len <= MAX_ENDGAME_BUFFER && self.store.is_claimed(n))
                .then(|| Vec::with_capacity(usize::try_from(len).unwrap_or(0)));
        let mut got = 0u64;
        let mut running = 0u32;
        // The trusted digest is checked where the piece is committed (`PieceWriter::finish`).
        // With a hash worker, it computes the crc32c and the digest off this thread.
        // (A copy that is neither written nor kept aside is read and dropped: not hashed.)
        let hashed = (writer.is_some() || aside.is_some())
            && (self.store.digests_required() || self.store.piece_digest(n).is_some());
        // A worker that is behind has no free core to run on: then this thread hashes.
        let mut hash = match (hashed, &self.hasher) {
            (false, _) => Hashing::None,
            (true, Some(w)) if !w.lagging() => Hashing::Worker(w.begin()),
            (true, _) => Hashing::Inline(Box::default()),
        };
        let crc_here = !matches!(hash, Hashing::Worker(_));
        if let (false, Some(w)) = (crc_here, writer.as_mut()) {
            w.crc_checked_elsewhere();
        }
        while got < len {
            let want = (len - got).min(RECEIVE_CHUNK);
            // A parent that stops sending mid-piece is dropped like one that never answers
            // (the buffer goes with the cancelled read; the connection is closed anyway).
            let read = monoio::time::timeout(
                self.cfg.piece_timeout,
                stream.read_raw_chunk(reader, want as usize, buf),
            )
            .await;
            let Ok((res, b)) = read else {
                return (
                    Err(Received::Stalled(self.cfg.piece_timeout)),
                    RawChunk::default(),
                );
            };
            buf = b;
            if let Err(e) = res {
                return (Err(Received::Conn(e)), buf);
            }
            let parts: Vec<&[u8]> = buf.slices().collect();
            if crc_here && writer.is_none() {
                // (The writer extends its own crc as it writes.)
                for part in &parts {
                    running = wire::piece_crc_append(running, part);
                }
            }
            let written = match writer.as_mut() {
                Some(w) => w.write_parts(&parts),
                None => Ok(()),
            };
            if let Some(a) = aside.as_mut() {
                for part in &parts {
                    a.extend_from_slice(part);
                }
            }
            if let Hashing::Inline(h) = &mut hash {
                for part in &parts {
                    h.update(part);
                }
            }
            drop(parts);
            if let Err(e) = written {
                return (Err(Received::Store(e)), buf);
            }
            if let (Hashing::Worker(piece), Some(w)) = (&hash, &self.hasher) {
                buf = w.give(piece, buf).await;
            }
            got += want;
        }
        if let Some(c) = writer.as_ref().and_then(PieceWriter::crc) {
            running = c;
        }
        if crc_here && running != crc {
            return (
                Err(Received::Store(StoreError::Digest {
                    number: n,
                    expected: crc,
                    got: running,
                })),
                buf,
            );
        }
        if let (Hashing::Worker(piece), Some(w)) = (&hash, &self.hasher) {
            w.finish(piece).await;
        }
        (
            Ok(Landed {
                n,
                crc,
                writer,
                aside,
                hash,
            }),
            buf,
        )
    }

    /// Commits a landed piece once its digest is known (waiting for the hash, and for a
    /// trusted digest still on its way, at most `digest_wait`): `Ok(true)` this copy was
    /// stored, `Ok(false)` another was (or this one was not needed). A piece whose bytes do
    /// not match is never marked ([`StoreError::PieceDigest`]); its claim is released.
    /// `None`: dropped unjudged, because `condemned` was set meanwhile (an earlier piece of
    /// the same connection was corrupt or forged: its parent is dropped at the first one).
    async fn settle(
        &self,
        landed: Landed,
        condemned: &Cell<bool>,
    ) -> Option<Result<bool, StoreError>> {
        let res = match self.judge(landed, condemned).await {
            Err(None) => None,
            Err(Some(e)) => Some(Err(e)),
            Ok(v) => Some(Ok(v)),
        };
        if matches!(
            res,
            Some(Err(
                StoreError::PieceDigest { .. } | StoreError::Digest { .. }
            ))
        ) {
            // Before any await: later pieces of this connection see it.
            condemned.set(true);
        }
        res
    }

    /// [`Session::settle`]'s work; `Err(None)`: dropped unjudged.
    async fn judge(
        &self,
        landed: Landed,
        condemned: &Cell<bool>,
    ) -> Result<bool, Option<StoreError>> {
        let Landed {
            n,
            crc,
            writer,
            aside,
            hash,
        } = landed;
        let digest = match hash {
            Hashing::None => None,
            Hashing::Inline(h) => Some(h.finish()),
            Hashing::Worker(piece) => {
                let sums = match self.hasher.as_deref() {
                    Some(w) => piece.sums(w).await,
                    None => None,
                };
                let sums = sums.ok_or(Some(StoreError::DigestUnknown(n)))?;
                if condemned.get() {
                    return Err(None);
                }
                if sums.crc32c != crc {
                    return Err(Some(StoreError::Digest {
                        number: n,
                        expected: crc,
                        got: sums.crc32c,
                    }));
                }
                Some(sums.digest)
            }
        };
        if digest.is_some() && self.store.piece_digest(n).is_none() {
            // Digest not known yet (the source's report is still on its way through the
            // scheduler): hold the piece, and the claim, until it is, at most `digest_wait`.
            self.wait_digest(n).await;
        }
        if condemned.get() {
            return Err(None);
        }
        if let Some(w) = writer {
            return w.finish(crc, digest).map_err(Some);
        }
        let Some(a) = aside else {
            return Ok(false);
        };
        if let Some(d) = digest {
            // Checked before the copy kept aside overwrites anything.
            if let Some(expected) = self.store.piece_digest(n).filter(|e| *e != d) {
                return Err(Some(StoreError::PieceDigest {
                    number: n,
                    expected,
                    got: d,
                }));
            }
        }
        match self.store.claim(n) {
            Ok(mut w) => {
                w.write(&a).map_err(Some)?;
                w.finish(crc, digest).map_err(Some)
            }
            Err(ClaimError::Retired) => Err(Some(StoreError::Retired)),
            // Stored by the other copy, or it is still being written.
            Err(_) => Ok(false),
        }
    }

    /// What a settled piece means for the connection that brought it: counters, events,
    /// and the error that drops the parent (a corrupt or forged piece, a storage failure).
    async fn settled(
        &self,
        res: Result<bool, StoreError>,
        n: u32,
        len: u64,
        crc: u32,
        p: &Parent,
        took: Duration,
    ) -> Result<(), ParentError> {
        let task = self.task();
        match res {
            Ok(false) => {
                // The other copy of an endgame duplicate got here first.
                self.release(n);
                Counters::add(&self.counters.endgame_duplicates, 1);
            }
            Ok(true) => {
                self.release(n);
                let source = if p.is_seed {
                    Counters::add(&self.counters.bytes_from_seed, len);
                    PieceSource::Seed(p.host_id.clone())
                } else {
                    Counters::add(&self.counters.bytes_from_peers, len);
                    PieceSource::Peer(p.host_id.clone())
                };
                Counters::add(&self.counters.pieces_downloaded, 1);
                emit(
                    &self.bridge,
                    Event::PieceFinished {
                        task,
                        number: n,
                        crc32c: crc,
                        length: len,
                        source,
                        cost_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                    },
                )
                .await;
            }
            Err(StoreError::DigestUnknown(_)) => {
                // Not the parent's fault: the piece is asked for again later.
                Counters::add(&self.counters.digest_wait_timeouts, 1);
                self.release(n);
            }
            Err(e @ StoreError::PieceDigest { .. }) => {
                // Bytes other than the source's with a matching crc32c: a forging (or badly
                // broken) parent. Never stored; the parent is dropped and reported, and the
                // piece fetched elsewhere.
                Counters::add(&self.counters.pieces_forged, 1);
                let reason = format!("forged piece: {e}");
                tracing::warn!(task = %task, parent = %p.host_id, "{reason}");
                return Err(self.corrupt_piece(task, n, &p.host_id, reason).await);
            }
            Err(StoreError::Digest { expected, got, .. }) => {
                let reason =
                    format!("crc32c {got:08x} does not match the announced {expected:08x}");
                return Err(self.corrupt_piece(task, n, &p.host_id, reason).await);
            }
            Err(StoreError::Retired) => {
                // Removed on purpose (failed run, user delete, eviction): whoever removed it
                // knows; the session just ends, without events about a task that is gone.
                self.release(n);
                self.cancel();
                return Err(ParentError::Retired);
            }
            Err(e) => {
                self.release(n);
                return Err(ParentError::Storage(n, e.to_string()));
            }
        }
        Ok(())
    }

    /// Piece `n` from `parent` failed its check (`reason`): counted, released for another
    /// parent, reported; the error that drops the parent.
    async fn corrupt_piece(
        &self,
        task: TaskId,
        n: u32,
        parent: &str,
        reason: String,
    ) -> ParentError {
        Counters::add(&self.counters.pieces_corrupt, 1);
        self.release(n);
        emit(
            &self.bridge,
            Event::PieceFailed {
                task,
                number: n,
                parent: parent.to_owned(),
                reason: reason.clone(),
            },
        )
        .await;
        ParentError::Corrupt(n, reason)
    }

    /// Waits until the trusted digest of piece `n` is known, or `digest_wait` passed.
    async fn wait_digest(&self, n: u32) {
        let deadline = Instant::now() + self.cfg.digest_wait;
        Counters::add(&self.counters.digest_waits, 1);
        while self.store.piece_digest(n).is_none() && !self.is_done() {
            let listener = self.store.listen_digests();
            if self.store.piece_digest(n).is_some() || !self.store.digests_required() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Bounded again by 100 ms: a wake-up from another thread is not missed for long.
            let _ = monoio::time::timeout(left.min(Duration::from_millis(100)), listener).await;
        }
    }

    fn release(&self, n: u32) {
        {
            let mut st = self.state.borrow_mut();
            if let Some(f) = st.in_flight.get_mut(n as usize) {
                *f = f.saturating_sub(1);
                if *f == 0 {
                    st.requested_at[n as usize] = None;
                }
            }
        }
        self.changed.notify(usize::MAX);
    }

    fn learn(&self, n: usize, has: bool) {
        let mut st = self.state.borrow_mut();
        if let Some(a) = st.availability.get_mut(n) {
            if has {
                *a += 1;
            } else {
                *a = a.saturating_sub(1);
            }
        }
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

/// Bytes of a piece received and written per step (as the sendfile baseline's reader): still
/// in the cache between the socket read, the crc and the file write, and 4x fewer `pwrite`s,
/// recvs and wake-ups than 256 KiB (measured: tuning.md, 2026-11-24).
const RECEIVE_CHUNK: u64 = 1 << 20;

/// A piece whose bytes all arrived (with the right crc32c, when computed on the receiving
/// thread), not committed yet ([`Session::settle`]).
struct Landed {
    n: u32,
    crc: u32,
    /// The piece's claim, with the bytes written; `None` for a copy without it.
    writer: Option<PieceWriter>,
    /// A copy without the claim, kept to be stored if the claimed one fails.
    aside: Option<Vec<u8>>,
    hash: Hashing,
}

/// How a piece's BLAKE3 digest is being computed.
enum Hashing {
    /// Not needed (digests neither required nor known for the task).
    None,
    /// On the receiving thread (no hash worker).
    Inline(Box<wire::PieceHasher>),
    /// By this thread's [`HashWorker`].
    Worker(Arc<PieceHash>),
}

/// Pieces of one connection landed and waiting for their digest (the connection reads on
/// meanwhile); past it the connection waits for the oldest to settle.
const MAX_UNSETTLED: usize = 4;

/// Why receiving a piece failed.
enum Received {
    /// The connection failed mid-piece.
    Conn(ConnError),
    /// No byte of the piece arrived for this long.
    Stalled(Duration),
    /// The piece is corrupt or could not be written.
    Store(StoreError),
}

enum Pending {
    Piece(u32, Instant),
    Bitmap,
}

struct ParentConn {
    bits: Vec<bool>,
    count: u32,
    have_bitmap: bool,
    pending: VecDeque<Pending>,
    not_found: u32,
    /// Pieces landed and settling in their own tasks (at most [`MAX_UNSETTLED`] unfinished).
    settling: VecDeque<monoio::task::JoinHandle<()>>,
    /// The first error a settling piece found (forged, corrupt, storage): drops the parent.
    failed: Rc<RefCell<Option<ParentError>>>,
    /// Set at the first corrupt or forged piece: pieces of this connection still settling
    /// are dropped unjudged (the parent is dropped at its first bad piece).
    condemned: Rc<Cell<bool>>,
}

async fn run_parent(s: Rc<Session>, p: Parent) {
    let mut pc = ParentConn {
        bits: vec![false; s.store.layout().piece_count() as usize],
        count: 0,
        have_bitmap: false,
        pending: VecDeque::new(),
        not_found: 0,
        settling: VecDeque::new(),
        failed: Rc::new(RefCell::new(None)),
        condemned: Rc::new(Cell::new(false)),
    };
    let mut res = parent_loop(&s, &p, &mut pc).await;
    // Pieces still settling are committed (or refused) before the parent counts as gone.
    while let Some(h) = pc.settling.pop_front() {
        h.await;
    }
    if let Some(e) = pc.failed.borrow_mut().take() {
        if res.is_ok()
            || matches!(
                e,
                ParentError::Storage(..) | ParentError::Corrupt(..) | ParentError::Retired
            )
        {
            res = Err(e);
        }
    }
    // Give back whatever this parent still owed us, and forget its bitmap.
    for pend in pc.pending.drain(..) {
        if let Pending::Piece(n, _) = pend {
            s.release(n);
        }
    }
    for (n, has) in pc.bits.iter().enumerate() {
        if *has {
            s.learn(n, false);
        }
    }
    let (active, done) = {
        let mut st = s.state.borrow_mut();
        st.parents.insert(p.host_id.clone(), false);
        st.active -= 1;
        (st.active, st.done)
    };
    if let Err(ParentError::Retired) = res {
        return;
    }
    if let Err(e) = res {
        tracing::info!(task = %s.task(), parent = %p.host_id, "parent dropped: {e}");
        let stalled = matches!(
            e,
            ParentError::Timeout(_) | ParentError::Conn(ConnError::Idle(_))
        );
        if let ParentError::Storage(_, reason) = &e {
            emit(
                &s.bridge,
                Event::StorageFailed {
                    task: s.task(),
                    reason: reason.clone(),
                },
            )
            .await;
            s.cancel();
            return;
        }
        emit(
            &s.bridge,
            Event::ParentFailed {
                task: s.task(),
                parent: p.host_id.clone(),
                reason: e.to_string(),
                stalled,
            },
        )
        .await;
    }
    if !done && !s.check_complete().await && active == 0 {
        emit(&s.bridge, Event::NeedParents { task: s.task() }).await;
    }
}

async fn parent_loop(s: &Rc<Session>, p: &Parent, pc: &mut ParentConn) -> Result<(), ParentError> {
    if let (Transport::Quic, Some(addr), Some(ep)) = (s.cfg.transport, p.quic_addr, &s.quic) {
        let stream = match monoio::time::timeout(
            s.cfg.connect_timeout,
            crate::quic::connect(ep, addr, s.cfg.tls.as_deref(), &s.counters),
        )
        .await
        {
            Ok(Ok(st)) => st,
            Ok(Err(e)) => return Err(ParentError::Connect(e)),
            Err(_) => return Err(ParentError::ConnectTimeout),
        };
        Counters::add(&s.counters.quic_connections, 1);
        return parent_io(s, p, pc, stream).await;
    }
    let stream =
        match monoio::time::timeout(s.cfg.connect_timeout, TcpStream::connect_addr(p.addr)).await {
            Ok(Ok(st)) => st,
            Ok(Err(e)) => return Err(ParentError::Connect(e)),
            Err(_) => return Err(ParentError::ConnectTimeout),
        };
    let _ = stream.set_nodelay(true);
    if let Some(tls) = &s.cfg.tls {
        let stream = match monoio::time::timeout(
            s.cfg.connect_timeout,
            tls.connect(p.addr.ip(), stream, &s.counters),
        )
        .await
        {
            Ok(Ok(st)) => st,
            Ok(Err(e)) => return Err(ParentError::Connect(e)),
            Err(_) => return Err(ParentError::ConnectTimeout),
        };
        return parent_io(s, p, pc, stream).await;
    }
    parent_io(s, p, pc, stream).await
}

/// Runs the request/response exchange with one parent over an open connection.
async fn parent_io<S: FetchStream>(
    s: &Rc<Session>,
    p: &Parent,
    pc: &mut ParentConn,
    mut stream: S,
) -> Result<(), ParentError> {
    let mut reader = FrameReader::new();
    let idle = s.cfg.parent_idle_timeout;
    let mut piece_buf = RawChunk::default();
    let limiter = s.shaping.limiter(s.shaping.config().per_peer_download);
    let task = s.task();
    let layout = s.store.layout();
    let max_bytes = s.cfg.bytes_in_flight.max(1);
    let mut win = RequestWindow::new(usize::MAX, max_bytes, s.cfg.request_queue_time);
    let bitmap_wait_ms = u32::try_from(s.cfg.bitmap_wait.as_millis()).unwrap_or(u32::MAX);
    loop {
        if let Some(e) = pc.failed.borrow_mut().take() {
            return Err(e);
        }
        if s.is_done() || s.check_complete().await {
            return Ok(());
        }
        let mut frames = Vec::new();
        let bitmap_pending = pc.pending.iter().any(|x| matches!(x, Pending::Bitmap));
        if !pc.have_bitmap {
            if !bitmap_pending {
                frames.push(Frame::BitmapRequest {
                    task,
                    known: 0,
                    wait_ms: 0,
                });
                pc.pending.push_back(Pending::Bitmap);
            }
        } else {
            let window = win.limit(layout.piece_length()).min(
                s.shaping
                    .pieces_in_flight()
                    .unwrap_or(s.cfg.pieces_in_flight)
                    .max(1),
            );
            let (mut pieces, mut bytes) = (0usize, 0u64);
            for x in &pc.pending {
                if let Pending::Piece(n, _) = x {
                    pieces += 1;
                    bytes += layout.piece_size(*n).unwrap_or(0);
                }
            }
            // The window is full at `window` pieces or at `bytes_in_flight` bytes, whichever
            // comes first (one piece always fits).
            let full = |pieces: usize, bytes: u64| {
                pieces >= window || (pieces > 0 && bytes + layout.piece_length() > max_bytes)
            };
            // No piece request may queue behind a long poll on the same connection.
            while !full(pieces, bytes) && !bitmap_pending {
                let picked = s.pick(&pc.bits).or_else(|| {
                    (pieces == 0)
                        .then(|| s.pick_endgame(&pc.bits, Instant::now()))
                        .flatten()
                });
                let Some(n) = picked else { break };
                let size = layout.piece_size(n).unwrap_or(0);
                let wait = shaper::reserve_all(
                    &[Some(&s.shaping.download), Some(&s.limiter), Some(&limiter)],
                    size,
                );
                if !wait.is_zero() {
                    Counters::add(&s.counters.shaping_waits, 1);
                    if !frames.is_empty() {
                        let (res, _) = stream.write_all(encode_frames(&frames)).await;
                        res.map_err(ParentError::Write)?;
                        frames.clear();
                    }
                    monoio::time::sleep(s.shaping.clock().pass(wait)).await;
                }
                frames.push(Frame::PieceRequest { task, number: n });
                pc.pending.push_back(Pending::Piece(n, Instant::now()));
                pieces += 1;
                bytes += size;
            }
            Counters::max(&s.counters.max_requests_in_flight, pieces as u64);
            let parent_complete = pc.count == layout.piece_count();
            if !full(pieces, bytes) && !bitmap_pending && !parent_complete {
                let wait_ms = if pc.pending.is_empty() {
                    bitmap_wait_ms
                } else {
                    0
                };
                frames.push(Frame::BitmapRequest {
                    task,
                    known: pc.count,
                    wait_ms,
                });
                pc.pending.push_back(Pending::Bitmap);
            }
        }
        if !frames.is_empty() {
            let (res, _) = stream.write_all(encode_frames(&frames)).await;
            res.map_err(ParentError::Write)?;
        }
        if pc.pending.is_empty() {
            // This parent has everything and all we miss is in flight elsewhere: wait for a
            // change (a piece released by another parent, or the end).
            let l = s.changed.listen();
            let _ = monoio::time::timeout(Duration::from_millis(200), l).await;
            continue;
        }
        // Silence with a request outstanding drops the parent after `parent_idle_timeout`
        // (the bound holds through the piece's body too: `receive_piece` reads with this
        // reader); a long poll alone on the connection may first be silent for its wait.
        let only_poll =
            pc.pending.len() == 1 && matches!(pc.pending.front(), Some(Pending::Bitmap));
        reader.set_idle_timeout((!idle.is_zero()).then(|| {
            if only_poll {
                idle + s.cfg.bitmap_wait
            } else {
                idle
            }
        }));
        let frame = match monoio::time::timeout(s.cfg.piece_timeout, reader.read_frame(&mut stream))
            .await
        {
            Err(_) => return Err(ParentError::Timeout(s.cfg.piece_timeout)),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Err(ParentError::Closed),
            Ok(Err(e)) => return Err(e.into()),
        };
        let Some(front) = pc.pending.pop_front() else {
            return Err(ParentError::Protocol("response without a request".into()));
        };
        match (front, frame) {
            (
                Pending::Bitmap,
                Frame::Bitmap {
                    task: t,
                    content_length,
                    piece_length,
                    piece_count,
                    bits,
                },
            ) => {
                if t != task
                    || content_length != layout.content_length()
                    || u64::from(piece_length) != layout.piece_length()
                    || piece_count != layout.piece_count()
                {
                    return Err(ParentError::Protocol(format!(
                        "bitmap layout {content_length}/{piece_length}/{piece_count} does not match the task's {}/{}/{}",
                        layout.content_length(),
                        layout.piece_length(),
                        layout.piece_count()
                    )));
                }
                pc.have_bitmap = true;
                for n in 0..piece_count {
                    if wire::frame::bitmap_get(&bits, n) && !pc.bits[n as usize] {
                        pc.bits[n as usize] = true;
                        pc.count += 1;
                        s.learn(n as usize, true);
                    }
                }
            }
            (
                Pending::Bitmap,
                Frame::Error {
                    code: ErrorCode::TaskNotFound,
                    message,
                },
            ) => {
                // The parent may not have opened the task yet (it registered a moment ago).
                pc.not_found += 1;
                if pc.not_found > TASK_NOT_FOUND_RETRIES {
                    return Err(ParentError::Refused(ErrorCode::TaskNotFound, message));
                }
                monoio::time::sleep(TASK_NOT_FOUND_BACKOFF).await;
            }
            (Pending::Piece(n, started), Frame::Piece(h)) => {
                let range = layout
                    .piece_range(n)
                    .ok_or_else(|| ParentError::Protocol(format!("piece {n} out of range")))?;
                let len = range.end - range.start;
                if h.task != task
                    || h.number != n
                    || h.offset != range.start
                    || u64::from(h.length) != len
                {
                    s.release(n);
                    return Err(ParentError::Protocol(format!(
                        "piece header {}/{}/{} does not answer request for piece {n} ({}+{len})",
                        h.number, h.offset, h.length, range.start
                    )));
                }
                let (res, buf) = s
                    .receive_piece(
                        &mut reader,
                        &mut stream,
                        n,
                        len,
                        h.crc32c,
                        std::mem::take(&mut piece_buf),
                    )
                    .await;
                piece_buf = buf;
                let landed = match res {
                    Ok(l) => l,
                    Err(Received::Conn(e)) => {
                        s.release(n);
                        return Err(e.into());
                    }
                    Err(Received::Stalled(d)) => {
                        s.release(n);
                        return Err(ParentError::Timeout(d));
                    }
                    Err(Received::Store(e)) => {
                        s.settled(Err(e), n, len, h.crc32c, p, Duration::ZERO)
                            .await?;
                        continue;
                    }
                };
                let more = pc.pending.iter().any(|x| matches!(x, Pending::Piece(..)));
                let took = win.on_piece(len, started, Instant::now(), more);
                tracing::trace!(
                    task = %task,
                    piece = n,
                    parent = %p.host_id,
                    ms = started.elapsed().as_millis() as u64,
                    service_ms = took.as_millis() as u64,
                    window = win.limit(layout.piece_length()),
                    "piece fetched"
                );
                let crc = h.crc32c;
                if landed.writer.is_some() && matches!(landed.hash, Hashing::Worker(_)) {
                    // Hashed by the worker: commit when the verdict comes, reading on.
                    let (s2, p2, failed) = (s.clone(), p.clone(), pc.failed.clone());
                    let condemned = pc.condemned.clone();
                    pc.settling.push_back(monoio::spawn(async move {
                        let Some(res) = s2.settle(landed, &condemned).await else {
                            s2.release(n);
                            return;
                        };
                        if let Err(e) = s2.settled(res, n, len, crc, &p2, took).await {
                            failed.borrow_mut().get_or_insert(e);
                            // Wake the connection if it waits for work.
                            s2.changed.notify(usize::MAX);
                        }
                    }));
                    while pc.settling.len() > MAX_UNSETTLED {
                        if let Some(h) = pc.settling.pop_front() {
                            h.await;
                        }
                    }
                } else {
                    match s.settle(landed, &pc.condemned).await {
                        Some(res) => s.settled(res, n, len, crc, p, took).await?,
                        None => s.release(n),
                    }
                }
            }
            (Pending::Piece(n, _), Frame::Error { code, message }) => {
                s.release(n);
                match code {
                    ErrorCode::PieceNotAvailable => {
                        if pc.bits.get(n as usize).copied().unwrap_or(false) {
                            pc.bits[n as usize] = false;
                            pc.count -= 1;
                            s.learn(n as usize, false);
                        }
                    }
                    ErrorCode::Busy => monoio::time::sleep(Duration::from_millis(50)).await,
                    other => return Err(ParentError::Refused(other, message)),
                }
            }
            (_, Frame::Error { code, message }) => return Err(ParentError::Refused(code, message)),
            (Pending::Piece(n, _), _) => {
                s.release(n);
                return Err(ParentError::Protocol(format!(
                    "unexpected frame in answer to piece {n}"
                )));
            }
            (Pending::Bitmap, _) => {
                return Err(ParentError::Protocol(
                    "unexpected frame in answer to a bitmap request".into(),
                ))
            }
        }
    }
}

thread_local! {
    static SESSIONS: RefCell<HashMap<TaskId, Rc<Session>>> = RefCell::new(HashMap::new());
}

/// Where a download runs and what it may use.
#[derive(Debug, Clone)]
pub struct FetchEnv {
    /// Queues to the control plane.
    pub bridge: Arc<Bridge>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Fetcher tunables.
    pub cfg: FetchConfig,
    /// Rate limits of the daemon.
    pub shaping: Arc<Shaping>,
    /// QUIC endpoint, when the data plane runs one.
    pub quic: Option<quinn::Endpoint>,
    /// The thread's piece hasher ([`crate::hasher`]); `None`: pieces are hashed on the
    /// receiving thread.
    pub hasher: Option<Arc<HashWorker>>,
}

/// Starts (or extends) the download of `store` on this thread, limited to `rate_limit`
/// bytes per second on top of the daemon's limits (0: no own limit). The session is in this
/// thread's table when this returns, so an [`add_parents`] handled right after it (the
/// control plane often sends both at once) reaches it; the rest runs as a task.
pub fn start_download(store: Arc<TaskStore>, parents: Vec<Parent>, rate_limit: u64, env: FetchEnv) {
    let bridge = env.bridge.clone();
    let id = store.id();
    let existing = SESSIONS.with(|m| m.borrow().get(&id).filter(|s| !s.is_done()).cloned());
    let session = match existing {
        Some(s) => s,
        None => {
            let s = Session::new(store, env, rate_limit);
            SESSIONS.with(|m| m.borrow_mut().insert(id, s.clone()));
            s
        }
    };
    monoio::spawn(async move {
        if session.check_complete().await {
            SESSIONS.with(|m| m.borrow_mut().remove(&id));
            return;
        }
        if session.add_parents(parents) == 0 && session.state.borrow().active == 0 {
            emit(&bridge, Event::NeedParents { task: id }).await;
        }
    });
}

/// Adds parents to a running download on this thread (ignored when none runs).
pub fn add_parents(task: &TaskId, parents: Vec<Parent>) {
    if let Some(s) = SESSIONS.with(|m| m.borrow().get(task).cloned()) {
        s.add_parents(parents);
    }
}

/// Cancels a running download on this thread.
pub fn cancel(task: &TaskId) {
    if let Some(s) = SESSIONS.with(|m| m.borrow_mut().remove(task)) {
        s.cancel();
    }
}

/// Drops finished sessions from this thread's table.
pub fn reap() {
    SESSIONS.with(|m| m.borrow_mut().retain(|_, s| !s.is_done()));
}
