//! Config and logs of the real binaries: `--version` names the git revision; dfdaemon takes
//! its config file from `DFDAEMON_CONFIG`, and settings follow file → environment → flags;
//! `--log-format json` (or its variable) writes one JSON object per line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use testkit::bin_path;
use testkit::cluster::free_port;
use testkit::poll::{http_get, wait_until};

/// Kills the child when dropped (a failing assertion must not leave a daemon behind).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Kills the process and returns every line it wrote to stderr.
    fn stop(mut self) -> Vec<String> {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let Some(err) = self.0.stderr.take() else {
            return Vec::new();
        };
        BufReader::new(err).lines().map_while(Result::ok).collect()
    }
}

/// A command for a workspace binary with none of the Damselfly variables of the caller.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin_path(name).expect("binary"));
    for (k, _) in std::env::vars() {
        if ["DFDAEMON_", "SCHEDULER_", "MANAGER_"]
            .iter()
            .any(|p| k.starts_with(p))
            || k == "RUST_LOG"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd
}

fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn version_shows_the_git_revision() {
    let rev = git_revision().unwrap_or_else(|| "unknown".into());
    for name in ["dfdaemon", "scheduler", "manager", "dfget", "dfcache"] {
        let out = command(name)
            .arg("--version")
            .stdout(Stdio::piped())
            .output()
            .expect("--version");
        assert!(out.status.success(), "{name} --version failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("{name} {} (rev {rev})", env!("CARGO_PKG_VERSION"));
        assert_eq!(text.trim(), want, "{name} --version");
    }
}

/// Starts a dfdaemon whose only source of `metrics.listen` differences is the layering under
/// test; returns it once `/healthy` answers on `expect`.
async fn daemon_answering(
    dir: &Path,
    env: &[(&str, String)],
    args: &[String],
    expect: SocketAddr,
) -> Running {
    let mut cmd = command("dfdaemon");
    cmd.args(["--threads", "1", "--scheduler", "127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(dir.join("d.sock"))
        .arg("--data-port")
        .arg(free_port().expect("port").to_string())
        .args(args)
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = Running(cmd.spawn().expect("starting dfdaemon"));
    wait_until(
        &format!("dfdaemon answers /healthy on {expect}"),
        Duration::from_secs(30),
        || async move {
            Ok(http_get(expect, "/healthy")
                .await
                .is_ok_and(|(s, _)| s == 200))
        },
    )
    .await
    .expect("dfdaemon metrics endpoint");
    child
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dfdaemon_settings_layer_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (from_file, from_env, from_flag) = (addr(), addr(), addr());
    let config = dir.path().join("dfdaemon.yaml");
    std::fs::write(&config, format!("metrics:\n  listen: {from_file}\n")).expect("config");
    let cfg_env = ("DFDAEMON_CONFIG", config.display().to_string());

    // The file, named by the environment (and JSON logs from the environment too).
    let d = daemon_answering(
        dir.path(),
        &[cfg_env.clone(), ("DFDAEMON_LOG_FORMAT", "json".into())],
        &[],
        from_file,
    )
    .await;
    let lines = d.stop();
    let json: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        json.iter().any(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&config.display().to_string()))
        }),
        "no JSON log line names the config file: {lines:?}"
    );
    assert!(json
        .iter()
        .all(|v| v["level"].is_string() && v["timestamp"].is_string()));

    // The environment overrides the file.
    let d = daemon_answering(
        dir.path(),
        &[cfg_env.clone(), ("DFDAEMON_METRICS", from_env.to_string())],
        &[],
        from_env,
    )
    .await;
    assert!(
        http_get(from_file, "/healthy").await.is_err(),
        "file's address still served"
    );
    drop(d);

    // A flag overrides both.
    let d = daemon_answering(
        dir.path(),
        &[cfg_env.clone(), ("DFDAEMON_METRICS", from_env.to_string())],
        &["--metrics".into(), from_flag.to_string()],
        from_flag,
    )
    .await;
    assert!(
        http_get(from_env, "/healthy").await.is_err(),
        "env's address still served"
    );
    drop(d);

    // --config wins over DFDAEMON_CONFIG; a missing file is an error naming it.
    let out = command("dfdaemon")
        .env("DFDAEMON_CONFIG", config.display().to_string())
        .arg("--config")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .expect("dfdaemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.yaml"), "{err}");
}

#[test]
fn scheduler_and_manager_take_their_config_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, var) in [
        ("scheduler", "SCHEDULER_CONFIG"),
        ("manager", "MANAGER_CONFIG"),
    ] {
        let bad = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&bad, "server: 5\n").expect("config");
        let out = command(name)
            .env(var, &bad)
            .env(
                format!("{}_LOG_FORMAT", var.trim_end_matches("_CONFIG")),
                "json",
            )
            .output()
            .expect(name);
        assert!(!out.status.success(), "{name} accepted a malformed config");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<serde_json::Value> = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let path = bad.display().to_string();
        assert!(
            lines.iter().any(|v| v["level"] == "ERROR"
                && v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(&path))),
            "{name} logged no JSON error naming {path}: {err}"
        );
    }
}

/// `--log-dir` / `log.dir`: logs in files instead of stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_dir_writes_rotated_files_instead_of_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    let metrics = addr();
    // dfdaemon: --log-dir from its variable; nothing on stderr, the lines in
    // dfdaemon.log.<date> (daily rotation, the default).
    let d = daemon_answering(
        dir.path(),
        &[("DFDAEMON_LOG_DIR", logs.display().to_string())],
        &["--metrics".into(), metrics.to_string()],
        metrics,
    )
    .await;
    // The file is written by a background thread: wait for the line before killing.
    let want = format!("metrics on http://{metrics}/metrics");
    let (l, w) = (logs.clone(), want.clone());
    let _ = wait_until(
        "the log file names the metrics address",
        Duration::from_secs(10),
        || {
            let (l, w) = (l.clone(), w.clone());
            async move {
                Ok(std::fs::read_dir(&l)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&w))))
            }
        },
    )
    .await;
    let stderr = d.stop();
    assert!(
        stderr.iter().all(|l| l.trim().is_empty()),
        "logs still on stderr: {stderr:?}"
    );
    let files: Vec<String> = std::fs::read_dir(&logs)
        .expect("log dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("dfdaemon.log.20"), "{files:?}");
    let text = std::fs::read_to_string(logs.join(&files[0])).expect("log file");
    assert!(text.contains(&want), "{text}");

    // The config file's `log:` section: one file dfdaemon.log (rotation never) in its dir.
    let from_file = dir.path().join("file-logs");
    let metrics = addr();
    let config = dir.path().join("logs.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  listen: {metrics}\nlog:\n  dir: {}\n  rotation: never\n  max_files: 2\n",
            from_file.display()
        ),
    )
    .expect("config");
    let d = daemon_answering(
        dir.path(),
        &[("DFDAEMON_CONFIG", config.display().to_string())],
        &[],
        metrics,
    )
    .await;
    let log = from_file.join("dfdaemon.log");
    let want = format!("config file {}", config.display());
    let (l, w) = (log.clone(), want.clone());
    let _ = wait_until(
        "dfdaemon.log names the config file",
        Duration::from_secs(10),
        || {
            let (l, w) = (l.clone(), w.clone());
            async move { Ok(std::fs::read_to_string(&l).is_ok_and(|t| t.contains(&w))) }
        },
    )
    .await;
    let stderr = d.stop();
    let text = std::fs::read_to_string(&log).expect("dfdaemon.log from log.dir");
    assert!(text.contains(&want), "{text}");
    assert!(
        stderr.iter().all(|l| l.trim().is_empty()),
        "logs still on stderr: {stderr:?}"
    );

    // scheduler: --log-rotation never gives one file scheduler.log; a log dir that cannot be
    // made is an error naming it.
    let out = command("scheduler")
        .arg("--log-dir")
        .arg(&logs)
        .args(["--log-rotation", "never", "--listen", "127.0.0.1:1"])
        .env("SCHEDULER_CONFIG", dir.path().join("missing.yaml"))
        .output()
        .expect("scheduler");
    assert!(!out.status.success(), "a missing config file was accepted");
    let text = std::fs::read_to_string(logs.join("scheduler.log")).expect("scheduler.log");
    assert!(text.contains("missing.yaml"), "{text}");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").expect("file");
    let out = command("manager")
        .arg("--log-dir")
        .arg(blocker.join("logs"))
        .output()
        .expect("manager");
    assert!(!out.status.success(), "manager started without its log dir");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("creating log directory"), "{err}");
}
