//! Piece hashing off the receiving thread.
//!
//! Checking a piece against its trusted BLAKE3 digest costs ~40 % of the CPU a data-plane
//! thread spends receiving it (tuning.md, "Piece digests"). A thread that hashed what it
//! receives moved 0.76x the bytes per second; so each data-plane thread has one
//! [`HashWorker`], a plain thread that computes the BLAKE3 digest of the chunk buffers the
//! fetcher hands over while the connection reads on (the receiving thread then only copies,
//! socket to buffer and buffer to page cache, and runs the crc32c while the bytes are hot in
//! its cache, as it does when no digest is checked). The chunk buffers go over a bounded lock-free queue and
//! come back, hashed and empty, for reuse: the fetcher never copies a chunk for the hash.
//!
//! The fetcher waits ([`HashWorker::give`]) while [`HASH_BUDGET`] chunks are handed over and
//! not hashed yet, so a slow hasher slows the connections down instead of growing memory;
//! the piece's digest ([`PieceHash::digest`]) arrives through an `event_listener` event,
//! which wakes the monoio thread the way the plane bridge does (monoio's cross-thread wake).

use crate::conn::RawChunk;
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use wire::{PieceDigest, PieceHasher};

/// Chunks (1 MiB each from the fetcher) one worker may hold not yet hashed: the memory a
/// slow hasher can pin per data-plane thread.
pub const HASH_BUDGET: usize = 8;

/// The running BLAKE3 digest of one piece, fed by the worker, and the digest once finished.
#[derive(Default)]
pub struct PieceHash {
    running: Mutex<PieceHasher>,
    result: OnceLock<PieceDigest>,
    done: event_listener::Event,
}

fn update(hasher: &mut PieceHasher, chunk: &RawChunk) {
    for s in chunk.slices() {
        hasher.update(s);
    }
}

impl std::fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceHash")
            .field("digest", &self.result.get().map(hex::encode))
            .finish_non_exhaustive()
    }
}

impl PieceHash {
    /// The digest, when every chunk was hashed and [`HashWorker::finish`] was processed.
    pub fn ready(&self) -> Option<PieceDigest> {
        self.result.get().copied()
    }

    /// Waits for the digest. `None` when the worker stopped first (shutdown).
    pub async fn digest(&self, worker: &HashWorker) -> Option<PieceDigest> {
        loop {
            if let Some(d) = self.ready() {
                return Some(d);
            }
            let listener = self.done.listen();
            if let Some(d) = self.ready() {
                return Some(d);
            }
            if worker.shared.stop.load(Ordering::Acquire) {
                return None;
            }
            listener.await;
        }
    }
}

enum Job {
    Chunk(Arc<PieceHash>, RawChunk),
    Finish(Arc<PieceHash>),
}

struct Shared {
    jobs: ArrayQueue<Job>,
    /// Hashed chunk buffers, emptied, for the fetcher to read into again: a stack, so that
    /// the buffer reused is the one hashed last (still in a cache), and a connection whose
    /// hasher keeps up reads into two buffers in turn rather than through all of them.
    spare: Mutex<Vec<RawChunk>>,
    /// Chunks handed over and not hashed yet.
    held: AtomicUsize,
    /// Fires when a chunk was hashed (room in the budget).
    room: event_listener::Event,
    stop: AtomicBool,
}

/// One hashing thread and its queues (see the module doc). Dropping it stops the thread
/// after the jobs already queued.
pub struct HashWorker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HashWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashWorker")
            .field("held", &self.shared.held.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HashWorker {
    /// Starts the thread `name`; `on_start` runs on it first (CPU accounting).
    pub fn start(name: String, on_start: impl FnOnce() + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            // Chunks are bounded by the budget; each piece adds one `Finish`. Room for the
            // finish jobs of as many pieces as there can be chunks, plus slack.
            jobs: ArrayQueue::new(4 * HASH_BUDGET + 64),
            spare: Mutex::new(Vec::with_capacity(HASH_BUDGET + 1)),
            held: AtomicUsize::new(0),
            room: event_listener::Event::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            on_start();
            run(&s);
        })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Whether the worker is behind: half its budget or more handed over and not hashed.
    /// It is then short of CPU (no free core), and a piece is better hashed on the
    /// receiving thread than queued behind it.
    pub fn lagging(&self) -> bool {
        self.shared.held.load(Ordering::Acquire) >= HASH_BUDGET / 2
    }

    /// A new piece to hash.
    pub fn begin(&self) -> Arc<PieceHash> {
        Arc::new(PieceHash::default())
    }

    /// Hands `chunk` (the next bytes of `piece`) to the worker and returns an empty buffer
    /// to read the next chunk into, and whether it had to wait: it waits while the worker
    /// holds [`HASH_BUDGET`] chunks. `chunk` is hashed on the spot, on this thread, when the
    /// worker stopped.
    pub async fn give(&self, piece: &Arc<PieceHash>, chunk: RawChunk) -> (RawChunk, bool) {
        let sh = &*self.shared;
        let mut waited = false;
        loop {
            if sh.stop.load(Ordering::Acquire) {
                if let Ok(mut r) = piece.running.lock() {
                    update(&mut r, &chunk);
                }
                return (empty(chunk), waited);
            }
            if sh.held.load(Ordering::Acquire) < HASH_BUDGET {
                break;
            }
            let listener = sh.room.listen();
            if sh.held.load(Ordering::Acquire) < HASH_BUDGET || sh.stop.load(Ordering::Acquire) {
                continue;
            }
            waited = true;
            listener.await;
        }
        sh.held.fetch_add(1, Ordering::AcqRel);
        self.push(Job::Chunk(piece.clone(), chunk)).await;
        let buf = sh
            .spare
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default();
        (buf, waited)
    }

    /// Every chunk of `piece` was given: the worker computes its digest after them.
    pub async fn finish(&self, piece: &Arc<PieceHash>) {
        self.push(Job::Finish(piece.clone())).await;
    }

    async fn push(&self, job: Job) {
        let mut job = job;
        loop {
            match self.shared.jobs.push(job) {
                Ok(()) => break,
                Err(j) => {
                    // Only when many pieces finish at once with no chunk between them
                    // (the finish jobs are outside the budget): let the worker catch up.
                    job = j;
                    self.wake();
                    monoio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for HashWorker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.room.notify(usize::MAX);
    }
}

fn empty(mut chunk: RawChunk) -> RawChunk {
    chunk.buf.clear();
    chunk.parts.clear();
    chunk
}

fn run(sh: &Shared) {
    loop {
        while let Some(job) = sh.jobs.pop() {
            match job {
                Job::Chunk(piece, chunk) => {
                    if let Ok(mut r) = piece.running.lock() {
                        update(&mut r, &chunk);
                    }
                    if let Ok(mut v) = sh.spare.lock() {
                        if v.len() <= HASH_BUDGET {
                            v.push(empty(chunk));
                        }
                    }
                    sh.held.fetch_sub(1, Ordering::AcqRel);
                    sh.room.notify(usize::MAX);
                }
                Job::Finish(piece) => {
                    let d = piece
                        .running
                        .lock()
                        .map(|r| r.finish())
                        .unwrap_or_else(|e| e.into_inner().finish());
                    let _ = piece.result.set(d);
                    piece.done.notify(usize::MAX);
                }
            }
        }
        if sh.stop.load(Ordering::Acquire) {
            // Wake whoever still waits for a digest that will not come.
            return;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks handed over in any split hash to the piece's digest; the buffers come back
    /// empty; more than the budget in flight is never held.
    #[test]
    fn digest_of_chunks_equals_the_piece_digest() {
        let worker = HashWorker::start("hash-test".into(), || {}).expect("start");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let Ok(mut rt) = rt else {
            panic!("monoio runtime");
        };
        rt.block_on(async {
            let piece = worker.begin();
            let mut buf = RawChunk::default();
            for part in data.chunks(100_000) {
                buf.buf.extend_from_slice(&part[..60_000]);
                buf.parts
                    .push(bytes::Bytes::copy_from_slice(&part[60_000..]));
                buf = worker.give(&piece, buf).await.0;
                assert!(buf.buf.is_empty() && buf.parts.is_empty());
                assert!(worker.shared.held.load(Ordering::Acquire) <= HASH_BUDGET);
            }
            worker.finish(&piece).await;
            assert_eq!(piece.digest(&worker).await, Some(wire::piece_digest(&data)));
        });
    }
}
