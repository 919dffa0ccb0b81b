//! What a row measured ([`Sample`]) and the CPU accounting behind it: this process's CPU
//! time, the serving node's threads from `/proc/self/task/TID/stat`, the hash workers apart,
//! and the machine counters that explain a slow run.

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) bytes: u64,
    pub(crate) cpu_secs: f64,
    /// CPU seconds of the serving node's threads alone (0 when not measured).
    pub(crate) serve_cpu_secs: f64,
}

impl Sample {
    pub(crate) fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
    pub(crate) fn cpu_per_gbps(&self) -> f64 {
        // CPU seconds per second of transfer, per GB/s moved: cores used per GB/s.
        (self.cpu_secs / self.secs) / self.gbps()
    }
    pub(crate) fn serve_cpu_per_gbps(&self) -> f64 {
        (self.serve_cpu_secs / self.secs) / self.gbps()
    }
}

/// Machine counters that explain a slow run: CPU ticks stolen by the hypervisor
/// (`/proc/stat`) and direct compaction stalls (`/proc/vmstat`).
pub(crate) fn machine_counters() -> (u64, u64) {
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
pub(crate) fn threads_cpu(tids: &[u32]) -> f64 {
    threads_cpu_of(tids, |_| true)
}

/// CPU seconds of the threads among `tids` that `keep` accepts.
pub(crate) fn threads_cpu_of(tids: &[u32], keep: impl Fn(u32) -> bool) -> f64 {
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
pub(crate) fn is_hasher(tid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .is_ok_and(|c| c.starts_with("dataplane-hash"))
}

/// CPU seconds of the hash-worker threads among `tids`.
pub(crate) fn hasher_cpu(tids: &[u32]) -> f64 {
    threads_cpu_of(tids, is_hasher)
}

pub(crate) fn best(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    v[0]
}
