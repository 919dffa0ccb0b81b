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
