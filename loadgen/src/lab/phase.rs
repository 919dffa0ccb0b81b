//! One phase of the lab: a download command per peer started together and polled to the end
//! ([`Burst`]), every copy verified, and what each P2P phase runs with ([`P2pRun`]),
//! including the origin's and the scheduler's counters read between phases.

use super::*;

/// A download command per peer: started together, polled until all end or the deadline.
pub(super) struct Burst {
    pub(super) host: String,
    pub(super) child: Option<Child>,
    pub(super) log: PathBuf,
    pub(super) out: PathBuf,
    pub(super) seconds: Option<f64>,
    pub(super) error: Option<String>,
}

/// What a burst does once, `at` after its start (a fault).
type Hook<'a> = (Duration, &'a mut dyn FnMut() -> anyhow::Result<()>);

/// Starts every command at once and records when each one ends (10 ms resolution); runs
/// `hook` once at its time if the burst is still going.
pub(super) fn run_burst(
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
pub(super) fn verified_results(runs: &[Burst], sha: &str, keep: bool) -> Vec<HostResult> {
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

pub(super) fn verify(runs: &[Burst], sha: &str, keep: bool) -> Vec<(bool, Option<String>)> {
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

/// What every P2P phase (the no-fault one and each fault's) runs with.
pub(super) struct P2pRun<'a> {
    pub(super) daemons: &'a [(Host, PathBuf, PathBuf)],
    pub(super) dfget: &'a Path,
    pub(super) out_dir: &'a Path,
    pub(super) timeout: Duration,
    pub(super) piece_length: u64,
    pub(super) meter: &'a Meter<'a>,
    pub(super) t_star: f64,
    pub(super) size: u64,
    pub(super) sha: &'a str,
    pub(super) keep: bool,
    pub(super) tck: f64,
}

impl P2pRun<'_> {
    /// One dfget of `url` per peer host, all at once (`hook` at its time); the result rows
    /// of every host but those in `excluded` (killed by a fault), each copy verified.
    pub(super) fn phase(
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
pub(super) struct Meter<'a> {
    pub(super) network: &'a Network,
    pub(super) origin: &'a Host,
    pub(super) origin_addr: &'a str,
    pub(super) seed: &'a Host,
}

/// Byte counters at one instant (see [`Meter`]).
pub(super) struct Counters {
    pub(super) served: Option<u64>,
    pub(super) origin_tx: u64,
    pub(super) seed_tx: u64,
}

impl Meter<'_> {
    /// Reads every counter now.
    pub(super) fn counters(&self) -> anyhow::Result<Counters> {
        Ok(Counters {
            origin_tx: self.network.tx_bytes(self.origin)?,
            seed_tx: self.network.tx_bytes(self.seed)?,
            served: origin_served(self.origin, self.origin_addr),
        })
    }
}

impl Counters {
    /// The bytes counted from `before` until `self`.
    pub(super) fn since(&self, before: &Self) -> Traffic {
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
pub(super) fn scheduler_hosts(sched: &Host, addr: &str) -> Option<u64> {
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
pub(super) fn origin_served(origin: &Host, addr: &str) -> Option<u64> {
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
