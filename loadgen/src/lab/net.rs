//! Network namespaces, veth pairs, a bridge and `tc` shaping for the burst lab.
//!
//! Topology: one *switch* namespace holds a bridge `br0`; every host (origin, scheduler,
//! seed peer, peers) gets its own namespace whose `eth0` is one end of a veth pair, the other
//! end (`v<i>`) being a port of the bridge. Nothing is created in the root namespace, so
//! deleting the namespaces removes everything (the veth pairs go with them).
//!
//! Shaping: the host's `eth0` egress is its upload, the bridge port's egress its download;
//! each gets a `tbf` (or `htb`) qdisc at the host's rate. ARP: every host gets a permanent
//! neighbour entry for every other host, so the kernel's shared neighbour table never
//! garbage-collects or overflows (it does at ~32 hosts with dynamic entries and the default
//! `gc_thresh3` of 1024).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Queueing discipline used to shape every link direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Qdisc {
    /// Token bucket filter (`tc qdisc ... tbf`).
    Tbf,
    /// Hierarchical token bucket with one class (`tc qdisc ... htb`).
    Htb,
    /// `htb` with a priority class for small TCP packets (pure ACKs, under 128 bytes): the
    /// ACKs of a host's downloads do not wait (or get dropped) behind its uploads in one
    /// FIFO, as with a host's usual `fq_codel` (which this kernel lacks).
    HtbAckPrio,
}

/// One host of the lab: its namespace, address and link rates.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name: `origin`, `scheduler`, `seed`, `peer-3`.
    pub name: String,
    /// Network namespace name (`<prefix>origin`, ...).
    pub ns: String,
    /// Address of its `eth0`.
    pub ip: Ipv4Addr,
    /// Upload rate, bits/s (0: unshaped).
    pub up_bps: u64,
    /// Download rate, bits/s (0: unshaped).
    pub down_bps: u64,
}

impl Host {
    /// Name of its bridge port in the switch namespace.
    fn port(&self, index: usize) -> String {
        format!("v{index}")
    }
}

/// Runs `ip`/`tc`/`sysctl`-like command and fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `lines` to `ip [-n ns] -batch -` (one `ip` process for many commands).
fn ip_batch(ns: Option<&str>, lines: &[String]) -> anyhow::Result<()> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    if let Some(mut stdin) = child.stdin.take() {
        let text = lines.join("\n") + "\n";
        stdin
            .write_all(text.as_bytes())
            .context("writing to ip -batch")?;
    }
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Names of the existing network namespaces that start with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> anyhow::Result<Vec<String>> {
    let text = run("ip", &["netns", "list"])?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect())
}

/// Deletes namespace `ns` (and with it every interface inside); logs failures.
pub fn delete_namespace(ns: &str) {
    if let Err(e) = run("ip", &["netns", "del", ns]) {
        eprintln!("[lab] cleanup: {e:#}");
    }
}

/// MAC address derived from an IPv4 address (locally administered, unique per address).
fn mac(ip: Ipv4Addr, switch_side: bool) -> String {
    let o = ip.octets();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        if switch_side { 0xee } else { 0xdd },
        o[0],
        o[1],
        o[2],
        o[3]
    )
}

/// The `tc` arguments shaping `dev`'s egress to `bps` bits/s in namespace `ns`.
fn shape(ns: &str, dev: &str, bps: u64, qdisc: Qdisc) -> anyhow::Result<()> {
    if bps == 0 {
        return Ok(());
    }
    // A burst of at least 4 ms at line rate and never less than two 64 KiB GSO packets, so
    // that tbf does not have to split segments; 50 ms of queue.
    let burst = (bps / 8 / 250).max(128 << 10);
    let rate = format!("{bps}bit");
    let burst_s = burst.to_string();
    let tc = |args: &[&str]| -> anyhow::Result<()> {
        let mut v = vec!["-n", ns];
        v.extend_from_slice(args);
        run("tc", &v).map(drop)
    };
    if qdisc == Qdisc::Tbf {
        return tc(&[
            "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst_s,
            "latency", "50ms",
        ]);
    }
    // htb: class 1:1 at the link rate; with ACK priority, unclassified traffic goes to its
    // child 1:20 and small TCP packets to 1:10, served first.
    let ack_prio = qdisc == Qdisc::HtbAckPrio;
    let default = if ack_prio { "20" } else { "1" };
    tc(&[
        "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", default,
    ])?;
    tc(&[
        "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", &rate, "ceil",
        &rate, "burst", &burst_s, "cburst", &burst_s,
    ])?;
    if ack_prio {
        let tenth = format!("{}bit", (bps / 10).max(8_000));
        let rest = format!("{}bit", bps - bps / 10);
        for (class, share, prio) in [("1:10", &tenth, "0"), ("1:20", &rest, "1")] {
            tc(&[
                "class", "add", "dev", dev, "parent", "1:1", "classid", class, "htb", "rate",
                share, "ceil", &rate, "prio", prio, "burst", &burst_s, "cburst", &burst_s,
            ])?;
        }
        // IPv4, header length 5 words, TCP, total length < 128 bytes.
        tc(&[
            "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "protocol", "6", "0xff", "match", "u8", "0x05", "0x0f", "at", "0",
            "match", "u16", "0x0000", "0xff80", "at", "2", "flowid", "1:10",
        ])?;
    }
    Ok(())
}

/// The namespaces of one lab; [`Drop`] deletes every namespace it created.
#[derive(Debug)]
pub struct Network {
    created: Vec<String>,
    /// Hosts in creation order (bridge port `v<i>` belongs to `hosts[i]`).
    pub hosts: Vec<Host>,
}

impl Network {
    /// Creates the switch namespace, then every host with its veth pair, address, shaping,
    /// static neighbours and sysctls (`sysctls`: `key=value` applied in every host
    /// namespace). On error, whatever was created is deleted (by `Drop`).
    pub fn create(
        prefix: &str,
        hosts: Vec<Host>,
        qdisc: Qdisc,
        sysctls: &[String],
    ) -> anyhow::Result<Self> {
        let switch = format!("{prefix}switch");
        let mut net = Self {
            created: Vec::new(),
            hosts: Vec::new(),
        };
        run("ip", &["netns", "add", &switch])
            .context("creating a network namespace (is this root, with iproute2?)")?;
        net.created.push(switch.clone());
        ip_batch(
            Some(&switch),
            &[
                "link add br0 type bridge".into(),
                "link set br0 up".into(),
                "link set lo up".into(),
            ],
        )?;
        for (i, h) in hosts.iter().enumerate() {
            run("ip", &["netns", "add", &h.ns])?;
            net.created.push(h.ns.clone());
            let port = h.port(i);
            ip_batch(
                Some(&switch),
                &[
                    format!(
                        "link add {port} address {} type veth peer name eth0 address {} netns {}",
                        mac(h.ip, true),
                        mac(h.ip, false),
                        h.ns
                    ),
                    format!("link set {port} master br0"),
                    format!("link set {port} up"),
                ],
            )?;
            let mut lines = vec![
                "link set lo up".to_string(),
                format!("addr add {}/16 dev eth0", h.ip),
                "link set eth0 up".to_string(),
            ];
            for other in &hosts {
                if other.ip != h.ip {
                    lines.push(format!(
                        "neigh replace {} lladdr {} dev eth0 nud permanent",
                        other.ip,
                        mac(other.ip, false)
                    ));
                }
            }
            ip_batch(Some(&h.ns), &lines)?;
            shape(&h.ns, "eth0", h.up_bps, qdisc)?;
            shape(&switch, &port, h.down_bps, qdisc)?;
            for s in sysctls {
                run("ip", &["netns", "exec", &h.ns, "sysctl", "-q", "-w", s])?;
            }
        }
        net.hosts = hosts;
        Ok(net)
    }

    /// Bytes sent by `host`'s `eth0` so far (its upload, headers included).
    pub fn tx_bytes(&self, host: &Host) -> anyhow::Result<u64> {
        let text = run(
            "ip",
            &["-n", &host.ns, "-j", "-s", "link", "show", "dev", "eth0"],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&text).context("parsing `ip -j -s link` output")?;
        v.get(0)
            .and_then(|l| l.get("stats64"))
            .and_then(|s| s.get("tx"))
            .and_then(|t| t.get("bytes"))
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no tx bytes for eth0 in {}", host.ns))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Hosts first, the switch last (its ports die with the hosts' ends anyway).
        for ns in self.created.iter().rev() {
            delete_namespace(ns);
        }
        // Namespace teardown is asynchronous in the kernel; wait (bounded) until they are gone
        // from the list so that a following run does not see them as leftovers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match run("ip", &["netns", "list"]).map(|t| {
                t.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            }) {
                Ok(left) if !left.iter().any(|n| self.created.contains(n)) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
    }
}

/// Parses a rate like `100mbit`, `1gbit`, `500kbit`, `12000000` (bits/s) or `10mbps` (bytes/s,
/// tc's convention) into bits per second.
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("rate {s:?}: expected a number with a unit like 100mbit"))?;
    let mult = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        _ => bail!(
            "rate {s:?}: unknown unit {unit:?} (bit, kbit, mbit, gbit, bps, kbps, mbps, gbps)"
        ),
    };
    let bps = n * mult;
    if !(bps.is_finite() && bps >= 1000.0) {
        bail!("rate {s:?} is too small (at least 1kbit)");
    }
    Ok(bps as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit").ok(), Some(100_000_000));
        assert_eq!(parse_rate("1gbit").ok(), Some(1_000_000_000));
        assert_eq!(parse_rate("1.5Mbit").ok(), Some(1_500_000));
        assert_eq!(parse_rate("10mbps").ok(), Some(80_000_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 furlongs").is_err());
        assert!(parse_rate("1bit").is_err());
    }

    #[test]
    fn macs_are_distinct_per_side() {
        let ip = Ipv4Addr::new(10, 200, 1, 7);
        assert_eq!(mac(ip, false), "02:dd:0a:c8:01:07");
        assert_ne!(mac(ip, false), mac(ip, true));
    }
}
