//! The sans-IO core of one parent connection: what to ask the parent for, what its answers
//! mean, and when to give up on it. No socket, no runtime, no clock read: the caller passes
//! `now` in (as `quinn-proto` and our `wire` codec do), and the piece picker and the
//! shaping reservation are reached through the small [`Swarm`] trait.
//!
//! The driver (`parent_io` in `fetch/parent.rs`) calls, in a loop:
//!
//! 1. [`ParentMachine::poll_transmit`] with `now`: frames to send (bitmap requests, long polls,
//!    piece requests within the request window). [`Transmit::Shaped`] asks to send what is
//!    there, wait the shaping delay, and call again; [`Transmit::Ready`] ends the batch.
//! 2. When [`ParentMachine::is_drained`], nothing is outstanding: wait for a change in the
//!    session and start again. Otherwise read one frame header with the silence bound of
//!    [`ParentMachine::idle_bound`] until [`ParentMachine::poll_timeout`]; when that deadline
//!    passes, [`ParentMachine::handle_timeout`] gives the error that drops the parent.
//! 3. [`ParentMachine::handle_frame`] with the header: [`Action::Receive`] asks the driver to
//!    stream the piece's body (`Session::receive_piece`), then report
//!    [`ParentMachine::piece_landed`], [`ParentMachine::piece_handed_off`] or
//!    [`ParentMachine::piece_failed`];
//!    [`Action::Backoff`] asks it to wait until the given instant before step 1.
//! 4. Whenever the connection ends (error, close, completion), [`ParentMachine::give_back`]
//!    returns to the session every piece still owed by this parent and forgets its bitmap.

use super::{ParentError, Session};
use crate::window::RequestWindow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use wire::frame::{ErrorCode, Frame, PieceHeader};
use wire::{PieceLayout, TaskId};

/// How often a parent that does not know the task yet is asked again before it is dropped.
pub(super) const TASK_NOT_FOUND_RETRIES: u32 = 50;
/// Pause between those tries.
pub(super) const TASK_NOT_FOUND_BACKOFF: Duration = Duration::from_millis(100);
/// Pause after a parent answered a piece request with [`ErrorCode::Busy`].
pub(super) const BUSY_BACKOFF: Duration = Duration::from_millis(50);

/// What a connection needs from the download it belongs to: the piece picker with its
/// bookkeeping, and the shaping of the download. [`Session`] is one (through
/// [`SessionSwarm`]); tests may wrap it.
pub(super) trait Swarm {
    /// Rarest piece of `bits` neither stored nor in flight, marked in flight at `now`.
    fn pick(&self, bits: &[bool], now: Instant) -> Option<u32>;
    /// An endgame duplicate of a piece of `bits` outstanding elsewhere (see
    /// [`Session::pick_endgame`]).
    fn pick_endgame(&self, bits: &[bool], now: Instant) -> Option<u32>;
    /// Piece `n` is no longer requested by this connection.
    fn release(&self, n: u32);
    /// A parent has (or no longer has) piece `n`.
    fn learn(&self, n: usize, has: bool);
    /// Reserves `bytes` of download shaping; returns how long to wait before asking for them
    /// (zero: at once).
    fn reserve(&self, bytes: u64) -> Duration;
    /// Most piece requests a connection may keep outstanding now (at least one).
    fn pieces_in_flight(&self) -> usize;
}

/// [`Swarm`] of a real download: the [`Session`]'s picker, and its shaping through the
/// daemon's download limit, the download's own limit and the connection's per-peer limit.
pub(super) struct SessionSwarm<'a> {
    /// The download.
    pub(super) s: &'a Session,
    /// This connection's per-peer download limit.
    pub(super) limiter: &'a crate::shaper::RateLimiter,
}

impl Swarm for SessionSwarm<'_> {
    fn pick(&self, bits: &[bool], now: Instant) -> Option<u32> {
        self.s.pick(bits, now)
    }

    fn pick_endgame(&self, bits: &[bool], now: Instant) -> Option<u32> {
        self.s.pick_endgame(bits, now)
    }

    fn release(&self, n: u32) {
        self.s.release(n);
    }

    fn learn(&self, n: usize, has: bool) {
        self.s.learn(n, has);
    }

    fn reserve(&self, bytes: u64) -> Duration {
        crate::shaper::reserve_all(
            &[
                Some(&self.s.shaping.download),
                Some(&self.s.limiter),
                Some(self.limiter),
            ],
            bytes,
        )
    }

    fn pieces_in_flight(&self) -> usize {
        self.s
            .shaping
            .pieces_in_flight()
            .unwrap_or(self.s.cfg.pieces_in_flight)
            .max(1)
    }
}

/// The limits of one connection, from the fetcher's configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct MachineConfig {
    /// Bytes of piece requests kept outstanding at most (one piece always fits).
    pub(super) bytes_in_flight: u64,
    /// Delivery time the request window covers ([`RequestWindow`]).
    pub(super) request_queue_time: Duration,
    /// Time allowed for one response.
    pub(super) piece_timeout: Duration,
    /// Longest silence with a request outstanding (zero: off).
    pub(super) idle_timeout: Duration,
    /// Long-poll time of a bitmap request when the parent has nothing new.
    pub(super) bitmap_wait: Duration,
}

impl MachineConfig {
    /// The limits `cfg` sets.
    pub(super) fn from_fetch(cfg: &super::FetchConfig) -> Self {
        Self {
            bytes_in_flight: cfg.bytes_in_flight.max(1),
            request_queue_time: cfg.request_queue_time,
            piece_timeout: cfg.piece_timeout,
            idle_timeout: cfg.parent_idle_timeout,
            bitmap_wait: cfg.bitmap_wait,
        }
    }
}

/// A request outstanding at the parent (answers come back in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Piece `n`, requested at that instant.
    Piece(u32, Instant),
    /// A bitmap request (maybe a long poll).
    Bitmap,
}

/// What [`ParentMachine::poll_transmit`] asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transmit {
    /// Send the frames so far, wait this long (download shaping), and call again.
    Shaped(Duration),
    /// Send the frames; the batch is complete. `requests`: piece requests now outstanding
    /// (`None` before the parent's bitmap is known).
    Ready {
        /// Piece requests outstanding after this batch.
        requests: Option<usize>,
    },
}

/// What [`ParentMachine::handle_frame`] asks of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Nothing: go on (send what [`ParentMachine::poll_transmit`] gives, read the next frame).
    Continue,
    /// The header of piece `n` arrived: stream its `len` raw bytes (announced crc32c `crc`)
    /// from the connection, then report [`ParentMachine::piece_landed`],
    /// [`ParentMachine::piece_handed_off`] or [`ParentMachine::piece_failed`].
    Receive {
        /// Piece number.
        n: u32,
        /// Bytes that follow the header.
        len: u64,
        /// Announced crc32c of those bytes.
        crc: u32,
    },
    /// Wait until this instant before asking the parent for anything.
    Backoff(Instant),
}

/// A piece whose bytes all arrived ([`ParentMachine::piece_landed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PieceTiming {
    /// From its request to its arrival.
    pub(super) total: Duration,
    /// The time the parent spent on it ([`RequestWindow::on_piece`]).
    pub(super) service: Duration,
}

/// The state of one connection to one parent (see the module documentation for the call
/// order): the parent's bitmap, the requests outstanding, the request window, the retry
/// counters and the deadlines.
#[derive(Debug)]
pub(super) struct ParentMachine {
    task: TaskId,
    layout: PieceLayout,
    cfg: MachineConfig,
    /// The pieces the parent has, as far as we know.
    bits: Vec<bool>,
    /// How many of `bits` are set.
    count: u32,
    have_bitmap: bool,
    pending: VecDeque<Pending>,
    /// A piece picked and reserved whose request waits for the shaping delay.
    held: Option<u32>,
    /// The piece whose body is being streamed (its header arrived).
    receiving: Option<(u32, Instant)>,
    win: RequestWindow,
    /// `TaskNotFound` answers so far.
    not_found: u32,
    /// No request before this instant.
    backoff_until: Option<Instant>,
    /// The answer to the oldest request is due by then (`piece_timeout` after the last batch).
    response_due: Option<Instant>,
}

impl ParentMachine {
    /// A new connection to a parent of task `task` with `layout`: nothing known, nothing asked.
    pub(super) fn new(task: TaskId, layout: PieceLayout, cfg: MachineConfig) -> Self {
        Self {
            task,
            layout,
            cfg,
            bits: vec![false; layout.piece_count() as usize],
            count: 0,
            have_bitmap: false,
            pending: VecDeque::new(),
            held: None,
            receiving: None,
            win: RequestWindow::new(usize::MAX, cfg.bytes_in_flight, cfg.request_queue_time),
            not_found: 0,
            backoff_until: None,
            response_due: None,
        }
    }

    /// The pieces the parent has, as far as we know.
    #[cfg(test)]
    pub(super) fn bits(&self) -> &[bool] {
        &self.bits
    }

    /// Piece requests the window allows now ([`RequestWindow::limit`]).
    pub(super) fn window(&self) -> usize {
        self.win.limit(self.layout.piece_length())
    }

    /// Appends to `out` the frames to send at `now`: the first bitmap request; then, once
    /// the bitmap is known, piece requests (rarest first through `swarm`, an endgame
    /// duplicate when the connection has nothing else outstanding) until the window is full
    /// at its piece limit or at `bytes_in_flight`, and a bitmap request when there is room
    /// left (a long poll of `bitmap_wait` when nothing else is outstanding). No piece request
    /// queues behind a long poll on the same connection. Nothing during a backoff.
    pub(super) fn poll_transmit(
        &mut self,
        now: Instant,
        swarm: &impl Swarm,
        out: &mut Vec<Frame>,
    ) -> Transmit {
        let task = self.task;
        if let Some(n) = self.held.take() {
            out.push(Frame::PieceRequest { task, number: n });
            self.pending.push_back(Pending::Piece(n, now));
        }
        self.response_due = Some(now + self.cfg.piece_timeout);
        if self.backoff_until.is_some_and(|t| now < t) {
            return Transmit::Ready { requests: None };
        }
        self.backoff_until = None;
        let bitmap_pending = self.pending.iter().any(|x| matches!(x, Pending::Bitmap));
        if !self.have_bitmap {
            if !bitmap_pending {
                out.push(Frame::BitmapRequest {
                    task,
                    known: 0,
                    wait_ms: 0,
                });
                self.pending.push_back(Pending::Bitmap);
            }
            return Transmit::Ready { requests: None };
        }
        let layout = self.layout;
        let max_bytes = self.cfg.bytes_in_flight;
        let window = self.window().min(swarm.pieces_in_flight().max(1));
        let (mut pieces, mut bytes) = (0usize, 0u64);
        for x in &self.pending {
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
        while !full(pieces, bytes) && !bitmap_pending {
            let picked = swarm.pick(&self.bits, now).or_else(|| {
                (pieces == 0)
                    .then(|| swarm.pick_endgame(&self.bits, now))
                    .flatten()
            });
            let Some(n) = picked else { break };
            let size = layout.piece_size(n).unwrap_or(0);
            let wait = swarm.reserve(size);
            if !wait.is_zero() {
                self.held = Some(n);
                return Transmit::Shaped(wait);
            }
            out.push(Frame::PieceRequest { task, number: n });
            self.pending.push_back(Pending::Piece(n, now));
            pieces += 1;
            bytes += size;
        }
        let parent_complete = self.count == layout.piece_count();
        if !full(pieces, bytes) && !bitmap_pending && !parent_complete {
            let wait_ms = if self.pending.is_empty() {
                u32::try_from(self.cfg.bitmap_wait.as_millis()).unwrap_or(u32::MAX)
            } else {
                0
            };
            out.push(Frame::BitmapRequest {
                task,
                known: self.count,
                wait_ms,
            });
            self.pending.push_back(Pending::Bitmap);
        }
        Transmit::Ready {
            requests: Some(pieces),
        }
    }

    /// Whether nothing is outstanding at the parent: it has nothing we may ask for now (all
    /// we miss is in flight elsewhere), so the driver waits for a change in the session.
    pub(super) fn is_drained(&self) -> bool {
        self.pending.is_empty() && self.held.is_none() && self.receiving.is_none()
    }

    /// Longest silence allowed while waiting for the next answer: `parent_idle_timeout`
    /// with a request outstanding, plus `bitmap_wait` when a long poll alone is on the
    /// connection (it may be silent that long by design). `None`: no bound (zero idle
    /// timeout). The bound holds through a piece's body too.
    pub(super) fn idle_bound(&self) -> Option<Duration> {
        let idle = self.cfg.idle_timeout;
        if idle.is_zero() {
            return None;
        }
        let only_poll =
            self.pending.len() == 1 && matches!(self.pending.front(), Some(Pending::Bitmap));
        Some(if only_poll {
            idle + self.cfg.bitmap_wait
        } else {
            idle
        })
    }

    /// The next instant something is due: the end of a backoff, or else, with a request
    /// outstanding, the last instant its answer may arrive (`piece_timeout` after the last
    /// [`ParentMachine::poll_transmit`]).
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        if let Some(t) = self.backoff_until {
            return Some(t);
        }
        if self.pending.is_empty() {
            return None;
        }
        self.response_due
    }

    /// The deadline of [`ParentMachine::poll_timeout`] passed at `now`: the error that drops
    /// the parent, if it was the answer's deadline (`None`: nothing is overdue, e.g. a
    /// backoff ended).
    pub(super) fn handle_timeout(&mut self, now: Instant) -> Option<ParentError> {
        if self.backoff_until.is_some_and(|t| now >= t) {
            self.backoff_until = None;
            return None;
        }
        let due = self.response_due.filter(|_| !self.pending.is_empty())?;
        (now >= due).then_some(ParentError::Timeout(self.cfg.piece_timeout))
    }

    /// A frame header arrived at `now`: matched against the oldest outstanding request.
    /// A bitmap is learnt (into `swarm`'s availability too); a piece header asks the driver
    /// to receive the body; a refusal releases the piece and unlearns it (not available),
    /// backs off (busy, task not found yet), or drops the parent. Anything that does not
    /// answer the request drops the parent with [`ParentError::Protocol`].
    pub(super) fn handle_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        swarm: &impl Swarm,
    ) -> Result<Action, ParentError> {
        let Some(front) = self.pending.pop_front() else {
            return Err(ParentError::Protocol("response without a request".into()));
        };
        let layout = self.layout;
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
                if t != self.task
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
                self.have_bitmap = true;
                for n in 0..piece_count {
                    if wire::frame::bitmap_get(&bits, n) && !self.bits[n as usize] {
                        self.bits[n as usize] = true;
                        self.count += 1;
                        swarm.learn(n as usize, true);
                    }
                }
                Ok(Action::Continue)
            }
            (
                Pending::Bitmap,
                Frame::Error {
                    code: ErrorCode::TaskNotFound,
                    message,
                },
            ) => {
                // The parent may not have opened the task yet (it registered a moment ago).
                self.not_found += 1;
                if self.not_found > TASK_NOT_FOUND_RETRIES {
                    return Err(ParentError::Refused(ErrorCode::TaskNotFound, message));
                }
                Ok(self.back_off(now + TASK_NOT_FOUND_BACKOFF))
            }
            (Pending::Piece(n, started), Frame::Piece(h)) => {
                let Some(range) = layout.piece_range(n) else {
                    swarm.release(n);
                    return Err(ParentError::Protocol(format!("piece {n} out of range")));
                };
                let len = range.end - range.start;
                let PieceHeader {
                    task,
                    number,
                    offset,
                    length,
                    crc32c,
                } = h;
                if task != self.task
                    || number != n
                    || offset != range.start
                    || u64::from(length) != len
                {
                    swarm.release(n);
                    return Err(ParentError::Protocol(format!(
                        "piece header {number}/{offset}/{length} does not answer request for piece {n} ({}+{len})",
                        range.start
                    )));
                }
                self.receiving = Some((n, started));
                Ok(Action::Receive {
                    n,
                    len,
                    crc: crc32c,
                })
            }
            (Pending::Piece(n, _), Frame::Error { code, message }) => {
                swarm.release(n);
                match code {
                    ErrorCode::PieceNotAvailable => {
                        if self.bits.get(n as usize).copied().unwrap_or(false) {
                            self.bits[n as usize] = false;
                            self.count -= 1;
                            swarm.learn(n as usize, false);
                        }
                        Ok(Action::Continue)
                    }
                    ErrorCode::Busy => Ok(self.back_off(now + BUSY_BACKOFF)),
                    other => Err(ParentError::Refused(other, message)),
                }
            }
            (_, Frame::Error { code, message }) => Err(ParentError::Refused(code, message)),
            (Pending::Piece(n, _), _) => {
                swarm.release(n);
                Err(ParentError::Protocol(format!(
                    "unexpected frame in answer to piece {n}"
                )))
            }
            (Pending::Bitmap, _) => Err(ParentError::Protocol(
                "unexpected frame in answer to a bitmap request".into(),
            )),
        }
    }

    fn back_off(&mut self, until: Instant) -> Action {
        self.backoff_until = Some(until);
        Action::Backoff(until)
    }

    /// The body of the piece being received all arrived at `now`: it is handed to the
    /// settling (which releases or commits it), and the request window takes the sample.
    /// `None` when no piece was being received.
    pub(super) fn piece_landed(&mut self, len: u64, now: Instant) -> Option<PieceTiming> {
        let (_, started) = self.receiving.take()?;
        let more = self.pending.iter().any(|x| matches!(x, Pending::Piece(..)));
        let service = self.win.on_piece(len, started, now, more);
        Some(PieceTiming {
            total: now.saturating_duration_since(started),
            service,
        })
    }

    /// The piece being received was handed to the settling without landing (it could not be
    /// stored): the settling releases it, so [`ParentMachine::give_back`] does not.
    pub(super) fn piece_handed_off(&mut self) {
        self.receiving = None;
    }

    /// The body of the piece being received did not arrive (the connection failed or
    /// stalled mid-piece): the piece is released at once, before the connection is torn
    /// down, so another parent may pick it while this one's settling pieces finish.
    pub(super) fn piece_failed(&mut self, swarm: &impl Swarm) {
        if let Some((n, _)) = self.receiving.take() {
            swarm.release(n);
        }
    }

    /// When the parent goes (whatever the reason, mid-piece included): gives back to
    /// `swarm` every piece still requested from it (the one being received, those
    /// outstanding, one reserved but not asked yet), so other parents may pick them, and
    /// forgets its bitmap in the availability counts.
    pub(super) fn give_back(&mut self, swarm: &impl Swarm) {
        if let Some((n, _)) = self.receiving.take() {
            swarm.release(n);
        }
        if let Some(n) = self.held.take() {
            swarm.release(n);
        }
        for pend in self.pending.drain(..) {
            if let Pending::Piece(n, _) = pend {
                swarm.release(n);
            }
        }
        for (n, has) in self.bits.iter_mut().enumerate() {
            if std::mem::take(has) {
                swarm.learn(n, false);
            }
        }
        self.count = 0;
        self.have_bitmap = false;
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
