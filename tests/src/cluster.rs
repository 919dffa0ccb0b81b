//! A local Damselfly cluster of real processes on loopback.
//!
//! [`Cluster::start`] starts (optionally) a `manager`, one or more `scheduler`s, then seed
//! peers and peers (`dfdaemon`), each with its own directory under one temp dir, its own
//! socket and free ports, and its stdout/stderr in `<name>.log` in that directory. With a
//! manager, schedulers register with it and daemons get `--manager` (and, unless
//! [`ClusterOptions::static_schedulers`] is off, the static `--scheduler` list as fallback). Every process is killed when the cluster is dropped,
//! also while unwinding from a panic; a panicking test gets the tail of every log printed on
//! stderr, so a failure shows what the daemons said.

use crate::bin_path;
use crate::content::{file_sha256_hex_async, Content};
use crate::grpc;
use crate::manager::{ManagerOptions, ManagerProc};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use wire::proto::dfdaemon::StatsResponse;

/// Lines of each log printed by [`Cluster::dump_logs`] and on panic.
pub const LOG_TAIL_LINES: usize = 40;

/// How a [`Cluster`] is made.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of seed peers (`dfdaemon --seed`).
    pub seeds: usize,
    /// Number of ordinary peers.
    pub peers: usize,
    /// `--threads` of every daemon.
    pub threads: usize,
    /// Longest wait for a process to become ready.
    pub ready_timeout: Duration,
    /// Longest run of one `dfget`.
    pub dfget_timeout: Duration,
    /// `RUST_LOG` for the processes; `None` uses the caller's `RUST_LOG`, or `info`.
    pub rust_log: Option<String>,
    /// Extra arguments appended to every `dfdaemon` command line.
    pub daemon_args: Vec<String>,
    /// Print progress ("starting scheduler ... ready") on stderr.
    pub verbose: bool,
    /// Number of schedulers (`scheduler-1`, …; at least 1).
    pub schedulers: usize,
    /// Start a manager (SQLite in the temp dir) that schedulers register with and daemons
    /// use (`--manager`).
    pub manager: Option<ManagerOptions>,
    /// Give daemons the schedulers' addresses with `--scheduler` (with a manager: as a
    /// fallback; without one this must stay on).
    pub static_schedulers: bool,
    /// Daemons' `manager.refresh_interval` (how often they ask for their schedulers).
    pub manager_refresh: Duration,
    /// Give every daemon a registry mirror proxy on a free port (`--proxy`).
    pub proxy: bool,
    /// YAML appended to every daemon's generated `dfdaemon.yaml` (top-level sections other
    /// than `manager:`, e.g. `data_plane:\n  verify_pieces: false\n`); empty: none.
    pub daemon_yaml: String,
    /// Extra arguments appended to every `scheduler` command line (e.g. `--config`).
    pub scheduler_args: Vec<String>,
}

impl ClusterOptions {
    /// The defaults with `seeds` seed peers and `peers` ordinary peers.
    pub fn sized(seeds: usize, peers: usize) -> Self {
        Self {
            seeds,
            peers,
            ..Self::default()
        }
    }
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            seeds: 1,
            peers: 3,
            threads: 1,
            ready_timeout: Duration::from_secs(20),
            dfget_timeout: Duration::from_secs(60),
            rust_log: None,
            daemon_args: Vec::new(),
            daemon_yaml: String::new(),
            verbose: false,
            schedulers: 1,
            manager: None,
            static_schedulers: true,
            manager_refresh: Duration::from_millis(500),
            proxy: false,
            scheduler_args: Vec::new(),
        }
    }
}

/// A child process with its log file; killed (and reaped) on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Proc {
    /// Starts `program args` with its stdout and stderr in `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        rust_log: &str,
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cloning log {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("RUST_BACKTRACE", "1")
            // Plain logs in the files (tracing-subscriber honours NO_COLOR).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| {
                format!("starting {name}: {} {}", program.display(), args.join(" "))
            })?;
        Ok(Self {
            name: name.to_string(),
            log,
            child: Mutex::new(Some(child)),
        })
    }

    /// Name of the process in this cluster (`scheduler`, `seed-1`, `peer-2`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the file receiving its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// OS process id, while it has not been killed.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        match self.child.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// `None` while the process runs; its exit description once it has exited (or was killed).
    pub fn exit_status(&self) -> Option<String> {
        let mut g = self.lock();
        match g.as_mut() {
            None => Some("killed by the test".to_string()),
            Some(c) => match c.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(status.to_string()),
                Err(e) => Some(format!("unknown ({e})")),
            },
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Kills the process (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&self) {
        if let Some(mut c) = self.lock().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process (SIGKILL) and starts `program args` in its place, under the same
    /// name and log path; the previous log is kept as `<log>.<k>`.
    pub fn respawn(&self, program: &Path, args: &[String], rust_log: &str) -> Result<()> {
        self.kill();
        let mut k = 1;
        let kept = |k: usize| PathBuf::from(format!("{}.{k}", self.log.display()));
        while kept(k).exists() {
            k += 1;
        }
        std::fs::rename(&self.log, kept(k))
            .with_context(|| format!("keeping {}", self.log.display()))?;
        let new = Self::spawn(&self.name, program, args, self.log.clone(), rust_log)?;
        let child = new.lock().take();
        *self.lock() = child;
        Ok(())
    }

    /// Sends signal `sig` (`STOP`, `CONT`, `TERM`, ...) to the process with kill(1).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.name))?;
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !st.success() {
            bail!("kill -{sig} {pid} ({}) failed: {st}", self.name);
        }
        Ok(())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Last `lines` lines of the file at `path` (reads at most its last 256 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let start = len.saturating_sub(256 << 10);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// One `dfdaemon` of the cluster.
#[derive(Debug)]
pub struct Daemon {
    /// Name in the cluster and `--host-id`: `seed-1`, `peer-1`, ...
    pub name: String,
    /// Whether it runs with `--seed`.
    pub seed: bool,
    /// Its directory (holding `data/`, the socket and nothing else of other processes).
    pub dir: PathBuf,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// `--socket`: the local gRPC API.
    pub socket: PathBuf,
    /// Data-plane address (`127.0.0.1:--data-port`).
    pub data_addr: SocketAddr,
    /// `--metrics` address.
    pub metrics_addr: SocketAddr,
    /// `--proxy` address (the registry mirror), when [`ClusterOptions::proxy`] is on.
    pub proxy_addr: Option<SocketAddr>,
    /// The process.
    pub proc: Proc,
}

impl Daemon {
    /// Its counters via the local API.
    pub async fn stats(&self) -> Result<StatsResponse> {
        grpc::daemon_stats(&self.socket)
            .await
            .with_context(|| format!("Stats of {}", self.name))
    }

    /// Kills the daemon (SIGKILL).
    pub fn kill(&self) {
        self.proc.kill();
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }
}

/// One `scheduler` of the cluster.
#[derive(Debug)]
pub struct SchedulerProc {
    /// gRPC address (`127.0.0.1:<port>`).
    pub addr: SocketAddr,
    /// Prometheus endpoint (`--metrics`).
    pub metrics_addr: SocketAddr,
    /// The process (named `scheduler`, or `scheduler-<n>` when there are several).
    pub proc: Proc,
}

/// A running cluster: an optional manager, schedulers, seed peers, peers. Dropping it kills
/// them all and removes the temp dir (unless [`Cluster::keep_dir`] was called).
pub struct Cluster {
    opts: ClusterOptions,
    tmp: Option<TempDir>,
    root: PathBuf,
    rust_log: String,
    manager: Option<ManagerProc>,
    schedulers: Vec<SchedulerProc>,
    seeds: Vec<Daemon>,
    peers: Vec<Daemon>,
}

/// First and one-past-last port [`free_port`] hands out: below Linux's default ephemeral
/// range (32768–60999), so no outgoing connection of a parallel test can take a port
/// between the moment it is handed out and the moment its process binds it (that race made
/// a manager fail with "Address already in use").
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1 for a process the test starts. Ports come from
/// [`TEST_PORTS`] in turn, starting at an offset derived from the process id (test
/// binaries run one after another), each checked by binding it (and, for QUIC, its UDP
/// twin) and then released; a port is never handed out twice by one test process.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let start = (std::process::id().wrapping_mul(2_654_435_761)) % span;
        let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        // i < span ≤ u16::MAX, so the sum stays in the range.
        let port = TEST_PORTS.start + i as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {TEST_PORTS:?} on 127.0.0.1")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Cluster {
    /// Starts the manager (if any), the schedulers, then all seed peers and peers, and waits
    /// until each is ready (manager: `/healthy` answers; scheduler: its TCP port accepts, and
    /// with a manager it is listed active there; daemon: its Unix socket and data port
    /// accept).
    pub async fn start(opts: ClusterOptions) -> Result<Self> {
        let scheduler_bin = bin_path("scheduler")?;
        bin_path("dfdaemon")?;
        if opts.manager.is_some() {
            bin_path("manager")?;
        } else if !opts.static_schedulers {
            bail!("without a manager, daemons need the static scheduler list");
        }
        let tmp = tempfile::Builder::new()
            .prefix("damselfly-")
            .tempdir()
            .context("creating the cluster temp dir")?;
        let root = tmp.path().to_path_buf();
        let rust_log = opts
            .rust_log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok())
            .unwrap_or_else(|| "info".to_string());

        let started = Instant::now();
        let timeout = opts.ready_timeout;
        let mut cluster = Self {
            opts,
            tmp: Some(tmp),
            root,
            rust_log,
            manager: None,
            schedulers: Vec::new(),
            seeds: Vec::new(),
            peers: Vec::new(),
        };
        if let Some(mopts) = cluster.opts.manager.clone() {
            let m = ManagerProc::spawn(&cluster.root, &mopts, &cluster.rust_log)?;
            if cluster.opts.verbose {
                eprintln!(
                    "[demo] starting manager (gRPC {}, REST http://{}, SQLite {}) ...",
                    m.grpc_addr,
                    m.rest_addr,
                    cluster.root.join("manager.db").display()
                );
            }
            // Kept in the cluster before waiting, so that a failure still kills it.
            let m = cluster.manager.insert(m);
            m.wait_ready(timeout).await?;
            if cluster.opts.verbose {
                eprintln!("[demo] manager ready after {:.1?}", started.elapsed());
            }
        }
        let count = cluster.opts.schedulers.max(1);
        for i in 1..=count {
            let name = if count == 1 {
                "scheduler".to_string()
            } else {
                format!("scheduler-{i}")
            };
            let addr = loopback(free_port()?);
            if cluster.opts.verbose {
                eprintln!("[demo] starting {name} on {addr} ...");
            }
            let metrics_addr = loopback(free_port()?);
            let mut args = vec![
                "--listen".to_string(),
                addr.to_string(),
                "--metrics".to_string(),
                metrics_addr.to_string(),
            ];
            if let Some(m) = &cluster.manager {
                args.extend(["--manager".to_string(), m.grpc_addr.to_string()]);
            }
            args.extend(cluster.opts.scheduler_args.iter().cloned());
            let proc = Proc::spawn(
                &name,
                &scheduler_bin,
                &args,
                cluster.root.join(format!("{name}.log")),
                &cluster.rust_log,
            )?;
            cluster.schedulers.push(SchedulerProc {
                addr,
                metrics_addr,
                proc,
            });
        }
        for s in &cluster.schedulers {
            let addr = s.addr;
            wait_ready(&s.proc, timeout, || async move {
                tokio::net::TcpStream::connect(addr).await.is_ok()
            })
            .await?;
        }
        if let Some(m) = &cluster.manager {
            m.rest().wait_active_schedulers(count, timeout).await?;
        }
        if cluster.opts.verbose {
            eprintln!(
                "[demo] {count} scheduler(s) ready{} after {:.1?}",
                if cluster.manager.is_some() {
                    " and registered with the manager"
                } else {
                    ""
                },
                started.elapsed()
            );
        }
        if cluster.has_daemon_config() {
            let path = cluster.root.join("dfdaemon.yaml");
            let mut yaml = String::new();
            if cluster.manager.is_some() {
                yaml = format!(
                    "manager:\n  refresh_interval: {}ms\n  config_wait: 10s\n",
                    cluster.opts.manager_refresh.as_millis()
                );
            }
            yaml.push_str(&cluster.opts.daemon_yaml);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        }

        for i in 1..=cluster.opts.seeds {
            let d = cluster.spawn_daemon(&format!("seed-{i}"), true)?;
            cluster.seeds.push(d);
        }
        for i in 1..=cluster.opts.peers {
            let d = cluster.spawn_daemon(&format!("peer-{i}"), false)?;
            cluster.peers.push(d);
        }
        let daemons: Vec<&Daemon> = cluster.seeds.iter().chain(cluster.peers.iter()).collect();
        for d in daemons {
            wait_daemon(d, timeout).await?;
            if cluster.opts.verbose {
                eprintln!(
                    "[demo] {} ready after {:.1?} (data port {}, socket {})",
                    d.name,
                    started.elapsed(),
                    d.data_addr.port(),
                    d.socket.display()
                );
            }
        }
        Ok(cluster)
    }

    /// Kills scheduler number `n` (SIGKILL, counting from 1) and starts it again on the same
    /// ports with the same arguments (an empty state: a restart), then waits until its port
    /// accepts. Takes `&self`, so downloads borrowing the cluster may run meanwhile. The
    /// previous log is kept as `<name>.log.<k>`.
    pub async fn restart_scheduler(&self, n: usize) -> Result<()> {
        let i = n.checked_sub(1).context("schedulers count from 1")?;
        let s = self.schedulers.get(i).context("no such scheduler")?;
        let mut args = vec![
            "--listen".to_string(),
            s.addr.to_string(),
            "--metrics".to_string(),
            s.metrics_addr.to_string(),
        ];
        if let Some(m) = &self.manager {
            args.extend(["--manager".to_string(), m.grpc_addr.to_string()]);
        }
        args.extend(self.opts.scheduler_args.iter().cloned());
        s.proc
            .respawn(&bin_path("scheduler")?, &args, &self.rust_log)?;
        let addr = s.addr;
        wait_ready(&s.proc, self.opts.ready_timeout, || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await
    }

    /// Starts one more ordinary peer (named `peer-<n+1>`) and waits until it is ready.
    pub async fn add_peer(&mut self) -> Result<&Daemon> {
        let name = format!("peer-{}", self.peers.len() + 1);
        let d = self.spawn_daemon(&name, false)?;
        wait_daemon(&d, self.opts.ready_timeout).await?;
        self.peers.push(d);
        self.peers.last().context("peer just added")
    }

    /// Kills peer number `n` (SIGKILL, counting from 1) and starts it again with the same
    /// name, host id and directory (so the same storage dir) on new ports, then waits until it
    /// is ready. The previous log is kept as `<name>.log.<k>`.
    pub async fn restart_peer(&mut self, n: usize) -> Result<&Daemon> {
        let i = n.checked_sub(1).context("peers count from 1")?;
        let name = self.peers.get(i).context("no such peer")?.name.clone();
        self.peers[i].kill();
        let log = self.root.join(format!("{name}.log"));
        let mut k = 1;
        while self.root.join(format!("{name}.log.{k}")).exists() {
            k += 1;
        }
        std::fs::rename(&log, self.root.join(format!("{name}.log.{k}")))
            .with_context(|| format!("keeping {}", log.display()))?;
        let d = self.spawn_daemon(&name, false)?;
        // The old entry is replaced (and its already-killed process dropped) before waiting,
        // so a failure still kills the new one.
        self.peers[i] = d;
        wait_daemon(&self.peers[i], self.opts.ready_timeout).await?;
        Ok(&self.peers[i])
    }

    /// Kills seed peer number `n` (SIGKILL, counting from 1) and starts it again like
    /// [`Cluster::restart_peer`] does a peer: same name, host id and storage dir, new ports.
    pub async fn restart_seed(&mut self, n: usize) -> Result<&Daemon> {
        let i = n.checked_sub(1).context("seeds count from 1")?;
        let name = self.seeds.get(i).context("no such seed")?.name.clone();
        self.seeds[i].kill();
        let log = self.root.join(format!("{name}.log"));
        let mut k = 1;
        while self.root.join(format!("{name}.log.{k}")).exists() {
            k += 1;
        }
        std::fs::rename(&log, self.root.join(format!("{name}.log.{k}")))
            .with_context(|| format!("keeping {}", log.display()))?;
        let d = self.spawn_daemon(&name, true)?;
        self.seeds[i] = d;
        wait_daemon(&self.seeds[i], self.opts.ready_timeout).await?;
        Ok(&self.seeds[i])
    }

    /// Starts one more daemon (`seed-<n+1>` or `peer-<n+1>`) with `extra` arguments appended
    /// to its command line (after the cluster's own and [`ClusterOptions::daemon_args`]), and
    /// waits until it is ready. Its directory `<dir>/<name>/data` may already exist (e.g. a
    /// mount point prepared by the test).
    pub async fn add_daemon(&mut self, seed: bool, extra: &[String]) -> Result<&Daemon> {
        let list = if seed { &self.seeds } else { &self.peers };
        let name = format!("{}-{}", if seed { "seed" } else { "peer" }, list.len() + 1);
        let d = self.spawn_daemon_with(&name, seed, extra)?;
        wait_daemon(&d, self.opts.ready_timeout).await?;
        let list = if seed {
            &mut self.seeds
        } else {
            &mut self.peers
        };
        list.push(d);
        list.last().context("daemon just added")
    }

    /// Whether the daemons get the generated `dfdaemon.yaml` (a manager's settings or
    /// [`ClusterOptions::daemon_yaml`]).
    fn has_daemon_config(&self) -> bool {
        self.manager.is_some() || !self.opts.daemon_yaml.is_empty()
    }

    fn spawn_daemon(&self, name: &str, seed: bool) -> Result<Daemon> {
        self.spawn_daemon_with(name, seed, &[])
    }

    fn spawn_daemon_with(&self, name: &str, seed: bool, extra: &[String]) -> Result<Daemon> {
        let dir = self.root.join(name);
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let socket = dir.join("dfdaemon.sock");
        let data_addr = loopback(free_port()?);
        let metrics_addr = loopback(free_port()?);
        let mut args: Vec<String> = Vec::new();
        if seed {
            args.push("--seed".into());
        }
        if self.opts.static_schedulers {
            for s in &self.schedulers {
                args.extend(["--scheduler".into(), s.addr.to_string()]);
            }
        }
        if let Some(m) = &self.manager {
            args.extend(["--manager".into(), m.grpc_addr.to_string()]);
        }
        if self.has_daemon_config() {
            args.extend([
                "--config".into(),
                self.root.join("dfdaemon.yaml").display().to_string(),
            ]);
        }
        args.extend([
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--data-port".into(),
            data_addr.port().to_string(),
            "--ip".into(),
            "127.0.0.1".into(),
            "--host-id".into(),
            name.to_string(),
            "--metrics".into(),
            metrics_addr.to_string(),
            "--threads".into(),
            self.opts.threads.to_string(),
        ]);
        let proxy_addr = if self.opts.proxy {
            let a = loopback(free_port()?);
            args.extend(["--proxy".into(), a.to_string()]);
            Some(a)
        } else {
            None
        };
        args.extend(self.opts.daemon_args.iter().cloned());
        args.extend(extra.iter().cloned());
        if self.opts.verbose {
            eprintln!("[demo] starting {name} ...");
        }
        let proc = Proc::spawn(
            name,
            &bin_path("dfdaemon")?,
            &args,
            self.root.join(format!("{name}.log")),
            &self.rust_log,
        )?;
        Ok(Daemon {
            name: name.to_string(),
            seed,
            dir,
            data_dir,
            socket,
            data_addr,
            metrics_addr,
            proxy_addr,
            proc,
        })
    }

    /// `--config` arguments for a daemon whose uploads are limited to `rate` (`"3MiB"`), so
    /// that a fault lands while it serves.
    pub fn slow_upload_config(&self, rate: &str) -> Result<Vec<String>> {
        crate::poll::daemon_config(
            self.dir(),
            &format!("slow-upload-{rate}.yaml"),
            &format!("data_plane:\n  upload_rate_limit: {rate}\n"),
        )
    }

    /// A cluster without seed peers where peer-1 (uploads limited to 3 MiB/s) holds the file
    /// `path` of `origin` (`size` bytes of content `seed`, fetched from the origin, checked)
    /// and peer-2 holds nothing: a parent that a fault can hit mid-transfer. Returns the
    /// cluster, the content and its URL.
    pub async fn with_slow_parent(
        origin: &crate::Origin,
        path: &str,
        size: u64,
        seed: u64,
    ) -> Result<(Self, Content, String)> {
        let mut cluster = Self::start(ClusterOptions::sized(0, 0)).await?;
        let slow = cluster.slow_upload_config("3MiB")?;
        cluster
            .add_daemon(false, &slow)
            .await
            .context("peer-1 (slow uploads)")?;
        cluster.add_daemon(false, &[]).await.context("peer-2")?;
        let content = origin.add_file(path, size, seed);
        let url = origin.url(path);
        cluster
            .download_verified(
                cluster.peer(1),
                &url,
                &cluster.dir().join("p1.out"),
                &content,
            )
            .await
            .context("download through peer-1")?;
        Ok((cluster, content, url))
    }

    /// A cluster without seed peers but seed-1, whose uploads are limited to 2 MiB/s (so
    /// that it stops or dies with pieces unsent), and peer-1 with the dfdaemon config
    /// `peer_yaml` (its timeouts, typically).
    pub async fn with_slow_seed_and_peer(peer_yaml: &str) -> Result<Self> {
        let mut cluster = Self::start(ClusterOptions::sized(0, 0)).await?;
        let slow = cluster.slow_upload_config("2MiB")?;
        let peer_cfg = crate::poll::daemon_config(cluster.dir(), "peer-1.yaml", peer_yaml)?;
        cluster.add_daemon(true, &slow).await.context("seed-1")?;
        cluster
            .add_daemon(false, &peer_cfg)
            .await
            .context("peer-1")?;
        Ok(cluster)
    }

    /// Waits (at most 30 s) until `peer` has received bytes from a seed peer, and returns the
    /// seed that serves it: one that has uploaded something.
    pub async fn serving_seed(&self, peer: &Daemon) -> Result<&Daemon> {
        crate::poll::wait_until(
            &format!("{} receives bytes from a seed", peer.name),
            Duration::from_secs(30),
            || async move { Ok(peer.stats().await?.bytes_from_seed > 0) },
        )
        .await?;
        let mut serving = None;
        for s in self.seeds() {
            if s.stats().await?.bytes_uploaded > 0 {
                serving = Some(s);
            }
        }
        serving.context("no seed uploaded anything")
    }

    /// The cluster's temp dir (logs, daemon dirs); a good place for dfget outputs.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Keeps the temp dir after the cluster is dropped and returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(t) = self.tmp.take() {
            let _ = t.keep();
        }
        self.root.clone()
    }

    /// Address of the (first) scheduler's gRPC server.
    pub fn scheduler_addr(&self) -> SocketAddr {
        self.schedulers[0].addr
    }

    /// The (first) scheduler process.
    pub fn scheduler(&self) -> &Proc {
        &self.schedulers[0].proc
    }

    /// Every scheduler, `scheduler-1` first.
    pub fn schedulers(&self) -> &[SchedulerProc] {
        &self.schedulers
    }

    /// The manager, when the cluster has one.
    pub fn manager(&self) -> Option<&ManagerProc> {
        self.manager.as_ref()
    }

    /// Kills the manager and starts it again on the same ports and database, then waits until
    /// it is ready.
    pub async fn restart_manager(&mut self) -> Result<()> {
        let timeout = self.opts.ready_timeout;
        let m = self
            .manager
            .as_mut()
            .context("the cluster has no manager")?;
        m.restart(&self.root, &self.rust_log)?;
        m.wait_ready(timeout).await
    }

    /// The seed peers, `seed-1` first.
    pub fn seeds(&self) -> &[Daemon] {
        &self.seeds
    }

    /// The ordinary peers, `peer-1` first.
    pub fn peers(&self) -> &[Daemon] {
        &self.peers
    }

    /// Peer number `n`, counting from 1 like the names (`peer(1)` is `peer-1`).
    pub fn peer(&self, n: usize) -> &Daemon {
        &self.peers[n - 1]
    }

    /// Seed peer number `n`, counting from 1.
    pub fn seed(&self, n: usize) -> &Daemon {
        &self.seeds[n - 1]
    }

    /// Kills a daemon of this cluster (SIGKILL); the others keep running.
    pub fn kill(&self, daemon: &Daemon) {
        daemon.kill();
    }

    /// Its counters via the local API.
    pub async fn stats(&self, daemon: &Daemon) -> Result<StatsResponse> {
        daemon.stats().await
    }

    /// Runs `dfget URL -O OUT --endpoint <daemon socket> [--digest D] [extra...]`, bounded by
    /// the cluster's `dfget_timeout` (a timeout is an error and kills dfget).
    pub async fn run_dfget_with(
        &self,
        daemon: &Daemon,
        url: &str,
        out: &Path,
        digest: Option<&str>,
        extra: &[&str],
    ) -> Result<Output> {
        let mut cmd = tokio::process::Command::new(bin_path("dfget")?);
        cmd.arg(url)
            .arg("-O")
            .arg(out)
            .arg("--endpoint")
            .arg(&daemon.socket);
        if let Some(d) = digest {
            cmd.arg("--digest").arg(d);
        }
        cmd.args(extra)
            .env("RUST_LOG", &self.rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let timeout = self.opts.dfget_timeout;
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(out) => out.with_context(|| format!("running dfget on {}", daemon.name)),
            Err(_) => bail!(
                "dfget {url} on {} did not finish within {timeout:?}",
                daemon.name
            ),
        }
    }

    /// Runs `dfcache ARGS... --endpoint <daemon socket>`, bounded by the cluster's
    /// `dfget_timeout` (a timeout is an error and kills dfcache).
    pub async fn run_dfcache(&self, daemon: &Daemon, args: &[&str]) -> Result<Output> {
        let mut cmd = tokio::process::Command::new(bin_path("dfcache")?);
        cmd.args(args)
            .arg("--endpoint")
            .arg(&daemon.socket)
            .env("RUST_LOG", &self.rust_log)
            .env("NO_COLOR", "1")
            .env_remove("DFCACHE_ENDPOINT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let timeout = self.opts.dfget_timeout;
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(out) => out.with_context(|| format!("running dfcache on {}", daemon.name)),
            Err(_) => bail!(
                "dfcache {args:?} on {} did not finish within {timeout:?}",
                daemon.name
            ),
        }
    }

    /// Runs `dfget URL -O OUT` through `daemon`, with `--digest` when given.
    pub async fn run_dfget(
        &self,
        daemon: &Daemon,
        url: &str,
        out: &Path,
        digest: Option<&str>,
    ) -> Result<Output> {
        self.run_dfget_with(daemon, url, out, digest, &[]).await
    }

    /// Downloads `url` through `daemon` into `out` with `--digest` of `content`, and checks
    /// that dfget exited 0 and that the file's sha256 matches `content` (computed here too).
    pub async fn download_verified(
        &self,
        daemon: &Daemon,
        url: &str,
        out: &Path,
        content: &Content,
    ) -> Result<()> {
        let expected = content.sha256_hex();
        let o = self
            .run_dfget(daemon, url, out, Some(&format!("sha256:{expected}")))
            .await?;
        check_dfget(&daemon.name, &o)?;
        let got = file_sha256_hex_async(out).await?;
        if got != expected {
            bail!(
                "dfget on {} exited 0 but {} has sha256 {got}, expected {expected}",
                daemon.name,
                out.display()
            );
        }
        Ok(())
    }

    /// Every process of the cluster: manager, schedulers, seed peers, peers.
    pub fn procs(&self) -> Vec<&Proc> {
        self.manager
            .iter()
            .map(|m| &m.proc)
            .chain(self.schedulers.iter().map(|s| &s.proc))
            .chain(self.seeds.iter().map(|d| &d.proc))
            .chain(self.peers.iter().map(|d| &d.proc))
            .collect()
    }

    /// The last `lines` lines of every process's log, with a heading per process.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for p in self.procs() {
            let state = p.exit_status().unwrap_or_else(|| "running".to_string());
            s.push_str(&format!(
                "===== {} ({state}) {} =====\n{}\n",
                p.name(),
                p.log_path().display(),
                p.log_tail(lines)
            ));
        }
        s
    }

    /// Prints [`Cluster::log_tails`] on stderr.
    pub fn dump_logs(&self) {
        eprintln!("{}", self.log_tails(LOG_TAIL_LINES));
    }

    /// Kills every process now (also done on drop).
    pub fn shutdown(&self) {
        for p in self.procs().into_iter().rev() {
            p.kill();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test failed; log tails of the cluster in {}:",
                self.root.display()
            );
            self.dump_logs();
        }
        self.shutdown();
    }
}

/// Polls `ready` every 50 ms until it holds; fails when `proc` exits first or after
/// `timeout`, with the tail of its log.
pub async fn wait_ready<F, Fut>(proc: &Proc, timeout: Duration, mut ready: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if ready().await {
            return Ok(());
        }
        if let Some(status) = proc.exit_status() {
            bail!(
                "{} exited ({status}) before becoming ready; last lines of {}:\n{}",
                proc.name(),
                proc.log_path().display(),
                proc.log_tail(LOG_TAIL_LINES)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} not ready within {timeout:?}; last lines of {}:\n{}",
                proc.name(),
                proc.log_path().display(),
                proc.log_tail(LOG_TAIL_LINES)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_daemon(d: &Daemon, timeout: Duration) -> Result<()> {
    let socket = d.socket.clone();
    let data = d.data_addr;
    let proxy = d.proxy_addr;
    wait_ready(&d.proc, timeout, || {
        let socket = socket.clone();
        async move {
            tokio::net::UnixStream::connect(&socket).await.is_ok()
                && tokio::net::TcpStream::connect(data).await.is_ok()
                && match proxy {
                    Some(p) => tokio::net::TcpStream::connect(p).await.is_ok(),
                    None => true,
                }
        }
    })
    .await
}

/// Turns a finished `dfget` into an error unless it exited 0, with its stderr in the message.
pub fn check_dfget(who: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "dfget on {who} failed ({}):\nstderr: {}\nstdout: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}
