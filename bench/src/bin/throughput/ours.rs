//! The rows of our data plane: two nodes on loopback ([`Node`], tuned by [`Knobs`]), one
//! seeded, the other fetching over TCP or QUIC, with or without digests, shaped or not.

use crate::baseline::warm_up;
use crate::measure::{best, hasher_cpu, machine_counters, threads_cpu, Sample};
use crate::Args;
use anyhow::{bail, Context, Result};
use damselfly_bench::cpu_seconds;
use dataplane::fetch::{FetchConfig, Transport};
use dataplane::quic::QuicConfig;
use dataplane::shaper::{Shaping, ShapingConfig};
use dataplane::{Command, Counters, DataPlane, DataPlaneConfig, Event, Parent, Storage};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;
use wire::{PieceLayout, TaskId};

pub(crate) struct Node {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) storage: Arc<Storage>,
    pub(crate) dp: DataPlane,
    /// The data plane's counters (pieces hashed inline, hand-overs that waited).
    pub(crate) counters: Arc<Counters>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Knobs {
    pub(crate) pieces_in_flight: usize,
    pub(crate) bytes_in_flight: u64,
    pub(crate) quic: bool,
    pub(crate) quic_payload: Option<u16>,
    /// The receiver requires each piece to match its trusted BLAKE3 digest, and knows its
    /// trusted crc32c (all known before the transfer, as when the seed has finished).
    pub(crate) verify: bool,
}

/// UDP payload of rows (c) and (d) unless `--quic-payload` says otherwise: loopback's MTU
/// is 65,536, and large packets are what a loopback (or jumbo-frame) deployment would set
/// (`data_plane.quic_max_udp_payload`); the daemon's default stays 1452.
pub(crate) const LOOPBACK_QUIC_PAYLOAD: u16 = 65_000;

/// Our QUIC settings on a free loopback port, with the UDP payload overridden if asked.
pub(crate) fn quic_config(payload: Option<u16>) -> QuicConfig {
    QuicConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        max_udp_payload: payload.unwrap_or(LOOPBACK_QUIC_PAYLOAD),
        ..QuicConfig::default()
    }
}

pub(crate) fn node(threads: usize, shaping: ShapingConfig, k: Knobs) -> Result<Node> {
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
    let counters = Arc::new(Counters::default());
    let dp = DataPlane::start(
        cfg,
        storage.clone(),
        counters.clone(),
        Arc::new(Shaping::new(shaping)),
    )?;
    Ok(Node {
        _dir: dir,
        storage,
        dp,
        counters,
    })
}

/// Fills a task in `n` from `src` (pieces verified and written; page cache warm).
pub(crate) fn seed(n: &Node, id: TaskId, src: &std::fs::File, layout: PieceLayout) -> Result<()> {
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
pub(crate) fn ours(
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
    let inline0 = Counters::get(&b.counters.pieces_hashed_inline);
    let waits0 = Counters::get(&b.counters.hash_handover_waits);
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
                // With its crc32c, as the scheduler's PieceDigests bring it.
                let crc = held.piece_crc(n).context("seeded piece without a crc")?;
                if store.set_digest(n, d).is_ok() {
                    store.set_trusted_crc(n, crc);
                }
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
        "[throughput]   run: {:.2} GB/s, CPU s: serving {:.2}, receiving {:.2} (hash workers {:.2}), process {:.2}; steal ticks {}, compaction stalls {}; pieces hashed inline {}, hand-overs that waited {}",
        bytes as f64 / secs / 1e9,
        threads_cpu(&serve_tids) - serve0,
        threads_cpu(&recv_tids) - recv0,
        hasher_cpu(&recv_tids) - hash0,
        cpu_seconds() - cpu0,
        m1.0 - m0.0,
        m1.1 - m0.1,
        Counters::get(&b.counters.pieces_hashed_inline) - inline0,
        Counters::get(&b.counters.hash_handover_waits) - waits0,
    );
    Ok(Sample {
        secs,
        bytes,
        cpu_secs: cpu_seconds() - cpu0,
        serve_cpu_secs: threads_cpu(&serve_tids) - serve0,
    })
}

/// (e) one download through a node whose download limit is `--shaped-mbps`.
pub(crate) fn shaped_row(
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
pub(crate) fn verify_rows(
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
        // Each round's pair ran back to back: its ratio shows how much of the best-of
        // ratio is luck.
        let mut paired: Vec<f64> = off
            .iter()
            .zip(&on)
            .map(|(a, b)| b.gbps() / a.gbps())
            .collect();
        paired.sort_by(f64::total_cmp);
        let median = paired.get(paired.len() / 2).copied().unwrap_or(f64::NAN);
        rows.push((quic, best(off), best(on), median));
    }
    println!();
    for (quic, off, on, median) in rows {
        let name = if quic {
            "(d) our QUIC, 1 thread per side"
        } else {
            "(b) our TCP, 1 thread per side"
        };
        println!(
            "{name}: {:.2} GB/s ({:.2} cores per GB/s); pieces verified: {:.2} GB/s ({:.2} cores per GB/s); ratio {:.2} (best of each); median of the rounds' paired ratios {median:.2}",
            off.gbps(),
            off.cpu_per_gbps(),
            on.gbps(),
            on.cpu_per_gbps(),
            on.gbps() / off.gbps()
        );
    }
    Ok(())
}

pub(crate) fn run_ours(
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
