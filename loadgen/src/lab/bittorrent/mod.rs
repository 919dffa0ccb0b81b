//! The lab's BitTorrent phase: the same file, the same hosts and links, distributed by a
//! plain BitTorrent swarm instead of Damselfly — opentracker in the scheduler's namespace,
//! aria2c seeding the complete file on the seed peer's host and aria2c downloading on every
//! peer host at once. The reference the P2P phase is judged against when the source's uplink
//! is no faster than a peer's.
//!
//! Here: installing the tools, their command lines, and
//! [`Swarm::run`], which runs the phase inside the lab's namespaces; bencode and the
//! `.torrent` are in [`torrent`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use super::net::Host;
use super::report::Traffic;
use super::{check_stop, cpu_delta, cpu_snapshot, tail, wait_until, Burst, Meter, Procs};

/// Piece length of the lab's torrents: 256 KiB, what mktorrent and most clients pick for
/// files of tens to hundreds of MiB (and the piece length of the lab notes' BitTorrent runs).
pub const PIECE_LENGTH: u64 = 256 << 10;

/// TCP (and UDP) port of the tracker, in the scheduler's namespace.
pub const TRACKER_PORT: u16 = 6969;

/// Port every aria2c listens on for peer connections (one per namespace, so one number).
pub const LISTEN_PORT: u16 = 6881;

mod torrent;

pub use torrent::{scrape_complete, Torrent};

/// Whether `program` is on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            let p = d.join(program);
            p.is_file()
        })
    })
}

/// Makes sure every `(program, Debian package)` is installed, installing the missing ones
/// with `apt-get` (the lab runs as root): first as the package lists are, then once more
/// after `apt-get update`. Fails naming the package that could not be had.
pub fn ensure_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(prog, _)| !on_path(prog))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names = missing.join(" ");
    if !on_path("apt-get") {
        bail!(
            "the BitTorrent phase needs the Debian package(s) {names}, which are not installed, and there is no apt-get to install them: install them (or pass --no-bittorrent)"
        );
    }
    eprintln!("[lab] installing {names} (apt-get) for the BitTorrent phase ...");
    let install = || -> anyhow::Result<()> {
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("running apt-get install")?;
        if !out.status.success() {
            bail!(
                "apt-get install {names} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    if install().is_err() {
        let update = Command::new("apt-get")
            .args(["update", "-q"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !update.is_ok_and(|s| s.success()) {
            eprintln!("[lab] apt-get update failed; trying the install anyway");
        }
        install().with_context(|| {
            format!(
                "could not install the Debian package(s) {names} for the BitTorrent phase (pass --no-bittorrent to skip it)"
            )
        })?;
    }
    for (prog, pkg) in tools {
        if !on_path(prog) {
            bail!("package {pkg} installed, but {prog} is still not on PATH");
        }
    }
    Ok(())
}

/// Options every aria2c of the lab gets: the tracker is the only way to find peers (no DHT,
/// PEX or local peer discovery), no rate limits, no file allocation, no disk cache (what
/// the hook reports as done is in the file), seeding forever (until the lab stops it), and
/// it listens on [`LISTEN_PORT`] (all the namespace's addresses: its 10.200.x.x and lo).
pub fn aria2_common_args(dir: &Path, log: &Path, lab_pid: u32) -> Vec<String> {
    [
        format!("--dir={}", dir.display()),
        "--enable-dht=false".into(),
        "--enable-dht6=false".into(),
        "--enable-peer-exchange=false".into(),
        "--bt-enable-lpd=false".into(),
        "--disable-ipv6=true".into(),
        format!("--listen-port={LISTEN_PORT}"),
        "--max-overall-upload-limit=0".into(),
        "--max-upload-limit=0".into(),
        "--max-overall-download-limit=0".into(),
        "--max-download-limit=0".into(),
        "--file-allocation=none".into(),
        "--disk-cache=0".into(),
        "--seed-ratio=0.0".into(),
        "--bt-tracker-connect-timeout=10".into(),
        "--bt-tracker-timeout=10".into(),
        "--summary-interval=0".into(),
        "--console-log-level=warn".into(),
        format!("--log={}", log.display()),
        "--log-level=notice".into(),
        // Stops by itself should the lab die without killing it.
        format!("--stop-with-process={lab_pid}"),
    ]
    .into()
}

/// Writes the hook aria2c runs when its download is complete (before seeding): it writes
/// the wall-clock time (`date +%s.%N`) to `done`, atomically (a temp file renamed).
pub fn write_done_hook(hook: &Path, done: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = done.with_extension("tmp");
    if done.display().to_string().contains('\'') {
        bail!(
            "{}: a path with a single quote cannot go into the hook script",
            done.display()
        );
    }
    let script = format!(
        "#!/bin/sh\ndate +%s.%N > '{}' && mv '{}' '{}'\n",
        tmp.display(),
        tmp.display(),
        done.display()
    );
    std::fs::write(hook, script).with_context(|| format!("writing {}", hook.display()))?;
    std::fs::set_permissions(hook, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", hook.display()))?;
    Ok(())
}

/// Reads the time a done hook wrote (seconds since the epoch); `None` until it exists.
pub fn read_done(done: &Path) -> anyhow::Result<Option<f64>> {
    match std::fs::read_to_string(done) {
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .map(Some)
            .with_context(|| format!("{}: not a time: {text:?}", done.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", done.display())),
    }
}

/// Files of one peer host in the phase: its download dir, copy, log, hook and done file.
#[derive(Debug, Clone)]
pub struct PeerFiles {
    /// aria2c's `--dir`.
    pub dir: PathBuf,
    /// The copy (`dir/<torrent name>`).
    pub copy: PathBuf,
    /// aria2c's log.
    pub log: PathBuf,
    /// The download-complete hook.
    pub hook: PathBuf,
    /// Where the hook writes the completion time.
    pub done: PathBuf,
}

impl PeerFiles {
    /// The files of host `host` under `base`, for a torrent named `name`.
    pub fn new(base: &Path, host: &str, name: &str) -> Self {
        let dir = base.join(host);
        Self {
            copy: dir.join(name),
            log: base.join(format!("{host}.aria2.log")),
            hook: base.join(format!("{host}.hook.sh")),
            done: base.join(format!("{host}.done")),
            dir,
        }
    }
}

/// Runs `curl URL` inside namespace `ns` and returns the raw body (the tracker's answers are
/// binary).
fn curl_in(ns: &str, url: &str) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "2", url])
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "curl {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The BitTorrent phase of one lab run: where it runs and what it measures with.
pub(super) struct Swarm<'a> {
    /// Byte counters (origin's and seed host's links); the seeder runs on `meter.seed`.
    pub meter: &'a Meter<'a>,
    /// The host the tracker runs on (the scheduler's, unshaped).
    pub tracker: &'a Host,
    /// The downloading hosts.
    pub peers: &'a [Host],
    /// The lab's work directory.
    pub dir: &'a Path,
    /// The complete file (the seeder serves it in place).
    pub file: &'a Path,
    /// The lab's processes whose CPU time is reported.
    pub pids: &'a [(String, u32)],
    /// Clock ticks per second (`/proc` CPU times).
    pub tck: f64,
    /// `RUST_LOG` (passed on like to every lab process; aria2c ignores it).
    pub log: &'a str,
}

/// What the phase measured: per host its completion (or error), bytes and CPU time.
pub(super) struct PhaseRun {
    /// Per peer host, in the order of `Swarm::peers`; copies not yet verified.
    pub runs: Vec<Burst>,
    /// Bytes the origin's and the seed host's links sent during the phase.
    pub traffic: Traffic,
    /// CPU seconds per role during the phase.
    pub cpu_s: Vec<(String, f64)>,
}

impl PhaseRun {
    /// A phase that could not run: every host failed with `error`.
    pub fn failed(peers: &[Host], error: &str) -> Self {
        Self {
            runs: peers
                .iter()
                .map(|h| Burst {
                    host: h.name.clone(),
                    child: None,
                    log: PathBuf::new(),
                    out: PathBuf::new(),
                    seconds: None,
                    error: Some(error.to_string()),
                })
                .collect(),
            traffic: Traffic::default(),
            cpu_s: Vec::new(),
        }
    }
}

impl Swarm<'_> {
    /// Runs the phase: tracker, seeder, then every peer's aria2c at once; each peer's
    /// completion is the time its done hook wrote. Everything keeps seeding until every
    /// peer is done or `timeout` passed; then all of it is killed. Fails when the tracker
    /// or the seeder cannot be started or dies; a lab process dying or Ctrl-C fail too
    /// (the caller tells them apart).
    pub fn run(&self, main: &mut Procs, timeout: Duration) -> anyhow::Result<PhaseRun> {
        let base = self.dir.join("bt");
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let name = self
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .context("the content file has no UTF-8 name")?;
        let tracker_ip = self.tracker.ip;
        let announce = format!("http://{tracker_ip}:{TRACKER_PORT}/announce");
        let torrent = Torrent::make(self.file, name, &announce, PIECE_LENGTH)?;
        eprintln!(
            "[lab] torrent {} in {} KiB pieces, tracker {announce}",
            torrent.info_hash_hex(),
            torrent.piece_length >> 10
        );
        let torrent_path = base.join(format!("{name}.torrent"));
        std::fs::write(&torrent_path, &torrent.bytes)
            .with_context(|| format!("writing {}", torrent_path.display()))?;
        // Debian's opentracker serves whitelisted torrents only. It chroots into its -d
        // directory before reading the whitelist, so the list's path is inside it.
        let tracker_dir = base.join("tracker");
        std::fs::create_dir_all(&tracker_dir)
            .with_context(|| format!("creating {}", tracker_dir.display()))?;
        let whitelist = tracker_dir.join("whitelist.txt");
        std::fs::write(&whitelist, format!("{}\n", torrent.info_hash_hex()))
            .with_context(|| format!("writing {}", whitelist.display()))?;

        let mut procs = Procs::default();
        let mut pids = self.pids.to_vec();
        let lab_pid = std::process::id();
        let port = TRACKER_PORT.to_string();
        let pid = procs.spawn_in(
            "opentracker",
            &self.tracker.ns,
            Path::new("opentracker"),
            &[
                "-i".into(),
                tracker_ip.to_string(),
                "-p".into(),
                port.clone(),
                "-P".into(),
                port,
                "-d".into(),
                tracker_dir.display().to_string(),
                "-w".into(),
                "/whitelist.txt".into(),
            ],
            base.join("opentracker.log"),
            self.log,
        )?;
        pids.push(("tracker".into(), pid));

        // The seeder: the complete file in place, hashed once (--check-integrity), then
        // seeding.
        let seed_dir = self
            .file
            .parent()
            .context("the content file has no directory")?;
        let mut args = aria2_common_args(seed_dir, &base.join("seed.aria2.log"), lab_pid);
        args.push("--check-integrity=true".into());
        args.push(torrent_path.display().to_string());
        let pid = procs.spawn_in(
            "aria2c seeder",
            &self.meter.seed.ns,
            Path::new("aria2c"),
            &args,
            base.join("seed.aria2.out"),
            self.log,
        )?;
        pids.push(("bt_seed".into(), pid));
        let scrape = format!(
            "http://{tracker_ip}:{TRACKER_PORT}/scrape?info_hash={}",
            torrent.info_hash_urlencoded()
        );
        let mut last = String::from("no answer yet");
        let mut next_try = Instant::now();
        // Hashing runs at ≥ 100 MB/s even on a busy core.
        let ready = Duration::from_secs(30 + torrent_len(self.file)? / 100_000_000);
        let seeded = wait_until("the BitTorrent seeder", ready, &mut procs, || {
            if Instant::now() < next_try {
                return false;
            }
            next_try = Instant::now() + Duration::from_millis(200);
            match curl_in(&self.meter.seed.ns, &scrape)
                .and_then(|a| scrape_complete(&a, &torrent.info_hash))
            {
                Ok(n) if n >= 1 => true,
                Ok(n) => {
                    last = format!("tracker counts {n} seeders");
                    false
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            }
        });
        seeded.with_context(|| format!("waiting for the tracker to list the seeder: {last}"))?;

        let files: Vec<PeerFiles> = self
            .peers
            .iter()
            .map(|h| PeerFiles::new(&base, &h.name, name))
            .collect();
        for f in &files {
            std::fs::create_dir_all(&f.dir)
                .with_context(|| format!("creating {}", f.dir.display()))?;
            write_done_hook(&f.hook, &f.done)?;
        }
        let before = self.meter.counters()?;
        let cpu0 = cpu_snapshot(&pids, self.tck);
        let start_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock before 1970")?
            .as_secs_f64();
        let start = Instant::now();
        let first_peer = procs.list.len();
        for (h, f) in self.peers.iter().zip(&files) {
            let mut args = aria2_common_args(&f.dir, &f.log, lab_pid);
            args.push(format!("--on-bt-download-complete={}", f.hook.display()));
            args.push(torrent_path.display().to_string());
            let pid = procs.spawn_in(
                &format!("aria2c on {}", h.name),
                &h.ns,
                Path::new("aria2c"),
                &args,
                base.join(format!("{}.aria2.out", h.name)),
                self.log,
            )?;
            pids.push(("bt_peers".into(), pid));
        }
        let mut runs: Vec<Burst> = self
            .peers
            .iter()
            .zip(&files)
            .map(|(h, f)| Burst {
                host: h.name.clone(),
                child: None,
                log: f.log.clone(),
                out: f.copy.clone(),
                seconds: None,
                error: None,
            })
            .collect();
        let deadline = start + timeout;
        loop {
            let mut pending = 0;
            for (i, (r, f)) in runs.iter_mut().zip(&files).enumerate() {
                if r.seconds.is_some() || r.error.is_some() {
                    continue;
                }
                let done = |r: &mut Burst| match read_done(&f.done) {
                    Ok(Some(t)) => {
                        r.seconds = Some((t - start_epoch).max(0.0));
                        true
                    }
                    Ok(None) => false,
                    Err(e) => {
                        r.error = Some(format!("{e:#}"));
                        true
                    }
                };
                if done(r) {
                    continue;
                }
                let (_, child, out) = &mut procs.list[first_peer + i];
                if let Ok(Some(status)) = child.try_wait() {
                    // It may have finished just before exiting: look once more.
                    if !done(r) {
                        r.error = Some(format!(
                            "aria2c exited ({status}) before its download was complete: {}",
                            tail(out, 3)
                        ));
                    }
                    continue;
                }
                pending += 1;
            }
            if pending == 0 {
                break;
            }
            if Instant::now() >= deadline {
                for r in runs
                    .iter_mut()
                    .filter(|r| r.seconds.is_none() && r.error.is_none())
                {
                    r.error = Some(format!("not done after {timeout:?}"));
                }
                break;
            }
            check_stop()?;
            main.check_alive()?;
            for (what, child, out) in &mut procs.list[..first_peer] {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{what} exited ({status}) mid-phase; last lines of {}:\n{}",
                        out.display(),
                        tail(out, 10)
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cpu1 = cpu_snapshot(&pids, self.tck);
        let traffic = self.meter.counters()?.since(&before);
        // The phase is over: every aria2c (all of them still seeding) and the tracker go.
        drop(procs);
        Ok(PhaseRun {
            runs,
            traffic,
            cpu_s: cpu_delta(&cpu0, &cpu1),
        })
    }
}

fn torrent_len(file: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(file)
        .with_context(|| format!("reading the size of {}", file.display()))?
        .len())
}
