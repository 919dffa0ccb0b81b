//! What every Damselfly process (dfdaemon, scheduler, manager) does the same way:
//!
//! - [`VERSION`]: the crate version and the git revision it was built from, for `--version`;
//! - [`config_path`]: which config file to read. Settings come in one precedence order,
//!   **file → environment → flags**: the config file gives the base, an environment
//!   variable (`DFDAEMON_*`, `SCHEDULER_*`, `MANAGER_*`, named in each flag's `--help`)
//!   overrides the file, and a command-line flag overrides both. The file is the one named
//!   by `--config`, else by `<BINARY>_CONFIG`, else `/etc/damselfly/<binary>.yaml` when it
//!   exists, else none (built-in defaults);
//! - [`init_logs`], [`init_logs_with`]: logs on stderr or in rotated files (`--log-dir`),
//!   as text or as JSON lines ([`LogFormat`], [`LogOptions`]);
//! - [`load_config_and_logs`]: the start of every binary's `main` (config file, then logs);
//! - [`shutdown_signal`]: Ctrl-C or SIGTERM;
//! - [`reconnect_backoff`]: jittered exponential delays between reconnects to a scheduler or
//!   the manager;
//! - [`file_sha256`], [`file_sha256_hex`]: the sha256 of a file, streamed.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// How often a log file is rotated (`--log-rotation`, `log.rotation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    /// A new file every hour (`<binary>.log.YYYY-MM-DD-HH`).
    Hourly,
    /// A new file every day (`<binary>.log.YYYY-MM-DD`).
    #[default]
    Daily,
    /// One file, never rotated (`<binary>.log`; rotate it with logrotate's `copytruncate`).
    Never,
}

impl std::str::FromStr for LogRotation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hourly" => Ok(Self::Hourly),
            "daily" => Ok(Self::Daily),
            "never" => Ok(Self::Never),
            other => Err(format!(
                "unknown log rotation {other:?} (hourly, daily or never)"
            )),
        }
    }
}

impl std::fmt::Display for LogRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hourly => "hourly",
            Self::Daily => "daily",
            Self::Never => "never",
        })
    }
}

/// Where and how a process writes its logs.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// Write the logs to files in this directory instead of stderr (`--log-dir`); `None`:
    /// stderr.
    pub dir: Option<PathBuf>,
    /// When a new file is started (only with [`LogOptions::dir`]).
    pub rotation: LogRotation,
    /// Rotated files kept, the newest ones; older files of this binary are deleted
    /// (only with [`LogOptions::dir`] and a rotation; 0 keeps every file).
    pub max_files: usize,
}

/// The `log:` section of a config file (dfdaemon, scheduler, manager); the `--log-dir`,
/// `--log-rotation`, `--log-max-files` flags (and their variables) override each key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Write the logs to files in this directory instead of stderr (default: none, stderr).
    pub dir: Option<PathBuf>,
    /// `hourly`, `daily` (default) or `never`.
    pub rotation: LogRotation,
    /// Rotated files kept (default 7; 0 keeps all).
    pub max_files: usize,
}

/// Default of `log.max_files` / `--log-max-files`.
pub const DEFAULT_LOG_MAX_FILES: usize = 7;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            dir: None,
            rotation: LogRotation::Daily,
            max_files: DEFAULT_LOG_MAX_FILES,
        }
    }
}

impl LogConfig {
    /// The options to start logging with: this section, each key overridden by its flag or
    /// variable when given.
    pub fn with_overrides(
        &self,
        format: LogFormat,
        dir: Option<PathBuf>,
        rotation: Option<LogRotation>,
        max_files: Option<usize>,
    ) -> LogOptions {
        LogOptions {
            format,
            dir: dir.or_else(|| self.dir.clone()),
            rotation: rotation.unwrap_or(self.rotation),
            max_files: max_files.unwrap_or(self.max_files),
        }
    }
}

/// Keeps the background log writer of a log file running; drop it last (at the end of
/// `main`) so that the last lines are flushed.
#[derive(Debug)]
pub struct LogGuard {
    _guard: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the process's log subscriber on stderr: the filter from `RUST_LOG`, else
/// `default_filter`; text or JSON lines. A second call keeps the first subscriber.
pub fn init_logs(default_filter: &str, format: LogFormat) {
    let _ = init_logs_with(
        "damselfly",
        default_filter,
        &LogOptions {
            format,
            ..LogOptions::default()
        },
    );
}

/// Installs the process's log subscriber as `opts` say: on stderr, or, with a directory,
/// in files `<binary>.log[.<date>]` there, rotated and pruned. The filter comes from
/// `RUST_LOG`, else `default_filter`. Fails (with the path) when the directory cannot be
/// created or written. A second call keeps the first subscriber.
pub fn init_logs_with(
    binary: &str,
    default_filter: &str,
    opts: &LogOptions,
) -> Result<LogGuard, String> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let (writer, ansi, guard) = match &opts.dir {
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            None,
        ),
        Some(dir) => {
            use tracing_appender::rolling::{Builder, Rotation};
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("creating log directory {}: {e}", dir.display()))?;
            let rotation = match opts.rotation {
                LogRotation::Hourly => Rotation::HOURLY,
                LogRotation::Daily => Rotation::DAILY,
                LogRotation::Never => Rotation::NEVER,
            };
            let mut b = Builder::new()
                .rotation(rotation)
                .filename_prefix(format!("{binary}.log"));
            if opts.max_files > 0 {
                b = b.max_log_files(opts.max_files);
            }
            let appender = b
                .build(dir)
                .map_err(|e| format!("opening a log file in {}: {e}", dir.display()))?;
            let (w, g) = tracing_appender::non_blocking(appender);
            (BoxMakeWriter::new(w), false, Some(g))
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match opts.format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    Ok(LogGuard { _guard: guard })
}

/// The log flags every binary takes (`--log-format`, `--log-dir`, `--log-rotation`,
/// `--log-max-files`, or their variables); `None` keeps the config file's value.
#[derive(Debug, Clone, Default)]
pub struct LogFlags {
    /// `--log-format`.
    pub format: LogFormat,
    /// `--log-dir`.
    pub dir: Option<PathBuf>,
    /// `--log-rotation`.
    pub rotation: Option<LogRotation>,
    /// `--log-max-files`.
    pub max_files: Option<usize>,
}

/// How a binary's `main` starts: reads its config file ([`config_path`] of `explicit`, else
/// `/etc/damselfly/<binary>.yaml` when it exists, else defaults) with `load`, starts the
/// logs from the file's `log:` section (`log_section`) under `flags`, then logs which file
/// was read. A config or log error is reported (in the log, or on stderr when the logs could
/// not start) and gives `None`: the caller exits with a failure.
pub fn load_config_and_logs<C: Default, E: std::fmt::Display>(
    binary: &str,
    explicit: Option<&Path>,
    load: impl FnOnce(&Path) -> Result<C, E>,
    log_section: impl FnOnce(&C) -> LogConfig,
    flags: LogFlags,
) -> Option<(C, LogGuard)> {
    // The config file first (its `log:` section says where logs go), then the logs, then
    // what happened while reading it.
    let path = config_path(explicit, &default_config_path(binary));
    let loaded = path.as_deref().map(load).transpose();
    let log = match &loaded {
        Ok(Some(c)) => log_section(c),
        _ => LogConfig::default(),
    };
    let opts = log.with_overrides(flags.format, flags.dir, flags.rotation, flags.max_files);
    let guard = match init_logs_with(binary, "info", &opts) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{binary}: {e}");
            return None;
        }
    };
    if let Some(p) = &path {
        tracing::info!("config file {}", p.display());
    }
    match loaded {
        Ok(config) => Some((config.unwrap_or_default(), guard)),
        Err(e) => {
            tracing::error!("{e:#}");
            None
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM (logging which). A signal that cannot be listened for is
/// logged and never resolves, so the other one still works.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// Delays between reconnects: exponential from `min` (doubling) up to `max`, each with a
/// random jitter of up to its own length added (`backon`'s exponential backoff), never
/// ending. The jitter matters after a scheduler or manager restart: thousands of daemons that
/// lost it at the same instant would otherwise retry in lockstep. Build a new one after a
/// success to start again from `min`.
pub fn reconnect_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    let max = max.max(min);
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
        // `without_max_times` never ends; the chain keeps the type honest if it ever did.
        .chain(std::iter::repeat(max))
}

/// The sha256 of the file at `path`, read in 1 MiB steps (blocking I/O).
pub fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// [`file_sha256`] as lowercase hex.
pub fn file_sha256_hex(path: &Path) -> std::io::Result<String> {
    file_sha256(path).map(hex::encode)
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
    fn flags_override_the_log_section_key_by_key() {
        let file = LogConfig {
            dir: Some(PathBuf::from("/var/log/d")),
            rotation: LogRotation::Hourly,
            max_files: 3,
        };
        let o = file.with_overrides(LogFormat::Json, None, None, Some(9));
        assert_eq!(o.dir, Some(PathBuf::from("/var/log/d")));
        assert_eq!(
            (o.rotation, o.max_files, o.format),
            (LogRotation::Hourly, 9, LogFormat::Json)
        );
        let o = file.with_overrides(
            LogFormat::Text,
            Some("/x".into()),
            Some(LogRotation::Never),
            None,
        );
        assert_eq!(
            (o.dir, o.rotation, o.max_files),
            (Some(PathBuf::from("/x")), LogRotation::Never, 3)
        );
        let d = LogConfig::default().with_overrides(LogFormat::Text, None, None, None);
        assert_eq!(
            (d.dir, d.rotation, d.max_files),
            (None, LogRotation::Daily, 7)
        );
    }

    #[test]
    fn log_rotation_parses_and_prints() {
        for r in [LogRotation::Hourly, LogRotation::Daily, LogRotation::Never] {
            assert_eq!(r.to_string().parse::<LogRotation>(), Ok(r));
        }
        assert!("weekly".parse::<LogRotation>().is_err());
    }

    #[test]
    fn a_log_dir_that_cannot_be_created_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").expect("write");
        let err = init_logs_with(
            "t",
            "info",
            &LogOptions {
                dir: Some(file.join("logs")),
                ..LogOptions::default()
            },
        )
        .expect_err("a directory under a file");
        assert!(err.contains("a-file"), "{err}");
    }

    #[test]
    fn version_names_a_revision() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.contains("(rev "));
        assert!(!REVISION.is_empty());
    }

    #[test]
    fn reconnect_delays_grow_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let runs: Vec<Vec<Duration>> = (0..8)
            .map(|_| reconnect_backoff(min, max).take(12).collect())
            .collect();
        for delays in &runs {
            // Each delay is its exponential step plus a jitter below that step.
            let mut step = min;
            for d in delays {
                assert!(*d >= step && *d < step * 2, "{d:?} for step {step:?}");
                step = (step * 2).min(max);
            }
            assert!(delays[11] >= max, "{delays:?}");
        }
        // Eight daemons that lost their scheduler together do not all retry at one instant.
        let first: std::collections::HashSet<Duration> = runs.iter().map(|r| r[0]).collect();
        assert!(first.len() > 1, "no jitter: {first:?}");
    }

    #[test]
    fn file_sha256_streams_the_whole_file() {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let want: [u8; 32] = sha2::Sha256::digest(&data).into();
        assert_eq!(file_sha256(&path).expect("hash"), want);
        assert_eq!(file_sha256_hex(&path).expect("hash"), hex::encode(want));
        assert!(file_sha256(&dir.path().join("missing")).is_err());
    }
}
