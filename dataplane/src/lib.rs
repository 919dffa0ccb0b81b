//! Damselfly's data plane: moves pieces between peers.
//!
//! One monoio runtime per thread (io_uring where the kernel has it, epoll otherwise), each
//! with its own `SO_REUSEPORT` listener on the data port, so the kernel spreads incoming
//! connections over the threads. A thread serves uploads ([`upload`]) and runs the downloads
//! ([`fetch`]) the control plane hands it, for tasks hashed to it.
//!
//! The control plane (tokio) talks to the threads only through the [`bridge`]: bounded
//! lock-free queues of small owned messages. Piece bytes never cross it: both planes reach the
//! bytes through the task file in [`storage`], whose piece bitmap is a set of atomics.

pub mod bridge;
pub mod conn;
pub mod counters;
pub mod fetch;
pub mod hasher;
pub mod quic;
pub mod runtime;
pub mod seeding;
pub mod shaper;
pub mod storage;
pub mod sys;
pub mod tls;
pub mod upload;
pub mod window;

pub use bridge::{Bridge, Command, Event, Parent, PieceSource, StorageFailure};
pub use counters::Counters;
pub use runtime::{DataPlane, DataPlaneConfig};
pub use storage::{ClaimError, PieceWriter, Storage, StoreError, TaskStore};
