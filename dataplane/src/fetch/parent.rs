//! One connection per parent: connecting over QUIC, TCP or TLS ([`connect`]), the
//! request/response exchange with the parent (`parent_io`: request window, bitmaps, pieces
//! handed to [`Session::receive_piece`]), and what is given back when the parent goes.

use super::receive::{Hashing, Received};
use super::{emit, ParentError, Session, Transport};
use crate::bridge::{Event, Parent};
use crate::conn::{encode_frames, ConnError, FetchStream, FrameReader, RawChunk};
use crate::counters::Counters;
use crate::shaper;
use crate::window::RequestWindow;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};
use wire::frame::{ErrorCode, Frame};

/// How often a parent that does not know the task yet is asked again before it is dropped.
const TASK_NOT_FOUND_RETRIES: u32 = 50;
/// Pause between those tries.
const TASK_NOT_FOUND_BACKOFF: Duration = Duration::from_millis(100);

/// Pieces of one connection landed and waiting for their digest (the connection reads on
/// meanwhile); past it the connection waits for the oldest to settle.
const MAX_UNSETTLED: usize = 4;

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

impl ParentConn {
    /// The state of a new connection to a parent of a task of `piece_count` pieces: nothing
    /// known, nothing asked.
    fn new(piece_count: u32) -> Self {
        Self {
            bits: vec![false; piece_count as usize],
            count: 0,
            have_bitmap: false,
            pending: VecDeque::new(),
            not_found: 0,
            settling: VecDeque::new(),
            failed: Rc::new(RefCell::new(None)),
            condemned: Rc::new(Cell::new(false)),
        }
    }

    /// When the parent goes (whatever the reason, mid-piece included): gives back to `s`
    /// every piece still requested from it, so other parents may pick them, and forgets its
    /// bitmap in the availability counts. No I/O.
    fn give_back(&mut self, s: &Session) {
        for pend in self.pending.drain(..) {
            if let Pending::Piece(n, _) = pend {
                s.release(n);
            }
        }
        for (n, has) in self.bits.iter().enumerate() {
            if *has {
                s.learn(n, false);
            }
        }
    }
}

pub(super) async fn run_parent(s: Rc<Session>, p: Parent) {
    let mut pc = ParentConn::new(s.store.layout().piece_count());
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
    pc.give_back(&s);
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
        let stream = connect(
            s,
            crate::quic::connect(ep, addr, s.cfg.tls.as_deref(), &s.counters),
        )
        .await?;
        Counters::add(&s.counters.quic_connections, 1);
        return parent_io(s, p, pc, stream).await;
    }
    let stream = connect(s, TcpStream::connect_addr(p.addr)).await?;
    let _ = stream.set_nodelay(true);
    if let Some(tls) = &s.cfg.tls {
        let stream = connect(s, tls.connect(p.addr.ip(), stream, &s.counters)).await?;
        return parent_io(s, p, pc, stream).await;
    }
    parent_io(s, p, pc, stream).await
}

/// One step of connecting to a parent (QUIC, TCP, or the TLS handshake over TCP), bounded
/// by `connect_timeout`. Each transport keeps its own stream type, so [`parent_io`] stays
/// generic over it (no dynamic dispatch per read).
async fn connect<T>(
    s: &Session,
    step: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ParentError> {
    match monoio::time::timeout(s.cfg.connect_timeout, step).await {
        Ok(Ok(st)) => Ok(st),
        Ok(Err(e)) => Err(ParentError::Connect(e)),
        Err(_) => Err(ParentError::ConnectTimeout),
    }
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

#[cfg(test)]
mod tests {
    use super::super::picker::tests::{learn_bits, session};
    use super::*;

    /// What a parent's bitmap answer does to its connection state and to the session.
    fn learn_parent(s: &Session, pc: &mut ParentConn, bits: &[bool]) {
        for (n, has) in bits.iter().enumerate() {
            if *has && !pc.bits[n] {
                pc.bits[n] = true;
                pc.count += 1;
                s.learn(n, true);
            }
        }
        pc.have_bitmap = true;
    }

    /// A parent that dies with pieces requested (one of them mid-piece) gives them all back:
    /// another parent picks exactly those next, and the dead parent's bitmap no longer
    /// counts toward availability.
    #[test]
    fn a_parent_that_dies_mid_piece_gives_back_what_it_owed() {
        let (_d, s) = session(4);
        let mut dead = ParentConn::new(4);
        learn_parent(&s, &mut dead, &[true, true, true, false]);
        // Another parent has everything.
        let other = [true; 4];
        learn_bits(&s, &other);
        let mut owed = Vec::new();
        for _ in 0..2 {
            let n = s.pick(&dead.bits).expect("pick");
            dead.pending.push_back(Pending::Piece(n, Instant::now()));
            owed.push(n);
        }
        dead.pending.push_back(Pending::Bitmap);
        // The other parent gets what nobody asked for yet, and then nothing.
        let mut rest: Vec<u32> = std::iter::from_fn(|| s.pick(&other)).collect();
        assert_eq!(rest.len(), 2);
        dead.give_back(&s);
        assert!(dead.pending.is_empty());
        assert_eq!(s.state.borrow().availability, [1, 1, 1, 1]);
        let mut again: Vec<u32> = std::iter::from_fn(|| s.pick(&other)).collect();
        again.sort_unstable();
        owed.sort_unstable();
        assert_eq!(
            again, owed,
            "exactly what the dead parent owed is pickable again"
        );
        rest.extend(again);
        rest.sort_unstable();
        assert_eq!(rest, [0, 1, 2, 3]);
    }

    /// In the endgame, a parent that dies holding a duplicate leaves the piece in flight at
    /// the other parent (not handed out a third time, not forgotten).
    #[test]
    fn a_dead_endgame_duplicate_leaves_the_other_copy_in_flight() {
        let (_d, s) = session(1);
        let mut first = ParentConn::new(1);
        let mut dup = ParentConn::new(1);
        learn_parent(&s, &mut first, &[true]);
        learn_parent(&s, &mut dup, &[true]);
        let n = s.pick(&first.bits).expect("pick");
        first.pending.push_back(Pending::Piece(n, Instant::now()));
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(s.pick_endgame(&dup.bits, later), Some(n));
        dup.pending.push_back(Pending::Piece(n, later));
        dup.give_back(&s);
        assert_eq!(s.state.borrow().in_flight[0], 1);
        assert_eq!(s.state.borrow().availability[0], 1);
        assert_eq!(
            s.pick(&first.bits),
            None,
            "still in flight at the first parent"
        );
        first.give_back(&s);
        let mut third = ParentConn::new(1);
        learn_parent(&s, &mut third, &[true]);
        assert_eq!(
            s.pick(&third.bits),
            Some(0),
            "both copies gone: pickable again"
        );
    }
}
