//! Configuration of the QUIC endpoint: quinn's transport settings (windows, MTU, GSO,
//! initial congestion window), the UDP socket, and the rustls configurations (verified
//! both ways with a `tls:` section, or a given or self-signed certificate without one).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use super::{QuicConfig, ALPN, SERVER_NAME};

fn transport_config(cfg: &QuicConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let var = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
    t.stream_receive_window(var(cfg.stream_window))
        .receive_window(var(cfg.connection_window))
        .send_window(cfg.send_window)
        .max_concurrent_bidi_streams(var(1024))
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(5)));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload.max(1200));
    t.mtu_discovery_config(Some(mtu));
    // Start at the configured payload size: on loopback and LANs this skips the slow climb
    // from 1200 bytes (quinn falls back to 1200 if the path turns out smaller).
    t.initial_mtu(cfg.max_udp_payload.max(1200));
    // quinn hands up to 10 datagrams to one GSO `sendmsg`; the kernel refuses a batch over
    // 64 KiB with EMSGSIZE, which quinn-udp drops silently (it expects that only of MTU
    // probes), so large payloads (loopback, jumbo frames) would lose whole batches.
    if usize::from(cfg.max_udp_payload) * GSO_BATCH > MAX_GSO_BYTES {
        t.enable_segmentation_offload(false);
    }
    // quinn's initial congestion window is a fixed 14,720 bytes: with a larger first packet
    // the connection could not send its Initial at all and would hang. RFC 9002's window
    // for large packets: 2 of them at least.
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(initial_window(cfg.max_udp_payload));
    t.congestion_controller_factory(Arc::new(cubic));
    t
}

/// Initial congestion window for a UDP payload: quinn's 14,720 bytes, or 4 packets when
/// they are larger (jumbo frames, loopback).
pub(super) fn initial_window(payload: u16) -> u64 {
    14_720u64.max(4 * u64::from(payload))
}

/// Datagrams quinn puts into one GSO send at most (`quinn`'s `MAX_TRANSMIT_SEGMENTS`).
const GSO_BATCH: usize = 10;

/// Largest UDP payload of one `sendmsg`, a GSO batch included (65,535 − 8 − 20).
const MAX_GSO_BYTES: usize = 65_507;

fn load_or_generate(
    cfg: &QuicConfig,
) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .map_err(|e| invalid(&format!("certificate {}", cert.display()), &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(&format!("certificate {}", cert.display()), &e))?;
            if certs.is_empty() {
                return Err(invalid(
                    &format!("certificate {}", cert.display()),
                    &"no certificate in the file",
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| invalid(&format!("key {}", key.display()), &e))?;
            Ok((certs, key))
        }
        (None, None) => {
            let c = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
                .map_err(|e| invalid("generating a certificate", &e))?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_pair.serialize_der()));
            Ok((vec![c.cert.der().clone()], key))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "QUIC needs both a certificate and a key, or neither",
        )),
    }
}

/// The endpoint, server and client configurations the data plane uses for `cfg` (public so
/// that benchmarks can run plain quinn with the same settings).
pub fn configs(
    cfg: &QuicConfig,
) -> io::Result<(
    quinn::EndpointConfig,
    quinn::ServerConfig,
    quinn::ClientConfig,
)> {
    if usize::from(cfg.max_udp_payload) > MAX_GSO_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "QUIC max UDP payload {} exceeds the largest UDP datagram ({MAX_GSO_BYTES})",
                cfg.max_udp_payload
            ),
        ));
    }
    let mut ep_cfg = quinn::EndpointConfig::default();
    ep_cfg
        .max_udp_payload_size(cfg.max_udp_payload.max(1200))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (server, client) = crypto_configs(cfg)?;
    Ok((ep_cfg, server, client))
}

/// A UDP socket bound to `cfg.listen` with the configured buffer sizes.
pub fn bind_udp(cfg: &QuicConfig) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(cfg.listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(cfg.socket_buffer);
    let _ = sock.set_send_buffer_size(cfg.socket_buffer);
    sock.bind(&cfg.listen.into())?;
    Ok(sock.into())
}

/// rustls configurations from the data plane's `tls:` section (verified both ways).
fn verified_configs(
    tls: &wire::tls::TlsConfig,
) -> io::Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let invalid =
        |e: wire::tls::TlsError| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let mut server = tls.rustls_server(&[ALPN]).map_err(invalid)?;
    server.max_early_data_size = 0;
    let client = tls.rustls_client(&[ALPN]).map_err(invalid)?;
    Ok((server, client))
}

pub(super) fn crypto_configs(
    cfg: &QuicConfig,
) -> io::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let provider = wire::tls::provider();
    let other = |e: &dyn std::fmt::Display| io::Error::other(e.to_string());
    if let Some(tls) = &cfg.tls {
        let (server, client) = verified_configs(tls)?;
        let server_crypto = QuicServerConfig::try_from(server).map_err(|e| other(&e))?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        let transport = Arc::new(transport_config(cfg));
        server_cfg.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(client).map_err(|e| other(&e))?;
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_cfg.transport_config(transport);
        return Ok((server_cfg, client_cfg));
    }
    let (certs, key) = load_or_generate(cfg)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| other(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| other(&e))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    let server_crypto = QuicServerConfig::try_from(server).map_err(|e| other(&e))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    let transport = Arc::new(transport_config(cfg));
    server_cfg.transport_config(transport.clone());

    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| other(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];
    let client_crypto = QuicClientConfig::try_from(client).map_err(|e| other(&e))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_cfg.transport_config(transport);
    Ok((server_cfg, client_cfg))
}

/// Accepts any server certificate, but still checks that the handshake is signed by the
/// certificate's key (see the module docs: parents are not authenticated yet).
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
