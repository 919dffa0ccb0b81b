//! Preheat on the scheduler's side: the task id of a `PreheatRequest` (the one daemons
//! compute), its scope, the wait until the seed (or every chosen host) holds the task, and
//! the `ReportPreheatResult` back to the manager (see the parent module's docs).

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use tracing::{debug, info, warn};
use wire::proto::manager::{PreheatHostResult, PreheatRequest, PreheatResult};
use wire::proto::scheduler::{Header, Host, TaskSource};
use wire::task::TaskIdOptions;
use wire::TaskId;

use super::{new_backoff, next_delay, Ctx};
use crate::service::SchedulerService;
use crate::state::PreheatStatus;

/// How often a running preheat looks at the state.
const PREHEAT_POLL: Duration = Duration::from_millis(100);
/// Attempts to deliver one `ReportPreheatResult`.
const REPORT_ATTEMPTS: u32 = 5;

/// Ends one preheat in the state when dropped (finished, failed, or aborted).
struct PreheatGuard<'a> {
    service: &'a SchedulerService,
    task_id: String,
}

impl Drop for PreheatGuard<'_> {
    fn drop(&mut self) {
        self.service.preheat_finished(&self.task_id);
    }
}

/// The daemon's task id for a preheat request, by the task identity rule
/// ([`TaskId::for_download`]; piece length derived, default filtered query parameters): the
/// content digest's id for a registry blob URL (image layers and config), which is what the
/// registry mirror, `dfget` of the blob URL and `dfcache` ask for; else the id a daemon
/// computes for `dfget <url> --tag … --application …` (with or without `--digest`).
pub fn preheat_task_id(request: &PreheatRequest) -> Result<TaskId, String> {
    TaskId::for_download(
        &request.url,
        &request.digest,
        &TaskIdOptions {
            tag: &request.tag,
            application: &request.application,
            ..TaskIdOptions::default()
        },
    )
    .map_err(|e| format!("preheat of {:?}: {e}", request.url))
}

/// Which hosts a preheat request puts its task on (Dragonfly's scopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreheatScope {
    /// One seed peer fetches it from the origin.
    SingleSeedPeer,
    /// Then every seed peer (or the chosen ones) gets it from peers.
    AllSeedPeers,
    /// Then every host (or the chosen ones) gets it from peers.
    AllPeers,
}

impl PreheatScope {
    /// Parses the request's `scope` (empty: `single_seed_peer`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "single_seed_peer" => Ok(Self::SingleSeedPeer),
            "all_seed_peers" => Ok(Self::AllSeedPeers),
            "all_peers" => Ok(Self::AllPeers),
            other => Err(format!(
                "unknown preheat scope {other:?} (single_seed_peer, all_seed_peers, all_peers)"
            )),
        }
    }
}

fn host_result(h: &Host, outcome: Result<(), String>) -> PreheatHostResult {
    PreheatHostResult {
        host_id: h.id.clone(),
        hostname: h.hostname.clone(),
        ip: h.ip.clone(),
        success: outcome.is_ok(),
        error: outcome.err().unwrap_or_default(),
    }
}

/// Has a seed peer fetch the request's task, then (by the request's scope) the chosen hosts
/// get it from peers; waits (bounded by `manager.preheat_timeout` in all) until each holds
/// it. `Ok` with each host's outcome when the seed got it (the job's target fails if any
/// chosen host did not); `Err` when no seed did.
async fn preheat(ctx: &Ctx, request: &PreheatRequest) -> Result<Vec<PreheatHostResult>, String> {
    let scope = PreheatScope::parse(&request.scope)?;
    let task_id = preheat_task_id(request)?.to_hex();
    let digest = wire::task::content_digest(&request.url, &request.digest)
        .map_err(|e| format!("preheat of {:?}: {e}", request.url))?
        .unwrap_or_default();
    let source = TaskSource {
        url: request.url.clone(),
        headers: request
            .headers
            .iter()
            .map(|h| Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        // The seed peer fetches `url` and checks it against the digest.
        digest,
    };
    let mut status = ctx
        .service
        .preheat(&task_id, source)
        .map_err(|e| e.to_string())?;
    let _guard = PreheatGuard {
        service: &ctx.service,
        task_id: task_id.clone(),
    };
    info!(job_id = request.job_id, url = %request.url, task_id = %task_id, "preheating");
    let deadline = tokio::time::Instant::now() + ctx.config.preheat_timeout;
    loop {
        match status {
            PreheatStatus::Done => break,
            PreheatStatus::Failed(reason) => return Err(reason),
            PreheatStatus::Pending => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no seed peer finished the task within {:?}",
                ctx.config.preheat_timeout
            ));
        }
        tokio::time::sleep(PREHEAT_POLL).await;
        status = ctx.service.preheat_status(&task_id);
    }
    let hosts = match scope {
        PreheatScope::SingleSeedPeer => {
            let holders = ctx.service.holders(&task_id);
            return Ok(holders
                .iter()
                .filter(|h| h.r#type == wire::proto::scheduler::HostType::Seed as i32)
                .take(1)
                .map(|h| host_result(h, Ok(())))
                .collect());
        }
        PreheatScope::AllSeedPeers | PreheatScope::AllPeers => ctx.service.preheat_scope(
            &task_id,
            scope == PreheatScope::AllSeedPeers,
            &request.ips,
            request.count,
            request.percentage,
        ),
    };
    info!(job_id = request.job_id, task_id = %task_id, ?scope, hosts = hosts.len(), "preheat: spreading to the scope's hosts");
    loop {
        let pending = hosts
            .iter()
            .filter(|h| !ctx.service.host_holds(&task_id, &h.id))
            .count();
        if pending == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(PREHEAT_POLL).await;
    }
    Ok(hosts
        .iter()
        .map(|h| {
            let outcome = if ctx.service.host_holds(&task_id, &h.id) {
                Ok(())
            } else {
                Err(format!(
                    "host did not hold the task within {:?}",
                    ctx.config.preheat_timeout
                ))
            };
            host_result(h, outcome)
        })
        .collect())
}

/// Runs one preheat request and reports its outcome to the manager (a few attempts).
pub(super) async fn handle_preheat(ctx: Arc<Ctx>, request: PreheatRequest) {
    let (success, error, hosts) = match preheat(&ctx, &request).await {
        Ok(hosts) => match hosts.iter().filter(|h| !h.success).count() {
            0 => (true, String::new(), hosts),
            n => (
                false,
                format!(
                    "{n} of {} hosts of the scope did not get the task",
                    hosts.len()
                ),
                hosts,
            ),
        },
        Err(e) => (false, e, Vec::new()),
    };
    if success {
        info!(job_id = request.job_id, url = %request.url, hosts = hosts.len(), "preheat done");
    } else {
        warn!(job_id = request.job_id, url = %request.url, "preheat failed: {error}");
    }
    let result = PreheatResult {
        job_id: request.job_id,
        url: request.url.clone(),
        success,
        error,
        hosts,
    };
    let mut backoff = new_backoff();
    for attempt in 1..=REPORT_ATTEMPTS {
        match ctx
            .client
            .clone()
            .report_preheat_result(result.clone())
            .await
        {
            Ok(_) => return,
            Err(status) if status.code() == Code::NotFound => {
                debug!(
                    job_id = request.job_id,
                    "the manager no longer waits for this preheat"
                );
                return;
            }
            Err(status) => {
                debug!(attempt, "reporting a preheat result: {}", status.message());
                tokio::time::sleep(next_delay(&mut backoff)).await;
            }
        }
    }
    warn!(job_id = request.job_id, url = %request.url, "could not report the preheat result to the manager");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use wire::task::TaskIdOptions;

    #[test]
    fn preheat_task_id_is_the_daemons() {
        let request = PreheatRequest {
            url: "http://origin/f?Signature=x".to_owned(),
            tag: "t".to_owned(),
            application: "a".to_owned(),
            ..PreheatRequest::default()
        };
        let expected = TaskId::from_url(
            "http://origin/f",
            &TaskIdOptions {
                tag: "t",
                application: "a",
                ..TaskIdOptions::default()
            },
        )
        .unwrap();
        assert_eq!(preheat_task_id(&request).unwrap(), expected);
        assert!(preheat_task_id(&PreheatRequest {
            url: "not a url".to_owned(),
            ..PreheatRequest::default()
        })
        .is_err());
    }

    /// An image layer's preheat makes the task the registry mirror asks for
    /// (`TaskId::from_content_digest`, as in controlplane's proxy), whatever its URL.
    #[test]
    fn preheat_of_a_layer_is_the_mirrors_task() {
        let digest = format!("sha256:{}", "5a".repeat(32));
        let mirror = TaskId::from_content_digest(&digest);
        let layer = PreheatRequest {
            url: format!("http://127.0.0.1:5000/v2/test/img/blobs/{digest}"),
            digest: digest.clone(),
            ..PreheatRequest::default()
        };
        assert_eq!(preheat_task_id(&layer).unwrap(), mirror);
        // A file preheat's digest is checked by the seed but keeps the URL's task (the one
        // `dfget URL [--digest D]` asks for); a blob URL without a digest is the blob's.
        let file = PreheatRequest {
            url: "http://origin/layer.tar.gz".to_owned(),
            digest: digest.clone(),
            ..PreheatRequest::default()
        };
        assert_eq!(
            preheat_task_id(&file).unwrap(),
            TaskId::from_url("http://origin/layer.tar.gz", &TaskIdOptions::default()).unwrap()
        );
        let bare = PreheatRequest {
            digest: String::new(),
            ..layer.clone()
        };
        assert_eq!(preheat_task_id(&bare).unwrap(), mirror);
        // A digest that contradicts the blob URL is refused.
        let wrong = PreheatRequest {
            digest: format!("sha256:{}", "00".repeat(32)),
            ..layer
        };
        assert!(preheat_task_id(&wrong).is_err());
    }
}
