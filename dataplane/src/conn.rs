//! Reading frames and raw piece bytes from a monoio stream with owned buffers.

use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use std::future::Future;
use std::io;
use std::time::Duration;
use wire::frame::{self, DecodeError, Frame, HEADER_LEN, MAX_BITMAP_PAYLOAD};

/// Initial read buffer size; it grows only up to the largest frame the codec accepts.
const INITIAL_BUFFER: usize = 16 * 1024;

/// Why reading from a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    /// The peer closed in the middle of a frame.
    #[error("connection closed mid-frame")]
    Truncated,
    /// Not one byte arrived for this long while the reader waited for one
    /// ([`FrameReader::set_idle_timeout`]). The reader must not be used again: the bytes of
    /// the cancelled read are gone.
    #[error("no byte for {0:?} with a request outstanding")]
    Idle(Duration),
}

/// Buffered frame reader. Bytes past a decoded frame stay buffered for the next call, and
/// [`FrameReader::read_raw`] drains them first, so raw piece bytes that arrived with a header
/// are not lost.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    /// Longest wait for the next byte of a read; `None`: no limit.
    idle: Option<Duration>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(INITIAL_BUFFER),
            start: 0,
            idle: None,
        }
    }

    /// Bounds every wait for bytes from here on: a socket read that brings no byte within
    /// `idle` fails with [`ConnError::Idle`] (`None` or zero: no bound). Each read that brings
    /// bytes starts the clock again, so the bound is on silence, not on the length of a
    /// frame or piece. Needs a monoio runtime with its timer.
    pub fn set_idle_timeout(&mut self, idle: Option<Duration>) {
        self.idle = idle.filter(|d| !d.is_zero());
    }

    /// The bound set by [`FrameReader::set_idle_timeout`].
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle
    }

    /// Runs one read of the stream under the idle bound.
    async fn bounded<T>(&self, read: impl Future<Output = T>) -> Result<T, ConnError> {
        match self.idle {
            Some(d) => monoio::time::timeout(d, read)
                .await
                .map_err(|_| ConnError::Idle(d)),
            None => Ok(read.await),
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads more bytes from `s`; returns how many (0 at end of stream).
    async fn fill<S: AsyncReadRent>(&mut self, s: &mut S, want: usize) -> Result<usize, ConnError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let need = self.buf.len() + want.max(1);
        if self.buf.capacity() < need {
            self.buf.reserve(need - self.buf.len());
        }
        let len = self.buf.len();
        let taken = std::mem::take(&mut self.buf);
        let (res, slice) = self.bounded(s.read(taken.slice_mut(len..))).await?;
        self.buf = slice.into_inner();
        Ok(res?)
    }

    /// Reads the next frame. `Ok(None)` at a clean end of stream (between frames).
    pub async fn read_frame<S: AsyncReadRent>(
        &mut self,
        s: &mut S,
    ) -> Result<Option<Frame>, ConnError> {
        loop {
            if let Some((f, used)) = frame::decode(self.buffered())? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(f));
            }
            // Incomplete: the codec checked the header, so what we wait for is bounded.
            let have = self.buffered().len();
            let want = (HEADER_LEN + MAX_BITMAP_PAYLOAD)
                .saturating_sub(have)
                .min(64 * 1024);
            if self.fill(s, want).await? == 0 {
                return if self.buffered().is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
    }

    /// Moves up to `len` bytes already buffered (read past the last frame) to the end of `out`.
    pub fn take_buffered(&mut self, len: usize, out: &mut Vec<u8>) {
        let from_buf = self.buffered().len().min(len);
        out.extend_from_slice(&self.buf[self.start..self.start + from_buf]);
        self.start += from_buf;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads exactly `len` raw bytes (the body of a piece) into `out`, replacing its content.
    /// `len` must already be validated by the caller against what it expects.
    pub async fn read_raw<S: AsyncReadRent>(
        &mut self,
        s: &mut S,
        len: usize,
        out: Vec<u8>,
    ) -> (Result<(), ConnError>, Vec<u8>) {
        let mut out = out;
        out.clear();
        out.reserve(len);
        self.take_buffered(len, &mut out);
        if out.len() == len {
            return (Ok(()), out);
        }
        // Read by read (not `read_exact`), so that the idle bound applies to each wait.
        while out.len() < len {
            let have = out.len();
            let (res, slice) = match self.bounded(s.read(out.slice_mut(have..len))).await {
                Ok(r) => r,
                Err(e) => return (Err(e), Vec::new()),
            };
            out = slice.into_inner();
            match res {
                Ok(0) => return (Err(ConnError::Truncated), out),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(ConnError::Io(e)), out),
            }
        }
        (Ok(()), out)
    }
}

/// Raw piece bytes of one received chunk, in order: first `buf` (bytes copied out of the
/// stream), then `parts` (buffers the transport already held, handed over without a copy:
/// QUIC). Reused from chunk to chunk.
#[derive(Debug, Default)]
pub struct RawChunk {
    /// Bytes copied into our own buffer.
    pub buf: Vec<u8>,
    /// Bytes that follow `buf`, in the transport's own buffers.
    pub parts: Vec<Bytes>,
}

impl RawChunk {
    /// The chunk's bytes as slices, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.buf.as_slice())
            .chain(self.parts.iter().map(|b| b.as_ref()))
            .filter(|s| !s.is_empty())
    }
}

/// A transport pieces are fetched over: frames both ways, plus raw piece bytes, which a
/// transport that already holds them in its own buffers can hand over without copying.
pub trait FetchStream: AsyncReadRent + AsyncWriteRent + Sized {
    /// Reads exactly `len` raw bytes, first those `reader` buffered past the last frame,
    /// into `chunk`, replacing its content. The default copies them into `chunk.buf`.
    fn read_raw_chunk(
        &mut self,
        reader: &mut FrameReader,
        len: usize,
        chunk: RawChunk,
    ) -> impl Future<Output = (Result<(), ConnError>, RawChunk)> {
        async move {
            let mut chunk = chunk;
            chunk.parts.clear();
            let (res, buf) = reader
                .read_raw(self, len, std::mem::take(&mut chunk.buf))
                .await;
            chunk.buf = buf;
            (res, chunk)
        }
    }
}

impl FetchStream for monoio::net::TcpStream {}

/// Encodes frames into a reusable buffer for one write.
pub fn encode_frames(frames: &[Frame]) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    for f in frames {
        frame::encode(f, &mut b);
    }
    b.to_vec()
}
