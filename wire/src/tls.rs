//! TLS settings shared by every process: the `tls:` sections of the daemon, scheduler and
//! manager configurations, and how they turn into rustls and tonic configurations.
//!
//! One shape everywhere (all PEM file paths, TLS off when the section is absent):
//!
//! ```yaml
//! tls:
//!   ca_cert: /etc/damselfly/ca.pem    # CA that signs the other side's certificate
//!   cert: /etc/damselfly/node.pem     # this process's certificate chain
//!   key: /etc/damselfly/node-key.pem  # its private key
//!   client_auth: false                # server side: require a client certificate (mTLS)
//!   server_name: ""                   # client side: name checked in the server's certificate
//! ```
//!
//! A server needs `cert` and `key`; with `client_auth` it also needs `ca_cert` and rejects a
//! client that presents no certificate signed by it. A client needs `ca_cert` (the server's
//! certificate must chain to it) and presents `cert`/`key` when they are set (needed by a
//! server with `client_auth`). Only TLS 1.3 is offered, with ring's cryptography.
//!
//! Reading the files is the only I/O here; every error names the file it is about.

pub use rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A `tls:` section. Present means TLS on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) the other side's certificate must chain to.
    pub ca_cert: Option<PathBuf>,
    /// PEM file of this side's certificate chain (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM file of the private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Server side: require and verify a client certificate signed by `ca_cert` (mTLS).
    pub client_auth: bool,
    /// Client side: the name the server's certificate must carry; empty: the host (or IP) of
    /// the address connected to.
    pub server_name: String,
}

/// Why a TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A key the role needs is not set.
    #[error("tls: {0}")]
    Missing(&'static str),
    /// A file could not be read or holds no usable PEM item.
    #[error("tls: {what} {path}: {reason}")]
    File {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the certificates or key.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built from the CA file.
    #[error("tls: client verifier: {0}")]
    Verifier(String),
    /// `server_name` is not a DNS name or IP address.
    #[error("tls: server_name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
}

fn file_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The crypto provider used for every TLS configuration built here (TCP and QUIC data
/// plane): ring, with the AES-128-GCM suites moved ahead of AES-256-GCM. rustls lists
/// AES-256 first; AES-128 is as safe for this traffic and takes 10 AES rounds instead of 14
/// per block, which is measurable when every piece byte is encrypted (tuning.md, QUIC).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring_provider())
}

/// ring with the AES-128-GCM suites first, as both [`provider`] and
/// [`install_default_provider`] hand it out.
fn ring_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| !is_aes128_gcm(s.suite()));
    p
}

fn is_aes128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as C;
    matches!(
        suite,
        C::TLS13_AES_128_GCM_SHA256
            | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// Installs ring, ordered as in [`provider`], as the process's default rustls provider
/// (libraries that build their own configurations, like tonic's server, use it); a second
/// call does nothing.
pub fn install_default_provider() {
    let _ = ring_provider().install_default();
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("private key", path, e))
}

/// Raw PEM text of a file, after checking it parses as `what` (for tonic, which takes PEM).
fn pem_text(path: &Path, what: &'static str, key: bool) -> Result<Vec<u8>, TlsError> {
    if key {
        load_key(path)?;
    } else {
        load_certs(path, what)?;
    }
    std::fs::read(path).map_err(|e| file_error(what, path, e))
}

impl TlsConfig {
    fn cert_and_key(
        &self,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((load_certs(c, "certificate")?, load_key(k)?))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Missing("`cert` is set but `key` is not")),
            (None, Some(_)) => Err(TlsError::Missing("`key` is set but `cert` is not")),
        }
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let path = self.ca_cert.as_deref().ok_or(TlsError::Missing(
            "`ca_cert` is needed to verify the other side",
        ))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(path, "CA certificate")? {
            roots
                .add(c)
                .map_err(|e| file_error("CA certificate", path, e))?;
        }
        Ok(roots)
    }

    /// rustls configuration of a server (TLS 1.3; client certificates required and verified
    /// against `ca_cert` when `client_auth`).
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let (certs, key) = self
            .cert_and_key()?
            .ok_or(TlsError::Missing("a server needs `cert` and `key`"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = if self.client_auth {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(self.roots()?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// rustls configuration of a client: the server's certificate must chain to `ca_cert`;
    /// `cert`/`key` are presented when set.
    pub fn rustls_client(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?);
        let mut config = match self.cert_and_key()? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The name to verify in the certificate of a server reached at `host` (`server_name`
    /// when set).
    pub fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        let name = if self.server_name.is_empty() {
            host
        } else {
            &self.server_name
        };
        ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
    }

    /// tonic server TLS: identity from `cert`/`key`, client certificates required and checked
    /// against `ca_cert` when `client_auth`. The files are parsed here, so that a bad file is
    /// reported at start, with its name.
    pub fn tonic_server(&self) -> Result<tonic::transport::ServerTlsConfig, TlsError> {
        install_default_provider();
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(TlsError::Missing("a server needs `cert` and `key`"));
        };
        let identity = tonic::transport::Identity::from_pem(
            pem_text(cert, "certificate", false)?,
            pem_text(key, "private key", true)?,
        );
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if self.client_auth {
            let ca = self.ca_cert.as_deref().ok_or(TlsError::Missing(
                "`client_auth` needs `ca_cert` to verify clients",
            ))?;
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(pem_text(
                ca,
                "CA certificate",
                false,
            )?));
        }
        Ok(tls)
    }

    /// tonic client TLS for a server at `host`: its certificate must chain to `ca_cert`;
    /// `cert`/`key` are presented when set.
    pub fn tonic_client(&self, host: &str) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        install_default_provider();
        let ca = self.ca_cert.as_deref().ok_or(TlsError::Missing(
            "`ca_cert` is needed to verify the server",
        ))?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem_text(
                ca,
                "CA certificate",
                false,
            )?))
            .domain_name(if self.server_name.is_empty() {
                host.to_string()
            } else {
                self.server_name.clone()
            });
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    pem_text(c, "certificate", false)?,
                    pem_text(k, "private key", true)?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => return Err(TlsError::Missing("`cert` is set but `key` is not")),
            (None, Some(_)) => return Err(TlsError::Missing("`key` is set but `cert` is not")),
        }
        Ok(tls)
    }
}

/// Handshakes of incoming gRPC connections over TLS in this process (every server of
/// [`grpc_incoming`] together), for the servers' metrics.
#[derive(Debug, Default)]
pub struct GrpcHandshakes {
    /// Handshakes that completed.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Handshakes refused (no client certificate, one from another CA, not TLS) or timed
    /// out; a connection closed before its first byte (a port probe) is not counted.
    pub refused: std::sync::atomic::AtomicU64,
}

/// The process-wide [`GrpcHandshakes`].
pub static GRPC_HANDSHAKES: GrpcHandshakes = GrpcHandshakes {
    accepted: std::sync::atomic::AtomicU64::new(0),
    refused: std::sync::atomic::AtomicU64::new(0),
};

/// Longest TLS handshake of an incoming gRPC connection.
const GRPC_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the TLS handshake of every connection from `incoming` (each in its own task, so a
/// slow client holds up nobody) and yields the established streams, for tonic's
/// `serve_with_incoming`. A refused handshake (no client certificate, one from another CA,
/// not TLS at all) is logged with the client's address and why, as `<server>: TLS
/// handshake with <addr> refused: <reason>`; a connection closed before its first byte
/// (a port probe) only at debug level. The config gets ALPN `h2`.
pub fn grpc_incoming<S>(
    mut incoming: S,
    mut config: rustls::ServerConfig,
    server: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
>
where
    S: tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + Unpin + 'static,
{
    use std::sync::atomic::Ordering;
    use tokio_stream::StreamExt;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            if tx.is_closed() {
                break;
            }
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!("{server}: accept failed: {e}");
                    continue;
                }
            };
            let peer = tcp
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(GRPC_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        GRPC_HANDSHAKES.accepted.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!("{server}: {peer} closed during the TLS handshake");
                    }
                    Ok(Err(e)) => {
                        GRPC_HANDSHAKES.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("{server}: TLS handshake with {peer} refused: {e}");
                    }
                    Err(_) => {
                        GRPC_HANDSHAKES.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("{server}: TLS handshake with {peer} timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A gRPC endpoint for `addr` (`host:port`): `https://` with `tls`, else `http://`.
pub fn grpc_endpoint(
    addr: &str,
    tls: Option<&TlsConfig>,
) -> Result<tonic::transport::Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("address {addr:?}: {e}"))?;
    match tls {
        None => Ok(ep),
        Some(t) => {
            let host = ep
                .uri()
                .host()
                .unwrap_or(addr)
                .trim_matches(['[', ']'])
                .to_string();
            let cfg = t.tonic_client(&host).map_err(|e| e.to_string())?;
            ep.tls_config(cfg)
                .map_err(|e| format!("TLS for {addr}: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes128_gcm_is_preferred_in_tls13() {
        let p = provider();
        let tls13: Vec<_> = p
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls13.first(),
            Some(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert!(tls13.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
    }

    #[test]
    fn missing_file_is_named() {
        let t = TlsConfig {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        let e = t.rustls_client(&[]).expect_err("no CA file");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = t.tonic_server().expect_err("no cert");
        assert!(e.to_string().contains("`cert` and `key`"), "{e}");
    }

    #[test]
    fn garbage_pem_is_an_error() {
        let dir = std::env::temp_dir().join(format!("wire-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("bad.pem");
        std::fs::write(&p, "not a certificate").expect("write");
        let e = load_certs(&p, "certificate").expect_err("garbage");
        assert!(e.to_string().contains("bad.pem"), "{e}");
        assert!(load_key(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
