//! The manager's YAML configuration.
//!
//! Every key has a default, written once in the `Default` impls below, so an empty file (or
//! no file) is a valid configuration; an unknown key is an error. See `manager/README.md`
//! for the full list.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Dragonfly's manager gRPC port.
pub const DEFAULT_GRPC_PORT: u16 = 65003;
/// Dragonfly's manager REST port.
pub const DEFAULT_REST_PORT: u16 = 8080;
/// Where the SQLite database lives unless told otherwise.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:///var/lib/damselfly/manager.db";

/// Whole manager configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen addresses.
    pub server: ServerConfig,
    /// Storage.
    pub database: DatabaseConfig,
    /// REST API authentication.
    pub auth: AuthConfig,
    /// Keepalive of schedulers and seed peers.
    pub keepalive: KeepaliveConfig,
    /// Dynamic config long-poll.
    pub config: DynConfigConfig,
    /// Preheat jobs.
    pub preheat: PreheatConfig,
    /// Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Log files (`log.dir`, `log.rotation`, `log.max_files`).
    pub log: damselfly_common::LogConfig,
}

/// Dragonfly's manager metrics port.
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

/// `server:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (default `0.0.0.0:65003`).
    pub grpc: SocketAddr,
    /// REST API and status page listen address (default `0.0.0.0:8080`).
    pub rest: SocketAddr,
    /// TLS of the gRPC server (default none: plaintext); with `client_auth: true`
    /// schedulers and daemons must present a certificate signed by `ca_cert`. The REST API
    /// is not covered (put it behind a TLS-terminating proxy).
    pub tls: Option<wire::tls::TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_GRPC_PORT)),
            rest: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_REST_PORT)),
            tls: None,
        }
    }
}

/// `database:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite:///path/to/file.db` (created on first start) or `postgres://user:pass@host/db`.
    pub url: String,
    /// Connections in the pool (default 8).
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_DATABASE_URL.to_owned(),
            max_connections: 8,
        }
    }
}

/// `auth:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Token accepted for REST writes (`Authorization: Bearer <token>`). Empty (default): a
    /// token is generated at first start, printed once to the log, and its hash stored in the
    /// database; it stays valid alongside a configured one.
    pub bootstrap_token: String,
}

/// `keepalive:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// Interval told to schedulers and seed peers (default 5s, as in Dragonfly).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// An instance without a keepalive for this long is marked inactive (default 15s: three
    /// missed keepalives).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        }
    }
}

/// `config:` section (dynamic config served by `GetConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynConfigConfig {
    /// Longest a `GetConfig` long-poll is held (default 60s, Dragonfly's pull period).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// While holding a long-poll, how often the database is re-read, to see changes made
    /// through another manager sharing it (default 2s; changes through this manager wake
    /// waiters at once).
    #[serde(with = "humantime_serde")]
    pub recheck_interval: Duration,
}

impl Default for DynConfigConfig {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(60),
            recheck_interval: Duration::from_secs(2),
        }
    }
}

/// `preheat:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreheatConfig {
    /// Time allowed for each registry request while resolving an image (default 30s).
    #[serde(with = "humantime_serde")]
    pub registry_timeout: Duration,
    /// How long a job waits for a scheduler of its cluster to be connected before it fails
    /// (default 60s).
    #[serde(with = "humantime_serde")]
    pub dispatch_timeout: Duration,
    /// How long a dispatched job waits for all results before it fails (default 30m).
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    /// Platform picked from a multi-platform image index (default `linux/amd64`).
    pub platform: String,
    /// Jobs shown on the status page (default 20).
    pub recent_jobs: u32,
}

impl Default for PreheatConfig {
    fn default() -> Self {
        Self {
            registry_timeout: Duration::from_secs(30),
            dispatch_timeout: Duration::from_secs(60),
            job_timeout: Duration::from_secs(30 * 60),
            platform: "linux/amd64".to_owned(),
            recent_jobs: 20,
        }
    }
}

impl Config {
    /// Reads a YAML file; a missing key takes its default, an unknown key is an error.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// Parses YAML text (empty text is the default configuration).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self = serde_yaml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.keepalive.interval.is_zero(),
            "keepalive.interval must be positive"
        );
        anyhow::ensure!(
            self.keepalive.timeout > self.keepalive.interval,
            "keepalive.timeout must be longer than keepalive.interval"
        );
        anyhow::ensure!(
            !self.config.recheck_interval.is_zero(),
            "config.recheck_interval must be positive"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_default_and_unknown_keys_fail() {
        assert_eq!(Config::parse("").expect("empty"), Config::default());
        assert!(Config::parse("nope: 1").is_err());
        assert!(Config::parse("server: { grpcc: 1 }").is_err());
    }

    #[test]
    fn keys_parse() {
        let c = Config::parse(
            "server: { grpc: 127.0.0.1:1, rest: 127.0.0.1:2 }\n\
             database: { url: 'postgres://u@h/db' }\n\
             auth: { bootstrap_token: t }\n\
             keepalive: { interval: 1s, timeout: 3s }\n\
             config: { max_wait: 10s }\n\
             preheat: { platform: linux/arm64 }\n",
        )
        .expect("parse");
        assert_eq!(c.server.rest.port(), 2);
        assert_eq!(c.keepalive.timeout, Duration::from_secs(3));
        assert_eq!(c.auth.bootstrap_token, "t");
        assert_eq!(c.preheat.platform, "linux/arm64");
        assert!(Config::parse("keepalive: { interval: 5s, timeout: 1s }").is_err());
    }
}
