//! Results of a lab run: T*, ratios, the table, JSON and the completion CDF as SVG.

use std::fmt::Write as _;

use serde::Serialize;

/// T* = max(S/u_origin, S/d_min, N·S/(u_origin + Σu_i)), rates in bytes/s.
pub fn t_star(size: u64, origin_up: f64, peers_down: &[f64], peers_up: &[f64]) -> f64 {
    let s = size as f64;
    let n = peers_down.len() as f64;
    let d_min = peers_down.iter().copied().fold(f64::INFINITY, f64::min);
    let sum_up: f64 = peers_up.iter().sum();
    (s / origin_up)
        .max(s / d_min)
        .max(n * s / (origin_up + sum_up))
}

/// One host's download in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct HostResult {
    /// Host name (`peer-3`).
    pub host: String,
    /// Seconds from the burst start to the end of its download (`None`: failed).
    pub seconds: Option<f64>,
    /// Whether the copy's sha256 matched.
    pub verified: bool,
    /// Error, if any (non-zero exit, digest mismatch, timeout).
    pub error: Option<String>,
    /// Bytes from the origin / seed peers / other peers, as dfget reported them.
    pub from_origin: Option<u64>,
    /// See `from_origin`.
    pub from_seed: Option<u64>,
    /// See `from_origin`.
    pub from_peers: Option<u64>,
}

/// Completion-time percentiles, seconds and as ratios of T*.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `p2p` (dfget through the daemons), `bittorrent` (aria2c from a seeder on the seed
    /// peer's host) or `http` (curl straight from the origin).
    pub name: String,
    /// Per host.
    pub hosts: Vec<HostResult>,
    /// Median completion, seconds (failed hosts count as infinitely late).
    pub p50_s: f64,
    /// Slowest completion, seconds.
    pub max_s: f64,
    /// `p50_s / T*`.
    pub p50_ratio: f64,
    /// `max_s / T*`.
    pub max_ratio: f64,
    /// Bytes the origin's link sent during the phase, over the file size (frame headers
    /// included, so 1.0 copy shows as ~1.04).
    pub origin_copies_link: f64,
    /// Body bytes the origin server sent during the phase (its own count), over the file
    /// size.
    pub origin_copies_payload: Option<f64>,
    /// Bytes the seed peer's host (its `eth0`) sent during the phase, over the file size:
    /// the seed's upload copies at link level (frame headers and the ACKs of its own
    /// downloads included, so one copy shows as ~1.04). In the BitTorrent phase the seeding
    /// aria2c runs on that host.
    pub seed_copies_link: f64,
    /// The peers' bytes from seed peers (dfget's summaries) summed, over the file size: the
    /// seed's upload copies as payload. Only where the downloads report their sources (P2P).
    pub seed_copies_payload: Option<f64>,
    /// Copies whose sha256 matched.
    pub verified: usize,
    /// CPU seconds used during the phase, per role (`daemons`, `seed`, `scheduler`,
    /// `origin`), `machine` (every core's busy time from /proc/stat, other users included),
    /// `machine_system` and `machine_softirq` (kernel time; the links' work is softirq).
    pub cpu_s: Vec<(String, f64)>,
}

/// Nearest-rank percentile of completion times (failed = +inf).
pub fn percentile(times: &[f64], p: f64) -> f64 {
    if times.is_empty() {
        return f64::NAN;
    }
    let mut v = times.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Bytes counted during one phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Bytes the origin host's `eth0` sent.
    pub origin_link: u64,
    /// Body bytes the origin server counted (`None`: its count could not be read).
    pub origin_payload: Option<u64>,
    /// Bytes the seed peer host's `eth0` sent.
    pub seed_link: u64,
}

impl Phase {
    /// Builds the summary of one phase from its hosts' results and the bytes counted during
    /// it.
    pub fn new(
        name: &str,
        hosts: Vec<HostResult>,
        t_star: f64,
        size: u64,
        traffic: Traffic,
        cpu_s: Vec<(String, f64)>,
    ) -> Self {
        let times: Vec<f64> = hosts
            .iter()
            .map(|h| match (h.verified, h.seconds) {
                (true, Some(s)) => s,
                _ => f64::INFINITY,
            })
            .collect();
        let p50 = percentile(&times, 0.5);
        let max = percentile(&times, 1.0);
        let copies = |bytes: u64| bytes as f64 / size as f64;
        let from_seed: Vec<u64> = hosts.iter().filter_map(|h| h.from_seed).collect();
        Self {
            name: name.to_string(),
            verified: hosts.iter().filter(|h| h.verified).count(),
            p50_s: p50,
            max_s: max,
            p50_ratio: p50 / t_star,
            max_ratio: max / t_star,
            origin_copies_link: copies(traffic.origin_link),
            origin_copies_payload: traffic.origin_payload.map(copies),
            seed_copies_link: copies(traffic.seed_link),
            seed_copies_payload: (!from_seed.is_empty()).then(|| copies(from_seed.iter().sum())),
            hosts,
            cpu_s,
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Peers (the seed peer comes on top).
    pub hosts: usize,
    /// File size, bytes.
    pub size: u64,
    /// Peer link rate (up and down), bits/s.
    pub rate_bps: u64,
    /// Origin link rate, bits/s.
    pub origin_rate_bps: u64,
    /// Seed peer link rate, bits/s.
    pub seed_rate_bps: u64,
    /// Piece length asked of dfget (0: the daemon's rule).
    pub piece_length: u64,
    /// Shaping qdisc.
    pub qdisc: String,
    /// T*, seconds, from the nominal link rates.
    pub t_star_s: f64,
    /// Phases run (`p2p`, one `fault:<spec>` per `--fault`, then `bittorrent` and `http`
    /// unless skipped).
    pub phases: Vec<Phase>,
    /// One row per `--fault`: its phase against the no-fault `p2p` phase.
    pub faults: Vec<super::fault::FaultRow>,
    /// Piece length of the BitTorrent phase's torrent, bytes (`None`: no such phase).
    pub bittorrent_piece_length: Option<u64>,
    /// Damselfly's P2P phase against the BitTorrent phase, when both ran.
    pub p2p_vs_bittorrent: Option<Comparison>,
    /// Extra daemon / scheduler configuration used, verbatim.
    pub daemon_config: Option<String>,
    /// See `daemon_config`.
    pub scheduler_config: Option<String>,
}

/// Damselfly's P2P phase against BitTorrent on the same links, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// P2P p50 / BitTorrent p50 (below 1: Damselfly's median host was faster; NaN when a
    /// phase has a failed host).
    pub p50_ratio: f64,
    /// P2P max / BitTorrent max (below 1: Damselfly's last host was done sooner).
    pub max_ratio: f64,
    /// Copies the seed peer's host sent in the P2P phase (link level).
    pub seed_copies_p2p: f64,
    /// Copies the seed peer's host sent in the BitTorrent phase (link level).
    pub seed_copies_bittorrent: f64,
}

impl Comparison {
    /// The comparison of phases `p2p` and `bittorrent`, when both are in `phases`.
    pub fn of(phases: &[Phase]) -> Option<Self> {
        let p2p = phases.iter().find(|p| p.name == "p2p")?;
        let bt = phases.iter().find(|p| p.name == "bittorrent")?;
        // A failed host makes its phase's time infinite: no ratio then (NaN, JSON null).
        let ratio = |a: f64, b: f64| {
            if a.is_finite() && b.is_finite() {
                a / b
            } else {
                f64::NAN
            }
        };
        Some(Self {
            p50_ratio: ratio(p2p.p50_s, bt.p50_s),
            max_ratio: ratio(p2p.max_s, bt.max_s),
            seed_copies_p2p: p2p.seed_copies_link,
            seed_copies_bittorrent: bt.seed_copies_link,
        })
    }
}

fn fmt_ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "fail".to_string()
    }
}

impl Report {
    /// Human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} hosts x {:.0} MiB, links {} Mbit, origin {} Mbit, seed {} Mbit, T* = {:.2} s",
            self.hosts,
            self.size as f64 / (1u64 << 20) as f64,
            self.rate_bps / 1_000_000,
            self.origin_rate_bps / 1_000_000,
            self.seed_rate_bps / 1_000_000,
            self.t_star_s
        );
        let w = self
            .phases
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(0)
            .max(10);
        let _ = writeln!(
            s,
            "{:<w$} {:>8} {:>8} {:>7} {:>7} {:>13} {:>14} {:>11} {:>12} {:>8}  cpu s",
            "phase",
            "p50 s",
            "max s",
            "p50/T*",
            "max/T*",
            "origin copies",
            "origin payload",
            "seed copies",
            "seed payload",
            "verified"
        );
        let opt = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.3}"));
        for p in &self.phases {
            let cpu = p
                .cpu_s
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "{:<w$} {:>8.2} {:>8.2} {:>7} {:>7} {:>13.3} {:>14} {:>11.3} {:>12} {:>5}/{:<2}  {cpu}",
                p.name,
                p.p50_s,
                p.max_s,
                fmt_ratio(p.p50_ratio),
                fmt_ratio(p.max_ratio),
                p.origin_copies_link,
                opt(p.origin_copies_payload),
                p.seed_copies_link,
                opt(p.seed_copies_payload),
                p.verified,
                p.hosts.len()
            );
        }
        for f in &self.faults {
            let _ = writeln!(
                s,
                "fault {}: {}/{} surviving hosts verified{}, slowest {:.2} s = {} x the no-fault phase, origin {} copies",
                f.fault,
                f.verified,
                f.surviving,
                if f.killed.is_empty() {
                    String::new()
                } else {
                    format!(" ({} killed: {})", f.killed.len(), f.killed.join(" "))
                },
                f.max_s,
                fmt_ratio(f.max_vs_no_fault),
                opt(f.origin_copies_payload)
            );
        }
        if let Some(len) = self.bittorrent_piece_length {
            let _ = writeln!(
                s,
                "bittorrent: opentracker + aria2c, {} KiB pieces (fixed), seeded from the seed peer's host",
                len >> 10
            );
        }
        if let Some(c) = &self.p2p_vs_bittorrent {
            let _ = writeln!(
                s,
                "Damselfly P2P / BitTorrent: p50 {} x, max {} x (below 1: Damselfly faster); seed host sent {:.2} copies (P2P) vs {:.2} (BitTorrent)",
                fmt_ratio(c.p50_ratio),
                fmt_ratio(c.max_ratio),
                c.seed_copies_p2p,
                c.seed_copies_bittorrent
            );
        }
        s
    }

    /// The completion CDF of every phase against T* (x: seconds / T*, y: share of hosts).
    pub fn svg(&self) -> String {
        let (w, h) = (640.0, 400.0);
        let (left, right, top, bottom) = (60.0, 20.0, 30.0, 50.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        let finite_max = self
            .phases
            .iter()
            .flat_map(|p| p.hosts.iter().filter_map(|x| x.seconds))
            .fold(1.3 * self.t_star_s, f64::max);
        let x_max = (finite_max / self.t_star_s).ceil().max(1.5);
        let x = |r: f64| left + pw * (r / x_max).min(1.0);
        let y = |f: f64| top + ph * (1.0 - f);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="13">{} hosts, {:.0} MiB, {} Mbit links, origin {} Mbit: completion CDF (T* = {:.1} s)</text>"#,
            w / 2.0,
            self.hosts,
            self.size as f64 / (1u64 << 20) as f64,
            self.rate_bps / 1_000_000,
            self.origin_rate_bps / 1_000_000,
            self.t_star_s
        );
        // Axes and grid.
        let ticks = if x_max <= 3.0 {
            0.25
        } else {
            (x_max / 8.0).ceil()
        };
        let mut t = 0.0;
        while t <= x_max + 1e-9 {
            let _ = writeln!(
                s,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{t}</text>"##,
                x(t),
                top,
                top + ph,
                top + ph + 16.0
            );
            t += ticks;
        }
        for i in 0..=4 {
            let f = f64::from(i) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{f}</text>"##,
                y(f),
                left + pw,
                left - 6.0,
                y(f) + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">completion time / T*</text>"#,
            left + pw / 2.0,
            h - 12.0
        );
        let _ = writeln!(
            s,
            r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">share of hosts done</text>"#,
            top + ph / 2.0,
            top + ph / 2.0
        );
        // T* and the targets.
        for (r, label, color) in [
            (1.0, "T*", "#000"),
            (1.1, "1.1", "#999"),
            (1.25, "1.25", "#999"),
        ] {
            let _ = writeln!(
                s,
                r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="{color}" stroke-dasharray="4 3"/><text x="{0:.1}" y="{3}" text-anchor="middle" fill="{color}">{label}</text>"#,
                x(r),
                top,
                top + ph,
                top - 3.0
            );
        }
        let colors = ["#1f77b4", "#d62728", "#2ca02c"];
        for (i, p) in self.phases.iter().enumerate() {
            let color = colors[i % colors.len()];
            let mut times: Vec<f64> = p
                .hosts
                .iter()
                .filter(|h| h.verified)
                .filter_map(|h| h.seconds)
                .collect();
            times.sort_by(f64::total_cmp);
            let n = p.hosts.len().max(1) as f64;
            let mut path = format!("M{:.1},{:.1}", x(0.0), y(0.0));
            for (k, t) in times.iter().enumerate() {
                let r = t / self.t_star_s;
                let _ = write!(
                    path,
                    " L{:.1},{:.1} L{:.1},{:.1}",
                    x(r),
                    y(k as f64 / n),
                    x(r),
                    y((k + 1) as f64 / n)
                );
            }
            let _ = writeln!(
                s,
                r#"<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>"#
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" fill="{color}">{} (p50 {} T*, max {} T*)</text>"#,
                left + pw - 200.0,
                top + ph - 40.0 + 16.0 * i as f64,
                p.name,
                fmt_ratio(p.p50_ratio),
                fmt_ratio(p.max_ratio)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_star_terms() {
        let mb = 125_000.0;
        // 10 peers at 100 Mbit, 1 Gbit origin, 100 MB: N·S/(u_o+Σu) = 1e9/(250e6) = 4 s >
        // S/d = 8 s? No: S/d = 1e8/12.5e6 = 8 s dominates.
        let t = t_star(
            100_000_000,
            1000.0 * mb,
            &[100.0 * mb; 10],
            &[100.0 * mb; 10],
        );
        assert!((t - 8.0).abs() < 1e-9);
        // Peers that cannot upload: N·S/u_origin.
        let t = t_star(100_000_000, 1000.0 * mb, &[1000.0 * mb; 40], &[0.0; 40]);
        assert!((t - 32.0).abs() < 1e-9);
    }

    fn host(seconds: Option<f64>, from_seed: Option<u64>) -> HostResult {
        HostResult {
            host: "peer-1".into(),
            seconds,
            verified: seconds.is_some(),
            error: None,
            from_origin: None,
            from_seed,
            from_peers: None,
        }
    }

    #[test]
    fn seed_copies_and_comparison() {
        let traffic = Traffic {
            origin_link: 100,
            origin_payload: Some(100),
            seed_link: 250,
        };
        let p2p = Phase::new(
            "p2p",
            vec![host(Some(2.0), Some(30)), host(Some(4.0), Some(20))],
            1.0,
            100,
            traffic,
            Vec::new(),
        );
        assert!((p2p.seed_copies_link - 2.5).abs() < 1e-9);
        assert_eq!(p2p.seed_copies_payload, Some(0.5));
        assert_eq!(p2p.origin_copies_payload, Some(1.0));
        let bt = Phase::new(
            "bittorrent",
            vec![host(Some(1.0), None), host(Some(2.0), None)],
            1.0,
            100,
            Traffic {
                seed_link: 150,
                ..Traffic::default()
            },
            Vec::new(),
        );
        assert_eq!(bt.seed_copies_payload, None);
        let c = Comparison::of(&[p2p.clone(), bt]).expect("both phases");
        assert!((c.p50_ratio - 2.0).abs() < 1e-9 && (c.max_ratio - 2.0).abs() < 1e-9);
        assert!((c.seed_copies_p2p - 2.5).abs() < 1e-9);
        assert!((c.seed_copies_bittorrent - 1.5).abs() < 1e-9);
        // A failed BitTorrent host: no ratio.
        let failed = Phase::new(
            "bittorrent",
            vec![host(None, None), host(Some(2.0), None)],
            1.0,
            100,
            Traffic::default(),
            Vec::new(),
        );
        let c = Comparison::of(&[p2p.clone(), failed]).expect("both phases");
        assert!(c.max_ratio.is_nan());
        assert!(Comparison::of(&[p2p]).is_none());
    }

    #[test]
    fn percentiles() {
        let v = [3.0, 1.0, 2.0, f64::INFINITY];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert_eq!(percentile(&v, 1.0), f64::INFINITY);
    }
}
