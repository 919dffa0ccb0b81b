//! Unit tests of dfcache's import, stat, export and delete logic: a real `Storage` and
//! `MetaStore` in a temporary directory, in-memory schedulers. No sockets, no processes.

use super::*;
use crate::retention::tests::{Disk, FakeRuns, FakeSchedulers as FakeLeave};
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use tonic::Code;
use wire::proto::scheduler::{PeerInfo, TaskMetadata};

/// The scheduler at `addr` refused with `message`.
pub(crate) fn failed(addr: &str, message: &str) -> SchedulerError {
    SchedulerError::Failed {
        addr: addr.into(),
        code: Code::Unavailable,
        message: message.into(),
    }
}

const PIECE: u64 = wire::piece::MIN_PIECE_LENGTH;

/// Schedulers that record every `AnnounceTask` and answer `StatTask` with `stat`.
#[derive(Debug)]
pub(crate) struct FakeSchedulers {
    pub(crate) announced: Mutex<Vec<(TaskId, PieceLayout, Vec<u8>)>>,
    /// `Err`: no scheduler takes the announcement.
    pub(crate) announce: Result<String, SchedulerError>,
    pub(crate) stat: Result<Option<TaskInfo>, SchedulerError>,
    pub(crate) stats: Mutex<Vec<TaskId>>,
}

impl Default for FakeSchedulers {
    fn default() -> Self {
        Self {
            announced: Mutex::default(),
            announce: Ok("scheduler-a:8002".into()),
            stat: Ok(None),
            stats: Mutex::default(),
        }
    }
}

impl CacheSchedulers for FakeSchedulers {
    fn host_id(&self) -> &str {
        "me"
    }

    fn announce_cached<'a>(
        &'a self,
        id: &'a TaskId,
        layout: PieceLayout,
        piece_digests: Vec<u8>,
        _piece_crcs: Vec<u8>,
    ) -> BoxFuture<'a, Result<String, SchedulerError>> {
        self.announced
            .lock()
            .expect("lock")
            .push((*id, layout, piece_digests));
        let r = self.announce.clone();
        Box::pin(async move { r })
    }

    fn stat_task<'a>(
        &'a self,
        id: &'a TaskId,
    ) -> BoxFuture<'a, Result<Option<TaskInfo>, SchedulerError>> {
        self.stats.lock().expect("lock").push(*id);
        let r = self.stat.clone();
        Box::pin(async move { r })
    }
}

/// dfcache over a fresh disk and `schedulers`, with the retention fakes it deletes through.
struct Fixture {
    disk: Disk,
    cache: Arc<DfCache>,
    schedulers: Arc<FakeSchedulers>,
    left: Arc<FakeLeave>,
}

fn fixture(schedulers: FakeSchedulers) -> Fixture {
    let disk = Disk::new();
    let schedulers = Arc::new(schedulers);
    let left = Arc::new(FakeLeave::default());
    let retention = Arc::new(Retention::new(
        disk.storage.clone(),
        disk.meta.clone(),
        Arc::new(FakeRuns::default()),
        left.clone(),
    ));
    let cache = Arc::new(DfCache {
        storage: disk.storage.clone(),
        meta: disk.meta.clone(),
        schedulers: schedulers.clone(),
        retention,
        piece_length_min: PIECE,
        piece_length_max: 64 << 20,
    });
    Fixture {
        disk,
        cache,
        schedulers,
        left,
    }
}

impl Fixture {
    /// Writes `data` to a file named `name` in the test's directory.
    fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.disk._dir.path().join(name);
        std::fs::write(&p, data).expect("write file");
        p
    }
}

/// Bytes that differ between pieces and within them: 2.5 pieces.
fn content() -> Vec<u8> {
    (0..(5 * PIECE / 2)).map(|i| (i * 13 % 253) as u8).collect()
}

fn sha256_id(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn key(cid: &str) -> CacheKey {
    CacheKey {
        cid: cid.into(),
        ..CacheKey::default()
    }
}

#[tokio::test]
async fn import_stores_the_file_as_a_complete_task_records_and_announces_it() {
    let f = fixture(FakeSchedulers::default());
    let data = content();
    let path = f.file("blob", &data);
    let imp = import(&f.cache, path, CacheKey::default(), PIECE)
        .await
        .expect("import");

    // Named by the file's sha256 (the default content id) and the empty tag/application.
    assert_eq!(imp.cid, sha256_id(&data));
    assert_eq!(imp.id, TaskId::from_cache_id(&imp.cid, "", ""));
    assert_eq!(imp.layout.content_length(), data.len() as u64);
    assert_eq!(imp.layout.piece_count(), 3);
    assert_eq!(imp.scheduler.as_deref(), Some("scheduler-a:8002"));

    // Stored complete, byte for byte, and recorded in the metadata store.
    let store = f.disk.storage.get(&imp.id).expect("stored");
    assert!(store.is_complete());
    assert_eq!(std::fs::read(store.path()).expect("task file"), data);
    assert_eq!(f.disk.recorded(), vec![imp.id]);

    // Announced once, with the BLAKE3 digest of every piece in order.
    let announced = f.schedulers.announced.lock().expect("lock").clone();
    let want: Vec<u8> = data
        .chunks(PIECE as usize)
        .flat_map(wire::piece_digest)
        .collect();
    assert_eq!(announced, vec![(imp.id, imp.layout, want)]);
}

#[tokio::test]
async fn importing_the_same_file_again_is_the_same_task_and_another_layout_is_refused() {
    let f = fixture(FakeSchedulers::default());
    let path = f.file("blob", &content());
    let first = import(&f.cache, path.clone(), CacheKey::default(), PIECE)
        .await
        .expect("import");
    let again = import(&f.cache, path.clone(), CacheKey::default(), PIECE)
        .await
        .expect("import again");
    assert_eq!(again.id, first.id);
    assert_eq!(f.disk.storage.len(), 1);
    let e = import(&f.cache, path, CacheKey::default(), 2 * PIECE)
        .await
        .expect_err("another piece length of a held task");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("delete it first"), "{}", e.message());
    // The held task is untouched.
    let store = f.disk.storage.get(&first.id).expect("still held");
    assert_eq!(store.layout(), first.layout);
}

#[tokio::test]
async fn an_import_no_scheduler_takes_is_still_stored_and_reported() {
    let f = fixture(FakeSchedulers {
        announce: Err(failed("scheduler-a:8002", "unreachable")),
        ..FakeSchedulers::default()
    });
    let imp = import(&f.cache, f.file("blob", &content()), CacheKey::default(), 0)
        .await
        .expect("import");
    assert_eq!(imp.scheduler, None);
    assert!(f.disk.storage.get(&imp.id).is_some_and(|s| s.is_complete()));
    // Piece length 0: the usual rule, within the configured bounds.
    assert_eq!(
        imp.layout.piece_length(),
        wire::piece::piece_length_for(content().len() as u64, PIECE, 64 << 20)
    );
}

#[tokio::test]
async fn import_with_an_own_content_id_and_tag_names_the_task_by_them() {
    let f = fixture(FakeSchedulers::default());
    let key = CacheKey {
        cid: "my-dataset-v1".into(),
        tag: "t".into(),
        application: "app".into(),
    };
    let imp = import(&f.cache, f.file("blob", &content()), key.clone(), PIECE)
        .await
        .expect("import");
    assert_eq!(imp.cid, "my-dataset-v1");
    assert_eq!(imp.id, key.task_id().expect("id"));
    assert_ne!(imp.id, TaskId::from_cache_id("my-dataset-v1", "", ""));
}

#[tokio::test]
async fn bad_imports_are_invalid_arguments_and_store_nothing() {
    let f = fixture(FakeSchedulers::default());
    let data = content();
    let file = f.file("blob", &data);
    let empty = f.file("empty", b"");
    let other_digest = sha256_id(b"something else");
    let cases: Vec<(PathBuf, CacheKey, &str)> = vec![
        (
            PathBuf::from("relative/blob"),
            CacheKey::default(),
            "absolute",
        ),
        (
            f.disk._dir.path().join("missing"),
            CacheKey::default(),
            "missing",
        ),
        (
            f.disk._dir.path().to_path_buf(),
            CacheKey::default(),
            "not a regular file",
        ),
        (empty, CacheKey::default(), "empty"),
        // A content id that is a digest must be the file's.
        (file.clone(), key(&other_digest), "has digest"),
    ];
    for (path, key, says) in cases {
        let e = import(&f.cache, path.clone(), key, PIECE)
            .await
            .expect_err("a bad import");
        assert_eq!(e.code(), Code::InvalidArgument, "{path:?}: {e:?}");
        assert!(e.message().contains(says), "{path:?}: {}", e.message());
    }
    assert!(f.disk.storage.is_empty());
    assert!(f.disk.recorded().is_empty());
    assert!(f.schedulers.announced.lock().expect("lock").is_empty());

    // The digest in upper case is the same content id, in its canonical form.
    let upper = sha256_id(&data)
        .to_uppercase()
        .replace("SHA256:", "sha256:");
    let imp = import(&f.cache, file, key(&upper), PIECE)
        .await
        .expect("a digest in upper case");
    assert_eq!(imp.cid, sha256_id(&data));
}

#[tokio::test]
async fn export_of_a_task_held_here_needs_no_scheduler_and_never_goes_to_an_origin() {
    let f = fixture(FakeSchedulers {
        stat: Err(failed("scheduler-a:8002", "must not be asked")),
        ..FakeSchedulers::default()
    });
    let imp = import(
        &f.cache,
        f.file("blob", &content()),
        CacheKey::default(),
        PIECE,
    )
    .await
    .expect("import");
    let spec = export_spec(&f.cache, &key(&imp.cid), 1000)
        .await
        .expect("export spec");
    assert_eq!(spec.id, imp.id);
    assert!(spec.url.is_empty() && spec.disable_back_to_source && !spec.back_to_source);
    assert_eq!(spec.rate_limit, 1000);
    assert!(f.schedulers.stats.lock().expect("lock").is_empty());
}

/// A scheduler's `StatTask` answer: a task of 10 bytes held by `peers` (host, done,
/// finished pieces).
pub(crate) fn info(peers: &[(&str, bool, u32)]) -> TaskInfo {
    TaskInfo {
        task_id: String::new(),
        metadata: Some(TaskMetadata {
            content_length: 10,
            piece_length: PIECE,
        }),
        piece_count: 1,
        peers: peers
            .iter()
            .map(|(host, done, pieces)| PeerInfo {
                host_id: (*host).into(),
                done: *done,
                finished_pieces: *pieces,
                ..PeerInfo::default()
            })
            .collect(),
    }
}

#[tokio::test]
async fn export_asks_the_scheduler_and_needs_another_peer_with_pieces() {
    let cid = "sha256:".to_string() + &"ab".repeat(32);
    let id = key(&cid).task_id().expect("id");
    /// A scheduler's `StatTask` answer.
    type Answer = Result<Option<TaskInfo>, SchedulerError>;
    // (scheduler's answer, `None` when the export may start, else the gRPC code)
    let cases: Vec<(Answer, Option<Code>)> = vec![
        (Ok(None), Some(Code::NotFound)),
        (Ok(Some(info(&[]))), Some(Code::NotFound)),
        // Only this host, or peers without a piece: nobody to fetch from.
        (Ok(Some(info(&[("me", true, 1)]))), Some(Code::NotFound)),
        (Ok(Some(info(&[("other", false, 0)]))), Some(Code::NotFound)),
        // A peer that has not learnt the size yet.
        (
            Ok(Some(TaskInfo {
                metadata: None,
                ..info(&[("other", false, 1)])
            })),
            Some(Code::NotFound),
        ),
        (
            Err(failed("scheduler-a", "refused")),
            Some(Code::Unavailable),
        ),
        (Ok(Some(info(&[("other", false, 1)]))), None),
        (
            Ok(Some(info(&[("me", false, 0), ("other", true, 1)]))),
            None,
        ),
    ];
    for (answer, refused) in cases {
        let f = fixture(FakeSchedulers {
            stat: answer.clone(),
            ..FakeSchedulers::default()
        });
        let got = export_spec(&f.cache, &key(&cid), 0).await;
        match refused {
            Some(code) => {
                let e = got.expect_err("export of a task nobody else holds");
                assert_eq!(e.code(), code, "{answer:?}: {e:?}");
                if code == Code::NotFound {
                    assert!(
                        e.message().contains("not found in the P2P network"),
                        "{e:?}"
                    );
                }
            }
            None => assert_eq!(got.expect("export").id, id, "{answer:?}"),
        }
        assert_eq!(*f.schedulers.stats.lock().expect("lock"), vec![id]);
    }
}

#[tokio::test]
async fn a_key_without_a_content_id_is_an_invalid_argument() {
    let f = fixture(FakeSchedulers::default());
    let e = export_spec(&f.cache, &CacheKey::default(), 0)
        .await
        .expect_err("no content id");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(f.schedulers.stats.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn scheduler_stat_is_the_schedulers_answer() {
    let f = fixture(FakeSchedulers {
        stat: Ok(Some(info(&[("other", true, 1)]))),
        ..FakeSchedulers::default()
    });
    let id = TaskId([5; 32]);
    let got = scheduler_stat(&f.cache, &id).await.expect("stat");
    assert_eq!(got, Some(info(&[("other", true, 1)])));
}

#[tokio::test]
async fn delete_removes_the_import_and_leaves_the_schedulers() {
    let f = fixture(FakeSchedulers::default());
    let imp = import(
        &f.cache,
        f.file("blob", &content()),
        CacheKey::default(),
        PIECE,
    )
    .await
    .expect("import");
    let path = f
        .disk
        .storage
        .get(&imp.id)
        .expect("held")
        .path()
        .to_path_buf();
    let d = delete(&f.cache, &imp.id).await.expect("delete");
    assert!(d.held && d.told, "{d:?}");
    assert!(f.disk.storage.get(&imp.id).is_none() && !path.exists());
    assert!(f.disk.recorded().is_empty());
    assert_eq!(*f.left.left.lock().expect("lock"), vec![imp.id]);
    // Gone: imported again from scratch.
    let again = import(
        &f.cache,
        f.file("blob", &content()),
        CacheKey::default(),
        PIECE,
    )
    .await
    .expect("import again");
    assert_eq!(again.id, imp.id);
    assert!(f.disk.storage.get(&imp.id).is_some_and(|s| s.is_complete()));
}
