//! dfcache end to end, with no origin anywhere: a file imported on one host is exported on
//! another from that peer alone; stat reports it; delete removes it locally and at the
//! scheduler; a file nobody holds fails with a clear "not found in the P2P network".

use std::process::Output;
use testkit::content::file_sha256_hex_async;
use testkit::{bin_path, Cluster, ClusterOptions, Content};

fn out_str(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(what: &str, o: &Output) -> String {
    let (stdout, stderr) = out_str(o);
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        o.status
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_export_stat_delete_without_an_origin() {
    // No seed peer and no origin: the only copy is the imported one.
    let cluster = Cluster::start(ClusterOptions::sized(0, 2))
        .await
        .expect("starting the cluster");
    let (a, b) = (cluster.peer(1), cluster.peer(2));
    let dir = cluster.dir().join("files");
    std::fs::create_dir_all(&dir).expect("files dir");

    // Several pieces (of the default rule's length) and a partial last one.
    let len = 3 * 1024 * 1024 + 12_345;
    let content = Content::new(4242, len);
    let pieces = len.div_ceil(wire::piece::piece_length_for(
        len,
        wire::piece::DEFAULT_MIN_PIECE_LENGTH,
        wire::piece::MAX_PIECE_LENGTH,
    ));
    let src = dir.join("model.bin");
    content.write_to(&src).expect("writing the source file");
    let src_s = src.to_string_lossy().into_owned();

    // Import on A: the content id printed is the file's digest.
    let o = cluster
        .run_dfcache(a, &["import", &src_s])
        .await
        .expect("dfcache import");
    let stdout = ok("dfcache import on peer-1", &o);
    let cid = stdout.trim().to_string();
    assert_eq!(cid, content.digest(), "import printed {stdout:?}");

    // Stat on A: held locally and known to the scheduler with A as a complete peer.
    let o = cluster
        .run_dfcache(a, &["stat", &cid])
        .await
        .expect("dfcache stat");
    let stat = ok("dfcache stat on peer-1", &o);
    assert!(
        stat.contains(&format!("local: complete ({pieces}/{pieces} pieces)")),
        "{stat}"
    );
    assert!(stat.contains("scheduler: 1 peers, 1 complete"), "{stat}");
    assert!(
        stat.contains(&format!("peer peer-1 {pieces}/{pieces} pieces (complete)")),
        "{stat}"
    );

    // Export on B: from A only (there is no origin to go to), verified against the cid.
    let out = dir.join("exported.bin");
    let out_s = out.to_string_lossy().into_owned();
    let o = cluster
        .run_dfcache(b, &["export", &cid, "-O", &out_s])
        .await
        .expect("dfcache export");
    ok("dfcache export on peer-2", &o);
    assert_eq!(
        file_sha256_hex_async(&out).await.expect("hashing export"),
        content.sha256_hex(),
        "exported file differs from the imported one"
    );
    let sb = b.stats().await.expect("Stats of peer-2");
    assert_eq!(sb.bytes_from_origin, 0, "peer-2 went to an origin: {sb:?}");
    assert_eq!(
        sb.bytes_from_peers, content.size,
        "peer-2 did not get every byte from peer-1: {sb:?}"
    );
    let sa = a.stats().await.expect("Stats of peer-1");
    assert_eq!(sa.bytes_uploaded, content.size, "peer-1 uploads: {sa:?}");

    // A content id nobody has: a clear error, non-zero exit, no output file.
    let missing = dir.join("missing.bin");
    let missing_s = missing.to_string_lossy().into_owned();
    let nobody = format!("sha256:{}", "ab".repeat(32));
    let o = cluster
        .run_dfcache(b, &["export", &nobody, "-O", &missing_s])
        .await
        .expect("dfcache export of an unknown id");
    let (_, stderr) = out_str(&o);
    assert!(!o.status.success(), "export of an unknown id exited 0");
    assert!(
        stderr.contains("task not found in the P2P network"),
        "stderr: {stderr}"
    );
    assert!(
        !missing.exists(),
        "a failed export left {}",
        missing.display()
    );

    // A user id with a tag: the same id without the tag is another task.
    let small = Content::new(7, 70_000);
    let small_src = dir.join("small.bin");
    small.write_to(&small_src).expect("writing small");
    let small_s = small_src.to_string_lossy().into_owned();
    let o = cluster
        .run_dfcache(
            a,
            &["import", &small_s, "--id", "my-dataset-v1", "--tag", "eu"],
        )
        .await
        .expect("import with id and tag");
    assert_eq!(ok("import --id --tag", &o).trim(), "my-dataset-v1");
    let small_out = dir.join("small.out");
    let small_out_s = small_out.to_string_lossy().into_owned();
    let o = cluster
        .run_dfcache(
            b,
            &["export", "my-dataset-v1", "--tag", "eu", "-O", &small_out_s],
        )
        .await
        .expect("export with id and tag");
    ok("export --tag", &o);
    assert_eq!(
        file_sha256_hex_async(&small_out).await.expect("hash"),
        small.sha256_hex()
    );
    let o = cluster
        .run_dfcache(b, &["export", "my-dataset-v1", "-O", &small_out_s])
        .await
        .expect("export without the tag");
    assert!(!o.status.success(), "the untagged id should not exist");

    // Delete on A: gone locally; the scheduler now lists only B.
    let o = cluster
        .run_dfcache(a, &["delete", &cid])
        .await
        .expect("dfcache delete");
    ok("dfcache delete on peer-1", &o);
    let o = cluster
        .run_dfcache(a, &["stat", &cid])
        .await
        .expect("dfcache stat after delete");
    let stat = ok("dfcache stat after delete (B still has it)", &o);
    assert!(stat.contains("local: not found locally"), "{stat}");
    assert!(!stat.contains("peer peer-1"), "peer-1 still listed: {stat}");
    assert!(stat.contains("peer peer-2"), "peer-2 not listed: {stat}");
    // Deleting again is an error: nothing to delete.
    let o = cluster
        .run_dfcache(a, &["delete", &cid])
        .await
        .expect("second delete");
    assert!(!o.status.success(), "deleting an absent task exited 0");

    // Once B deletes it too, nobody has it.
    let o = cluster
        .run_dfcache(b, &["delete", &cid])
        .await
        .expect("delete on B");
    ok("dfcache delete on peer-2", &o);
    let o = cluster
        .run_dfcache(a, &["stat", &cid])
        .await
        .expect("stat after both deletes");
    let (stdout, stderr) = out_str(&o);
    assert!(
        !o.status.success(),
        "stat of a deleted task exited 0: {stdout}"
    );
    assert!(stderr.contains("not found"), "stderr: {stderr}");
    let again = dir.join("again.bin");
    let again_s = again.to_string_lossy().into_owned();
    let o = cluster
        .run_dfcache(a, &["export", &cid, "-O", &again_s])
        .await
        .expect("export after deletes");
    let (_, stderr) = out_str(&o);
    assert!(!o.status.success(), "export of a deleted task exited 0");
    assert!(
        stderr.contains("task not found in the P2P network"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn dfcache_without_a_daemon_fails_and_mentions_dfdaemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("no-daemon.sock");
    let o = tokio::process::Command::new(bin_path("dfcache").expect("dfcache binary"))
        .args(["stat", "sha256:00", "--endpoint"])
        .arg(&socket)
        .env_remove("DFCACHE_ENDPOINT")
        .kill_on_drop(true)
        .output();
    let o = tokio::time::timeout(std::time::Duration::from_secs(30), o)
        .await
        .expect("dfcache without a daemon should fail fast")
        .expect("running dfcache");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "dfcache exited 0 without a daemon");
    assert!(
        stderr.contains("no dfdaemon is answering"),
        "stderr: {stderr}"
    );
}
