//! The manager over its real interfaces: REST with an HTTP client, gRPC with the generated
//! client, against a manager on 127.0.0.1:0 with SQLite in a temp dir.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{eventually, grpc, manager, Rest, BOUND, TOKEN};
use damselfly_manager::proto;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn rest_writes_need_the_token() {
    let (m, _dir) = manager(|_| {}).await;
    let rest = Rest::new(&m);
    assert_eq!(rest.text("/healthy").await, (200, "OK".to_string()));

    let body = json!({"name": "east", "scopes": {"idc": "east-1"}});
    let (status, _) = rest
        .call(Method::POST, "/api/v1/clusters", None, Some(body.clone()))
        .await;
    assert_eq!(status, 401);
    let (status, _) = rest
        .call(
            Method::POST,
            "/api/v1/clusters",
            Some("wrong"),
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 401);
    let (status, created) = rest
        .call(
            Method::POST,
            "/api/v1/clusters",
            Some(TOKEN),
            Some(body.clone()),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_u64().unwrap();
    assert_eq!(created["scopes"]["idc"], "east-1");
    assert_eq!(created["config_version"], 1);
    assert_eq!(
        created["is_default"], false,
        "the manager made `default` first"
    );

    // Reads are open.
    let (status, list) = rest.get("/api/v1/clusters").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "east"]);
    assert_eq!(rest.get(&format!("/api/v1/clusters/{id}")).await.0, 200);
    assert_eq!(rest.get("/api/v1/clusters/999").await.0, 404);

    // Conflicts and bad input.
    let (status, _) = rest
        .call(Method::POST, "/api/v1/clusters", Some(TOKEN), Some(body))
        .await;
    assert_eq!(status, 409);
    let (status, err) = rest
        .call(
            Method::POST,
            "/api/v1/clusters",
            Some(TOKEN),
            Some(json!({"name": "bad", "scopes": {"cidrs": ["10.0.0.0/99"]}})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(err["message"].as_str().unwrap().contains("CIDR"));
    let (status, _) = rest
        .call(
            Method::POST,
            "/api/v1/clusters",
            Some(TOKEN),
            Some(json!({"name": "x", "unknown": 1})),
        )
        .await;
    assert!(
        (400..500).contains(&status),
        "unknown field refused: {status}"
    );

    // Config update: 401 without token, bumps the version with it.
    let path = format!("/api/v1/clusters/{id}/config");
    let config = json!({"daemon": {"download_rate_limit": 1048576}});
    let (status, _) = rest
        .call(Method::PUT, &path, None, Some(config.clone()))
        .await;
    assert_eq!(status, 401);
    let (status, v) = rest
        .call(Method::PUT, &path, Some(TOKEN), Some(config))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], 2);
    let (_, v) = rest.get(&path).await;
    assert_eq!(v["config"]["daemon"]["download_rate_limit"], 1048576);

    // PATCH and DELETE.
    let cpath = format!("/api/v1/clusters/{id}");
    let patch = json!({"name": "east-renamed"});
    assert_eq!(
        rest.call(Method::PATCH, &cpath, None, Some(patch.clone()))
            .await
            .0,
        401
    );
    let (status, c) = rest
        .call(Method::PATCH, &cpath, Some(TOKEN), Some(patch))
        .await;
    assert_eq!((status, c["name"].as_str()), (200, Some("east-renamed")));
    assert_eq!(rest.call(Method::DELETE, &cpath, None, None).await.0, 401);
    assert_eq!(
        rest.call(Method::DELETE, &cpath, Some(TOKEN), None).await.0,
        204
    );
    assert_eq!(rest.get(&cpath).await.0, 404);

    // Job creation is a write too.
    let job = json!({"type": "preheat", "args": {"url": "http://origin/f"}});
    assert_eq!(
        rest.call(Method::POST, "/api/v1/jobs", None, Some(job))
            .await
            .0,
        401
    );
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn generated_token_is_printed_once_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let config = |url: &str| {
        let mut c = damselfly_manager::Config::default();
        c.server.grpc = "127.0.0.1:0".parse().unwrap();
        c.server.rest = "127.0.0.1:0".parse().unwrap();
        c.database.url = url.to_owned();
        c
    };
    let m = damselfly_manager::start(config(&url)).await.unwrap();
    let token = m
        .generated_token
        .clone()
        .expect("first start generates a token");
    m.shutdown().await.unwrap();

    let m = damselfly_manager::start(config(&url)).await.unwrap();
    assert!(
        m.generated_token.is_none(),
        "only the first start prints one"
    );
    let rest = Rest::new(&m);
    let body = json!({"name": "c"});
    assert_eq!(
        rest.call(Method::POST, "/api/v1/clusters", None, Some(body.clone()))
            .await
            .0,
        401
    );
    assert_eq!(
        rest.call(Method::POST, "/api/v1/clusters", Some(&token), Some(body))
            .await
            .0,
        201
    );
    m.shutdown().await.unwrap();
}

async fn create_cluster(rest: &Rest, body: serde_json::Value) -> u64 {
    let (status, c) = rest
        .call(Method::POST, "/api/v1/clusters", Some(TOKEN), Some(body))
        .await;
    assert_eq!(status, 201, "{c}");
    c["id"].as_u64().unwrap()
}

fn scheduler(cluster_id: u64, hostname: &str, port: u32) -> proto::RegisterSchedulerRequest {
    proto::RegisterSchedulerRequest {
        cluster_id,
        hostname: hostname.into(),
        ip: "127.0.0.1".into(),
        port,
        idc: String::new(),
        location: String::new(),
    }
}

fn host(ip: &str, idc: &str, location: &str, hostname: &str) -> proto::ListSchedulersRequest {
    proto::ListSchedulersRequest {
        source_type: proto::SourceType::Peer as i32,
        host: Some(proto::HostInfo {
            hostname: hostname.into(),
            ip: ip.into(),
            idc: idc.into(),
            location: location.into(),
        }),
    }
}

#[tokio::test]
async fn searcher_picks_cluster_by_cidr_idc_location_hostname() {
    let (m, _dir) = manager(|_| {}).await;
    let rest = Rest::new(&m);
    let mut client = grpc(&m).await;
    let by_cidr = create_cluster(
        &rest,
        json!({"name": "cidr", "scopes": {"cidrs": ["10.1.0.0/16"]}}),
    )
    .await;
    let by_idc = create_cluster(
        &rest,
        json!({"name": "idc", "scopes": {"idc": "idc-a|idc-b"}}),
    )
    .await;
    let by_location = create_cluster(
        &rest,
        json!({"name": "loc", "scopes": {"location": "cn|hz"}}),
    )
    .await;
    let by_host = create_cluster(
        &rest,
        json!({"name": "host", "scopes": {"hostnames": ["build-\\d+"]}}),
    )
    .await;
    let empty = create_cluster(&rest, json!({"name": "empty", "scopes": {"idc": "idc-z"}})).await;
    let default = 1;
    let mut port = 9000;
    for c in [by_cidr, by_idc, by_location, by_host, default] {
        port += 1;
        let r = client
            .register_scheduler(scheduler(c, &format!("sched-{c}"), port))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.cluster_id, c);
        assert_eq!(r.keepalive_interval_ms, 5000);
    }
    // A seed peer shows up with its cluster's schedulers.
    client
        .register_seed_peer(proto::RegisterSeedPeerRequest {
            cluster_id: by_idc,
            hostname: "seed".into(),
            ip: "127.0.0.1".into(),
            port: 4000,
            download_port: 4005,
            idc: "idc-a".into(),
            location: String::new(),
        })
        .await
        .unwrap();

    let pick = |req: proto::ListSchedulersRequest| {
        let mut client = client.clone();
        async move { client.list_schedulers(req).await.unwrap().into_inner() }
    };
    let r = pick(host("10.1.2.3", "idc-a", "cn|hz", "build-1")).await;
    assert_eq!(r.cluster_id, by_cidr, "CIDR first");
    assert_eq!(r.schedulers.len(), 1);
    assert_eq!(r.schedulers[0].hostname, format!("sched-{by_cidr}"));
    assert_eq!(r.schedulers[0].state, proto::InstanceState::Active as i32);
    let r = pick(host("192.168.1.1", "idc-b", "cn|hz", "build-1")).await;
    assert_eq!(r.cluster_id, by_idc, "then IDC");
    assert_eq!(r.seed_peers.len(), 1);
    assert_eq!(r.seed_peers[0].download_port, 4005);
    let r = pick(host("192.168.1.1", "idc-x", "cn|hz|xihu", "build-1")).await;
    assert_eq!(r.cluster_id, by_location, "then location prefix");
    let r = pick(host("192.168.1.1", "", "us", "build-42")).await;
    assert_eq!(r.cluster_id, by_host, "then hostname");
    let r = pick(host("192.168.1.1", "idc-z", "", "web")).await;
    assert_eq!(
        r.cluster_id, default,
        "a matching cluster without active schedulers is skipped for the default"
    );
    let _ = empty;

    // GetConfig by host uses the same searcher.
    let cfg = client
        .get_config(proto::GetConfigRequest {
            source_type: proto::SourceType::Peer as i32,
            target: Some(proto::get_config_request::Target::Host(proto::HostInfo {
                ip: "10.1.9.9".into(),
                ..Default::default()
            })),
            known_version: 0,
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cfg.cluster_id, by_cidr);
    m.shutdown().await.unwrap();
}

async fn scheduler_state(rest: &Rest, id: u64) -> String {
    let (_, list) = rest.get("/api/v1/schedulers").await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_u64() == Some(id))
        .map(|s| s["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn missed_keepalives_and_closed_streams_mark_inactive() {
    let (m, _dir) = manager(|c| {
        c.keepalive.interval = Duration::from_millis(50);
        c.keepalive.timeout = Duration::from_millis(1000);
    })
    .await;
    let rest = Rest::new(&m);
    let mut client = grpc(&m).await;
    let a = client
        .register_scheduler(scheduler(0, "a", 8002))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .register_scheduler(scheduler(0, "b", 8003))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.keepalive_interval_ms, 50);
    assert_eq!(scheduler_state(&rest, a.id).await, "active");

    // Unknown ids are refused so that the client registers again.
    let unknown = client
        .keep_alive(tokio_stream::iter(vec![proto::KeepAliveRequest {
            source_type: proto::SourceType::Scheduler as i32,
            id: 999,
        }]))
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    // `a` keeps sending; `b` opens a stream, sends once, then goes silent (a hung client).
    let (a_tx, a_rx) = tokio::sync::mpsc::channel(4);
    let mut a_client = client.clone();
    let a_stream = tokio::spawn(async move {
        a_client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(a_rx))
            .await
    });
    let (b_tx, b_rx) = tokio::sync::mpsc::channel(4);
    let mut b_client = client.clone();
    let b_stream = tokio::spawn(async move {
        b_client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(b_rx))
            .await
    });
    b_tx.send(proto::KeepAliveRequest {
        source_type: proto::SourceType::Scheduler as i32,
        id: b.id,
    })
    .await
    .unwrap();
    let a_id = a.id;
    let feeder = tokio::spawn(async move {
        loop {
            if a_tx
                .send(proto::KeepAliveRequest {
                    source_type: proto::SourceType::Scheduler as i32,
                    id: a_id,
                })
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        a_tx
    });

    eventually("silent b is marked inactive", || async {
        scheduler_state(&rest, b.id).await == "inactive"
    })
    .await;
    // `a` keeps its keepalives (eventually: a stalled machine may let it flap).
    let mut listing = client.clone();
    eventually("only active a is listed", || {
        let mut c = listing.clone();
        async move {
            let list = c
                .list_schedulers(host("127.0.0.1", "", "", ""))
                .await
                .unwrap()
                .into_inner();
            list.schedulers.iter().map(|s| s.id).collect::<Vec<_>>() == [a.id]
        }
    })
    .await;
    let _ = &mut listing;

    // Ending a's stream marks it inactive at once.
    feeder.abort();
    let _ = feeder.await;
    a_stream.await.unwrap().unwrap();
    eventually("a is inactive after its stream ended", || async {
        scheduler_state(&rest, a.id).await == "inactive"
    })
    .await;

    // The status page shows them.
    let (status, page) = rest.text("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<table id=\"schedulers\">"));
    assert!(page.contains(">a<") && page.contains(">b<"));

    drop(b_tx);
    let _ = b_stream.await;
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn config_change_wakes_a_waiting_get_config() {
    // No periodic recheck and no deadline within the test's bound: only the change's wake-up
    // can answer the waiting call.
    let (m, _dir) = manager(|c| {
        c.config.recheck_interval = Duration::from_secs(3600);
        c.config.max_wait = Duration::from_secs(3600);
    })
    .await;
    let rest = Rest::new(&m);
    let mut client = grpc(&m).await;
    let request = |known_version, wait_ms| proto::GetConfigRequest {
        source_type: proto::SourceType::Scheduler as i32,
        target: Some(proto::get_config_request::Target::ClusterId(1)),
        known_version,
        wait_ms,
    };
    let first = client.get_config(request(0, 0)).await.unwrap().into_inner();
    assert_eq!((first.cluster_id, first.version), (1, 1));
    let daemon = first.config.unwrap().daemon.unwrap();
    assert_eq!(daemon.download_rate_limit, None);

    // A short wait with no change answers with the same version.
    let same = client
        .get_config(request(1, 50))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.version, 1);

    // A long wait is answered by the REST change.
    let mut waiting_client = client.clone();
    let waiter = tokio::spawn(async move {
        waiting_client
            .get_config(request(1, 60_000))
            .await
            .map(|r| r.into_inner())
    });
    // The change comes only once the call is parked on the manager (a version already newer
    // would answer at once, without any wake-up).
    let state = m.state.clone();
    eventually("the GetConfig call is parked", || {
        let state = state.clone();
        async move { state.config_waiters() == 1 }
    })
    .await;
    let (status, v) = rest
        .call(
            Method::PUT,
            "/api/v1/clusters/1/config",
            Some(TOKEN),
            Some(json!({
                "daemon": {"download_rate_limit": 2097152, "pieces_in_flight": 4},
                "scheduler": {"candidate_parent_limit": 2}
            })),
        )
        .await;
    assert_eq!((status, v["version"].as_u64()), (200, Some(2)));
    let got = tokio::time::timeout(BOUND, waiter)
        .await
        .expect("the waiting GetConfig returns after the change")
        .unwrap()
        .unwrap();
    assert_eq!(got.version, 2);
    let config = got.config.unwrap();
    let daemon = config.daemon.unwrap();
    assert_eq!(daemon.download_rate_limit, Some(2_097_152));
    assert_eq!(daemon.pieces_in_flight, Some(4));
    assert_eq!(daemon.upload_rate_limit, None);
    assert_eq!(config.scheduler.unwrap().candidate_parent_limit, Some(2));

    // Unknown cluster.
    let err = client
        .get_config(proto::GetConfigRequest {
            target: Some(proto::get_config_request::Target::ClusterId(77)),
            ..request(0, 0)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    // No periodic recheck and no deadline within the test's bound: only the shutdown can end
    // the waiting GetConfig.
    let (m, _dir) = manager(|c| {
        c.config.recheck_interval = Duration::from_secs(3600);
        c.config.max_wait = Duration::from_secs(3600);
    })
    .await;
    let mut client = grpc(&m).await;
    let s = client
        .register_scheduler(scheduler(0, "s", 8002))
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(proto::KeepAliveRequest {
        source_type: proto::SourceType::Scheduler as i32,
        id: s.id,
    })
    .await
    .unwrap();
    let mut ka = client.clone();
    let keepalive = tokio::spawn(async move {
        ka.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut preheat = client
        .subscribe_preheat(proto::SubscribePreheatRequest { scheduler_id: s.id })
        .await
        .unwrap()
        .into_inner();
    let mut waiting = client.clone();
    let get_config = tokio::spawn(async move {
        waiting
            .get_config(proto::GetConfigRequest {
                target: Some(proto::get_config_request::Target::ClusterId(0)),
                known_version: 1,
                wait_ms: 600_000,
                ..Default::default()
            })
            .await
    });
    // Shutdown comes only once both long-lived calls are open on the manager.
    let state = m.state.clone();
    eventually(
        "the keepalive stream and the GetConfig call are open",
        || {
            let state = state.clone();
            async move { state.open_streams() == 1 && state.config_waiters() == 1 }
        },
    )
    .await;
    tokio::time::timeout(BOUND, m.shutdown())
        .await
        .expect("shutdown finishes with streams open")
        .unwrap();
    // Each call ended because of the shutdown, and says so.
    let keepalive = tokio::time::timeout(BOUND, keepalive)
        .await
        .expect("keepalive ended")
        .unwrap();
    assert_eq!(
        keepalive
            .expect_err("a keepalive ended by shutdown is an error")
            .code(),
        tonic::Code::Unavailable
    );
    let config = tokio::time::timeout(BOUND, get_config)
        .await
        .expect("get_config ended")
        .unwrap()
        .expect("a waiting GetConfig is answered at shutdown");
    assert_eq!(config.into_inner().version, 1);
    assert_eq!(state.config_waiters(), 0);
    let end = tokio::time::timeout(BOUND, preheat.message())
        .await
        .expect("preheat ended");
    assert!(!matches!(end, Ok(Some(_))));
    drop(tx);
}
