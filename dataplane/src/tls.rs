//! TLS over the data plane's TCP connections (and the certificates of its QUIC endpoint).
//!
//! With `data_plane.tls` set, every TCP connection between peers is TLS 1.3 (rustls, ring),
//! driven on the monoio threads by `monoio-rustls`. A parent presents its certificate,
//! which the child checks against `ca_cert` (and against the parent's IP, or `server_name`
//! when set); with `client_auth` the parent requires a certificate from the child too and
//! closes the connection of a child without a valid one.
//!
//! Uploads over TLS copy: the piece is read from the page cache into a buffer that rustls
//! encrypts (there is no `sendfile`/`splice` into a user-space TLS session; kernel TLS is not
//! used).

use crate::counters::Counters;
use crate::upload::UploadStream;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use wire::tls::TlsConfig;

/// Longest TLS handshake an upload connection may take before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a piece read from the file and encrypted per step.
const SEND_CHUNK: u64 = 256 << 10;

/// The data plane's TLS settings, parsed once at start.
#[derive(Debug, Clone)]
pub struct DataTls {
    config: TlsConfig,
    /// `None` for a fetch-only configuration ([`DataTls::client_only`]).
    server: Option<Arc<rustls::ServerConfig>>,
    client: Arc<rustls::ClientConfig>,
}

/// A TLS connection accepted by the upload server.
pub type ServerStream = monoio_rustls::ServerTlsStream<TcpStream>;

/// A TLS connection to a parent.
pub type ClientStream = monoio_rustls::ClientTlsStream<TcpStream>;

impl DataTls {
    /// Reads the files of `config`. A daemon both serves and fetches, so it needs `cert`,
    /// `key` and `ca_cert`.
    pub fn new(config: &TlsConfig) -> Result<Self, wire::tls::TlsError> {
        Ok(Self {
            server: Some(Arc::new(config.rustls_server(&[])?)),
            client: Arc::new(config.rustls_client(&[])?),
            config: config.clone(),
        })
    }

    /// A configuration that only fetches (`cert`/`key` optional, presented when set); its
    /// upload server refuses every connection. For tools and tests.
    pub fn client_only(config: &TlsConfig) -> Result<Self, wire::tls::TlsError> {
        Ok(Self {
            server: None,
            client: Arc::new(config.rustls_client(&[])?),
            config: config.clone(),
        })
    }

    /// The `tls:` section this was made from (QUIC builds its own configurations from it).
    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// Name checked in the certificate of a parent at `ip`: `server_name` when set, else
    /// the IP.
    pub fn server_name(&self, ip: IpAddr) -> String {
        if self.config.server_name.is_empty() {
            ip.to_string()
        } else {
            self.config.server_name.clone()
        }
    }

    /// Runs the server side of the handshake on an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<ServerStream> {
        let Some(server) = &self.server else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this data plane has no server certificate",
            ));
        };
        let acceptor = monoio_rustls::TlsAcceptor::from(server.clone());
        match monoio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(tls_error(e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }

    /// Runs the client side of the handshake with a parent at `ip`, counted in `counters`
    /// (`tls_parent_handshakes`, or `tls_parent_handshakes_failed` when refused).
    pub async fn connect(
        &self,
        ip: IpAddr,
        stream: TcpStream,
        counters: &Counters,
    ) -> io::Result<ClientStream> {
        let name = ServerName::try_from(self.server_name(ip))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let r = monoio_rustls::TlsConnector::from(self.client.clone())
            .connect(name, stream)
            .await
            .map_err(tls_error);
        match &r {
            Ok(_) => Counters::add(&counters.tls_parent_handshakes, 1),
            Err(_) => Counters::add(&counters.tls_parent_handshakes_failed, 1),
        }
        r
    }
}

/// An io error saying what failed in the handshake (monoio-rustls' own message is only
/// "io error" / "rustls error").
fn tls_error(e: monoio_rustls::TlsError) -> io::Error {
    let inner = io::Error::from(e);
    // The kind is kept: `UnexpectedEof` is a peer that closed before finishing (a TCP
    // health check), not a refused certificate.
    io::Error::new(inner.kind(), format!("TLS handshake: {inner}"))
}

impl crate::conn::FetchStream for ClientStream {}

impl UploadStream for ServerStream {
    /// Reads the range from the page cache in 256 KiB steps and encrypts each (a copy).
    async fn send_file_range(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut off = offset;
        let mut buf = Vec::new();
        while off < end {
            let want = (end - off).min(SEND_CHUNK) as usize;
            buf.resize(want, 0);
            crate::upload::read_piece_chunk(file, &mut buf, off)?;
            let (res, b) = self.write_all(buf).await;
            buf = b;
            res?;
            off += want as u64;
        }
        Ok(())
    }
}
