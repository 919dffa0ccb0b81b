//! dfcache: put local files into the P2P network and get them back elsewhere, without an
//! origin, through the local dfdaemon.

use clap::{Args as ClapArgs, Parser, Subcommand};
use damselfly_cli::{absolute, connect_daemon};
use std::path::PathBuf;
use std::time::Duration;
use wire::proto::dfdaemon::{
    CacheId, DeleteTaskRequest, ExportTaskRequest, ImportTaskRequest, StatTaskRequest,
};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Import, export, stat and delete files in the P2P cache of the local dfdaemon.
#[derive(Parser, Debug)]
#[command(
    name = "dfcache",
    version = damselfly_common::VERSION,
    about = "Put files into the Damselfly P2P network and get them back, without an origin"
)]
struct Cli {
    /// Unix socket of the dfdaemon local API.
    #[arg(long, global = true, env = "DFCACHE_ENDPOINT", default_value = controlplane::config::DEFAULT_SOCKET)]
    endpoint: PathBuf,
    /// Give up after this long (e.g. 30s, 10m); 0 waits forever.
    #[arg(long, global = true, default_value = "0s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a cached file is named.
#[derive(ClapArgs, Debug, Clone)]
struct Name {
    /// Tag: the same content id with different tags is different tasks.
    #[arg(long, default_value = "")]
    tag: String,
    /// Application, part of the task id like the tag.
    #[arg(long, default_value = "")]
    application: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Store FILE in the daemon as a finished task and announce it to the scheduler; prints
    /// the content id (sha256:<hex> of the file unless --id is given) and the task id.
    Import {
        /// File to import (the daemon reads it: it must be on the daemon's host).
        file: PathBuf,
        /// Content id to use instead of the file's sha256 digest.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        name: Name,
        /// Piece length in bytes (0 lets the daemon choose).
        #[arg(long, default_value_t = 0)]
        piece_length: u64,
    },
    /// Fetch a cached file from peers (never from an origin) into -O.
    Export {
        /// Content id given at import (sha256:<hex> by default).
        id: String,
        /// Output file.
        #[arg(short = 'O', long)]
        output: PathBuf,
        #[command(flatten)]
        name: Name,
        /// Expected sha256 of the file. Default: the content id itself when it is a
        /// sha256:<hex> digest (see --no-verify).
        #[arg(long)]
        digest: Option<String>,
        /// Do not check the content id as a digest.
        #[arg(long)]
        no_verify: bool,
        /// Download rate limit (e.g. 50MiB; bytes per second).
        #[arg(long, value_parser = controlplane::config::parse_size, default_value = "0")]
        rate_limit: u64,
    },
    /// Show whether this daemon holds a cached file and which peers have it.
    Stat {
        /// Content id.
        id: String,
        #[command(flatten)]
        name: Name,
    },
    /// Remove a cached file from this daemon and withdraw it from the scheduler.
    Delete {
        /// Content id.
        id: String,
        #[command(flatten)]
        name: Name,
    },
}

fn cid(id: &str, name: &Name) -> CacheId {
    CacheId {
        id: id.to_string(),
        tag: name.tag.clone(),
        application: name.application.clone(),
    }
}

/// Whether `s` is `sha256:` and 64 hex characters.
fn is_sha256(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dfcache: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let timeout = cli.timeout;
    let res = rt.block_on(async move {
        if timeout.is_zero() {
            run(cli).await
        } else {
            match tokio::time::timeout(timeout, run(cli)).await {
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
            eprintln!("dfcache: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut client = connect_daemon(&cli.endpoint, "DFCACHE_ENDPOINT").await?;
    match cli.cmd {
        Cmd::Import {
            file,
            id,
            name,
            piece_length,
        } => {
            let path = absolute(&file)?;
            let r = client
                .import_task(ImportTaskRequest {
                    path: path.to_string_lossy().into_owned(),
                    cid: Some(cid(&id.unwrap_or_default(), &name)),
                    piece_length,
                })
                .await
                .map_err(|s| format!("import {}: {}", path.display(), s.message()))?
                .into_inner();
            println!("{}", r.cid);
            eprintln!(
                "dfcache: imported {} ({} bytes, {} pieces) as {} (task {}){}",
                path.display(),
                r.content_length,
                r.piece_count,
                r.cid,
                r.task_id,
                if r.scheduler.is_empty() {
                    "; no scheduler answered, so only this daemon knows it for now".to_string()
                } else {
                    format!("; announced to scheduler {}", r.scheduler)
                }
            );
            Ok(())
        }
        Cmd::Export {
            id,
            output,
            name,
            digest,
            no_verify,
            rate_limit,
        } => {
            let output = absolute(&output)?;
            let digest = match digest {
                Some(d) => d,
                None if !no_verify && is_sha256(&id) => id.clone(),
                None => String::new(),
            };
            let mut stream = client
                .export_task(ExportTaskRequest {
                    cid: Some(cid(&id, &name)),
                    output: output.to_string_lossy().into_owned(),
                    digest,
                    rate_limit,
                })
                .await
                .map_err(|s| format!("export {id}: {}", s.message()))?
                .into_inner();
            let mut last = None;
            while let Some(p) = stream
                .message()
                .await
                .map_err(|s| format!("export {id}: {}", s.message()))?
            {
                let done = p.done;
                last = Some(p);
                if done {
                    break;
                }
            }
            let p = last
                .filter(|p| p.done)
                .ok_or("the daemon ended the export without finishing it")?;
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
            eprintln!(
                "dfcache: exported {id} to {} ({} bytes; from seed peers {} B, peers {} B, origin {} B; task {})",
                output.display(),
                p.content_length,
                p.bytes_from_seed,
                p.bytes_from_peers,
                p.bytes_from_origin,
                p.task_id
            );
            Ok(())
        }
        Cmd::Stat { id, name } => {
            let r = client
                .stat_task(StatTaskRequest {
                    cid: Some(cid(&id, &name)),
                })
                .await
                .map_err(|s| format!("stat {id}: {}", s.message()))?
                .into_inner();
            println!("task: {}", r.task_id);
            println!("content id: {id}");
            if r.content_length != 0 {
                println!(
                    "size: {} bytes, {} pieces of {} bytes",
                    r.content_length, r.piece_count, r.piece_length
                );
            }
            if r.local {
                println!(
                    "local: {} ({}/{} pieces)",
                    if r.local_complete {
                        "complete"
                    } else {
                        "partial"
                    },
                    r.local_finished_pieces,
                    r.piece_count
                );
            } else {
                println!("local: not found locally");
            }
            if !r.scheduler_error.is_empty() {
                println!("scheduler: unreachable ({})", r.scheduler_error);
            } else if r.in_scheduler {
                let done = r.peers.iter().filter(|p| p.done).count();
                println!("scheduler: {} peers, {done} complete", r.peers.len());
                for p in &r.peers {
                    println!(
                        "  peer {} {}/{} pieces{}",
                        p.host_id,
                        p.finished_pieces,
                        r.piece_count,
                        if p.done { " (complete)" } else { "" }
                    );
                }
            } else {
                println!("scheduler: task not found in the P2P network");
            }
            if r.local || r.in_scheduler {
                Ok(())
            } else {
                Err(format!(
                    "task {id} not found (not held locally; {})",
                    if r.scheduler_error.is_empty() {
                        "unknown to the scheduler"
                    } else {
                        "the scheduler could not be asked"
                    }
                ))
            }
        }
        Cmd::Delete { id, name } => {
            let r = client
                .delete_task(DeleteTaskRequest {
                    cid: Some(cid(&id, &name)),
                })
                .await
                .map_err(|s| format!("delete {id}: {}", s.message()))?
                .into_inner();
            if !r.scheduler_error.is_empty() {
                eprintln!(
                    "dfcache: warning: not every scheduler could be told: {}",
                    r.scheduler_error
                );
            }
            if r.removed {
                eprintln!("dfcache: deleted {id} (task {})", r.task_id);
                Ok(())
            } else {
                Err(format!(
                    "task {id} (task id {}) is not held by this daemon",
                    r.task_id
                ))
            }
        }
    }
}
