//! One connection per parent: connecting over QUIC, TCP or TLS (one [`Connector`]), the
//! request/response exchange with the parent (`parent_io`, the monoio driver of the
//! connection's sans-IO [`ParentMachine`]: socket reads and writes, sleeps until its
//! deadlines, piece bodies streamed by [`Session::receive_piece`]), and what is given back
//! when the parent goes.

use super::machine::{Action, MachineConfig, ParentMachine, PieceTiming, SessionSwarm, Transmit};
use super::receive::{Hashing, Received};
use super::{emit, ParentError, Session, Transport};
use crate::bridge::{Event, Parent};
use crate::conn::{encode_frames, ConnError, FetchStream, FrameReader, RawChunk};
use crate::counters::Counters;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Pieces of one connection landed and waiting for their digest (the connection reads on
/// meanwhile); past it the connection waits for the oldest to settle.
const MAX_UNSETTLED: usize = 4;

/// One connection's state: the sans-IO [`ParentMachine`], and the pieces of the connection
/// settling in their own tasks.
struct ParentConn {
    machine: ParentMachine,
    /// Pieces landed and settling in their own tasks (at most [`MAX_UNSETTLED`] unfinished).
    settling: VecDeque<monoio::task::JoinHandle<()>>,
    /// The first error a settling piece found (forged, corrupt, storage): drops the parent.
    failed: Rc<RefCell<Option<ParentError>>>,
    /// Set at the first corrupt or forged piece: pieces of this connection still settling
    /// are dropped unjudged (the parent is dropped at its first bad piece).
    condemned: Rc<Cell<bool>>,
}

pub(super) async fn run_parent(s: Rc<Session>, p: Parent) {
    let mut pc = ParentConn {
        machine: ParentMachine::new(
            s.task(),
            s.store.layout(),
            MachineConfig::from_fetch(&s.cfg),
        ),
        settling: VecDeque::new(),
        failed: Rc::new(RefCell::new(None)),
        condemned: Rc::new(Cell::new(false)),
    };
    let limiter = s.shaping.limiter(s.shaping.config().per_peer_download);
    let swarm = SessionSwarm {
        s: &s,
        limiter: &limiter,
    };
    let mut res = parent_loop(&s, &p, &mut pc, &swarm).await;
    // Pieces still settling are committed (or refused) before the parent counts as gone.
    while let Some(h) = pc.settling.pop_front() {
        h.await;
    }
    if let Some(e) = pc.failed.borrow_mut().take() {
        if res.is_ok()
            || matches!(
                e,
                ParentError::Storage(..)
                    | ParentError::Corrupt(..)
                    | ParentError::Forged(..)
                    | ParentError::Retired
            )
        {
            res = Err(e);
        }
    }
    pc.machine.give_back(&swarm);
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
        if let ParentError::Storage(_, failure) = &e {
            emit(
                &s.bridge,
                Event::StorageFailed {
                    task: s.task(),
                    failure: failure.clone(),
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
                forged: matches!(e, ParentError::Forged(..)),
            },
        )
        .await;
    }
    if !done && !s.check_complete().await && active == 0 {
        emit(&s.bridge, Event::NeedParents { task: s.task() }).await;
    }
}

async fn parent_loop(
    s: &Rc<Session>,
    p: &Parent,
    pc: &mut ParentConn,
    swarm: &SessionSwarm<'_>,
) -> Result<(), ParentError> {
    Connector::for_parent(s, p)
        .connect(s, Exchange { s, p, pc, swarm })
        .await?
}

/// How one parent is reached: QUIC when this data plane runs an endpoint, QUIC is the
/// configured transport and the parent announces a QUIC address; otherwise TCP, with the
/// TLS handshake over it when the data plane has TLS. Each step is bounded by
/// `connect_timeout`.
enum Connector {
    /// A QUIC stream to this address.
    Quic(quinn::Endpoint, std::net::SocketAddr),
    /// TCP (`Some`: then TLS) to this address.
    Tcp(
        std::net::SocketAddr,
        Option<std::sync::Arc<crate::tls::DataTls>>,
    ),
}

/// What runs over a connection once it is open. Generic over the stream, so each transport
/// keeps its own stream type (no dynamic dispatch per read).
trait OnConnect {
    /// What the run returns.
    type Output;
    /// Runs over `stream`.
    async fn run<S: FetchStream>(self, stream: S) -> Self::Output;
}

impl Connector {
    /// The way to reach `p` from `s`.
    fn for_parent(s: &Session, p: &Parent) -> Self {
        match (s.cfg.transport, p.quic_addr, &s.quic) {
            (Transport::Quic, Some(addr), Some(ep)) => Self::Quic(ep.clone(), addr),
            _ => Self::Tcp(p.addr, s.cfg.tls.clone()),
        }
    }

    /// Connects (counting QUIC connections), then runs `then` over the stream.
    async fn connect<T: OnConnect>(self, s: &Session, then: T) -> Result<T::Output, ParentError> {
        match self {
            Self::Quic(ep, addr) => {
                let stream = connect(
                    s,
                    crate::quic::connect(&ep, addr, s.cfg.tls.as_deref(), &s.counters),
                )
                .await?;
                Counters::add(&s.counters.quic_connections, 1);
                Ok(then.run(stream).await)
            }
            Self::Tcp(addr, tls) => {
                let stream = connect(s, TcpStream::connect_addr(addr)).await?;
                let _ = stream.set_nodelay(true);
                match tls {
                    Some(tls) => {
                        let stream =
                            connect(s, tls.connect(addr.ip(), stream, &s.counters)).await?;
                        Ok(then.run(stream).await)
                    }
                    None => Ok(then.run(stream).await),
                }
            }
        }
    }
}

/// The request/response exchange ([`parent_io`]) waiting for its connection.
struct Exchange<'a, 'b> {
    s: &'a Rc<Session>,
    p: &'a Parent,
    pc: &'a mut ParentConn,
    swarm: &'a SessionSwarm<'b>,
}

impl OnConnect for Exchange<'_, '_> {
    type Output = Result<(), ParentError>;

    async fn run<S: FetchStream>(self, stream: S) -> Self::Output {
        parent_io(self.s, self.p, self.pc, self.swarm, stream).await
    }
}

/// One step of connecting to a parent (QUIC, TCP, or the TLS handshake over TCP), bounded
/// by `connect_timeout`.
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

/// Runs the request/response exchange with one parent over an open connection: the thin
/// driver of the connection's [`ParentMachine`] (writes what it asks to send, sleeps through
/// shaping and backoffs, reads each answer under its deadline and silence bound, streams
/// piece bodies into storage and tells it how they went).
async fn parent_io<S: FetchStream>(
    s: &Rc<Session>,
    p: &Parent,
    pc: &mut ParentConn,
    swarm: &SessionSwarm<'_>,
    mut stream: S,
) -> Result<(), ParentError> {
    let mut reader = FrameReader::new();
    let mut piece_buf = RawChunk::default();
    let task = s.task();
    let m = &mut pc.machine;
    let mut frames = Vec::new();
    loop {
        if let Some(e) = pc.failed.borrow_mut().take() {
            return Err(e);
        }
        if s.is_done() || s.check_complete().await {
            return Ok(());
        }
        frames.clear();
        loop {
            match m.poll_transmit(Instant::now(), swarm, &mut frames) {
                Transmit::Shaped(wait) => {
                    Counters::add(&s.counters.shaping_waits, 1);
                    if !frames.is_empty() {
                        let (res, _) = stream.write_all(encode_frames(&frames)).await;
                        res.map_err(ParentError::Write)?;
                        frames.clear();
                    }
                    monoio::time::sleep(s.shaping.clock().pass(wait)).await;
                }
                Transmit::Ready { requests } => {
                    if let Some(r) = requests {
                        Counters::max(&s.counters.max_requests_in_flight, r as u64);
                    }
                    break;
                }
            }
        }
        if !frames.is_empty() {
            let (res, _) = stream.write_all(encode_frames(&frames)).await;
            res.map_err(ParentError::Write)?;
        }
        if m.is_drained() {
            // This parent has everything and all we miss is in flight elsewhere: wait for a
            // change (a piece released by another parent, or the end).
            let l = s.changed.listen();
            let _ = monoio::time::timeout(Duration::from_millis(200), l).await;
            continue;
        }
        // Silence with a request outstanding drops the parent (the bound holds through the
        // piece's body too: `receive_piece` reads with this reader).
        reader.set_idle_timeout(m.idle_bound());
        let deadline = m.poll_timeout();
        let read = reader.read_frame(&mut stream);
        let frame = match deadline {
            Some(at) => {
                match monoio::time::timeout(at.saturating_duration_since(Instant::now()), read)
                    .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(m
                            .handle_timeout(at)
                            .unwrap_or(ParentError::Timeout(s.cfg.piece_timeout)))
                    }
                }
            }
            None => read.await,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => return Err(ParentError::Closed),
            Err(e) => return Err(e.into()),
        };
        let (n, len, crc) = match m.handle_frame(frame, Instant::now(), swarm)? {
            Action::Continue => continue,
            Action::Backoff(until) => {
                monoio::time::sleep(until.saturating_duration_since(Instant::now())).await;
                m.handle_timeout(until);
                continue;
            }
            Action::Receive { n, len, crc } => (n, len, crc),
        };
        let (res, buf) = s
            .receive_piece(
                &mut reader,
                &mut stream,
                n,
                len,
                crc,
                std::mem::take(&mut piece_buf),
            )
            .await;
        piece_buf = buf;
        let landed = match res {
            Ok(l) => l,
            Err(Received::Conn(e)) => {
                m.piece_failed(swarm);
                return Err(e.into());
            }
            Err(Received::Stalled(d)) => {
                m.piece_failed(swarm);
                return Err(ParentError::Timeout(d));
            }
            Err(Received::Store(e)) => {
                m.piece_handed_off();
                s.settled(Err(e), n, len, crc, p, Duration::ZERO).await?;
                continue;
            }
        };
        let timing = m.piece_landed(len, Instant::now()).unwrap_or(PieceTiming {
            total: Duration::ZERO,
            service: Duration::ZERO,
        });
        let took = timing.service;
        tracing::trace!(
            task = %task,
            piece = n,
            parent = %p.host_id,
            ms = timing.total.as_millis() as u64,
            service_ms = took.as_millis() as u64,
            window = m.window(),
            "piece fetched"
        );
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
}
