//! Process-wide data-plane counters, shared by both planes as plain atomics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of bytes and pieces moved, read by the control plane for stats and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Piece bytes this daemon fetched from the origin (written by the control plane).
    pub bytes_from_origin: AtomicU64,
    /// Verified piece bytes fetched from seed peers.
    pub bytes_from_seed: AtomicU64,
    /// Verified piece bytes fetched from normal peers.
    pub bytes_from_peers: AtomicU64,
    /// Piece bytes uploaded to other peers.
    pub bytes_uploaded: AtomicU64,
    /// Pieces uploaded to other peers.
    pub pieces_uploaded: AtomicU64,
    /// Pieces uploaded by super-seeding while no copy of them had left before (so
    /// `pieces_uploaded - first_copies_uploaded` are second and later copies).
    pub first_copies_uploaded: AtomicU64,
    /// Pieces fetched from other peers and verified.
    pub pieces_downloaded: AtomicU64,
    /// Endgame duplicates: pieces received in full after another copy of them had been
    /// stored (the bytes were dropped).
    pub endgame_duplicates: AtomicU64,
    /// Pieces received whose digest did not match (dropped, fetched again elsewhere).
    pub pieces_corrupt: AtomicU64,
    /// Of those, pieces whose crc32c matched but whose BLAKE3 digest differed from the
    /// trusted one (forged by a parent).
    pub pieces_forged: AtomicU64,
    /// Received pieces that waited for their trusted digest to arrive.
    pub digest_waits: AtomicU64,
    /// Of those, pieces dropped because it did not arrive within `digest_wait`.
    pub digest_wait_timeouts: AtomicU64,
    /// Received pieces hashed on the receiving thread because its hash worker was behind.
    pub pieces_hashed_inline: AtomicU64,
    /// Chunk hand-overs to the hash worker that waited for room in its budget.
    pub hash_handover_waits: AtomicU64,
    /// Times a transfer waited for a rate limit.
    pub shaping_waits: AtomicU64,
    /// Largest number of piece requests seen outstanding on one parent connection.
    pub max_requests_in_flight: AtomicU64,
    /// Data-plane connections refused or closed for a malformed frame.
    pub malformed_frames: AtomicU64,
    /// Fetch connections to parents opened over QUIC.
    pub quic_connections: AtomicU64,
    /// QUIC streams accepted by the upload side.
    pub quic_streams_served: AtomicU64,
    /// Incoming data-plane TLS handshakes that completed (children over TCP with
    /// `data_plane.tls`, and over QUIC), proof that TLS was used.
    pub tls_handshakes: AtomicU64,
    /// Incoming data-plane TLS handshakes that failed (e.g. a child without a valid client
    /// certificate), over TCP and QUIC.
    pub tls_handshakes_failed: AtomicU64,
    /// Handshakes with parents that completed (TCP with `data_plane.tls`, and QUIC).
    pub tls_parent_handshakes: AtomicU64,
    /// Handshakes with parents that failed (e.g. a parent whose certificate is not signed by
    /// the CA, or that refused this daemon's certificate), over TCP and QUIC.
    pub tls_parent_handshakes_failed: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter (relaxed: these are statistics, not synchronisation).
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises a high-water mark to `n`.
    pub fn max(c: &AtomicU64, n: u64) {
        c.fetch_max(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
