//! Unit tests of the reader: a real `Storage` in a temporary directory, no sockets, no
//! processes.

use super::*;
use crate::task::Progress;
use wire::PieceLayout;

/// A store of `len` bytes in pieces of `piece` bytes in a temporary directory, with its
/// content (not stored yet) and a run state to drive.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<TaskStore>,
    data: Vec<u8>,
    state: watch::Sender<TaskState>,
}

fn fixture(len: u64, piece: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Storage::open(dir.path()).expect("storage");
    let layout = PieceLayout::new(len, piece).expect("layout");
    let store = storage
        .create(TaskId::from_cache_id("reader-test", "", ""), layout)
        .expect("store");
    // Bytes that differ at every offset of a piece and between pieces.
    let data = (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect();
    let (state, _) = watch::channel(TaskState::Running(Progress::default()));
    Fixture {
        _dir: dir,
        store,
        data,
        state,
    }
}

impl Fixture {
    fn put(&self, n: u32) {
        let r = self.store.layout().piece_range(n).expect("piece");
        let bytes = &self.data[r.start as usize..r.end as usize];
        let new = self
            .store
            .write_piece(n, bytes, wire::piece_crc(bytes))
            .expect("write piece");
        assert!(new, "piece {n} stored twice");
    }

    fn reader(&self, range: Range<u64>) -> TaskReader {
        TaskReader::new(self.store.clone(), self.state.subscribe(), range).expect("reader")
    }

    fn sha(&self, range: Range<u64>) -> [u8; 32] {
        Sha256::digest(&self.data[range.start as usize..range.end as usize]).into()
    }
}

/// A task of three pieces larger than a chunk (not a multiple of it), all stored, the
/// last one 77 bytes; and its length.
fn stored_big_pieces() -> (Fixture, u64) {
    let piece = 3 * CHUNK / 2;
    let len = 2 * piece + 77;
    let f = fixture(len, piece);
    for n in 0..3 {
        f.put(n);
    }
    (f, len)
}

/// Gives a reader that does not wait time to run ahead (and finish) before the test
/// looks; a reader that waits passes whatever the time.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Every chunk of `reader`, with the first error if any.
async fn read_all(mut reader: TaskReader) -> (Vec<u8>, Result<(), ReadError>) {
    let mut out = Vec::new();
    loop {
        match reader.next_chunk().await {
            Ok(Some(c)) => out.extend_from_slice(&c),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e)),
        }
    }
}

const P: u64 = wire::piece::MIN_PIECE_LENGTH;

/// Far longer than any wait these tests need: a reader still waiting after it hangs.
const HANG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn pieces_out_of_order_give_the_range_in_order() {
    let f = fixture(6 * P + 100, P);
    // From the middle of piece 1 to the middle of piece 4.
    let range = P + 7..4 * P + 300;
    let reading = tokio::spawn(read_all(f.reader(range.clone())));
    for n in [5, 4, 0, 2, 6, 3] {
        f.put(n);
        tokio::task::yield_now().await;
    }
    // Piece 1, the range's first, comes last: nothing can be handed out before it.
    settle().await;
    assert!(!reading.is_finished());
    f.put(1);
    let (got, res) = reading.await.expect("reader task");
    res.expect("read");
    assert_eq!(got.len() as u64, range.end - range.start);
    assert!(got == f.data[range.start as usize..range.end as usize]);
}

#[tokio::test]
async fn a_range_inside_one_piece_waits_for_that_piece_only() {
    let f = fixture(4 * P, P);
    f.put(2);
    let range = 2 * P + 10..2 * P + 20;
    let (got, res) = read_all(f.reader(range.clone())).await;
    res.expect("read");
    assert_eq!(got, f.data[range.start as usize..range.end as usize]);
    // The same through the file copy (ranges are delivered this way).
    let out = f._dir.path().join("out");
    let mut r = f.reader(range.clone());
    r.wait_all().await.expect("wait");
    let n = r.copy_to_file(&out, Delivery::Copy).await.expect("copy");
    assert_eq!(n, 10);
    assert_eq!(
        std::fs::read(&out).expect("output"),
        &f.data[range.start as usize..range.end as usize]
    );
}

#[tokio::test]
async fn chunks_stop_at_missing_pieces_and_within_chunk_size() {
    // Pieces larger than a chunk and not a multiple of it.
    let piece = 3 * CHUNK / 2;
    let f = fixture(3 * piece + 5, piece);
    f.put(0);
    let mut r = f.reader(0..3 * piece + 5);
    let a = r.next_chunk().await.expect("chunk").expect("some");
    let b = r.next_chunk().await.expect("chunk").expect("some");
    assert_eq!(a.len() as u64, CHUNK);
    assert_eq!(b.len() as u64, piece - CHUNK);
    assert_eq!(r.remaining(), 2 * piece + 5);
    // Piece 1 is missing: the next chunk waits for it.
    let next = tokio::spawn(async move { (r.next_chunk().await, r) });
    settle().await;
    assert!(!next.is_finished());
    f.put(1);
    let (c, _r) = next.await.expect("task");
    let c = c.expect("chunk").expect("some");
    assert_eq!(&c[..], &f.data[piece as usize..(piece + CHUNK) as usize]);
}

#[tokio::test]
async fn running_sha256_matches() {
    let (f, len) = stored_big_pieces();
    let (got, res) = read_all(f.reader(0..len).expect_sha256(f.sha(0..len))).await;
    res.expect("digest matches");
    assert!(got == f.data);
    for how in [Delivery::HardLinkOrCopy, Delivery::Copy] {
        let out = f._dir.path().join(format!("out-{how:?}"));
        let n = f
            .reader(0..len)
            .expect_sha256(f.sha(0..len))
            .copy_to_file(&out, how)
            .await
            .expect("delivered");
        assert_eq!(n, len);
        assert!(std::fs::read(&out).expect("output") == f.data);
    }
}

#[tokio::test]
async fn sha256_mismatch_is_an_error_and_withholds_the_end() {
    let (f, len) = stored_big_pieces();
    let mut wrong = f.sha(0..len);
    wrong[0] ^= 1;
    let (got, res) = read_all(f.reader(0..len).expect_sha256(wrong)).await;
    assert!(
        matches!(res, Err(ReadError::Digest { expected, .. }) if expected == wrong),
        "{res:?}"
    );
    // The last chunk (77 bytes) never came out: no complete body with wrong content.
    assert_eq!(got.len() as u64, len - 77);
    assert!(got == f.data[..got.len()]);
    for how in [Delivery::HardLinkOrCopy, Delivery::Copy] {
        let out = f._dir.path().join(format!("out-{how:?}"));
        let e = f
            .reader(0..len)
            .expect_sha256(wrong)
            .copy_to_file(&out, how)
            .await
            .expect_err("mismatch");
        assert!(matches!(e, ReadError::Digest { .. }), "{e:?}");
        assert!(matches!(
            DownloadError::from(e),
            DownloadError::DigestMismatch(_)
        ));
        assert!(!out.exists(), "a mismatching output was put in place");
    }
    // Nothing but the output was left in the directory (no temporary files).
    let names: Vec<_> = std::fs::read_dir(f._dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[tokio::test]
async fn a_failing_task_ends_the_wait_with_its_error() {
    let f = fixture(3 * P, P);
    f.put(0);
    let reading = tokio::spawn(read_all(f.reader(0..3 * P)));
    settle().await;
    assert!(!reading.is_finished());
    f.state
        .send(TaskState::Failed(DownloadError::Origin(
            "origin went away".into(),
        )))
        .expect("send");
    let (got, res) = tokio::time::timeout(HANG, reading)
        .await
        .expect("the reader still waits after the task failed")
        .expect("reader task");
    assert_eq!(got, f.data[..P as usize]);
    match res {
        Err(ReadError::Download(DownloadError::Origin(m))) => {
            assert_eq!(m, "origin went away")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_run_dropped_while_waiting_is_an_error() {
    let f = fixture(3 * P, P);
    let mut r = f.reader(P..2 * P);
    let waiting = tokio::spawn(async move { r.wait_all().await });
    settle().await;
    assert!(!waiting.is_finished());
    drop(f.state);
    let res = tokio::time::timeout(HANG, waiting)
        .await
        .expect("the reader still waits after the run was dropped")
        .expect("task");
    assert!(matches!(res, Err(DownloadError::Cancelled(_))), "{res:?}");
}

#[tokio::test]
async fn an_empty_task_reads_as_nothing_and_checks_its_digest() {
    let f = fixture(0, P);
    let empty: [u8; 32] = Sha256::digest(b"").into();
    let (got, res) = read_all(f.reader(0..0).expect_sha256(empty)).await;
    res.expect("empty digest matches");
    assert!(got.is_empty());
    let (_, res) = read_all(f.reader(0..0).expect_sha256([7; 32])).await;
    assert!(matches!(res, Err(ReadError::Digest { .. })), "{res:?}");
    let out = f._dir.path().join("empty");
    let n = f
        .reader(0..0)
        .expect_sha256(empty)
        .copy_to_file(&out, Delivery::Copy)
        .await
        .expect("delivered");
    assert_eq!(n, 0);
    assert_eq!(std::fs::metadata(&out).expect("output").len(), 0);
}

#[tokio::test]
async fn a_range_past_the_content_is_refused() {
    let f = fixture(2 * P, P);
    let e = TaskReader::new(f.store.clone(), f.state.subscribe(), P..2 * P + 1)
        .expect_err("past the end");
    assert!(matches!(e, DownloadError::BadRequest(_)), "{e:?}");
}

#[test]
fn parse_ranges() {
    assert_eq!(
        ByteRange::parse("0-99"),
        Ok(ByteRange {
            start: 0,
            end: Some(99)
        })
    );
    assert_eq!(
        ByteRange::parse("bytes=5-"),
        Ok(ByteRange {
            start: 5,
            end: None
        })
    );
    assert!(ByteRange::parse("9-3").is_err());
    assert!(ByteRange::parse("-3").is_err());
    assert!(ByteRange::parse("a-b").is_err());
    assert!(ByteRange::parse("12").is_err());
}

#[test]
fn resolve_clamps_and_refuses() {
    let r = ByteRange {
        start: 10,
        end: Some(1000),
    };
    assert_eq!(r.resolve(100), Ok(10..100));
    assert_eq!(
        ByteRange {
            start: 0,
            end: Some(0)
        }
        .resolve(5),
        Ok(0..1)
    );
    assert!(ByteRange {
        start: 100,
        end: None
    }
    .resolve(100)
    .is_err());
}

/// A reader keeps its task from eviction from its creation until it is dropped, across
/// every chunk it reads (the proxy's blob stream) and a delivery's copy; a reader of the
/// evicted task is refused with `NotFound`.
#[tokio::test]
async fn a_task_being_read_is_not_evicted_until_the_reader_is_dropped() {
    use crate::retention::tests::{Disk, FakeRuns, FakeSchedulers};
    use crate::retention::Retention;
    let disk = Disk::new();
    let len = 2 * wire::piece::MIN_PIECE_LENGTH + 5;
    let id = disk.complete_task(7, len);
    let retention = Retention::new(
        disk.storage.clone(),
        disk.meta.clone(),
        Arc::new(FakeRuns::default()),
        Arc::new(FakeSchedulers::default()),
    );
    let store = disk.storage.get(&id).expect("stored");
    let (_state, rx) = watch::channel(TaskState::Done(store.clone(), Progress::default()));

    // Streamed chunk by chunk, as the registry mirror does.
    let mut reader = TaskReader::new(store.clone(), rx.clone(), 0..len).expect("reader");
    let mut got = reader
        .next_chunk()
        .await
        .expect("read")
        .expect("a chunk")
        .to_vec();
    assert!(
        !retention.evict(&id).expect("evict"),
        "evicted a task while it was being read"
    );
    assert!(disk.storage.get(&id).is_some() && store.path().exists());
    while let Some(c) = reader.next_chunk().await.expect("read") {
        got.extend_from_slice(&c);
    }
    assert_eq!(got, vec![7u8; len as usize]);
    // Read to the end but not dropped: still in use.
    assert!(!retention.evict(&id).expect("evict"));
    drop(reader);
    assert!(
        retention.evict(&id).expect("evict"),
        "kept after the reader went"
    );
    assert!(disk.storage.get(&id).is_none() && !store.path().exists());

    // The store handle of the evicted task: no reader, and the error says why.
    let e = TaskReader::new(store.clone(), rx, 0..len).expect_err("read an evicted task");
    assert!(matches!(e, DownloadError::NotFound(_)), "{e:?}");
    assert!(e.to_string().contains("evicted"), "{e}");
}

/// A delivery (dfget's output, `--range`) holds its task from when its reader is made,
/// while it waits for pieces, until the copy is done.
#[tokio::test]
async fn a_task_being_delivered_is_not_evicted() {
    use crate::retention::tests::{Disk, FakeRuns, FakeSchedulers};
    use crate::retention::Retention;
    let disk = Disk::new();
    let len = 3 * wire::piece::MIN_PIECE_LENGTH;
    let id = disk.complete_task(8, len);
    let retention = Retention::new(
        disk.storage.clone(),
        disk.meta.clone(),
        Arc::new(FakeRuns::default()),
        Arc::new(FakeSchedulers::default()),
    );
    let store = disk.storage.get(&id).expect("stored");
    let (_state, rx) = watch::channel(TaskState::Done(store.clone(), Progress::default()));
    let mut reader = TaskReader::new(store.clone(), rx, 10..len - 10).expect("reader");
    reader.wait_all().await.expect("stored");
    assert!(
        !retention.evict(&id).expect("evict"),
        "evicted before the copy"
    );
    let out = disk._dir.path().join("out");
    let n = reader
        .copy_to_file(&out, Delivery::Copy)
        .await
        .expect("delivered");
    assert_eq!(n, len - 20);
    assert_eq!(std::fs::read(&out).expect("output"), vec![8u8; n as usize]);
    assert!(
        retention.evict(&id).expect("evict"),
        "kept after the delivery"
    );
}
