//! The same store tests, written once against the `Store` trait, run on SQLite (always) and on
//! a throwaway Postgres cluster (when Debian's postgresql binaries are installed; skipped
//! with a message otherwise).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use damselfly_manager::model::{
    ClusterConfig, ClusterUpdate, DaemonClusterConfig, InstanceKind, InstanceState, JobState,
    NewCluster, NewInstance, NewPersonalAccessToken, NewPreheatJob, PreheatKind, PreheatTarget,
    Scopes, Timestamp, TokenState,
};
use damselfly_manager::store::{SqlStore, Store, StoreError};
use damselfly_manager::testing::PgCluster;

fn instance(cluster_id: u64, host: &str, port: u16) -> NewInstance {
    NewInstance {
        cluster_id,
        hostname: host.into(),
        ip: "10.0.0.1".into(),
        port,
        download_port: 4005,
        idc: "idc-a".into(),
        location: "cn|hz".into(),
    }
}

async fn clusters(store: &dyn Store) {
    let first = store
        .create_cluster(NewCluster {
            name: "one".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(first.is_default, "the first cluster becomes the default");
    assert_eq!(first.config_version, 1);
    let second = store
        .create_cluster(NewCluster {
            name: "two".into(),
            scopes: Scopes {
                idc: "idc-a|idc-b".into(),
                location: "cn|hz".into(),
                cidrs: vec!["10.0.0.0/8".into()],
                hostnames: vec!["web-.*".into()],
            },
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!second.is_default);
    assert_eq!(second.scopes.cidrs, vec!["10.0.0.0/8".to_string()]);
    assert!(matches!(
        store
            .create_cluster(NewCluster {
                name: "two".into(),
                ..Default::default()
            })
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.create_cluster(NewCluster::default()).await,
        Err(StoreError::Invalid(_))
    ));

    let got = store.get_cluster(second.id).await.unwrap().unwrap();
    assert_eq!(got, second);
    assert!(store.get_cluster(9999).await.unwrap().is_none());
    let names: Vec<String> = store
        .list_clusters()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["one", "two"]);

    // Config changes bump the version; other changes do not.
    let config = ClusterConfig {
        daemon: DaemonClusterConfig {
            upload_rate_limit: Some(1 << 20),
            pieces_in_flight: Some(16),
            ..Default::default()
        },
        ..Default::default()
    };
    let updated = store
        .update_cluster(
            second.id,
            ClusterUpdate {
                config: Some(config.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.config_version, 2);
    assert_eq!(updated.config, config);
    let renamed = store
        .update_cluster(
            second.id,
            ClusterUpdate {
                name: Some("deux".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((renamed.name.as_str(), renamed.config_version), ("deux", 2));
    assert!(store
        .update_cluster(9999, ClusterUpdate::default())
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        store
            .update_cluster(
                second.id,
                ClusterUpdate {
                    name: Some("one".into()),
                    ..Default::default()
                }
            )
            .await,
        Err(StoreError::Conflict(_))
    ));

    // Moving the default flag.
    assert!(matches!(
        store
            .update_cluster(
                first.id,
                ClusterUpdate {
                    is_default: Some(false),
                    ..Default::default()
                }
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
    store
        .update_cluster(
            second.id,
            ClusterUpdate {
                is_default: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.default_cluster().await.unwrap().unwrap().id,
        second.id
    );
    assert!(
        !store
            .get_cluster(first.id)
            .await
            .unwrap()
            .unwrap()
            .is_default
    );
    assert!(matches!(
        store.delete_cluster(second.id).await,
        Err(StoreError::Invalid(_))
    ));

    // Deleting a cluster takes its instances along.
    store
        .upsert_instance(
            InstanceKind::Scheduler,
            instance(first.id, "s", 8002),
            Timestamp::now(),
        )
        .await
        .unwrap();
    assert!(store.delete_cluster(first.id).await.unwrap());
    assert!(!store.delete_cluster(first.id).await.unwrap());
    assert!(store
        .list_instances(InstanceKind::Scheduler, None)
        .await
        .unwrap()
        .is_empty());
}

async fn instances(store: &dyn Store) {
    let c = store
        .create_cluster(NewCluster {
            name: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t0 = Timestamp::now();
    for kind in [InstanceKind::Scheduler, InstanceKind::SeedPeer] {
        let a = store
            .upsert_instance(kind, instance(c.id, "a", 8002), t0)
            .await
            .unwrap();
        assert_eq!(a.state, InstanceState::Active);
        assert_eq!(
            (a.hostname.as_str(), a.port, a.download_port),
            ("a", 8002, 4005)
        );
        assert_eq!(a.last_keepalive_at, t0);
        // Same key: same id, fields refreshed.
        let mut again = instance(c.id, "a", 8002);
        again.idc = "idc-z".into();
        let a2 = store.upsert_instance(kind, again, t0).await.unwrap();
        assert_eq!(a2.id, a.id);
        assert_eq!(a2.idc, "idc-z");
        // Another port on the same host is another instance.
        let b = store
            .upsert_instance(kind, instance(c.id, "a", 8003), t0)
            .await
            .unwrap();
        assert_ne!(b.id, a.id);
        assert_eq!(
            store.list_instances(kind, Some(c.id)).await.unwrap().len(),
            2
        );
        assert!(store
            .list_instances(kind, Some(9999))
            .await
            .unwrap()
            .is_empty());
        assert!(store
            .upsert_instance(kind, instance(9999, "x", 1), t0)
            .await
            .is_err());

        // Keepalive and expiry.
        let later = Timestamp(t0.0 + 10_000);
        assert!(store.keepalive(kind, a.id, later).await.unwrap());
        assert!(!store.keepalive(kind, 9999, later).await.unwrap());
        let expired = store
            .expire_instances(Timestamp(t0.0 + 5_000))
            .await
            .unwrap();
        assert_eq!(expired, 1, "b missed its keepalives, a did not");
        let b_now = store.get_instance(kind, b.id).await.unwrap().unwrap();
        assert_eq!(b_now.state, InstanceState::Inactive);
        let a_now = store.get_instance(kind, a.id).await.unwrap().unwrap();
        assert_eq!(a_now.state, InstanceState::Active);
        assert_eq!(a_now.last_keepalive_at, later);
        // A keepalive revives; set_inactive ends it.
        assert!(store.keepalive(kind, b.id, later).await.unwrap());
        assert_eq!(
            store.get_instance(kind, b.id).await.unwrap().unwrap().state,
            InstanceState::Active
        );
        assert!(store.set_inactive(kind, b.id).await.unwrap());
        assert_eq!(
            store.get_instance(kind, b.id).await.unwrap().unwrap().state,
            InstanceState::Inactive
        );
        assert!(store.get_instance(kind, 9999).await.unwrap().is_none());
        // Expire everything for the next kind's counts.
        store
            .expire_instances(Timestamp(later.0 + 1))
            .await
            .unwrap();
    }
}

async fn jobs(store: &dyn Store) {
    let t = Timestamp::now();
    let a = store
        .create_job(
            NewPreheatJob {
                kind: PreheatKind::File,
                url: "http://origin/a".into(),
                cluster_id: None,
                resume_args: r#"{"urls":["http://origin/a"]}"#.into(),
            },
            t,
        )
        .await
        .unwrap();
    assert_eq!(a.state, JobState::Pending);
    assert!(a.targets.is_empty());
    assert_eq!(a.cluster_id, None);
    let b = store
        .create_job(
            NewPreheatJob {
                kind: PreheatKind::Image,
                url: "registry.local/app:1".into(),
                cluster_id: Some(7),
                resume_args: String::new(),
            },
            t,
        )
        .await
        .unwrap();
    assert_eq!(b.kind, PreheatKind::Image);
    assert_eq!(b.cluster_id, Some(7));
    let targets = vec![PreheatTarget {
        url: "http://registry.local/v2/app/blobs/sha256:00".into(),
        digest: "sha256:00".into(),
        state: JobState::Success,
        error: String::new(),
        hosts: Vec::new(),
    }];
    assert!(store
        .update_job(b.id, JobState::Success, &targets, "", Timestamp(t.0 + 1))
        .await
        .unwrap());
    assert!(!store
        .update_job(9999, JobState::Success, &[], "", t)
        .await
        .unwrap());
    let got = store.get_job(b.id).await.unwrap().unwrap();
    assert_eq!(got.state, JobState::Success);
    assert_eq!(got.targets, targets);
    assert_eq!(got.updated_at, Timestamp(t.0 + 1));
    let list = store.list_jobs(10).await.unwrap();
    assert_eq!(
        list.iter().map(|j| j.id).collect::<Vec<_>>(),
        [b.id, a.id],
        "newest first"
    );
    assert_eq!(store.list_jobs(1).await.unwrap().len(), 1);
    let unfinished = store.unfinished_jobs().await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].0.id, a.id);
    assert_eq!(unfinished[0].1, r#"{"urls":["http://origin/a"]}"#);
    assert_eq!(store.fail_unfinished_jobs("restart", t).await.unwrap(), 1);
    let a = store.get_job(a.id).await.unwrap().unwrap();
    assert_eq!((a.state, a.error.as_str()), (JobState::Failure, "restart"));
    assert!(store.get_job(9999).await.unwrap().is_none());
}

async fn settings(store: &dyn Store) {
    assert_eq!(store.get_setting("k").await.unwrap(), None);
    assert!(store.insert_setting("k", "v1").await.unwrap());
    assert!(!store.insert_setting("k", "v2").await.unwrap());
    assert_eq!(store.get_setting("k").await.unwrap().as_deref(), Some("v1"));
}

async fn tokens(store: &dyn Store) {
    let t = Timestamp(1_000);
    let new = |name: &str, hash: &str| NewPersonalAccessToken {
        name: name.into(),
        bio: "for harbor".into(),
        scopes: vec!["job".into()],
        expired_at: Timestamp(5_000),
        token_sha256: hash.into(),
    };
    let a = store.create_token(new("a", "aa"), t).await.unwrap();
    assert_eq!(
        (a.name.as_str(), a.bio.as_str(), a.state),
        ("a", "for harbor", TokenState::Active)
    );
    assert_eq!(a.scopes, ["job"]);
    assert_eq!((a.expired_at, a.created_at), (Timestamp(5_000), t));
    let err = store.create_token(new("b", "aa"), t).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let b = store.create_token(new("b", "bb"), t).await.unwrap();
    assert_eq!(store.token_by_hash("bb").await.unwrap().unwrap().id, b.id);
    assert!(store.token_by_hash("cc").await.unwrap().is_none());
    assert!(store.revoke_token(a.id, Timestamp(2_000)).await.unwrap());
    assert!(!store.revoke_token(9999, t).await.unwrap());
    let a = store.get_token(a.id).await.unwrap().unwrap();
    assert_eq!(
        (a.state, a.updated_at),
        (TokenState::Inactive, Timestamp(2_000))
    );
    let ids: Vec<u64> = store
        .list_tokens()
        .await
        .unwrap()
        .iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, [a.id, b.id]);
    assert!(store.get_token(9999).await.unwrap().is_none());
}

async fn concurrent_keepalives(store: Arc<dyn Store>) {
    let c = store
        .create_cluster(NewCluster {
            name: "busy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        let inst = store
            .upsert_instance(
                InstanceKind::Scheduler,
                instance(c.id, &format!("h{i}"), 8002),
                Timestamp::now(),
            )
            .await
            .unwrap();
        ids.push(inst.id);
    }
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let store = store.clone();
        set.spawn(async move {
            for _ in 0..20 {
                assert!(store
                    .keepalive(InstanceKind::Scheduler, id, Timestamp::now())
                    .await
                    .unwrap());
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Every case, each on a fresh store from `open`.
async fn suite<F, Fut>(open: F)
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    clusters(&*open("clusters").await).await;
    instances(&*open("instances").await).await;
    jobs(&*open("jobs").await).await;
    settings(&*open("settings").await).await;
    tokens(&*open("tokens").await).await;
    concurrent_keepalives(open("concurrent").await).await;
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    suite(|name| {
        let url = format!(
            "sqlite://{}",
            root.join(format!("{name}/manager.db")).display()
        );
        async move { Arc::new(SqlStore::open(&url, 4).await.unwrap()) as Arc<dyn Store> }
    })
    .await;
}

#[tokio::test]
async fn sqlite_file_is_created_and_migrations_run_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/manager.db");
    let url = format!("sqlite://{}", path.display());
    let store = SqlStore::open(&url, 2).await.unwrap();
    assert!(path.is_file());
    store
        .create_cluster(NewCluster {
            name: "kept".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    store.close().await;
    // Reopening applies nothing twice and keeps the data.
    let store = SqlStore::open(&url, 2).await.unwrap();
    assert_eq!(store.list_clusters().await.unwrap()[0].name, "kept");
}

#[test]
fn postgres_store() {
    let cluster = match PgCluster::start() {
        Ok(Some(c)) => c,
        Ok(None) => {
            needs::skip(
                "postgres_store",
                "no Postgres binaries under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)",
            );
            return;
        }
        Err(e) => panic!("postgres binaries are installed but the cluster did not start: {e}"),
    };
    needs::found("postgres_store");
    eprintln!("postgres store tests on 127.0.0.1:{}", cluster.port());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = &cluster;
        suite(|name| async move {
            let url = cluster.create_database(name).await.unwrap();
            Arc::new(SqlStore::open(&url, 4).await.unwrap()) as Arc<dyn Store>
        })
        .await;
        // Migrations are idempotent on Postgres too.
        let url = cluster.create_database("reopen").await.unwrap();
        drop(SqlStore::open(&url, 2).await.unwrap());
        let store = SqlStore::open(&url, 2).await.unwrap();
        assert!(store.list_clusters().await.unwrap().is_empty());
        store.close().await;
    });
    // Pools close before the server stops.
    drop(rt);
}
