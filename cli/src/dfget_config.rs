//! Defaults of dfget from a YAML file: `--config PATH` (or `DFGET_CONFIG`), else
//! `~/.config/damselfly/dfget.yaml`, else `/etc/damselfly/dfget.yaml`. Command-line flags and
//! environment variables win over the file; the file wins over built-in defaults. Keys are
//! documented in `cli/README.md`; unknown keys are an error.

use controlplane::config::ByteSize;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The dfget config file. Every key is optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct DfgetConfig {
    /// Unix socket of the dfdaemon local API.
    pub endpoint: Option<PathBuf>,
    /// Give up after this long (`30s`, `10m`; `0s` waits forever).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Download rate limit per download (`50MiB`, bytes per second; 0: none).
    pub rate_limit: Option<ByteSize>,
    /// Never fetch from the origin.
    pub disable_back_to_source: Option<bool>,
    /// Priority level 0..6.
    pub priority: Option<i32>,
    /// Tag of every download.
    pub tag: Option<String>,
    /// Application of every download.
    pub application: Option<String>,
    /// Query parameters dropped from URLs before computing task ids.
    pub filtered_query_params: Option<Vec<String>>,
    /// Headers for every origin request (`Name: value`).
    pub headers: Option<Vec<String>>,
    /// Never show a progress bar.
    pub no_progress: Option<bool>,
}

/// Where the config was read from, if anywhere.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config (all defaults when no file was found).
    pub config: DfgetConfig,
    /// The file read.
    pub path: Option<PathBuf>,
}

/// The default places, most specific first.
pub fn default_paths() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        v.push(PathBuf::from(home).join(".config/damselfly/dfget.yaml"));
    }
    v.push(PathBuf::from("/etc/damselfly/dfget.yaml"));
    v
}

/// Parses a config file.
pub fn read(path: &Path) -> Result<DfgetConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(DfgetConfig::default());
    }
    let c: DfgetConfig =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(p) = c.priority {
        if !(0..=6).contains(&p) {
            return Err(format!(
                "{}: priority {p} is not a level 0..6",
                path.display()
            ));
        }
    }
    Ok(c)
}

/// Loads `explicit` (which must exist), or the first default path that exists.
pub fn load(explicit: Option<&Path>) -> Result<Loaded, String> {
    if let Some(p) = explicit {
        return Ok(Loaded {
            config: read(p)?,
            path: Some(p.to_path_buf()),
        });
    }
    for p in default_paths() {
        if p.exists() {
            return Ok(Loaded {
                config: read(&p)?,
                path: Some(p),
            });
        }
    }
    Ok(Loaded {
        config: DfgetConfig::default(),
        path: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key_and_refuses_unknown_ones() {
        let c: DfgetConfig = serde_yaml::from_str(
            "endpoint: /run/x.sock\ntimeout: 30s\nrate_limit: 10MiB\ndisable_back_to_source: true\npriority: 3\ntag: t\napplication: a\nfiltered_query_params: [X]\nheaders: ['A: b']\nno_progress: true\n",
        )
        .expect("config");
        assert_eq!(c.endpoint.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.rate_limit.map(|r| r.0), Some(10 << 20));
        assert_eq!(c.disable_back_to_source, Some(true));
        assert_eq!(c.priority, Some(3));
        assert!(serde_yaml::from_str::<DfgetConfig>("endpiont: /x\n").is_err());
    }
}
