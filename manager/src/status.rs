//! The status page at `/`: clusters, schedulers, seed peers with their live state, and recent
//! preheat jobs. Server-rendered HTML, no script; it reloads itself every 5 seconds.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::model::{Cluster, Instance, InstanceKind, InstanceState, PreheatJob};
use crate::state::ManagerState;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `GET /`.
pub async fn page(State(s): State<Arc<ManagerState>>) -> Response {
    let store = &s.store;
    let data = async {
        Ok::<_, crate::store::StoreError>((
            store.list_clusters().await?,
            store.list_instances(InstanceKind::Scheduler, None).await?,
            store.list_instances(InstanceKind::SeedPeer, None).await?,
            store.list_jobs(s.config.preheat.recent_jobs).await?,
        ))
    }
    .await;
    match data {
        Ok((clusters, schedulers, seed_peers, jobs)) => {
            crate::rest::html(render(&clusters, &schedulers, &seed_peers, &jobs))
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the database: {e}"),
        )
            .into_response(),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:2em}\
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}\
th{background:#f0f0f0}.active{color:#070;font-weight:bold}\
.inactive{color:#a00}.success{color:#070}.failure{color:#a00}";

/// The page's HTML.
pub fn render(
    clusters: &[Cluster],
    schedulers: &[Instance],
    seed_peers: &[Instance],
    jobs: &[PreheatJob],
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>Damselfly manager</title><style>{STYLE}</style></head><body>\
         <h1>Damselfly manager</h1>"
    );
    let cluster_name = |id: u64| {
        clusters
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.name.clone())
            .unwrap_or_else(|| id.to_string())
    };

    let _ = write!(
        h,
        "<h2>Clusters ({})</h2><table id=\"clusters\"><tr><th>id</th><th>name</th>\
         <th>default</th><th>scopes</th><th>config version</th><th>config</th></tr>",
        clusters.len()
    );
    for c in clusters {
        let scopes = serde_json::to_string(&c.scopes).unwrap_or_default();
        let config = serde_json::to_string(&c.config).unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td>\
             <td><code>{}</code></td></tr>",
            c.id,
            escape(&c.name),
            if c.is_default { "yes" } else { "" },
            escape(&scopes),
            c.config_version,
            escape(&config),
        );
    }
    h.push_str("</table>");

    for (title, id, list) in [
        ("Schedulers", "schedulers", schedulers),
        ("Seed peers", "seed-peers", seed_peers),
    ] {
        let active = list
            .iter()
            .filter(|i| i.state == InstanceState::Active)
            .count();
        let _ = write!(
            h,
            "<h2>{title} ({active} active of {})</h2><table id=\"{id}\"><tr><th>id</th>\
             <th>cluster</th><th>hostname</th><th>address</th><th>idc</th><th>location</th>\
             <th>state</th><th>last keepalive</th></tr>",
            list.len()
        );
        for i in list {
            let state = i.state.as_str();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}:{}</td><td>{}</td><td>{}</td>\
                 <td class=\"{state}\">{state}</td><td>{}</td></tr>",
                i.id,
                escape(&cluster_name(i.cluster_id)),
                escape(&i.hostname),
                escape(&i.ip),
                i.port,
                escape(&i.idc),
                escape(&i.location),
                i.last_keepalive_at.rfc3339(),
            );
        }
        h.push_str("</table>");
    }

    let _ = write!(
        h,
        "<h2>Recent preheat jobs</h2><table id=\"jobs\"><tr><th>id</th><th>type</th>\
         <th>url</th><th>cluster</th><th>state</th><th>done</th><th>error</th>\
         <th>created</th></tr>"
    );
    for j in jobs {
        let state = j.state.as_str();
        let done = j.targets.iter().filter(|t| t.state.is_final()).count();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{state}\">{state}</td>\
             <td>{done}/{}</td><td>{}</td><td>{}</td></tr>",
            j.id,
            j.kind.as_str(),
            escape(&j.url),
            escape(&j.cluster_id.map(cluster_name).unwrap_or_default()),
            j.targets.len(),
            escape(&j.error),
            j.created_at.rfc3339(),
        );
        if !j.targets.is_empty() {
            // Each target (layer, config, file) with its digest and outcome.
            let _ = write!(
                h,
                "<tr class=\"targets\"><td></td><td colspan=\"7\"><details><summary>{} targets\
                 </summary><ul>",
                j.targets.len()
            );
            for t in &j.targets {
                let state = t.state.as_str();
                // The hosts that hold it (or failed to), by the job's scope.
                let hosts = if t.hosts.is_empty() {
                    String::new()
                } else {
                    let held = t
                        .hosts
                        .iter()
                        .filter(|x| x.state == crate::model::JobState::Success)
                        .count();
                    let names: Vec<String> = t
                        .hosts
                        .iter()
                        .map(|x| {
                            format!(
                                "{}{}",
                                escape(&x.hostname),
                                if x.state == crate::model::JobState::Success {
                                    ""
                                } else {
                                    " (failed)"
                                }
                            )
                        })
                        .collect();
                    format!(" — on {held}/{} hosts: {}", t.hosts.len(), names.join(", "))
                };
                let _ = write!(
                    h,
                    "<li><span class=\"{state}\">{state}</span> {}{}{}{hosts}</li>",
                    escape(&t.url),
                    if t.digest.is_empty() || t.url.contains(&t.digest) {
                        String::new()
                    } else {
                        format!(" ({})", escape(&t.digest))
                    },
                    if t.error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", escape(&t.error))
                    },
                );
            }
            h.push_str("</ul></details></td></tr>");
        }
    }
    h.push_str("</table></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, PreheatKind, PreheatTarget, Timestamp};

    #[test]
    fn jobs_show_each_target_and_its_state() {
        let target = |url: &str, digest: &str, state, error: &str| PreheatTarget {
            url: url.into(),
            digest: digest.into(),
            state,
            error: error.into(),
            hosts: Vec::new(),
        };
        let on = |name: &str, state| crate::model::TargetHost {
            host_id: name.into(),
            hostname: name.into(),
            ip: "10.0.0.1".into(),
            state,
            error: String::new(),
        };
        let mut spread = target("http://o/x", "", JobState::Failure, "1 of 2 hosts");
        spread.hosts = vec![
            on("seed-1", JobState::Success),
            on("peer-<1>", JobState::Failure),
        ];
        let job = PreheatJob {
            id: 7,
            kind: PreheatKind::Image,
            url: "r.io/a:1".into(),
            cluster_id: None,
            state: JobState::Running,
            targets: vec![
                target(
                    "http://r.io/v2/a/blobs/sha256:aa",
                    "sha256:aa",
                    JobState::Success,
                    "",
                ),
                target(
                    "http://o/<f>",
                    "sha256:bb",
                    JobState::Failure,
                    "origin said 500",
                ),
                spread,
            ],
            error: String::new(),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        };
        let page = render(&[], &[], &[], &[job]);
        assert!(page.contains("<td>3/3</td>"), "{page}");
        assert!(
            page.contains(
                "http://o/x: 1 of 2 hosts — on 1/2 hosts: seed-1, peer-&lt;1&gt; (failed)</li>"
            ),
            "{page}"
        );
        assert!(page.contains(
            "<li><span class=\"success\">success</span> http://r.io/v2/a/blobs/sha256:aa</li>"
        ));
        assert!(page.contains(
            "<li><span class=\"failure\">failure</span> http://o/&lt;f&gt; (sha256:bb): origin said 500</li>"
        ));
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
