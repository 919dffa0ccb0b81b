//! Soak: a local cluster (scheduler, one seed peer, N peers, real processes on loopback)
//! doing downloads for a set time, while the RSS and open file descriptors of every process
//! are sampled. Writes one CSV row per process per sample and prints a summary (first, last
//! and max per process), so that a leak shows as a last far above the first.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p damselfly-tests --bin soak -- --duration 10m --csv soak.csv
//! ```
//!
//! Each round downloads one new task (a fresh URL) on two random peers at once and one
//! earlier task on a third, through `dfget` processes, with `--digest`; a failed or wrong
//! download is counted and reported (exit status 1). Rounds are paced (`--interval`) so the
//! daemons' data dirs stay bounded: at most `--tasks` distinct files are used, after which
//! new rounds reuse them.

use anyhow::{Context, Result};
use clap::Parser;
use rand::Rng as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use testkit::cluster::check_dfget;
use testkit::content::file_sha256_hex_async;
use testkit::{Cluster, ClusterOptions, Content, Origin};

/// Runs downloads for a while and reports the daemons' memory and descriptors over time.
#[derive(Parser, Debug)]
#[command(name = "soak", version)]
struct Args {
    /// How long to run (e.g. 10m, 30m, 90s).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Ordinary peers (at least 3).
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Size of each file.
    #[arg(long, default_value = "4MiB", value_parser = wire::size::parse_size)]
    size: u64,
    /// Distinct files (tasks) at most; later rounds reuse them.
    #[arg(long, default_value_t = 300)]
    tasks: u64,
    /// Pause between rounds.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Time between two samples of RSS and open fds.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sample: Duration,
    /// CSV output: `elapsed_s,process,rss_kib,fds`.
    #[arg(long, default_value = "soak.csv")]
    csv: PathBuf,
    /// A dfdaemon config file given to every daemon (e.g. GC settings: `gc.task_ttl`,
    /// watermarks), so that a long soak keeps a bounded set of tasks.
    #[arg(long)]
    daemon_config: Option<PathBuf>,
}

/// `VmRSS` in KiB and the number of open fds of `pid`.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

#[derive(Default, Clone, Copy)]
struct Series {
    first: Option<(u64, u64)>,
    last: (u64, u64),
    max: (u64, u64),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn one(cluster: &Cluster, peer: usize, url: &str, c: &Content, out: PathBuf) -> Result<()> {
    let d = cluster.peer(peer);
    let o = cluster
        .run_dfget(d, url, &out, Some(&format!("sha256:{}", c.sha256_hex())))
        .await?;
    check_dfget(&d.name, &o)?;
    let got = file_sha256_hex_async(&out).await?;
    anyhow::ensure!(got == c.sha256_hex(), "{} wrote a wrong file", d.name);
    let _ = tokio::fs::remove_file(&out).await;
    Ok(())
}

async fn run(args: Args) -> Result<bool> {
    anyhow::ensure!(args.peers >= 3, "--peers must be at least 3");
    let origin = Origin::start().await?;
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: args.peers,
        rust_log: Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())),
        daemon_args: match &args.daemon_config {
            Some(p) => vec!["--config".into(), p.display().to_string()],
            None => Vec::new(),
        },
        ..ClusterOptions::default()
    })
    .await
    .context("starting the cluster")?;
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out)?;
    let mut csv = std::fs::File::create(&args.csv)
        .with_context(|| format!("creating {}", args.csv.display()))?;
    writeln!(csv, "elapsed_s,process,rss_kib,fds")?;
    let procs: Vec<(String, u32)> = cluster
        .procs()
        .iter()
        .filter_map(|p| Some((p.name().to_string(), p.pid()?)))
        .collect();
    let mut series = vec![Series::default(); procs.len()];
    let started = Instant::now();
    let mut next_sample = started;
    let (mut rounds, mut downloads, mut failures) = (0u64, 0u64, 0u64);
    let mut files: Vec<(String, Content)> = Vec::new();
    let mut rng = rand::rng();
    eprintln!(
        "soak: {} peers + seed + scheduler for {:?}, files of {} bytes; CSV in {}",
        args.peers,
        args.duration,
        args.size,
        args.csv.display()
    );
    while started.elapsed() < args.duration {
        if Instant::now() >= next_sample {
            let t = started.elapsed().as_secs();
            for (i, (name, pid)) in procs.iter().enumerate() {
                let Some((rss, fds)) = sample(*pid) else {
                    eprintln!("soak: {name} (pid {pid}) is gone");
                    return Ok(false);
                };
                writeln!(csv, "{t},{name},{rss},{fds}")?;
                let s = &mut series[i];
                s.first.get_or_insert((rss, fds));
                s.last = (rss, fds);
                s.max = (s.max.0.max(rss), s.max.1.max(fds));
            }
            csv.flush()?;
            next_sample += args.sample;
        }
        // A new task on two peers, an old one on a third.
        let n = files.len() as u64;
        let (url, c) = if n < args.tasks {
            let path = format!("/soak-{n}.bin");
            let c = origin.add_file(&path, args.size + n, 1_000 + n);
            files.push((origin.url(&path), c));
            files[files.len() - 1].clone()
        } else {
            files[rng.random_range(0..files.len())].clone()
        };
        let (old_url, old_c) = files[rng.random_range(0..files.len())].clone();
        let mut peers: Vec<usize> = (1..=args.peers).collect();
        for i in 0..3 {
            let j = rng.random_range(i..peers.len());
            peers.swap(i, j);
        }
        let r = rounds;
        let (a, b, c3) = tokio::join!(
            one(&cluster, peers[0], &url, &c, out.join(format!("{r}-a"))),
            one(&cluster, peers[1], &url, &c, out.join(format!("{r}-b"))),
            one(
                &cluster,
                peers[2],
                &old_url,
                &old_c,
                out.join(format!("{r}-c"))
            ),
        );
        for res in [a, b, c3] {
            downloads += 1;
            if let Err(e) = res {
                failures += 1;
                eprintln!("soak: round {r}: {e:#}");
            }
        }
        rounds += 1;
        tokio::time::sleep(args.interval).await;
    }
    println!(
        "soak: {:.0?}, {rounds} rounds, {downloads} downloads, {failures} failed, origin sent {} MiB",
        started.elapsed(),
        origin.bytes_served() >> 20
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>8} {:>8} {:>8}",
        "process", "rss first", "rss last", "rss max", "fd first", "fd last", "fd max"
    );
    for (i, (name, _)) in procs.iter().enumerate() {
        let s = series[i];
        let first = s.first.unwrap_or_default();
        println!(
            "{name:<12} {:>9} KiB {:>9} KiB {:>9} KiB {:>8} {:>8} {:>8}",
            first.0, s.last.0, s.max.0, first.1, s.last.1, s.max.1
        );
    }
    Ok(failures == 0)
}
