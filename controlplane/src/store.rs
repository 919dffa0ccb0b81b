//! Task metadata that survives a restart: an embedded [redb] database in the storage dir
//! (`metadata.redb`) next to the content files.
//!
//! Per task it holds a [`TaskRecord`] (url, layout, state, created / last-access times) and
//! the piece bitmap with one crc32c per piece. Nothing here is on the data plane's path: the
//! control plane's flush loop ([`MetaStore::flush`], every `storage.persist_interval` and
//! when a download finishes) compares each task's piece count with what it last wrote and
//! writes the changed tasks in one transaction.
//!
//! Ordering rule: a piece's bit is written here only after its bytes are durable. A flush
//! first snapshots a task's bitmap (the data plane sets a bit only after the piece's bytes
//! are in the file), then `fdatasync`s the content file, then commits the snapshot (redb
//! commits are durable). A crash in between loses bits, never bytes behind a bit. On start,
//! [`MetaStore::restore`] trusts a recorded piece only when the content file reaches the
//! piece's end, and, with `storage.verify_on_start`, only when its bytes still match its
//! crc32c.

use anyhow::Context as _;
use dataplane::{Storage, TaskStore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wire::{PieceLayout, TaskId};

/// Task id (hex) → [`TaskRecord`] as JSON.
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Task id (hex) → piece bitmap (wire format) followed by one little-endian crc32c per piece.
const PIECES: TableDefinition<&str, &[u8]> = TableDefinition::new("pieces");

/// A task whose pieces did not change is written again for its last access only when that
/// moved by more than this (uploads touch it for every piece).
const ACCESS_GRANULARITY_MS: u64 = 60_000;

/// File name of the metadata database in the storage dir.
pub const DB_FILE: &str = "metadata.redb";

/// What is kept of a task besides its pieces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Task id (hex).
    pub id: String,
    /// Origin URL ("" when unknown, e.g. an imported file). Request headers are not kept:
    /// they may carry credentials.
    pub url: String,
    /// Content length in bytes.
    pub content_length: u64,
    /// Piece length in bytes.
    pub piece_length: u64,
    /// Number of pieces.
    pub piece_count: u32,
    /// Pieces recorded as stored.
    pub finished_pieces: u32,
    /// Every piece is stored.
    pub finished: bool,
    /// Unix time in milliseconds when the task was first recorded.
    pub created_ms: u64,
    /// Unix time in milliseconds of the last use.
    pub last_access_ms: u64,
}

/// A loaded task: its record, piece bitmap (wire format) and one crc32c per piece.
pub type Loaded = (TaskRecord, Vec<u8>, Vec<u32>);

/// What the flush loop last wrote for a task.
#[derive(Debug, Clone)]
struct Written {
    /// The store it was written from: a store made later under the same id (the task
    /// removed and fetched again) is written afresh, whatever its piece count. (A `Weak`
    /// keeps the allocation, so no other store can ever have this address.)
    store: std::sync::Weak<TaskStore>,
    pieces: u32,
    last_access: u64,
    created: u64,
}

impl Written {
    /// Whether this was written from `t` (not from an earlier store of the same id).
    fn is_of(&self, t: &Arc<TaskStore>) -> bool {
        self.store.as_ptr() == Arc::as_ptr(t)
    }
}

/// The metadata database of one storage dir.
#[derive(Debug)]
pub struct MetaStore {
    db: Database,
    path: PathBuf,
    /// Held for the whole of a flush, from the bitmap snapshots to the commit: two flushes
    /// at once (the periodic one and the one of a finishing download) could otherwise
    /// commit in the opposite order of their snapshots, and the older snapshot would
    /// overwrite the newer record until the next flush (a finished task recorded as
    /// unfinished, seen after a SIGKILL).
    flushing: Mutex<()>,
    /// What was last written per task; serializes a flush's commit with deletions.
    written: Mutex<HashMap<TaskId, Written>>,
    /// URLs of tasks started by this daemon, recorded with the task.
    urls: Mutex<HashMap<TaskId, String>>,
}

/// A restored task, as [`MetaStore::restore`] reports it.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Task id.
    pub id: TaskId,
    /// Pieces recorded.
    pub recorded: u32,
    /// Pieces trusted after the checks.
    pub trusted: u32,
    /// Pieces in the task.
    pub piece_count: u32,
}

fn encode_pieces(bitmap: &[u8], crcs: &[u32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bitmap.len() + 4 * crcs.len());
    v.extend_from_slice(bitmap);
    for c in crcs {
        v.extend_from_slice(&c.to_le_bytes());
    }
    v
}

/// Splits a `pieces` value of a task with `count` pieces; `None` when it has the wrong size.
fn decode_pieces(v: &[u8], count: u32) -> Option<(Vec<u8>, Vec<u32>)> {
    let blen = wire::frame::bitmap_len(count);
    if v.len() != blen + 4 * count as usize {
        return None;
    }
    let (bits, rest) = v.split_at(blen);
    let crcs = rest
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((bits.to_vec(), crcs))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl MetaStore {
    /// Opens (or creates) `metadata.redb` in `dir`. Fails when another process has it open.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(DB_FILE);
        let db = Database::create(&path)
            .with_context(|| format!("opening the metadata store {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.open_table(PIECES)?;
        txn.commit()?;
        Ok(Self {
            db,
            path,
            flushing: Mutex::new(()),
            written: Mutex::new(HashMap::new()),
            urls: Mutex::new(HashMap::new()),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every task record with its bitmap and crcs (records whose piece data is missing or
    /// malformed come with an empty bitmap).
    pub fn load(&self) -> anyhow::Result<Vec<Loaded>> {
        let txn = self.db.begin_read()?;
        let tasks = txn.open_table(TASKS)?;
        let pieces = txn.open_table(PIECES)?;
        let mut out = Vec::new();
        for item in tasks.iter()? {
            let (k, v) = item?;
            let Ok(rec) = serde_json::from_slice::<TaskRecord>(v.value()) else {
                tracing::warn!(task = %k.value(), "unreadable task record skipped");
                continue;
            };
            let (bits, crcs) = pieces
                .get(k.value())?
                .and_then(|p| decode_pieces(p.value(), rec.piece_count))
                .unwrap_or_default();
            out.push((rec, bits, crcs));
        }
        Ok(out)
    }

    /// Re-creates the tasks of the database in `storage` (see the module doc for which
    /// pieces are trusted), drops records whose content file is gone or unusable, and removes
    /// content files no record names (left by a crash before their first flush).
    pub fn restore(&self, storage: &Storage, verify: bool) -> anyhow::Result<Vec<Restored>> {
        let dir = storage.dir().to_path_buf();
        let mut restored = Vec::new();
        let mut drop_ids = Vec::new();
        let mut rewrite = Vec::new();
        for (rec, bits, crcs) in self.load()? {
            let Ok(id) = TaskId::parse(&rec.id) else {
                drop_ids.push(rec.id.clone());
                continue;
            };
            let layout = match PieceLayout::new(rec.content_length, rec.piece_length) {
                Ok(l) if l.piece_count() == rec.piece_count => l,
                _ => {
                    tracing::warn!(task = %id, "task record with a bad layout dropped");
                    drop_ids.push(rec.id.clone());
                    continue;
                }
            };
            let file = dir.join(format!("{id}.data"));
            if !file.exists() {
                tracing::info!(task = %id, "content file gone; record dropped");
                drop_ids.push(rec.id.clone());
                continue;
            }
            let store = match TaskStore::restore(&dir, id, layout, &bits, &crcs, verify) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(task = %id, "restoring task: {e}; dropped");
                    let _ = std::fs::remove_file(&file);
                    drop_ids.push(rec.id.clone());
                    continue;
                }
            };
            store.set_last_access(rec.last_access_ms);
            let store = Arc::new(store);
            let trusted = store.finished_count();
            if trusted != rec.finished_pieces {
                tracing::warn!(task = %id, recorded = rec.finished_pieces, trusted, "pieces failed the restore checks; they will be fetched again");
                rewrite.push(store.clone());
            }
            restored.push(Restored {
                id,
                recorded: rec.finished_pieces,
                trusted,
                piece_count: rec.piece_count,
            });
            lock(&self.urls).insert(id, rec.url.clone());
            lock(&self.written).insert(
                id,
                Written {
                    store: Arc::downgrade(&store),
                    pieces: trusted,
                    last_access: rec.last_access_ms,
                    created: rec.created_ms,
                },
            );
            storage.insert(store);
        }
        if !drop_ids.is_empty() {
            let txn = self.db.begin_write()?;
            {
                let mut t = txn.open_table(TASKS)?;
                let mut p = txn.open_table(PIECES)?;
                for id in &drop_ids {
                    t.remove(id.as_str())?;
                    p.remove(id.as_str())?;
                }
            }
            txn.commit()?;
        }
        // Checks dropped pieces: record that before the file (now sized back to full length)
        // could make them look present on the next start.
        if !rewrite.is_empty() {
            self.write(
                storage,
                &rewrite
                    .iter()
                    .map(|s| (s.clone(), true))
                    .collect::<Vec<_>>(),
            )?;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".data")) else {
                    continue;
                };
                let known = TaskId::parse(stem).is_ok_and(|id| storage.get(&id).is_some());
                if !known {
                    tracing::info!("removing content file {stem}.data that no record names");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(restored)
    }

    /// Remembers the URL of a task this daemon downloads, to record it with the task.
    pub fn note_url(&self, id: TaskId, url: &str) {
        lock(&self.urls).entry(id).or_insert_with(|| url.to_owned());
    }

    /// Writes the tasks of `storage` whose pieces changed since the last flush (or whose last
    /// access moved by more than a minute), and removes the records of tasks no longer in
    /// `storage`. Blocking (fdatasync, redb commit): run it off the async threads. Returns
    /// the number of tasks written.
    pub fn flush(&self, storage: &Storage) -> anyhow::Result<usize> {
        let _flushing = lock(&self.flushing);
        let tasks = storage.tasks();
        let mut dirty = Vec::new();
        let gone: Vec<TaskId> = {
            let written = lock(&self.written);
            for t in &tasks {
                match written.get(&t.id()) {
                    Some(w) if w.is_of(t) && w.pieces == t.finished_count() => {
                        if t.last_access() > w.last_access.saturating_add(ACCESS_GRANULARITY_MS) {
                            dirty.push((t.clone(), false));
                        }
                    }
                    _ => dirty.push((t.clone(), true)),
                }
            }
            written
                .keys()
                .filter(|id| storage.get(id).is_none())
                .copied()
                .collect()
        };
        for id in gone {
            self.delete(&id)?;
        }
        if dirty.is_empty() {
            return Ok(0);
        }
        self.write(storage, &dirty)?;
        Ok(dirty.len())
    }

    /// Writes the records of `tasks` (with their pieces when the flag says so).
    fn write(&self, storage: &Storage, tasks: &[(Arc<TaskStore>, bool)]) -> anyhow::Result<()> {
        // Snapshot the bitmaps first, then make the bytes behind them durable.
        let mut rows = Vec::with_capacity(tasks.len());
        for (t, with_pieces) in tasks {
            // With the pieces, the count is the snapshot's own: a second read of the live
            // counter could include a piece stored after the bitmap was read (the record's
            // count and bitmap would disagree).
            let (count, pieces) = if *with_pieces {
                let bits = t.bitmap_bytes();
                let count = bits.iter().map(|b| b.count_ones()).sum();
                (count, Some(encode_pieces(&bits, &t.crcs())))
            } else {
                (t.finished_count(), None)
            };
            if pieces.is_some() {
                if let Err(e) = t.file().sync_data() {
                    tracing::warn!(task = %t.id(), "syncing the content file: {e}; not recorded this time");
                    continue;
                }
            }
            rows.push((t.clone(), count, pieces));
        }
        #[cfg(test)]
        tests::AFTER_SNAPSHOT.with(|h| {
            if let Some(hook) = h.borrow_mut().as_mut() {
                hook();
            }
        });
        let mut written = lock(&self.written);
        let now = dataplane::storage::unix_millis();
        let txn = self.db.begin_write()?;
        let mut done = Vec::new();
        {
            let mut tt = txn.open_table(TASKS)?;
            let mut pt = txn.open_table(PIECES)?;
            for (t, count, pieces) in &rows {
                let id = t.id();
                // Removed meanwhile (perhaps made again, a new store under the same id):
                // do not bring its record back, or write it over the new store's.
                if !storage.get(&id).is_some_and(|now| Arc::ptr_eq(&now, t)) {
                    continue;
                }
                let l = t.layout();
                let created = written
                    .get(&id)
                    .filter(|w| w.is_of(t))
                    .map_or(now, |w| w.created);
                let rec = TaskRecord {
                    id: id.to_hex(),
                    url: lock(&self.urls).get(&id).cloned().unwrap_or_default(),
                    content_length: l.content_length(),
                    piece_length: l.piece_length(),
                    piece_count: l.piece_count(),
                    finished_pieces: *count,
                    finished: *count == l.piece_count(),
                    created_ms: created,
                    last_access_ms: t.last_access(),
                };
                let key = id.to_hex();
                tt.insert(key.as_str(), serde_json::to_vec(&rec)?.as_slice())?;
                if let Some(p) = pieces {
                    pt.insert(key.as_str(), p.as_slice())?;
                }
                let prev_pieces = written.get(&id).map(|w| w.pieces);
                done.push((
                    id,
                    Written {
                        store: Arc::downgrade(t),
                        pieces: if pieces.is_some() {
                            *count
                        } else {
                            prev_pieces.unwrap_or(*count)
                        },
                        last_access: rec.last_access_ms,
                        created,
                    },
                ));
            }
        }
        txn.commit()?;
        for (id, w) in done {
            written.insert(id, w);
        }
        Ok(())
    }

    /// Removes the record of `id` (the caller removes the task from storage first).
    pub fn delete(&self, id: &TaskId) -> anyhow::Result<()> {
        let mut written = lock(&self.written);
        let key = id.to_hex();
        let txn = self.db.begin_write()?;
        {
            txn.open_table(TASKS)?.remove(key.as_str())?;
            txn.open_table(PIECES)?.remove(key.as_str())?;
        }
        txn.commit()?;
        written.remove(id);
        lock(&self.urls).remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::mpsc;

    thread_local! {
        /// Runs in this thread's flushes between the bitmap snapshots and the commit.
        pub(super) static AFTER_SNAPSHOT: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    }

    fn piece(n: u32, len: usize) -> (Vec<u8>, u32) {
        let v = vec![n as u8 + 1; len];
        let c = wire::piece_crc(&v);
        (v, c)
    }

    #[test]
    fn flushed_pieces_come_back_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PieceLayout::new(4 * 16384, 16384).expect("layout");
        let id = TaskId([3; 32]);
        {
            let storage = Storage::open(dir.path()).expect("storage");
            let meta = MetaStore::open(dir.path()).expect("meta");
            meta.note_url(id, "http://origin/x");
            let s = storage.create(id, layout).expect("create");
            for n in [0, 1] {
                let (d, c) = piece(n, 16384);
                s.write_piece(n, &d, c).expect("write");
            }
            assert_eq!(meta.flush(&storage).expect("flush"), 1);
            assert_eq!(meta.flush(&storage).expect("flush"), 0, "nothing changed");
            let (d, c) = piece(3, 16384);
            s.write_piece(3, &d, c).expect("write");
            assert_eq!(meta.flush(&storage).expect("flush"), 1);
            // A stray file no record names is removed on restore.
            std::fs::write(dir.path().join(format!("{}.data", TaskId([4; 32]))), b"x")
                .expect("stray");
        }
        let storage = Storage::open(dir.path()).expect("storage");
        let meta = MetaStore::open(dir.path()).expect("meta");
        let r = meta.restore(&storage, true).expect("restore");
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].recorded, r[0].trusted, r[0].piece_count), (3, 3, 4));
        let s = storage.get(&id).expect("restored");
        assert!(s.has(0) && s.has(1) && !s.has(2) && s.has(3));
        let (d, c) = piece(3, 16384);
        assert_eq!(s.piece_crc(3), Some(c));
        let mut buf = Vec::new();
        s.read_piece(3, &mut buf).expect("read");
        assert_eq!(buf, d);
        let recs = meta.load().expect("load");
        assert_eq!(recs[0].0.url, "http://origin/x");
        assert!(!recs[0].0.finished);
        assert!(!dir
            .path()
            .join(format!("{}.data", TaskId([4; 32])))
            .exists());
        // Removing from storage and flushing drops the record.
        storage.remove(&id).expect("remove");
        meta.flush(&storage).expect("flush");
        assert!(meta.load().expect("load").is_empty());
    }

    /// A task removed from storage (a failed download) and made again under the same id is
    /// recorded from its new store, even with as many pieces as the old one had.
    #[test]
    fn a_task_made_again_is_recorded_from_its_new_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("storage");
        let meta = MetaStore::open(dir.path()).expect("meta");
        let id = TaskId([6; 32]);
        let layout = PieceLayout::new(4 * 16384, 16384).expect("layout");
        let old = storage.create(id, layout).expect("create");
        for n in [0, 1] {
            let (d, c) = piece(n, 16384);
            old.write_piece(n, &d, c).expect("write");
        }
        assert_eq!(meta.flush(&storage).expect("flush"), 1);
        storage.remove(&id).expect("remove");
        let new = storage.create(id, layout).expect("create again");
        for n in [2, 3] {
            let (d, c) = piece(n, 16384);
            new.write_piece(n, &d, c).expect("write");
        }
        assert_eq!(meta.flush(&storage).expect("flush"), 1);
        let recs = meta.load().expect("load");
        let (rec, bits, _) = recs.first().expect("a record");
        assert_eq!(rec.finished_pieces, 2);
        assert_eq!(
            bits,
            &vec![0b1100],
            "the new store's pieces, not the old one's"
        );
    }

    /// The periodic flush can run beside the one a finishing download makes. A flush that
    /// snapshotted the task before its last piece must not commit after the finishing flush
    /// (it would record the finished task as unfinished until the next flush).
    #[test]
    fn an_older_snapshot_never_lands_on_top_of_a_newer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Arc::new(Storage::open(dir.path()).expect("storage"));
        let meta = Arc::new(MetaStore::open(dir.path()).expect("meta"));
        let id = TaskId([5; 32]);
        let layout = PieceLayout::new(2 * 16384, 16384).expect("layout");
        let s = storage.create(id, layout).expect("create");
        let (d, c) = piece(0, 16384);
        s.write_piece(0, &d, c).expect("write");

        // The periodic flush: snapshots one piece, then waits for `go` before committing.
        let (snapped_tx, snapped_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let periodic = {
            let (storage, meta) = (storage.clone(), meta.clone());
            std::thread::spawn(move || {
                let mut hook = Some((snapped_tx, go_rx));
                AFTER_SNAPSHOT.with(|h| {
                    *h.borrow_mut() = Some(Box::new(move || {
                        if let Some((snapped, go)) = hook.take() {
                            let _ = snapped.send(());
                            let _ = go.recv();
                        }
                    }))
                });
                meta.flush(&storage).expect("periodic flush");
            })
        };
        snapped_rx
            .recv()
            .expect("the periodic flush took its snapshot");

        // The download finishes and flushes while the periodic flush is between its
        // snapshot and its commit.
        let (d, c) = piece(1, 16384);
        s.write_piece(1, &d, c).expect("write");
        let finishing = {
            let (storage, meta) = (storage.clone(), meta.clone());
            std::thread::spawn(move || meta.flush(&storage).expect("finishing flush"))
        };
        // Give an unserialized finishing flush time to commit first (with one flush at a
        // time it waits for the periodic one instead; either way the result must hold).
        std::thread::sleep(std::time::Duration::from_millis(200));
        go_tx.send(()).expect("release the periodic flush");
        periodic.join().expect("periodic flush thread");
        finishing.join().expect("finishing flush thread");

        let recs = meta.load().expect("load");
        let (rec, bits, _) = recs.first().expect("a record");
        assert!(rec.finished && rec.finished_pieces == 2, "{rec:?}");
        assert_eq!(bits, &vec![0b11], "both pieces recorded");
    }
}
