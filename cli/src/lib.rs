//! Shared helpers of the Damselfly command-line binaries (thin: parsing, progress, exit codes).

pub mod dfget_config;
pub mod dfinit;
pub mod exit;
pub mod listing;

use std::path::{Path, PathBuf};
use wire::proto::dfdaemon::dfdaemon_client::DfdaemonClient;

/// Sets up `tracing` logs on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Raises the soft limit of open files to the hard limit (a daemon serving many peers and
/// local clients at once needs more than the usual 1024), and logs the result.
pub fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!("open files limit: {n}"),
        Err(e) => tracing::warn!("could not raise the open files limit: {e}"),
    }
}

/// Connects a gRPC channel to a Unix socket.
pub async fn unix_channel(
    path: PathBuf,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
}

/// Connects to the dfdaemon local API on `endpoint`, or explains how to get a daemon there
/// (`env` names the environment variable that sets the endpoint).
pub async fn connect_daemon(
    endpoint: &Path,
    env: &str,
) -> Result<DfdaemonClient<tonic::transport::Channel>, String> {
    let channel = unix_channel(endpoint.to_path_buf()).await.map_err(|e| {
        format!(
            "no dfdaemon is answering on {} ({}). Start one with `dfdaemon --config /etc/damselfly/dfdaemon.yaml` \
             (or `dfdaemon --scheduler HOST:8002`), or point --endpoint / {env} at its socket.",
            endpoint.display(),
            source_chain(&e)
        )
    })?;
    Ok(DfdaemonClient::new(channel))
}

/// An error and its sources on one line, without repeating a source already in the text.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Makes `p` absolute against the current directory.
pub fn absolute(p: &Path) -> Result<PathBuf, String> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(p))
    }
}

/// Parses `Name: value` into a header pair.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("header {s:?} must look like 'Name: value'"))?;
    let name = name.trim();
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("header name {name:?} is not valid"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(parse_header("X-A: b: c"), Ok(("X-A".into(), "b: c".into())));
        assert!(parse_header("nocolon").is_err());
        assert!(parse_header(": v").is_err());
    }
}
