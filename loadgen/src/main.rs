//! `loadgen`: Damselfly benchmarks. `loadgen simulate` drives a real scheduler process with
//! thousands of virtual peers over gRPC and a flow-level model of their links. `loadgen
//! cluster` is the burst lab: real processes in network namespaces on shaped links.

mod client;
mod cpu;
mod flow;
mod lab;
mod report;
mod sim;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rand::seq::SliceRandom as _;
use rand::SeedableRng as _;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Damselfly load generator.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Simulate a burst: N virtual peers fetch one task through a real scheduler.
    Simulate(Simulate),
    /// Burst lab (root): origin, scheduler, seed peer and N dfdaemons in network namespaces
    /// on shaped links; N dfget at once, then a BitTorrent swarm (aria2c) and N plain HTTP
    /// downloads on the same links; ratios to T*, origin and seed copies.
    Cluster(lab::ClusterArgs),
    /// The lab's HTTP origin (started by `loadgen cluster` inside a namespace).
    #[command(hide = true)]
    LabOrigin(lab::origin::OriginArgs),
}

/// Options of `loadgen simulate`.
#[derive(Debug, clap::Args)]
struct Simulate {
    /// Virtual peers (the seed peer comes on top).
    #[arg(long, default_value_t = 10_000)]
    peers: usize,
    /// Task size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Piece length in MiB (default: what the daemon's rule picks for --size-mib, 1 MiB for
    /// 1 GiB; Dragonfly's rule would pick 4 MiB).
    #[arg(long, conflicts_with = "piece_kib")]
    piece_mib: Option<u64>,
    /// Piece length in KiB (for pieces below 1 MiB).
    #[arg(long)]
    piece_kib: Option<u64>,
    /// Up and down rate of every peer, Mbit/s (ignored with --mixed).
    #[arg(long, default_value_t = 100.0)]
    host_mbit: f64,
    /// Origin upload rate, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    origin_mbit: f64,
    /// The seed peer's up and down rate, Mbit/s (default: --origin-mbit, as the lab's
    /// `--seed-rate` defaults to its peers' rate).
    #[arg(long)]
    seed_mbit: Option<f64>,
    /// How the virtual peers fetch: `daemon` = as today's daemon (request windows sized by
    /// rate, piece choice among the peer's own parents when it asks, a super-seeding seed);
    /// `fixed-window` = as the daemon before 2026-12-06 (8 requests per parent, a seed that
    /// answers every request); `flow` = the idealised flow model (no request queues, rarest
    /// over the whole swarm at the moment a connection is free).
    #[arg(long, value_enum, default_value = "daemon")]
    model: Model,
    /// With `--model daemon`: the seed's copy slots (`seed_peer.copy_slots`).
    #[arg(long, default_value_t = dataplane::seeding::COPY_SLOTS)]
    copy_slots: u32,
    /// Mixed fleet: 40% 100 Mbit, 30% 1 Gbit, 20% 50 Mbit, 10% 20 Mbit; three IDCs.
    #[arg(long)]
    mixed: bool,
    /// Virtual time step, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    step_ms: f64,
    /// Peers arrive uniformly over this many virtual seconds (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    arrival_s: f64,
    /// Registrations awaiting an answer at once.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// HTTP/2 connections to the scheduler (peers' streams are spread over them).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Stop after this much virtual time, seconds.
    #[arg(long, default_value_t = 3600.0)]
    max_virtual_s: f64,
    /// Piece choice of the virtual peers: rarest first over the swarm, or random.
    #[arg(long, value_enum, default_value = "rarest")]
    piece_choice: PieceChoice,
    /// Random seed of the simulator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Parent-side upload ordering: a parent serves its first K piece requests (FIFO by
    /// request time) first; 0 = every request shares the uplink equally (max-min fair).
    #[arg(long, default_value_t = 0)]
    upload_first: usize,
    /// What the requests behind the first K get: `priority` = whatever upload the first K
    /// leave unused (work-conserving), `queue` = nothing until they move up.
    #[arg(long, value_enum, default_value = "priority")]
    upload_order: UploadOrder,
    /// With --upload-first: which requests come first, the oldest or those of the children
    /// holding the fewest pieces.
    #[arg(long, value_enum, default_value = "oldest")]
    upload_prefer: UploadPrefer,
    /// Use a running scheduler instead of starting target/<profile>/scheduler.
    #[arg(long, value_name = "ADDR")]
    scheduler: Option<SocketAddr>,
    /// Scheduler binary to start (default: `scheduler` next to this executable).
    #[arg(long, value_name = "PATH")]
    scheduler_bin: Option<PathBuf>,
    /// Run the scheduler this starts on CPU 0 alone and the simulator on the other CPUs
    /// (`taskset`), as if the scheduler had its own machine: its decisions then do not
    /// queue behind the simulated peers' work. Needs 2 CPUs or more.
    #[arg(long, conflicts_with = "scheduler")]
    pin: bool,
    /// Tokio worker threads of the started scheduler (its `--worker-threads`; default: one
    /// per CPU it may run on, so 1 with `--pin`). With 2 CPUs and no `--pin`, 1 leaves the
    /// second core to the simulator instead of three busy threads taking turns on two.
    #[arg(long, value_name = "N", conflicts_with = "scheduler")]
    scheduler_threads: Option<usize>,
    /// YAML configuration for the started scheduler.
    #[arg(long, value_name = "PATH")]
    scheduler_config: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// How the virtual peers fetch (`--model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Model {
    /// Today's daemon.
    Daemon,
    /// The daemon before the scarce-seed work.
    FixedWindow,
    /// The flow model.
    Flow,
}

/// How virtual peers choose the next piece from a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PieceChoice {
    /// Fewest holders (plus transfers in flight) in the whole swarm.
    Rarest,
    /// Uniformly random among the pieces the parent has and the peer lacks.
    Random,
}

/// What a parent's requests behind the first `--upload-first` get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UploadOrder {
    /// The upload the first K leave unused.
    Priority,
    /// Nothing (they wait in a FIFO queue).
    Queue,
    /// Per piece: a parent's first K requests of each piece it holds come first, the rest
    /// get what they leave (work-conserving).
    Piece,
}

/// Which of a parent's requests come first with `--upload-first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UploadPrefer {
    /// Oldest request first (FIFO).
    Oldest,
    /// Child holding the fewest pieces first, then the oldest.
    Poorest,
}

const MBIT: f64 = 125_000.0;

fn params(a: &Simulate) -> sim::Params {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let (hosts, placement) = if a.mixed {
        let mut rates: Vec<f64> = (0..a.peers)
            .map(|i| match i % 10 {
                0..=3 => 100.0,
                4..=6 => 1000.0,
                7..=8 => 50.0,
                _ => 20.0,
            })
            .collect();
        rates.shuffle(&mut rng);
        let hosts = rates
            .iter()
            .map(|r| sim::Links {
                up: r * MBIT,
                down: r * MBIT,
            })
            .collect();
        let placement = (0..a.peers)
            .map(|i| {
                (
                    format!("idc-{}", i % 3),
                    format!("cn|r{}|z{}", i % 3, i % 6),
                )
            })
            .collect();
        (hosts, placement)
    } else {
        let l = sim::Links {
            up: a.host_mbit * MBIT,
            down: a.host_mbit * MBIT,
        };
        (vec![l; a.peers], Vec::new())
    };
    sim::Params {
        size: a.size_mib << 20,
        piece_length: piece_length(a),
        hosts,
        placement,
        origin_rate: a.origin_mbit * MBIT,
        seed_rate: a.seed_mbit.unwrap_or(a.origin_mbit) * MBIT,
        daemon: match a.model {
            Model::Daemon => Some(sim::DaemonModel {
                super_seed: Some(a.copy_slots),
                ..sim::DaemonModel::current()
            }),
            Model::FixedWindow => Some(sim::DaemonModel::fixed_window()),
            Model::Flow => None,
        },
        step: a.step_ms / 1e3,
        arrival: a.arrival_s,
        window: a.window.max(1),
        max_time: a.max_virtual_s,
        seed: a.seed,
        random_pieces: a.piece_choice == PieceChoice::Random,
        upload_first: a.upload_first,
        upload_queue: a.upload_order == UploadOrder::Queue,
        upload_per_piece: a.upload_order == UploadOrder::Piece,
        upload_poorest: a.upload_prefer == UploadPrefer::Poorest,
    }
}

/// The piece length of the simulated task: `--piece-mib`, or the daemon's own rule.
fn piece_length(a: &Simulate) -> u64 {
    if let Some(k) = a.piece_kib {
        return k << 10;
    }
    a.piece_mib.map_or_else(
        || {
            wire::piece::piece_length_for(
                a.size_mib << 20,
                wire::piece::DEFAULT_MIN_PIECE_LENGTH,
                wire::piece::MAX_PIECE_LENGTH,
            )
        },
        |m| m << 20,
    )
}

/// Moves this process (still one thread) to every CPU but 0, for `--pin`; returns that
/// CPU list. Threads started afterwards inherit it.
fn pin_self_off_cpu0() -> anyhow::Result<String> {
    let n = std::thread::available_parallelism().map_or(1, usize::from);
    if n < 2 {
        anyhow::bail!("--pin needs at least 2 CPUs, this machine has {n}");
    }
    let cpus = format!("1-{}", n - 1);
    let status = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", &cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset for --pin (Debian package util-linux)")?;
    if !status.success() {
        anyhow::bail!("taskset -a -c -p {cpus} failed: {status}");
    }
    Ok(cpus)
}

fn simulate(a: Simulate) -> anyhow::Result<()> {
    if a.peers == 0
        || a.size_mib == 0
        || a.piece_mib == Some(0)
        || a.piece_kib == Some(0)
        || a.step_ms <= 0.0
    {
        anyhow::bail!("--peers, --size-mib, --piece-mib and --step-ms must be positive");
    }
    let pinned = if a.pin {
        Some(pin_self_off_cpu0()?)
    } else {
        None
    };
    // Single-threaded, driven by the simulation while it waits (see `sim::Io`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(sim::EVENT_INTERVAL)
        .build()
        .context("starting the tokio runtime")?;
    let _process;
    let mut scheduler_pid = None;
    let mut scheduler_metrics = None;
    let addr = match a.scheduler {
        Some(addr) => addr,
        None => {
            let bin = match &a.scheduler_bin {
                Some(b) => b.clone(),
                None => client::default_scheduler_binary()?,
            };
            let p = client::spawn_scheduler(
                &bin,
                a.scheduler_config.as_ref(),
                a.pin,
                a.scheduler_threads,
            )?;
            let addr = p.addr;
            scheduler_pid = Some(p.pid());
            scheduler_metrics = p.metrics;
            _process = p;
            addr
        }
    };
    eprintln!("scheduler at {addr}; simulating {} peers", a.peers);
    if let Some(cpus) = &pinned {
        eprintln!("pinned: scheduler on CPU 0, simulator on CPUs {cpus}");
    }
    let channels = rt.block_on(client::connect(addr, a.connections))?;
    let (inbound, events) = tokio::sync::mpsc::unbounded_channel();
    let io = sim::Io {
        rt: &rt,
        channels,
        events: std::cell::RefCell::new(events),
        inbound,
        scheduler_pid,
        scheduler_metrics,
    };
    let mut report = sim::run(params(&a), io)?;
    report.pinned = pinned.is_some();
    report.scheduler_threads = a.scheduler_threads;
    print!("{}", report.table());
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Simulate(s) => simulate(s),
        Cmd::Cluster(c) => lab::cluster(c),
        Cmd::LabOrigin(o) => lab::origin::serve(o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
