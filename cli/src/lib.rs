//! Shared helpers of the Damselfly command-line binaries (thin: parsing, progress, exit codes).

use std::path::PathBuf;

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
