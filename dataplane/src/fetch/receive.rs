//! Receiving a piece from a parent and settling it: the bytes written through the piece's
//! claim (or kept aside for an endgame duplicate), hashed inline or by the thread's
//! [`HashWorker`](crate::hasher::HashWorker), then committed or rejected once the digest is known
//! ([`Session::settle`]), with what that means for the connection ([`Session::settled`]).

use super::{emit, ParentError, Session};
use crate::bridge::{Event, Parent, PieceSource};
use crate::conn::{ConnError, FetchStream, FrameReader, RawChunk};
use crate::counters::Counters;
use crate::hasher::PieceHash;
use crate::storage::{ClaimError, PieceWriter, StoreError};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::TaskId;

/// Longest piece an endgame duplicate keeps in memory while the first copy is being written
/// (a longer one is read and dropped unless it holds the claim).
const MAX_ENDGAME_BUFFER: u64 = 16 << 20;

/// Bytes of a piece received and written per step (as the sendfile baseline's reader): still
/// in the cache between the socket read, the crc and the file write, and 4x fewer `pwrite`s,
/// recvs and wake-ups than 256 KiB (measured: tuning.md, 2026-11-24).
const RECEIVE_CHUNK: u64 = 1 << 20;

/// A piece whose bytes all arrived with the right crc32c, not committed yet ([`Session::settle`]).
pub(super) struct Landed {
    pub(super) n: u32,
    pub(super) crc: u32,
    /// The piece's claim, with the bytes written; `None` for a copy without it.
    pub(super) writer: Option<PieceWriter>,
    /// A copy without the claim, kept to be stored if the claimed one fails.
    pub(super) aside: Option<Vec<u8>>,
    pub(super) hash: Hashing,
    /// `crc` is the piece's trusted crc32c: the bytes were not crc-summed (their digest is
    /// checked).
    pub(super) crc_trusted: bool,
}

/// How a piece's BLAKE3 digest is being computed.
pub(super) enum Hashing {
    /// Not needed (digests neither required nor known for the task).
    None,
    /// On the receiving thread (no hash worker).
    Inline(Box<wire::PieceHasher>),
    /// By this thread's [`HashWorker`](crate::hasher::HashWorker).
    Worker(Arc<PieceHash>),
}

/// Why receiving a piece failed.
pub(super) enum Received {
    /// The connection failed mid-piece.
    Conn(ConnError),
    /// No byte of the piece arrived for this long.
    Stalled(Duration),
    /// The piece is corrupt or could not be written.
    Store(StoreError),
}

impl Session {
    /// Receives the `len` raw bytes of piece `n` chunk by chunk. With the piece's claim
    /// ([`TaskStore::claim`](crate::storage::TaskStore::claim)) each chunk is written at its place while it is still hot in
    /// the cache, extending the crc32c as it goes (a transport's several buffers, QUIC
    /// packets, with one `pwritev`). Without it (an endgame duplicate while the first copy
    /// is being written) the bytes are kept aside, to be stored only if they check out while
    /// the piece is still missing. When the piece has (or must have) a trusted digest, each
    /// chunk buffer is then handed to this thread's [`HashWorker`](crate::hasher::HashWorker),
    /// which computes its BLAKE3 digest while the connection reads on, and a fresh buffer
    /// comes back (or, when the worker is behind, this thread hashes the piece itself).
    /// Returns the piece landed (its crc32c checked);
    /// [`Session::settle`] checks the rest and commits it. The last chunk buffer is handed
    /// back for reuse.
    pub(super) async fn receive_piece<S: FetchStream>(
        &self,
        reader: &mut FrameReader,
        stream: &mut S,
        n: u32,
        len: u64,
        crc: u32,
        buf: RawChunk,
    ) -> (Result<Landed, Received>, RawChunk) {
        let mut writer = match self.store.claim(n) {
            Ok(w) => Some(w),
            Err(ClaimError::Retired) => return (Err(Received::Store(StoreError::Retired)), buf),
            Err(ClaimError::OutOfRange) => {
                return (Err(Received::Store(StoreError::OutOfRange(n))), buf)
            }
            Err(ClaimError::Stored | ClaimError::Held) => None,
        };
        let mut buf = buf;
        // Without the claim, keep the bytes aside while another writer holds the piece: if
        // this copy checks out and the other does not, it is stored then.
        let mut aside: Option<Vec<u8>> =
            (writer.is_none() && len <= MAX_ENDGAME_BUFFER && self.store.is_claimed(n))
                .then(|| Vec::with_capacity(usize::try_from(len).unwrap_or(0)));
        let mut got = 0u64;
        let mut running = 0u32;
        // The crc32c is computed here, on bytes still hot in the cache (as with no digest);
        // the trusted digest is checked where the piece is committed (`PieceWriter::finish`).
        // With a hash worker, it computes the digest off this thread.
        // (A copy that is neither written nor kept aside is read and dropped: not hashed.)
        let hashed = (writer.is_some() || aside.is_some())
            && (self.store.digests_required() || self.store.piece_digest(n).is_some());
        // Checked against a trusted digest whose source also gave the crc: a parent that
        // announces another crc is lying (refused unread, as a forged piece); otherwise the
        // crc is not computed at all (the digest check covers the bytes).
        let trusted_crc = if hashed {
            self.store.trusted_crc(n)
        } else {
            None
        };
        if let Some(t) = trusted_crc {
            if t != crc {
                let refused = StoreError::TrustedCrc {
                    number: n,
                    expected: t,
                    got: crc,
                };
                return (Err(Received::Store(refused)), buf);
            }
            if let Some(w) = writer.as_mut() {
                w.crc_known(t);
            }
        }
        let crc_trusted = trusted_crc.is_some();
        // A worker that is behind has no free core to run on: then this thread hashes.
        let mut hash = match (hashed, &self.hasher) {
            (false, _) => Hashing::None,
            (true, Some(w)) if !w.lagging() => Hashing::Worker(w.begin()),
            (true, w) => {
                if w.is_some() {
                    Counters::add(&self.counters.pieces_hashed_inline, 1);
                }
                Hashing::Inline(Box::default())
            }
        };
        while got < len {
            let want = (len - got).min(RECEIVE_CHUNK);
            // A parent that stops sending mid-piece is dropped like one that never answers
            // (the buffer goes with the cancelled read; the connection is closed anyway).
            let read = monoio::time::timeout(
                self.cfg.piece_timeout,
                stream.read_raw_chunk(reader, want as usize, buf),
            )
            .await;
            let Ok((res, b)) = read else {
                return (
                    Err(Received::Stalled(self.cfg.piece_timeout)),
                    RawChunk::default(),
                );
            };
            buf = b;
            if let Err(e) = res {
                return (Err(Received::Conn(e)), buf);
            }
            let parts: Vec<&[u8]> = buf.slices().collect();
            if writer.is_none() && !crc_trusted {
                // (The writer extends its own crc as it writes.)
                for part in &parts {
                    running = wire::piece_crc_append(running, part);
                }
            }
            let written = match writer.as_mut() {
                Some(w) => w.write_parts(&parts),
                None => Ok(()),
            };
            if let Some(a) = aside.as_mut() {
                for part in &parts {
                    a.extend_from_slice(part);
                }
            }
            if let Hashing::Inline(h) = &mut hash {
                for part in &parts {
                    h.update(part);
                }
            }
            drop(parts);
            if let Err(e) = written {
                return (Err(Received::Store(e)), buf);
            }
            if let (Hashing::Worker(piece), Some(w)) = (&hash, &self.hasher) {
                let (b, waited) = w.give(piece, buf).await;
                buf = b;
                if waited {
                    Counters::add(&self.counters.hash_handover_waits, 1);
                }
            }
            got += want;
        }
        if let Some(w) = writer.as_ref() {
            running = w.crc();
        } else if crc_trusted {
            running = crc;
        }
        if running != crc {
            return (
                Err(Received::Store(StoreError::Digest {
                    number: n,
                    expected: crc,
                    got: running,
                })),
                buf,
            );
        }
        if let (Hashing::Worker(piece), Some(w)) = (&hash, &self.hasher) {
            w.finish(piece).await;
        }
        (
            Ok(Landed {
                n,
                crc,
                writer,
                aside,
                hash,
                crc_trusted,
            }),
            buf,
        )
    }

    /// Commits a landed piece once its digest is known (waiting for the hash, and for a
    /// trusted digest still on its way, at most `digest_wait`): `Ok(true)` this copy was
    /// stored, `Ok(false)` another was (or this one was not needed). A piece whose bytes do
    /// not match is never marked ([`StoreError::PieceDigest`]); its claim is released.
    /// `None`: dropped unjudged, because `condemned` was set meanwhile (an earlier piece of
    /// the same connection was corrupt or forged: its parent is dropped at the first one).
    pub(super) async fn settle(
        &self,
        landed: Landed,
        condemned: &Cell<bool>,
    ) -> Option<Result<bool, StoreError>> {
        let res = match self.judge(landed, condemned).await {
            Err(None) => None,
            Err(Some(e)) => Some(Err(e)),
            Ok(v) => Some(Ok(v)),
        };
        if matches!(
            res,
            Some(Err(
                StoreError::PieceDigest { .. } | StoreError::Digest { .. }
            ))
        ) {
            // Before any await: later pieces of this connection see it.
            condemned.set(true);
        }
        res
    }

    /// [`Session::settle`]'s work; `Err(None)`: dropped unjudged.
    async fn judge(
        &self,
        landed: Landed,
        condemned: &Cell<bool>,
    ) -> Result<bool, Option<StoreError>> {
        let Landed {
            n,
            crc,
            writer,
            aside,
            hash,
            crc_trusted,
        } = landed;
        let digest = match hash {
            Hashing::None => None,
            Hashing::Inline(h) => Some(h.finish()),
            Hashing::Worker(piece) => {
                let digest = match self.hasher.as_deref() {
                    Some(w) => piece.digest(w).await,
                    None => None,
                };
                let digest = digest.ok_or(Some(StoreError::DigestUnknown(n)))?;
                if condemned.get() {
                    return Err(None);
                }
                Some(digest)
            }
        };
        if digest.is_some() && self.store.piece_digest(n).is_none() {
            // Digest not known yet (the source's report is still on its way through the
            // scheduler): hold the piece, and the claim, until it is, at most `digest_wait`.
            self.wait_digest(n).await;
        }
        if condemned.get() {
            return Err(None);
        }
        if let Some(w) = writer {
            return w.finish(crc, digest).map_err(Some);
        }
        let Some(a) = aside else {
            return Ok(false);
        };
        if let Some(d) = digest {
            // Checked before the copy kept aside overwrites anything.
            if let Some(expected) = self.store.piece_digest(n).filter(|e| *e != d) {
                return Err(Some(StoreError::PieceDigest {
                    number: n,
                    expected,
                    got: d,
                }));
            }
        }
        match self.store.claim(n) {
            Ok(mut w) => {
                if crc_trusted {
                    w.crc_known(crc);
                }
                w.write(&a).map_err(Some)?;
                w.finish(crc, digest).map_err(Some)
            }
            Err(ClaimError::Retired) => Err(Some(StoreError::Retired)),
            // Stored by the other copy, or it is still being written.
            Err(_) => Ok(false),
        }
    }

    /// What a settled piece means for the connection that brought it: counters, events,
    /// and the error that drops the parent (a corrupt or forged piece, a storage failure).
    pub(super) async fn settled(
        &self,
        res: Result<bool, StoreError>,
        n: u32,
        len: u64,
        crc: u32,
        p: &Parent,
        took: Duration,
    ) -> Result<(), ParentError> {
        let task = self.task();
        match res {
            Ok(false) => {
                // The other copy of an endgame duplicate got here first.
                self.release(n);
                Counters::add(&self.counters.endgame_duplicates, 1);
            }
            Ok(true) => {
                self.release(n);
                let source = if p.is_seed {
                    Counters::add(&self.counters.bytes_from_seed, len);
                    PieceSource::Seed(p.host_id.clone())
                } else {
                    Counters::add(&self.counters.bytes_from_peers, len);
                    PieceSource::Peer(p.host_id.clone())
                };
                Counters::add(&self.counters.pieces_downloaded, 1);
                emit(
                    &self.bridge,
                    Event::PieceFinished {
                        task,
                        number: n,
                        crc32c: crc,
                        length: len,
                        source,
                        cost_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                    },
                )
                .await;
            }
            Err(StoreError::DigestUnknown(_)) => {
                // Not the parent's fault: the piece is asked for again later.
                Counters::add(&self.counters.digest_wait_timeouts, 1);
                self.release(n);
            }
            Err(e @ (StoreError::PieceDigest { .. } | StoreError::TrustedCrc { .. })) => {
                // Bytes other than the source's with a matching crc32c, or announced with a
                // crc32c other than the source's: a forging (or badly broken) parent. Never stored; the parent is dropped and reported, and the
                // piece fetched elsewhere.
                Counters::add(&self.counters.pieces_forged, 1);
                let reason = format!("forged piece: {e}");
                tracing::warn!(task = %task, parent = %p.host_id, "{reason}");
                return Err(self
                    .corrupt_piece(task, n, &p.host_id, reason)
                    .await
                    .forged());
            }
            Err(StoreError::Digest { expected, got, .. }) => {
                let reason =
                    format!("crc32c {got:08x} does not match the announced {expected:08x}");
                return Err(self.corrupt_piece(task, n, &p.host_id, reason).await);
            }
            Err(StoreError::Retired) => {
                // Removed on purpose (failed run, user delete, eviction): whoever removed it
                // knows; the session just ends, without events about a task that is gone.
                self.release(n);
                self.cancel();
                return Err(ParentError::Retired);
            }
            Err(e) => {
                self.release(n);
                return Err(ParentError::Storage(n, e.into()));
            }
        }
        Ok(())
    }

    /// Piece `n` from `parent` failed its check (`reason`): counted, released for another
    /// parent, reported; the error that drops the parent.
    async fn corrupt_piece(
        &self,
        task: TaskId,
        n: u32,
        parent: &str,
        reason: String,
    ) -> ParentError {
        Counters::add(&self.counters.pieces_corrupt, 1);
        self.release(n);
        emit(
            &self.bridge,
            Event::PieceFailed {
                task,
                number: n,
                parent: parent.to_owned(),
                reason: reason.clone(),
            },
        )
        .await;
        ParentError::Corrupt(n, reason)
    }

    /// Waits until the trusted digest of piece `n` is known, or `digest_wait` passed.
    async fn wait_digest(&self, n: u32) {
        let deadline = Instant::now() + self.cfg.digest_wait;
        Counters::add(&self.counters.digest_waits, 1);
        while self.store.piece_digest(n).is_none() && !self.is_done() {
            let listener = self.store.listen_digests();
            if self.store.piece_digest(n).is_some() || !self.store.digests_required() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Bounded again by 100 ms: a wake-up from another thread is not missed for long.
            let _ = monoio::time::timeout(left.min(Duration::from_millis(100)), listener).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! [`Session::receive_piece`] and [`Session::settle`] on a real [`TaskStore`] in a temp
    //! dir, the piece's bytes read from memory (no sockets), for pieces whose trusted crc32c
    //! came with their trusted digest.

    use super::*;
    use crate::fetch::picker::tests::{session, PLEN};
    use crate::fetch::ParentError;
    use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
    use monoio::io::{AsyncReadRent, AsyncWriteRent};
    use monoio::BufResult;
    use std::future::Future;

    /// A parent's stream in memory: reads the bytes given, writes go nowhere.
    struct Mem<'a>(&'a [u8]);

    impl AsyncReadRent for Mem<'_> {
        fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
            self.0.read(buf)
        }

        fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
            self.0.readv(buf)
        }
    }

    impl AsyncWriteRent for Mem<'_> {
        fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
            let n = buf.bytes_init();
            async move { (Ok(n), buf) }
        }

        async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            (Ok(0), buf)
        }

        async fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }

        async fn shutdown(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl FetchStream for Mem<'_> {}

    fn block_on<F: Future>(f: F) -> F::Output {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let Ok(mut rt) = rt else {
            panic!("monoio runtime");
        };
        rt.block_on(f)
    }

    fn parent() -> Parent {
        Parent {
            host_id: "mallory".into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            quic_addr: None,
            is_seed: false,
        }
    }

    /// The source's piece 0 (its bytes, digest and crc), made known to the session's store
    /// as the scheduler's `PieceDigests` would.
    fn trusted_piece(s: &Session) -> (Vec<u8>, u32) {
        let data: Vec<u8> = (0..PLEN).map(|i| (i * 31 % 251) as u8).collect();
        let crc = wire::piece_crc(&data);
        assert_eq!(s.store.set_digest(0, wire::piece_digest(&data)), Ok(true));
        s.store.set_trusted_crc(0, crc);
        s.store.require_digests();
        (data, crc)
    }

    /// A piece whose header crc is the trusted one: received without a crc pass, checked
    /// against its digest, committed with the trusted crc.
    #[test]
    fn piece_with_the_trusted_crc_is_committed_with_it() {
        let (_d, s) = session(2);
        let (data, crc) = trusted_piece(&s);
        block_on(async {
            let mut reader = FrameReader::new();
            let mut stream = Mem(&data);
            let (res, _) = s
                .receive_piece(&mut reader, &mut stream, 0, PLEN, crc, RawChunk::default())
                .await;
            let Ok(landed) = res else {
                panic!("piece refused");
            };
            assert!(landed.crc_trusted, "the crc was not to be computed");
            assert!(matches!(landed.hash, Hashing::Inline(_)));
            let res = s.settle(landed, &Cell::new(false)).await;
            assert!(matches!(res, Some(Ok(true))), "committed: {res:?}");
        });
        assert!(s.store.has(0));
        assert_eq!(s.store.piece_crc(0), Some(crc));
        let mut back = Vec::new();
        s.store.read_piece(0, &mut back).expect("read");
        assert_eq!(back, data);
    }

    /// A parent that announces a crc other than the trusted one is forging: refused before
    /// its bytes are read (nothing written), counted as forged, the parent dropped.
    #[test]
    fn header_crc_other_than_the_trusted_one_is_forged() {
        let (_d, s) = session(2);
        let (_, crc) = trusted_piece(&s);
        let forged = vec![7u8; PLEN as usize];
        let forged_crc = wire::piece_crc(&forged);
        assert_ne!(forged_crc, crc);
        let err = block_on(async {
            let mut reader = FrameReader::new();
            let mut stream = Mem(&forged);
            let (res, _) = s
                .receive_piece(
                    &mut reader,
                    &mut stream,
                    0,
                    PLEN,
                    forged_crc,
                    RawChunk::default(),
                )
                .await;
            assert_eq!(stream.0.len(), forged.len(), "no byte of the piece read");
            let e = match res {
                Err(Received::Store(e @ StoreError::TrustedCrc { .. })) => e,
                Err(Received::Store(e)) => panic!("refused for another reason: {e}"),
                Err(_) => panic!("refused for another reason"),
                Ok(_) => panic!("forged piece landed"),
            };
            s.settled(Err(e), 0, PLEN, forged_crc, &parent(), Duration::ZERO)
                .await
        });
        assert!(matches!(err, Err(ParentError::Forged(0, _))), "{err:?}");
        assert_eq!(
            s.counters
                .pieces_forged
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert!(!s.store.has(0));
        assert!(!s.store.is_claimed(0), "claim released");
    }

    /// Forged bytes announced with the trusted crc: not crc-summed, but the digest check
    /// still refuses them.
    #[test]
    fn forged_bytes_with_the_trusted_crc_fail_the_digest() {
        let (_d, s) = session(2);
        let (_, crc) = trusted_piece(&s);
        let forged = vec![7u8; PLEN as usize];
        let res = block_on(async {
            let mut reader = FrameReader::new();
            let mut stream = Mem(&forged);
            let (res, _) = s
                .receive_piece(&mut reader, &mut stream, 0, PLEN, crc, RawChunk::default())
                .await;
            let Ok(landed) = res else {
                panic!("refused before its digest");
            };
            s.settle(landed, &Cell::new(false)).await
        });
        assert!(
            matches!(res, Some(Err(StoreError::PieceDigest { number: 0, .. }))),
            "{res:?}"
        );
        assert!(!s.store.has(0));
    }
}
