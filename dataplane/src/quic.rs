//! QUIC transport of the data plane: the same frames as over TCP, on QUIC streams.
//!
//! One quinn endpoint per daemon (one UDP socket, serving and fetching) is driven by a
//! dedicated tokio thread (`dataplane-quic`): it does the packet I/O, encryption and
//! congestion control. The streams themselves are read and written from the monoio
//! data-plane threads through [`QuicStream`], which implements monoio's
//! `AsyncReadRent`/`AsyncWriteRent`: quinn's stream futures only need a waker, so the
//! upload server ([`crate::upload::serve_connection`]) and the fetch sessions
//! ([`crate::fetch`]) run unchanged over QUIC.
//!
//! Each fetch connection to a parent opens one bidirectional stream and pipelines its
//! requests on it, exactly as on a TCP connection. Incoming streams are handed to the
//! data-plane threads round robin.
//!
//! Uploads over QUIC copy: the piece is read from the page cache into a fresh (not zeroed)
//! buffer that quinn encrypts into packets (there is no `sendfile` for QUIC). Downloads do
//! not copy in user space: the fetcher checks and writes piece bytes straight from quinn's
//! decrypted packet buffers ([`crate::conn::FetchStream`], one `pwritev` per 1 MiB).
//!
//! TLS 1.3 with rustls (ring). With the data plane's `tls:` section ([`QuicConfig::tls`])
//! both sides are authenticated: a child checks the parent's certificate against the
//! section's CA (for the parent's IP, or `server_name`), and with `client_auth` a parent
//! refuses a child without a certificate signed by it. Without it, the certificate is
//! `cert`/`key` or a self-signed one generated at start, and the client side does not
//! verify it: traffic is encrypted and integrity protected, but a parent is not
//! authenticated. That mode is for benchmarks and in-process tests only: dfdaemon refuses to
//! start with `transport: quic` and no `data_plane.tls`.
//!
//! The endpoint's configuration (transport settings, UDP socket, rustls) is in
//! `quic/config.rs`; this file holds the stream, the endpoint and its accept loop.

mod config;

use crate::upload::UploadStream;
use bytes::{Bytes, BytesMut};
pub use config::{bind_udp, configs};
use futures::channel::mpsc;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::BufResult;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// ALPN protocol name of the data plane over QUIC.
pub const ALPN: &[u8] = b"damselfly-dp/1";

/// Name in the self-signed certificate generated when none is configured.
const SERVER_NAME: &str = "damselfly";

/// Largest chunk read from a quinn stream at once.
const READ_CHUNK: usize = 1 << 20;

/// Bytes of a piece read from the file and handed to quinn per step.
const SEND_CHUNK: u64 = 1 << 20;

/// Settings of the QUIC transport.
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// UDP address of the QUIC endpoint (port 0 picks a free one).
    pub listen: SocketAddr,
    /// PEM certificate chain; a self-signed certificate is generated when unset.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// The data plane's `tls:` section: when set it replaces `cert`/`key`: the endpoint
    /// presents its `cert`, parents are verified against its `ca_cert`, and with
    /// `client_auth` children must present a certificate signed by it.
    pub tls: Option<wire::tls::TlsConfig>,
    /// Flow-control window of one stream, bytes.
    pub stream_window: u64,
    /// Flow-control window of one connection, bytes.
    pub connection_window: u64,
    /// Bytes a connection may have sent but not yet acknowledged.
    pub send_window: u64,
    /// Largest UDP payload the endpoint sends or accepts (1200–65,507); the first packets
    /// use it and path MTU discovery probes up to it. Above ~6.5 KB GSO is off (see
    /// `transport_config`).
    pub max_udp_payload: u16,
    /// Requested size of the UDP socket's send and receive buffers, bytes.
    pub socket_buffer: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4006)),
            cert: None,
            key: None,
            tls: None,
            stream_window: 64 << 20,
            connection_window: 128 << 20,
            send_window: 128 << 20,
            max_udp_payload: 1452,
            socket_buffer: 8 << 20,
        }
    }
}

/// A bidirectional QUIC stream usable wherever the data plane takes a monoio stream.
#[derive(Debug)]
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Received bytes not yet handed to a reader.
    pending: Bytes,
    /// Keeps the connection open as long as the stream lives.
    _conn: quinn::Connection,
}

impl QuicStream {
    /// Wraps the two halves of a stream of `conn`.
    pub fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            _conn: conn,
        }
    }

    /// Opens a new stream on `conn`.
    pub async fn open(conn: quinn::Connection) -> io::Result<Self> {
        let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
        Ok(Self::new(conn, send, recv))
    }

    /// Makes sure `pending` holds bytes; `false` at the end of the stream.
    async fn refill(&mut self) -> io::Result<bool> {
        if !self.pending.is_empty() {
            return Ok(true);
        }
        match self.recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                self.pending = chunk.bytes;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsyncReadRent for QuicStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self.refill().await {
            Ok(true) => {}
            Ok(false) => return (Ok(0), buf),
            Err(e) => return (Err(e), buf),
        }
        let mut src: &[u8] = &self.pending;
        let (res, buf) = src.read(buf).await;
        if let Ok(n) = res {
            let _ = self.pending.split_to(n);
        }
        (res, buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self.refill().await {
            Ok(true) => {}
            Ok(false) => return (Ok(0), buf),
            Err(e) => return (Err(e), buf),
        }
        let mut src: &[u8] = &self.pending;
        let (res, buf) = src.readv(buf).await;
        if let Ok(n) = res {
            let _ = self.pending.split_to(n);
        }
        (res, buf)
    }
}

impl AsyncWriteRent for QuicStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let bytes = Bytes::copy_from_slice(crate::sys::io_buf_bytes(&buf));
        let n = bytes.len();
        match self.send.write_chunk(bytes).await {
            Ok(()) => (Ok(n), buf),
            Err(e) => (Err(e.into()), buf),
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "vectored writes are not used on QUIC streams",
            )),
            buf,
        )
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.send.finish().map_err(io::Error::other)
    }
}

impl crate::conn::FetchStream for QuicStream {
    /// Hands over quinn's own buffers (decrypted packets, reference counted) instead of
    /// copying them into the fetch buffer: the piece bytes go from them to the task file.
    async fn read_raw_chunk(
        &mut self,
        reader: &mut crate::conn::FrameReader,
        len: usize,
        chunk: crate::conn::RawChunk,
    ) -> (Result<(), crate::conn::ConnError>, crate::conn::RawChunk) {
        use crate::conn::ConnError;
        let mut chunk = chunk;
        chunk.buf.clear();
        chunk.parts.clear();
        reader.take_buffered(len, &mut chunk.buf);
        let mut need = len - chunk.buf.len();
        while need > 0 {
            // The reader's idle bound applies to each wait for a packet, as to TCP reads.
            let refilled = match reader.idle_timeout() {
                Some(d) => match monoio::time::timeout(d, self.refill()).await {
                    Ok(r) => r,
                    Err(_) => return (Err(ConnError::Idle(d)), chunk),
                },
                None => self.refill().await,
            };
            match refilled {
                Ok(true) => {}
                Ok(false) => return (Err(ConnError::Truncated), chunk),
                Err(e) => return (Err(ConnError::Io(e)), chunk),
            }
            let take = need.min(self.pending.len());
            chunk.parts.push(self.pending.split_to(take));
            need -= take;
        }
        (Ok(()), chunk)
    }
}

impl UploadStream for QuicStream {
    /// Reads the range from the page cache in 1 MiB steps and hands each to quinn (a copy:
    /// QUIC encrypts in user space).
    async fn send_file_range(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let want = (end - off).min(SEND_CHUNK) as usize;
            let mut b = BytesMut::with_capacity(want);
            crate::sys::pread_append(file, &mut b, off, want)?;
            self.send.write_chunk(b.freeze()).await?;
            off += want as u64;
        }
        Ok(())
    }
}

/// quinn runtime that spawns on a given tokio runtime from any thread (the monoio threads
/// open connections, which makes quinn spawn their drivers).
#[derive(Debug)]
struct HandleRuntime(tokio::runtime::Handle);

impl quinn::Runtime for HandleRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        let _g = self.0.enter();
        quinn::TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        t: std::net::UdpSocket,
    ) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _g = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(t)
    }
}

/// The running QUIC endpoint and the tokio thread that drives it.
#[derive(Debug)]
pub struct QuicEndpoint {
    runtime: Option<tokio::runtime::Runtime>,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
}

/// Streams accepted by the endpoint, for one data-plane thread.
pub type Incoming = mpsc::Receiver<QuicStream>;

/// Accepted streams waiting for one data-plane thread to take them. The hand-off is bounded:
/// when a thread falls this far behind, the connection that opened the stream waits (and
/// with it, through QUIC's stream limit, the child that opens streams), instead of the
/// endpoint thread buffering streams without limit.
pub const HANDOFF_QUEUE: usize = 256;

impl QuicEndpoint {
    /// Binds the endpoint and starts its thread. Accepted streams go to `threads` receivers
    /// (returned, one per data-plane thread) round robin.
    /// The thread's kernel id is added to `tids`.
    pub fn start(
        cfg: &QuicConfig,
        threads: usize,
        tids: Arc<std::sync::Mutex<Vec<u32>>>,
        counters: Arc<crate::counters::Counters>,
    ) -> io::Result<(Self, Vec<Incoming>)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dataplane-quic")
            .on_thread_start(move || {
                if let (Some(t), Ok(mut v)) = (crate::runtime::current_tid(), tids.lock()) {
                    v.push(t);
                }
            })
            .enable_all()
            .build()?;
        let (ep_cfg, server, client) = configs(cfg)?;
        let socket = bind_udp(cfg)?;
        let endpoint = quinn::Endpoint::new(
            ep_cfg,
            Some(server),
            socket,
            Arc::new(HandleRuntime(runtime.handle().clone())),
        )?;
        let mut endpoint = endpoint;
        endpoint.set_default_client_config(client);
        let local_addr = endpoint.local_addr()?;
        let mut senders = Vec::with_capacity(threads.max(1));
        let mut receivers = Vec::with_capacity(threads.max(1));
        for _ in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
            senders.push(tx);
            receivers.push(rx);
        }
        runtime.spawn(accept_loop(endpoint.clone(), Arc::new(senders), counters));
        tracing::info!("data plane QUIC endpoint on {local_addr}");
        Ok((
            Self {
                runtime: Some(runtime),
                endpoint,
                local_addr,
            },
            receivers,
        ))
    }

    /// The endpoint, to connect to parents.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// UDP address of the endpoint.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes every connection and stops the thread (without blocking: this may run inside
    /// the control plane's tokio runtime).
    pub fn shutdown(mut self) {
        self.endpoint.close(0u32.into(), b"shutdown");
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for QuicEndpoint {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Connects to a parent's QUIC endpoint and opens the stream of one fetch connection. The
/// parent's certificate (when the endpoint verifies it, see [`QuicConfig::tls`]) must carry
/// its IP, or `tls`'s `server_name` when set. A completed handshake counts in
/// `tls_parent_handshakes`, a refused one (a TLS or protocol error, not a timeout) in
/// `tls_parent_handshakes_failed`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    tls: Option<&crate::tls::DataTls>,
    counters: &crate::counters::Counters,
) -> io::Result<QuicStream> {
    use crate::counters::Counters;
    // The parent's IP unless `tls` names the server (`server_name`); an unverified endpoint
    // ignores the name.
    let name = tls.map_or_else(|| addr.ip().to_string(), |t| t.server_name(addr.ip()));
    let conn = match endpoint
        .connect(addr, &name)
        .map_err(io::Error::other)?
        .await
    {
        Ok(c) => c,
        Err(e) => {
            if matches!(
                e,
                quinn::ConnectionError::TransportError(_)
                    | quinn::ConnectionError::ConnectionClosed(_)
            ) {
                Counters::add(&counters.tls_parent_handshakes_failed, 1);
            }
            return Err(io::Error::other(format!("QUIC handshake with {addr}: {e}")));
        }
    };
    Counters::add(&counters.tls_parent_handshakes, 1);
    QuicStream::open(conn).await
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    threads: Arc<Vec<mpsc::Sender<QuicStream>>>,
    counters: Arc<crate::counters::Counters>,
) {
    use crate::counters::Counters;
    let next = Arc::new(AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        let threads = threads.clone();
        let next = next.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    Counters::add(&counters.tls_handshakes_failed, 1);
                    tracing::warn!("data-plane QUIC handshake with {peer} failed: {e}");
                    return;
                }
            };
            Counters::add(&counters.tls_handshakes, 1);
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let i = next.fetch_add(1, Ordering::Relaxed) % threads.len();
                        let s = QuicStream::new(conn.clone(), send, recv);
                        // Back-pressure, not an unbounded buffer: this connection's next
                        // stream is accepted once the thread has taken this one.
                        let mut tx = threads[i].clone();
                        if futures::SinkExt::send(&mut tx, s).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("QUIC connection ended: {e}");
                        return;
                    }
                }
            }
        });
    }
}
