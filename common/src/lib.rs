//! What every Damselfly process (dfdaemon, scheduler, manager) does the same way:
//!
//! - [`VERSION`]: the crate version and the git revision it was built from, for `--version`;
//! - [`config_path`]: which config file to read. Settings come in one precedence order,
//!   **file → environment → flags**: the config file gives the base, an environment
//!   variable (`DFDAEMON_*`, `SCHEDULER_*`, `MANAGER_*`, named in each flag's `--help`)
//!   overrides the file, and a command-line flag overrides both. The file is the one named
//!   by `--config`, else by `<BINARY>_CONFIG`, else `/etc/damselfly/<binary>.yaml` when it
//!   exists, else none (built-in defaults);
//! - [`init_logs`]: logs on stderr, as text or as JSON lines ([`LogFormat`]).

use std::path::{Path, PathBuf};

/// The git revision this binary was built from (`unknown` outside a git checkout).
pub const REVISION: &str = env!("DAMSELFLY_GIT_REVISION");

/// `--version` text: `<version> (rev <revision>)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (rev ",
    env!("DAMSELFLY_GIT_REVISION"),
    ")"
);

/// Directory of the default config files.
pub const CONFIG_DIR: &str = "/etc/damselfly";

/// The config file to read: `explicit` (from `--config` or the `<BINARY>_CONFIG` variable,
/// which clap has already merged, the flag winning) when given, else `default` when it
/// exists, else `None` (built-in defaults). An explicit path is returned even when missing,
/// so that loading it reports the error.
pub fn config_path(explicit: Option<&Path>, default: &Path) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None if default.is_file() => Some(default.to_path_buf()),
        None => None,
    }
}

/// The default config file of `binary`: `/etc/damselfly/<binary>.yaml`.
pub fn default_config_path(binary: &str) -> PathBuf {
    Path::new(CONFIG_DIR).join(format!("{binary}.yaml"))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`), for log
    /// collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (text or json)")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs the process's log subscriber on stderr: the filter from `RUST_LOG`, else
/// `default_filter`; text or JSON lines. A second call keeps the first subscriber.
pub fn init_logs(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_wins_even_when_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let default = dir.path().join("d.yaml");
        std::fs::write(&default, "").expect("write");
        let missing = dir.path().join("missing.yaml");
        assert_eq!(config_path(Some(&missing), &default), Some(missing.clone()));
    }

    #[test]
    fn default_path_only_when_it_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let default = dir.path().join("d.yaml");
        assert_eq!(config_path(None, &default), None);
        std::fs::write(&default, "").expect("write");
        assert_eq!(config_path(None, &default), Some(default));
    }

    #[test]
    fn default_paths_are_per_binary() {
        assert_eq!(
            default_config_path("dfdaemon"),
            PathBuf::from("/etc/damselfly/dfdaemon.yaml")
        );
    }

    #[test]
    fn log_format_parses_and_prints() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.to_string(), "json");
    }

    #[test]
    fn version_names_a_revision() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.contains("(rev "));
        assert!(!REVISION.is_empty());
    }
}
