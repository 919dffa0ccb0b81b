//! dfget's behaviour without a daemon: it starts nothing, fails, and says how to start one.

use testkit::bin_path;

#[tokio::test]
async fn dfget_without_a_daemon_fails_and_mentions_dfdaemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("no-daemon.sock");
    let out = dir.path().join("out");
    let o = tokio::process::Command::new(bin_path("dfget").expect("dfget binary"))
        .arg("http://127.0.0.1:9/file")
        .arg("-O")
        .arg(&out)
        .arg("--endpoint")
        .arg(&socket)
        .kill_on_drop(true)
        .output();
    let o = tokio::time::timeout(std::time::Duration::from_secs(30), o)
        .await
        .expect("dfget without a daemon should fail fast, not hang")
        .expect("running dfget");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "dfget exited 0 without a daemon");
    assert!(
        stderr.contains("dfdaemon"),
        "dfget's error should tell how to start dfdaemon; stderr was: {stderr}"
    );
    assert!(
        !out.exists(),
        "dfget without a daemon created {}",
        out.display()
    );
}
