//! `dfinit` against real parts: two hosts, each a dfdaemon with its registry mirror proxy and
//! a real containerd. `dfinit` rewrites each containerd's config (which must still start
//! containerd) and writes the `hosts.toml` of a real `docker-registry`; then `ctr images
//! pull --hosts-dir <the config_path dfinit set>` on both hosts must go through the daemons:
//! the registry serves each blob once over the two pulls, and the second host's daemon gets
//! the layers from the first, not from the registry. A second `dfinit` run changes nothing;
//! the first left one backup of the config it changed; docker's `daemon.json` keeps its
//! other keys and gets the proxy first in `registry-mirrors`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use testkit::registry::{self, Containerd, OciImage, Registry, REGISTRY_BIN};
use testkit::{bin_path, Cluster, ClusterOptions};

const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
const TEST: &str = "dfinit_points_containerd_at_the_daemons_and_the_registry_serves_each_blob_once";

use testkit::registry::check_output as check;

fn dfinit(args: &[String]) -> Output {
    Command::new(bin_path("dfinit").expect("dfinit binary"))
        .args(args)
        .env_remove("DFINIT_PROXY")
        .env_remove("DFINIT_REGISTRIES")
        .output()
        .expect("running dfinit")
}

/// The `config_path` of a containerd version 2 config (the line dfinit writes).
fn config_path_of(config: &str) -> PathBuf {
    let line = config
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("config_path"))
        .unwrap_or_else(|| panic!("no config_path in:\n{config}"));
    let value = line
        .split_once('=')
        .map(|(_, v)| v.trim().trim_matches('"'))
        .unwrap_or_else(|| panic!("bad line {line}"));
    PathBuf::from(value)
}

fn backups_of(file: &Path) -> Vec<PathBuf> {
    let name = file
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    let dir = file.parent().expect("parent");
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.bak."))
        })
        .map(|e| e.path())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dfinit_points_containerd_at_the_daemons_and_the_registry_serves_each_blob_once() {
    let Some(tmp) = registry::work_dir_if_tools(
        TEST,
        &[REGISTRY_BIN, "skopeo", "containerd", "ctr"],
        "damselfly-dfinit-",
    ) else {
        return;
    };
    let work = tmp.path();
    let reg = Registry::start(work)
        .await
        .expect("starting docker-registry");
    let image = OciImage::build(&work.join("image"), "v1", 91, &[3 * MIB + 17, MIB + 5])
        .expect("building the image");
    reg.push(work, &image, "team/app", None, TOOL_TIMEOUT)
        .await
        .expect("running skopeo");

    let cluster = Cluster::start(ClusterOptions {
        seeds: 0,
        peers: 2,
        proxy: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let blob_bytes: u64 = image.blobs().iter().map(|b| b.size).sum();
    let image_ref = format!("{}/team/app:v1", reg.addr);

    for n in 1..=2 {
        let peer = cluster.peer(n);
        let proxy = format!("http://{}", peer.proxy_addr.expect("proxy"));
        let host = work.join(format!("host-{n}"));
        let config = Containerd::write_config(&host).expect("containerd config");
        let before = std::fs::read_to_string(&config).expect("config");
        let docker = host.join("daemon.json");
        std::fs::write(&docker, "{\"log-driver\": \"journald\", \"debug\": true}\n")
            .expect("daemon.json");
        let args = vec![
            "--proxy".to_string(),
            proxy.clone(),
            "--registry".into(),
            reg.url(),
            "--containerd-config".into(),
            config.display().to_string(),
            "--config-path".into(),
            host.join("certs.d").display().to_string(),
            "--docker-config".into(),
            docker.display().to_string(),
        ];
        // --dry-run prints the diff and writes nothing.
        let mut dry = args.clone();
        dry.push("--dry-run".into());
        let o = dfinit(&dry);
        check("dfinit --dry-run", &o);
        let diff = String::from_utf8_lossy(&o.stdout);
        assert!(diff.contains("+config_path = "), "{diff}");
        assert_eq!(std::fs::read_to_string(&config).expect("config"), before);

        let o = dfinit(&args);
        check("dfinit", &o);
        let after = std::fs::read_to_string(&config).expect("config");
        assert!(
            after.starts_with(&before),
            "dfinit changed the user's settings:\n{after}"
        );
        let backups = backups_of(&config);
        assert_eq!(backups.len(), 1, "{backups:?}");
        assert_eq!(
            std::fs::read_to_string(&backups[0]).expect("backup"),
            before
        );
        // Idempotent: the second run changes nothing and makes no backup.
        let o = dfinit(&args);
        check("dfinit again", &o);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("nothing to change"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(std::fs::read_to_string(&config).expect("config"), after);
        assert_eq!(backups_of(&config).len(), 1);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&docker).expect("daemon.json"))
                .expect("daemon.json is JSON");
        assert_eq!(json["log-driver"], "journald");
        assert_eq!(json["debug"], true);
        assert_eq!(json["registry-mirrors"][0], proxy.as_str());

        // containerd starts from the rewritten config, and pulls with the hosts directory
        // that config names.
        let hosts = config_path_of(&after);
        assert!(
            hosts
                .join(reg.addr.to_string())
                .join("hosts.toml")
                .is_file(),
            "no hosts.toml for {} under {}",
            reg.addr,
            hosts.display()
        );
        let ctd = Containerd::start_with_config(&host, &config)
            .await
            .expect("containerd starts with the config dfinit wrote");
        let o = ctd
            .ctr(
                &[
                    "images",
                    "pull",
                    "--hosts-dir",
                    &hosts.display().to_string(),
                    &image_ref,
                ],
                TOOL_TIMEOUT,
            )
            .await
            .expect("running ctr");
        check(&format!("ctr images pull on host {n}"), &o);
        ctd.assert_blobs(&image, &format!("host {n}"), TOOL_TIMEOUT)
            .await;
        for b in image.blobs() {
            let gets = reg.blob_gets(&b.digest).expect("registry log");
            assert_eq!(
                gets, 1,
                "after the pull on host {n}, the registry served blob {} {gets} times",
                b.digest
            );
        }
        let stats = peer.stats().await.expect("daemon stats");
        if n == 1 {
            assert_eq!(
                stats.bytes_from_origin, blob_bytes,
                "host 1's daemon fetched the blobs from the registry"
            );
        } else {
            assert_eq!(
                stats.bytes_from_origin, 0,
                "host 2's daemon went to the registry"
            );
            assert_eq!(
                stats.bytes_from_peers + stats.bytes_from_seed,
                blob_bytes,
                "host 2's daemon got the blobs from host 1"
            );
        }
        drop(ctd);
    }
}
