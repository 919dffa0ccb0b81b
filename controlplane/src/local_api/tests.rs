//! Unit tests of the local API, calling the service methods directly (no socket): request
//! validation, the answer to a failed download (its `DownloadError`'s gRPC code), delivery
//! of a held task, and the dfcache calls. The downloads run against in-memory schedulers,
//! data plane and origin over a real `Storage` and `MetaStore` in a temporary directory.

use super::*;
use crate::cache::tests::{failed, info, FakeSchedulers as FakeCacheSchedulers};
use crate::origin::OriginError;
use crate::retention::tests::{Disk, FakeRuns, FakeSchedulers as FakeLeave};
use crate::retention::Retention;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tonic::Code;
use wire::proto::dfdaemon::{ByteRange as ProtoRange, ObjectStorage};
use wire::PieceLayout;

const URL: &str = "http://origin.test/data.bin";

/// What the fake origin serves: 3 pieces of 16 KiB, the last one short.
fn content() -> Vec<u8> {
    (0..(2 * (16 << 10) + 100))
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

struct Fixture {
    disk: Disk,
    api: LocalApi,
    cache_schedulers: Arc<FakeCacheSchedulers>,
}

/// A local API whose downloads use an origin that serves [`content`] (or fails with
/// `fail`) and no scheduler; dfcache asks `cache_schedulers`.
fn fixture(fail: Option<fn() -> OriginError>, cache_schedulers: FakeCacheSchedulers) -> Fixture {
    let disk = Disk::new();
    let services =
        crate::task::tests::fake_services(disk.storage.clone(), disk.meta.clone(), content(), fail);
    let tasks = Arc::new(TaskManager::new(services));
    let cache_schedulers = Arc::new(cache_schedulers);
    let retention = Arc::new(Retention::new(
        disk.storage.clone(),
        disk.meta.clone(),
        Arc::new(FakeRuns::default()),
        Arc::new(FakeLeave::default()),
    ));
    let cache = Arc::new(DfCache {
        storage: disk.storage.clone(),
        meta: disk.meta.clone(),
        schedulers: cache_schedulers.clone(),
        retention,
        piece_length_min: wire::piece::MIN_PIECE_LENGTH,
        piece_length_max: 64 << 20,
    });
    let schedulers =
        Arc::new(SchedulerClient::new(Default::default(), &[], None).expect("scheduler client"));
    let api = LocalApi {
        hard_link: false,
        pieces_in_flight: 16,
        tasks,
        storage: disk.storage.clone(),
        cache,
        schedulers,
        counters: Arc::new(Counters::default()),
        shaping: Arc::new(Shaping::new(Default::default())),
        config_version: Arc::default(),
    };
    Fixture {
        disk,
        api,
        cache_schedulers,
    }
}

impl Fixture {
    fn output(&self, name: &str) -> String {
        self.disk._dir.path().join(name).display().to_string()
    }

    /// Every message of a `Download` call, up to and with the first error.
    async fn download(&self, req: DownloadRequest) -> Result<Vec<DownloadProgress>, Status> {
        let mut stream = self.api.download(Request::new(req)).await?.into_inner();
        let mut out = Vec::new();
        let guard = std::time::Duration::from_secs(20);
        while let Some(item) = tokio::time::timeout(guard, stream.next())
            .await
            .expect("the download stream hung")
        {
            out.push(item?);
        }
        Ok(out)
    }

    /// Stores [`content`] completely as the task of `URL`.
    fn hold(&self) -> TaskId {
        let id = TaskId::for_download(URL, "", &TaskIdOptions::default()).expect("id");
        let data = content();
        let layout = PieceLayout::new(data.len() as u64, 16 << 10).expect("layout");
        let store = self.disk.storage.create(id, layout).expect("create");
        for (n, piece) in data.chunks(16 << 10).enumerate() {
            store
                .write_piece(n as u32, piece, wire::piece_crc(piece))
                .expect("write");
        }
        id
    }
}

fn request(url: &str, output: String) -> DownloadRequest {
    DownloadRequest {
        url: url.into(),
        output,
        ..DownloadRequest::default()
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[tokio::test]
async fn bad_download_requests_are_invalid_arguments_and_start_nothing() {
    let f = fixture(None, FakeCacheSchedulers::default());
    let out = f.output("out");
    let ok = || request(URL, out.clone());
    let cases: Vec<(DownloadRequest, &str)> = vec![
        (request(URL, "relative/out".into()), "absolute"),
        (request(URL, f.output("no-such-dir/out")), "does not exist"),
        (request("not a url", out.clone()), "url"),
        (request("ftp://origin.test/f", out.clone()), "not supported"),
        (request("s3://", out.clone()), ""),
        (
            DownloadRequest {
                range: Some(ProtoRange {
                    start: 10,
                    end: Some(5),
                }),
                ..ok()
            },
            "before its start",
        ),
        (
            DownloadRequest {
                range: Some(ProtoRange {
                    start: 0,
                    end: None,
                }),
                digest: sha256(b"x"),
                ..ok()
            },
            "cannot be checked on a range",
        ),
        (
            DownloadRequest {
                priority: 7,
                ..ok()
            },
            "priority",
        ),
        (
            DownloadRequest {
                digest: "md5:abc".into(),
                ..ok()
            },
            "sha256:<64 hex",
        ),
        (
            DownloadRequest {
                digest: "sha256:zz".into(),
                ..ok()
            },
            "sha256:<64 hex",
        ),
        (
            DownloadRequest {
                piece_length: 1,
                ..ok()
            },
            "piece length",
        ),
        (
            DownloadRequest {
                object_storage: Some(ObjectStorage {
                    endpoint: "http://127.0.0.1:9000".into(),
                    ..ObjectStorage::default()
                }),
                ..ok()
            },
            "for s3:// URLs only",
        ),
        (
            DownloadRequest {
                object_storage: Some(ObjectStorage {
                    access_key_id: "key".into(),
                    ..ObjectStorage::default()
                }),
                ..request("s3://bucket/key", out.clone())
            },
            "an access key id needs its secret access key",
        ),
        (
            DownloadRequest {
                object_storage: Some(ObjectStorage {
                    secret_access_key: "very-secret".into(),
                    ..ObjectStorage::default()
                }),
                ..request("s3://bucket/key", out.clone())
            },
            "a secret access key needs its access key id",
        ),
    ];
    for (req, says) in cases {
        let what = format!("{req:?}");
        assert!(
            !what.contains("very-secret"),
            "Debug shows the secret: {what}"
        );
        let e = f.download(req).await.expect_err(&what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {}", e.message());
    }
    assert_eq!(f.api.tasks.running(), 0, "a bad request started a download");
    assert!(f.disk.storage.is_empty());
}

/// Each failure reaches the client as its `DownloadError`'s gRPC code (dfget's exit code
/// follows from it), with the origin's words in the message.
#[tokio::test]
async fn a_failed_download_is_answered_with_its_errors_grpc_code() {
    /// How the origin fails.
    type Fail = fn() -> OriginError;
    let cases: Vec<(Fail, Code, &str)> = vec![
        (
            || OriginError::Status(reqwest::StatusCode::NOT_FOUND, URL.into()),
            Code::NotFound,
            "404",
        ),
        (
            || OriginError::Status(reqwest::StatusCode::FORBIDDEN, URL.into()),
            Code::PermissionDenied,
            "403",
        ),
        (
            || OriginError::Exhausted {
                retries: 3,
                last: "connection reset".into(),
            },
            Code::Unavailable,
            "connection reset",
        ),
        (
            || OriginError::BadHeader("x\u{0}".into()),
            Code::InvalidArgument,
            "invalid header",
        ),
        (
            || OriginError::Storage(std::io::Error::from_raw_os_error(libc::ENOSPC).into()),
            Code::ResourceExhausted,
            "No space left",
        ),
    ];
    for (fail, code, says) in cases {
        let f = fixture(Some(fail), FakeCacheSchedulers::default());
        let out = f.output("out");
        let e = f
            .download(request(URL, out.clone()))
            .await
            .expect_err("the origin failed");
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
        assert!(!Path::new(&out).exists(), "an output for a failed download");
    }
}

#[tokio::test]
async fn a_download_is_delivered_to_the_output_and_reported_done() {
    let f = fixture(None, FakeCacheSchedulers::default());
    let out = f.output("out");
    let msgs = f
        .download(DownloadRequest {
            digest: sha256(&content()),
            ..request(URL, out.clone())
        })
        .await
        .expect("download");
    let last = msgs.last().expect("a message");
    assert!(last.done);
    assert_eq!(last.output_length, content().len() as u64);
    assert_eq!(std::fs::read(&out).expect("output"), content());
}

#[tokio::test]
async fn a_digest_mismatch_is_data_loss_and_leaves_no_output() {
    let f = fixture(None, FakeCacheSchedulers::default());
    f.hold();
    let out = f.output("out");
    let e = f
        .download(DownloadRequest {
            digest: sha256(b"other content"),
            ..request(URL, out.clone())
        })
        .await
        .expect_err("wrong digest");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(!Path::new(&out).exists());
}

#[tokio::test]
async fn a_range_gets_exactly_its_bytes_and_a_range_past_the_end_is_refused() {
    let f = fixture(None, FakeCacheSchedulers::default());
    f.hold();
    let out = f.output("part");
    let msgs = f
        .download(DownloadRequest {
            range: Some(ProtoRange {
                start: 100,
                end: Some(20_000),
            }),
            ..request(URL, out.clone())
        })
        .await
        .expect("range");
    let last = msgs.last().expect("a message");
    assert!(last.done);
    assert_eq!(last.output_length, 19_901);
    assert_eq!(
        std::fs::read(&out).expect("output"),
        &content()[100..=20_000]
    );

    let len = content().len() as u64;
    let e = f
        .download(DownloadRequest {
            range: Some(ProtoRange {
                start: len,
                end: None,
            }),
            ..request(URL, f.output("past"))
        })
        .await
        .expect_err("a range past the end");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn import_and_stat_through_the_service() {
    let f = fixture(
        None,
        FakeCacheSchedulers {
            stat: Ok(Some(info(&[("other", true, 1)]))),
            ..FakeCacheSchedulers::default()
        },
    );
    let path = f.output("file");
    std::fs::write(&path, content()).expect("write");
    let e = f
        .api
        .import_task(Request::new(ImportTaskRequest {
            path: path.clone(),
            piece_length: 3,
            ..ImportTaskRequest::default()
        }))
        .await
        .expect_err("a piece length out of range");
    assert_eq!(e.code(), Code::InvalidArgument);
    let imp = f
        .api
        .import_task(Request::new(ImportTaskRequest {
            path,
            ..ImportTaskRequest::default()
        }))
        .await
        .expect("import")
        .into_inner();
    assert_eq!(imp.cid, sha256(&content()));
    assert_eq!(imp.content_length, content().len() as u64);
    assert_eq!(imp.scheduler, "scheduler-a:8002");

    let cid = Some(CacheId {
        id: imp.cid.clone(),
        ..CacheId::default()
    });
    let stat = f
        .api
        .stat_task(Request::new(StatTaskRequest { cid: cid.clone() }))
        .await
        .expect("stat")
        .into_inner();
    assert_eq!(stat.task_id, imp.task_id);
    assert!(stat.local && stat.local_complete && stat.in_scheduler);
    // The local layout wins over the scheduler's.
    assert_eq!(stat.content_length, content().len() as u64);
    assert_eq!(stat.peers.len(), 1);
    assert_eq!(stat.peers[0].host_id, "other");

    let e = f
        .api
        .stat_task(Request::new(StatTaskRequest { cid: None }))
        .await
        .expect_err("no content id");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(f.cache_schedulers.stats.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn stat_reports_a_scheduler_that_did_not_answer_without_failing() {
    let f = fixture(
        None,
        FakeCacheSchedulers {
            stat: Err(failed("a:8002", "refused")),
            ..FakeCacheSchedulers::default()
        },
    );
    let stat = f
        .api
        .stat_task(Request::new(StatTaskRequest {
            cid: Some(CacheId {
                id: "my-id".into(),
                ..CacheId::default()
            }),
        }))
        .await
        .expect("stat")
        .into_inner();
    assert!(!stat.local && !stat.in_scheduler);
    assert_eq!(stat.scheduler_error, "scheduler a:8002: refused");
}

#[tokio::test]
async fn export_of_a_task_nobody_holds_is_not_found_and_bad_exports_are_invalid() {
    let f = fixture(None, FakeCacheSchedulers::default());
    let cid = Some(CacheId {
        id: "my-id".into(),
        ..CacheId::default()
    });
    let export = |output: String, digest: &str| ExportTaskRequest {
        cid: cid.clone(),
        output,
        digest: digest.into(),
        ..ExportTaskRequest::default()
    };
    let e = f
        .api
        .export_task(Request::new(export(f.output("out"), "")))
        .await
        .err()
        .expect("nobody holds it");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    for (req, what) in [
        (export("relative".into(), ""), "relative output"),
        (export(f.output("out"), "sha256:12"), "bad digest"),
    ] {
        let e = f
            .api
            .export_task(Request::new(req))
            .await
            .err()
            .expect(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    assert_eq!(f.api.tasks.running(), 0);
}

#[tokio::test]
async fn delete_needs_a_content_id_and_removes_the_task() {
    let f = fixture(None, FakeCacheSchedulers::default());
    let e = f
        .api
        .delete_task(Request::new(DeleteTaskRequest { cid: None }))
        .await
        .expect_err("no content id");
    assert_eq!(e.code(), Code::InvalidArgument);

    let path = f.output("file");
    std::fs::write(&path, content()).expect("write");
    let imp = f
        .api
        .import_task(Request::new(ImportTaskRequest {
            path,
            ..ImportTaskRequest::default()
        }))
        .await
        .expect("import")
        .into_inner();
    let d = f
        .api
        .delete_task(Request::new(DeleteTaskRequest {
            cid: Some(CacheId {
                id: imp.cid,
                ..CacheId::default()
            }),
        }))
        .await
        .expect("delete")
        .into_inner();
    assert!(d.removed && d.scheduler_told);
    assert!(f.disk.storage.is_empty());
}
