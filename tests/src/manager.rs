//! A `manager` process for tests and the demo, and a small client for its REST API.
//!
//! [`ManagerProc::spawn`] starts the manager with a SQLite file in the given directory, a
//! bootstrap token ([`TEST_TOKEN`]) and fast keepalives, on free loopback ports;
//! [`ManagerProc::wait_ready`] waits until `/healthy` answers. [`Rest`] speaks JSON to
//! `/api/v1/…` with or without the bearer token.

use crate::bin_path;
use crate::cluster::{free_port, wait_ready, Proc};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The bootstrap token the test manager accepts for REST writes.
pub const TEST_TOKEN: &str = "dfm_damselfly_test_token";

/// How the manager of a test cluster is configured.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// `keepalive.interval` told to schedulers and seed peers.
    pub keepalive_interval: Duration,
    /// `keepalive.timeout`: no keepalive for this long marks an instance inactive.
    pub keepalive_timeout: Duration,
    /// `config.max_wait`: longest GetConfig long poll.
    pub config_max_wait: Duration,
    /// `preheat.job_timeout`.
    pub preheat_job_timeout: Duration,
    /// A `tls:` block indented by 2 spaces, put under `server:` (gRPC over TLS); empty:
    /// plaintext.
    pub server_tls_yaml: String,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_millis(250),
            keepalive_timeout: Duration::from_secs(3),
            config_max_wait: Duration::from_secs(10),
            preheat_job_timeout: Duration::from_secs(120),
            server_tls_yaml: String::new(),
        }
    }
}

fn humantime(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A running manager.
#[derive(Debug)]
pub struct ManagerProc {
    /// gRPC address (schedulers, seed peers, daemons).
    pub grpc_addr: SocketAddr,
    /// REST API and status page address.
    pub rest_addr: SocketAddr,
    /// Token accepted for REST writes.
    pub token: String,
    /// Prometheus endpoint (`/metrics`, `/healthy`).
    pub metrics_addr: SocketAddr,
    /// The process.
    pub proc: Proc,
}

impl ManagerProc {
    /// Writes `<dir>/manager.yaml` and starts `manager` with its database in
    /// `<dir>/manager.db` and its log in `<dir>/manager.log`. Does not wait.
    pub fn spawn(dir: &Path, opts: &ManagerOptions, rust_log: &str) -> Result<Self> {
        let grpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let rest_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join("manager.yaml");
        let yaml = format!(
            "server:\n  grpc: {grpc_addr}\n  rest: {rest_addr}\n{tls}\
             database:\n  url: sqlite://{db}\n\
             auth:\n  bootstrap_token: {TEST_TOKEN}\n\
             keepalive:\n  interval: {ki}\n  timeout: {kt}\n\
             config:\n  max_wait: {mw}\n  recheck_interval: 500ms\n\
             preheat:\n  dispatch_timeout: 30s\n  job_timeout: {jt}\n\
             metrics:\n  enable: true\n  listen: {metrics_addr}\n",
            db = dir.join("manager.db").display(),
            ki = humantime(opts.keepalive_interval),
            kt = humantime(opts.keepalive_timeout),
            mw = humantime(opts.config_max_wait),
            jt = humantime(opts.preheat_job_timeout),
            tls = opts.server_tls_yaml,
        );
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        let proc = Proc::spawn(
            "manager",
            &bin_path("manager")?,
            &["--config".to_string(), config.display().to_string()],
            dir.join("manager.log"),
            rust_log,
        )?;
        Ok(Self {
            grpc_addr,
            rest_addr,
            token: TEST_TOKEN.to_string(),
            metrics_addr,
            proc,
        })
    }

    /// Kills the manager (SIGKILL) and starts it again with the same config file, ports and
    /// database; the new process logs to `<dir>/manager.restarted.log`. Does not wait.
    pub fn restart(&mut self, dir: &Path, rust_log: &str) -> Result<()> {
        self.proc.kill();
        let config = dir.join("manager.yaml");
        self.proc = Proc::spawn(
            "manager",
            &bin_path("manager")?,
            &["--config".to_string(), config.display().to_string()],
            dir.join("manager.restarted.log"),
            rust_log,
        )?;
        Ok(())
    }

    /// Waits until `GET /healthy` answers 200 and the gRPC port accepts.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let rest = self.rest();
        let grpc = self.grpc_addr;
        wait_ready(&self.proc, timeout, || {
            let rest = rest.clone();
            async move {
                matches!(rest.get("/healthy").await, Ok((200, _)))
                    && tokio::net::TcpStream::connect(grpc).await.is_ok()
            }
        })
        .await
    }

    /// A REST client of this manager, holding its token.
    pub fn rest(&self) -> Rest {
        Rest {
            base: format!("http://{}", self.rest_addr),
            token: self.token.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }
}

/// JSON over HTTP to a manager's REST API.
#[derive(Debug, Clone)]
pub struct Rest {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Rest {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        auth: bool,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if auth {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b)?);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }

    /// `GET path`: status and body (JSON, or the text as a JSON string).
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.send(reqwest::Method::GET, path, None, false).await
    }

    /// `GET path`, failing unless it answers 200.
    pub async fn get_ok(&self, path: &str) -> Result<Value> {
        match self.get(path).await? {
            (200, v) => Ok(v),
            (s, v) => bail!("GET {path}: {s} {v}"),
        }
    }

    /// `method path` with a JSON body; with the bearer token when `auth`.
    pub async fn write(
        &self,
        method: &str,
        path: &str,
        body: &Value,
        auth: bool,
    ) -> Result<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .with_context(|| format!("HTTP method {method:?}"))?;
        self.send(method, path, Some(body), auth).await
    }

    /// Id of the default cluster (`GET /api/v1/clusters`).
    pub async fn default_cluster_id(&self) -> Result<u64> {
        let clusters = self.get_ok("/api/v1/clusters").await?;
        clusters
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c["is_default"] == Value::Bool(true))
                    .and_then(|c| c["id"].as_u64())
            })
            .with_context(|| format!("no default cluster in {clusters}"))
    }

    /// `(ip:port, state)` of every scheduler the manager knows.
    pub async fn schedulers(&self) -> Result<Vec<(String, String)>> {
        instances(&self.get_ok("/api/v1/schedulers").await?)
    }

    /// `(ip:port, state)` of every seed peer the manager knows.
    pub async fn seed_peers(&self) -> Result<Vec<(String, String)>> {
        instances(&self.get_ok("/api/v1/seed-peers").await?)
    }

    /// Polls `GET /api/v1/schedulers` until at least `n` are active (bounded by `timeout`).
    pub async fn wait_active_schedulers(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.schedulers().await?;
            if list.iter().filter(|(_, s)| s == "active").count() >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("fewer than {n} active schedulers after {timeout:?}: {list:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn instances(v: &Value) -> Result<Vec<(String, String)>> {
    let list = v.as_array().with_context(|| format!("not a list: {v}"))?;
    Ok(list
        .iter()
        .map(|i| {
            (
                format!(
                    "{}:{}",
                    i["ip"].as_str().unwrap_or_default(),
                    i["port"].as_u64().unwrap_or_default()
                ),
                i["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}
