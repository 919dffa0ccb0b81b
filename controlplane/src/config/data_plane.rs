//! The `data_plane:` section of dfdaemon's configuration (sockets, threads, fetch windows
//! and timeouts, rate limits, transport, TLS) and [`ByteSize`], the byte count or rate
//! written with a unit.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// `data_plane:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataPlaneSection {
    /// TCP address of the upload server.
    pub listen: SocketAddr,
    /// Data-plane threads; 0 means one per core.
    pub threads: usize,
    /// Use io_uring when available (else epoll).
    pub io_uring: bool,
    /// Capacity of each bridge queue between the planes.
    pub queue_capacity: usize,
    /// Piece requests outstanding per parent connection, at most.
    pub pieces_in_flight: usize,
    /// Delivery time the request window of a parent connection covers beyond the piece on
    /// the wire, at the rate that connection delivers (so a busy parent is asked for ~2
    /// pieces, a fast one for up to `pieces_in_flight`); `0s`: always `pieces_in_flight`.
    #[serde(with = "humantime_serde")]
    pub request_queue_time: Duration,
    /// Time allowed to connect to a parent.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for one piece from a parent.
    #[serde(with = "humantime_serde")]
    pub piece_timeout: Duration,
    /// A parent connection with requests outstanding that delivers no byte for this long is
    /// dropped and reported to the scheduler as stalled (whatever the piece length; see
    /// `dataplane::fetch::FetchConfig::parent_idle_timeout`). `0s`: off.
    #[serde(with = "humantime_serde")]
    pub parent_idle_timeout: Duration,
    /// Check every piece from a parent against the trusted BLAKE3 digest the scheduler hands
    /// out (from the host that fetched it from the origin). Off: crc32c only.
    pub verify_pieces: bool,
    /// Longest a received piece waits for its trusted digest before it is dropped and asked
    /// for again later.
    #[serde(with = "humantime_serde")]
    pub digest_wait: Duration,
    /// Total upload rate in bytes per second (`"100MiB"`, `"1Gi"`, or a number); 0: unlimited.
    pub upload_rate_limit: ByteSize,
    /// Total download rate (peers and origin together); 0: unlimited.
    pub download_rate_limit: ByteSize,
    /// Upload rate of each peer connection; 0: unlimited.
    pub per_peer_upload_rate_limit: ByteSize,
    /// Download rate from each parent connection; 0: unlimited.
    pub per_peer_download_rate_limit: ByteSize,
    /// Bytes of piece requests outstanding per parent connection (with `pieces_in_flight`,
    /// whichever is reached first).
    pub bytes_in_flight: ByteSize,
    /// Transport of fetches: `tcp`, or `quic` (also serves QUIC on `quic_listen`; parents
    /// without QUIC are still reached over TCP). `quic` needs `tls`: a daemon refuses to
    /// start with QUIC and no `tls`.
    pub transport: TransportKind,
    /// UDP address of the QUIC endpoint (with `transport: quic`).
    pub quic_listen: SocketAddr,
    /// Largest UDP payload of a QUIC packet, bytes (1200–65,000; default 1452, safe for
    /// 1500-byte Ethernet). Larger packets cut QUIC's per-packet CPU cost: ~8900 on
    /// jumbo-frame (9000 MTU) networks, up to 65,000 on loopback. See tuning.md.
    pub quic_max_udp_payload: u16,
    /// TLS of the data plane (TCP and QUIC, serving and fetching); none: plaintext TCP (and
    /// no QUIC). See the README's TLS section.
    pub tls: Option<wire::tls::TlsConfig>,
}

/// Data-plane transport (`data_plane.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// TCP only.
    #[default]
    Tcp,
    /// QUIC endpoint on, fetches over QUIC where the parent serves it.
    Quic,
}

impl DataPlaneSection {
    /// The rate limits of this section for the data plane.
    pub fn shaping(&self) -> dataplane::shaper::ShapingConfig {
        dataplane::shaper::ShapingConfig {
            upload: self.upload_rate_limit.0,
            download: self.download_rate_limit.0,
            per_peer_upload: self.per_peer_upload_rate_limit.0,
            per_peer_download: self.per_peer_download_rate_limit.0,
        }
    }
}

/// A byte count (or rate) written as a number or with a unit: `4096`, `"64KiB"`, `"100MB"`,
/// `"1Gi"`. Binary units (`Ki`, `KiB`, `Mi`, …) are powers of 1024, decimal ones (`K`, `KB`,
/// `M`, `MB`, …) powers of 1000 ([`wire::size`], as Dragonfly).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Parses a [`ByteSize`] string (the project's one size parser, [`wire::size`]).
pub use wire::size::parse_size;

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Self(n)),
            Raw::S(s) => parse_size(&s).map(Self).map_err(serde::de::Error::custom),
        }
    }
}

impl Default for DataPlaneSection {
    /// The data plane's own defaults ([`dataplane::runtime::DataPlaneConfig`],
    /// [`dataplane::fetch::FetchConfig`], [`dataplane::quic::QuicConfig`]): written once, there.
    fn default() -> Self {
        let plane = dataplane::runtime::DataPlaneConfig::default();
        let fetch = dataplane::fetch::FetchConfig::default();
        Self {
            listen: plane.listen,
            // 0: one thread per CPU, decided when the daemon starts.
            threads: 0,
            io_uring: plane.io_uring,
            queue_capacity: plane.queue_capacity,
            pieces_in_flight: fetch.pieces_in_flight,
            request_queue_time: fetch.request_queue_time,
            connect_timeout: fetch.connect_timeout,
            piece_timeout: fetch.piece_timeout,
            parent_idle_timeout: fetch.parent_idle_timeout,
            verify_pieces: true,
            digest_wait: fetch.digest_wait,
            upload_rate_limit: ByteSize(0),
            download_rate_limit: ByteSize(0),
            per_peer_upload_rate_limit: ByteSize(0),
            per_peer_download_rate_limit: ByteSize(0),
            bytes_in_flight: ByteSize(fetch.bytes_in_flight),
            transport: TransportKind::Tcp,
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 4006)),
            quic_max_udp_payload: dataplane::quic::QuicConfig::default().max_udp_payload,
            tls: None,
        }
    }
}
