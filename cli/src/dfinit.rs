//! `dfinit`: points the container runtimes of a host at the local dfdaemon's registry mirror
//! (Dragonfly's `dfinit`).
//!
//! - **containerd**: sets `config_path` of the CRI registry (`version = 2`:
//!   `plugins."io.containerd.grpc.v1.cri".registry`; `version = 3`:
//!   `plugins."io.containerd.cri.v1.images".registry`), keeping a `config_path` already set,
//!   and writes `<config_path>/<registry host>/hosts.toml` for every mirrored registry: the
//!   daemon's proxy first (`pull`, `resolve`, with the `X-Dragonfly-Registry` header naming
//!   the registry), then any mirror the file already listed; the registry itself stays the
//!   `server` (containerd falls back to it when the daemon does not answer).
//! - **docker**: puts the proxy first in `registry-mirrors` of `daemon.json` (docker only
//!   mirrors Docker Hub this way).
//!
//! Every other setting in these files is kept (TOML formatting and comments too; JSON keys
//! come back sorted). A file whose content would not change is not touched (running twice
//! changes nothing); a file that changes is first copied to `<file>.bak.<unix seconds>`, then
//! replaced atomically (same permissions). [`plan`] computes the changes, [`Change::diff`]
//! shows them (`--dry-run`), [`apply`] writes them.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, Value};

/// The default containerd config file.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The hosts directory written when the containerd config names none.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/containerd/certs.d";
/// The default address of the daemon's registry mirror.
pub const DEFAULT_PROXY: &str = "http://127.0.0.1:4001";

/// What to configure.
#[derive(Debug, Clone)]
pub struct Options {
    /// The daemon's registry mirror, `http://127.0.0.1:4001`.
    pub proxy: String,
    /// Registries to mirror: URLs (`https://ghcr.io`, `http://10.0.0.5:5000`) or hosts
    /// (`ghcr.io`, meaning https); `docker.io` stands for Docker Hub.
    pub registries: Vec<String>,
    /// containerd's config file, or `None` to leave containerd alone.
    pub containerd_config: Option<PathBuf>,
    /// The hosts directory to use instead of the config's `config_path` (or the default).
    pub config_path: Option<PathBuf>,
    /// docker's `daemon.json`, or `None` to leave docker alone.
    pub docker_config: Option<PathBuf>,
}

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The file.
    pub path: PathBuf,
    /// Its content now (`None`: it does not exist).
    pub old: Option<String>,
    /// Its content after the change.
    pub new: String,
}

impl Change {
    /// A unified diff from the old content to the new one.
    pub fn diff(&self) -> String {
        let old = self.old.as_deref().unwrap_or("");
        let a = if self.old.is_some() {
            self.path.display().to_string()
        } else {
            "/dev/null".into()
        };
        similar::TextDiff::from_lines(old, &self.new)
            .unified_diff()
            .header(&a, &self.path.display().to_string())
            .to_string()
    }
}

/// A registry to mirror: the directory name containerd looks up (`host[:port]`, `docker.io`
/// for Docker Hub) and the URL of the registry itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    /// containerd's name of the registry (the hosts directory entry).
    pub host: String,
    /// Where the registry answers, `https://ghcr.io`.
    pub server: String,
}

impl Registry {
    /// Parses a registry given as a URL or a host.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().trim_end_matches('/');
        if s.is_empty() {
            bail!("empty registry name");
        }
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("https://{s}")
        };
        let url = url::Url::parse(&with_scheme)
            .with_context(|| format!("registry {s:?} is neither a URL nor a host[:port]"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("registry {s:?}: only http and https registries can be mirrored");
        }
        if url.path() != "/" && !url.path().is_empty() {
            bail!("registry {s:?}: give the registry without a path");
        }
        let Some(host) = url.host_str() else {
            bail!("registry {s:?} has no host");
        };
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        if ["docker.io", "index.docker.io", "registry-1.docker.io"].contains(&host.as_str()) {
            return Ok(Self {
                host: "docker.io".into(),
                server: "https://registry-1.docker.io".into(),
            });
        }
        Ok(Self {
            server: format!("{}://{host}", url.scheme()),
            host,
        })
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The files to change so that the runtimes pull through the proxy; files that would not
/// change are left out.
pub fn plan(opts: &Options) -> Result<Vec<Change>> {
    let proxy = url::Url::parse(&opts.proxy)
        .with_context(|| format!("proxy {:?} is not a URL", opts.proxy))?;
    if !matches!(proxy.scheme(), "http" | "https") || proxy.host_str().is_none() {
        bail!("proxy {:?} must be an http:// or https:// URL", opts.proxy);
    }
    let proxy = opts.proxy.trim_end_matches('/').to_string();
    let registries = opts
        .registries
        .iter()
        .map(|r| Registry::parse(r))
        .collect::<Result<Vec<_>>>()?;
    let mut changes = Vec::new();
    if let Some(cfg) = &opts.containerd_config {
        let old = read_optional(cfg)?;
        let (new, hosts_dir) = containerd_config(
            cfg,
            old.as_deref(),
            opts.config_path.as_deref(),
            &registries,
        )?;
        changes.push(Change {
            path: cfg.clone(),
            old,
            new,
        });
        for r in &registries {
            let path = hosts_dir.join(&r.host).join("hosts.toml");
            let old = read_optional(&path)?;
            let new = hosts_toml(&path, old.as_deref(), r, &proxy)?;
            changes.push(Change { path, old, new });
        }
    }
    if let Some(path) = &opts.docker_config {
        let old = read_optional(path)?;
        let new = docker_daemon_json(path, old.as_deref(), &proxy)?;
        changes.push(Change {
            path: path.clone(),
            old,
            new,
        });
    }
    changes.retain(|c| c.old.as_deref() != Some(c.new.as_str()));
    Ok(changes)
}

/// The table at `path` under `root`, made (implicit, so that no empty headers appear) where
/// missing; an error names `what` when a key on the way is not a table.
fn table_at<'a>(root: &'a mut Table, path: &[&str], what: &str) -> Result<&'a mut Table> {
    let mut t = root;
    for (i, key) in path.iter().enumerate() {
        let item = t.entry(key).or_insert_with(|| {
            let mut n = Table::new();
            n.set_implicit(true);
            Item::Table(n)
        });
        if let Item::Value(Value::InlineTable(it)) = item {
            *item = Item::Table(std::mem::take(it).into_table());
        }
        let Item::Table(next) = item else {
            bail!("{what}: {} is not a table", path[..=i].join("."));
        };
        t = next;
    }
    Ok(t)
}

/// containerd's config with `config_path` set, and the hosts directory to use.
fn containerd_config(
    path: &Path,
    old: Option<&str>,
    config_path: Option<&Path>,
    registries: &[Registry],
) -> Result<(String, PathBuf)> {
    let what = path.display().to_string();
    let mut doc: DocumentMut = match old {
        Some(text) => text
            .parse()
            .with_context(|| format!("{what} is not valid TOML"))?,
        None => {
            let mut d = DocumentMut::new();
            d["version"] = toml_edit::value(2);
            d
        }
    };
    let plugin = match doc.get("version").and_then(Item::as_integer) {
        Some(2) => "io.containerd.grpc.v1.cri",
        Some(3) => "io.containerd.cri.v1.images",
        Some(v) => bail!("{what}: config version {v} is not supported (2 or 3)"),
        None => bail!(
            "{what} has no `version = 2` (a version 1 config): migrate it first with \
             `containerd config migrate` or add the version line"
        ),
    };
    let registry = table_at(doc.as_table_mut(), &["plugins", plugin, "registry"], &what)?;
    for r in registries {
        if registry
            .get("mirrors")
            .and_then(Item::as_table_like)
            .is_some_and(|m| m.contains_key(&r.host))
        {
            bail!(
                "{what}: plugins.\"{plugin}\".registry.mirrors.\"{}\" is set; containerd ignores \
                 config_path with mirrors, so move that mirror to hosts.toml and remove it",
                r.host
            );
        }
    }
    let existing = match registry.get("config_path") {
        None => None,
        Some(item) => match item.as_str() {
            Some(s) if !s.is_empty() => s.split(':').next().map(PathBuf::from),
            Some(_) => None,
            None => bail!("{what}: config_path is not a string"),
        },
    };
    let dir = match (config_path, existing) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => p,
        (None, None) => PathBuf::from(DEFAULT_CONFIG_PATH),
    };
    let Some(dir_str) = dir.to_str() else {
        bail!("hosts directory {} is not UTF-8", dir.display());
    };
    // A config_path already set (maybe a list) stays unless another one was asked for.
    let current = registry.get("config_path").and_then(Item::as_str);
    let set = match config_path {
        Some(_) => current != Some(dir_str),
        None => current.is_none_or(str::is_empty),
    };
    if set {
        registry["config_path"] = toml_edit::value(dir_str);
    }
    Ok((doc.to_string(), dir))
}

/// The `hosts.toml` of `r`: the proxy first, then the mirrors `old` listed; `old`'s other
/// settings (its `server`, `ca`, ...) kept.
fn hosts_toml(path: &Path, old: Option<&str>, r: &Registry, proxy: &str) -> Result<String> {
    let what = path.display().to_string();
    let old: DocumentMut = old
        .unwrap_or("")
        .parse()
        .with_context(|| format!("{what} is not valid TOML"))?;
    let server = match old.get("server") {
        None => r.server.clone(),
        Some(s) => s
            .as_str()
            .with_context(|| format!("{what}: server is not a string"))?
            .to_string(),
    };
    let mut out = DocumentMut::new();
    *out.decor_mut() = old.decor().clone();
    if old.get("server").is_none() {
        let mut key = toml_edit::Key::new("server");
        key.leaf_decor_mut().set_prefix(format!(
            "# Written by dfinit: pulls of {} go through the Damselfly daemon at {proxy},\n\
             # then to the registry itself.\n",
            r.host
        ));
        out.as_table_mut()
            .insert_formatted(&key, toml_edit::value(server.as_str()));
    }
    for (k, v) in old.as_table().iter() {
        if k != "host" {
            if let Some((key, _)) = old.as_table().get_key_value(k) {
                out.as_table_mut().insert_formatted(key, v.clone());
            }
        }
    }
    let mut ours = Table::new();
    let mut caps = Array::new();
    caps.push("pull");
    caps.push("resolve");
    ours["capabilities"] = toml_edit::value(caps);
    let mut header = InlineTable::new();
    let mut reg = Array::new();
    reg.push(server.as_str());
    header.insert("X-Dragonfly-Registry", Value::Array(reg));
    ours["header"] = toml_edit::value(header);
    // Before every table of the old file: containerd tries the hosts in file order.
    ours.set_position(Some(-1));
    let mut hosts = Table::new();
    hosts.set_implicit(true);
    hosts.insert(proxy, Item::Table(ours));
    if let Some(h) = old.get("host") {
        let Some(h) = h.as_table_like() else {
            bail!("{what}: host is not a table");
        };
        for (k, v) in h.iter() {
            if k != proxy {
                hosts.insert(k, v.clone());
            }
        }
    }
    out.insert("host", Item::Table(hosts));
    Ok(out.to_string())
}

/// docker's `daemon.json` with the proxy first in `registry-mirrors`.
fn docker_daemon_json(path: &Path, old: Option<&str>, proxy: &str) -> Result<String> {
    let what = path.display().to_string();
    let mut v: serde_json::Value = match old {
        Some(t) if !t.trim().is_empty() => {
            serde_json::from_str(t).with_context(|| format!("{what} is not valid JSON"))?
        }
        _ => serde_json::json!({}),
    };
    let Some(obj) = v.as_object_mut() else {
        bail!("{what}: not a JSON object");
    };
    let mirrors = obj
        .entry("registry-mirrors")
        .or_insert_with(|| serde_json::json!([]));
    let Some(list) = mirrors.as_array_mut() else {
        bail!("{what}: registry-mirrors is not a list");
    };
    let same = |m: &serde_json::Value| m.as_str().is_some_and(|s| s.trim_end_matches('/') == proxy);
    if !list.first().is_some_and(same) {
        list.retain(|m| !same(m));
        list.insert(0, serde_json::Value::String(proxy.to_string()));
    }
    let mut s = serde_json::to_string_pretty(&v).context("encoding daemon.json")?;
    s.push('\n');
    Ok(s)
}

/// Writes every change: an existing file is first copied to `<file>.bak.<unix seconds>`,
/// then replaced atomically with its permissions kept; missing directories are made.
/// Returns the backups made.
pub fn apply(changes: &[Change]) -> Result<Vec<PathBuf>> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut backups = Vec::new();
    for c in changes {
        let dir = c
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let perms = std::fs::metadata(&c.path).ok().map(|m| m.permissions());
        if c.old.is_some() {
            let mut backup = PathBuf::from(format!("{}.bak.{stamp}", c.path.display()));
            let mut n = 1;
            while backup.exists() {
                backup = PathBuf::from(format!("{}.bak.{stamp}.{n}", c.path.display()));
                n += 1;
            }
            std::fs::copy(&c.path, &backup).with_context(|| {
                format!("backing up {} to {}", c.path.display(), backup.display())
            })?;
            backups.push(backup);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, c.new.as_bytes())
            .with_context(|| format!("writing {}", c.path.display()))?;
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("writing {}", c.path.display()))?;
        if let Some(p) = perms {
            std::fs::set_permissions(tmp.path(), p)
                .with_context(|| format!("setting the permissions of {}", c.path.display()))?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
                .with_context(|| format!("setting the permissions of {}", c.path.display()))?;
        }
        tmp.persist(&c.path)
            .with_context(|| format!("replacing {}", c.path.display()))?;
    }
    Ok(backups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> Options {
        Options {
            proxy: "http://127.0.0.1:4001".into(),
            registries: vec!["docker.io".into(), "http://10.0.0.5:5000".into()],
            containerd_config: Some(dir.join("config.toml")),
            config_path: None,
            docker_config: Some(dir.join("daemon.json")),
        }
    }

    #[test]
    fn registries_parse_as_urls_or_hosts() {
        let r = Registry::parse("ghcr.io").expect("host");
        assert_eq!(
            (r.host.as_str(), r.server.as_str()),
            ("ghcr.io", "https://ghcr.io")
        );
        let r = Registry::parse("http://10.0.0.5:5000/").expect("url");
        assert_eq!(
            (r.host.as_str(), r.server.as_str()),
            ("10.0.0.5:5000", "http://10.0.0.5:5000")
        );
        let r = Registry::parse("https://index.docker.io").expect("hub");
        assert_eq!(r.host, "docker.io");
        assert!(Registry::parse("ftp://x").is_err());
        assert!(Registry::parse("https://x/path").is_err());
        assert!(Registry::parse("").is_err());
    }

    #[test]
    fn keeps_other_settings_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = opts(dir.path());
        let cfg = "# my settings\nversion = 2\nroot = \"/srv/containerd\"\n\n\
                   [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\" # keep\n";
        std::fs::write(dir.path().join("config.toml"), cfg).expect("write");
        std::fs::write(
            dir.path().join("daemon.json"),
            "{\"log-driver\": \"journald\"}",
        )
        .expect("write");
        let hub = dir.path().join("hosts").join("docker.io");
        std::fs::create_dir_all(&hub).expect("mkdir");
        std::fs::write(
            hub.join("hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.example.com\"]\n  capabilities = [\"pull\"]\n",
        )
        .expect("write");
        let mut o2 = o.clone();
        o2.config_path = Some(dir.path().join("hosts"));
        let changes = plan(&o2).expect("plan");
        assert_eq!(changes.len(), 4, "{changes:#?}");
        let c = &changes[0].new;
        assert!(
            c.starts_with("# my settings\nversion = 2\nroot = \"/srv/containerd\""),
            "{c}"
        );
        assert!(c.contains("snapshotter = \"overlayfs\" # keep"), "{c}");
        let parsed: toml_edit::DocumentMut = c.parse().expect("toml");
        assert_eq!(
            parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"].as_str(),
            dir.path().join("hosts").to_str()
        );
        // The user's mirror stays, after ours.
        let h = &changes[1].new;
        let ours = h.find("[host.\"http://127.0.0.1:4001\"]").expect("ours");
        let theirs = h
            .find("[host.\"https://mirror.example.com\"]")
            .expect("theirs");
        assert!(ours < theirs, "{h}");
        assert!(
            h.contains("X-Dragonfly-Registry = [\"https://registry-1.docker.io\"]"),
            "{h}"
        );
        let h = &changes[2].new;
        assert!(h.contains("server = \"http://10.0.0.5:5000\""), "{h}");
        let j: serde_json::Value = serde_json::from_str(&changes[3].new).expect("json");
        assert_eq!(j["log-driver"], "journald");
        assert_eq!(j["registry-mirrors"][0], "http://127.0.0.1:4001");

        let backups = apply(&changes).expect("apply");
        assert_eq!(backups.len(), 3, "the new hosts.toml needs no backup");
        assert_eq!(
            std::fs::read_to_string(&backups[0]).expect("backup"),
            cfg,
            "the backup holds the old config"
        );
        // Once more: nothing to change (config_path now set, so no override needed).
        let again = plan(&o2).expect("plan");
        assert!(
            again.is_empty(),
            "{}",
            again.iter().map(Change::diff).collect::<String>()
        );
        assert_eq!(plan(&o).expect("plan").len(), 0);
    }

    #[test]
    fn a_missing_config_is_created_and_bad_ones_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = opts(dir.path());
        let changes = plan(&o).expect("plan");
        assert!(changes[0].old.is_none());
        assert!(changes[0].new.contains("version = 2"));
        assert!(changes[0]
            .new
            .contains("config_path = \"/etc/containerd/certs.d\""));
        assert!(changes[0].diff().contains("+version = 2"));
        let cfg = dir.path().join("config.toml");
        for (bad, want) in [
            ("root = \"/x\"\n", "version 1"),
            ("version = 2\n[plugins\n", "not valid TOML"),
            ("version = 7\n", "version 7"),
            (
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n",
                "mirrors",
            ),
        ] {
            std::fs::write(&cfg, bad).expect("write");
            let err = format!("{:#}", plan(&o).expect_err(bad));
            assert!(err.contains(want), "{bad}: {err}");
            assert!(err.contains("config.toml"), "{err}");
        }
        std::fs::write(&cfg, "version = 2\n").expect("write");
        std::fs::write(dir.path().join("daemon.json"), "[1]").expect("write");
        let err = format!("{:#}", plan(&o).expect_err("array"));
        assert!(err.contains("daemon.json"), "{err}");
        let mut o = o;
        o.proxy = "127.0.0.1:4001".into();
        assert!(plan(&o).is_err());
    }
}
