//! dfget: download a URL through the local dfdaemon.

use clap::Parser;
use damselfly_cli::{parse_header, unix_channel};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wire::proto::dfdaemon::{dfdaemon_client::DfdaemonClient, DownloadRequest, Header};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Download a URL through the P2P network of the local dfdaemon.
#[derive(Parser, Debug)]
#[command(
    name = "dfget",
    version,
    about = "Download a URL through the local Damselfly daemon"
)]
struct Args {
    /// URL to download (http or https).
    url: String,
    /// Output file.
    #[arg(short = 'O', long)]
    output: PathBuf,
    /// Expected digest of the whole file, sha256:<hex>; the download fails on mismatch.
    #[arg(long)]
    digest: Option<String>,
    /// Header for the origin request, 'Name: value'; repeat for several.
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Give up after this long (e.g. 30s, 10m); 0 waits forever.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Unix socket of the dfdaemon local API.
    #[arg(long, env = "DFGET_ENDPOINT", default_value = controlplane::config::DEFAULT_SOCKET)]
    endpoint: PathBuf,
    /// Tag: different tags make different tasks for the same URL.
    #[arg(long, default_value = "")]
    tag: String,
    /// Application name, part of the task id.
    #[arg(long, default_value = "")]
    application: String,
    /// Piece length in bytes (0 lets the daemon choose).
    #[arg(long, default_value_t = 0)]
    piece_length: u64,
    /// Download rate limit for this download (e.g. 50MiB, 100MB; bytes per second).
    #[arg(long, value_parser = controlplane::config::parse_size, default_value = "0")]
    rate_limit: u64,
    /// Fail instead of fetching from the origin when no peer can serve.
    #[arg(long)]
    disable_back_to_source: bool,
    /// Query parameters dropped from the URL before computing the task id (repeatable).
    #[arg(long = "filtered-query-param")]
    filtered_query_params: Vec<String>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dfget: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let timeout = args.timeout;
    let res = rt.block_on(async move {
        if timeout.is_zero() {
            run(args).await
        } else {
            match tokio::time::timeout(timeout, run(args)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "timed out after {}",
                    humantime::format_duration(timeout)
                )),
            }
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfget: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let output = if args.output.is_absolute() {
        args.output.clone()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(&args.output)
    };
    let channel = unix_channel(args.endpoint.clone()).await.map_err(|e| {
        format!(
            "no dfdaemon is answering on {} ({}). Start one with `dfdaemon --config /etc/damselfly/dfdaemon.yaml` \
             (or `dfdaemon --scheduler HOST:8002`), or point --endpoint / DFGET_ENDPOINT at its socket.",
            args.endpoint.display(),
            source_chain(&e)
        )
    })?;
    let mut client = DfdaemonClient::new(channel);
    let req = DownloadRequest {
        url: args.url.clone(),
        output: output.to_string_lossy().into_owned(),
        headers: args
            .headers
            .iter()
            .map(|(n, v)| Header {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
        digest: args.digest.clone().unwrap_or_default(),
        tag: args.tag.clone(),
        application: args.application.clone(),
        piece_length: args.piece_length,
        disable_back_to_source: args.disable_back_to_source,
        filtered_query_params: args.filtered_query_params.clone(),
        rate_limit: args.rate_limit,
    };
    let started = Instant::now();
    let mut stream = client
        .download(req)
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let bar = (!args.no_progress && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let mut last = None;
    while let Some(p) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        if let Some(b) = &bar {
            b.set_length(p.content_length);
            b.set_position(p.completed_length);
        }
        let done = p.done;
        last = Some(p);
        if done {
            break;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let p = last
        .filter(|p| p.done)
        .ok_or("the daemon ended the download without finishing it")?;
    let len = std::fs::metadata(&output)
        .map_err(|e| format!("{}: {e}", output.display()))?
        .len();
    if len != p.content_length {
        return Err(format!(
            "{} has {len} bytes, expected {}",
            output.display(),
            p.content_length
        ));
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "dfget: {} ({} bytes) in {:.2}s, {:.1} MB/s; from origin {} B, seed peers {} B, peers {} B; task {}",
        output.display(),
        p.content_length,
        secs,
        p.content_length as f64 / secs.max(1e-9) / 1e6,
        p.bytes_from_origin,
        p.bytes_from_seed,
        p.bytes_from_peers,
        p.task_id
    );
    Ok(())
}

fn source_chain(e: &dyn std::error::Error) -> String {
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
