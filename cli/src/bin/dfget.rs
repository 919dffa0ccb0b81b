//! dfget: download a URL (a byte range of it, or a whole directory listing) through the local
//! dfdaemon.

use clap::Parser;
use controlplane::task_reader::ByteRange as Range;
use damselfly_cli::dfget_config::{self, DfgetConfig};
use damselfly_cli::exit::{self, Failure};
use damselfly_cli::listing::{self, Entry};
use damselfly_cli::{absolute, connect_daemon, parse_header};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use wire::proto::dfdaemon::{
    dfdaemon_client::DfdaemonClient, ByteRange, DownloadProgress, DownloadRequest, Header,
};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Download a URL through the P2P network of the local dfdaemon.
#[derive(Parser, Debug)]
#[command(
    name = "dfget",
    version = damselfly_common::VERSION,
    about = "Download a URL through the local Damselfly daemon"
)]
struct Args {
    /// URL to download (http, https or s3://bucket/key); with --recursive, a directory index
    /// page or an s3://bucket/prefix/.
    url: String,
    /// Output file (with --recursive: output directory).
    #[arg(short = 'O', long)]
    output: PathBuf,
    /// Expected digest of the whole file, sha256:<hex>; the download fails on mismatch.
    #[arg(long)]
    digest: Option<String>,
    /// Header for the origin request, 'Name: value'; repeat for several.
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Give up after this long (e.g. 30s, 10m); 0 waits forever. Default: config file, else 0.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Unix socket of the dfdaemon local API. Default: config file, else
    /// /var/run/damselfly/dfdaemon.sock.
    #[arg(long, env = "DFGET_ENDPOINT")]
    endpoint: Option<PathBuf>,
    /// Tag: different tags make different tasks for the same URL.
    #[arg(long)]
    tag: Option<String>,
    /// Application name, part of the task id.
    #[arg(long)]
    application: Option<String>,
    /// Piece length in bytes (0 lets the daemon choose).
    #[arg(long, default_value_t = 0)]
    piece_length: u64,
    /// Download rate limit for this download (e.g. 50MiB, 100MB; bytes per second).
    #[arg(long, value_parser = controlplane::config::parse_size)]
    rate_limit: Option<u64>,
    /// Fail instead of fetching from the origin when no peer can serve.
    #[arg(long)]
    disable_back_to_source: bool,
    /// Query parameters dropped from the URL before computing the task id (repeatable).
    #[arg(long = "filtered-query-param")]
    filtered_query_params: Vec<String>,
    /// No progress bar even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Only these bytes: START-END (END inclusive, HTTP Range semantics) or START- (to the
    /// end). The task is still the whole file's, so its pieces serve later downloads.
    #[arg(long, value_parser = Range::parse, allow_hyphen_values = true)]
    range: Option<Range>,
    /// Priority level 0..6 passed to the scheduler (Dragonfly's levels; 0: default).
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=6))]
    priority: Option<i32>,
    /// Download every file below URL, an HTML directory index (nginx, Apache, python
    /// http.server), into the -O directory, keeping relative paths; follows subdirectories.
    #[arg(long, short = 'r')]
    recursive: bool,
    /// Object store endpoint for s3:// URLs (e.g. http://minio:9000). The --storage-* settings
    /// go with the download request to the local daemon, which uses them over its own
    /// origin.s3 settings when it fetches the object itself (never sent to the scheduler or
    /// other peers: a seed peer the scheduler asks uses its own); --recursive also lists the
    /// prefix with them. Unset: the daemon's setting (for listing: AWS_ENDPOINT).
    #[arg(long)]
    storage_endpoint: Option<String>,
    /// Object store region (unset: the daemon's; for listing AWS_REGION, else us-east-1).
    #[arg(long)]
    storage_region: Option<String>,
    /// Access key id, with --storage-secret-access-key; given, none of the daemon's
    /// credentials is used for this download (unset: the daemon's; for listing
    /// AWS_ACCESS_KEY_ID).
    #[arg(long)]
    storage_access_key_id: Option<String>,
    /// Secret access key (unset: the daemon's; for listing AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "DFGET_STORAGE_SECRET_ACCESS_KEY", hide_env_values = true)]
    storage_secret_access_key: Option<String>,
    /// Session token of temporary credentials (with the access key).
    #[arg(long, env = "DFGET_STORAGE_SESSION_TOKEN", hide_env_values = true)]
    storage_session_token: Option<String>,
    /// Virtual-hosted-style requests (bucket.endpoint/key); unset: the daemon's setting (for
    /// listing: path style).
    #[arg(long)]
    storage_virtual_hosted_style: bool,
    /// Config file with defaults (see cli/README.md). Default: ~/.config/damselfly/dfget.yaml,
    /// else /etc/damselfly/dfget.yaml, when present.
    #[arg(long, env = "DFGET_CONFIG")]
    config: Option<PathBuf>,
}

/// Effective settings: flags, then environment, then the config file, then built-in defaults.
#[derive(Debug, Clone)]
struct Settings {
    endpoint: PathBuf,
    timeout: Duration,
    headers: Vec<(String, String)>,
    tag: String,
    application: String,
    piece_length: u64,
    rate_limit: u64,
    disable_back_to_source: bool,
    filtered_query_params: Vec<String>,
    no_progress: bool,
    priority: i32,
    /// The --storage-* settings, when any is given (sent with each download request).
    s3: Option<controlplane::s3::S3Request>,
}

/// The --storage-* flags, when any is given.
fn storage_request(args: &Args) -> Result<Option<controlplane::s3::S3Request>, String> {
    let r = controlplane::s3::S3Request {
        endpoint: args.storage_endpoint.clone(),
        region: args.storage_region.clone(),
        access_key_id: args.storage_access_key_id.clone(),
        secret_access_key: args.storage_secret_access_key.clone(),
        session_token: args.storage_session_token.clone(),
        path_style: args.storage_virtual_hosted_style.then_some(false),
    };
    if r == controlplane::s3::S3Request::default() {
        return Ok(None);
    }
    if !controlplane::s3::is_s3(&args.url) {
        return Err("the --storage-* settings are for s3:// URLs only".into());
    }
    r.check().map_err(|e| format!("--storage-*: {e}"))?;
    Ok(Some(r))
}

fn settings(args: &Args, file: DfgetConfig) -> Result<Settings, String> {
    let mut headers = Vec::new();
    for h in file.headers.unwrap_or_default() {
        headers.push(parse_header(&h).map_err(|e| format!("config headers: {e}"))?);
    }
    headers.extend(args.headers.iter().cloned());
    Ok(Settings {
        endpoint: args
            .endpoint
            .clone()
            .or(file.endpoint)
            .unwrap_or_else(|| PathBuf::from(controlplane::config::DEFAULT_SOCKET)),
        timeout: args.timeout.or(file.timeout).unwrap_or(Duration::ZERO),
        headers,
        tag: args.tag.clone().or(file.tag).unwrap_or_default(),
        application: args
            .application
            .clone()
            .or(file.application)
            .unwrap_or_default(),
        piece_length: args.piece_length,
        rate_limit: args
            .rate_limit
            .or(file.rate_limit.map(|r| r.0))
            .unwrap_or(0),
        disable_back_to_source: args.disable_back_to_source
            || file.disable_back_to_source.unwrap_or(false),
        filtered_query_params: if args.filtered_query_params.is_empty() {
            file.filtered_query_params.unwrap_or_default()
        } else {
            args.filtered_query_params.clone()
        },
        no_progress: args.no_progress || file.no_progress.unwrap_or(false),
        priority: args.priority.or(file.priority).unwrap_or(0),
        s3: storage_request(args)?,
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let res = dfget_config::load(args.config.as_deref())
        .map_err(|e| Failure::new(exit::FAILURE, format!("config: {e}")))
        .and_then(|loaded| {
            settings(&args, loaded.config).map_err(|e| Failure::new(exit::USAGE, e))
        });
    let s = match res {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dfget: {e}");
            return std::process::ExitCode::from(e.exit);
        }
    };
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
    let timeout = s.timeout;
    let res = rt.block_on(async move {
        if timeout.is_zero() {
            run(args, s).await
        } else {
            match tokio::time::timeout(timeout, run(args, s)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::new(
                    exit::TIMEOUT,
                    format!("timed out after {}", humantime::format_duration(timeout)),
                )),
            }
        }
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfget: {e}");
            std::process::ExitCode::from(e.exit)
        }
    }
}

async fn run(args: Args, s: Settings) -> Result<(), Failure> {
    let output = absolute(&args.output)?;
    let usage = |m: &str| Err(Failure::new(exit::USAGE, m));
    if args.recursive {
        if args.range.is_some() {
            return usage("--range cannot be used with --recursive");
        }
        if args.digest.is_some() {
            return usage("--digest names one file and cannot be used with --recursive");
        }
    }
    if args.range.is_some() && args.digest.is_some() {
        return usage("--digest checks the whole file and cannot be used with --range");
    }
    let mut client = connect_daemon(&s.endpoint, "DFGET_ENDPOINT").await?;
    if args.recursive && controlplane::s3::is_s3(&args.url) {
        return recursive_s3(&mut client, &s, &args.url, &output).await;
    }
    if args.recursive {
        return recursive(&mut client, &s, &args.url, &output).await;
    }
    let started = Instant::now();
    let p = download_one(
        &mut client,
        &s,
        &args.url,
        &output,
        args.digest.clone(),
        args.range,
        true,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let written = written_length(&p);
    eprintln!(
        "dfget: {} ({} bytes{}) in {:.2}s, {:.1} MB/s; from origin {} B, seed peers {} B, peers {} B; task {}",
        output.display(),
        written,
        if args.range.is_some() {
            format!(" of {}", p.content_length)
        } else {
            String::new()
        },
        secs,
        written as f64 / secs.max(1e-9) / 1e6,
        p.bytes_from_origin,
        p.bytes_from_seed,
        p.bytes_from_peers,
        p.task_id
    );
    Ok(())
}

/// Bytes the daemon wrote to the output (older daemons: the content length).
fn written_length(p: &DownloadProgress) -> u64 {
    if p.output_length != 0 {
        p.output_length
    } else {
        p.content_length
    }
}

/// Downloads `url` into `output` through the daemon; checks the output's length.
async fn download_one(
    client: &mut DfdaemonClient<Channel>,
    s: &Settings,
    url: &str,
    output: &Path,
    digest: Option<String>,
    range: Option<Range>,
    show_bar: bool,
) -> Result<DownloadProgress, Failure> {
    let req = DownloadRequest {
        url: url.to_string(),
        output: output.to_string_lossy().into_owned(),
        headers: s
            .headers
            .iter()
            .map(|(n, v)| Header {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
        digest: digest.unwrap_or_default(),
        tag: s.tag.clone(),
        application: s.application.clone(),
        piece_length: s.piece_length,
        disable_back_to_source: s.disable_back_to_source,
        filtered_query_params: s.filtered_query_params.clone(),
        rate_limit: s.rate_limit,
        range: range.map(|r| ByteRange {
            start: r.start,
            end: r.end,
        }),
        priority: s.priority,
        object_storage: s.s3.as_ref().map(controlplane::s3::S3Request::to_proto),
    };
    let mut stream = client
        .download(req)
        .await
        .map_err(|st| Failure::from_status(&st))?
        .into_inner();
    let bar = (show_bar && !s.no_progress && std::io::stderr().is_terminal()).then(|| {
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
        .map_err(|st| Failure::from_status(&st))?
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
    let len = std::fs::metadata(output)
        .map_err(|e| format!("{}: {e}", output.display()))?
        .len();
    let want = written_length(&p);
    if len != want {
        return Err(format!("{} has {len} bytes, expected {want}", output.display()).into());
    }
    Ok(p)
}

/// Most index pages and files one recursive download visits (a guard against endless
/// generated listings).
const MAX_PAGES: usize = 10_000;
const MAX_FILES: usize = 100_000;

/// Downloads every object below the prefix `url` (`s3://bucket/prefix/`) into `out_dir`,
/// each as its own task (`s3://bucket/key`), keeping the key below the prefix as the path.
/// The listing uses the --storage-* settings (else the AWS_* environment); each object's
/// download request carries them too.
async fn recursive_s3(
    client: &mut DfdaemonClient<Channel>,
    s: &Settings,
    url: &str,
    out_dir: &Path,
) -> Result<(), Failure> {
    let u = controlplane::s3::parse(url, true)?;
    let trust = controlplane::config::OriginConfig::default();
    let objects = controlplane::s3::list(
        &controlplane::config::S3Config::default(),
        s.s3.as_ref(),
        &trust,
        Duration::from_secs(30),
        url,
    )
    .await
    .map_err(|e| format!("listing {url}: {e}"))?;
    if objects.len() > MAX_FILES {
        return Err(format!("more than {MAX_FILES} objects below {url}").into());
    }
    let prefix = u.key.trim_end_matches('/');
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let started = Instant::now();
    let mut bytes = 0u64;
    for o in &objects {
        let rel = o
            .key
            .strip_prefix(prefix)
            .unwrap_or(&o.key)
            .trim_start_matches('/');
        if rel.is_empty()
            || rel
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            eprintln!(
                "dfget: skipping object {:?}: not a plain path below the prefix",
                o.key
            );
            continue;
        }
        let object_url = format!("s3://{}/{}", u.bucket, o.key);
        bytes += download_tree_file(client, s, &object_url, &out_dir.join(rel)).await?;
    }
    eprintln!(
        "dfget: {} objects, {bytes} bytes from {url} into {} in {:.2}s",
        objects.len(),
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Downloads one file of a tree (an object below an S3 prefix, a file of a directory
/// listing) into `target`, creating its directory, and says so; returns its length.
async fn download_tree_file(
    client: &mut DfdaemonClient<Channel>,
    s: &Settings,
    url: &str,
    target: &Path,
) -> Result<u64, Failure> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let p = download_one(client, s, url, target, None, None, false)
        .await
        .map_err(|e| e.context(url))?;
    let n = written_length(&p);
    eprintln!(
        "dfget: {} ({n} bytes; task {})",
        target.display(),
        p.task_id
    );
    Ok(n)
}

/// Downloads every file below the directory index at `url` into `out_dir`.
async fn recursive(
    client: &mut DfdaemonClient<Channel>,
    s: &Settings,
    url: &str,
    out_dir: &Path,
) -> Result<(), Failure> {
    let base = url::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(format!(
            "url scheme {:?} is not supported (http, https)",
            base.scheme()
        )
        .into());
    }
    let base = listing::as_dir(&base);
    let mut headers = reqwest::header::HeaderMap::new();
    for (n, v) in &s.headers {
        let name = reqwest::header::HeaderName::from_bytes(n.as_bytes())
            .map_err(|e| format!("header {n:?}: {e}"))?;
        let value =
            reqwest::header::HeaderValue::from_str(v).map_err(|e| format!("header {n:?}: {e}"))?;
        headers.append(name, value);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let started = Instant::now();
    let mut queue = std::collections::VecDeque::from([(base.clone(), PathBuf::new())]);
    let mut seen = std::collections::HashSet::from([base.to_string()]);
    let (mut pages, mut files, mut bytes) = (0usize, 0usize, 0u64);
    while let Some((dir, rel)) = queue.pop_front() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(format!("more than {MAX_PAGES} directory pages below {base}").into());
        }
        let resp = http
            .get(dir.clone())
            .send()
            .await
            .map_err(|e| format!("listing {dir}: {}", damselfly_cli::source_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("listing {dir}: the server answered {}", resp.status()).into());
        }
        let html = resp
            .text()
            .await
            .map_err(|e| format!("listing {dir}: {}", damselfly_cli::source_chain(&e)))?;
        let (entries, skipped) = listing::parse_index(&dir, &html);
        for sk in skipped {
            eprintln!("dfget: skipping link {:?} in {dir}: {}", sk.href, sk.reason);
        }
        for e in entries {
            match e {
                Entry::Dir { url, rel: name } => {
                    if seen.insert(url.to_string()) {
                        queue.push_back((url, rel.join(name)));
                    }
                }
                Entry::File { url, rel: name } => {
                    files += 1;
                    if files > MAX_FILES {
                        return Err(format!("more than {MAX_FILES} files below {base}").into());
                    }
                    let target = out_dir.join(&rel).join(&name);
                    bytes += download_tree_file(client, s, url.as_str(), &target).await?;
                }
            }
        }
    }
    eprintln!(
        "dfget: {files} files, {bytes} bytes from {pages} directory pages into {} in {:.2}s",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["dfget", "s3://b/k", "-O", "/tmp/out"];
        v.extend(extra);
        Args::try_parse_from(v).expect("arguments")
    }

    #[test]
    fn storage_flags_become_the_request_settings() {
        assert_eq!(
            storage_request(&args(&[])),
            Ok(None),
            "no flag: the daemon's"
        );
        let r = storage_request(&args(&[
            "--storage-endpoint",
            "http://127.0.0.1:9000",
            "--storage-access-key-id",
            "k",
            "--storage-secret-access-key",
            "s",
            "--storage-virtual-hosted-style",
        ]))
        .expect("valid")
        .expect("some");
        assert_eq!(r.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(r.region, None, "unset: the daemon's");
        assert_eq!(r.path_style, Some(false));
        assert!(r.has_credentials());
        let p = r.to_proto();
        assert_eq!((&*p.access_key_id, &*p.secret_access_key), ("k", "s"));
    }

    #[test]
    fn bad_storage_flags_are_refused() {
        let e = storage_request(&args(&["--storage-access-key-id", "k"])).expect_err("no secret");
        assert!(e.contains("needs its secret access key"), "{e}");
        let http = Args::try_parse_from([
            "dfget",
            "http://h/f",
            "-O",
            "/tmp/out",
            "--storage-region",
            "eu-west-1",
        ])
        .expect("arguments");
        let e = storage_request(&http).expect_err("http URL");
        assert!(e.contains("s3:// URLs only"), "{e}");
    }
}
