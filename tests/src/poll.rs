//! Helpers of the fault and metrics tests: polling for a condition (never a sleep used as
//! an assertion), daemon config files, and scraping Prometheus endpoints.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Polls `cond` every 50 ms until it returns `Ok(true)`; fails after `timeout` (with
/// `what` in the message) or on the first error it returns.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond()
            .await
            .with_context(|| format!("while waiting until {what}"))?
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not true within {timeout:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes a dfdaemon YAML config `name` into `dir` and returns the `--config` arguments
/// naming it.
pub fn daemon_config(dir: &Path, name: &str, yaml: &str) -> Result<Vec<String>> {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(vec!["--config".into(), path.display().to_string()])
}

/// `GET http://addr/path`: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let resp = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .text()
        .await
        .with_context(|| format!("body of {url}"))?;
    Ok((status, body))
}

/// Scrapes `http://addr/metrics` (must answer 200).
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        bail!("http://{addr}/metrics answered {status}: {body}");
    }
    Ok(body)
}

/// The value of the sample `series` (a metric name with its labels exactly as exposed,
/// e.g. `damselfly_downloads_failed_total{kind="origin"}`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// The value of the counter `name` (with or without the `_total` suffix prometheus-client
/// adds, no labels) that the daemon at `addr` exposes on `/metrics`.
pub async fn counter(addr: SocketAddr, name: &str) -> Result<u64> {
    let text = scrape(addr).await?;
    let total = format!("{name}_total");
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let n = it.next()?;
            (n == name || n == total).then(|| it.next()?.parse().ok())?
        })
        .with_context(|| format!("metric {name} missing from:\n{text}"))
}
