//! Running one preheat job: resolving it to targets (the URL, or the image's layer blobs)
//! and dispatching each to a subscribed scheduler, then waiting for the results.

use super::*;

impl Preheater {
    /// Runs job `id` to its end: resolves it, dispatches every target, records the outcome.
    pub(super) async fn run(&self, id: u64, kind: PreheatKind, cluster_id: u64, args: PreheatArgs) {
        let store = self.shared.store.clone();
        let (targets, headers): (Vec<PreheatTarget>, Vec<Vec<(String, String)>>) =
            match self.resolve(kind, &args).await {
                Ok(t) => t.into_iter().unzip(),
                Err(e) => {
                    tracing::warn!(job = id, "preheat resolution failed: {e}");
                    let _ = store
                        .update_job(id, JobState::Failure, &[], &e, Timestamp::now())
                        .await;
                    return;
                }
            };
        let done = Arc::new(Notify::new());
        {
            let mut inner = self.shared.inner.lock().await;
            inner.jobs.insert(
                id,
                RunningJob {
                    targets: targets.clone(),
                    done: done.clone(),
                },
            );
            let _ = store
                .update_job(id, JobState::Running, &targets, "", Timestamp::now())
                .await;
        }
        let deadline = tokio::time::Instant::now() + self.shared.config.dispatch_timeout;
        for (target, headers) in targets.iter().zip(&headers) {
            let request = proto::PreheatRequest {
                job_id: id,
                url: target.url.clone(),
                headers: headers
                    .iter()
                    .map(|(name, value)| proto::Header {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                digest: target.digest.clone(),
                tag: args.tag.clone(),
                application: args.application.clone(),
                scope: args.scope.clone(),
                count: args.count,
                percentage: args.percentage,
                ips: args.ips.clone(),
            };
            if !self.dispatch(cluster_id, request, deadline).await {
                if *self.shared.shutdown.borrow() {
                    // Stopping: the job stays unfinished for the next start to resume.
                    self.shared.inner.lock().await.jobs.remove(&id);
                    tracing::info!(job = id, "manager stopping: job left for the next start");
                    return;
                }
                let _ = self
                    .report(&proto::PreheatResult {
                        job_id: id,
                        url: target.url.clone(),
                        success: false,
                        error: format!("no scheduler of cluster {cluster_id} connected"),
                        hosts: Vec::new(),
                    })
                    .await;
                break;
            }
        }
        let mut shutdown = self.shared.shutdown.clone();
        let stopping = tokio::select! {
            _ = done.notified() => false,
            _ = tokio::time::sleep(args.timeout.unwrap_or(self.shared.config.job_timeout)) => false,
            _ = crate::shutdown_requested(&mut shutdown) => true,
        };
        let mut inner = self.shared.inner.lock().await;
        if let Some(job) = inner.jobs.remove(&id) {
            let (mut state, mut error) = overall(&job.targets);
            if !state.is_final() && stopping {
                // The job stays unfinished in the database: the next start resumes it.
                tracing::info!(job = id, "manager stopping: job left for the next start");
                return;
            }
            if !state.is_final() {
                state = JobState::Failure;
                error = "timed out waiting for seed peers".into();
            }
            let _ = store
                .update_job(id, state, &job.targets, &error, Timestamp::now())
                .await;
            tracing::info!(job = id, state = state.as_str(), "preheat job finished");
        }
    }

    /// Targets of a job, each with the headers of its origin requests: the targets of each
    /// URL or image in order, a blob URL named twice (a base layer shared by two images)
    /// only once.
    async fn resolve(
        &self,
        kind: PreheatKind,
        args: &PreheatArgs,
    ) -> Result<Vec<(PreheatTarget, Vec<(String, String)>)>, String> {
        let mut out: Vec<(PreheatTarget, Vec<(String, String)>)> = Vec::new();
        for url in args.all_urls() {
            for (t, h) in self.resolve_one(kind, args, &url).await? {
                if !out.iter().any(|(o, _)| o.url == t.url) {
                    out.push((t, h));
                }
            }
        }
        Ok(out)
    }

    /// Targets of one URL or image of a job, with their headers.
    async fn resolve_one(
        &self,
        kind: PreheatKind,
        args: &PreheatArgs,
        url: &str,
    ) -> Result<Vec<(PreheatTarget, Vec<(String, String)>)>, String> {
        let target = |url: String, digest: String| PreheatTarget {
            url,
            digest,
            state: JobState::Pending,
            error: String::new(),
            hosts: Vec::new(),
        };
        match kind {
            PreheatKind::File => {
                // A known content digest (given, or in a blob URL) goes with the target: the
                // seed checks the content against it (wire::task::content_digest).
                let digest = wire::task::content_digest(url, &args.digest)
                    .map_err(|e| e.to_string())?
                    .unwrap_or_default();
                Ok(vec![(target(url.to_owned(), digest), args.headers.clone())])
            }
            PreheatKind::Image => {
                let image = ImageRef::parse(url, args.insecure).map_err(|e| e.to_string())?;
                let resolver = Resolver::new(self.shared.config.registry_timeout)
                    .map_err(|e| e.to_string())?;
                let platform = if args.platform.is_empty() {
                    self.shared.config.platform.as_str()
                } else {
                    args.platform.as_str()
                };
                let resolved = resolver
                    .resolve(&image, platform, args.credentials.as_ref())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut headers = args.headers.clone();
                headers.extend(resolved.headers);
                // Every blob a pull fetches through the mirror: the layers, then the config.
                Ok(resolved
                    .layers
                    .into_iter()
                    .chain(resolved.config)
                    .map(|l| (target(l.url, l.digest), headers.clone()))
                    .collect())
            }
        }
    }

    /// Sends one request to a subscribed scheduler of the cluster, waiting for one until
    /// `deadline`; marks the target running. False when none took it in time.
    async fn dispatch(
        &self,
        cluster_id: u64,
        request: proto::PreheatRequest,
        deadline: tokio::time::Instant,
    ) -> bool {
        loop {
            let changed = self.shared.subscribers_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut inner = self.shared.inner.lock().await;
                let mut ids: Vec<u64> = inner
                    .subscribers
                    .iter()
                    .filter(|(_, s)| s.cluster_id == cluster_id)
                    .map(|(id, _)| *id)
                    .collect();
                ids.sort_unstable();
                let start = inner.round_robin;
                inner.round_robin = inner.round_robin.wrapping_add(1);
                for k in 0..ids.len() {
                    let id = ids[(start + k) % ids.len()];
                    let sent = inner
                        .subscribers
                        .get(&id)
                        .is_some_and(|s| s.tx.try_send(Ok(request.clone())).is_ok());
                    if sent {
                        if let Some(t) = inner.jobs.get_mut(&request.job_id).and_then(|j| {
                            j.targets
                                .iter_mut()
                                .find(|t| t.url == request.url && t.state == JobState::Pending)
                        }) {
                            t.state = JobState::Running;
                        }
                        tracing::info!(job = request.job_id, url = %request.url, scheduler = id, "preheat dispatched");
                        return true;
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || *self.shared.shutdown.borrow() {
                return false;
            }
            // Wake on a new subscriber, or re-check a full stream every second.
            let wait = (deadline - now).min(Duration::from_secs(1));
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }
}
