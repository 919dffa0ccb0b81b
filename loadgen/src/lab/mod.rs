//! `loadgen cluster`: the burst lab. Real processes (origin, scheduler, seed peer, one
//! dfdaemon per peer host) in their own network namespaces on a shaped bridge; all N dfget
//! start at once; then, over the same links, a BitTorrent swarm (opentracker, aria2c seeding
//! from the seed peer's host, N aria2c at once) and the same N hosts fetching the file with
//! plain HTTP (curl) from the origin. Completion times against T*, origin and seed bytes,
//! CPU, sha256 of every copy.

pub mod bittorrent;
pub mod fault;
pub mod net;
pub mod origin;
pub mod report;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::{RngCore as _, SeedableRng as _};
use sha2::Digest as _;

use net::{Host, Network, Qdisc};
use report::{Comparison, HostResult, Phase, Report, Traffic};

/// Options of `loadgen cluster`.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Peer hosts downloading at once (the origin, scheduler and seed peer come on top).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub hosts: u32,
    /// File size (e.g. 64MiB, 1GiB, 1000000).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub size: u64,
    /// Up and down rate of every peer host (tc syntax: 100mbit, 1gbit).
    #[arg(long, default_value = "100mbit", value_parser = net::parse_rate)]
    pub rate: u64,
    /// Up and down rate of the origin host.
    #[arg(long, default_value = "1gbit", value_parser = net::parse_rate)]
    pub origin_rate: u64,
    /// Up and down rate of the seed peer host (default: the peers' `--rate`, a seed on the
    /// same NIC class as everyone; `--seed-rate 1gbit` for a generous seed).
    #[arg(long, value_parser = net::parse_rate)]
    pub seed_rate: Option<u64>,
    /// Shaping qdisc.
    #[arg(long, value_enum, default_value = "tbf")]
    pub qdisc: Qdisc,
    /// TCP congestion control in every namespace (e.g. cubic, bbr, reno).
    #[arg(long)]
    pub congestion_control: Option<String>,
    /// Extra sysctl `key=value` set in every host namespace; repeatable.
    #[arg(long = "sysctl")]
    pub sysctls: Vec<String>,
    /// Piece length passed to dfget (bytes or 1MiB, ...; 0: the daemon's rule).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub piece_length: u64,
    /// Pass `--digest` to dfget, so the daemon hashes each copy before delivering it (its
    /// time counts in the completion time). Off by default: the lab hashes every copy itself
    /// after the burst, so the times measure distribution, not a hashing queue on 2 cores.
    #[arg(long)]
    pub dfget_digest: bool,
    /// `--threads` of every dfdaemon.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// YAML config given to every dfdaemon (`--config`).
    #[arg(long, value_name = "PATH")]
    pub daemon_config: Option<PathBuf>,
    /// YAML config of the scheduler (`--config`).
    #[arg(long, value_name = "PATH")]
    pub scheduler_config: Option<PathBuf>,
    /// Prefix of every namespace this run creates.
    #[arg(long, default_value = "dfly-")]
    pub prefix: String,
    /// Delete leftover namespaces with the prefix (from a crashed run) before starting.
    #[arg(long)]
    pub clean: bool,
    /// Directory holding dfdaemon, dfget and scheduler (default: this executable's).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Work directory (file, daemon data, logs, copies); default: a new one under /tmp.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Keep the work directory.
    #[arg(long)]
    pub keep: bool,
    /// Skip the plain-HTTP baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Skip the BitTorrent phase (opentracker and aria2c, installed with apt-get when
    /// missing).
    #[arg(long)]
    pub no_bittorrent: bool,
    /// Longest run of one phase, seconds (0: 20·T* + 60 for P2P and BitTorrent, 3× the
    /// expected HTTP time + 60 for the baseline).
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// `RUST_LOG` of the daemons and the scheduler.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Write the report as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write the completion CDF as SVG here.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// A fault during a P2P phase of its own, after the no-fault one (repeatable):
    /// `kill-seed@3s`, `stall-parent@2s` (SIGSTOP of the seed peer), `kill-scheduler@2s`,
    /// `restart-scheduler@2s`, `kill-peers:25%@3s`. Each phase fetches a new file; what was
    /// killed or stopped is started again (or continued) after it.
    #[arg(long = "fault", value_parser = fault::parse)]
    pub faults: Vec<fault::Fault>,
}

/// Parses `64MiB`, `1GiB`, `500KB`, `1000000` into bytes (the project's one size parser).
pub use wire::size::parse_size;

static STOP: AtomicBool = AtomicBool::new(false);

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted (Ctrl-C / SIGTERM); cleaning up");
    }
    Ok(())
}

/// Sets [`STOP`] on SIGINT or SIGTERM (the lab's loops check it and unwind, so that every
/// guard runs).
fn install_signal_handler() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let int = signal(SignalKind::interrupt());
                let term = signal(SignalKind::terminate());
                let (mut int, mut term) = match (int, term) {
                    (Ok(i), Ok(t)) => (i, t),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("[lab] signal received: stopping and cleaning up");
                STOP.store(true, Ordering::Relaxed);
            });
        })
        .context("starting the signal thread")?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("signal thread did not start")?
        .context("installing signal handlers")?;
    Ok(())
}

/// Child processes of the lab; killed (SIGKILL) and reaped on drop.
#[derive(Default)]
struct Procs {
    list: Vec<(String, Child, PathBuf)>,
    /// How each entry of `list` was started (same order), to start it again.
    specs: Vec<Spec>,
    /// Names of processes a fault stopped on purpose (not an error for [`Procs::check_alive`]).
    down: std::collections::HashSet<String>,
}

/// What [`Procs::spawn_in`] was given.
struct Spec {
    ns: String,
    program: PathBuf,
    args: Vec<String>,
    rust_log: String,
}

impl Procs {
    /// Starts `program args` inside namespace `ns` (`ip netns exec`, which execs, so the
    /// child's pid is the program's) with stdout and stderr in `log`.
    fn spawn_in(
        &mut self,
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        rust_log: &str,
    ) -> anyhow::Result<u32> {
        let child = Self::start(name, ns, program, args, &log, rust_log)?;
        let pid = child.id();
        self.list.push((name.to_string(), child, log));
        self.specs.push(Spec {
            ns: ns.to_string(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            rust_log: rust_log.to_string(),
        });
        Ok(pid)
    }

    fn start(
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        log: &Path,
        rust_log: &str,
    ) -> anyhow::Result<Child> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("cloning a log handle")?;
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group: a terminal's Ctrl-C reaches only the lab, which then kills
            // its children itself.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}: {}", program.display()))
    }

    fn position(&self, name: &str) -> anyhow::Result<usize> {
        self.list
            .iter()
            .position(|(n, _, _)| n == name)
            .with_context(|| format!("no lab process {name}"))
    }

    /// Process id of `name`.
    fn pid(&self, name: &str) -> anyhow::Result<u32> {
        Ok(self.list[self.position(name)?].1.id())
    }

    /// Sends `sig` (`STOP`, `CONT`) to `name` with kill(1).
    fn signal(&self, name: &str, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid(name)?;
        net::run("kill", &[&format!("-{sig}"), &pid.to_string()])
            .with_context(|| format!("kill -{sig} {name}"))?;
        Ok(())
    }

    /// Kills `name` (SIGKILL) on purpose: [`Procs::check_alive`] no longer minds it.
    fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.position(name)?;
        self.down.insert(name.to_string());
        let child = &mut self.list[i].1;
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Starts `name` again as it was started (killed first if it runs); its previous log is
    /// kept as `<log>.<k>`. Returns the new pid.
    fn respawn(&mut self, name: &str) -> anyhow::Result<u32> {
        let i = self.position(name)?;
        let _ = self.list[i].1.kill();
        let _ = self.list[i].1.wait();
        let log = self.list[i].2.clone();
        let mut k = 1;
        let kept = |k: usize| PathBuf::from(format!("{}.{k}", log.display()));
        while kept(k).exists() {
            k += 1;
        }
        std::fs::rename(&log, kept(k)).with_context(|| format!("keeping {}", log.display()))?;
        let sp = &self.specs[i];
        let child = Self::start(name, &sp.ns, &sp.program, &sp.args, &log, &sp.rust_log)?;
        let pid = child.id();
        self.list[i].1 = child;
        self.down.remove(name);
        Ok(pid)
    }

    /// Fails if any child has exited (but those a fault stopped).
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child, log) in &mut self.list {
            if self.down.contains(name.as_str()) {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited ({status}); last lines of {}:\n{}",
                    log.display(),
                    tail(log, 20)
                );
            }
        }
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.list {
            let _ = child.kill();
        }
        for (_, child, _) in &mut self.list {
            let _ = child.wait();
        }
    }
}

/// The work directory; removed on drop unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("[lab] kept {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("[lab] cleanup: removing {}: {e}", self.path.display());
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b[b.len().saturating_sub(64 << 10)..]).into_owned();
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

fn is_root() -> anyhow::Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(euid == "0")
}

/// CPU time (user + system) of a process, seconds.
fn proc_cpu(pid: u32, tck: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / tck)
}

/// Busy time of all cores from `/proc/stat`, seconds: (total busy, system, irq + softirq).
/// Total busy is everything but idle and iowait, other users of the machine included.
fn machine_cpu(tck: f64) -> Option<(f64, f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    Some((
        (total - v.get(3)? - v.get(4)?) / tck,
        v.get(2)? / tck,
        (v.get(5)? + v.get(6)?) / tck,
    ))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Writes `size` deterministic pseudo-random bytes to `path`; returns their sha256 (hex).
fn write_content(path: &Path, size: u64) -> anyhow::Result<String> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0xDA55_E1F1);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

fn file_sha256(path: &Path) -> anyhow::Result<String> {
    damselfly_common::file_sha256_hex(path).with_context(|| format!("hashing {}", path.display()))
}

/// Waits (bounded) until `ready()` holds, failing early if a lab process died.
fn wait_until(
    what: &str,
    timeout: Duration,
    procs: &mut Procs,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        check_stop()?;
        procs.check_alive()?;
        if Instant::now() >= deadline {
            bail!("{what}: not ready after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

/// Parses dfget's summary line: `from origin X B, seed peers Y B, peers Z B`.
fn parse_dfget_sources(text: &str) -> Option<(u64, u64, u64)> {
    let rest = &text[text.find("from origin ")? + "from origin ".len()..];
    let num = |s: &str| -> Option<(u64, usize)> {
        let end = s.find(|c: char| !c.is_ascii_digit())?;
        Some((s[..end].parse().ok()?, end))
    };
    let (o, _) = num(rest)?;
    let rest = &rest[rest.find("seed peers ")? + "seed peers ".len()..];
    let (s, _) = num(rest)?;
    let rest = &rest[rest.find(", peers ")? + ", peers ".len()..];
    let (p, _) = num(rest)?;
    Some((o, s, p))
}

/// A download command per peer: started together, polled until all end or the deadline.
struct Burst {
    host: String,
    child: Option<Child>,
    log: PathBuf,
    out: PathBuf,
    seconds: Option<f64>,
    error: Option<String>,
}

/// What a burst does once, `at` after its start (a fault).
type Hook<'a> = (Duration, &'a mut dyn FnMut() -> anyhow::Result<()>);

/// Starts every command at once and records when each one ends (10 ms resolution); runs
/// `hook` once at its time if the burst is still going.
fn run_burst(
    mut cmds: Vec<(String, Command, PathBuf, PathBuf)>,
    timeout: Duration,
    mut hook: Option<Hook<'_>>,
) -> anyhow::Result<Vec<Burst>> {
    let start = Instant::now();
    let mut runs = Vec::with_capacity(cmds.len());
    for (host, cmd, log, out) in &mut cmds {
        let file =
            std::fs::File::create(&*log).with_context(|| format!("creating {}", log.display()))?;
        let err = file.try_clone().context("cloning a log handle")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the download on {host}"))?;
        runs.push(Burst {
            host: host.clone(),
            child: Some(child),
            log: log.clone(),
            out: out.clone(),
            seconds: None,
            error: None,
        });
    }
    // The guard: whatever happens below, no download outlives this function.
    struct KillAll<'a>(&'a mut Vec<Burst>);
    impl Drop for KillAll<'_> {
        fn drop(&mut self) {
            for r in self.0.iter_mut() {
                if let Some(mut c) = r.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
    let guard = KillAll(&mut runs);
    let deadline = start + timeout;
    loop {
        let mut running = 0;
        for r in guard.0.iter_mut() {
            let Some(c) = r.child.as_mut() else { continue };
            match c.try_wait() {
                Ok(Some(status)) => {
                    r.seconds = Some(start.elapsed().as_secs_f64());
                    if !status.success() {
                        r.error = Some(format!("exited with {status}: {}", tail(&r.log, 3)));
                    }
                    r.child = None;
                }
                Ok(None) => running += 1,
                Err(e) => {
                    r.error = Some(format!("waiting: {e}"));
                    r.child = None;
                }
            }
        }
        if running == 0 {
            break;
        }
        if let Some((at, _)) = &hook {
            if start.elapsed() >= *at {
                if let Some((_, f)) = hook.take() {
                    f()?;
                }
            }
        }
        if Instant::now() >= deadline {
            for r in guard.0.iter_mut().filter(|r| r.child.is_some()) {
                r.error = Some(format!("not done after {timeout:?}"));
            }
            break;
        }
        check_stop()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(guard);
    Ok(runs)
}

/// Checks every finished copy's sha256 (two threads), deleting each copy afterwards unless
/// `keep`.
/// Verifies each run's copy and makes its result row, for a phase whose client says nothing
/// about where its bytes came from (BitTorrent, plain HTTP).
fn verified_results(runs: &[Burst], sha: &str, keep: bool) -> Vec<HostResult> {
    runs.iter()
        .zip(verify(runs, sha, keep))
        .map(|(r, (ok, err))| HostResult {
            host: r.host.clone(),
            seconds: r.seconds,
            verified: ok,
            error: err,
            from_origin: None,
            from_seed: None,
            from_peers: None,
        })
        .collect()
}

fn verify(runs: &[Burst], sha: &str, keep: bool) -> Vec<(bool, Option<String>)> {
    let check = |r: &Burst| -> (bool, Option<String>) {
        if let Some(e) = &r.error {
            return (false, Some(e.clone()));
        }
        let res = match file_sha256(&r.out) {
            Ok(got) if got == sha => (true, None),
            Ok(got) => (false, Some(format!("sha256 {got}, expected {sha}"))),
            Err(e) => (false, Some(format!("{e:#}"))),
        };
        if !keep {
            let _ = std::fs::remove_file(&r.out);
        }
        res
    };
    let half = runs.len().div_ceil(2);
    let (a, b) = runs.split_at(half);
    std::thread::scope(|s| {
        let h = s.spawn(|| b.iter().map(check).collect::<Vec<_>>());
        let mut out: Vec<_> = a.iter().map(check).collect();
        match h.join() {
            Ok(rest) => out.extend(rest),
            Err(_) => out.extend(b.iter().map(|_| (false, Some("verifier panicked".into())))),
        }
        out
    })
}

/// Runs the lab and prints/writes its report.
pub fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let report = run(&args)?;
    print!("{}", report.table());
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, report.svg()).with_context(|| format!("writing {}", p.display()))?;
    }
    // The HTTP baseline may fail (an origin too slow for the timeout says so in the table);
    // P2P and the BitTorrent reference it is compared with may not.
    for (phase, what) in [
        ("p2p", "P2P"),
        ("bittorrent", "BitTorrent"),
        ("fault:", "fault"),
    ] {
        let failed: usize = report
            .phases
            .iter()
            .filter(|p| p.name == phase || (phase == "fault:" && p.name.starts_with(phase)))
            .map(|p| p.hosts.len() - p.verified)
            .sum();
        if failed > 0 {
            bail!("{failed} {what} copies missing or not verified");
        }
    }
    Ok(())
}

fn cpu_snapshot(pids: &[(String, u32)], tck: f64) -> Vec<(String, f64)> {
    let mut by_role: Vec<(String, f64)> = Vec::new();
    for (role, pid) in pids {
        let c = proc_cpu(*pid, tck).unwrap_or(0.0);
        match by_role.iter_mut().find(|(r, _)| r == role) {
            Some((_, v)) => *v += c,
            None => by_role.push((role.clone(), c)),
        }
    }
    let (busy, system, irq) = machine_cpu(tck).unwrap_or_default();
    by_role.push(("machine".into(), busy));
    by_role.push(("machine_system".into(), system));
    by_role.push(("machine_softirq".into(), irq));
    by_role
}

fn cpu_delta(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    after
        .iter()
        .map(|(k, v)| {
            let b = before
                .iter()
                .find(|(kb, _)| kb == k)
                .map_or(0.0, |(_, x)| *x);
            // A process killed during the phase reads 0 at its end: no negative time.
            (k.clone(), (v - b).max(0.0))
        })
        .collect()
}

fn run(a: &ClusterArgs) -> anyhow::Result<Report> {
    if !is_root()? {
        bail!("the lab creates network namespaces and needs root (run it with sudo)");
    }
    if a.size == 0 {
        bail!("--size must be positive");
    }
    let bin_dir = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("executable without a directory")?
            .to_path_buf(),
    };
    let bin = |name: &str| -> anyhow::Result<PathBuf> {
        let p = bin_dir.join(name);
        if !p.is_file() {
            bail!(
                "{} not found; build it first (cargo build --release -p damselfly-cli -p damselfly-scheduler -p damselfly-loadgen) or pass --bin-dir",
                p.display()
            );
        }
        Ok(p)
    };
    let (dfdaemon, dfget, scheduler) = (bin("dfdaemon")?, bin("dfget")?, bin("scheduler")?);
    let loadgen = std::env::current_exe().context("locating this executable")?;
    net::run("ip", &["-V"]).context("iproute2 (`ip`) is needed")?;
    if !a.no_baseline {
        net::run("curl", &["--version"])
            .context("curl is needed for the HTTP baseline (or pass --no-baseline)")?;
    }
    if !a.no_bittorrent {
        // curl asks the tracker whether the seeder has announced itself.
        bittorrent::ensure_tools(&[
            ("aria2c", "aria2"),
            ("opentracker", "opentracker"),
            ("curl", "curl"),
        ])?;
    }
    install_signal_handler()?;

    let leftovers = net::namespaces_with_prefix(&a.prefix)?;
    if !leftovers.is_empty() {
        if !a.clean {
            bail!(
                "leftover namespaces from an earlier run: {} — pass --clean to delete them (or use another --prefix)",
                leftovers.join(" ")
            );
        }
        eprintln!("[lab] deleting leftovers: {}", leftovers.join(" "));
        for ns in &leftovers {
            net::delete_namespace(ns);
        }
    }

    let dir_path = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("damselfly-lab-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir_path)
        .with_context(|| format!("creating {}", dir_path.display()))?;
    let work = WorkDir {
        path: dir_path,
        keep: a.keep,
    };
    let dir = work.path.clone();
    let file = dir.join("file.bin");
    eprintln!("[lab] writing {} bytes of content ...", a.size);
    let sha = write_content(&file, a.size)?;

    let n = a.hosts as usize;
    let seed_rate = a.seed_rate.unwrap_or(a.rate);
    let mut hosts = vec![
        Host {
            name: "origin".into(),
            ns: format!("{}origin", a.prefix),
            ip: Ipv4Addr::new(10, 200, 0, 2),
            up_bps: a.origin_rate,
            down_bps: a.origin_rate,
        },
        Host {
            name: "scheduler".into(),
            ns: format!("{}sched", a.prefix),
            ip: Ipv4Addr::new(10, 200, 0, 3),
            up_bps: 0,
            down_bps: 0,
        },
        Host {
            name: "seed".into(),
            ns: format!("{}seed", a.prefix),
            ip: Ipv4Addr::new(10, 200, 0, 4),
            up_bps: seed_rate,
            down_bps: seed_rate,
        },
    ];
    for i in 0..n {
        hosts.push(Host {
            name: format!("peer-{}", i + 1),
            ns: format!("{}p{}", a.prefix, i + 1),
            ip: Ipv4Addr::new(10, 200, 1 + (i / 200) as u8, 1 + (i % 200) as u8),
            up_bps: a.rate,
            down_bps: a.rate,
        });
    }
    let mut sysctls = a.sysctls.clone();
    if let Some(cc) = &a.congestion_control {
        sysctls.push(format!("net.ipv4.tcp_congestion_control={cc}"));
    }
    eprintln!("[lab] creating {} namespaces ...", hosts.len() + 1);
    // Declared before the processes: dropped after them (locals drop in reverse order).
    let network = Network::create(&a.prefix, hosts, a.qdisc, &sysctls)?;
    let mut procs = Procs::default();
    let h = |name: &str| -> anyhow::Result<Host> {
        network
            .hosts
            .iter()
            .find(|h| h.name == name)
            .cloned()
            .with_context(|| format!("no host {name}"))
    };
    let (origin, sched, seed) = (h("origin")?, h("scheduler")?, h("seed")?);
    let peers: Vec<Host> = network.hosts[3..].to_vec();
    let ready = Duration::from_secs(30);
    let mut pids: Vec<(String, u32)> = Vec::new();
    // The process name of each entry of `pids` (a restarted process gets its new pid).
    let mut pid_names: Vec<String> = Vec::new();

    // Origin.
    let origin_addr = format!("{}:8080", origin.ip);
    let log = dir.join("origin.log");
    let pid = procs.spawn_in(
        "origin",
        &origin.ns,
        &loadgen,
        &[
            "lab-origin".into(),
            "--file".into(),
            file.display().to_string(),
            "--listen".into(),
            origin_addr.clone(),
        ],
        log.clone(),
        &a.log,
    )?;
    pids.push(("origin".into(), pid));
    pid_names.push("origin".to_string());
    wait_until("origin", ready, &mut procs, || {
        log_contains(&log, "listening on")
    })?;

    // Scheduler.
    let sched_addr = format!("{}:8002", sched.ip);
    let sched_metrics = format!("{}:9090", sched.ip);
    let mut sargs = vec![
        "--listen".to_string(),
        sched_addr.clone(),
        "--metrics".to_string(),
        sched_metrics.clone(),
    ];
    if let Some(c) = &a.scheduler_config {
        sargs.extend(["--config".into(), c.display().to_string()]);
    }
    let log = dir.join("scheduler.log");
    let pid = procs.spawn_in(
        "scheduler",
        &sched.ns,
        &scheduler,
        &sargs,
        log.clone(),
        &a.log,
    )?;
    pids.push(("scheduler".into(), pid));
    pid_names.push("scheduler".to_string());
    wait_until("scheduler", ready, &mut procs, || {
        log_contains(&log, "scheduler listening on")
    })?;

    // Daemons.
    let mut daemons: Vec<(Host, PathBuf, PathBuf)> = Vec::new();
    for host in std::iter::once(&seed).chain(peers.iter()) {
        let hdir = dir.join(&host.name);
        let data = hdir.join("data");
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let socket = hdir.join("dfdaemon.sock");
        let mut dargs: Vec<String> = Vec::new();
        if host.name == "seed" {
            dargs.push("--seed".into());
        }
        dargs.extend([
            "--scheduler".into(),
            sched_addr.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--data-port".into(),
            "4005".into(),
            "--ip".into(),
            host.ip.to_string(),
            "--host-id".into(),
            host.name.clone(),
            "--metrics".into(),
            String::new(),
            "--threads".into(),
            a.threads.to_string(),
        ]);
        if let Some(c) = &a.daemon_config {
            dargs.extend(["--config".into(), c.display().to_string()]);
        }
        let log = hdir.join("dfdaemon.log");
        let pid = procs.spawn_in(&host.name, &host.ns, &dfdaemon, &dargs, log.clone(), &a.log)?;
        pids.push((
            if host.name == "seed" {
                "seed"
            } else {
                "daemons"
            }
            .into(),
            pid,
        ));
        pid_names.push(host.name.clone());
        daemons.push((host.clone(), socket, log));
    }
    for (host, socket, log) in &daemons {
        wait_until(&host.name, ready, &mut procs, || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
                && log_contains(log, "announced host")
        })?;
    }
    eprintln!("[lab] {} daemons ready", daemons.len());

    let bytes_per_s = |bps: u64| bps as f64 / 8.0;
    let t_star = report::t_star(
        a.size,
        bytes_per_s(a.origin_rate),
        &vec![bytes_per_s(a.rate); n],
        &vec![bytes_per_s(a.rate); n],
    );
    let tck = clock_ticks();
    let url = format!("http://{origin_addr}/file.bin");
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    // P2P burst.
    let p2p_timeout = if a.timeout > 0 {
        Duration::from_secs(a.timeout)
    } else {
        Duration::from_secs_f64(20.0 * t_star + 60.0)
    };
    let meter = Meter {
        network: &network,
        origin: &origin,
        origin_addr: &origin_addr,
        seed: &seed,
    };
    let p2p_run = P2pRun {
        daemons: &daemons,
        dfget: &dfget,
        out_dir: &out_dir,
        timeout: p2p_timeout,
        piece_length: a.piece_length,
        meter: &meter,
        t_star,
        size: a.size,
        sha: &sha,
        keep: a.keep,
        tck,
    };
    eprintln!("[lab] P2P: {n} dfget at once (T* = {t_star:.2} s) ...");
    let p2p = p2p_run.phase("p2p", &url, &pids, &[], None)?;
    procs.check_alive()?;
    let mut phases = vec![p2p];
    let mut fault_rows = Vec::new();
    for (i, f) in a.faults.iter().enumerate() {
        let victims: Vec<String> = peers[peers.len() - f.peers_killed(n)..]
            .iter()
            .map(|h| h.name.clone())
            .collect();
        let furl = format!("http://{origin_addr}/fault-{}.bin", i + 1);
        eprintln!("[lab] fault phase {}: {} ...", i + 1, f.spec);
        let phase = {
            let procs = &mut procs;
            let victims = &victims;
            let mut act = || -> anyhow::Result<()> {
                eprintln!("[lab] fault: {}", f.spec);
                match f.kind {
                    fault::FaultKind::KillSeed => procs.kill("seed"),
                    fault::FaultKind::StallParent => procs.signal("seed", "STOP"),
                    fault::FaultKind::KillScheduler => procs.kill("scheduler"),
                    fault::FaultKind::RestartScheduler => {
                        procs.kill("scheduler")?;
                        procs.respawn("scheduler").map(|_| ())
                    }
                    fault::FaultKind::KillPeers(_) => {
                        for v in victims {
                            procs.kill(v)?;
                        }
                        Ok(())
                    }
                }
            };
            p2p_run.phase(
                &format!("fault:{}", f.spec),
                &furl,
                &pids,
                victims,
                Some((f.at, &mut act)),
            )?
        };
        // Back to a whole cluster for the next phase.
        let mut restarted: Vec<String> = Vec::new();
        match f.kind {
            fault::FaultKind::StallParent => procs.signal("seed", "CONT")?,
            fault::FaultKind::KillSeed => restarted.push("seed".into()),
            fault::FaultKind::KillScheduler => restarted.push("scheduler".into()),
            fault::FaultKind::RestartScheduler => {}
            fault::FaultKind::KillPeers(_) => restarted.extend(victims.iter().cloned()),
        }
        for name in &restarted {
            let pid = procs.respawn(name)?;
            if let Some(e) = pids.iter_mut().zip(&pid_names).find(|(_, nm)| *nm == name) {
                e.0 .1 = pid;
            }
        }
        if restarted.iter().any(|r| r == "scheduler")
            || f.kind == fault::FaultKind::RestartScheduler
        {
            let log = dir.join("scheduler.log");
            wait_until("scheduler", ready, &mut procs, || {
                log_contains(&log, "scheduler listening on")
            })?;
        }
        for (host, socket, log) in &daemons {
            if restarted.contains(&host.name) {
                wait_until(&host.name, ready, &mut procs, || {
                    std::os::unix::net::UnixStream::connect(socket).is_ok()
                        && log_contains(log, "announced host")
                })?;
            }
        }
        // Every host announced to the scheduler again (a stopped or restarted one may have
        // been dropped), so the next phase starts from a whole swarm.
        let want = daemons.len() as u64;
        wait_until(
            "every host announced to the scheduler again",
            ready,
            &mut procs,
            || scheduler_hosts(&sched, &sched_metrics) == Some(want),
        )?;
        procs.check_alive()?;
        let no_fault = phases[0].max_s;
        fault_rows.push(fault::FaultRow {
            fault: f.spec.clone(),
            killed: victims.clone(),
            surviving: phase.hosts.len(),
            verified: phase.verified,
            max_s: phase.max_s,
            max_vs_no_fault: phase.max_s / no_fault,
            origin_copies_payload: phase.origin_copies_payload,
        });
        phases.push(phase);
    }

    if !a.no_bittorrent {
        eprintln!("[lab] BitTorrent: {n} aria2c at once, seeded from the seed peer's host ...");
        let bt = bittorrent::Swarm {
            meter: &meter,
            tracker: &sched,
            peers: &peers,
            dir: &dir,
            file: &file,
            pids: &pids,
            tck,
            log: &a.log,
        };
        let mut ran = true;
        let phase = match bt.run(&mut procs, p2p_timeout) {
            Ok(phase) => phase,
            Err(e) => {
                ran = false;
                // Ctrl-C unwinds the whole lab; any other failure of the phase is reported
                // as the phase's (every host failed), so that the P2P numbers are not lost.
                check_stop()?;
                procs.check_alive()?;
                eprintln!("[lab] BitTorrent phase failed: {e:#}");
                let err = format!("BitTorrent phase failed: {e:#}");
                bittorrent::PhaseRun::failed(&peers, &err)
            }
        };
        let hosts_bt = verified_results(&phase.runs, &sha, a.keep);
        check_stop()?;
        let bt = Phase::new(
            "bittorrent",
            hosts_bt,
            t_star,
            a.size,
            phase.traffic,
            phase.cpu_s,
        );
        // (A phase that did not run said why once, above.)
        for hr in bt.hosts.iter().filter(|h| ran && h.error.is_some()) {
            eprintln!(
                "[lab] bittorrent {}: {}",
                hr.host,
                hr.error.as_deref().unwrap_or("")
            );
        }
        phases.push(bt);
    }

    if !a.no_baseline {
        let expected = (n as f64 * a.size as f64 / bytes_per_s(a.origin_rate))
            .max(a.size as f64 / bytes_per_s(a.rate));
        let http_timeout = if a.timeout > 0 {
            Duration::from_secs(a.timeout)
        } else {
            Duration::from_secs_f64(3.0 * expected + 60.0)
        };
        let cmds: Vec<_> = peers
            .iter()
            .map(|host| {
                let out = out_dir.join(format!("{}.http", host.name));
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &host.ns, "curl", "-sS", "--fail", "-o"])
                    .arg(&out)
                    .arg("--max-time")
                    .arg(http_timeout.as_secs().to_string())
                    .arg(&url);
                (
                    host.name.clone(),
                    c,
                    out_dir.join(format!("{}.curl.log", host.name)),
                    out,
                )
            })
            .collect();
        eprintln!("[lab] HTTP baseline: {n} curl at once ...");
        let before = meter.counters()?;
        let cpu0 = cpu_snapshot(&pids, tck);
        let runs = run_burst(cmds, http_timeout, None)?;
        let cpu1 = cpu_snapshot(&pids, tck);
        let traffic = meter.counters()?.since(&before);
        let hosts_http = verified_results(&runs, &sha, a.keep);
        check_stop()?;
        let http = Phase::new(
            "http",
            hosts_http,
            t_star,
            a.size,
            traffic,
            cpu_delta(&cpu0, &cpu1),
        );
        phases.push(http);
    }
    let read_cfg = |p: &Option<PathBuf>| p.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    let report = Report {
        hosts: n,
        size: a.size,
        rate_bps: a.rate,
        origin_rate_bps: a.origin_rate,
        seed_rate_bps: seed_rate,
        piece_length: a.piece_length,
        qdisc: format!("{:?}", a.qdisc).to_lowercase(),
        t_star_s: t_star,
        bittorrent_piece_length: (!a.no_bittorrent).then_some(bittorrent::PIECE_LENGTH),
        p2p_vs_bittorrent: Comparison::of(&phases),
        phases,
        faults: fault_rows,
        daemon_config: read_cfg(&a.daemon_config),
        scheduler_config: read_cfg(&a.scheduler_config),
    };
    // Processes die before their namespaces go, then the work dir.
    drop(procs);
    drop(network);
    drop(work);
    Ok(report)
}

/// What every P2P phase (the no-fault one and each fault's) runs with.
struct P2pRun<'a> {
    daemons: &'a [(Host, PathBuf, PathBuf)],
    dfget: &'a Path,
    out_dir: &'a Path,
    timeout: Duration,
    piece_length: u64,
    meter: &'a Meter<'a>,
    t_star: f64,
    size: u64,
    sha: &'a str,
    keep: bool,
    tck: f64,
}

impl P2pRun<'_> {
    /// One dfget of `url` per peer host, all at once (`hook` at its time); the result rows
    /// of every host but those in `excluded` (killed by a fault), each copy verified.
    fn phase(
        &self,
        name: &str,
        url: &str,
        pids: &[(String, u32)],
        excluded: &[String],
        hook: Option<Hook<'_>>,
    ) -> anyhow::Result<Phase> {
        let suffix: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cmds: Vec<_> = self.daemons[1..]
            .iter()
            .map(|(host, socket, _)| {
                let out = self.out_dir.join(format!("{}.{suffix}", host.name));
                let mut c = Command::new(self.dfget);
                c.arg(url)
                    .arg("-O")
                    .arg(&out)
                    .arg("--endpoint")
                    .arg(socket)
                    .arg("--timeout")
                    .arg(format!("{}s", self.timeout.as_secs()))
                    .arg("--no-progress")
                    .arg("--piece-length")
                    .arg(self.piece_length.to_string());
                (
                    host.name.clone(),
                    c,
                    self.out_dir
                        .join(format!("{}.{suffix}.dfget.log", host.name)),
                    out,
                )
            })
            .collect();
        let before = self.meter.counters()?;
        let cpu0 = cpu_snapshot(pids, self.tck);
        let mut runs = run_burst(cmds, self.timeout, hook)?;
        let cpu1 = cpu_snapshot(pids, self.tck);
        let traffic = self.meter.counters()?.since(&before);
        runs.retain(|r| !excluded.contains(&r.host));
        let checks = verify(&runs, self.sha, self.keep);
        check_stop()?;
        let hosts: Vec<HostResult> = runs
            .iter()
            .zip(checks)
            .map(|(r, (ok, err))| {
                let src = std::fs::read_to_string(&r.log)
                    .ok()
                    .and_then(|t| parse_dfget_sources(&t));
                HostResult {
                    host: r.host.clone(),
                    seconds: r.seconds,
                    verified: ok,
                    error: err,
                    from_origin: src.map(|s| s.0),
                    from_seed: src.map(|s| s.1),
                    from_peers: src.map(|s| s.2),
                }
            })
            .collect();
        let phase = Phase::new(
            name,
            hosts,
            self.t_star,
            self.size,
            traffic,
            cpu_delta(&cpu0, &cpu1),
        );
        for hr in phase.hosts.iter().filter(|h| h.error.is_some()) {
            eprintln!(
                "[lab] {name} {}: {}",
                hr.host,
                hr.error.as_deref().unwrap_or("")
            );
        }
        Ok(phase)
    }
}

/// Where a phase's bytes are counted: the origin's and the seed peer's links, and the
/// origin server's own count.
struct Meter<'a> {
    network: &'a Network,
    origin: &'a Host,
    origin_addr: &'a str,
    seed: &'a Host,
}

/// Byte counters at one instant (see [`Meter`]).
struct Counters {
    served: Option<u64>,
    origin_tx: u64,
    seed_tx: u64,
}

impl Meter<'_> {
    /// Reads every counter now.
    fn counters(&self) -> anyhow::Result<Counters> {
        Ok(Counters {
            origin_tx: self.network.tx_bytes(self.origin)?,
            seed_tx: self.network.tx_bytes(self.seed)?,
            served: origin_served(self.origin, self.origin_addr),
        })
    }
}

impl Counters {
    /// The bytes counted from `before` until `self`.
    fn since(&self, before: &Self) -> Traffic {
        Traffic {
            origin_link: self.origin_tx.saturating_sub(before.origin_tx),
            origin_payload: self
                .served
                .zip(before.served)
                .map(|(b, a)| b.saturating_sub(a)),
            seed_link: self.seed_tx.saturating_sub(before.seed_tx),
        }
    }
}

/// Hosts the scheduler knows now (its `damselfly_scheduler_hosts` gauge, fetched with curl
/// inside its namespace); `None` when that fails.
fn scheduler_hosts(sched: &Host, addr: &str) -> Option<u64> {
    let url = format!("http://{addr}/metrics");
    let text = net::run(
        "ip",
        &[
            "netns",
            "exec",
            &sched.ns,
            "curl",
            "-sS",
            "--max-time",
            "5",
            &url,
        ],
    )
    .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("damselfly_scheduler_hosts "))
        .and_then(|v| v.trim().parse().ok())
}

/// Body bytes the origin has served so far (its `/_stats`, fetched with curl inside the
/// origin's namespace); `None` when that fails.
fn origin_served(origin: &Host, addr: &str) -> Option<u64> {
    let url = format!("http://{addr}/{}", origin::STATS_PATH);
    let text = net::run(
        "ip",
        &[
            "netns",
            "exec",
            &origin.ns,
            "curl",
            "-sS",
            "--max-time",
            "5",
            &url,
        ],
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("bytes")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("5MB"), Ok(5_000_000));
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn dfget_summary() {
        let line = "dfget: /x (10 bytes) in 0.10s, 0.1 MB/s; from origin 0 B, seed peers 4 B, peers 6 B; task abc";
        assert_eq!(parse_dfget_sources(line), Some((0, 4, 6)));
    }
}
