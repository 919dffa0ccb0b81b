//! The SQL schema (migrations per dialect, column lists) and the conversions between rows
//! and the model: one decoder per table serves both databases.

use std::path::Path;

use sqlx::any::AnyRow;
use sqlx::Row as _;

use super::super::{StoreError, StoreResult};
use crate::model::{
    Cluster, Instance, InstanceKind, InstanceState, JobState, PersonalAccessToken, PreheatJob,
    PreheatKind, Timestamp, TokenState,
};

/// Schema migrations, applied in order, each once; a new migration is appended, never edited.
pub(super) const SQLITE_MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE clusters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        is_default BIGINT NOT NULL DEFAULT 0,
        scopes TEXT NOT NULL,
        config TEXT NOT NULL,
        config_version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
        "CREATE TABLE schedulers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        hostname TEXT NOT NULL, ip TEXT NOT NULL, port BIGINT NOT NULL,
        download_port BIGINT NOT NULL DEFAULT 0,
        idc TEXT NOT NULL, location TEXT NOT NULL, state TEXT NOT NULL,
        last_keepalive_at BIGINT NOT NULL, created_at BIGINT NOT NULL,
        UNIQUE (cluster_id, hostname, ip, port))",
        "CREATE TABLE seed_peers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        hostname TEXT NOT NULL, ip TEXT NOT NULL, port BIGINT NOT NULL,
        download_port BIGINT NOT NULL DEFAULT 0,
        idc TEXT NOT NULL, location TEXT NOT NULL, state TEXT NOT NULL,
        last_keepalive_at BIGINT NOT NULL, created_at BIGINT NOT NULL,
        UNIQUE (cluster_id, hostname, ip, port))",
        "CREATE TABLE preheat_jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL, url TEXT NOT NULL, cluster_id BIGINT,
        state TEXT NOT NULL, targets TEXT NOT NULL, error TEXT NOT NULL,
        created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
    &["CREATE TABLE personal_access_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL, bio TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL, state TEXT NOT NULL,
        expired_at BIGINT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)"],
    &["ALTER TABLE preheat_jobs ADD COLUMN resume_args TEXT NOT NULL DEFAULT ''"],
];

/// The same schema in Postgres' words.
pub(super) const POSTGRES_MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE clusters (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        is_default BIGINT NOT NULL DEFAULT 0,
        scopes TEXT NOT NULL,
        config TEXT NOT NULL,
        config_version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL)",
        "CREATE TABLE schedulers (
        id BIGSERIAL PRIMARY KEY,
        cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        hostname TEXT NOT NULL, ip TEXT NOT NULL, port BIGINT NOT NULL,
        download_port BIGINT NOT NULL DEFAULT 0,
        idc TEXT NOT NULL, location TEXT NOT NULL, state TEXT NOT NULL,
        last_keepalive_at BIGINT NOT NULL, created_at BIGINT NOT NULL,
        UNIQUE (cluster_id, hostname, ip, port))",
        "CREATE TABLE seed_peers (
        id BIGSERIAL PRIMARY KEY,
        cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        hostname TEXT NOT NULL, ip TEXT NOT NULL, port BIGINT NOT NULL,
        download_port BIGINT NOT NULL DEFAULT 0,
        idc TEXT NOT NULL, location TEXT NOT NULL, state TEXT NOT NULL,
        last_keepalive_at BIGINT NOT NULL, created_at BIGINT NOT NULL,
        UNIQUE (cluster_id, hostname, ip, port))",
        "CREATE TABLE preheat_jobs (
        id BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL, url TEXT NOT NULL, cluster_id BIGINT,
        state TEXT NOT NULL, targets TEXT NOT NULL, error TEXT NOT NULL,
        created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
    &["CREATE TABLE personal_access_tokens (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL, bio TEXT NOT NULL,
        token_sha256 TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL, state TEXT NOT NULL,
        expired_at BIGINT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)"],
    &["ALTER TABLE preheat_jobs ADD COLUMN resume_args TEXT NOT NULL DEFAULT ''"],
];

pub(super) const CLUSTER_COLUMNS: &str =
    "id, name, is_default, scopes, config, config_version, created_at, updated_at";
pub(super) const INSTANCE_COLUMNS: &str =
    "id, cluster_id, hostname, ip, port, download_port, idc, location, \
     state, last_keepalive_at, created_at";
pub(super) const JOB_COLUMNS: &str =
    "id, kind, url, cluster_id, state, targets, error, created_at, updated_at";
pub(super) const TOKEN_COLUMNS: &str =
    "id, name, bio, scopes, state, expired_at, created_at, updated_at";

/// Adds `mode=rwc` (create when missing) to a SQLite URL and creates the file's directory.
pub(super) fn sqlite_url(url: &str) -> StoreResult<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or_default();
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" {
        return Ok(url.to_owned());
    }
    if let Some(dir) = Path::new(path).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Invalid(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
    }
    if query.contains("mode=") {
        Ok(url.to_owned())
    } else if query.is_empty() {
        Ok(format!("sqlite://{path}?mode=rwc"))
    } else {
        Ok(format!("sqlite://{path}?{query}&mode=rwc"))
    }
}

pub(super) fn table(kind: InstanceKind) -> &'static str {
    match kind {
        InstanceKind::Scheduler => "schedulers",
        InstanceKind::SeedPeer => "seed_peers",
    }
}

pub(super) fn to_db(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

pub(super) fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn unjson<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn conflict_or(e: sqlx::Error, what: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(what.to_owned())
        }
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            StoreError::Invalid(format!("unknown reference: {what}"))
        }
        _ => StoreError::Database(e),
    }
}

pub(super) fn cluster_row(row: &AnyRow) -> StoreResult<Cluster> {
    Ok(Cluster {
        id: from_db(row.try_get("id")?),
        name: row.try_get("name")?,
        is_default: row.try_get::<i64, _>("is_default")? != 0,
        scopes: unjson(&row.try_get::<String, _>("scopes")?)?,
        config: unjson(&row.try_get::<String, _>("config")?)?,
        config_version: from_db(row.try_get("config_version")?),
        created_at: Timestamp(row.try_get("created_at")?),
        updated_at: Timestamp(row.try_get("updated_at")?),
    })
}

pub(super) fn instance_row(row: &AnyRow) -> StoreResult<Instance> {
    Ok(Instance {
        id: from_db(row.try_get("id")?),
        cluster_id: from_db(row.try_get("cluster_id")?),
        hostname: row.try_get("hostname")?,
        ip: row.try_get("ip")?,
        port: u16::try_from(row.try_get::<i64, _>("port")?).unwrap_or(0),
        download_port: u16::try_from(row.try_get::<i64, _>("download_port")?).unwrap_or(0),
        idc: row.try_get("idc")?,
        location: row.try_get("location")?,
        state: InstanceState::parse(&row.try_get::<String, _>("state")?),
        last_keepalive_at: Timestamp(row.try_get("last_keepalive_at")?),
        created_at: Timestamp(row.try_get("created_at")?),
    })
}

pub(super) fn job_row(row: &AnyRow) -> StoreResult<PreheatJob> {
    Ok(PreheatJob {
        id: from_db(row.try_get("id")?),
        kind: PreheatKind::parse(&row.try_get::<String, _>("kind")?),
        url: row.try_get("url")?,
        cluster_id: row.try_get::<Option<i64>, _>("cluster_id")?.map(from_db),
        state: JobState::parse(&row.try_get::<String, _>("state")?),
        targets: unjson(&row.try_get::<String, _>("targets")?)?,
        error: row.try_get("error")?,
        created_at: Timestamp(row.try_get("created_at")?),
        updated_at: Timestamp(row.try_get("updated_at")?),
    })
}

pub(super) fn token_row(row: &AnyRow) -> StoreResult<PersonalAccessToken> {
    Ok(PersonalAccessToken {
        id: from_db(row.try_get("id")?),
        name: row.try_get("name")?,
        bio: row.try_get("bio")?,
        scopes: unjson(&row.try_get::<String, _>("scopes")?)?,
        state: TokenState::parse(&row.try_get::<String, _>("state")?),
        expired_at: Timestamp(row.try_get("expired_at")?),
        created_at: Timestamp(row.try_get("created_at")?),
        updated_at: Timestamp(row.try_get("updated_at")?),
    })
}
