//! `testkit`: what Damselfly's end-to-end tests and the local demo are built from.
//!
//! * [`content`]: deterministic generated file content, hashable and writable by streaming.
//! * [`origin`]: a real HTTP/1.1 origin (hyper) serving generated files, with ranges and
//!   byte counters.
//! * [`cluster`]: a manager, schedulers, seed peers and peers started as real processes on loopback,
//!   each with its own temp dir, ports and log file; killed on drop.
//! * [`grpc`]: clients for a daemon's local API (over its Unix socket) and the scheduler.
//! * [`manager`]: a `manager` process (SQLite, bootstrap token, fast keepalives) and a
//!   client for its REST API.
//! * [`frames`]: a small async client/server connection speaking the data-plane frames.
//! * [`registry`]: a real `docker-registry`, OCI images built here and pushed with `skopeo`,
//!   a throwaway `containerd` for `ctr images pull` through a mirror.
//! * [`pki`]: a test CA and leaf certificates (rcgen) written as PEM files, for TLS tests.
//! * [`poll`]: waiting for a condition, daemon config files, scraping `/metrics`.
//! * [`fake_parent`]: a misbehaving parent that registers with the scheduler and serves
//!   corrupt pieces.
//!
//! The binaries under test (`manager`, `scheduler`, `dfdaemon`, `dfget`) are found next to the running
//! executable, see [`bin_path`].

pub mod cluster;
pub mod content;
pub mod fake_parent;
pub mod frames;
pub mod grpc;
pub mod manager;
pub mod origin;
pub mod pki;
pub mod poll;
pub mod registry;
pub mod s3;

pub use cluster::{Cluster, ClusterOptions, Daemon};
pub use content::Content;
pub use origin::Origin;

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Environment variable that, when set, names the directory holding the binaries under test
/// instead of the directory of the running executable.
pub const BIN_DIR_ENV: &str = "DAMSELFLY_BIN_DIR";

/// Directory holding the workspace binaries: `$DAMSELFLY_BIN_DIR` when set, otherwise the
/// directory of the running executable, or its parent when that is `deps/` (integration tests
/// run from `target/<profile>/deps/`, binaries live in `target/<profile>/`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of the workspace binary `name` (e.g. `"dfdaemon"`), or a clear error telling how to
/// build it when it is missing.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "binary `{name}` not found at {}; build them first: \
             cargo build --release --workspace --bins \
             (or set {BIN_DIR_ENV} to the directory holding them)",
            path.display()
        );
    }
    Ok(path)
}

/// Parses a byte size such as `1000000`, `64KiB`, `256MiB`, `10MB` or `1.5GiB` with the
/// project's one size parser, [`wire::size::parse_size`] (`K`/`KB` = 1000, `Ki`/`KiB` = 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    wire::size::parse_size(s).map_err(anyhow::Error::msg)
}

/// Formats a byte count for humans: `0 B`, `12.0 KiB`, `256.0 MiB`, `1.50 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000000").expect("ok"), 1_000_000);
        assert_eq!(parse_size("64MiB").expect("ok"), 64 << 20);
        assert_eq!(parse_size("1GiB").expect("ok"), 1 << 30);
        assert_eq!(parse_size("1 gib").expect("ok"), 1 << 30);
        assert_eq!(parse_size("256M").expect("ok"), 256_000_000);
        assert_eq!(parse_size("10MB").expect("ok"), 10_000_000);
        assert_eq!(parse_size("0").expect("ok"), 0);
        assert_eq!(parse_size("1.5KiB").expect("ok"), 1536);
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(256 << 20), "256 MiB");
    }
}
