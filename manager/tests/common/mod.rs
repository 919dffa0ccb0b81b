//! Helpers shared by the manager's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use damselfly_manager::{start, Config, Handle};

/// Token every test manager accepts.
pub const TOKEN: &str = "test-token";

/// Upper bound of every wait in the tests (a hang fails instead of blocking forever).
pub const BOUND: Duration = Duration::from_secs(20);

/// A manager on 127.0.0.1:0 with SQLite in a temp dir; `tweak` adjusts the config.
pub async fn manager(tweak: impl FnOnce(&mut Config)) -> (Handle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.grpc = "127.0.0.1:0".parse().unwrap();
    config.server.rest = "127.0.0.1:0".parse().unwrap();
    config.database.url = format!("sqlite://{}", dir.path().join("manager.db").display());
    config.auth.bootstrap_token = TOKEN.into();
    tweak(&mut config);
    let handle = start(config).await.unwrap();
    (handle, dir)
}

/// Polls `check` until it returns true, at most [`BOUND`]; panics with `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Minimal JSON REST client.
pub struct Rest {
    pub base: String,
    pub client: reqwest::Client,
}

impl Rest {
    pub fn new(handle: &Handle) -> Self {
        Self {
            base: format!("http://{}", handle.rest_addr),
            client: reqwest::Client::new(),
        }
    }

    /// Sends a request; returns status and parsed JSON body (Null when empty or not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(&b).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    pub async fn text(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

/// gRPC client of a test manager.
pub async fn grpc(
    handle: &Handle,
) -> damselfly_manager::proto::manager_client::ManagerClient<tonic::transport::Channel> {
    damselfly_manager::proto::manager_client::ManagerClient::connect(format!(
        "http://{}",
        handle.grpc_addr
    ))
    .await
    .unwrap()
}
