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
//!
//! The rows' runners are in `baseline.rs` (sendfile, plain quinn) and `ours.rs` (our data
//! plane), the CPU accounting in `measure.rs`, the table and the JSON record in `report.rs`.

mod baseline;
mod measure;
mod ours;
mod report;

use baseline::{make_file, plain_quinn, sendfile_baseline, warm_up};
use measure::{best, machine_counters};
use ours::{run_ours, shaped_row, verify_rows, Knobs, LOOPBACK_QUIC_PAYLOAD};

use anyhow::Result;
use clap::Parser;
use wire::PieceLayout;

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
    // Our data plane on `threads` threads per side with `knobs`, on this run's file.
    let ours = |threads: usize, knobs: Knobs| {
        run_ours(threads, knobs, &src, size, layout, args.runs, warm)
    };
    let mut ours_by_threads = Vec::new();
    let threads_list: &[usize] = if args.only_quic { &[] } else { &[1, 2] };
    for &threads in threads_list {
        eprintln!(
            "[throughput] (b) our TCP data plane, {threads} thread(s) per side, x{} ...",
            args.runs
        );
        ours_by_threads.push((threads, ours(threads, knobs)?));
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
        let q = ours(
            1,
            Knobs {
                quic: true,
                ..knobs
            },
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
    let one_verified = ours(
        1,
        Knobs {
            verify: true,
            ..knobs
        },
    )?;
    let quic_verified = if args.no_quic {
        None
    } else {
        eprintln!(
            "[throughput] (d') our QUIC, pieces verified x{} ...",
            args.runs
        );
        Some(ours(
            1,
            Knobs {
                quic: true,
                verify: true,
                ..knobs
            },
        )?)
    };
    let (_, one) = ours_by_threads[0];
    let (_, two) = ours_by_threads[1];
    report::print(
        &args,
        size,
        layout,
        &report::Rows {
            baseline,
            one,
            one_verified,
            two,
            plain_quinn,
            ours_quic,
            quic_verified,
            shaped,
        },
    )
}
