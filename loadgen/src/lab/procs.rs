//! The lab's processes: starting them in their namespaces, stopping and restarting them
//! for faults, killing and reaping them on drop, Ctrl-C / SIGTERM handling, and their CPU
//! time.

use super::*;

static STOP: AtomicBool = AtomicBool::new(false);

pub(super) fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted (Ctrl-C / SIGTERM); cleaning up");
    }
    Ok(())
}

/// Sets [`STOP`] on SIGINT or SIGTERM (the lab's loops check it and unwind, so that every
/// guard runs).
pub(super) fn install_signal_handler() -> anyhow::Result<()> {
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
pub(super) struct Procs {
    pub(super) list: Vec<(String, Child, PathBuf)>,
    /// How each entry of `list` was started (same order), to start it again.
    pub(super) specs: Vec<Spec>,
    /// Names of processes a fault stopped on purpose (not an error for [`Procs::check_alive`]).
    pub(super) down: std::collections::HashSet<String>,
}

/// What [`Procs::spawn_in`] was given.
pub(super) struct Spec {
    pub(super) ns: String,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) rust_log: String,
}

impl Procs {
    /// Starts `program args` inside namespace `ns` (`ip netns exec`, which execs, so the
    /// child's pid is the program's) with stdout and stderr in `log`.
    pub(super) fn spawn_in(
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

    pub(super) fn start(
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

    pub(super) fn position(&self, name: &str) -> anyhow::Result<usize> {
        self.list
            .iter()
            .position(|(n, _, _)| n == name)
            .with_context(|| format!("no lab process {name}"))
    }

    /// Process id of `name`.
    pub(super) fn pid(&self, name: &str) -> anyhow::Result<u32> {
        Ok(self.list[self.position(name)?].1.id())
    }

    /// Sends `sig` (`STOP`, `CONT`) to `name` with kill(1).
    pub(super) fn signal(&self, name: &str, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid(name)?;
        net::run("kill", &[&format!("-{sig}"), &pid.to_string()])
            .with_context(|| format!("kill -{sig} {name}"))?;
        Ok(())
    }

    /// Kills `name` (SIGKILL) on purpose: [`Procs::check_alive`] no longer minds it.
    pub(super) fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.position(name)?;
        self.down.insert(name.to_string());
        let child = &mut self.list[i].1;
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Starts `name` again as it was started (killed first if it runs); its previous log is
    /// kept as `<log>.<k>`. Returns the new pid.
    pub(super) fn respawn(&mut self, name: &str) -> anyhow::Result<u32> {
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
    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
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
pub(super) struct WorkDir {
    pub(super) path: PathBuf,
    pub(super) keep: bool,
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

pub(super) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b[b.len().saturating_sub(64 << 10)..]).into_owned();
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

pub(super) fn is_root() -> anyhow::Result<bool> {
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
pub(super) fn proc_cpu(pid: u32, tck: f64) -> Option<f64> {
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
pub(super) fn machine_cpu(tck: f64) -> Option<(f64, f64, f64)> {
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

pub(super) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub(super) fn cpu_snapshot(pids: &[(String, u32)], tck: f64) -> Vec<(String, f64)> {
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

pub(super) fn cpu_delta(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
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
