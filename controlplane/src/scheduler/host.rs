//! The host announcement stream to one scheduler: keeps this host known (reconnecting with
//! jittered backoff), re-announces held tasks each time it is established, and hands the
//! commands it delivers (seed triggers, preheats) to [`HostCommands`].

use super::{HostCommands, SchedulerClient};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use wire::proto::scheduler::{
    host_command, scheduler_client::SchedulerClient as Grpc, AnnounceHostRequest,
};

/// First wait before announcing this host to a scheduler again (jittered, doubling).
const HOST_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between tries to announce this host to a scheduler (before jitter).
const HOST_RETRY_MAX: Duration = Duration::from_secs(2);

/// Keeps this host announced to the scheduler at `addr`, reconnecting with jittered backoff,
/// and runs the commands it receives through `commands`. Runs until aborted.
pub(crate) async fn host_loop(
    client: Arc<SchedulerClient>,
    commands: Arc<dyn HostCommands>,
    addr: String,
    channel: Channel,
) {
    let new_backoff = || damselfly_common::reconnect_backoff(HOST_RETRY_MIN, HOST_RETRY_MAX);
    let mut backoff = new_backoff();
    let mut last_error: Option<String> = None;
    loop {
        let mut grpc = Grpc::new(channel.clone());
        let req = AnnounceHostRequest {
            host: Some(client.host.clone()),
        };
        match grpc.announce_host(req).await {
            Ok(resp) => {
                last_error = None;
                tracing::info!("announced host {} to scheduler {addr}", client.host.id);
                backoff = new_backoff();
                announce_held_tasks(&client, commands.as_ref(), &addr, &channel);
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(cmd)) => {
                            handle_command(&client, commands.as_ref(), &addr, &channel, cmd.command)
                        }
                        Ok(None) => {
                            tracing::warn!("scheduler {addr} closed the host stream");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "host stream to scheduler {addr} failed: {}",
                                e.message()
                            );
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                // Said once per distinct error (a TLS rejection repeats at every retry).
                let mut why = error_chain(&e);
                // With TLS 1.3 the server checks the client certificate after the client's
                // side of the handshake is done: the refusal may arrive as a fatal alert or
                // only as a closed connection, depending on timing.
                if client.tls.is_some() && why.contains("transport error") && !why.contains("alert")
                {
                    why.push_str(
                        " (TLS: the scheduler may have refused this host's certificate; its log says why)",
                    );
                }
                if last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!("announcing host to scheduler {addr} failed: {why}");
                    last_error = Some(why);
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(HOST_RETRY_MAX)).await;
    }
}

/// A status's message followed by its sources (a transport error says why only there, e.g.
/// which certificate check failed).
pub fn error_chain(status: &tonic::Status) -> String {
    let mut s = status.message().to_string();
    let mut src = std::error::Error::source(status);
    while let Some(e) = src {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = e.source();
    }
    s
}

/// Runs a command from the scheduler at `addr`; a trigger for a task this host already
/// holds completely is answered with `AnnounceTask` there instead of a download.
fn handle_command(
    client: &Arc<SchedulerClient>,
    commands: &dyn HostCommands,
    addr: &str,
    channel: &Channel,
    cmd: Option<host_command::Command>,
) {
    match cmd {
        Some(host_command::Command::DownloadTask(t)) => {
            if let Some((id, layout)) = commands.download(addr, t) {
                let c = client.clone();
                let (addr, channel) = (addr.to_owned(), channel.clone());
                tokio::spawn(
                    async move { c.announce_complete_to(addr, channel, id, layout).await },
                );
            }
        }
        None => tracing::debug!("empty host command"),
    }
}

/// Announces to the scheduler at `addr` every complete task it is the scheduler of and that
/// no finished download keeps registered (tasks restored after a restart, or whose stream
/// ended): each time the host stream is (re)established, since such announcements last as
/// long as the host stream.
fn announce_held_tasks(
    client: &Arc<SchedulerClient>,
    commands: &dyn HostCommands,
    addr: &str,
    channel: &Channel,
) {
    let pool = client.pool();
    for (id, layout) in commands.held_tasks() {
        if pool.pick(&id).is_some_and(|(a, _)| a == addr) {
            tracing::info!(task = %id, "announcing a held task to {addr}");
            let c = client.clone();
            let (addr, channel) = (addr.to_owned(), channel.clone());
            tokio::spawn(async move { c.announce_complete_to(addr, channel, id, layout).await });
        }
    }
}
