//! One piece of an origin body as it streams in, written through its claim.

use super::{Attempt, OriginError};
use dataplane::TaskStore;
use std::sync::Arc;
use std::time::Instant;

/// Bytes of an origin body gathered (as the body's own buffers, not copied) before one
/// `pwritev` into the piece's claim.
pub(super) const ORIGIN_WRITE_BATCH: usize = 1 << 20;

/// One piece of an origin body as it streams in: written through its claim
/// ([`TaskStore::claim`]) in batches, with one crc32c and BLAKE3 pass over the bytes, on
/// the blocking pool (not the tokio workers). A piece stored already or being written by
/// another writer (the data plane fetching it from a peer) is not written here; a claim
/// dropped unfinished (the transfer broke) leaves the piece missing.
pub(super) struct OriginPiece {
    pub(super) n: u32,
    writer: Option<dataplane::PieceWriter>,
    parts: Vec<bytes::Bytes>,
    pub(super) batched: usize,
    started: Instant,
}

impl OriginPiece {
    /// Piece `n`; claimed only when the body starts at its first byte (`whole`).
    pub(super) fn start(store: &Arc<TaskStore>, n: u32, whole: bool) -> Result<Self, Attempt> {
        let writer = if whole {
            match store.claim(n) {
                Ok(mut w) => {
                    w.hash_here();
                    Some(w)
                }
                Err(dataplane::ClaimError::Retired) => {
                    return Err(Attempt::Fatal(OriginError::Storage(
                        dataplane::StorageFailure::retired(
                            "the task was evicted or removed during the fetch",
                        ),
                    )))
                }
                Err(_) => None,
            }
        } else {
            None
        };
        Ok(Self {
            n,
            writer,
            parts: Vec::new(),
            batched: 0,
            started: Instant::now(),
        })
    }

    pub(super) fn add(&mut self, part: bytes::Bytes) {
        if self.writer.is_some() {
            self.batched += part.len();
            self.parts.push(part);
        }
    }

    /// Writes the gathered bytes.
    pub(super) async fn flush(&mut self) -> Result<(), Attempt> {
        let Some(mut w) = self.writer.take() else {
            return Ok(());
        };
        let parts = std::mem::take(&mut self.parts);
        self.batched = 0;
        let (w, parts) = tokio::task::spawn_blocking(move || {
            let slices: Vec<&[u8]> = parts.iter().map(|b| &b[..]).collect();
            let res = w.write_parts(&slices);
            drop(slices);
            (res.map(|()| w), parts)
        })
        .await
        .map_err(|e| {
            Attempt::Fatal(OriginError::Storage(dataplane::StorageFailure::Other(
                format!("piece write task: {e}"),
            )))
        })?;
        self.parts = parts;
        self.parts.clear();
        self.writer = Some(w.map_err(|e| Attempt::Fatal(OriginError::Storage(e.into())))?);
        Ok(())
    }

    /// Writes the rest and commits the piece: its crc32c, length and cost in microseconds
    /// when this fetch stored it, `None` when it was not this fetch's to store.
    pub(super) async fn finish(mut self) -> Result<Option<(u32, u64, u64)>, Attempt> {
        self.flush().await?;
        let Some(w) = self.writer.take() else {
            return Ok(None);
        };
        let (crc, len) = (w.crc(), w.len());
        // Finalising the hash and setting the bit: no I/O.
        let new = w
            .finish_trusted(None)
            .map_err(|e| Attempt::Fatal(OriginError::Storage(e.into())))?;
        let cost = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(new.then_some((crc, len, cost)))
    }
}
