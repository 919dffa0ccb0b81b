//! Damselfly's protocols, with no I/O in them.
//!
//! * [`frame`]: the data-plane frame codec spoken over TCP and QUIC between peers. It parses
//!   from and writes to byte buffers; the caller owns the sockets. Like `quinn-proto`, nothing
//!   here reads a clock or touches a runtime.
//! * [`piece`]: piece length rule and piece ranges of a task.
//! * [`task`]: task ids (sha256 over the normalised URL and the task's options).
//! * [`proto`]: the gRPC services (scheduler, dfdaemon local API, manager), compiled with
//!   protox.
//! * [`grpc_codec`]: the codec of every generated gRPC client and server (small buffers).
//! * [`size`]: byte sizes in config files and flags (`64KiB`, `100MB`); [`range`]: the HTTP
//!   `Range` header against a body of known length.
//! * [`tls`]: the `tls:` config section shared by every process, turned into rustls and
//!   tonic configurations.

pub mod frame;
pub mod grpc_codec;
pub mod metrics_http;
pub mod piece;
pub mod range;
pub mod size;
pub mod task;
pub mod tls;

pub use frame::{DecodeError, ErrorCode, Frame, PieceHeader};
pub use piece::PieceLayout;
pub use task::TaskId;

/// gRPC messages and services generated from `proto/*.proto`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod proto {
    /// Scheduler API: host and peer announcements, parent candidates, task stats.
    pub mod scheduler {
        tonic::include_proto!("damselfly.scheduler.v1");
    }
    /// dfdaemon local API used by dfget and dfcache.
    pub mod dfdaemon {
        tonic::include_proto!("damselfly.dfdaemon.v1");

        /// Redacts the secret and the session token (a request may be logged).
        impl std::fmt::Debug for ObjectStorage {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let redact = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
                f.debug_struct("ObjectStorage")
                    .field("endpoint", &self.endpoint)
                    .field("region", &self.region)
                    .field("access_key_id", &self.access_key_id)
                    .field("secret_access_key", &redact(&self.secret_access_key))
                    .field("session_token", &redact(&self.session_token))
                    .field("path_style", &self.path_style)
                    .finish()
            }
        }
    }
    /// Manager API: registration, keepalive, dynamic config, searcher, preheat.
    pub mod manager {
        tonic::include_proto!("damselfly.manager.v1");
    }
}

/// crc32c (Castagnoli) of a piece, the cheap per-piece digest.
pub fn piece_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Extends a running crc32c with more bytes of the same piece.
pub fn piece_crc_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// Length of a [`PieceDigest`] in bytes.
pub const PIECE_DIGEST_LEN: usize = 32;

/// BLAKE3 digest of one piece: computed by the host that fetched the piece from the origin
/// (or imported the file), handed out by the scheduler, and checked by every peer before it
/// stores a piece from a parent. BLAKE3 rather than sha256: 5.1 GiB/s against 1.2 GiB/s for
/// sha256 with SHA-NI, on one core here (tuning.md, "Piece digests").
pub type PieceDigest = [u8; PIECE_DIGEST_LEN];

/// The [`PieceDigest`] of a whole piece.
pub fn piece_digest(data: &[u8]) -> PieceDigest {
    *blake3::hash(data).as_bytes()
}

/// Parts shorter than this are gathered before they are hashed: BLAKE3 hashes many 1 KiB
/// chunks in parallel (AVX-512: 16) only within one `update` call, so the packet-sized parts
/// QUIC hands over, hashed one by one, ran at a fraction of its speed.
const HASH_STAGE: usize = 64 << 10;

/// Computes a [`PieceDigest`] over a piece given in several parts (as it arrives).
#[derive(Debug, Clone, Default)]
pub struct PieceHasher {
    hasher: blake3::Hasher,
    /// Short parts not hashed yet (at most [`HASH_STAGE`] bytes).
    stage: Vec<u8>,
}

impl PieceHasher {
    /// A hasher with nothing in it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes of the piece.
    pub fn update(&mut self, data: &[u8]) {
        if self.stage.is_empty() && data.len() >= HASH_STAGE {
            self.hasher.update(data);
            return;
        }
        let mut data = data;
        while !data.is_empty() {
            if self.stage.capacity() == 0 {
                self.stage.reserve_exact(HASH_STAGE);
            }
            let take = (HASH_STAGE - self.stage.len()).min(data.len());
            self.stage.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.stage.len() == HASH_STAGE {
                self.hasher.update(&self.stage);
                self.stage.clear();
            }
        }
    }

    /// The digest of everything added.
    pub fn finish(&self) -> PieceDigest {
        if self.stage.is_empty() {
            return *self.hasher.finalize().as_bytes();
        }
        let mut h = self.hasher.clone();
        h.update(&self.stage);
        *h.finalize().as_bytes()
    }

    /// Starts over (keeps the stage's allocation for the next piece).
    pub fn reset(&mut self) {
        self.hasher.reset();
        self.stage.clear();
    }
}

/// Splits the `digests` bytes of a `PieceDigests` message (32 bytes per number) into pairs;
/// `None` when the lengths do not agree.
pub fn split_piece_digests(numbers: &[u32], digests: &[u8]) -> Option<Vec<(u32, PieceDigest)>> {
    if digests.len() != numbers.len() * PIECE_DIGEST_LEN {
        return None;
    }
    numbers
        .iter()
        .zip(digests.chunks_exact(PIECE_DIGEST_LEN))
        .map(|(n, d)| Some((*n, PieceDigest::try_from(d).ok()?)))
        .collect()
}

/// Bytes per crc32c in the `crcs` of a `PieceDigests` message (and an announce's `piece_crcs`).
pub const PIECE_CRC_LEN: usize = 4;

/// Splits the `crcs` bytes of a `PieceDigests` message (4 bytes little-endian per number)
/// or of an announce's `piece_crcs` (per piece) into `count` crcs; `None` when they are
/// empty (not known) or the lengths do not agree.
pub fn split_piece_crcs(count: usize, crcs: &[u8]) -> Option<Vec<u32>> {
    if crcs.is_empty() || crcs.len() != count * PIECE_CRC_LEN {
        return None;
    }
    crcs.chunks_exact(PIECE_CRC_LEN)
        .map(|c| Some(u32::from_le_bytes(c.try_into().ok()?)))
        .collect()
}

#[cfg(test)]
mod digest_tests {
    use super::*;

    #[test]
    fn hasher_in_parts_equals_one_shot() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        for size in [1, 1200, 65_535, 65_537, 300_000] {
            let mut h = PieceHasher::new();
            for part in data.chunks(size) {
                h.update(part);
            }
            assert_eq!(h.finish(), piece_digest(&data), "parts of {size} bytes");
        }
        let mut h = PieceHasher::new();
        h.update(&data[..10]);
        h.reset();
        assert_eq!(h.finish(), piece_digest(&[]));
    }

    #[test]
    fn split_checks_lengths() {
        let d = [piece_digest(b"a"), piece_digest(b"b")].concat();
        let pairs = split_piece_digests(&[3, 9], &d).expect("pairs");
        assert_eq!(
            pairs,
            vec![(3, piece_digest(b"a")), (9, piece_digest(b"b"))]
        );
        assert!(split_piece_digests(&[3], &d).is_none());
        assert!(split_piece_digests(&[3, 9, 10], &d).is_none());
    }

    #[test]
    fn split_crcs_checks_lengths() {
        let c = [7u32.to_le_bytes(), 0xdead_beefu32.to_le_bytes()].concat();
        assert_eq!(split_piece_crcs(2, &c), Some(vec![7, 0xdead_beef]));
        assert_eq!(split_piece_crcs(2, &[]), None, "empty: not known");
        assert_eq!(split_piece_crcs(1, &c), None);
    }
}
