//! The control plane of dfdaemon (tokio + tonic).
//!
//! It owns the process: loads the [`config`], opens storage, starts the data plane, and then
//! runs the scheduler sessions ([`scheduler`]), the per-task downloads ([`task`]), fetches
//! from the origin when it has to ([`origin`]), serves the local API for dfget on a Unix
//! socket ([`local_api`]), the registry mirror ([`proxy`]) and Prometheus metrics
//! ([`metrics`]). Task metadata survives restarts in [`store`]; [`gc`] evicts tasks by TTL and
//! disk watermarks, and [`retention`] owns deleting a task. [`trust`] builds the origin clients
//! (private CAs, the system store). [`daemon`] is the composition root: it builds these
//! services and hands each module the narrow ones it uses.

pub mod announce;
pub mod cache;
pub mod config;
pub mod daemon;
pub mod error;
pub mod gc;
pub mod local_api;
pub mod manager;
pub mod metrics;
pub mod origin;
pub mod proxy;
pub mod proxy_ca;
pub mod retention;
pub mod s3;
pub mod scheduler;
pub mod store;
pub mod task;
pub mod task_reader;
pub mod trust;

pub use config::DaemonConfig;
pub use daemon::Daemon;
