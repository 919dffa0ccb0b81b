//! Load: 1,000 concurrent downloads on one daemon, each on its own connection to the local
//! API (what 1,000 concurrent `dfget`s do), of a few distinct small files. Every download
//! must succeed with the right bytes, and the daemon must give its file descriptors back.

use futures::StreamExt as _;
use std::path::Path;
use std::time::Duration;
use testkit::content::file_sha256_hex;
use testkit::poll::wait_until;
use testkit::{grpc, Cluster, ClusterOptions, Origin};
use wire::proto::dfdaemon::DownloadRequest;

const CLIENTS: usize = 1000;
const FILES: usize = 5;

fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// One client: connect, `Download`, read the progress stream to the end.
async fn download(socket: &Path, url: String, output: &Path) -> anyhow::Result<()> {
    let mut client = grpc::daemon_client(socket).await?;
    let mut stream = client
        .download(DownloadRequest {
            url,
            output: output.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut done = false;
    while let Some(msg) = stream.next().await {
        done |= msg?.done;
    }
    anyhow::ensure!(done, "the progress stream ended without done");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_downloads_on_one_daemon_all_succeed() {
    let origin = Origin::start().await.expect("origin");
    let cluster = Cluster::start(ClusterOptions {
        seeds: 1,
        peers: 1,
        dfget_timeout: Duration::from_secs(120),
        ..ClusterOptions::default()
    })
    .await
    .expect("starting the cluster");
    let p1 = cluster.peer(1);
    let pid = p1.proc.pid().expect("peer-1 pid");
    let fds_before = open_fds(pid).expect("peer-1 fds");
    let files: Vec<_> = (0..FILES)
        .map(|i| {
            let path = format!("/load-{i}.bin");
            let c = origin.add_file(&path, (64 << 10) + i as u64 * 1000, 60 + i as u64);
            (origin.url(&path), c)
        })
        .collect();
    let out = cluster.dir().join("out");
    std::fs::create_dir_all(&out).expect("output dir");

    let jobs = (0..CLIENTS).map(|i| {
        let (url, c) = files[i % FILES].clone();
        let output = out.join(format!("{i}.out"));
        let socket = p1.socket.clone();
        tokio::spawn(async move {
            download(&socket, url, &output).await?;
            let got = file_sha256_hex(&output)?;
            anyhow::ensure!(
                got == c.sha256_hex(),
                "client {i}: wrong bytes in {}",
                output.display()
            );
            anyhow::Ok(())
        })
    });
    let results = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(jobs))
        .await
        .expect("1,000 downloads did not finish within 120 s");
    let failures: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("client {i}: {e:#}")),
            Err(e) => Some(format!("client {i} panicked: {e}")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} downloads failed; first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(p1.is_running(), "peer-1 died under load");
    let requests = origin.gets_of("/load-0.bin");
    assert!(
        requests <= 2,
        "{CLIENTS} clients of {FILES} files: each file should be fetched about once, \
         /load-0.bin was fetched {requests} times"
    );
    // The connections are closed: the daemon's descriptors come back down.
    wait_until(
        "peer-1's open fds return near their level before the load",
        Duration::from_secs(20),
        || async move { Ok(open_fds(pid)? <= fds_before + 32) },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {} fds now, {fds_before} before",
            open_fds(pid).unwrap_or(0)
        )
    });
}
