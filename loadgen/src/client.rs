//! The gRPC side: starting a scheduler process, connections, and one stream per virtual
//! peer whose responses flow into one queue read by the simulation.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};
use wire::proto::scheduler::scheduler_client::SchedulerClient;
use wire::proto::scheduler::{
    AnnounceHostRequest, AnnouncePeerRequest, AnnouncePeerResponse, Host, HostCommand,
};

/// Something that arrived from the scheduler, stamped on arrival.
#[derive(Debug)]
pub enum Inbound {
    /// A message on the stream of virtual peer `peer`.
    Peer {
        /// Index of the virtual peer.
        peer: u32,
        /// The message.
        response: AnnouncePeerResponse,
        /// When it was read off the stream.
        at: Instant,
    },
    /// The stream of `peer` ended (`error` says why, if it was not clean).
    PeerClosed {
        /// Index of the virtual peer.
        peer: u32,
        /// Status message, if any.
        error: Option<String>,
    },
    /// A command on the seed host's stream.
    Host(HostCommand),
}

/// A scheduler process started by us; killed on drop.
#[derive(Debug)]
pub struct SchedulerProcess {
    child: Child,
    /// Address it listens on.
    pub addr: SocketAddr,
    /// Address of its Prometheus endpoint (`/metrics`), when it reported one.
    pub metrics: Option<SocketAddr>,
}

impl SchedulerProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scheduler` next to this executable (target/<profile>/scheduler).
pub fn default_scheduler_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the loadgen executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("loadgen executable has no parent directory"))?;
    let path = dir.join("scheduler");
    if !path.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p damselfly-scheduler) or pass --scheduler ADDR",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `binary --listen 127.0.0.1:0 [--config config] [--worker-threads N]` (under
/// `taskset -c 0` when `pin_cpu0`) and waits for its listen line. Its stderr keeps being drained (warnings are
/// echoed) so that it never blocks.
pub fn spawn_scheduler(
    binary: &PathBuf,
    config: Option<&PathBuf>,
    pin_cpu0: bool,
    worker_threads: Option<usize>,
) -> anyhow::Result<SchedulerProcess> {
    let mut cmd = if pin_cpu0 {
        // taskset execs the scheduler: the child's pid stays the scheduler's.
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(binary);
        c
    } else {
        Command::new(binary)
    };
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--metrics")
        .arg("127.0.0.1:0");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    if let Some(n) = worker_threads {
        cmd.arg("--worker-threads").arg(n.to_string());
    }
    cmd.env("RUST_LOG", "warn,damselfly_scheduler=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("scheduler stderr not captured"))?;
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let mut echoed = 0usize;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("scheduler listening on ").nth(1) {
                let _ = tx.send((false, rest.trim().to_owned()));
            } else if let Some(rest) = line.split("metrics on http://").nth(1) {
                let addr = rest.trim().trim_end_matches("/metrics").to_owned();
                let _ = tx.send((true, addr));
            } else if line.contains("WARN") || line.contains("ERROR") {
                echoed += 1;
                if echoed <= 20 {
                    eprintln!("scheduler: {line}");
                } else if echoed == 21 {
                    eprintln!("scheduler: (further warnings not shown)");
                }
            }
        }
    });
    let mut process = SchedulerProcess {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics: None,
    };
    // The metrics line comes first (the endpoint is bound before the gRPC listener).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (is_metrics, line) = rx
            .recv_timeout(left)
            .map_err(|_| anyhow!("scheduler did not report its listen address within 20 s"))?;
        if is_metrics {
            process.metrics = line.parse().ok();
            continue;
        }
        process.addr = line
            .parse()
            .with_context(|| format!("scheduler listen address {line:?}"))?;
        return Ok(process);
    }
}

/// `count` HTTP/2 connections to `addr`.
pub async fn connect(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .initial_connection_window_size(Some(16 << 20))
            .initial_stream_window_size(Some(1 << 20));
        channels.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to the scheduler at {addr}"))?,
        );
    }
    Ok(channels)
}

/// Opens the `AnnouncePeer` stream of virtual peer `peer`; returns the sender for its
/// requests. Responses go to `inbound`.
pub fn open_peer(
    rt: &tokio::runtime::Handle,
    channel: Channel,
    peer: u32,
    inbound: mpsc::UnboundedSender<Inbound>,
) -> mpsc::UnboundedSender<Box<AnnouncePeerRequest>> {
    // Boxed: a channel allocates 32 slots when it is made, and 32 unboxed registrations
    // (~300 bytes each) per virtual peer were ~100 MB of page faults for 10,000 peers.
    let (tx, rx) = mpsc::unbounded_channel::<Box<AnnouncePeerRequest>>();
    rt.spawn(async move {
        let mut client = SchedulerClient::new(channel);
        let mut stream = match client
            .announce_peer(UnboundedReceiverStream::new(rx).map(|r| *r))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let _ = inbound.send(Inbound::PeerClosed {
                    peer,
                    error: Some(status.to_string()),
                });
                return;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    let at = Instant::now();
                    if inbound.send(Inbound::Peer { peer, response, at }).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = inbound.send(Inbound::PeerClosed { peer, error: None });
                    return;
                }
                Err(status) => {
                    let _ = inbound.send(Inbound::PeerClosed {
                        peer,
                        error: Some(status.to_string()),
                    });
                    return;
                }
            }
        }
    });
    tx
}

/// Opens the seed host's `AnnounceHost` stream; its commands go to `inbound`.
pub async fn announce_host(
    channel: Channel,
    host: Host,
    inbound: mpsc::UnboundedSender<Inbound>,
) -> anyhow::Result<()> {
    let mut client = SchedulerClient::new(channel);
    let mut stream = client
        .announce_host(AnnounceHostRequest { host: Some(host) })
        .await
        .context("AnnounceHost")?
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(command)) = stream.message().await {
            if inbound.send(Inbound::Host(command)).is_err() {
                return;
            }
        }
    });
    Ok(())
}
