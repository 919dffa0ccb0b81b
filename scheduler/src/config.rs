//! The scheduler's YAML configuration.
//!
//! Every key has a default, written once in the `Default` impls below, so an empty file (or
//! no file) is a valid configuration:
//!
//! ```yaml
//! server:
//!   listen: 0.0.0.0:8002
//! scheduling:
//!   candidate_parent_limit: 4
//!   parent_limit: 6
//!   back_to_source_limit: 4
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

/// Dragonfly's scheduler port, kept so that existing habits and firewalls carry over.
pub const DEFAULT_PORT: u16 = 8002;

/// Whole scheduler configuration, as read from YAML.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Network settings of the gRPC server.
    pub server: ServerConfig,
    /// Parent selection and back-to-source limits.
    pub scheduling: SchedulingConfig,
}

/// Network settings of the gRPC server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Address the gRPC server binds (`server.listen`, default `0.0.0.0:8002`).
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
        }
    }
}

/// Knobs of the swarm logic in [`crate::state::SchedulerState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulingConfig {
    /// Parents sent at once when a peer is (re)scheduled (default 4). A handful is enough to
    /// stripe a download over several uploaders without every peer hammering the same few.
    pub candidate_parent_limit: usize,
    /// Most parents a peer is given in total, counting later pushes of peers that just got
    /// their first piece (default 6).
    pub parent_limit: usize,
    /// Most peers of one task the scheduler tells to go back to the origin (default 4, as in
    /// Dragonfly): the origin should send each byte about once.
    pub back_to_source_limit: u32,
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        Self {
            candidate_parent_limit: 4,
            parent_limit: 6,
            back_to_source_limit: 4,
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
        self.scheduling.validate()
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
        assert_eq!(c.scheduling.candidate_parent_limit, 4);
        assert_eq!(c.scheduling.parent_limit, 6);
        assert_eq!(c.scheduling.back_to_source_limit, 4);
    }

    #[test]
    fn partial_document_keeps_other_defaults() {
        let c = Config::from_yaml("scheduling:\n  parent_limit: 9\n").unwrap();
        assert_eq!(c.scheduling.parent_limit, 9);
        assert_eq!(c.scheduling.candidate_parent_limit, 4);
        assert_eq!(c.server, ServerConfig::default());
        let c = Config::from_yaml("server:\n  listen: 127.0.0.1:0\n").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:0".parse().unwrap());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::from_yaml("server:\n  listen: nowhere\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  candidate_parent_limit: 0\n").is_err());
        assert!(Config::from_yaml("scheduling:\n  parent_limit: -1\n").is_err());
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
