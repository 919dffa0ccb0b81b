//! An async connection speaking the data-plane frames of `wire::frame` over TCP.
//!
//! Used as a client by the data-plane tests (requests, raw garbage, reading piece bytes) and as
//! a server by [`crate::fake_parent`]. Reads are buffered; [`FrameConn::recv`] decodes one
//! frame at a time, and after a [`Frame::Piece`] header the caller reads the raw piece bytes
//! with [`FrameConn::read_raw`].

use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::frame::{self, Frame};

/// Longest time [`FrameConn::recv_timeout`] callers in the tests usually wait for an answer.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection with a read buffer, speaking data-plane frames.
pub struct FrameConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl FrameConn {
    /// Connects to a data plane at `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the data plane at {addr}"))?;
        stream.set_nodelay(true).ok();
        Ok(Self::from_stream(stream))
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(64 << 10),
        }
    }

    /// Encodes and writes one frame.
    pub async fn send(&mut self, f: &Frame) -> Result<()> {
        let mut out = BytesMut::new();
        frame::encode(f, &mut out);
        self.send_raw(&out).await
    }

    /// Writes raw bytes (garbage, hand-made headers, piece bodies).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("writing to the data-plane connection")?;
        Ok(())
    }

    /// Reads until one frame is decoded.
    ///
    /// Returns `Ok(None)` when the peer closed the connection (or reset it) before a complete
    /// frame arrived, `Err` when the bytes received are not a valid frame or on other I/O
    /// errors.
    pub async fn recv(&mut self) -> Result<Option<Frame>> {
        loop {
            match frame::decode(&self.buf) {
                Ok(Some((f, used))) => {
                    self.buf.advance(used);
                    return Ok(Some(f));
                }
                Ok(None) => {}
                Err(e) => bail!("peer sent an invalid frame: {e}"),
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 << 10);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) if is_closed(&e) => return Ok(None),
                Err(e) => return Err(e).context("reading from the data-plane connection"),
            }
        }
    }

    /// [`FrameConn::recv`] bounded by `timeout`; a timeout is an error.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Frame>> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .with_context(|| format!("no frame and no close within {timeout:?}"))?
    }

    /// Reads exactly `len` raw bytes (the body following a piece header), taking buffered
    /// bytes first.
    pub async fn read_raw(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        let from_buf = len.min(self.buf.len());
        out.extend_from_slice(&self.buf[..from_buf]);
        self.buf.advance(from_buf);
        let start = out.len();
        out.resize(len, 0);
        self.stream
            .read_exact(&mut out[start..])
            .await
            .context("reading piece bytes")?;
        Ok(out)
    }

    /// Waits until the peer closes the connection, discarding anything it sends, bounded by
    /// `timeout`. Returns whether it closed in time.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let wait = async {
            let mut scratch = [0u8; 4096];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Shuts down the write half, telling the peer no more requests come.
    pub async fn shutdown(&mut self) -> Result<()> {
        self.stream
            .shutdown()
            .await
            .context("shutting down the data-plane connection")
    }
}

/// A task's layout as the data plane at `addr` (which holds the task) answers a bitmap
/// request: content length, piece length and piece count.
pub async fn task_layout(addr: SocketAddr, task: wire::TaskId) -> Result<(u64, u32, u32)> {
    let mut c = FrameConn::connect(addr).await?;
    c.send(&Frame::BitmapRequest {
        task,
        known: 0,
        wait_ms: 0,
    })
    .await?;
    match c.recv_timeout(DEFAULT_REPLY_TIMEOUT).await? {
        Some(Frame::Bitmap {
            content_length,
            piece_length,
            piece_count,
            ..
        }) => Ok((content_length, piece_length, piece_count)),
        other => bail!("{addr} should answer a BitmapRequest for a task it holds, got {other:?}"),
    }
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}
