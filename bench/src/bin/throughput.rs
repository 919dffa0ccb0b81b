//! Loopback throughput in one run: the same file sent with plain `sendfile` (the kernel's
//! baseline), with our data plane over TCP, with plain quinn on one stream, with our data
//! plane over QUIC, and with a shaping limit. Prints a table, the ratios and one JSON record.
//!
//! Every variant ends with the file written at the receiver (a plain reader writes what it
//! receives into a file; ours verifies each piece's crc32c and writes it at its offset;
//! rows (b') and (d') also check every piece against its trusted BLAKE3 digest).
//! For our data plane the CPU time of the serving node's threads is measured on its own
//! (`/proc/self/task/TID/stat`), as cores used per GB/s served; the receiving node's
//! threads too, with its piece hash workers (`dataplane-hash-N`) shown apart.

use anyhow::{bail, Context, Result};
use clap::Parser;
use damselfly_bench::cpu_seconds;
use dataplane::fetch::{FetchConfig, Transport};
use dataplane::quic::QuicConfig;
use dataplane::shaper::{Shaping, ShapingConfig};
use dataplane::{Command, Counters, DataPlane, DataPlaneConfig, Event, Parent, Storage};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use wire::{PieceLayout, TaskId};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(about = "Loopback throughput: sendfile baseline vs Damselfly's data plane")]
struct Args {
    /// Bytes to send (accepts a plain number of MiB with --size-mib instead).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Piece length in KiB for our data plane.
    #[arg(long, default_value_t = 4096)]
    piece_kib: u64,
    /// Pieces in flight per parent connection.
    #[arg(long, default_value_t = 8)]
    pieces_in_flight: usize,
    /// Bytes in flight per parent connection, MiB.
    #[arg(long, default_value_t = dataplane::fetch::DEFAULT_BYTES_IN_FLIGHT >> 20)]
    mib_in_flight: u64,
    /// Skip the QUIC rows.
    #[arg(long)]
    no_quic: bool,
    /// Skip the TCP rows (b) and run the baseline (a) once: for QUIC tuning
    #[arg(long)]
    only_quic: bool,
    /// Run only the shaped row (e) (for shaper accuracy runs).
    #[arg(long)]
    only_shaped: bool,
    /// QUIC: largest UDP payload (initial MTU and discovery bound) for rows (c) and (d);
    /// default 65,000 (loopback); 1452 is the daemon's default for real networks.
    #[arg(long)]
    quic_payload: Option<u16>,
    /// (c) with quinn's default transport and endpoint settings instead of ours.
    #[arg(long)]
    quinn_defaults: bool,
    /// (c) receiver discards what it reads instead of writing the file (diagnostic: the
    /// transport alone).
    #[arg(long)]
    quinn_discard: bool,
    /// Shaping limit for the shaped run, MB/s (decimal).
    #[arg(long, default_value_t = 200)]
    shaped_mbps: u64,
    /// Bytes for the shaped run, MiB (long enough to measure the rate).
    #[arg(long, default_value_t = 256)]
    shaped_mib: u64,
    /// Do not write and delete a scratch file of the transfer's size before each row (see
    /// `warm_up`): then the first run of a row pays for faulting fresh memory in.
    #[arg(long)]
    no_warm_up: bool,
    /// Repeat each measurement this many times and keep the best.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run only rows (b) 1 thread and (d), each without and with per-piece digest
    /// verification, interleaved, and print the ratios (for the verification target).
    #[arg(long)]
    only_verify: bool,
    /// Write the JSON record here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Sample {
    secs: f64,
    bytes: u64,
    cpu_secs: f64,
    /// CPU seconds of the serving node's threads alone (0 when not measured).
    serve_cpu_secs: f64,
}

impl Sample {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
    fn cpu_per_gbps(&self) -> f64 {
        // CPU seconds per second of transfer, per GB/s moved: cores used per GB/s.
        (self.cpu_secs / self.secs) / self.gbps()
    }
    fn serve_cpu_per_gbps(&self) -> f64 {
        (self.serve_cpu_secs / self.secs) / self.gbps()
    }
}

/// Machine counters that explain a slow run: CPU ticks stolen by the hypervisor
/// (`/proc/stat`) and direct compaction stalls (`/proc/vmstat`).
fn machine_counters() -> (u64, u64) {
    let steal = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let l = s.lines().next()?.to_string();
            l.split_whitespace().nth(8)?.parse().ok()
        })
        .unwrap_or(0);
    let compact = std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("compact_stall ")?.trim().parse().ok())
        })
        .unwrap_or(0);
    (steal, compact)
}

/// CPU seconds (user + system) the given threads of this process have used.
fn threads_cpu(tids: &[u32]) -> f64 {
    threads_cpu_of(tids, |_| true)
}

/// CPU seconds of the threads among `tids` that `keep` accepts.
fn threads_cpu_of(tids: &[u32], keep: impl Fn(u32) -> bool) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    tids.iter()
        .filter(|t| keep(**t))
        .filter_map(|t| std::fs::read_to_string(format!("/proc/self/task/{t}/stat")).ok())
        .filter_map(|s| {
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let k: f64 = f.get(12)?.parse().ok()?;
            Some((u + k) / tick)
        })
        .sum()
}

/// Whether thread `tid` of this process is a data plane's piece hasher (`dataplane-hash-N`).
fn is_hasher(tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .is_ok_and(|c| c.starts_with("dataplane-hash"))
}

/// CPU seconds of the hash-worker threads among `tids`.
fn hasher_cpu(tids: &[u32]) -> f64 {
    threads_cpu_of(tids, is_hasher)
}

fn best(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    v[0]
}

fn make_file(dir: &Path, size: u64) -> Result<std::fs::File> {
    let path = dir.join("source.bin");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut off = 0;
    while off < size {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = (size - off).min(block.len() as u64) as usize;
        f.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    // Written back before any measurement: otherwise the kernel's writeback of this setup
    // data runs during the first rows and steals CPU and disk from them.
    f.sync_all()?;
    Ok(f)
}

/// Writes `size` bytes to a scratch file in `dir` and deletes it, right before a row, so that
/// the row's receiver writes into memory the guest has just had in use. On a VM whose balloon
/// does free page reporting (this one: tuning.md), memory freed a few seconds earlier (the
/// previous row's files) is handed back to the host, and the first run after that spends
/// 2–3 CPU s per GiB faulting it back in, whichever transport it measures. Every row, the
/// baseline included, gets the same warm-up; it is not timed.
fn warm_up(dir: &Path, size: u64, enabled: bool) -> Result<()> {
    if !enabled {
        return Ok(());
    }
    let path = dir.join("warm-up.tmp");
    let f = std::fs::File::create(&path)?;
    let block = vec![0x5au8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(block.len() as u64) as usize;
        f.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(())
}

/// (a) sendfile from the file to a socket; the receiver writes what it reads into a file.
fn sendfile_baseline(src: &std::fs::File, size: u64, out: &Path) -> Result<Sample> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let src = src.try_clone()?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || -> Result<()> {
        let (s, _) = l.accept()?;
        let mut off = 0u64;
        while off < size {
            let n = dataplane::sys::sendfile(
                s.as_raw_fd(),
                &src,
                off,
                (size - off).min(1 << 30) as usize,
            )?;
            if n == 0 {
                bail!("source file ended early");
            }
            off += n as u64;
        }
        Ok(())
    });
    let me: Vec<u32> = dataplane::runtime::current_tid().into_iter().collect();
    let recv0 = threads_cpu(&me);
    let mut c = TcpStream::connect(addr)?;
    let f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < size {
        let n = c.read(&mut buf)?;
        if n == 0 {
            bail!("baseline sender closed early at {got}");
        }
        f.write_all_at(&buf[..n], got)?;
        got += n as u64;
    }
    let recv_cpu = threads_cpu(&me) - recv0;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    eprintln!("[throughput]   baseline receiver CPU s: {recv_cpu:.2}");
    Ok(Sample {
        secs: t0.elapsed().as_secs_f64(),
        bytes: size,
        cpu_secs: cpu_seconds() - cpu0,
        serve_cpu_secs: 0.0,
    })
}

struct Node {
    _dir: tempfile::TempDir,
    storage: Arc<Storage>,
    dp: DataPlane,
}

#[derive(Debug, Clone, Copy)]
struct Knobs {
    pieces_in_flight: usize,
    bytes_in_flight: u64,
    quic: bool,
    quic_payload: Option<u16>,
    /// The receiver requires each piece to match its trusted BLAKE3 digest (all known before
    /// the transfer, as when the seed has finished).
    verify: bool,
}

/// UDP payload of rows (c) and (d) unless `--quic-payload` says otherwise: loopback's MTU
/// is 65,536, and large packets are what a loopback (or jumbo-frame) deployment would set
/// (`data_plane.quic_max_udp_payload`); the daemon's default stays 1452.
const LOOPBACK_QUIC_PAYLOAD: u16 = 65_000;

/// Our QUIC settings on a free loopback port, with the UDP payload overridden if asked.
fn quic_config(payload: Option<u16>) -> QuicConfig {
    QuicConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        max_udp_payload: payload.unwrap_or(LOOPBACK_QUIC_PAYLOAD),
        ..QuicConfig::default()
    }
}

fn node(threads: usize, shaping: ShapingConfig, k: Knobs) -> Result<Node> {
    let dir = tempfile::tempdir()?;
    let storage = Arc::new(Storage::open(dir.path())?);
    let cfg = DataPlaneConfig {
        threads,
        listen: "127.0.0.1:0".parse()?,
        queue_capacity: 4096,
        io_uring: true,
        fetch: FetchConfig {
            pieces_in_flight: k.pieces_in_flight,
            bytes_in_flight: k.bytes_in_flight,
            transport: if k.quic {
                Transport::Quic
            } else {
                Transport::Tcp
            },
            ..FetchConfig::default()
        },
        quic: k.quic.then(|| quic_config(k.quic_payload)),
        super_seed: None,
    };
    let dp = DataPlane::start(
        cfg,
        storage.clone(),
        Arc::new(Counters::default()),
        Arc::new(Shaping::new(shaping)),
    )?;
    Ok(Node {
        _dir: dir,
        storage,
        dp,
    })
}

/// Fills a task in `n` from `src` (pieces verified and written; page cache warm).
fn seed(n: &Node, id: TaskId, src: &std::fs::File, layout: PieceLayout) -> Result<()> {
    let store = n.storage.create(id, layout)?;
    let mut buf = Vec::new();
    for p in 0..layout.piece_count() {
        let r = layout.piece_range(p).context("range")?;
        buf.resize((r.end - r.start) as usize, 0);
        src.read_exact_at(&mut buf, r.start)?;
        store.write_piece(p, &buf, wire::piece_crc(&buf))?;
    }
    // As for the source file: no writeback of setup data during the measurement.
    store.file().sync_all()?;
    Ok(())
}

/// Our data plane: `tasks` tasks of `size` bytes each, fetched at once from `a` by `b`.
fn ours(
    a: &Node,
    b: &Node,
    ids: &[TaskId],
    layout: PieceLayout,
    rate_limit: u64,
    verify: bool,
) -> Result<Sample> {
    for id in ids {
        let _ = b.storage.remove(id);
    }
    let serve_tids = a.dp.thread_ids();
    let serve0 = threads_cpu(&serve_tids);
    let recv_tids = b.dp.thread_ids();
    let recv0 = threads_cpu(&recv_tids);
    let hash0 = hasher_cpu(&recv_tids);
    let m0 = machine_counters();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for id in ids {
        let store = b.storage.create(*id, layout)?;
        if verify {
            let held = a.storage.get(id).context("seeded task")?;
            for n in 0..layout.piece_count() {
                let d = held
                    .piece_digest(n)
                    .context("seeded piece without a digest")?;
                let _ = store.set_digest(n, d);
            }
            store.require_digests();
        }
        let parents = vec![Parent {
            host_id: "a".into(),
            addr: a.dp.local_addr(),
            quic_addr: a.dp.quic_addr(),
            is_seed: true,
        }];
        let t = b.dp.bridge().thread_of(id);
        if b.dp
            .bridge()
            .send(
                t,
                Command::Download {
                    store,
                    parents,
                    rate_limit,
                },
            )
            .is_err()
        {
            bail!("bridge full");
        }
    }
    let mut left = ids.len();
    futures::executor::block_on(async {
        while left > 0 {
            match b.dp.bridge().next_event().await {
                Event::DownloadFinished { .. } => left -= 1,
                Event::NeedParents { task } | Event::StorageFailed { task, .. } => {
                    eprintln!("download of {task} failed");
                    left -= 1;
                }
                _ => {}
            }
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    for id in ids {
        if !b.storage.get(id).is_some_and(|s| s.is_complete()) {
            bail!("download incomplete");
        }
    }
    let bytes = layout.content_length() * ids.len() as u64;
    // Each run on its own line: the table keeps only the best, the spread shows here.
    let m1 = machine_counters();
    eprintln!(
        "[throughput]   run: {:.2} GB/s, CPU s: serving {:.2}, receiving {:.2} (hash workers {:.2}), process {:.2}; steal ticks {}, compaction stalls {}",
        bytes as f64 / secs / 1e9,
        threads_cpu(&serve_tids) - serve0,
        threads_cpu(&recv_tids) - recv0,
        hasher_cpu(&recv_tids) - hash0,
        cpu_seconds() - cpu0,
        m1.0 - m0.0,
        m1.1 - m0.1
    );
    Ok(Sample {
        secs,
        bytes,
        cpu_secs: cpu_seconds() - cpu0,
        serve_cpu_secs: threads_cpu(&serve_tids) - serve0,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size = args.size_mib << 20;
    let dir = tempfile::tempdir()?;
    eprintln!(
        "[throughput] writing a {} MiB source file ...",
        args.size_mib
    );
    let src = make_file(dir.path(), size)?;
    let layout = PieceLayout::new(size, args.piece_kib << 10)?;
    let out = dir.path().join("baseline.out");

    let warm = !args.no_warm_up;
    if warm {
        eprintln!(
            "[throughput] before each row: an untimed write + delete of {} MiB (--no-warm-up to skip)",
            args.size_mib
        );
    }
    warm_up(dir.path(), size, warm)?;
    eprintln!("[throughput] (a) sendfile baseline x{} ...", args.runs);
    let mut v = Vec::new();
    let runs_ab = if args.only_quic { 1 } else { args.runs };
    for _ in 0..runs_ab {
        let m0 = machine_counters();
        let s = sendfile_baseline(&src, size, &out)?;
        let m1 = machine_counters();
        eprintln!(
            "[throughput]   run: {:.2} GB/s, CPU s: process {:.2}; steal ticks {}, compaction stalls {}",
            s.gbps(),
            s.cpu_secs,
            m1.0 - m0.0,
            m1.1 - m0.1
        );
        v.push(s);
        std::fs::remove_file(&out)?;
    }
    let baseline = best(v);

    let knobs = Knobs {
        pieces_in_flight: args.pieces_in_flight,
        bytes_in_flight: args.mib_in_flight << 20,
        quic: false,
        quic_payload: args.quic_payload,
        verify: false,
    };
    if args.only_verify {
        return verify_rows(&args, knobs, &src, size, layout, warm);
    }
    if args.only_shaped {
        let shaped = shaped_row(&args, &src, layout, knobs)?;
        let limit = (args.shaped_mbps * 1_000_000) as f64;
        let rate = shaped.bytes as f64 / shaped.secs;
        println!(
            "(e) our TCP, download limit {:.3} GB/s: {:.4} GB/s, error {:+.2} %",
            limit / 1e9,
            rate / 1e9,
            (rate / limit - 1.0) * 100.0
        );
        return Ok(());
    }
    let mut results = serde_json::Map::new();
    let mut ours_by_threads = Vec::new();
    let threads_list: &[usize] = if args.only_quic { &[] } else { &[1, 2] };
    for &threads in threads_list {
        eprintln!(
            "[throughput] (b) our TCP data plane, {threads} thread(s) per side, x{} ...",
            args.runs
        );
        ours_by_threads.push((
            threads,
            run_ours(threads, knobs, &src, size, layout, args.runs, warm)?,
        ));
    }

    let (plain_quinn, ours_quic) = if args.no_quic {
        (None, None)
    } else {
        eprintln!(
            "[throughput] (c) plain quinn, one stream x{} (UDP payload {} B for (c) and (d)) ...",
            args.runs,
            args.quic_payload.unwrap_or(LOOPBACK_QUIC_PAYLOAD)
        );
        warm_up(dir.path(), size, warm)?;
        let mut v = Vec::new();
        for _ in 0..args.runs {
            v.push(plain_quinn(
                &src,
                size,
                &out,
                args.quic_payload,
                args.quinn_defaults,
                args.quinn_discard,
            )?);
            std::fs::remove_file(&out)?;
        }
        let pq = best(v);
        eprintln!("[throughput] (d) our QUIC data plane x{} ...", args.runs);
        let q = run_ours(
            1,
            Knobs {
                quic: true,
                ..knobs
            },
            &src,
            size,
            layout,
            args.runs,
            warm,
        )?;
        (Some(pq), Some(q))
    };
    if args.only_quic {
        println!("(a) sendfile: {:.2} GB/s", baseline.gbps());
        if let (Some(pq), Some(q)) = (&plain_quinn, &ours_quic) {
            println!(
                "(c) plain quinn, one stream: {:.2} GB/s, {:.2} cores per GB/s",
                pq.gbps(),
                pq.cpu_per_gbps()
            );
            println!(
                "(d) our QUIC, 1 thread per side: {:.2} GB/s, {:.2} cores per GB/s",
                q.gbps(),
                q.cpu_per_gbps()
            );
        }
        return Ok(());
    }

    eprintln!(
        "[throughput] (e) our TCP shaped to {} MB/s ...",
        args.shaped_mbps
    );
    let shaped = shaped_row(&args, &src, layout, knobs)?;

    eprintln!(
        "[throughput] (b') our TCP, 1 thread per side, pieces verified x{} ...",
        args.runs
    );
    let one_verified = run_ours(
        1,
        Knobs {
            verify: true,
            ..knobs
        },
        &src,
        size,
        layout,
        args.runs,
        warm,
    )?;
    let quic_verified = if args.no_quic {
        None
    } else {
        eprintln!(
            "[throughput] (d') our QUIC, pieces verified x{} ...",
            args.runs
        );
        Some(run_ours(
            1,
            Knobs {
                quic: true,
                verify: true,
                ..knobs
            },
            &src,
            size,
            layout,
            args.runs,
            warm,
        )?)
    };
    let (_, one) = ours_by_threads[0];
    let (_, two) = ours_by_threads[1];
    println!();
    println!(
        "{:<44} {:>9} {:>10} {:>14} {:>14}",
        "variant", "GB/s", "vs (a)", "cores per GB/s", "serving side"
    );
    let row = |name: &str, s: &Sample| {
        let serve = if s.serve_cpu_secs > 0.0 {
            format!("{:.2}", s.serve_cpu_per_gbps())
        } else {
            "-".to_string()
        };
        println!(
            "{:<44} {:>9.2} {:>9.2}x {:>14.2} {:>14}",
            name,
            s.gbps(),
            s.gbps() / baseline.gbps(),
            s.cpu_per_gbps(),
            serve
        );
    };
    row("(a) sendfile -> reader writing a file", &baseline);
    row("(b) our TCP, 1 thread per side", &one);
    row(
        "(b') same, every piece checked vs its digest",
        &one_verified,
    );
    row("(b) our TCP, 2 threads per side (2 tasks)", &two);
    match (&plain_quinn, &ours_quic) {
        (Some(pq), Some(q)) => {
            row("(c) plain quinn, one stream", pq);
            row("(d) our QUIC, 1 thread per side", q);
            if let Some(qv) = &quic_verified {
                row("(d') same, every piece checked vs its digest", qv);
            }
        }
        _ => println!("{:<44} {:>9}", "(c), (d) QUIC", "skipped"),
    }
    let shaped_rate = shaped.bytes as f64 / shaped.secs;
    let limit = (args.shaped_mbps * 1_000_000) as f64;
    println!(
        "{:<44} {:>9.3} {:>10}   limit {:.3} GB/s, error {:+.1} %",
        "(e) our TCP, download limit",
        shaped_rate / 1e9,
        "",
        limit / 1e9,
        (shaped_rate / limit - 1.0) * 100.0
    );
    println!();
    println!(
        "ratio ours/sendfile (1 thread): {:.2}",
        one.gbps() / baseline.gbps()
    );
    if let (Some(pq), Some(q)) = (&plain_quinn, &ours_quic) {
        println!(
            "our QUIC: {:.2} GB/s, {:.2}x plain quinn",
            q.gbps(),
            q.gbps() / pq.gbps()
        );
    }
    println!(
        "scaling 1 -> 2 threads: {:.2}x (this machine has {} cores, shared by sender and receiver)",
        two.gbps() / one.gbps(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    results.insert("size_bytes".into(), size.into());
    results.insert("piece_length".into(), layout.piece_length().into());
    results.insert("pieces_in_flight".into(), args.pieces_in_flight.into());
    results.insert("bytes_in_flight".into(), (args.mib_in_flight << 20).into());
    results.insert("sendfile".into(), serde_json::to_value(baseline)?);
    results.insert("ours_tcp_1_thread".into(), serde_json::to_value(one)?);
    results.insert("ours_tcp_2_threads".into(), serde_json::to_value(two)?);
    results.insert(
        "ours_tcp_1_thread_verified".into(),
        serde_json::to_value(one_verified)?,
    );
    if let Some(qv) = &quic_verified {
        results.insert("ours_quic_verified".into(), serde_json::to_value(qv)?);
    }
    results.insert(
        "ratio_ours_vs_sendfile".into(),
        (one.gbps() / baseline.gbps()).into(),
    );
    results.insert(
        "ours_tcp_serving_cores_per_gbps".into(),
        one.serve_cpu_per_gbps().into(),
    );
    if let (Some(pq), Some(q)) = (&plain_quinn, &ours_quic) {
        results.insert("plain_quinn".into(), serde_json::to_value(pq)?);
        results.insert("ours_quic".into(), serde_json::to_value(q)?);
        results.insert("ours_quic_gbps".into(), q.gbps().into());
    }
    results.insert("shaped_limit_bytes_per_sec".into(), limit.into());
    results.insert("shaped_measured_bytes_per_sec".into(), shaped_rate.into());
    results.insert(
        "shaped_error_percent".into(),
        ((shaped_rate / limit - 1.0) * 100.0).into(),
    );
    let json = serde_json::Value::Object(results).to_string();
    println!("{json}");
    if let Some(p) = args.json {
        let mut f = std::fs::File::create(&p)?;
        writeln!(f, "{json}")?;
    }
    Ok(())
}

/// (e) one download through a node whose download limit is `--shaped-mbps`.
fn shaped_row(
    args: &Args,
    src: &std::fs::File,
    layout: PieceLayout,
    knobs: Knobs,
) -> Result<Sample> {
    let shaped_size = (args.shaped_mib << 20).min(args.size_mib << 20);
    let shaped_layout = PieceLayout::new(shaped_size, layout.piece_length())?;
    let a = node(1, ShapingConfig::default(), knobs)?;
    let b = node(
        1,
        ShapingConfig {
            download: args.shaped_mbps * 1_000_000,
            ..ShapingConfig::default()
        },
        knobs,
    )?;
    let id = TaskId([99; 32]);
    seed(&a, id, src, shaped_layout)?;
    let shaped = ours(&a, &b, &[id], shaped_layout, 0, false);
    a.dp.shutdown();
    b.dp.shutdown();
    shaped
}

/// Best of `runs` fetches between two fresh nodes of `threads` threads (one task per thread).
/// (b) 1 thread and (d), each without and with verification, `runs` rounds interleaved so
/// that machine load changes hit both sides alike; the best of each.
fn verify_rows(
    args: &Args,
    knobs: Knobs,
    src: &std::fs::File,
    size: u64,
    layout: PieceLayout,
    warm: bool,
) -> Result<()> {
    let mut rows = Vec::new();
    let transports: &[bool] = if args.no_quic {
        &[false]
    } else {
        &[false, true]
    };
    for &quic in transports {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for round in 0..args.runs {
            for verify in [false, true] {
                eprintln!(
                    "[throughput] {} round {round}, verification {} ...",
                    if quic { "(d) QUIC" } else { "(b) TCP 1 thread" },
                    if verify { "on" } else { "off" }
                );
                let k = Knobs {
                    quic,
                    verify,
                    ..knobs
                };
                let s = run_ours(1, k, src, size, layout, 1, warm)?;
                if verify {
                    on.push(s);
                } else {
                    off.push(s);
                }
            }
        }
        rows.push((quic, best(off), best(on)));
    }
    println!();
    for (quic, off, on) in rows {
        let name = if quic {
            "(d) our QUIC, 1 thread per side"
        } else {
            "(b) our TCP, 1 thread per side"
        };
        println!(
            "{name}: {:.2} GB/s ({:.2} cores per GB/s); pieces verified: {:.2} GB/s ({:.2} cores per GB/s); ratio {:.2}",
            off.gbps(),
            off.cpu_per_gbps(),
            on.gbps(),
            on.cpu_per_gbps(),
            on.gbps() / off.gbps()
        );
    }
    Ok(())
}

fn run_ours(
    threads: usize,
    knobs: Knobs,
    src: &std::fs::File,
    size: u64,
    layout: PieceLayout,
    runs: usize,
    warm: bool,
) -> Result<Sample> {
    let a = node(threads, ShapingConfig::default(), knobs)?;
    let b = node(threads, ShapingConfig::default(), knobs)?;
    // One task per thread, so every thread has a download to run.
    let ids: Vec<TaskId> = (0..threads as u8).map(|i| TaskId([i + 1; 32])).collect();
    let per_task = PieceLayout::new(size / threads as u64, layout.piece_length())?;
    for id in &ids {
        seed(&a, *id, src, per_task)?;
    }
    // After seeding, which took memory of its own: the receiver's first run gets what the
    // warm-up just freed.
    let scratch = tempfile::tempdir()?;
    warm_up(scratch.path(), size, warm)?;
    let mut v = Vec::new();
    for _ in 0..runs {
        v.push(ours(&a, &b, &ids, per_task, 0, knobs.verify)?);
    }
    a.dp.shutdown();
    b.dp.shutdown();
    Ok(best(v))
}

/// (c) plain quinn: the file sent on one stream in 1 MiB chunks read from the page cache;
/// the receiver writes what it reads into a file. Same TLS and transport settings as our
/// QUIC data plane; each side on its own one-thread tokio runtime.
fn plain_quinn(
    src: &std::fs::File,
    size: u64,
    out: &Path,
    payload: Option<u16>,
    quinn_defaults: bool,
    discard: bool,
) -> Result<Sample> {
    let qcfg = quic_config(payload);
    let (mut ep_cfg, mut server_cfg, mut client_cfg) = dataplane::quic::configs(&qcfg)?;
    if quinn_defaults {
        let t = Arc::new(quinn::TransportConfig::default());
        server_cfg.transport_config(t.clone());
        client_cfg.transport_config(t);
        ep_cfg = quinn::EndpointConfig::default();
    }
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = {
        let _g = server_rt.enter();
        quinn::Endpoint::new(
            ep_cfg.clone(),
            Some(server_cfg),
            dataplane::quic::bind_udp(&qcfg)?,
            Arc::new(quinn::TokioRuntime),
        )?
    };
    let addr = server.local_addr()?;
    let src = src.try_clone()?;
    let sender = server_rt.spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut go = [0u8; 1];
        recv.read_exact(&mut go).await?;
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(1 << 20) as usize;
            let mut b = bytes::BytesMut::zeroed(n);
            src.read_exact_at(&mut b, off)?;
            send.write_chunk(b.freeze()).await?;
            off += n as u64;
        }
        send.finish()?;
        let _ = send.stopped().await;
        let st = conn.stats();
        eprintln!(
            "[throughput] (c) sender view: tx datagrams {} ios {}, {:?}",
            st.udp_tx.datagrams, st.udp_tx.ios, st.path
        );
        anyhow::Ok(())
    });
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let f = std::fs::File::create(out)?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    client_rt.block_on(async {
        let mut client = quinn::Endpoint::new(
            ep_cfg,
            None,
            dataplane::quic::bind_udp(&qcfg)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        client.set_default_client_config(client_cfg);
        let conn = client.connect(addr, "damselfly")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[1]).await?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            if !discard {
                f.write_all_at(&chunk.bytes, got)?;
            }
            got += chunk.bytes.len() as u64;
        }
        if got != size {
            bail!("plain quinn received {got} of {size} bytes");
        }
        let st = conn.stats();
        eprintln!(
            "[throughput] (c) client view: rtt {:?}, mtu {}, rx datagrams {}, tx datagrams {}, path {:?}",
            st.path.rtt, st.path.current_mtu, st.udp_rx.datagrams, st.udp_tx.datagrams, st.path
        );
        conn.close(0u32.into(), b"done");
        anyhow::Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    server_rt
        .block_on(sender)
        .map_err(|e| anyhow::anyhow!("sender task: {e}"))??;
    Ok(Sample {
        secs,
        bytes: size,
        cpu_secs: cpu_seconds() - cpu0,
        serve_cpu_secs: 0.0,
    })
}
