//! Local Damselfly demo: an origin, a manager (SQLite in the temp dir), a scheduler registered
//! with it, one seed peer and N peers as real processes on loopback; the daemons find their
//! scheduler through the manager (the scheduler's address is also given to them with
//! `--scheduler` as a fallback), and every peer downloads the same generated file at once.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p damselfly-tests --bin demo -- --size 256MiB --peers 4
//! ```
//!
//! Prints per peer the time, throughput and where the bytes came from, then the origin's
//! bytes served as copies of the file (about 1.0 when P2P works), the seed's upload copies
//! (the peers' bytes from the seed over the file size, about 1.0 when the seed sends each
//! piece once and the peers pass it on), and PASS or FAIL. Exits non-zero when any copy
//! fails verification.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use testkit::cluster::check_dfget;
use testkit::content::file_sha256_hex_async;
use testkit::manager::ManagerOptions;
use testkit::{bin_path, human_bytes, Cluster, ClusterOptions, Origin};

/// Runs a local P2P download of one generated file by several peers at once.
#[derive(Parser, Debug)]
#[command(name = "demo", version)]
struct Args {
    /// Size of the generated file (e.g. 64MiB, 1GiB, 1000000).
    #[arg(long, default_value = "256MiB", value_parser = wire::size::parse_size)]
    size: u64,
    /// Number of peers downloading at the same time (at least 1).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    peers: u16,
    /// Keep the temp dir (logs, daemon data, outputs) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// `--threads` of every dfdaemon (data-plane threads).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Longest time one peer's download may take.
    #[arg(long, default_value = "600", value_name = "SECONDS")]
    timeout: u64,
    /// Check every piece from a parent against the seed's digest (dfdaemon's
    /// `data_plane.verify_pieces`); `--verify-pieces false` shows what the check costs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    verify_pieces: bool,
}

/// The outcome of one peer's download.
struct PeerResult {
    name: String,
    elapsed: Duration,
    finished: Instant,
    error: Option<String>,
    stats: Option<wire::proto::dfdaemon::StatsResponse>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mib_per_s(bytes: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return "-".to_string();
    }
    format!("{:.1} MiB/s", bytes as f64 / (1 << 20) as f64 / s)
}

async fn run(args: Args) -> Result<bool> {
    for b in ["manager", "scheduler", "dfdaemon", "dfget"] {
        bin_path(b)?;
    }
    let size = args.size;
    let peers = usize::from(args.peers);

    eprintln!(
        "[demo] starting the origin with a generated file of {} ...",
        human_bytes(size)
    );
    let origin = Origin::start().await?;
    let content = origin.add_file("/demo.bin", size, 0xDA55_E1F1);
    let url = origin.url("/demo.bin");
    eprintln!("[demo] origin serving {url}; computing its sha256 ...");
    let sha = tokio::task::spawn_blocking(move || content.sha256_hex())
        .await
        .context("hashing task panicked")?;
    let digest = format!("sha256:{sha}");

    // Without verification: every daemon's generated config turns it off.
    let daemon_yaml = if args.verify_pieces {
        String::new()
    } else {
        "data_plane:\n  verify_pieces: false\n".to_string()
    };
    let mut cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        daemon_yaml,
        peers,
        threads: usize::from(args.threads),
        dfget_timeout: Duration::from_secs(args.timeout),
        verbose: true,
        manager: Some(ManagerOptions::default()),
        static_schedulers: true,
        ..ClusterOptions::default()
    })
    .await?;
    if let Some(m) = cluster.manager() {
        let rest = m.rest();
        let schedulers = rest.schedulers().await.unwrap_or_default();
        eprintln!(
            "[demo] manager status page http://{}/ ; schedulers {:?}",
            m.rest_addr, schedulers
        );
        // Until every daemon has heard from the manager (its cluster config arrived).
        let deadline = Instant::now() + Duration::from_secs(20);
        for d in cluster.seeds().iter().chain(cluster.peers()) {
            loop {
                let via_manager = d.stats().await.is_ok_and(|s| s.config_version > 0);
                if via_manager || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let seeds = rest.seed_peers().await.unwrap_or_default();
        eprintln!("[demo] manager knows seed peers {seeds:?}");
    }
    let kept = args.keep.then(|| cluster.keep_dir());
    let out_dir = cluster.dir().join("out");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    eprintln!(
        "[demo] {peers} peers downloading {} at once ...",
        human_bytes(size)
    );
    let started = Instant::now();
    let downloads = cluster.peers().iter().map(|peer| {
        let out: PathBuf = out_dir.join(format!("{}.bin", peer.name));
        let cluster = &cluster;
        let url = url.as_str();
        let digest = digest.as_str();
        let sha = sha.as_str();
        async move {
            let start = Instant::now();
            let result = cluster.run_dfget(peer, url, &out, Some(digest)).await;
            let elapsed = start.elapsed();
            let finished = Instant::now();
            let error = match result.and_then(|o| check_dfget(&peer.name, &o)) {
                Err(e) => Some(format!("{e:#}")),
                Ok(()) => match file_sha256_hex_async(&out).await {
                    Ok(got) if got == sha => None,
                    Ok(got) => Some(format!(
                        "sha256 of {} is {got}, expected {sha}",
                        out.display()
                    )),
                    Err(e) => Some(format!("{e:#}")),
                },
            };
            PeerResult {
                name: peer.name.clone(),
                elapsed,
                finished,
                error,
                stats: None,
            }
        }
    });
    let mut results = futures::future::join_all(downloads).await;
    // Until the last dfget returned (the demo's own sha256 checks are not counted).
    let wall = results
        .iter()
        .map(|r| r.finished.saturating_duration_since(started))
        .max()
        .unwrap_or_default();
    for (r, peer) in results.iter_mut().zip(cluster.peers()) {
        match peer.stats().await {
            Ok(s) => r.stats = Some(s),
            Err(e) => eprintln!("[demo] {}: {e:#}", peer.name),
        }
    }
    // What the seed peer uploaded, by its own count (pieces sent to anyone, this task only
    // in the demo).
    let mut seed_uploaded: Option<u64> = None;
    for seed in cluster.seeds() {
        match seed.stats().await {
            Ok(s) => *seed_uploaded.get_or_insert(0) += s.bytes_uploaded,
            Err(e) => eprintln!("[demo] {}: {e:#}", seed.name),
        }
    }

    let field = |r: &PeerResult, f: fn(&wire::proto::dfdaemon::StatsResponse) -> u64| {
        r.stats
            .as_ref()
            .map_or("?".to_string(), |s| human_bytes(f(s)))
    };
    println!();
    println!(
        "{:<8} {:>9} {:>13} {:>12} {:>12} {:>12}  result",
        "peer", "time", "throughput", "from origin", "from seed", "from peers"
    );
    for r in &results {
        println!(
            "{:<8} {:>8.2}s {:>13} {:>12} {:>12} {:>12}  {}",
            r.name,
            r.elapsed.as_secs_f64(),
            if r.error.is_none() {
                mib_per_s(size, r.elapsed)
            } else {
                "-".to_string()
            },
            field(r, |s| s.bytes_from_origin),
            field(r, |s| s.bytes_from_seed),
            field(r, |s| s.bytes_from_peers),
            if r.error.is_none() { "ok" } else { "FAILED" }
        );
    }
    let served = origin.bytes_served();
    let copies = if size == 0 {
        0.0
    } else {
        served as f64 / size as f64
    };
    println!();
    println!(
        "file {} x {peers} peers, wall time {:.2}s ({} aggregate)",
        human_bytes(size),
        wall.as_secs_f64(),
        mib_per_s(size * peers as u64, wall)
    );
    println!(
        "origin served {} in {} requests = {copies:.2} copies of the file",
        human_bytes(served),
        origin.requests()
    );
    // The seed's upload copies: what the peers say they got from seed peers, and what the
    // seed says it sent (the same bytes, counted at the other end).
    let from_seed: Option<u64> = results
        .iter()
        .map(|r| r.stats.as_ref().map(|s| s.bytes_from_seed))
        .sum();
    let as_copies = |bytes: u64| {
        if size == 0 {
            0.0
        } else {
            bytes as f64 / size as f64
        }
    };
    match (from_seed, seed_uploaded) {
        (Some(got), Some(sent)) => println!(
            "seed upload: peers got {} from the seed = {:.2} copies (seed counted {} sent = {:.2})",
            human_bytes(got),
            as_copies(got),
            human_bytes(sent),
            as_copies(sent)
        ),
        (Some(got), None) => println!(
            "seed upload: peers got {} from the seed = {:.2} copies",
            human_bytes(got),
            as_copies(got)
        ),
        (None, _) => println!("seed upload: unknown (a peer's stats could not be read)"),
    }
    let failed: Vec<&PeerResult> = results.iter().filter(|r| r.error.is_some()).collect();
    for r in &failed {
        eprintln!(
            "[demo] {}: {}",
            r.name,
            r.error.as_deref().unwrap_or_default()
        );
    }
    if failed.is_empty() {
        println!("PASS: {peers}/{peers} copies verified (sha256 {sha})");
    } else {
        cluster.dump_logs();
        println!(
            "FAIL: {} of {peers} copies failed verification",
            failed.len()
        );
    }
    eprintln!("[demo] shutting down ...");
    cluster.shutdown();
    drop(cluster);
    if let Some(dir) = kept {
        eprintln!(
            "[demo] kept logs, daemon data and outputs in {}",
            dir.display()
        );
    }
    Ok(failed.is_empty())
}
