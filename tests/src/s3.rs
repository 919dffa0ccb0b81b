//! A real S3-protocol server for the object-storage tests: `s3s-fs` (crates.io; installed by
//! `scripts/test.sh` with `cargo install` into `~/.cache/damselfly-tools`), serving a
//! directory (a bucket is a subdirectory, an object a file below it) on loopback, with
//! signature-checked credentials. Its debug log has one `resolved route` line per request,
//! naming the operation and the object, which [`S3Server::gets_of`] counts.

use crate::cluster::{free_port, wait_ready, Proc};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The server binary.
pub const S3_BIN: &str = "s3s-fs";
/// The access key the server accepts.
pub const ACCESS_KEY: &str = "damselfly-test";
/// Its secret key.
pub const SECRET_KEY: &str = "damselfly-secret-key";

/// Where `s3s-fs` is: on `PATH`, or in `~/.cache/damselfly-tools/bin` (scripts/test.sh).
pub fn s3s_fs() -> Option<PathBuf> {
    crate::registry::which(S3_BIN).or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home)
            .join(".cache/damselfly-tools/bin")
            .join(S3_BIN);
        p.is_file().then_some(p)
    })
}

/// A running `s3s-fs`; killed on drop.
#[derive(Debug)]
pub struct S3Server {
    /// Its address.
    pub addr: SocketAddr,
    /// The directory it serves.
    pub root: PathBuf,
    /// The process (its log counts requests).
    pub proc: Proc,
}

impl S3Server {
    /// Starts `s3s-fs` serving `<dir>/s3-data` on a free port, with [`ACCESS_KEY`] and
    /// [`SECRET_KEY`], and waits until it accepts connections.
    pub async fn start(dir: &Path) -> Result<Self> {
        let bin = s3s_fs().context("s3s-fs not found (cargo install s3s-fs)")?;
        let root = dir.join("s3-data");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let args = [
            "--host".to_string(),
            addr.ip().to_string(),
            "--port".into(),
            addr.port().to_string(),
            "--access-key".into(),
            ACCESS_KEY.into(),
            "--secret-key".into(),
            SECRET_KEY.into(),
            root.display().to_string(),
        ];
        let proc = Proc::spawn(
            "s3s-fs",
            &bin,
            &args,
            dir.join("s3s-fs.log"),
            "s3s=debug,s3s_fs=debug",
        )?;
        wait_ready(&proc, Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await?;
        Ok(Self { addr, root, proc })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stores `data` as object `key` of `bucket` (creating the bucket).
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) -> Result<()> {
        let path = self.root.join(bucket).join(key);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))
    }

    /// `GetObject` requests of `key` (in any bucket) the server received so far.
    pub fn gets_of(&self, key: &str) -> Result<usize> {
        let log = std::fs::read_to_string(self.proc.log_path())
            .with_context(|| format!("reading {}", self.proc.log_path().display()))?;
        let needle = format!("key: \"{key}\"");
        Ok(log
            .lines()
            .filter(|l| {
                l.contains("resolved route") && l.contains("GetObject") && l.contains(&needle)
            })
            .count())
    }
}
