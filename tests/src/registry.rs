//! Real container-registry parts for the registry-mirror tests.
//!
//! * [`Registry`]: Debian's `docker-registry` (distribution 2.x) serving from a temp dir on
//!   loopback, with its access log (one line per request) parsed to count blob fetches.
//! * [`OciImage`]: an OCI image layout built here (generated tar.gz layers, config,
//!   manifest, `index.json`) that `skopeo copy oci:DIR:TAG docker://…` pushes.
//! * [`skopeo`]: runs `skopeo` with a permissive signature policy of its own.
//! * [`Containerd`]: a `containerd` with its root, state and socket in a temp dir, for
//!   `ctr images pull --hosts-dir` through a mirror.
//!
//! The tools are Debian packages (`docker-registry`, `skopeo`, `containerd`);
//! [`missing_tools`] names the ones not installed so a test can skip with `needs::skip`
//! (a failure in strict mode).

use crate::cluster::{free_port, wait_ready, Proc};
use crate::content;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// The registry binary of Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "docker-registry";

/// Which of `tools` are not on `PATH`.
pub fn missing_tools(tools: &[&str]) -> Vec<String> {
    tools
        .iter()
        .filter(|t| which(t).is_none())
        .map(|t| t.to_string())
        .collect()
}

/// The Debian package that installs `tool`.
fn package_of(tool: &str) -> &str {
    match tool {
        "ctr" => "containerd",
        t => t,
    }
}

/// A fresh temp work dir (named `prefix…`) for `test` when every one of `tools` is on
/// `PATH` (`needs::found`); else `None`, after `needs::skip` names what is missing and the
/// Debian packages that install it.
pub fn work_dir_if_tools(test: &str, tools: &[&str], prefix: &str) -> Option<tempfile::TempDir> {
    let missing = missing_tools(tools);
    if !missing.is_empty() {
        let mut packages: Vec<&str> = tools.iter().map(|t| package_of(t)).collect();
        packages.dedup();
        needs::skip(
            test,
            &format!(
                "{} not installed (apt-get install -y {})",
                missing.join(", "),
                packages.join(" ")
            ),
        );
        return None;
    }
    needs::found(test);
    Some(
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir"),
    )
}

/// The path of `tool` on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A running `docker-registry` on `127.0.0.1`; killed on drop.
#[derive(Debug)]
pub struct Registry {
    /// Its address.
    pub addr: SocketAddr,
    /// Storage root (`docker/registry/v2/...` below it).
    pub storage: PathBuf,
    /// The process (its log holds the access log).
    pub proc: Proc,
    scheme: &'static str,
}

impl Registry {
    /// Pushes the OCI layout `image` to this registry as `repo:<image's tag>` with `skopeo`
    /// (which fetches no blob from it), with `creds` (`user:password`) when given. The push
    /// must succeed.
    pub async fn push(
        &self,
        work: &Path,
        image: &OciImage,
        repo: &str,
        creds: Option<&str>,
        timeout: Duration,
    ) -> Result<()> {
        let src = format!("oci:{}:{}", image.dir.display(), image.tag);
        let dest = format!("docker://{}/{repo}:{}", self.addr, image.tag);
        let mut args = vec!["copy", "--dest-tls-verify=false"];
        if let Some(c) = creds {
            args.extend(["--dest-creds", c]);
        }
        args.extend([src.as_str(), dest.as_str()]);
        check_output("skopeo push", &skopeo(work, &args, timeout).await?);
        Ok(())
    }

    /// Starts a registry with its config, storage and log in `dir`, and waits until `/v2/`
    /// answers.
    pub async fn start(dir: &Path) -> Result<Self> {
        Self::start_with_auth(dir, None).await
    }

    /// Like [`Registry::start`], with htpasswd (basic) authentication when `auth` gives a
    /// user and the bcrypt hash of its password: requests without valid credentials get
    /// `401` with `WWW-Authenticate: Basic realm="damselfly-test"`.
    pub async fn start_with_auth(dir: &Path, auth: Option<(&str, &str)>) -> Result<Self> {
        Self::start_with(dir, auth, None).await
    }

    /// Like [`Registry::start_with_auth`], serving HTTPS with the certificate `tls` when
    /// given (the registry's `http.tls`); [`Registry::url`] is then `https://…`.
    pub async fn start_with(
        dir: &Path,
        auth: Option<(&str, &str)>,
        tls: Option<&crate::pki::Leaf>,
    ) -> Result<Self> {
        Self::start_on(dir, std::net::Ipv4Addr::LOCALHOST.into(), auth, tls).await
    }

    /// Like [`Registry::start_with`], listening on `ip` instead of `127.0.0.1` (Go clients
    /// send requests for loopback hosts past `HTTPS_PROXY`; a host address makes them use it).
    pub async fn start_on(
        dir: &Path,
        ip: std::net::IpAddr,
        auth: Option<(&str, &str)>,
        tls: Option<&crate::pki::Leaf>,
    ) -> Result<Self> {
        let bin = which(REGISTRY_BIN).with_context(|| {
            format!("{REGISTRY_BIN} not found (apt-get install docker-registry)")
        })?;
        let storage = dir.join("registry-data");
        std::fs::create_dir_all(&storage)
            .with_context(|| format!("creating {}", storage.display()))?;
        let addr = SocketAddr::new(ip, free_port()?);
        let config = dir.join("registry.yml");
        let auth_yaml = match auth {
            Some((user, hash)) => {
                let file = dir.join("htpasswd");
                std::fs::write(&file, format!("{user}:{hash}\n"))
                    .with_context(|| format!("writing {}", file.display()))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: damselfly-test\n    path: {}\n",
                    file.display()
                )
            }
            None => String::new(),
        };
        let tls_yaml = match tls {
            Some(l) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                l.cert.display(),
                l.key.display()
            ),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 {auth_yaml}http:\n  addr: {addr}\n{tls_yaml}",
                storage.display()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let proc = Proc::spawn(
            "registry",
            &bin,
            &["serve".to_string(), config.display().to_string()],
            dir.join("registry.log"),
            "info",
        )?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}/v2/");
        // Readiness only: the tests check the registry's certificate themselves.
        let probe = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .context("readiness client")?;
        wait_ready(&proc, Duration::from_secs(20), || {
            let url = url.clone();
            let probe = probe.clone();
            async move {
                probe.get(&url).send().await.is_ok_and(|r| {
                    r.status().is_success() || r.status() == reqwest::StatusCode::UNAUTHORIZED
                })
            }
        })
        .await?;
        Ok(Self {
            addr,
            storage,
            proc,
            scheme,
        })
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Requests in the access log whose request line starts with `method path_prefix`
    /// (e.g. `"GET"`, `"/v2/test/img/blobs/sha256:…"`).
    pub fn requests(&self, method: &str, path_prefix: &str) -> Result<usize> {
        let log = std::fs::read_to_string(self.proc.log_path())
            .with_context(|| format!("reading {}", self.proc.log_path().display()))?;
        let needle = format!("\"{method} {path_prefix}");
        Ok(log.lines().filter(|l| l.contains(&needle)).count())
    }

    /// Successful (2xx) `GET`s of blob `digest` (`sha256:…`) in any repository, as the
    /// access log shows (`"GET /v2/<repo>/blobs/<digest>[?query] HTTP/1.1" 200 …`).
    pub fn blob_gets(&self, digest: &str) -> Result<usize> {
        let log = std::fs::read_to_string(self.proc.log_path())
            .with_context(|| format!("reading {}", self.proc.log_path().display()))?;
        let path = format!("/blobs/{digest}");
        Ok(log
            .lines()
            .filter(|l| {
                let Some(i) = l.find("\"GET /v2/") else {
                    return false;
                };
                let line = &l[i..];
                let Some(j) = line.find(&path) else {
                    return false;
                };
                let after = &line[j + path.len()..];
                let ok_end = after.starts_with(' ') || after.starts_with('?');
                let status = line.find("\" ").map(|k| &line[k + 2..]).unwrap_or_default();
                ok_end && status.starts_with('2')
            })
            .count())
    }

    /// The file holding blob `digest` in the registry's storage (to corrupt it in tests).
    pub fn blob_file(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("digest {digest:?} is not sha256:…"))?;
        let two = hex.get(..2).context("digest too short")?;
        Ok(self
            .storage
            .join("docker/registry/v2/blobs/sha256")
            .join(two)
            .join(hex)
            .join("data"))
    }
}

/// One blob of an [`OciImage`].
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

/// An OCI image layout on disk: `oci-layout`, `index.json`, `blobs/sha256/*`.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The layout directory (`oci:DIR:TAG` for skopeo).
    pub dir: PathBuf,
    /// Its tag (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// Manifest blob.
    pub manifest: Blob,
    /// Config blob.
    pub config: Blob,
    /// Layer blobs (gzip-compressed tars).
    pub layers: Vec<Blob>,
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(dir: &Path, data: &[u8]) -> Result<Blob> {
    let digest = sha256_digest(data);
    let hex = &digest["sha256:".len()..];
    let path = dir.join("blobs/sha256").join(hex);
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    Ok(Blob {
        digest,
        size: data.len() as u64,
    })
}

/// Writes the layers, config and manifest of a one-platform image (`linux/<arch>`) into the
/// OCI layout at `dir`: (manifest, config, layers).
fn image_blobs(
    dir: &Path,
    seed: u64,
    layer_sizes: &[u64],
    arch: &str,
) -> Result<(Blob, Blob, Vec<Blob>)> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, &size) in layer_sizes.iter().enumerate() {
        let mut data = vec![0u8; size as usize];
        content::fill(seed + i as u64, 0, &mut data);
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("layer{i}/data.bin"), &data[..])
            .context("building a layer tar")?;
        let tar = tar.into_inner().context("finishing a layer tar")?;
        diff_ids.push(sha256_digest(&tar));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).context("compressing a layer")?;
        let gz = gz.finish().context("compressing a layer")?;
        layers.push(put_blob(dir, &gz)?);
    }
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = put_blob(dir, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest,
            "size": config.size,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest = put_blob(dir, manifest.to_string().as_bytes())?;
    Ok((manifest, config, layers))
}

/// Writes `index.json` (one entry, tagged `tag`) and `oci-layout`.
fn write_layout(dir: &Path, tag: &str, media_type: &str, top: &Blob) -> Result<()> {
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": top.digest,
            "size": top.size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).context("writing index.json")?;
    std::fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}")
        .context("writing oci-layout")
}

impl OciImage {
    /// Builds an image in `dir` (created) with one layer per entry of `layer_sizes`: a tar.gz
    /// holding one file of that many generated bytes (seed `seed + i`, incompressible, so the
    /// blob is a little larger than the file).
    pub fn build(dir: &Path, tag: &str, seed: u64, layer_sizes: &[u64]) -> Result<Self> {
        let (manifest, config, layers) = image_blobs(dir, seed, layer_sizes, "amd64")?;
        write_layout(
            dir,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
            manifest,
            config,
            layers,
        })
    }

    /// The config and layer blobs (what a pull fetches with `GET …/blobs/…`).
    pub fn blobs(&self) -> Vec<Blob> {
        std::iter::once(self.config.clone())
            .chain(self.layers.iter().cloned())
            .collect()
    }

    /// Path of blob `digest` in this layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.dir, digest)
    }
}

/// A multi-platform image in one OCI layout: an image per platform and an OCI image index
/// naming them, tagged in `index.json` (push it with `skopeo copy --all`).
#[derive(Debug, Clone)]
pub struct OciIndex {
    /// The layout directory.
    pub dir: PathBuf,
    /// Its tag.
    pub tag: String,
    /// The image index blob.
    pub index: Blob,
    /// `("linux/<arch>", image)` per platform (each image's `dir` and `tag` are the
    /// index's).
    pub platforms: Vec<(String, OciImage)>,
}

impl OciIndex {
    /// Builds the layout in `dir`: for each `(arch, seed, layer_sizes)` a `linux/<arch>`
    /// image as [`OciImage::build`] makes, and an index of them tagged `tag`.
    pub fn build(dir: &Path, tag: &str, platforms: &[(&str, u64, &[u64])]) -> Result<Self> {
        let mut images = Vec::new();
        let mut entries = Vec::new();
        for &(arch, seed, sizes) in platforms {
            let (manifest, config, layers) = image_blobs(dir, seed, sizes, arch)?;
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest.digest,
                "size": manifest.size,
                "platform": {"os": "linux", "architecture": arch},
            }));
            images.push((
                format!("linux/{arch}"),
                OciImage {
                    dir: dir.to_path_buf(),
                    tag: tag.to_string(),
                    manifest,
                    config,
                    layers,
                },
            ));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        });
        let index = put_blob(dir, index.to_string().as_bytes())?;
        write_layout(dir, tag, "application/vnd.oci.image.index.v1+json", &index)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
            index,
            platforms: images,
        })
    }

    /// The image of `platform` (`linux/<arch>`).
    pub fn platform(&self, platform: &str) -> Option<&OciImage> {
        self.platforms
            .iter()
            .find(|(p, _)| p == platform)
            .map(|(_, i)| i)
    }
}

/// Path of blob `digest` in the OCI layout at `dir`.
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// Runs `skopeo ARGS` with a signature policy (accept anything) written in `work`, bounded by
/// `timeout`.
pub async fn skopeo(work: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    skopeo_env(work, args, &[], timeout).await
}

/// [`skopeo`] with extra environment variables (e.g. `HTTPS_PROXY`).
pub async fn skopeo_env(
    work: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Output> {
    let policy = work.join("skopeo-policy.json");
    if !policy.exists() {
        std::fs::write(
            &policy,
            "{\"default\":[{\"type\":\"insecureAcceptAnything\"}]}",
        )
        .with_context(|| format!("writing {}", policy.display()))?;
    }
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--policy")
        .arg(&policy)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(o) => o.context("running skopeo"),
        Err(_) => bail!(
            "skopeo {} did not finish within {timeout:?}",
            args.join(" ")
        ),
    }
}

/// A `containerd` with its root, state and sockets under one directory; killed on drop.
#[derive(Debug)]
pub struct Containerd {
    /// Its gRPC socket (`ctr --address`).
    pub socket: PathBuf,
    /// The process.
    pub proc: Proc,
}

impl Containerd {
    /// Starts containerd (CRI plugin off) with everything under `dir`, and waits until `ctr
    /// version` answers.
    pub async fn start(dir: &Path) -> Result<Self> {
        let config = Self::write_config(dir)?;
        Self::start_with_config(dir, &config).await
    }

    /// Writes `dir/containerd.toml`, a version 2 config (CRI plugin off) keeping root, state
    /// and sockets under `dir`, and returns its path.
    pub fn write_config(dir: &Path) -> Result<PathBuf> {
        let root = dir.join("root");
        let state = dir.join("state");
        for d in [&root, &state] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root.display(),
                state.display(),
                socket.display(),
                socket.display()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        Ok(config)
    }

    /// Starts containerd with `config` (one [`Containerd::write_config`] wrote under `dir`,
    /// maybe edited since), and waits until `ctr version` answers.
    pub async fn start_with_config(dir: &Path, config: &Path) -> Result<Self> {
        let bin = which("containerd").context("containerd not found")?;
        let socket = dir.join("containerd.sock");
        let proc = Proc::spawn(
            "containerd",
            &bin,
            &["--config".to_string(), config.display().to_string()],
            dir.join("containerd.log"),
            "info",
        )?;
        let c = Self { socket, proc };
        let sock = c.socket.clone();
        wait_ready(&c.proc, Duration::from_secs(20), || {
            let sock = sock.clone();
            async move {
                tokio::process::Command::new("ctr")
                    .arg("--address")
                    .arg(&sock)
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await
                    .is_ok_and(|s| s.success())
            }
        })
        .await?;
        Ok(c)
    }

    /// Runs `ctr --address SOCK ARGS`, bounded by `timeout`.
    pub async fn ctr(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(timeout, cmd.output()).await {
            Ok(o) => o.context("running ctr"),
            Err(_) => bail!("ctr {} did not finish within {timeout:?}", args.join(" ")),
        }
    }

    /// `ctr images pull --hosts-dir` of `reg`'s `test/img:v1` through the registry mirror at
    /// `mirror` (`http://…`), with a `hosts.toml` written under `dir`; `args` go before the
    /// image reference (e.g. `--user name:secret`). The pull must succeed.
    pub async fn pull_through_mirror(
        &self,
        dir: &Path,
        reg: &Registry,
        mirror: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let hosts = dir.join("hosts.d");
        write_hosts_toml(&hosts, &reg.addr.to_string(), &reg.url(), mirror)?;
        let image_ref = format!("{}/test/img:v1", reg.addr);
        let hosts_arg = hosts.display().to_string();
        let mut all = vec!["images", "pull"];
        all.extend_from_slice(args);
        all.extend([
            "--hosts-dir",
            hosts_arg.as_str(),
            "--plain-http",
            &image_ref,
        ]);
        check_output(
            &format!("ctr images pull through the mirror {mirror}"),
            &self.ctr(&all, timeout).await?,
        );
        Ok(())
    }

    /// Asserts that containerd's content store holds every blob of `image`, byte for byte
    /// as pushed (`what` names the pull in the message).
    pub async fn assert_blobs(&self, image: &OciImage, what: &str, timeout: Duration) {
        for b in image.blobs() {
            let o = self
                .ctr(&["content", "get", &b.digest], timeout)
                .await
                .expect("running ctr content get");
            check_output("ctr content get", &o);
            let want = std::fs::read(image.blob_path(&b.digest)).expect("pushed blob");
            assert!(
                o.stdout == want,
                "{what}: containerd's copy of {} differs from the pushed blob",
                b.digest
            );
        }
    }
}

/// Asserts that a tool's run (`what`) succeeded, showing its status and output otherwise.
pub fn check_output(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstderr: {}\nstdout: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim(),
        String::from_utf8_lossy(&o.stdout).trim()
    );
}

/// Writes `<hosts_dir>/<registry_host>/hosts.toml` sending pulls of `registry_host` (served
/// by `server`) to the mirror at `mirror` (`http://127.0.0.1:4001`), with the
/// `X-Dragonfly-Registry: server` header.
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry_host: &str,
    server: &str,
    mirror: &str,
) -> Result<PathBuf> {
    let dir = hosts_dir.join(registry_host);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("hosts.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
             [host.\"{mirror}\".header]\n  X-Dragonfly-Registry = [\"{server}\"]\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A TCP relay in front of a real server (a [`Registry`]): everything from the client goes
/// through; from the server, the first `hold_at` bytes (all connections together, response
/// headers included) go through, and the rest waits in the relay, which stops reading, until
/// [`GatedRelay::release`]. A registry stalled in the middle of a blob, to show that a proxy
/// streams what it has before the blob is complete. Killed with the runtime.
#[derive(Debug)]
pub struct GatedRelay {
    /// Its address.
    pub addr: SocketAddr,
    gate: tokio::sync::watch::Sender<bool>,
    state: std::sync::Arc<RelayState>,
}

#[derive(Debug, Default)]
struct RelayState {
    /// Bytes from the server passed on to clients.
    forwarded: std::sync::atomic::AtomicU64,
    /// Connections waiting at the gate with server bytes to pass on.
    holding: std::sync::atomic::AtomicU64,
    /// Connections accepted.
    connections: std::sync::atomic::AtomicU64,
}

impl GatedRelay {
    /// Starts the relay on `127.0.0.1:0` to `upstream`. Must be called inside a tokio
    /// runtime.
    pub async fn start(upstream: SocketAddr, hold_at: u64) -> Result<Self> {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the relay")?;
        let addr = listener.local_addr().context("relay address")?;
        let (gate, rx) = tokio::sync::watch::channel(false);
        let state = std::sync::Arc::new(RelayState::default());
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                st.connections.fetch_add(1, Ordering::Relaxed);
                let (st, mut rx) = (st.clone(), rx.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                        let _ = sw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let open = *rx.borrow();
                        let room = if open {
                            buf.len() as u64
                        } else {
                            hold_at.saturating_sub(st.forwarded.load(Ordering::Relaxed))
                        };
                        if room == 0 {
                            // Anything more from the server waits here.
                            let mut probe = [0u8; 1];
                            match sr.peek(&mut probe).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                            st.holding.fetch_add(1, Ordering::Relaxed);
                            let released = rx.wait_for(|o| *o).await.is_ok();
                            st.holding.fetch_sub(1, Ordering::Relaxed);
                            if !released {
                                break;
                            }
                            continue;
                        }
                        let want = (room as usize).min(buf.len());
                        let n = match sr.read(&mut buf[..want]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        st.forwarded.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Ok(Self { addr, gate, state })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets every held connection (and every later one) pass the rest.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Bytes from the server passed on to clients so far.
    pub fn forwarded(&self) -> u64 {
        self.state
            .forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections whose server has sent more than the gate let through, waiting for
    /// [`GatedRelay::release`].
    pub fn holding(&self) -> u64 {
        self.state
            .holding
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An HTTP server holding one blob at every path, that sends its first `hold_at` bytes and
/// then waits until [`GatedBlob::release`] before sending the rest: a registry stalled in the
/// middle of a blob, to show that a proxy streams what it has before the blob is complete.
#[derive(Debug)]
pub struct GatedBlob {
    /// Its address.
    pub addr: SocketAddr,
    gate: tokio::sync::watch::Sender<bool>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GatedBlob {
    /// Starts the server on `127.0.0.1:0`. Must be called inside a tokio runtime.
    pub async fn start(data: Vec<u8>, hold_at: usize) -> Result<Self> {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the gated blob server")?;
        let addr = listener.local_addr().context("gated blob server address")?;
        let (gate, rx) = tokio::sync::watch::channel(false);
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let data = bytes::Bytes::from(data);
        let count = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (data, rx, count) = (data.clone(), rx.clone(), count.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (data, mut rx) = (data.clone(), rx.clone());
                        let hold = hold_at.min(data.len());
                        let (tx, body_rx) = tokio::sync::mpsc::channel::<
                            std::result::Result<Frame<bytes::Bytes>, std::io::Error>,
                        >(4);
                        let len = data.len();
                        tokio::spawn(async move {
                            if tx.send(Ok(Frame::data(data.slice(..hold)))).await.is_err() {
                                return;
                            }
                            let _ = rx.wait_for(|open| *open).await;
                            let _ = tx.send(Ok(Frame::data(data.slice(hold..)))).await;
                        });
                        let body =
                            StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body_rx));
                        async move {
                            hyper::Response::builder()
                                .header("content-length", len)
                                .header("content-type", "application/octet-stream")
                                .body(body)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            gate,
            requests,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets every held response (and every later one) send the rest of the blob.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Whether [`GatedBlob::release`] was called.
    pub fn released(&self) -> bool {
        *self.gate.borrow()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}
