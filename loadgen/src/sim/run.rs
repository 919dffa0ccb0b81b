//! [`run`]: the simulation from registrations to the report.

use super::*;

/// Runs the whole simulation (blocking; call from a blocking thread).
pub fn run(p: Params, io: Io<'_>) -> anyhow::Result<Report> {
    let wall = Instant::now();
    let load_start = cpu::load_average();
    let own_cpu_start = cpu::own_cpu_s();
    let sched_cpu_start = io.scheduler_pid.and_then(cpu::process_cpu_s);
    let mut sim = Sim::new(p)?;
    sim.scheduler_pid = io.scheduler_pid;
    let seed_host = sim.hosts[sim.n].clone();
    io.rt.block_on(client::announce_host(
        io.channels[0].clone(),
        seed_host,
        io.inbound.clone(),
    ))?;
    // Arrival order: latest first in the vector, so that `pop` yields the earliest.
    let mut next: Vec<u32> = (0..sim.n as u32).collect();
    next.sort_by(|a, b| sim.arrival[*b as usize].total_cmp(&sim.arrival[*a as usize]));
    let mut solver = Solver::default();
    let (mut flows, mut refs, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_report = Instant::now();
    while sim.normal_done() < sim.n {
        if sim.t > sim.p.max_time {
            eprintln!(
                "virtual time limit {:.0} s reached with {} peers unfinished",
                sim.p.max_time,
                sim.n - sim.normal_done()
            );
            break;
        }
        sim.arrivals(&io, &mut next)?;
        sim.pump(&io, true)?;
        sim.step(&mut solver, &mut flows, &mut refs, &mut rates);
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  virtual {:6.1} s  done {:6}/{}  announcements {}  wall {:.0} s",
                sim.t,
                sim.normal_done(),
                sim.n,
                sim.announcements,
                wall.elapsed().as_secs_f64()
            );
        }
    }
    let sim_end = Instant::now();
    // Wait until the scheduler has processed every announcement (StatTask counts them).
    let mut client = SchedulerClient::new(io.channels[0].clone());
    let expected: u64 = sim.count.iter().map(|c| u64::from(*c)).sum();
    let mut processed = 0u64;
    let confirm_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < confirm_deadline {
        let info = io.rt.block_on(client.stat_task(StatTaskRequest {
            task_id: sim.task_id.clone(),
        }));
        processed = match info {
            Ok(r) => r
                .into_inner()
                .peers
                .iter()
                .map(|p| u64::from(p.finished_pieces))
                .sum(),
            Err(e) => {
                eprintln!("StatTask failed: {e}");
                0
            }
        };
        if processed >= expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_processed = Instant::now();
    let sched_cpu_end = io.scheduler_pid.and_then(cpu::process_cpu_s);
    let own_cpu_end = cpu::own_cpu_s();
    let announce_secs = sim.first_announce.map_or(0.0, |f| {
        all_processed.saturating_duration_since(f).as_secs_f64()
    });

    // Close every stream.
    for tx in &mut sim.tx {
        tx.take();
    }
    let n = sim.n as f64;
    let s = sim.p.size as f64;
    let d_min = sim.links[..sim.n]
        .iter()
        .map(|l| l.down)
        .fold(f64::INFINITY, f64::min);
    let sum_up: f64 = sim.links[..sim.n].iter().map(|l| l.up).sum();
    let t_star = (s / sim.p.origin_rate)
        .max(s / d_min)
        .max(n * s / (sim.p.origin_rate + sum_up));
    let completion: Vec<f64> = sim.done_at[..sim.n]
        .iter()
        .map(|d| d.unwrap_or(f64::INFINITY))
        .collect();
    Ok(Report {
        peers: sim.n,
        size: sim.p.size,
        piece_length: sim.p.piece_length,
        pieces: sim.pieces,
        step_s: sim.p.step,
        t_star_s: t_star,
        completion_s: Percentiles::of(completion),
        unfinished: sim.n - sim.normal_done(),
        decision_latency_us: Percentiles::of(std::mem::take(&mut sim.decision_us)),
        woken_by_metadata_us: Percentiles::of(std::mem::take(&mut sim.woken_us)),
        announcements: sim.announcements,
        announcements_processed: processed,
        announce_wall_s: announce_secs,
        announcements_per_s: if announce_secs > 0.0 {
            processed.min(sim.announcements) as f64 / announce_secs
        } else {
            0.0
        },
        origin_copies: sim.origin_bytes / s,
        seed_copies: sim.seed_bytes / s,
        model: sim
            .p
            .daemon
            .map_or_else(|| "flow".to_owned(), |m| m.describe()),
        back_to_source: sim.back_to_source,
        parents_received: sim.parents_received,
        parents_lost: sim.daemon.as_ref().map_or(0, |d| d.parents_lost),
        streams_failed: sim.closed_with_error,
        scheduler_cpu_s: sched_cpu_end.zip(sched_cpu_start).map(|(e, s)| e - s),
        scheduler_cpu_decisions_s: sim
            .sched_cpu_at_first_announce
            .zip(sched_cpu_start)
            .map(|(e, s)| e - s),
        scheduler_cpu_announcements_s: sched_cpu_end
            .zip(sim.sched_cpu_at_first_announce)
            .map(|(e, s)| e - s),
        loadgen_cpu_s: own_cpu_end.zip(own_cpu_start).map(|(e, s)| e - s),
        scheduler_decision_us: io.scheduler_metrics.and_then(|addr| {
            let text = crate::report::scrape(addr)
                .map_err(|e| eprintln!("scraping the scheduler's metrics at {addr}: {e:#}"))
                .ok()?;
            crate::report::histogram_quantiles(
                &text,
                "damselfly_scheduler_registration_seconds",
                1e6,
            )
        }),
        pinned: false,
        scheduler_threads: None,
        load_average_start: load_start,
        load_average_end: cpu::load_average(),
        virtual_s: sim.t,
        sim_wall_s: sim_end.duration_since(wall).as_secs_f64(),
        wall_s: wall.elapsed().as_secs_f64(),
    })
}
