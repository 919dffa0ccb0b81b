//! dfget's exit codes (cli README, "Exit codes") on a real cluster and origin: each kind of
//! failure the daemon reports (`DownloadError`) reaches the shell as its own code, with the
//! message that says what happened, and no output file.

use std::path::Path;
use std::process::Output;
use testkit::bin_path;
use testkit::origin::Fault;
use testkit::{Cluster, ClusterOptions, Origin};

const MIB: u64 = 1 << 20;

/// dfget failed with `code`, said `needle` on stderr, and left no output file.
fn assert_exit(o: &Output, out: &Path, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(code),
        "dfget should exit {code} (saying {needle:?}); stderr: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "dfget exited {code} but its error does not say {needle:?}: {stderr}"
    );
    assert!(
        !out.exists(),
        "dfget failed but left an output file {}",
        out.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_kind_has_its_exit_code() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 1))
        .await
        .expect("starting the cluster");
    let p1 = cluster.peer(1);
    let dir = cluster.dir().join("exit-codes");
    std::fs::create_dir_all(&dir).expect("output dir");
    let content = origin.add_file("/file.bin", 2 * MIB + 5, 7);
    let url = origin.url("/file.bin");

    // 0: the file is complete.
    let out = dir.join("ok");
    let o = cluster
        .run_dfget(
            p1,
            &url,
            &out,
            Some(&format!("sha256:{}", content.sha256_hex())),
        )
        .await
        .expect("dfget");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // 3: the origin has no such file.
    let out = dir.join("missing");
    let o = cluster
        .run_dfget(p1, &origin.url("/missing.bin"), &out, None)
        .await
        .expect("dfget");
    assert_exit(&o, &out, 3, "404 Not Found");

    // 4: the origin refuses access.
    origin.add_file("/secret.bin", MIB, 8);
    origin.set_fault("/secret.bin", Fault::Status(403), None);
    let out = dir.join("secret");
    let o = cluster
        .run_dfget(p1, &origin.url("/secret.bin"), &out, None)
        .await
        .expect("dfget");
    assert_exit(&o, &out, 4, "403 Forbidden");

    // 5: the content is not what --digest says.
    let out = dir.join("wrong-digest");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let o = cluster
        .run_dfget(p1, &url, &out, Some(&wrong))
        .await
        .expect("dfget");
    assert_exit(&o, &out, 5, "digest mismatch");

    // 2: a range outside the file, refused by the daemon; and conflicting arguments,
    // refused by dfget itself.
    let out = dir.join("bad-range");
    let past = format!("{}-", content.size);
    let o = cluster
        .run_dfget_with(p1, &url, &out, None, &["--range", &past])
        .await
        .expect("dfget");
    assert_exit(&o, &out, 2, "not within");
    let o = cluster
        .run_dfget_with(p1, &url, &out, Some(&wrong), &["--range", "0-9"])
        .await
        .expect("dfget");
    assert_exit(&o, &out, 2, "cannot be used with --range");

    // 8: a server error that outlasts the retries.
    origin.add_file("/broken.bin", MIB, 9);
    origin.set_fault("/broken.bin", Fault::Status(500), None);
    let out = dir.join("broken");
    let o = cluster
        .run_dfget(p1, &origin.url("/broken.bin"), &out, None)
        .await
        .expect("dfget");
    assert_exit(&o, &out, 8, "500 Internal Server Error");

    // 1: no daemon on the socket.
    let out = dir.join("no-daemon");
    let o = tokio::process::Command::new(bin_path("dfget").expect("dfget binary"))
        .arg(&url)
        .arg("-O")
        .arg(&out)
        .arg("--endpoint")
        .arg(dir.join("nobody.sock"))
        .kill_on_drop(true)
        .output()
        .await
        .expect("running dfget");
    assert_exit(&o, &out, 1, "dfdaemon");
}
