//! Upload server: answers other peers' requests on one connection, in order.
//!
//! Requests on a connection are answered one after another (clients pipeline them), so a
//! response needs no request id. A malformed frame gets one [`ErrorCode::Malformed`] frame and
//! the connection is closed; a request for an unknown task or a missing piece gets an error
//! frame and the connection stays open.

use crate::conn::{ConnError, FrameReader};
use crate::counters::Counters;
use crate::seeding::{Admit, ChildId, SeedPlan, Seeding};
use crate::shaper::{self, RateLimiter, Shaping};
use crate::storage::{Storage, TaskStore};
use crate::sys;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use wire::frame::{self, ErrorCode, Frame, PieceHeader};
use wire::TaskId;

/// Longest long poll a client may ask for with a bitmap request.
pub const MAX_BITMAP_WAIT: Duration = Duration::from_secs(5);

/// Bytes of a piece paid for at once under an upload rate limit (see `serve_piece`).
const PAY_STEP: u64 = 128 << 10;

/// Largest single `sendfile` call (the loop continues until the piece is sent).
const SENDFILE_CHUNK: usize = 4 << 20;

/// A transport an upload connection runs on: frames both ways, plus a way to send a byte
/// range of a task file, zero-copy where the transport allows it.
pub trait UploadStream: AsyncReadRent + AsyncWriteRent {
    /// Sends `len` bytes of `file` starting at `offset`.
    fn send_file_range(
        &mut self,
        file: &File,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>>;
}

impl UploadStream for monoio::net::TcpStream {
    /// `sendfile(2)` from the page cache to the socket: no piece byte passes through user
    /// space. The socket is non-blocking only during the loop; a full socket buffer waits for
    /// writability on the runtime instead of blocking the thread.
    async fn send_file_range(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.as_raw_fd();
        let _nb = sys::NonBlocking::set(fd)?;
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let want = usize::try_from(end - off)
                .unwrap_or(usize::MAX)
                .min(SENDFILE_CHUNK);
            match sys::sendfile(fd, file, off, want) {
                Ok(0) => return Err(sys::short_task_file()),
                Ok(n) => off += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable(false).await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes of a task file at `off` for a transport that cannot send from
/// the file directly (TLS); a file shorter than the piece is a precise error.
pub(crate) fn read_piece_chunk(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            sys::short_task_file()
        } else {
            e
        }
    })
}

/// What an upload connection needs from its thread.
#[derive(Clone, Debug)]
pub struct UploadContext {
    /// All stored tasks.
    pub storage: Arc<Storage>,
    /// Counters to update.
    pub counters: Arc<Counters>,
    /// Rate limits.
    pub shaping: Arc<Shaping>,
    /// Super-seeding plans when this data plane super-seeds (a seed peer): each child is
    /// shown only pieces nobody got yet ([`crate::seeding`]); `None`: every child sees every
    /// stored piece.
    pub seeding: Option<Arc<Seeding>>,
}

/// The super-seeding plans one connection takes part in (one per task it asked about),
/// left when the connection ends.
struct Memberships<'a> {
    seeding: Option<&'a Seeding>,
    joined: Vec<(TaskId, Arc<SeedPlan>, ChildId)>,
}

impl Memberships<'_> {
    /// This connection's plan of `store`'s task, joined on first use; `None` when the data
    /// plane does not super-seed.
    fn of(&mut self, store: &TaskStore) -> Option<(Arc<SeedPlan>, ChildId)> {
        let seeding = self.seeding?;
        let task = store.id();
        let count = store.layout().piece_count();
        if let Some((_, plan, child)) = self.joined.iter().find(|(t, _, _)| *t == task) {
            if plan.with(|s| s.piece_count()) == count {
                return Some((plan.clone(), *child));
            }
        }
        let (plan, child) = seeding.join(task, count, store.finished_count());
        self.joined.retain(|(t, _, _)| *t != task);
        self.joined.push((task, plan.clone(), child));
        Some((plan, child))
    }
}

impl Drop for Memberships<'_> {
    fn drop(&mut self) {
        if let Some(seeding) = self.seeding {
            for (task, plan, child) in self.joined.drain(..) {
                seeding.leave(&task, &plan, child);
            }
        }
    }
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::Error {
        code,
        message: message.into(),
    }
}

async fn write_frame<S: AsyncWriteRent>(s: &mut S, f: &Frame) -> io::Result<()> {
    let mut b = bytes::BytesMut::new();
    frame::encode(f, &mut b);
    let (res, _) = s.write_all(b.to_vec()).await;
    res.map(drop)
}

/// Serves one connection until the peer closes it or sends garbage.
pub async fn serve_connection<S: UploadStream>(mut stream: S, ctx: UploadContext) {
    let mut reader = FrameReader::new();
    let limiter = ctx.shaping.limiter(ctx.shaping.config().per_peer_upload);
    let mut plans = Memberships {
        seeding: ctx.seeding.as_deref(),
        joined: Vec::new(),
    };
    loop {
        let frame = match reader.read_frame(&mut stream).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(ConnError::Decode(e)) => {
                Counters::add(&ctx.counters.malformed_frames, 1);
                tracing::debug!("closing upload connection: {e}");
                let _ = write_frame(
                    &mut stream,
                    &error_frame(ErrorCode::Malformed, e.to_string()),
                )
                .await;
                return;
            }
            Err(e) => {
                tracing::debug!("upload connection ended: {e}");
                return;
            }
        };
        let res = match frame {
            Frame::PieceRequest { task, number } => {
                serve_piece(&mut stream, &ctx, &mut plans, &limiter, task, number).await
            }
            Frame::BitmapRequest {
                task,
                known,
                wait_ms,
            } => serve_bitmap(&mut stream, &ctx, &mut plans, task, known, wait_ms).await,
            other => {
                Counters::add(&ctx.counters.malformed_frames, 1);
                let msg = format!("unexpected frame from a client: {}", frame_name(&other));
                let _ = write_frame(&mut stream, &error_frame(ErrorCode::Malformed, msg)).await;
                return;
            }
        };
        if let Err(e) = res {
            tracing::debug!("upload connection write failed: {e}");
            return;
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::PieceRequest { .. } => "piece request",
        Frame::Piece(_) => "piece",
        Frame::Error { .. } => "error",
        Frame::BitmapRequest { .. } => "bitmap request",
        Frame::Bitmap { .. } => "bitmap",
    }
}

fn lookup(ctx: &UploadContext, task: &TaskId) -> Result<Arc<TaskStore>, Frame> {
    ctx.storage
        .get(task)
        .ok_or_else(|| error_frame(ErrorCode::TaskNotFound, format!("task {task} is not here")))
}

async fn serve_piece<S: UploadStream>(
    stream: &mut S,
    ctx: &UploadContext,
    plans: &mut Memberships<'_>,
    limiter: &RateLimiter,
    task: TaskId,
    number: u32,
) -> io::Result<()> {
    let store = match lookup(ctx, &task) {
        Ok(s) => s,
        Err(f) => return write_frame(stream, &f).await,
    };
    // Garbage collection leaves the task alone while a piece of it is being sent; one it
    // evicted is gone.
    let Some(_busy) = store.busy() else {
        let f = error_frame(ErrorCode::TaskNotFound, format!("task {task} was evicted"));
        return write_frame(stream, &f).await;
    };
    let layout = store.layout();
    let Some(range) = layout.piece_range(number) else {
        let f = error_frame(
            ErrorCode::PieceOutOfRange,
            format!(
                "piece {number} is past the last piece ({} pieces)",
                layout.piece_count()
            ),
        );
        return write_frame(stream, &f).await;
    };
    let Some(crc) = store.piece_crc(number) else {
        let f = error_frame(
            ErrorCode::PieceNotAvailable,
            format!("piece {number} is not here yet"),
        );
        return write_frame(stream, &f).await;
    };
    let length = range.end - range.start;
    let header = Frame::Piece(PieceHeader {
        task,
        number,
        offset: range.start,
        // Bounded by MAX_PIECE_LENGTH through PieceLayout.
        length: length as u32,
        crc32c: crc,
    });
    let plan = plans.of(&store).map(|(plan, child)| {
        let admit = plan.with(|s| s.sending(child, number));
        (plan, child, admit)
    });
    match plan.as_ref().map(|p| p.2) {
        Some(Admit::Busy) => {
            let f = error_frame(
                ErrorCode::Busy,
                format!("piece {number}: later copies are on the wire; ask another parent"),
            );
            return write_frame(stream, &f).await;
        }
        Some(Admit::First) => Counters::add(&ctx.counters.first_copies_uploaded, 1),
        Some(Admit::Copy) | None => {}
    }
    // Under an upload limit the piece is paid for in steps of PAY_STEP, each sent once paid:
    // a child then sees bytes every PAY_STEP / rate (times the connections sharing the
    // limit) whatever the piece length, so its `parent_idle_timeout` never mistakes a
    // limited parent for a stopped one (paying for a whole 4 MiB piece first kept the
    // connection silent for seconds). Unlimited: one send of the whole piece.
    let limited = ctx.shaping.upload.rate() > 0 || limiter.rate() > 0;
    let step = if limited { PAY_STEP } else { length.max(1) };
    let pay = |n: u64| async move {
        let wait = shaper::reserve_all(&[Some(&ctx.shaping.upload), Some(limiter)], n);
        if !wait.is_zero() {
            Counters::add(&ctx.counters.shaping_waits, 1);
            monoio::time::sleep(ctx.shaping.clock().pass(wait)).await;
        }
    };
    pay(length.min(step)).await;
    // Once the header is out, the piece must follow in full: an error after this point can
    // only close the connection.
    let mut res = write_frame(stream, &header).await;
    let mut sent = 0;
    while res.is_ok() && sent < length {
        let n = (length - sent).min(step);
        if sent > 0 {
            pay(n).await;
        }
        res = stream
            .send_file_range(store.file(), range.start + sent, n)
            .await;
        sent += n;
    }
    if let Some((plan, child, admit)) = &plan {
        plan.with(|s| s.sent(*child, number, *admit, res.is_ok()));
        plan.notify();
    }
    res?;
    Counters::add(&ctx.counters.bytes_uploaded, length);
    Counters::add(&ctx.counters.pieces_uploaded, 1);
    Ok(())
}

async fn serve_bitmap<S: AsyncWriteRent>(
    stream: &mut S,
    ctx: &UploadContext,
    plans: &mut Memberships<'_>,
    task: TaskId,
    known: u32,
    wait_ms: u32,
) -> io::Result<()> {
    let store = match lookup(ctx, &task) {
        Ok(s) => s,
        Err(f) => return write_frame(stream, &f).await,
    };
    let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_BITMAP_WAIT);
    let deadline = std::time::Instant::now() + wait;
    let layout = store.layout();
    if let Some((plan, child)) = plans.of(&store) {
        // Super-seeding: the child sees the pieces assigned to it (or, once every piece went
        // out, everything); the poll ends when that grows.
        loop {
            let (on_store, on_plan) = (store.listen(), plan.listen());
            let now = std::time::Instant::now();
            let shown = plan.with(|s| s.reveal(child, now, store.is_complete(), |n| store.has(n)));
            if shown > known || now >= deadline {
                break;
            }
            let either = futures::future::select(Box::pin(on_store), Box::pin(on_plan));
            let _ = monoio::time::timeout(deadline - now, either).await;
        }
        let bits = plan.with(|s| s.bitmap(child));
        return write_frame(stream, &bitmap_frame(task, layout, bits)).await;
    }
    loop {
        if store.finished_count() > known || store.is_complete() {
            break;
        }
        let listener = store.listen();
        // Re-check after registering, so a piece stored in between is not missed.
        if store.finished_count() > known {
            break;
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            break;
        }
        let _ = monoio::time::timeout(deadline - now, listener).await;
    }
    write_frame(stream, &bitmap_frame(task, layout, store.bitmap_bytes())).await
}

fn bitmap_frame(task: TaskId, layout: wire::PieceLayout, bits: Vec<u8>) -> Frame {
    Frame::Bitmap {
        task,
        content_length: layout.content_length(),
        // Bounded by MAX_PIECE_LENGTH through PieceLayout.
        piece_length: layout.piece_length() as u32,
        piece_count: layout.piece_count(),
        bits,
    }
}
