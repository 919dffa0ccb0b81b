//! The simulation's results: a printed table and JSON.

use serde::Serialize;

/// Percentiles of a sample (infinite values count as "never").
#[derive(Debug, Clone, Serialize, Default)]
pub struct Percentiles {
    /// Number of values.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values`.
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            values[rank - 1]
        };
        Self {
            count: values.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// Everything one simulation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Virtual peers (the seed peer not counted).
    pub peers: usize,
    /// Task size in bytes.
    pub size: u64,
    /// Piece length in bytes.
    pub piece_length: u64,
    /// Pieces of the task.
    pub pieces: u32,
    /// Virtual time step.
    pub step_s: f64,
    /// Lower bound T* = max(S/u_origin, S/d_min, N·S/(u_origin + Σu_i)).
    pub t_star_s: f64,
    /// Completion times of the peers (virtual seconds from the burst's start).
    pub completion_s: Percentiles,
    /// Peers that did not finish within the time limit.
    pub unfinished: usize,
    /// Wall time from a request that needs an answer (register with the size known) to the
    /// answer, microseconds.
    pub decision_latency_us: Percentiles,
    /// Registrations sent before the size was known: wall time until metadata woke them.
    pub woken_by_metadata_us: Percentiles,
    /// PieceFinished messages sent.
    pub announcements: u64,
    /// Finished pieces the scheduler counted at the end (StatTask).
    pub announcements_processed: u64,
    /// Wall time from the first announcement until the scheduler had processed them all.
    pub announce_wall_s: f64,
    /// announcements_processed / announce_wall_s.
    pub announcements_per_s: f64,
    /// Bytes fetched from the origin over the task size.
    pub origin_copies: f64,
    /// Bytes the seed peer uploaded over the task size.
    pub seed_copies: f64,
    /// How the peers fetch: `flow`, or the daemon model's settings.
    pub model: String,
    /// Peers told to go back to the origin.
    pub back_to_source: u64,
    /// Parent entries received in CandidateParents.
    pub parents_received: u64,
    /// Of those, parents the modelled daemon dropped (`--model fixed-window`: the old
    /// daemon's `AddParents` race); not counted in `parents_received`.
    pub parents_lost: u64,
    /// Streams the scheduler ended with an error.
    pub streams_failed: u64,
    /// Scheduler CPU seconds (all threads) over the whole run; `None` when the scheduler is
    /// not a local process started by loadgen.
    pub scheduler_cpu_s: Option<f64>,
    /// Scheduler CPU seconds until the first announcement: the registration burst and its
    /// decisions (with `--arrival-s` > 0 later registrations fall in the next phase).
    pub scheduler_cpu_decisions_s: Option<f64>,
    /// Scheduler CPU seconds from the first announcement until all were processed: mostly
    /// `PieceFinished` handling (plus the `PeerFinished` messages and pushes in that phase).
    pub scheduler_cpu_announcements_s: Option<f64>,
    /// This process's CPU seconds (simulation, flow solver, gRPC client).
    pub loadgen_cpu_s: Option<f64>,
    /// Time the scheduler's swarm state took per registration (the parent decision itself,
    /// without gRPC, queueing or the way back), from its
    /// `damselfly_scheduler_registration_seconds` histogram, in µs; quantiles are the upper
    /// bounds of their buckets.
    pub scheduler_decision_us: Option<BucketQuantiles>,
    /// `--pin`: the scheduler ran on CPU 0, the simulator on the other CPUs.
    pub pinned: bool,
    /// `--scheduler-threads`: tokio workers of the started scheduler (`None`: its default,
    /// one per CPU it may run on).
    pub scheduler_threads: Option<usize>,
    /// 1-minute load average of the machine when the run started.
    pub load_average_start: Option<f64>,
    /// 1-minute load average when it ended.
    pub load_average_end: Option<f64>,
    /// Virtual time simulated.
    pub virtual_s: f64,
    /// Wall time of the simulation loop.
    pub sim_wall_s: f64,
    /// Wall time of the whole run.
    pub wall_s: f64,
}

/// Quantiles read off a Prometheus histogram: each is the upper bound of the first bucket
/// holding that share of the observations.
#[derive(Debug, Clone, Serialize)]
pub struct BucketQuantiles {
    /// Observations.
    pub count: u64,
    /// Upper bound of the median's bucket (scaled).
    pub p50: f64,
    /// Upper bound of the 99th percentile's bucket (scaled).
    pub p99: f64,
}

/// `GET /metrics` from `addr` (plain HTTP/1.0), the body as text.
pub fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: scheduler\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in the answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!("answer: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// p50 and p99 of histogram `name` in Prometheus text `text`, each multiplied by `scale`;
/// `None` when the histogram is missing or empty.
pub fn histogram_quantiles(text: &str, name: &str, scale: f64) -> Option<BucketQuantiles> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (le, tail) = rest.split_once('"')?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let count = tail.trim_start_matches('}').trim().parse().ok()?;
        buckets.push((le, count));
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = buckets.last()?.1;
    if count == 0 {
        return None;
    }
    let at = |q: f64| {
        let want = (q * count as f64).ceil() as u64;
        buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map_or(f64::INFINITY, |(le, _)| le * scale)
    };
    Some(BucketQuantiles {
        count,
        p50: at(0.5),
        p99: at(0.99),
    })
}

impl Report {
    /// Human-readable table.
    pub fn table(&self) -> String {
        let c = &self.completion_s;
        let d = &self.decision_latency_us;
        let w = &self.woken_by_metadata_us;
        let ratio = |x: f64| x / self.t_star_s;
        let mut s = String::new();
        s += &format!(
            "peers {}  size {} MiB  piece {} MiB ({} pieces)  step {} ms\n",
            self.peers,
            self.size >> 20,
            self.piece_length >> 20,
            self.pieces,
            self.step_s * 1e3
        );
        s += &format!("{:<34}{:>12}{:>12}{:>12}\n", "", "p50", "p99", "max");
        s += &format!(
            "{:<34}{:>12.1}{:>12.1}{:>12.1}\n",
            "completion (virtual s)", c.p50, c.p99, c.max
        );
        s += &format!(
            "{:<34}{:>12.3}{:>12.3}{:>12.3}\n",
            "completion / T*",
            ratio(c.p50),
            ratio(c.p99),
            ratio(c.max)
        );
        s += &format!(
            "{:<34}{:>12.0}{:>12.0}{:>12.0}\n",
            format!("decision latency (us, n={})", d.count),
            d.p50,
            d.p99,
            d.max
        );
        s += &format!(
            "{:<34}{:>12.0}{:>12.0}{:>12.0}\n",
            format!("woken by metadata (us, n={})", w.count),
            w.p50,
            w.p99,
            w.max
        );
        s += &format!(
            "T* (virtual s)                    {:>12.1}\n",
            self.t_star_s
        );
        s += &format!(
            "announcements/s                   {:>12.0}   ({} processed of {} in {:.1} s)\n",
            self.announcements_per_s,
            self.announcements_processed,
            self.announcements,
            self.announce_wall_s
        );
        if let Some(cpu) = self.scheduler_cpu_announcements_s.filter(|c| *c > 0.0) {
            s += &format!(
                "announcements per scheduler CPU s {:>12.0}   ({:.2} us CPU each, {:.1} s CPU)\n",
                self.announcements_processed as f64 / cpu,
                cpu * 1e6 / self.announcements_processed.max(1) as f64,
                cpu
            );
        }
        if let Some(q) = &self.scheduler_decision_us {
            s += &format!(
                "{:<34}{:>12}{:>12}   (state time, bucket bounds)\n",
                format!("decision in scheduler (us, n={})", q.count),
                format!("<= {}", q.p50),
                format!("<= {}", q.p99),
            );
        }
        if let Some(cpu) = self.scheduler_cpu_decisions_s {
            s += &format!(
                "scheduler CPU in registrations    {:>12.2} s   ({:.0} us per registration)\n",
                cpu,
                cpu * 1e6 / self.peers.max(1) as f64
            );
        }
        s += &format!(
            "origin copies                     {:>12.3}\n",
            self.origin_copies
        );
        s += &format!(
            "seed upload copies                {:>12.3}   (model: {})\n",
            self.seed_copies, self.model
        );
        s += &format!(
            "back to source {}  unfinished {}  failed streams {}  parents received {}  lost {}\n",
            self.back_to_source,
            self.unfinished,
            self.streams_failed,
            self.parents_received,
            self.parents_lost
        );
        s += &format!(
            "virtual {:.1} s simulated in {:.1} s wall ({:.1} s total)\n",
            self.virtual_s, self.sim_wall_s, self.wall_s
        );
        let opt = |x: Option<f64>| x.map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"));
        s += &format!(
            "CPU s: scheduler {}  loadgen {}   load average {} -> {}{}{}\n",
            opt(self.scheduler_cpu_s),
            opt(self.loadgen_cpu_s),
            opt(self.load_average_start),
            opt(self.load_average_end),
            if self.pinned {
                "   (pinned: scheduler on CPU 0, simulator on the others)"
            } else {
                ""
            },
            self.scheduler_threads
                .map(|n| format!("   (scheduler with {n} tokio worker(s))"))
                .unwrap_or_default()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_take_the_bucket_bounds() {
        let text = "# TYPE x histogram\n\
                    x_sum 1.0\n\
                    x_count 100\n\
                    x_bucket{le=\"0.000001\"} 0\n\
                    x_bucket{le=\"0.000002\"} 60\n\
                    x_bucket{le=\"0.000004\"} 98\n\
                    x_bucket{le=\"0.000008\"} 100\n\
                    x_bucket{le=\"+Inf\"} 100\n";
        let q = histogram_quantiles(text, "x", 1e6).expect("quantiles");
        assert_eq!(q.count, 100);
        assert!((q.p50 - 2.0).abs() < 1e-9, "{q:?}");
        assert!((q.p99 - 8.0).abs() < 1e-9, "{q:?}");
        assert!(histogram_quantiles(text, "y", 1.0).is_none());
    }

    #[test]
    fn nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p99, p.max, p.count), (50.0, 99.0, 100.0, 100));
        let p = Percentiles::of(vec![3.0]);
        assert_eq!((p.p50, p.p99, p.max), (3.0, 3.0, 3.0));
        assert_eq!(Percentiles::of(vec![]).count, 0);
    }
}
