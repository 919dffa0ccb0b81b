//! CPU time of processes, from `/proc` (Linux only; `None` elsewhere or when unreadable).
//!
//! The simulator and the scheduler share the machine's cores, so wall-clock rates say as much
//! about the simulator as about the scheduler. The scheduler's own CPU time per announcement
//! (or decision) is the measure of its capacity that does not depend on the simulator.

use std::path::Path;

/// CPU seconds (user + system, all live threads) used so far by process `pid`, summed from
/// `/proc/<pid>/task/*/schedstat` (nanosecond resolution). Threads that already exited are
/// not counted, which only matters for short-lived helper threads.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    tasks_cpu_s(&Path::new("/proc").join(pid.to_string()).join("task"))
}

/// [`process_cpu_s`] of this process.
pub fn own_cpu_s() -> Option<f64> {
    tasks_cpu_s(Path::new("/proc/self/task"))
}

fn tasks_cpu_s(dir: &Path) -> Option<f64> {
    let mut total_ns: u64 = 0;
    for entry in std::fs::read_dir(dir).ok()? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        total_ns = total_ns.saturating_add(ns);
    }
    Some(total_ns as f64 / 1e9)
}

/// The 1-minute load average, if readable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_with_work() {
        let Some(before) = own_cpu_s() else {
            return; // not Linux
        };
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = own_cpu_s().unwrap_or(0.0);
        assert!(after > before, "{before} -> {after}");
        assert!(process_cpu_s(std::process::id()).is_some());
    }
}
