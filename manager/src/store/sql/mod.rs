//! [`SqlStore`]: the [`Store`] on SQLite or Postgres through sqlx's `Any` driver.
//!
//! Queries are shared (`$N` placeholders, `ON CONFLICT … DO UPDATE`, `RETURNING`, all of which
//! both databases speak); integers are `BIGINT`, booleans `0`/`1`, times milliseconds since
//! the epoch, nested values JSON text, so that one row decoder serves both.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor as _, Row as _};

use super::{Store, StoreError, StoreResult};

mod rows;
use crate::model::{
    Cluster, ClusterUpdate, Instance, InstanceKind, JobState, NewCluster, NewInstance,
    NewPersonalAccessToken, NewPreheatJob, PersonalAccessToken, PreheatJob, PreheatTarget,
    Timestamp,
};
use rows::*;

/// Which SQL dialect a [`SqlStore`] speaks (only the migrations differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (embedded file).
    Sqlite,
    /// Postgres server.
    Postgres,
}

/// The [`Store`] on a SQL database.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
}

impl SqlStore {
    /// Opens (creating when needed) the database at `url` and applies pending migrations.
    ///
    /// * `sqlite:///abs/path.db` or `sqlite://rel/path.db`: the file and its directory are
    ///   created when missing; WAL journal.
    /// * `postgres://user:pass@host:port/db` (or `postgresql://`): the database must exist.
    pub async fn open(url: &str, max_connections: u32) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = if url.starts_with("sqlite:") {
            (Dialect::Sqlite, sqlite_url(url)?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Dialect::Postgres, url.to_owned())
        } else {
            return Err(StoreError::Invalid(format!(
                "database URL must start with sqlite: or postgres://, got {url:?}"
            )));
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30));
        if dialect == Dialect::Sqlite {
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    Ok(())
                })
            });
        }
        let pool = pool.connect_with(options).await?;
        let store = Self { pool, dialect };
        store.migrate().await?;
        Ok(store)
    }

    /// Starts a transaction that will write. On SQLite it is `BEGIN IMMEDIATE`: the write
    /// lock is taken up front (waiting up to `busy_timeout`), because a deferred transaction
    /// that reads and then writes fails at once with `SQLITE_BUSY` ("database is locked")
    /// when another connection committed in between (e.g. a keepalive), whatever the busy
    /// timeout.
    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    /// The dialect of this store.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the connection pool (waits for connections in use).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> StoreResult<()> {
        let migrations = match self.dialect {
            Dialect::Sqlite => SQLITE_MIGRATIONS,
            Dialect::Postgres => POSTGRES_MIGRATIONS,
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let applied: i64 =
            sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
                .fetch_one(&self.pool)
                .await?
                .try_get("v")?;
        for (i, statements) in migrations.iter().enumerate() {
            let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
            if version <= applied {
                continue;
            }
            let mut tx = self.begin_write().await?;
            for statement in statements.iter() {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(Timestamp::now().0)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn create_cluster(&self, new: NewCluster) -> StoreResult<Cluster> {
        if new.name.trim().is_empty() {
            return Err(StoreError::Invalid("cluster name is empty".into()));
        }
        let now = Timestamp::now().0;
        let mut tx = self.begin_write().await?;
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM clusters")
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        let is_default = new.is_default || count == 0;
        if is_default {
            sqlx::query("UPDATE clusters SET is_default = 0")
                .execute(&mut *tx)
                .await?;
        }
        let row = sqlx::query(&format!(
            "INSERT INTO clusters (name, is_default, scopes, config, config_version, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, 1, $5, $5) RETURNING {CLUSTER_COLUMNS}"
        ))
        .bind(new.name.clone())
        .bind(i64::from(is_default))
        .bind(json(&new.scopes)?)
        .bind(json(&new.config)?)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict_or(e, &format!("cluster name {:?} is taken", new.name)))?;
        let cluster = cluster_row(&row)?;
        tx.commit().await?;
        Ok(cluster)
    }

    async fn get_cluster(&self, id: u64) -> StoreResult<Option<Cluster>> {
        let row = sqlx::query(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = $1"
        ))
        .bind(to_db(id))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(cluster_row).transpose()
    }

    async fn list_clusters(&self) -> StoreResult<Vec<Cluster>> {
        let rows = sqlx::query(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(cluster_row).collect()
    }

    async fn default_cluster(&self) -> StoreResult<Option<Cluster>> {
        let row = sqlx::query(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE is_default = 1 ORDER BY id LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(cluster_row).transpose()
    }

    async fn update_cluster(&self, id: u64, update: ClusterUpdate) -> StoreResult<Option<Cluster>> {
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query(&format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = $1"
        ))
        .bind(to_db(id))
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let mut cluster = cluster_row(&row)?;
        if let Some(name) = update.name {
            if name.trim().is_empty() {
                return Err(StoreError::Invalid("cluster name is empty".into()));
            }
            cluster.name = name;
        }
        match update.is_default {
            Some(true) if !cluster.is_default => {
                sqlx::query("UPDATE clusters SET is_default = 0")
                    .execute(&mut *tx)
                    .await?;
                cluster.is_default = true;
            }
            Some(false) if cluster.is_default => {
                return Err(StoreError::Invalid(
                    "the default cluster stays default until another cluster is made default"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(scopes) = update.scopes {
            cluster.scopes = scopes;
        }
        if let Some(config) = update.config {
            cluster.config = config;
            cluster.config_version += 1;
        }
        let row = sqlx::query(&format!(
            "UPDATE clusters SET name = $1, is_default = $2, scopes = $3, config = $4, \
             config_version = $5, updated_at = $6 WHERE id = $7 RETURNING {CLUSTER_COLUMNS}"
        ))
        .bind(cluster.name.clone())
        .bind(i64::from(cluster.is_default))
        .bind(json(&cluster.scopes)?)
        .bind(json(&cluster.config)?)
        .bind(to_db(cluster.config_version))
        .bind(Timestamp::now().0)
        .bind(to_db(id))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict_or(e, &format!("cluster name {:?} is taken", cluster.name)))?;
        let cluster = cluster_row(&row)?;
        tx.commit().await?;
        Ok(Some(cluster))
    }

    async fn delete_cluster(&self, id: u64) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT is_default FROM clusters WHERE id = $1")
            .bind(to_db(id))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        if row.try_get::<i64, _>("is_default")? != 0 {
            let others: i64 = sqlx::query("SELECT COUNT(*) AS n FROM clusters WHERE id <> $1")
                .bind(to_db(id))
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
            if others > 0 {
                return Err(StoreError::Invalid(
                    "cannot delete the default cluster while others exist".into(),
                ));
            }
        }
        // Explicit deletes: ON DELETE CASCADE needs foreign keys on in SQLite, and this
        // keeps the store correct even on a connection without the pragma.
        for t in ["schedulers", "seed_peers"] {
            sqlx::query(&format!("DELETE FROM {t} WHERE cluster_id = $1"))
                .bind(to_db(id))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM clusters WHERE id = $1")
            .bind(to_db(id))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn upsert_instance(
        &self,
        kind: InstanceKind,
        new: NewInstance,
        now: Timestamp,
    ) -> StoreResult<Instance> {
        let t = table(kind);
        let row = sqlx::query(&format!(
            "INSERT INTO {t} (cluster_id, hostname, ip, port, download_port, idc, location, \
             state, last_keepalive_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $8) \
             ON CONFLICT (cluster_id, hostname, ip, port) DO UPDATE SET \
             download_port = excluded.download_port, idc = excluded.idc, \
             location = excluded.location, state = 'active', \
             last_keepalive_at = excluded.last_keepalive_at \
             RETURNING {INSTANCE_COLUMNS}"
        ))
        .bind(to_db(new.cluster_id))
        .bind(new.hostname)
        .bind(new.ip)
        .bind(i64::from(new.port))
        .bind(i64::from(new.download_port))
        .bind(new.idc)
        .bind(new.location)
        .bind(now.0)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| conflict_or(e, &format!("cluster {}", new.cluster_id)))?;
        instance_row(&row)
    }

    async fn get_instance(&self, kind: InstanceKind, id: u64) -> StoreResult<Option<Instance>> {
        let t = table(kind);
        let row = sqlx::query(&format!("SELECT {INSTANCE_COLUMNS} FROM {t} WHERE id = $1"))
            .bind(to_db(id))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(instance_row).transpose()
    }

    async fn list_instances(
        &self,
        kind: InstanceKind,
        cluster_id: Option<u64>,
    ) -> StoreResult<Vec<Instance>> {
        let t = table(kind);
        let rows = match cluster_id {
            Some(c) => {
                sqlx::query(&format!(
                    "SELECT {INSTANCE_COLUMNS} FROM {t} WHERE cluster_id = $1 ORDER BY id"
                ))
                .bind(to_db(c))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {INSTANCE_COLUMNS} FROM {t} ORDER BY id"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(instance_row).collect()
    }

    async fn keepalive(&self, kind: InstanceKind, id: u64, now: Timestamp) -> StoreResult<bool> {
        let t = table(kind);
        let done = sqlx::query(&format!(
            "UPDATE {t} SET state = 'active', last_keepalive_at = $1 WHERE id = $2"
        ))
        .bind(now.0)
        .bind(to_db(id))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn set_inactive(&self, kind: InstanceKind, id: u64) -> StoreResult<bool> {
        let t = table(kind);
        let done = sqlx::query(&format!("UPDATE {t} SET state = 'inactive' WHERE id = $1"))
            .bind(to_db(id))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn expire_instances(&self, deadline: Timestamp) -> StoreResult<u64> {
        let mut n = 0;
        for t in ["schedulers", "seed_peers"] {
            let done = sqlx::query(&format!(
                "UPDATE {t} SET state = 'inactive' \
                 WHERE state = 'active' AND last_keepalive_at < $1"
            ))
            .bind(deadline.0)
            .execute(&self.pool)
            .await?;
            n += done.rows_affected();
        }
        Ok(n)
    }

    async fn create_job(&self, new: NewPreheatJob, now: Timestamp) -> StoreResult<PreheatJob> {
        let row = sqlx::query(&format!(
            "INSERT INTO preheat_jobs (kind, url, cluster_id, state, targets, error, created_at, \
             updated_at, resume_args) VALUES ($1, $2, $3, 'pending', '[]', '', $4, $4, $5) \
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(new.kind.as_str())
        .bind(new.url)
        .bind(new.cluster_id.map(to_db))
        .bind(now.0)
        .bind(new.resume_args)
        .fetch_one(&self.pool)
        .await?;
        job_row(&row)
    }

    async fn get_job(&self, id: u64) -> StoreResult<Option<PreheatJob>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM preheat_jobs WHERE id = $1"
        ))
        .bind(to_db(id))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_row).transpose()
    }

    async fn list_jobs(&self, limit: u32) -> StoreResult<Vec<PreheatJob>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM preheat_jobs ORDER BY id DESC LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_row).collect()
    }

    async fn update_job(
        &self,
        id: u64,
        state: JobState,
        targets: &[PreheatTarget],
        error: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE preheat_jobs SET state = $1, targets = $2, error = $3, updated_at = $4 \
             WHERE id = $5",
        )
        .bind(state.as_str())
        .bind(json(&targets)?)
        .bind(error.to_owned())
        .bind(now.0)
        .bind(to_db(id))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn unfinished_jobs(&self) -> StoreResult<Vec<(PreheatJob, String)>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, resume_args FROM preheat_jobs \
             WHERE state IN ('pending', 'running') ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((job_row(r)?, r.try_get::<String, _>("resume_args")?)))
            .collect()
    }

    async fn fail_unfinished_jobs(&self, error: &str, now: Timestamp) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE preheat_jobs SET state = 'failure', error = $1, updated_at = $2 \
             WHERE state IN ('pending', 'running')",
        )
        .bind(error.to_owned())
        .bind(now.0)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn create_token(
        &self,
        new: NewPersonalAccessToken,
        now: Timestamp,
    ) -> StoreResult<PersonalAccessToken> {
        let row = sqlx::query(&format!(
            "INSERT INTO personal_access_tokens (name, bio, token_sha256, scopes, state, \
             expired_at, created_at, updated_at) VALUES ($1, $2, $3, $4, 'active', $5, $6, $6) \
             RETURNING {TOKEN_COLUMNS}"
        ))
        .bind(new.name)
        .bind(new.bio)
        .bind(new.token_sha256)
        .bind(json(&new.scopes)?)
        .bind(new.expired_at.0)
        .bind(now.0)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| conflict_or(e, "token"))?;
        token_row(&row)
    }

    async fn get_token(&self, id: u64) -> StoreResult<Option<PersonalAccessToken>> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM personal_access_tokens WHERE id = $1"
        ))
        .bind(to_db(id))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_row).transpose()
    }

    async fn token_by_hash(&self, sha256: &str) -> StoreResult<Option<PersonalAccessToken>> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM personal_access_tokens WHERE token_sha256 = $1"
        ))
        .bind(sha256.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_row).transpose()
    }

    async fn list_tokens(&self) -> StoreResult<Vec<PersonalAccessToken>> {
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLUMNS} FROM personal_access_tokens ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_row).collect()
    }

    async fn revoke_token(&self, id: u64, now: Timestamp) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE personal_access_tokens SET state = 'inactive', updated_at = $1 WHERE id = $2",
        )
        .bind(now.0)
        .bind(to_db(id))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    async fn insert_setting(&self, key: &str, value: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key.to_owned())
        .bind(value.to_owned())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::rows::sqlite_url;

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a/b/m.db");
        let url = format!("sqlite://{}", p.display());
        assert_eq!(
            sqlite_url(&url).expect("url"),
            format!("sqlite://{}?mode=rwc", p.display())
        );
        assert!(dir.path().join("a/b").is_dir());
        let url = format!("sqlite://{}?mode=ro", p.display());
        assert_eq!(sqlite_url(&url).expect("url"), url);
        assert_eq!(
            sqlite_url("sqlite::memory:").expect("url"),
            "sqlite::memory:"
        );
    }
}
