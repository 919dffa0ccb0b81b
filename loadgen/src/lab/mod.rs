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
mod phase;
mod procs;
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
use phase::*;
use procs::*;
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
