//! The scheduler's YAML configuration.
//!
//! Every key has a default, written once in the `Default` impls below, so an empty file (or
//! no file) is a valid configuration:
//!
//! ```yaml
//! server:
//!   listen: 0.0.0.0:8002
//!   tls: ~                    # { ca_cert, cert, key, client_auth }: see wire::tls
//!   worker_threads: 0         # tokio worker threads; 0: one per CPU
//! scheduling:
//!   candidate_parent_limit: 2
//!   parent_limit: 8
//!   back_to_source_limit: 4
//!   filter_parent_limit: 15
//!   retry_limit: 5
//!   normal_upload_slots: 20
//!   seed_upload_slots: 40
//!   dag: false
//!   weights: { load: 0.6, idc: 0.2, location: 0.1, host_type: 0.1, bandwidth: 0.1 }
//!   bandwidth_reference: 125000000
//!   bad_parent: { window: 2000, min_samples: 30, small_window_multiple: 20, sigma: 3 }
//!   digest_sources: scheduled # who may give trusted piece digests: seed_peers | scheduled | any
//! manager:
//!   addr: ""                  # manager gRPC host:port; empty: no manager
//!   cluster_id: 0             # scheduler cluster to join; 0: the manager's default cluster
//!   advertise_ip: ""          # IP daemons reach this scheduler on; empty: derived
//!   hostname: ""              # empty: the system's hostname
//!   idc: ""
//!   location: ""
//!   config_wait: 30s          # longest dynamic-config long poll
//!   preheat_timeout: 30m      # longest wait for a seed peer to fetch a preheated task
//!   tls: ~                    # TLS to the manager: { ca_cert, cert, key, server_name }
//! metrics:
//!   enable: false             # serve /metrics and /healthy (--metrics ADDR turns it on)
//!   listen: 0.0.0.0:8000      # Dragonfly's scheduler metrics port
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// Dragonfly's scheduler port, kept so that existing habits and firewalls carry over.
pub const DEFAULT_PORT: u16 = 8002;

/// Whole scheduler configuration, as read from YAML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Network settings of the gRPC server.
    pub server: ServerConfig,
    /// Parent selection and back-to-source limits.
    pub scheduling: SchedulingConfig,
    /// Registration with a manager, its dynamic config and preheat requests.
    pub manager: ManagerConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Log files (`log.dir`, `log.rotation`, `log.max_files`).
    pub log: damselfly_common::LogConfig,
}

/// Dragonfly's scheduler metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 8000;

/// `metrics:` section: the Prometheus endpoint (`/metrics`, `/healthy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the endpoint (default false, as in Dragonfly; `--metrics ADDR` turns it on).
    pub enable: bool,
    /// Address it binds (default `0.0.0.0:8000`, Dragonfly's).
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enable: false,
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_METRICS_PORT)),
        }
    }
}

/// `manager:` section: where the manager is and how this scheduler presents itself to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Manager gRPC address `host:port` (`manager.addr`, `--manager`); empty: no manager.
    pub addr: String,
    /// Scheduler cluster to register in (default 0: the manager's default cluster).
    pub cluster_id: u64,
    /// IP daemons reach this scheduler on, registered with the manager. Empty: the IP of
    /// `server.listen`, or when that is unspecified (`0.0.0.0`), the local address this host
    /// uses to reach the manager.
    pub advertise_ip: String,
    /// Hostname registered with the manager; empty: the system's hostname.
    pub hostname: String,
    /// Data center registered with the manager (for the searcher).
    pub idc: String,
    /// Location registered with the manager (`region|zone|rack`, for the searcher).
    pub location: String,
    /// Longest dynamic-config long poll (default 30 s); the manager caps it too.
    #[serde(with = "humantime_serde")]
    pub config_wait: Duration,
    /// Longest wait for a seed peer to fetch a preheated task before the preheat is
    /// reported failed (default 30 min, the manager's job timeout).
    #[serde(with = "humantime_serde")]
    pub preheat_timeout: Duration,
    /// TLS to the manager (`manager.tls`, default none: plaintext): `ca_cert` verifies the
    /// manager, `cert`/`key` are presented when the manager requires client certificates.
    pub tls: Option<wire::tls::TlsConfig>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            addr: String::new(),
            cluster_id: 0,
            advertise_ip: String::new(),
            hostname: String::new(),
            idc: String::new(),
            location: String::new(),
            config_wait: Duration::from_secs(30),
            preheat_timeout: Duration::from_secs(30 * 60),
            tls: None,
        }
    }
}

/// Network settings of the gRPC server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the gRPC server binds (`server.listen`, default `0.0.0.0:8002`).
    pub listen: SocketAddr,
    /// TLS of the gRPC server (`server.tls`, default none: plaintext); with
    /// `client_auth: true` daemons must present a certificate signed by `ca_cert`.
    pub tls: Option<wire::tls::TlsConfig>,
    /// Tokio worker threads (`server.worker_threads`, default 0: one per CPU the process may
    /// run on). The swarm state is behind one lock, so extra workers only run gRPC and
    /// HTTP/2 work in parallel; on a machine whose cores are busy with other work, fewer
    /// workers avoid a lock holder being descheduled while the others wait for it (see
    /// tuning.md).
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            tls: None,
            worker_threads: 0,
        }
    }
}

/// Knobs of the swarm logic in [`crate::state::SchedulerState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulingConfig {
    /// Parents sent at once when a peer is (re)scheduled, and peers a newly serving peer is
    /// pushed to (default 2). Few at once: a peer's first pieces then come at a large share
    /// of its link and it serves sooner; it is topped up to `parent_limit` as it goes.
    pub candidate_parent_limit: usize,
    /// Most parents a peer holds at once, counting later pushes and reschedules (default 8).
    /// Peers below it are offered newly scheduled peers, which evens out how many children
    /// each peer has (see the README's swarm strategy).
    pub parent_limit: usize,
    /// Most peers of one task the scheduler tells to go back to the origin (default 4, as in
    /// Dragonfly): the origin should send each byte about once.
    pub back_to_source_limit: u32,
    /// Random candidates the evaluator looks at before keeping the best
    /// `candidate_parent_limit` (default 15, as in Dragonfly).
    pub filter_parent_limit: usize,
    /// Reschedules of one peer before it is sent back to the origin, if the task's
    /// back-to-source budget allows (default 5, as in Dragonfly).
    pub retry_limit: u32,
    /// Children a normal peer serves at once (default 20). A slot is one child connection
    /// (which keeps several piece requests in flight), not one piece as in Dragonfly's 200.
    pub normal_upload_slots: usize,
    /// Children a seed peer serves at once (default 40).
    pub seed_upload_slots: usize,
    /// Refuse a parent edge that would close a cycle among a task's peers (default false:
    /// mutual exchange is how every peer uploads from the first seconds; see the README).
    pub dag: bool,
    /// Weights of the evaluator's terms.
    pub weights: EvaluatorWeights,
    /// Upload rate (bytes/s) that earns the full bandwidth term (default 125,000,000 = 1 Gbit/s).
    pub bandwidth_reference: u64,
    /// Slow-parent detection over measured piece costs.
    pub bad_parent: BadParentConfig,
    /// Whose piece digests the scheduler records and hands out as trusted (default
    /// `scheduled`; see [`DigestSources`]).
    pub digest_sources: DigestSources,
}

/// Who may give the trusted per-piece digests peers check pieces against
/// (`scheduling.digest_sources`). Each level accepts what the one before it does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DigestSources {
    /// Seed peers only: pieces a seed host fetched from the origin, and tasks a seed host
    /// imports or announces with digests.
    SeedPeers,
    /// Also peers this scheduler sent to the origin (`NeedBackToSource`, takers of lost
    /// pieces), and `dfcache` imports from any host for tasks with no origin known. Not a
    /// peer that registers as back-to-source on its own: any host can claim that.
    #[default]
    Scheduled,
    /// Any peer that reports a piece as fetched from the origin, and any import (the
    /// behaviour before this setting).
    Any,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            candidate_parent_limit: 2,
            parent_limit: 8,
            back_to_source_limit: 4,
            filter_parent_limit: 15,
            retry_limit: 5,
            normal_upload_slots: 20,
            seed_upload_slots: 40,
            dag: false,
            weights: EvaluatorWeights::default(),
            bandwidth_reference: 125_000_000,
            bad_parent: BadParentConfig::default(),
            digest_sources: DigestSources::default(),
        }
    }
}

/// Weights of the parent score (see [`crate::state::evaluator`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluatorWeights {
    /// Free upload slots of the parent (default 0.6, Dragonfly's).
    pub load: f64,
    /// Same IDC as the child (default 0.2).
    pub idc: f64,
    /// Shared location prefix (default 0.1).
    pub location: f64,
    /// Host type: seed peers early, normal peers later (default 0.1).
    pub host_type: f64,
    /// Measured upload bandwidth of the parent's host (default 0.1; not in Dragonfly).
    pub bandwidth: f64,
    /// Pieces the parent holds beyond the child's, as a share of the task (default 0.2;
    /// Dragonfly's finished-piece score).
    pub pieces: f64,
}

/// Default weight of the pieces-ahead term.
pub const PIECES_WEIGHT: f64 = 0.2;

impl Default for EvaluatorWeights {
    fn default() -> Self {
        Self {
            load: 0.6,
            idc: 0.2,
            location: 0.1,
            host_type: 0.1,
            bandwidth: 0.1,
            pieces: PIECES_WEIGHT,
        }
    }
}

/// When a parent counts as slow: over a window of its normalised piece costs, a new cost
/// above mean + `sigma`·σ, or above `small_window_multiple`·mean while the window holds
/// fewer than `min_samples` costs. A slow parent is not offered to anyone until a later
/// piece it serves is normal again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BadParentConfig {
    /// Costs kept per parent host (default 2000; 0 disables the detection).
    pub window: usize,
    /// Samples needed before the σ rule applies (default 30).
    pub min_samples: usize,
    /// Multiple of the mean that is bad while the window is small (default 20).
    pub small_window_multiple: f64,
    /// Standard deviations above the mean that are bad (default 3).
    pub sigma: f64,
}

impl Default for BadParentConfig {
    fn default() -> Self {
        Self {
            window: 2000,
            min_samples: 30,
            small_window_multiple: 20.0,
            sigma: 3.0,
        }
    }
}

impl SchedulingConfig {
    /// Checks that the limits make sense (a peer must be allowed at least one parent).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.candidate_parent_limit == 0 {
            bail!("scheduling.candidate_parent_limit must be at least 1");
        }
        if self.parent_limit == 0 {
            bail!("scheduling.parent_limit must be at least 1");
        }
        if self.filter_parent_limit == 0 {
            bail!("scheduling.filter_parent_limit must be at least 1");
        }
        if self.normal_upload_slots == 0 || self.seed_upload_slots == 0 {
            bail!("scheduling.normal_upload_slots and seed_upload_slots must be at least 1");
        }
        let w = &self.weights;
        if [w.load, w.idc, w.location, w.host_type, w.bandwidth]
            .iter()
            .any(|x| !x.is_finite() || *x < 0.0)
        {
            bail!("scheduling.weights must be finite and non-negative");
        }
        let b = &self.bad_parent;
        if !(b.small_window_multiple.is_finite() && b.sigma.is_finite())
            || b.small_window_multiple <= 0.0
            || b.sigma < 0.0
        {
            bail!("scheduling.bad_parent multiples must be finite and positive");
        }
        Ok(())
    }
}

impl Config {
    /// Parses a YAML document; an empty document gives the defaults.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).context("invalid scheduler configuration")?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses the YAML file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Checks every section.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.scheduling.validate()?;
        let m = &self.manager;
        if !m.advertise_ip.is_empty() && m.advertise_ip.parse::<std::net::IpAddr>().is_err() {
            bail!(
                "manager.advertise_ip {:?} is not an IP address",
                m.advertise_ip
            );
        }
        if m.config_wait.is_zero() || m.preheat_timeout.is_zero() {
            bail!("manager.config_wait and manager.preheat_timeout must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_gives_defaults() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.server.listen.port(), 8002);
        assert_eq!(c.scheduling.candidate_parent_limit, 2);
        assert_eq!(c.scheduling.parent_limit, 8);
        assert_eq!(c.scheduling.back_to_source_limit, 4);
    }

    #[test]
    fn partial_document_keeps_other_defaults() {
        let c = Config::from_yaml("scheduling:\n  parent_limit: 9\n").unwrap();
        assert_eq!(c.scheduling.parent_limit, 9);
        assert_eq!(c.scheduling.candidate_parent_limit, 2);
        assert_eq!(c.server, ServerConfig::default());
        let c = Config::from_yaml("scheduling:\n  dag: true\n  weights:\n    idc: 0.5\n").unwrap();
        assert!(c.scheduling.dag);
        assert_eq!(c.scheduling.weights.idc, 0.5);
        assert_eq!(c.scheduling.weights.load, 0.6);
        let c = Config::from_yaml("server:\n  listen: 127.0.0.1:0\n").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:0".parse().unwrap());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::from_yaml("server:\n  listen: nowhere\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  candidate_parent_limit: 0\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  parent_limit: -1\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  weights:\n    idc: -1\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  seed_upload_slots: 0\n").is_err());
        assert!(Config::from_yaml("manager:\n  advertise_ip: somewhere\n").is_err());
        assert!(Config::from_yaml("manager:\n  config_wait: 0s\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  digest_sources: anyone\n").is_err());
    }

    #[test]
    fn digest_sources_default_and_values() {
        let c = Config::from_yaml("").expect("empty config");
        assert_eq!(c.scheduling.digest_sources, DigestSources::Scheduled);
        for (text, want) in [
            ("seed_peers", DigestSources::SeedPeers),
            ("scheduled", DigestSources::Scheduled),
            ("any", DigestSources::Any),
        ] {
            let c = Config::from_yaml(&format!("scheduling:\n  digest_sources: {text}\n"))
                .expect("parses");
            assert_eq!(c.scheduling.digest_sources, want);
        }
    }

    #[test]
    fn manager_section() {
        let c = Config::from_yaml("").unwrap();
        assert!(c.manager.addr.is_empty());
        assert_eq!(c.manager.config_wait, Duration::from_secs(30));
        let c = Config::from_yaml(
            "manager:\n  addr: 127.0.0.1:65003\n  cluster_id: 2\n  advertise_ip: 10.0.0.1\n  config_wait: 500ms\n",
        )
        .unwrap();
        assert_eq!(c.manager.addr, "127.0.0.1:65003");
        assert_eq!(c.manager.cluster_id, 2);
        assert_eq!(c.manager.advertise_ip, "10.0.0.1");
        assert_eq!(c.manager.config_wait, Duration::from_millis(500));
        assert_eq!(c.manager.preheat_timeout, Duration::from_secs(1800));
    }

    #[test]
    fn unknown_keys_are_refused_with_the_key_named() {
        // A typo must not silently fall back to the default.
        for (yaml, key) in [
            (
                "scheduling:\n  candidate_parent_limt: 3\n",
                "candidate_parent_limt",
            ),
            ("schedulng:\n  parent_limit: 3\n", "schedulng"),
            ("server:\n  listen_addr: 0.0.0.0:1\n", "listen_addr"),
            ("manager:\n  address: x:1\n", "address"),
            ("metrics:\n  port: 1\n", "port"),
            ("scheduling:\n  weights:\n    idcc: 1\n", "idcc"),
            ("scheduling:\n  bad_parent:\n    sigmaa: 1\n", "sigmaa"),
        ] {
            let err = match Config::from_yaml(yaml) {
                Ok(_) => panic!("{yaml:?} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(
                err.contains(&format!("unknown field `{key}`")),
                "{yaml:?}: {err}"
            );
            assert!(err.contains("expected"), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.yaml");
        std::fs::write(&path, "scheduling:\n  back_to_source_limit: 0\n").unwrap();
        assert_eq!(
            Config::load(&path).unwrap().scheduling.back_to_source_limit,
            0
        );
        assert!(Config::load(&dir.path().join("missing.yaml")).is_err());
    }
}
