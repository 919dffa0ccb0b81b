//! dfinit: points containerd (and docker) at the local dfdaemon's registry mirror.

use clap::Parser;
use damselfly_cli::dfinit::{self, Options};
use std::path::PathBuf;
use std::process::ExitCode;

/// Configures the container runtimes of this host to pull through the local dfdaemon.
#[derive(Parser, Debug)]
#[command(
    name = "dfinit",
    version = damselfly_common::VERSION,
    about = "Point containerd (and docker) at the local dfdaemon's registry mirror",
    after_help = "containerd: sets config_path in its config (kept when already set) and writes \
<config_path>/<registry>/hosts.toml with the daemon's proxy first. docker: puts the proxy first in \
registry-mirrors (Docker Hub only). Other settings are kept; a changed file is first copied to \
<file>.bak.<unix seconds>; running again changes nothing. Restart containerd after its config \
changed (hosts.toml files are read at every pull)."
)]
struct Args {
    /// The daemon's registry mirror (dfdaemon --proxy / proxy.listen), as a URL.
    #[arg(long, env = "DFINIT_PROXY", default_value = dfinit::DEFAULT_PROXY)]
    proxy: String,
    /// Registry to mirror: a URL (https://ghcr.io, http://10.0.0.5:5000) or a host
    /// (https); repeat, or separate with commas. Default: docker.io (Docker Hub).
    #[arg(long = "registry", env = "DFINIT_REGISTRIES", value_delimiter = ',')]
    registries: Vec<String>,
    /// containerd's config file (made, as version 2, when missing).
    #[arg(long, env = "DFINIT_CONTAINERD_CONFIG", default_value = dfinit::CONTAINERD_CONFIG)]
    containerd_config: PathBuf,
    /// Leave containerd alone.
    #[arg(long, env = "DFINIT_SKIP_CONTAINERD")]
    skip_containerd: bool,
    /// containerd's hosts directory; default: the config's config_path, else
    /// /etc/containerd/certs.d.
    #[arg(long, env = "DFINIT_CONFIG_PATH")]
    config_path: Option<PathBuf>,
    /// docker's daemon.json to update (e.g. /etc/docker/daemon.json); default: docker is
    /// left alone.
    #[arg(long, env = "DFINIT_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    /// Print the changes as a unified diff and write nothing.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let registries = if args.registries.is_empty() {
        vec!["docker.io".to_string()]
    } else {
        args.registries
    };
    let opts = Options {
        proxy: args.proxy,
        registries,
        containerd_config: (!args.skip_containerd).then_some(args.containerd_config),
        config_path: args.config_path,
        docker_config: args.docker_config,
    };
    let changes = match dfinit::plan(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dfinit: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if changes.is_empty() {
        println!("dfinit: nothing to change");
        return ExitCode::SUCCESS;
    }
    if args.dry_run {
        for c in &changes {
            print!("{}", c.diff());
        }
        return ExitCode::SUCCESS;
    }
    match dfinit::apply(&changes) {
        Ok(backups) => {
            for c in &changes {
                println!("dfinit: wrote {}", c.path.display());
            }
            for b in &backups {
                println!("dfinit: backup {}", b.display());
            }
            if let Some(cfg) = &opts.containerd_config {
                if changes.iter().any(|c| &c.path == cfg) {
                    println!("dfinit: restart containerd to load {}", cfg.display());
                }
            }
            if let Some(d) = &opts.docker_config {
                if changes.iter().any(|c| &c.path == d) {
                    println!("dfinit: restart docker to load {}", d.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dfinit: {e:#}");
            ExitCode::FAILURE
        }
    }
}
