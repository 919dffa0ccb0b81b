//! dfget beyond a plain download: byte ranges (exact bytes, invalid ranges refused),
//! recursive download of an HTML directory index (paths kept, links outside refused), and
//! defaults from a config file.

use std::path::{Path, PathBuf};
use std::process::Output;
use testkit::content::file_sha256_hex_async;
use testkit::{Cluster, ClusterOptions, Origin};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).expect("prefix").to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_recursive_and_config_defaults() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions::sized(1, 2))
        .await
        .expect("starting the cluster");
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");
    let p1 = cluster.peer(1);

    // --- Ranges: 1 MiB pieces; several ranges incl. one across a piece boundary and N-.
    let size: u64 = 3 * 1024 * 1024 + 777;
    let content = origin.add_file("/big.bin", size, 99);
    let url = origin.url("/big.bin");
    let mib = 1024 * 1024;
    let cases: Vec<(String, u64, u64)> = vec![
        ("0-99".into(), 0, 100),
        (format!("{}-{}", mib - 1000, mib + 999), mib - 1000, 2000),
        (format!("{}-", size - 5000), size - 5000, 5000),
        ("5-5".into(), 5, 1),
        (
            format!("{}-{}", 2 * mib, size + 10_000),
            2 * mib,
            size - 2 * mib,
        ),
    ];
    for (i, (spec, start, len)) in cases.iter().enumerate() {
        let path = out.join(format!("range-{i}"));
        let o = cluster
            .run_dfget_with(p1, &url, &path, None, &["--range", spec])
            .await
            .expect("dfget --range");
        assert!(
            o.status.success(),
            "dfget --range {spec} failed: {}",
            stderr(&o)
        );
        let got = std::fs::read(&path).expect("reading the range output");
        assert_eq!(got.len() as u64, *len, "range {spec}: wrong length");
        assert!(
            got == content.range(*start, *len),
            "range {spec}: bytes differ from the source"
        );
    }
    // The ranges share the whole file's task: a full download afterwards is complete and
    // correct, and the origin served the file about once.
    cluster
        .download_verified(p1, &url, &out.join("big.full"), &content)
        .await
        .expect("full download after ranges");
    assert!(
        origin.bytes_served() < 2 * size,
        "origin served {} bytes for a {size}-byte file",
        origin.bytes_served()
    );

    // Invalid ranges: clear error, non-zero exit, no output.
    for (spec, needle) in [
        ("9-3", "before"),
        ("abc", "START-END"),
        ("-100", "suffix"),
        (&*format!("{size}-"), "not within"),
    ] {
        let path = out.join("bad-range");
        let o = cluster
            .run_dfget_with(p1, &url, &path, None, &["--range", spec])
            .await
            .expect("dfget with a bad range");
        assert!(!o.status.success(), "range {spec:?} was accepted");
        assert!(
            stderr(&o).contains(needle),
            "range {spec:?}: stderr should mention {needle:?}: {}",
            stderr(&o)
        );
        assert!(!path.exists(), "bad range {spec:?} left an output file");
    }
    let o = cluster
        .run_dfget_with(
            p1,
            &url,
            &out.join("x"),
            Some(&content.digest()),
            &["--range", "0-9"],
        )
        .await
        .expect("dfget --range --digest");
    assert!(!o.status.success(), "--range with --digest was accepted");

    // --- Priority: accepted in range, refused outside.
    let o = cluster
        .run_dfget_with(p1, &url, &out.join("prio"), None, &["--priority", "3"])
        .await
        .expect("dfget --priority");
    assert!(o.status.success(), "--priority 3: {}", stderr(&o));
    let o = cluster
        .run_dfget_with(p1, &url, &out.join("prio9"), None, &["--priority", "9"])
        .await
        .expect("dfget --priority 9");
    assert!(!o.status.success(), "--priority 9 was accepted");

    // --- Recursive: a small tree behind HTML index pages.
    let files = [
        ("/tree/a.bin", 100_000u64, 1u64),
        ("/tree/sub/b.bin", 2 * 1024 * 1024 + 1, 2),
        ("/tree/sub/deeper/c.txt", 10, 3),
        ("/tree/with%20space.bin", 5_000, 4),
    ];
    let mut contents = Vec::new();
    for (path, size, seed) in files {
        contents.push((path, origin.add_file(path, size, seed)));
    }
    origin.add_file("/outside.bin", 1000, 5);
    origin.add_page(
        "/tree/",
        r#"<html><head><title>Index of /tree/</title></head><body><pre>
<a href="../">../</a>
<a href="?C=N;O=D">Name</a>
<a href="a.bin">a.bin</a>
<a href="sub/">sub/</a>
<a href="with%20space.bin">with space.bin</a>
<a href="/outside.bin">outside</a>
<a href="sub/../../outside.bin">sneaky</a>
<a href="http://example.invalid/x.bin">elsewhere</a>
</pre></body></html>"#,
    );
    origin.add_page(
        "/tree/sub/",
        r#"<html><body><a href="../">../</a> <a href="b.bin">b.bin</a> <a href="deeper/">deeper/</a></body></html>"#,
    );
    origin.add_page(
        "/tree/sub/deeper/",
        r#"<html><body><a href="c.txt">c.txt</a><a href="/tree/">up</a></body></html>"#,
    );
    let tree_out = out.join("tree");
    let o = cluster
        .run_dfget_with(
            cluster.peer(2),
            &origin.url("/tree/"),
            &tree_out,
            None,
            &["--recursive"],
        )
        .await
        .expect("dfget --recursive");
    assert!(o.status.success(), "dfget --recursive: {}", stderr(&o));
    let got = files_under(&tree_out);
    let want: Vec<PathBuf> = vec![
        "a.bin".into(),
        "sub/b.bin".into(),
        "sub/deeper/c.txt".into(),
        "with space.bin".into(),
    ];
    assert_eq!(got, want, "files of the recursive download");
    for ((_, c), rel) in contents.iter().zip(&want) {
        assert_eq!(
            file_sha256_hex_async(&tree_out.join(rel))
                .await
                .expect("hash"),
            c.sha256_hex(),
            "{} differs",
            rel.display()
        );
    }
    assert!(
        !origin
            .request_log()
            .iter()
            .any(|r| r.path == "/outside.bin"),
        "a link outside the tree was followed"
    );
    assert!(stderr(&o).contains("skipping link"), "{}", stderr(&o));

    // --- Config file: the endpoint comes from it; unknown keys are refused.
    let cfg = cluster.dir().join("dfget.yaml");
    std::fs::write(
        &cfg,
        format!(
            "endpoint: {}\ntimeout: 60s\npriority: 2\nno_progress: true\n",
            cluster.peer(2).socket.display()
        ),
    )
    .expect("writing dfget.yaml");
    let dfget = testkit::bin_path("dfget").expect("dfget");
    let target = out.join("via-config");
    let o = tokio::process::Command::new(&dfget)
        .arg(&url)
        .arg("-O")
        .arg(&target)
        .arg("--config")
        .arg(&cfg)
        .env_remove("DFGET_ENDPOINT")
        .kill_on_drop(true)
        .output()
        .await
        .expect("dfget --config");
    assert!(o.status.success(), "dfget --config: {}", stderr(&o));
    assert_eq!(
        file_sha256_hex_async(&target).await.expect("hash"),
        content.sha256_hex()
    );
    let bad = cluster.dir().join("bad.yaml");
    std::fs::write(&bad, "endpiont: /nowhere\n").expect("writing bad.yaml");
    let o = tokio::process::Command::new(&dfget)
        .arg(&url)
        .arg("-O")
        .arg(out.join("never"))
        .arg("--config")
        .arg(&bad)
        .kill_on_drop(true)
        .output()
        .await
        .expect("dfget with a bad config");
    assert!(
        !o.status.success(),
        "a config with an unknown key was accepted"
    );
    assert!(stderr(&o).contains("unknown field"), "{}", stderr(&o));
}

/// Inode numbers of the regular files under `dir`.
fn inodes_under(dir: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(dir.join(p)).ok())
        .map(|m| m.ino())
        .collect()
}

/// A finished download reaches its output as a hard link to the task file (no copy) by
/// default, and as an independent copy with `download.hard_link: false`; both are complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_hard_links_by_default_and_copies_when_told() {
    use std::os::unix::fs::MetadataExt;
    let origin = Origin::start().await.expect("origin");
    let mut cluster = Cluster::start(ClusterOptions::sized(1, 1))
        .await
        .expect("starting the cluster");
    let content = origin.add_file("/f.bin", 2 * 1024 * 1024 + 5, 7);
    let url = origin.url("/f.bin");
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");

    let linked = out.join("linked");
    let o = cluster
        .run_dfget(cluster.peer(1), &url, &linked, None)
        .await
        .expect("dfget");
    assert!(o.status.success(), "dfget: {}", stderr(&o));
    assert_eq!(
        file_sha256_hex_async(&linked).await.expect("hash"),
        content.sha256_hex()
    );
    let meta = std::fs::metadata(&linked).expect("output metadata");
    assert_eq!(meta.nlink(), 2, "the output is not a hard link to the task");
    assert!(
        inodes_under(&cluster.peer(1).data_dir).contains(&meta.ino()),
        "the output's inode is not a task file of peer-1"
    );

    let cfg = cluster.dir().join("copy.yaml");
    std::fs::write(&cfg, "download:\n  hard_link: false\n").expect("writing copy.yaml");
    let extra = vec!["--config".to_string(), cfg.display().to_string()];
    cluster.add_daemon(false, &extra).await.expect("peer-2");
    let copied = out.join("copied");
    let o = cluster
        .run_dfget(cluster.peer(2), &url, &copied, None)
        .await
        .expect("dfget");
    assert!(o.status.success(), "dfget: {}", stderr(&o));
    assert_eq!(
        file_sha256_hex_async(&copied).await.expect("hash"),
        content.sha256_hex()
    );
    let meta = std::fs::metadata(&copied).expect("output metadata");
    assert_eq!(meta.nlink(), 1, "hard_link: false still linked the output");
    assert!(!inodes_under(&cluster.peer(2).data_dir).contains(&meta.ino()));
}
