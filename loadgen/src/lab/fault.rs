//! Faults injected during a P2P burst (`loadgen cluster --fault kill-seed@3s`): each
//! `--fault` adds one P2P phase of its own (a new file, so a new task) in which the fault
//! happens at its time after the burst starts; the report compares it with the no-fault
//! phase of the same run.

use std::time::Duration;

use serde::Serialize;

/// What happens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// The seed peer's daemon is SIGKILLed (started again after the phase).
    KillSeed,
    /// The seed peer's daemon is SIGSTOPped: its sockets stay open and it sends nothing
    /// (SIGCONT after the phase). It is every peer's first parent, so this is the stalled
    /// parent.
    StallParent,
    /// The scheduler is SIGKILLed (started again after the phase).
    KillScheduler,
    /// The scheduler is SIGKILLed and started again at once (an empty state).
    RestartScheduler,
    /// This share of the peer hosts' daemons (at least one) is SIGKILLed; their downloads
    /// fail, the others' must not. Started again after the phase.
    KillPeers(f64),
}

/// One `--fault`: a kind and its time after the burst starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// What happens.
    pub kind: FaultKind,
    /// When, after the burst starts.
    pub at: Duration,
    /// As written on the command line (the report's name of the phase).
    pub spec: String,
}

/// Parses `kill-seed@3s`, `stall-parent@2s` (or `stop-seed@2s`), `kill-scheduler@2s`,
/// `restart-scheduler@2s`, `kill-peers:25%@3s`; the time takes `s` or `ms`.
pub fn parse(s: &str) -> Result<Fault, String> {
    let (what, at) = s
        .split_once('@')
        .ok_or_else(|| format!("fault {s:?}: expected <kind>@<time>, e.g. kill-seed@3s"))?;
    let at =
        parse_time(at).ok_or_else(|| format!("fault {s:?}: bad time {at:?} (e.g. 3s, 500ms)"))?;
    let kind = match what {
        "kill-seed" => FaultKind::KillSeed,
        "stall-parent" | "stop-seed" => FaultKind::StallParent,
        "kill-scheduler" => FaultKind::KillScheduler,
        "restart-scheduler" => FaultKind::RestartScheduler,
        w => match w.strip_prefix("kill-peers:").and_then(|p| p.strip_suffix('%')) {
            Some(p) => {
                let pct: f64 = p
                    .parse()
                    .map_err(|_| format!("fault {s:?}: bad share {p:?}"))?;
                if !(pct > 0.0 && pct < 100.0) {
                    return Err(format!("fault {s:?}: the share must be in (0, 100) %"));
                }
                FaultKind::KillPeers(pct / 100.0)
            }
            None => {
                return Err(format!(
                "fault {s:?}: unknown kind {w:?} (kill-seed, stall-parent, kill-scheduler, restart-scheduler, kill-peers:<n>%)"
            ))
            }
        },
    };
    Ok(Fault {
        kind,
        at,
        spec: s.to_string(),
    })
}

fn parse_time(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    let secs: f64 = s.strip_suffix('s')?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

impl Fault {
    /// How many of `hosts` peer hosts a `kill-peers` fault kills (0 for other kinds).
    pub fn peers_killed(&self, hosts: usize) -> usize {
        match self.kind {
            FaultKind::KillPeers(share) => {
                ((share * hosts as f64).round() as usize).clamp(1, hosts.saturating_sub(1).max(1))
            }
            _ => 0,
        }
    }
}

/// One fault's line in the report: its phase against the same run's no-fault phase.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRow {
    /// The `--fault` as given.
    pub fault: String,
    /// Peer hosts whose daemon the fault killed (their downloads are not counted).
    pub killed: Vec<String>,
    /// Surviving hosts.
    pub surviving: usize,
    /// Surviving hosts with a verified copy.
    pub verified: usize,
    /// Slowest surviving host, seconds (infinite when one failed).
    pub max_s: f64,
    /// `max_s` over the no-fault phase's `max_s`.
    pub max_vs_no_fault: f64,
    /// Origin body bytes during the phase, over the file size.
    pub origin_copies_payload: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fault_kinds() {
        let f = parse("kill-seed@3s").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (f.kind, f.at),
            (FaultKind::KillSeed, Duration::from_secs(3))
        );
        let f = parse("kill-peers:25%@2.5s").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.kind, FaultKind::KillPeers(0.25));
        assert_eq!(f.at, Duration::from_millis(2500));
        assert_eq!(f.peers_killed(10), 3);
        assert_eq!(f.peers_killed(2), 1);
        let f = parse("stall-parent@500ms").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.kind, FaultKind::StallParent);
        assert_eq!(
            parse("restart-scheduler@2s").map(|f| f.kind),
            Ok(FaultKind::RestartScheduler)
        );
        for bad in [
            "kill-seed",
            "kill-seed@x",
            "melt@3s",
            "kill-peers:0%@1s",
            "kill-peers:ab%@1s",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }
}
