//! The manager's data model: what the [`Store`](crate::store::Store) keeps and the REST API
//! shows.
//!
//! Ids are positive integers given by the database. Times are milliseconds since the Unix
//! epoch in storage and RFC 3339 strings in JSON.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in time, stored as milliseconds since the Unix epoch, shown as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Self(i64::try_from(ms).unwrap_or(i64::MAX))
    }

    /// This time minus `d` (saturating).
    pub fn minus(self, d: Duration) -> Self {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(ms))
    }

    /// RFC 3339 form with milliseconds, in UTC.
    pub fn rfc3339(self) -> String {
        let ms = u64::try_from(self.0).unwrap_or(0);
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)?;
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_err(serde::de::Error::custom)?
            .as_millis();
        Ok(Self(i64::try_from(ms).map_err(serde::de::Error::custom)?))
    }
}

/// Which hosts a scheduler cluster serves; the searcher matches daemons against it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scopes {
    /// Data centers, `|`-separated (`"idc-a|idc-b"`); a host in one of them matches.
    pub idc: String,
    /// Location prefix, `|`-separated from wide to narrow (`"cn|hz"`); the more leading
    /// elements a host's location shares, the better the match.
    pub location: String,
    /// Networks (`"10.0.0.0/8"`, `"fd00::/8"`) whose hosts this cluster serves.
    pub cidrs: Vec<String>,
    /// Regular expressions, each matched against the whole hostname.
    pub hostnames: Vec<String>,
}

/// Overrides of the scheduler's `scheduling:` section; `None` keeps the scheduler's own value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerClusterConfig {
    /// Parents sent at once when a peer is scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidate_parent_limit: Option<u32>,
    /// Most parents a peer holds at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_limit: Option<u32>,
    /// Random candidates looked at before keeping the best.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter_parent_limit: Option<u32>,
    /// Peers of one task sent back to the origin at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_to_source_limit: Option<u32>,
    /// Reschedules of one peer before it goes back to the origin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_limit: Option<u32>,
    /// Children a normal peer serves at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal_upload_slots: Option<u32>,
    /// Children a seed peer serves at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_upload_slots: Option<u32>,
}

/// Overrides of the daemon's `data_plane:` section (bytes per second, 0 unlimited); `None`
/// keeps the daemon's own value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonClusterConfig {
    /// Total upload rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_rate_limit: Option<u64>,
    /// Total download rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_rate_limit: Option<u64>,
    /// Upload rate of each peer connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_peer_upload_rate_limit: Option<u64>,
    /// Download rate from each parent connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_peer_download_rate_limit: Option<u64>,
    /// Piece requests outstanding per parent connection (piece concurrency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pieces_in_flight: Option<u32>,
}

/// A cluster's dynamic config, served by `GetConfig` with a version number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// For the cluster's schedulers.
    pub scheduler: SchedulerClusterConfig,
    /// For the daemons (peers and seed peers) the cluster serves.
    pub daemon: DaemonClusterConfig,
}

/// A scheduler cluster: a set of schedulers and seed peers serving the hosts in its scopes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Database id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Chosen by the searcher when no other cluster matches a host.
    pub is_default: bool,
    /// Which hosts it serves.
    pub scopes: Scopes,
    /// Its dynamic config.
    pub config: ClusterConfig,
    /// Grows by one with every config change (starts at 1).
    pub config_version: u64,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// Fields of a new cluster (REST `POST /api/v1/clusters`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewCluster {
    /// Unique name (required, non-empty).
    pub name: String,
    /// Make it the default cluster (the previous default loses the flag).
    pub is_default: bool,
    /// Which hosts it serves.
    pub scopes: Scopes,
    /// Its initial dynamic config.
    pub config: ClusterConfig,
}

/// A partial change of a cluster (REST `PATCH /api/v1/clusters/{id}`); `None` keeps a field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterUpdate {
    /// New name.
    pub name: Option<String>,
    /// Make it the default cluster (`false` is refused while it is the default: make another
    /// cluster the default instead).
    pub is_default: Option<bool>,
    /// New scopes (replaces all of them).
    pub scopes: Option<Scopes>,
    /// New dynamic config (replaces all of it and bumps the version).
    pub config: Option<ClusterConfig>,
}

/// Liveness of a scheduler or seed peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Registered and keeping its keepalive stream alive.
    Active,
    /// Keepalive stream closed or silent past the timeout.
    Inactive,
}

impl InstanceState {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
        }
    }

    /// Parses the stored form; anything unknown is inactive.
    pub fn parse(s: &str) -> Self {
        if s == "active" {
            Self::Active
        } else {
            Self::Inactive
        }
    }
}

/// Which kind of registered instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceKind {
    /// A scheduler.
    Scheduler,
    /// A seed peer.
    SeedPeer,
}

/// A scheduler or seed peer as registered (both have the same shape; `download_port` is 0
/// for schedulers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Database id.
    pub id: u64,
    /// Cluster it belongs to.
    pub cluster_id: u64,
    /// Hostname it reported.
    pub hostname: String,
    /// IP it is reached on.
    pub ip: String,
    /// gRPC port.
    pub port: u16,
    /// Data-plane port (seed peers only; 0 for schedulers).
    pub download_port: u16,
    /// Its data center.
    pub idc: String,
    /// Its location.
    pub location: String,
    /// Live state.
    pub state: InstanceState,
    /// Last keepalive (or registration).
    pub last_keepalive_at: Timestamp,
    /// First registration.
    pub created_at: Timestamp,
}

/// What a scheduler or seed peer reports when it registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewInstance {
    /// Cluster it joins.
    pub cluster_id: u64,
    /// Its hostname.
    pub hostname: String,
    /// IP it is reached on.
    pub ip: String,
    /// gRPC port.
    pub port: u16,
    /// Data-plane port (seed peers; 0 for schedulers).
    pub download_port: u16,
    /// Its data center.
    pub idc: String,
    /// Its location.
    pub location: String,
}

/// What a preheat job fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreheatKind {
    /// One URL.
    File,
    /// An image: its manifest is resolved to layer blob URLs.
    Image,
}

impl PreheatKind {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Image => "image",
        }
    }

    /// Parses the stored form (anything unknown is `File`).
    pub fn parse(s: &str) -> Self {
        if s == "image" {
            Self::Image
        } else {
            Self::File
        }
    }
}

/// State of a preheat job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Created, not yet resolved or dispatched.
    Pending,
    /// Sent to schedulers; waiting for results.
    Running,
    /// Every URL was fetched by a seed peer.
    Success,
    /// Resolution, dispatch or a fetch failed (see `error`).
    Failure,
}

impl JobState {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }

    /// Parses the stored form (anything unknown is `Failure`).
    pub fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "success" => Self::Success,
            _ => Self::Failure,
        }
    }

    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Failure)
    }
}

/// One URL of a preheat job and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatTarget {
    /// What a seed peer fetches.
    pub url: String,
    /// Content digest when known (image layers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Outcome so far.
    pub state: JobState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The hosts that were to hold it and how each did (the seed that fetched it first; with
    /// the `all_seed_peers` / `all_peers` scopes, every chosen host). Empty until reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<TargetHost>,
}

/// One host's outcome for one preheat target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHost {
    /// The daemon's host id.
    pub host_id: String,
    /// Its hostname.
    pub hostname: String,
    /// Its IP.
    pub ip: String,
    /// `success` or `failure`.
    pub state: JobState,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A preheat job: have seed peers fetch a URL (or an image's layers) before peers ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreheatJob {
    /// Database id.
    pub id: u64,
    /// File or image.
    pub kind: PreheatKind,
    /// The URL, or the image reference / manifest URL.
    pub url: String,
    /// Cluster whose schedulers run it; `None`: every cluster with a connected scheduler.
    pub cluster_id: Option<u64>,
    /// Overall state.
    pub state: JobState,
    /// Resolved URLs and their outcomes (empty until resolved).
    pub targets: Vec<PreheatTarget>,
    /// Why the job failed.
    pub error: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// Fields of a new preheat job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPreheatJob {
    /// File or image.
    pub kind: PreheatKind,
    /// The URL or image reference.
    pub url: String,
    /// Target cluster, if one.
    pub cluster_id: Option<u64>,
    /// What a restarted manager needs to run the job again (JSON), or empty when the job
    /// cannot be resumed (it carries credentials or headers, which are not stored).
    pub resume_args: String,
}

/// Whether a personal access token is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// Accepted until it expires.
    Active,
    /// Revoked: never accepted again.
    Inactive,
}

impl TokenState {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
        }
    }

    /// Parses the stored form (anything unknown is `Inactive`).
    pub fn parse(s: &str) -> Self {
        if s == "active" {
            Self::Active
        } else {
            Self::Inactive
        }
    }
}

/// A personal access token (Dragonfly's): a bearer token for the open API (`/oapi/v1/…`)
/// with scopes and an expiry. Only its sha256 is stored; the token itself is shown once, when
/// it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonalAccessToken {
    /// Database id.
    pub id: u64,
    /// Name given at creation.
    pub name: String,
    /// Description.
    pub bio: String,
    /// What it may do (`job`: the open API's jobs).
    pub scopes: Vec<String>,
    /// Active, or revoked.
    pub state: TokenState,
    /// Not accepted from this time on.
    pub expired_at: Timestamp,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed (revoked).
    pub updated_at: Timestamp,
}

/// Fields of a new personal access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPersonalAccessToken {
    /// Name (non-empty).
    pub name: String,
    /// Description.
    pub bio: String,
    /// Scopes (validated by the caller).
    pub scopes: Vec<String>,
    /// Expiry.
    pub expired_at: Timestamp,
    /// Hex sha256 of the token.
    pub token_sha256: String,
}
