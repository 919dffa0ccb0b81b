//! dfdaemon's configuration file (YAML). Every key has a default; see the crate README.
//! The `data_plane:` section is in `config/data_plane.rs`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod data_plane;

pub use data_plane::{parse_size, ByteSize, DataPlaneSection, TransportKind};

/// Whole dfdaemon configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Identity and placement of this host.
    pub host: HostConfig,
    /// Seed peer mode.
    pub seed_peer: SeedPeerConfig,
    /// Schedulers to use.
    pub scheduler: SchedulerConfig,
    /// Where pieces are stored.
    pub storage: StorageConfig,
    /// Local API for dfget.
    pub local_api: LocalApiConfig,
    /// Data plane (piece transfer) settings.
    pub data_plane: DataPlaneSection,
    /// Download behaviour.
    pub download: DownloadConfig,
    /// Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// Manager (searcher, dynamic config, seed peer keepalive).
    pub manager: ManagerConfig,
    /// Registry mirror proxy.
    pub proxy: ProxyConfig,
    /// Garbage collection of stored tasks.
    pub gc: GcConfig,
    /// Log files (`log.dir`, `log.rotation`, `log.max_files`).
    pub log: damselfly_common::LogConfig,
    /// Origins: which TLS certificates they are trusted with.
    pub origin: OriginConfig,
}

/// `origin:` section: how this daemon trusts the HTTPS origins it fetches from (back to
/// source for `dfget`, the registry mirror's P2P blob fetches, preheats) and the upstream of
/// the registry mirror's passed-through requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OriginConfig {
    /// PEM files of extra CA certificates trusted for origins (private CAs).
    pub ca_certs: Vec<PathBuf>,
    /// Also trust the operating system's certificate store (`/etc/ssl/certs`, or
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`), besides the built-in web roots.
    pub system_ca_certs: bool,
    /// Accept any certificate from any origin (no verification at all). Logged as a warning
    /// at start; for tests and emergencies only.
    pub insecure_skip_verify: bool,
    /// Object storage (`s3://bucket/key` URLs).
    pub s3: S3Config,
}

/// `origin.s3` section: the S3-protocol object store behind `s3://` URLs. An empty value
/// takes the AWS environment variable (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), else the default.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL (`http://minio:9000`); empty: AWS's for the region.
    pub endpoint: String,
    /// Region; empty: `us-east-1`.
    pub region: String,
    /// Access key id; empty with no environment: unsigned requests.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token of temporary credentials.
    pub session_token: String,
    /// Path-style requests (`endpoint/bucket/key`, what MinIO, Ceph and most self-hosted
    /// stores want); `false`: virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
}

/// Redacts the secret and the session token (the config may be logged).
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("path_style", &self.path_style)
            .finish()
    }
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            session_token: String::new(),
            path_style: true,
        }
    }
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            ca_certs: Vec::new(),
            system_ca_certs: true,
            insecure_skip_verify: false,
            s3: S3Config::default(),
        }
    }
}

/// `proxy:` section: the registry mirror (containerd's `hosts.toml` or docker's
/// `registry-mirrors` point at it).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Serve the proxy.
    pub enable: bool,
    /// Address the proxy listens on (plain HTTP).
    pub listen: SocketAddr,
    /// Regular expressions matched against the upstream URL of a `GET`; a match goes through
    /// P2P, anything else is passed to the registry.
    pub rules: Vec<String>,
    /// Default upstream registry (`https://host[:port]` or `http://…`); a request's
    /// `X-Dragonfly-Registry` header overrides it.
    pub registry_mirror: String,
    /// Accept any TLS certificate from the upstream on requests the proxy passes through.
    pub insecure_skip_verify: bool,
    /// PEM files of extra CA certificates trusted for the upstream on passed-through requests.
    pub ca_certs: Vec<PathBuf>,
    /// Regexes of hosts (`host` or `host:port`) whose `CONNECT` tunnels the proxy
    /// intercepts: it terminates TLS with a leaf from its CA (`ca_cert`, or one it
    /// generates: `<storage.dir>/proxy-ca.pem`) and serves the requests like mirror requests
    /// to `https://host:port`. Other `CONNECT`s are tunnelled untouched.
    pub hijack_hosts: Vec<String>,
    /// PEM file of the CA certificate that signs the leaves for `hijack_hosts` (give
    /// `ca_key` too); unset: the daemon generates its own CA.
    pub ca_cert: Option<PathBuf>,
    /// PEM file (PKCS#8) of `ca_cert`'s private key; set both or neither.
    pub ca_key: Option<PathBuf>,
}

impl ProxyConfig {
    /// The user's CA for intercepted hosts (`ca_cert` with `ca_key`), `None` when neither is
    /// set; an error when only one is.
    pub fn user_ca(&self) -> anyhow::Result<Option<crate::proxy_ca::UserCa<'_>>> {
        match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => Ok(Some(crate::proxy_ca::UserCa { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => anyhow::bail!("proxy.ca_cert is set without proxy.ca_key"),
            (None, Some(_)) => anyhow::bail!("proxy.ca_key is set without proxy.ca_cert"),
        }
    }
}

/// Default port of the registry mirror proxy.
pub const DEFAULT_PROXY_PORT: u16 = 4001;

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            enable: false,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PROXY_PORT)),
            rules: vec!["blobs/sha256.*".into()],
            registry_mirror: "https://index.docker.io".into(),
            insecure_skip_verify: false,
            ca_certs: Vec::new(),
            hijack_hosts: Vec::new(),
            ca_cert: None,
            ca_key: None,
        }
    }
}

/// `gc:` section: when stored tasks are evicted (see the crate README).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    /// How often a collection runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Tasks unused for longer than this are evicted (0: never by age).
    #[serde(with = "humantime_serde")]
    pub task_ttl: Duration,
    /// Collect when the task files take more than this many bytes (0: no byte limit).
    pub high_watermark_bytes: ByteSize,
    /// ...down to this many bytes.
    pub low_watermark_bytes: ByteSize,
    /// Collect when the storage dir's filesystem is fuller than this percent (0: off).
    pub high_watermark_percent: u8,
    /// ...down to this percent.
    pub low_watermark_percent: u8,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            task_ttl: Duration::from_secs(6 * 3600),
            high_watermark_bytes: ByteSize(0),
            low_watermark_bytes: ByteSize(0),
            high_watermark_percent: 80,
            low_watermark_percent: 60,
        }
    }
}

/// `manager:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Manager gRPC addresses (`host:port`); empty: no manager, static `scheduler.addrs` only.
    pub addrs: Vec<String>,
    /// Scheduler cluster a seed peer registers in (0: the manager's default cluster).
    pub cluster_id: u64,
    /// How often the scheduler list is asked for again.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// How long one dynamic-config long poll waits for a change.
    #[serde(with = "humantime_serde")]
    pub config_wait: Duration,
    /// TLS to the manager (`https://`); none: plaintext. See the README's TLS section.
    pub tls: Option<wire::tls::TlsConfig>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            addrs: Vec::new(),
            cluster_id: 0,
            refresh_interval: Duration::from_secs(30),
            config_wait: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// `host:` section.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// Host id; empty means `<hostname>-<data port>`.
    pub id: String,
    /// Hostname; empty means the system's.
    pub hostname: String,
    /// IP other peers reach this host on; empty means the address used to reach the
    /// scheduler.
    pub ip: String,
    /// Data center, for parent scoring.
    pub idc: String,
    /// Location (e.g. `region|zone|rack`), for parent scoring.
    pub location: String,
}

/// `seed_peer:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeedPeerConfig {
    /// Run as a seed peer: the scheduler asks it to fetch new tasks from the origin.
    pub enable: bool,
    /// Super-seed (with `enable`): each child is shown only pieces that have not left this
    /// seed yet, at most two at a time, until every piece has gone out once; then
    /// everything. The seed's uplink then carries about one copy of the task, and the
    /// peers trade the rest (see tuning.md, "super-seeding").
    pub super_seed: bool,
    /// Second and later copies of a task a super-seeding seed sends at once, at most; more
    /// requests for them are answered `Busy` and the child asks another parent. Raise it for
    /// a seed whose uplink is many times a peer's.
    pub copy_slots: u32,
}

impl Default for SeedPeerConfig {
    fn default() -> Self {
        Self {
            enable: false,
            super_seed: true,
            copy_slots: dataplane::seeding::COPY_SLOTS,
        }
    }
}

/// `scheduler:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Scheduler addresses (`host:port`); a task goes to one of them by rendezvous hash.
    pub addrs: Vec<String>,
    /// How long a download waits for parents before it goes back to the origin.
    #[serde(with = "humantime_serde")]
    pub schedule_timeout: Duration,
    /// TLS to the schedulers (`https://`); none: plaintext. See the README's TLS section.
    pub tls: Option<wire::tls::TlsConfig>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            addrs: vec!["127.0.0.1:8002".into()],
            schedule_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// `storage:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory of the task content files (and of the metadata store, `metadata.redb`).
    pub dir: PathBuf,
    /// How often piece progress is written to the metadata store (and at every finished
    /// download).
    #[serde(with = "humantime_serde")]
    pub persist_interval: Duration,
    /// On start, re-read every recorded piece and check its crc32c (else a recorded piece is
    /// trusted when the content file reaches its end).
    pub verify_on_start: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/damselfly"),
            persist_interval: Duration::from_millis(100),
            verify_on_start: false,
        }
    }
}

/// `local_api:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalApiConfig {
    /// Unix socket of the local gRPC API (dfget connects here).
    pub socket: PathBuf,
}

/// Default local API socket, shared with dfget.
pub const DEFAULT_SOCKET: &str = "/var/run/damselfly/dfdaemon.sock";

impl Default for LocalApiConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

/// Default of `download.origin_concurrency`.
pub const DEFAULT_ORIGIN_CONCURRENCY: usize = 16;

/// `download:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    /// Smallest piece length chosen by the piece length rule.
    pub piece_length_min: ByteSize,
    /// Largest piece length chosen by the piece length rule.
    pub piece_length_max: ByteSize,
    /// Retries of an interrupted origin transfer (each resumes with a Range request).
    pub origin_retries: u32,
    /// Time allowed to connect to the origin and get its response headers.
    #[serde(with = "humantime_serde")]
    pub origin_timeout: Duration,
    /// Most tasks fetched from origins at the same time by this daemon (more wait for a
    /// slot), so that downloads going back to source — all of them while the scheduler is
    /// down — do not stampede the origins. 0: no limit.
    pub origin_concurrency: usize,
    /// Deliver a finished download to its output by a hard link to the task file when both
    /// are on the same filesystem (no copy; as Dragonfly does), else by a copy. `false`
    /// always copies, so that writing to the output can never change the cached task.
    pub hard_link: bool,
    /// A running download that stores no piece (from any parent or the origin) for this long
    /// asks the scheduler for new parents; after a second such period in a row, or at once
    /// when the scheduler is gone, it fetches what it lacks from the origin (taking an
    /// origin slot). So while the origin answers, a download never sits idle longer than
    /// twice this (plus a wait for an origin slot). Must be at least
    /// [`DownloadConfig::min_stall_timeout`] of the data plane's `parent_idle_timeout`, so
    /// that it acts only after a stalled parent could have been dropped and reported.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            piece_length_min: ByteSize(wire::piece::DEFAULT_MIN_PIECE_LENGTH),
            piece_length_max: ByteSize(wire::piece::MAX_PIECE_LENGTH),
            origin_retries: 3,
            origin_timeout: Duration::from_secs(30),
            origin_concurrency: DEFAULT_ORIGIN_CONCURRENCY,
            hard_link: true,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// `metrics:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`/metrics`, `/healthy`); empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4002".into(),
        }
    }
}

impl DownloadConfig {
    /// Smallest `stall_timeout` allowed with `parent_idle_timeout` (zero: idle detection off,
    /// so no constraint): twice the idle timeout plus the long-poll allowance. A stalled
    /// parent is dropped within `parent_idle_timeout` (plus a long poll's wait, 1 s) of its
    /// last byte and reported at once; the watchdog, acting after as long again, then only
    /// ever sees a download the scheduler failed to help.
    pub fn min_stall_timeout(parent_idle_timeout: Duration) -> Duration {
        if parent_idle_timeout.is_zero() {
            return Duration::from_millis(1);
        }
        2 * parent_idle_timeout + dataplane::fetch::FetchConfig::default().bitmap_wait
    }
}

impl DaemonConfig {
    /// Reads a YAML file; a missing key takes its default, an unknown key is an error, and
    /// so is a combination [`DaemonConfig::validate`] refuses.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        let c: Self = serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        c.validate()
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(c)
    }

    /// Checks settings that depend on each other: the download stall watchdog must act only
    /// well after the data plane's idle detection could have (see
    /// [`DownloadConfig::min_stall_timeout`]).
    pub fn validate(&self) -> Result<(), String> {
        let idle = self.data_plane.parent_idle_timeout;
        let min = DownloadConfig::min_stall_timeout(idle);
        if self.download.stall_timeout < min {
            return Err(format!(
                "download.stall_timeout ({:?}) must be at least {min:?} with \
                 data_plane.parent_idle_timeout {idle:?} (twice it plus 1s): the stall watchdog \
                 must act only after a stalled parent could have been dropped and reported; \
                 raise stall_timeout or lower parent_idle_timeout (0s turns it off)",
                self.download.stall_timeout
            ));
        }
        self.proxy.user_ca().map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_takes_defaults() {
        let c: DaemonConfig = serde_yaml::from_str(
            "seed_peer:\n  enable: true\nscheduler:\n  schedule_timeout: 5s\n",
        )
        .expect("parses");
        assert!(c.seed_peer.enable);
        assert_eq!(c.scheduler.schedule_timeout, Duration::from_secs(5));
        assert_eq!(c.scheduler.addrs, vec!["127.0.0.1:8002".to_string()]);
        assert_eq!(c.data_plane.pieces_in_flight, 8);
        assert_eq!(c.data_plane.quic_max_udp_payload, 1452);
    }

    #[test]
    fn quic_udp_payload_is_configurable() {
        let c: DaemonConfig =
            serde_yaml::from_str("data_plane:\n  quic_max_udp_payload: 8900\n").expect("parses");
        assert_eq!(c.data_plane.quic_max_udp_payload, 8900);
    }

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("1.5Mi"), Ok(1_572_864));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        let c: DaemonConfig = serde_yaml::from_str(
            "data_plane:\n  upload_rate_limit: 100MiB\n  download_rate_limit: 5000\n",
        )
        .expect("parses");
        assert_eq!(c.data_plane.shaping().upload, 100 << 20);
        assert_eq!(c.data_plane.shaping().download, 5000);
    }

    #[test]
    fn proxy_ca_cert_and_key_come_together() {
        let parse = |y: &str| serde_yaml::from_str::<DaemonConfig>(y).expect("parses");
        let e = parse("proxy:\n  ca_cert: /etc/ca.pem\n")
            .validate()
            .expect_err("no key");
        assert!(
            e.contains("proxy.ca_cert is set without proxy.ca_key"),
            "{e}"
        );
        let e = parse("proxy:\n  ca_key: /etc/ca-key.pem\n")
            .validate()
            .expect_err("no cert");
        assert!(
            e.contains("proxy.ca_key is set without proxy.ca_cert"),
            "{e}"
        );
        let c = parse("proxy:\n  ca_cert: /etc/ca.pem\n  ca_key: /etc/ca-key.pem\n");
        c.validate().expect("both");
        let user = c.proxy.user_ca().expect("both").expect("a user CA");
        assert_eq!(user.cert, std::path::Path::new("/etc/ca.pem"));
        assert!(parse("").proxy.user_ca().expect("neither").is_none());
    }

    #[test]
    fn proxy_section() {
        let c: DaemonConfig = serde_yaml::from_str(
            "proxy:\n  enable: true\n  registry_mirror: http://127.0.0.1:5000\n",
        )
        .expect("parses");
        assert!(c.proxy.enable);
        assert_eq!(c.proxy.listen.port(), DEFAULT_PROXY_PORT);
        assert_eq!(c.proxy.rules, vec!["blobs/sha256.*".to_string()]);
        assert_eq!(c.proxy.registry_mirror, "http://127.0.0.1:5000");
    }

    #[test]
    fn tls_sections() {
        let c: DaemonConfig = serde_yaml::from_str(
            "scheduler:\n  tls: { ca_cert: /ca.pem, cert: /n.pem, key: /k.pem }\n\
             data_plane:\n  tls:\n    ca_cert: /ca.pem\n    cert: /n.pem\n    key: /k.pem\n    client_auth: true\n",
        )
        .expect("parses");
        let t = c.data_plane.tls.expect("data_plane.tls");
        assert!(t.client_auth);
        assert_eq!(t.ca_cert.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert!(!c.scheduler.tls.expect("scheduler.tls").client_auth);
        assert!(c.manager.tls.is_none());
        assert!(DaemonConfig::default().data_plane.tls.is_none());
        assert!(serde_yaml::from_str::<DaemonConfig>("manager:\n  tls: { ca: /x }\n").is_err());
    }

    #[test]
    fn the_stall_watchdog_acts_only_after_idle_detection() {
        let d = DaemonConfig::default();
        assert_eq!(d.data_plane.parent_idle_timeout, Duration::from_secs(3));
        assert!(d.validate().is_ok(), "{:?}", d.validate());
        assert!(d.download.stall_timeout >= 2 * d.data_plane.parent_idle_timeout);
        let c: DaemonConfig =
            serde_yaml::from_str("download:\n  stall_timeout: 6s\n").expect("parses");
        let e = c.validate().expect_err("6s is below 2 × 3s + 1s");
        assert!(
            e.contains("download.stall_timeout") && e.contains("7s"),
            "{e}"
        );
        let c: DaemonConfig = serde_yaml::from_str(
            "data_plane:\n  parent_idle_timeout: 3s\ndownload:\n  stall_timeout: 7s\n",
        )
        .expect("parses");
        assert!(c.validate().is_ok());
        let c: DaemonConfig = serde_yaml::from_str(
            "data_plane:\n  parent_idle_timeout: 0s\ndownload:\n  stall_timeout: 2s\n",
        )
        .expect("parses");
        assert!(
            c.validate().is_ok(),
            "idle detection off: any stall timeout"
        );
    }

    #[test]
    fn unknown_key_is_an_error() {
        assert!(serde_yaml::from_str::<DaemonConfig>("data_plane:\n  thread: 2\n").is_err());
    }
}
