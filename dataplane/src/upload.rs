//! Upload server: answers other peers' requests on one connection, in order.
//!
//! Requests on a connection are answered one after another (clients pipeline them), so a
//! response needs no request id. A malformed frame gets one [`ErrorCode::Malformed`] frame and
//! the connection is closed; a request for an unknown task or a missing piece gets an error
//! frame and the connection stays open.

use crate::conn::{ConnError, FrameReader};
use crate::counters::Counters;
use crate::storage::{Storage, TaskStore};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use std::sync::Arc;
use std::time::Duration;
use wire::frame::{self, ErrorCode, Frame, PieceHeader};
use wire::TaskId;

/// Longest long poll a client may ask for with a bitmap request.
pub const MAX_BITMAP_WAIT: Duration = Duration::from_secs(5);

/// What an upload connection needs from its thread.
#[derive(Clone, Debug)]
pub struct UploadContext {
    /// All stored tasks.
    pub storage: Arc<Storage>,
    /// Counters to update.
    pub counters: Arc<Counters>,
}

fn error_frame(code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::Error {
        code,
        message: message.into(),
    }
}

async fn write_frame<S: AsyncWriteRent>(s: &mut S, f: &Frame) -> std::io::Result<()> {
    let mut b = bytes::BytesMut::new();
    frame::encode(f, &mut b);
    let (res, _) = s.write_all(b.to_vec()).await;
    res.map(drop)
}

/// Serves one connection until the peer closes it or sends garbage.
pub async fn serve_connection<S: AsyncReadRent + AsyncWriteRent>(
    mut stream: S,
    ctx: UploadContext,
) {
    let mut reader = FrameReader::new();
    let mut scratch: Vec<u8> = Vec::new();
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
                serve_piece(&mut stream, &ctx, task, number, &mut scratch).await
            }
            Frame::BitmapRequest {
                task,
                known,
                wait_ms,
            } => serve_bitmap(&mut stream, &ctx, task, known, wait_ms).await,
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

async fn serve_piece<S: AsyncWriteRent>(
    stream: &mut S,
    ctx: &UploadContext,
    task: TaskId,
    number: u32,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    let store = match lookup(ctx, &task) {
        Ok(s) => s,
        Err(f) => return write_frame(stream, &f).await,
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
    // Header and piece in one buffer, one write.
    let header = Frame::Piece(PieceHeader {
        task,
        number,
        offset: range.start,
        // Bounded by MAX_PIECE_LENGTH through PieceLayout.
        length: length as u32,
        crc32c: crc,
    });
    let mut b = bytes::BytesMut::new();
    frame::encode(&header, &mut b);
    let mut buf = std::mem::take(scratch);
    buf.clear();
    buf.extend_from_slice(&b);
    if let Err(e) = store.read_piece_after(number, &mut buf) {
        tracing::warn!("reading piece {number} of {task} for upload: {e}");
        *scratch = buf;
        let f = error_frame(ErrorCode::Internal, format!("reading piece {number}: {e}"));
        return write_frame(stream, &f).await;
    }
    let (res, buf) = stream.write_all(buf).await;
    *scratch = buf;
    res?;
    Counters::add(&ctx.counters.bytes_uploaded, length);
    Counters::add(&ctx.counters.pieces_uploaded, 1);
    Ok(())
}

async fn serve_bitmap<S: AsyncWriteRent>(
    stream: &mut S,
    ctx: &UploadContext,
    task: TaskId,
    known: u32,
    wait_ms: u32,
) -> std::io::Result<()> {
    let store = match lookup(ctx, &task) {
        Ok(s) => s,
        Err(f) => return write_frame(stream, &f).await,
    };
    let wait = Duration::from_millis(u64::from(wait_ms)).min(MAX_BITMAP_WAIT);
    let deadline = std::time::Instant::now() + wait;
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
    let layout = store.layout();
    let f = Frame::Bitmap {
        task,
        content_length: layout.content_length(),
        // Bounded by MAX_PIECE_LENGTH through PieceLayout.
        piece_length: layout.piece_length() as u32,
        piece_count: layout.piece_count(),
        bits: store.bitmap_bytes(),
    };
    write_frame(stream, &f).await
}
