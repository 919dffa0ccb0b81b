//! Unit tests of the task store: the piece claim, digests, restore, eviction.

use super::*;

fn store(len: u64, plen: u64) -> (tempfile::TempDir, Arc<TaskStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = PieceLayout::new(len, plen).expect("layout");
    let s = TaskStore::create(dir.path(), TaskId([7; 32]), layout).expect("create");
    (dir, Arc::new(s))
}

/// A store replaced by one of another layout keeps its own bytes (its file is unlinked,
/// not truncated under it); removing a task whose file is already gone is no error.
#[test]
fn replacing_a_task_never_truncates_the_old_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("storage");
    let id = TaskId([9; 32]);
    let old = storage
        .create(id, PieceLayout::new(16384, 16384).expect("layout"))
        .expect("create");
    let data = vec![3u8; 16384];
    old.write_piece(0, &data, wire::piece_crc(&data))
        .expect("write");
    let new = storage
        .create(id, PieceLayout::new(2 * 16384, 16384).expect("layout"))
        .expect("create with another layout");
    assert!(!Arc::ptr_eq(&old, &new));
    assert!(Arc::ptr_eq(&new, &storage.get(&id).expect("stored")));
    let mut buf = Vec::new();
    old.read_piece(0, &mut buf)
        .expect("the old store still reads");
    assert_eq!(buf, data);
    assert!(!new.has(0));
    assert_eq!(new.file().metadata().expect("stat").len(), 2 * 16384);

    std::fs::remove_file(new.path()).expect("remove by hand");
    storage
        .remove(&id)
        .expect("removing a task whose file is gone");
    assert!(storage.get(&id).is_none());
}

#[test]
fn corrupt_piece_is_not_stored() {
    let (_d, s) = store(40_000, 16384);
    let data = vec![1u8; 16384];
    let crc = wire::piece_crc(&data);
    assert!(matches!(
        s.write_piece(0, &data, crc ^ 1),
        Err(StoreError::Digest { .. })
    ));
    assert!(!s.has(0));
    assert_eq!(s.finished_count(), 0);
    assert!(s.write_piece(0, &data, crc).expect("stored"));
    assert!(s.has(0));
    assert_eq!(s.piece_crc(0), Some(crc));
}

/// With digests required, a piece commits only with its trusted digest: unknown and
/// mismatching digests leave it unmarked; the first trusted digest wins.
#[test]
fn commit_verified_checks_the_trusted_digest() {
    let (_d, s) = store(40_000, 16384);
    let good = vec![5u8; 16384];
    let forged = vec![6u8; 16384];
    let (dg, df) = (wire::piece_digest(&good), wire::piece_digest(&forged));
    s.require_digests();
    assert!(matches!(
        s.commit_verified(0, wire::piece_crc(&good), Some(dg)),
        Err(StoreError::DigestUnknown(0))
    ));
    assert_eq!(s.set_digest(0, dg), Ok(true));
    assert_eq!(s.set_digest(0, dg), Ok(false));
    assert_eq!(s.set_digest(0, df), Err(dg), "the first digest stays");
    assert!(matches!(
        s.commit_verified(0, wire::piece_crc(&forged), Some(df)),
        Err(StoreError::PieceDigest { number: 0, .. })
    ));
    assert!(!s.has(0));
    assert_eq!(
        s.commit_verified(0, wire::piece_crc(&good), Some(dg)).ok(),
        Some(true)
    );
    assert!(s.has(0));
    // Bytes from the origin set the trusted digest; other bytes for that piece later fail.
    let (_d2, o) = store(40_000, 16384);
    assert!(o
        .write_piece(1, &good, wire::piece_crc(&good))
        .expect("origin piece"));
    assert_eq!(o.piece_digest(1), Some(dg));
    assert!(o.all_digests().is_none(), "pieces 0 and 2 have none yet");
}

#[test]
fn wrong_length_and_range_are_errors() {
    let (_d, s) = store(40_000, 16384);
    assert!(matches!(
        s.write_piece(2, &[0; 10], 0),
        Err(StoreError::Length { .. })
    ));
    assert!(matches!(
        s.write_piece(3, &[], 0),
        Err(StoreError::OutOfRange(3))
    ));
    let last = vec![9u8; 40_000 - 2 * 16384];
    assert!(s.write_piece(2, &last, wire::piece_crc(&last)).expect("ok"));
    let mut buf = Vec::new();
    s.read_piece(2, &mut buf).expect("read");
    assert_eq!(buf, last);
    assert!(s.read_piece(1, &mut buf).is_err());
}

#[test]
fn restore_trusts_only_pieces_the_file_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = PieceLayout::new(3 * 16384, 16384).expect("layout");
    let id = TaskId([9; 32]);
    let s = Arc::new(TaskStore::create(dir.path(), id, layout).expect("create"));
    let pieces: Vec<Vec<u8>> = (0..3u8).map(|n| vec![n + 1; 16384]).collect();
    for n in [0usize, 2] {
        s.write_piece(n as u32, &pieces[n], wire::piece_crc(&pieces[n]))
            .expect("write");
    }
    let (bits, crcs) = (s.bitmap_bytes(), s.crcs());
    drop(s);
    let r = TaskStore::restore(dir.path(), id, layout, &bits, &crcs, true).expect("restore");
    assert!(r.has(0) && !r.has(1) && r.has(2));
    assert_eq!(r.finished_count(), 2);
    // Piece 0 corrupted on disk: verification drops it; a short file drops piece 2.
    drop(r);
    let f = OpenOptions::new()
        .write(true)
        .open(dir.path().join(format!("{id}.data")))
        .expect("open");
    f.write_all_at(&[0xff; 10], 0).expect("corrupt");
    f.set_len(2 * 16384).expect("truncate");
    let r = TaskStore::restore(dir.path(), id, layout, &bits, &crcs, true).expect("restore");
    assert!(!r.has(0) && !r.has(2));
    assert_eq!(r.finished_count(), 0);
    assert_eq!(
        std::fs::metadata(r.path()).expect("meta").len(),
        3 * 16384,
        "the file is sized back to the content length"
    );
    // Without verification the bit is trusted when the file is long enough.
    drop(r);
    f.set_len(2 * 16384).expect("truncate");
    let r = TaskStore::restore(dir.path(), id, layout, &bits, &crcs, false).expect("restore");
    assert!(r.has(0) && !r.has(2));
    let _b = r.busy().expect("not retired");
    assert!(r.in_use());
}

/// Two writers race for one piece, again and again, from two threads: exactly one
/// takes the claim and commits; the other is refused (held or stored) and never writes.
#[test]
fn two_writers_race_exactly_one_commits() {
    let (_d, s) = store(64 * 16384, 16384);
    let good: Vec<Vec<u8>> = (0..64u32).map(|n| vec![n as u8; 16384]).collect();
    let barrier = std::sync::Barrier::new(2);
    let commits = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|sc| {
        for writer in 0..2u8 {
            let (s, good, barrier, commits) = (&s, &good, &barrier, &commits);
            sc.spawn(move || {
                for n in 0..64u32 {
                    barrier.wait();
                    match s.claim(n) {
                        Ok(mut w) => {
                            // The loser's bytes would differ: a write by it would show.
                            let data = &good[n as usize];
                            w.hash_here();
                            w.write(&data[..1000]).expect("write");
                            std::thread::yield_now();
                            w.write(&data[1000..]).expect("write");
                            assert_eq!(
                                w.finish_trusted(Some(wire::piece_crc(data))).ok(),
                                Some(true)
                            );
                            commits.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(
                            matches!(e, ClaimError::Held | ClaimError::Stored),
                            "writer {writer}: {e}"
                        ),
                    }
                }
            });
        }
    });
    assert_eq!(commits.load(Ordering::Relaxed), 64, "one commit per piece");
    assert!(s.is_complete());
    let mut buf = Vec::new();
    for n in 0..64u32 {
        s.read_piece(n, &mut buf).expect("read");
        assert_eq!(buf, good[n as usize]);
        assert!(!s.is_claimed(n));
    }
    assert!(!s.in_use(), "every claim released");
}

/// A claim excludes every other writer until it is finished or dropped; a dropped
/// claim leaves the piece unmarked; a short or corrupt piece is not committed.
#[test]
fn claim_is_exclusive_and_released_on_drop() {
    let (_d, s) = store(3 * 16384, 16384);
    let data = vec![4u8; 16384];
    let crc = wire::piece_crc(&data);
    let mut w = s.claim(1).expect("claim");
    assert_eq!(s.claim(1).err(), Some(ClaimError::Held));
    assert_eq!(
        s.write_piece(1, &data, crc).ok(),
        Some(false),
        "held elsewhere"
    );
    assert!(s.in_use());
    w.write(&data[..100]).expect("write");
    assert!(matches!(
        w.finish(crc, None),
        Err(StoreError::Length { .. })
    ));
    assert!(!s.has(1) && !s.is_claimed(1) && !s.in_use());
    let mut w = s.claim(1).expect("claim again");
    w.write(&data).expect("write");
    assert!(matches!(
        s.claim(1).expect_err("held").to_string().as_str(),
        "another writer holds the piece"
    ));
    assert!(matches!(
        w.finish(crc ^ 1, None),
        Err(StoreError::Digest { .. })
    ));
    assert!(!s.has(1));
    let mut w = s.claim(1).expect("claim a third time");
    w.write_parts(&[&data[..10], &data[10..]]).expect("write");
    assert!(matches!(w.write(&[0]), Err(StoreError::Length { .. })));
    assert_eq!(w.finish(crc, None).ok(), Some(true));
    assert_eq!(s.claim(1).err(), Some(ClaimError::Stored));
    assert_eq!(s.claim(3).err(), Some(ClaimError::OutOfRange));
}

/// Garbage collection never evicts a task with a piece claimed or a reader (`Busy`),
/// and an evicted task can be neither claimed nor marked busy: eviction and use exclude
/// each other atomically. Without the claim and the one-word state, the eviction below
/// would succeed while the writer holds the piece (and its file would vanish under it).
#[test]
fn gc_never_evicts_a_claimed_or_read_task() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("storage");
    let id = TaskId([5; 32]);
    let t = storage
        .create(id, PieceLayout::new(2 * 16384, 16384).expect("layout"))
        .expect("create");
    let data = vec![8u8; 16384];
    let w = t.claim(0).expect("claim");
    assert!(!storage.evict(&id).expect("evict"), "claimed: kept");
    assert!(storage.get(&id).is_some() && t.path().exists());
    drop(w);
    let busy = t.busy().expect("busy");
    assert!(!storage.evict(&id).expect("evict"), "being read: kept");
    drop(busy);
    assert!(storage.evict(&id).expect("evict"), "idle: evicted");
    assert!(storage.get(&id).is_none() && !t.path().exists());
    assert_eq!(t.claim(0).err(), Some(ClaimError::Retired));
    assert!(t.busy().is_none());
    assert!(matches!(
        t.write_piece(0, &data, wire::piece_crc(&data)),
        Err(StoreError::Retired)
    ));

    // Racing: a thread that claims and reads in a loop, another that evicts. Whenever a
    // use was taken, the task is still stored while it is held.
    for round in 0..200u8 {
        let id = TaskId([round; 32]);
        let t = storage
            .create(id, PieceLayout::new(16384, 16384).expect("layout"))
            .expect("create");
        let evicted = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                for _ in 0..50 {
                    if let Some(_b) = t.busy() {
                        assert!(!evicted.load(Ordering::Acquire), "evicted while read");
                        assert!(storage.get(&id).is_some());
                    }
                    if let Ok(_w) = t.claim(0) {
                        assert!(!evicted.load(Ordering::Acquire), "evicted while claimed");
                        assert!(storage.get(&id).is_some());
                    }
                }
            });
            sc.spawn(|| {
                while !storage.evict(&id).expect("evict") {
                    std::hint::spin_loop();
                }
                evicted.store(true, Ordering::Release);
            });
        });
        assert!(t.is_retired() && storage.get(&id).is_none());
    }
}

#[test]
fn bitmap_and_completion() {
    let (_d, s) = store(3 * 16384, 16384);
    for n in [2u32, 0, 1] {
        let data = vec![n as u8; 16384];
        s.write_piece(n, &data, wire::piece_crc(&data)).expect("ok");
    }
    assert!(s.is_complete());
    assert_eq!(s.bitmap_bytes(), vec![0b111]);
    assert_eq!(s.completed_length(), 3 * 16384);
}
