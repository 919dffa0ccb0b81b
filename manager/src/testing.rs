//! Test helpers: a throwaway Postgres cluster in a temporary directory.
//!
//! [`PgCluster::start`] uses Debian's `postgresql` package (`/usr/lib/postgresql/*/bin/initdb`
//! and `pg_ctl`): it initialises a cluster in a fresh directory, starts it on a free port on
//! 127.0.0.1 with its Unix socket in that directory, and stops it (`pg_ctl stop -m
//! immediate`) and removes the directory on drop. As root, the server runs as the `postgres`
//! user (else `nobody`) through `runuser`, since Postgres refuses to run as root. When the
//! binaries are missing it returns `Ok(None)` so that tests can skip with a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A running throwaway Postgres server.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    port: u16,
}

/// Directory of the newest installed Postgres binaries, if any.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// uid and gid of a user from `/etc/passwd`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl PgCluster {
    /// Starts a cluster; `Ok(None)` when Postgres is not installed (the caller skips with
    /// `needs::skip`, which fails in strict mode).
    pub fn start() -> Result<Option<Self>, String> {
        let Some(bin) = postgres_bin_dir() else {
            return Ok(None);
        };
        let run_as = if is_root() {
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|u| user_ids(u).is_some())
                .ok_or("running as root and no postgres or nobody user to run Postgres as")?;
            Some(user.to_owned())
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "damselfly-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let mut cluster = Self {
            dir,
            bin,
            run_as,
            port: 0,
        };
        if let Some(user) = &cluster.run_as {
            let (uid, gid) = user_ids(user).ok_or("user vanished")?;
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", cluster.dir.display()))?;
        }
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let mut last = String::new();
        for _ in 0..3 {
            cluster.port = free_port().map_err(|e| e.to_string())?;
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
                cluster.port,
                path_str(&cluster.dir)?
            );
            let log = cluster.dir.join("server.log");
            match cluster.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data)?,
                    "-l",
                    path_str(&log)?,
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ) {
                Ok(()) => return Ok(Some(cluster)),
                Err(e) => last = e,
            }
        }
        Err(format!("pg_ctl start failed: {last}"))
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// TCP port of the server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database of this cluster (user `postgres`, trust auth).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh database named `name` and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, String> {
        use sqlx::Connection as _;
        use sqlx::Executor as _;
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad database name {name:?}"));
        }
        let mut conn = sqlx::postgres::PgConnection::connect(&self.url("postgres"))
            .await
            .map_err(|e| e.to_string())?;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(self.url(name))
    }
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("non-UTF-8 path {}", p.display()))
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if let Some(data) = data.to_str() {
            let _ = self.run("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
