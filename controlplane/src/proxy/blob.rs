//! Streaming a P2P blob to a client: bytes of the task file sent as each piece is stored,
//! hashed on the way when the whole blob is asked for, the last chunk held back until the
//! digest matches (see the parent module's docs).

use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use dataplane::TaskStore;
use hyper::body::{Bytes, Frame};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::{BoxError, CHUNK, PIECE_POLL};
use crate::daemon::Context;
use crate::task::TaskState;

/// Why a P2P blob stream stopped early.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    #[error("{0}")]
    Task(String),
    #[error("reading the task file: {0}")]
    Io(String),
    #[error("digest mismatch: {0}")]
    Digest(String),
}

type BodyTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// Streams bytes `start..end` of the task to `tx` as pieces arrive. With `want`, the bytes
/// are the whole blob: they are hashed and the last chunk is sent only when the digest
/// matches. Returns `Ok` also when the client went away.
pub(super) async fn stream_blob(
    ctx: &Context,
    store: &Arc<TaskStore>,
    mut state: watch::Receiver<TaskState>,
    start: u64,
    end: u64,
    want: Option<[u8; 32]>,
    tx: &BodyTx,
) -> Result<(), StreamError> {
    let layout = store.layout();
    let mut hasher = want.map(|_| Sha256::new());
    let mut held: Option<Bytes> = None;
    let mut pos = start;
    let mut state_open = true;
    while pos < end {
        let (n, piece_end) = layout
            .piece_at(pos)
            .and_then(|n| Some((n, layout.piece_range(n)?.end)))
            .ok_or_else(|| StreamError::Task(format!("offset {pos} is outside the task")))?;
        wait_piece(store, n, &mut state, &mut state_open).await?;
        let stop = end.min(piece_end).min(pos + CHUNK);
        let (data, h) = read_chunk(store.clone(), pos, stop - pos, hasher.take()).await?;
        hasher = h;
        pos = stop;
        dataplane::Counters::add(&ctx.proxy.p2p_bytes, data.len() as u64);
        if let Some(prev) = held.replace(data) {
            if tx.send(Ok(Frame::data(prev))).await.is_err() {
                return Ok(());
            }
        }
    }
    if let (Some(h), Some(w)) = (hasher, want) {
        let got: [u8; 32] = h.finalize().into();
        if got != w {
            return Err(StreamError::Digest(format!(
                "expected sha256:{}, got sha256:{}",
                hex::encode(w),
                hex::encode(got)
            )));
        }
    }
    if let Some(last) = held {
        let _ = tx.send(Ok(Frame::data(last))).await;
    }
    Ok(())
}

/// Waits until piece `n` is stored; fails when the task fails first.
async fn wait_piece(
    store: &TaskStore,
    n: u32,
    state: &mut watch::Receiver<TaskState>,
    state_open: &mut bool,
) -> Result<(), StreamError> {
    loop {
        if store.has(n) {
            return Ok(());
        }
        let listener = store.listen();
        if store.has(n) {
            return Ok(());
        }
        if let TaskState::Failed(e) = &*state.borrow() {
            return Err(StreamError::Task(format!("download failed: {e}")));
        }
        if !*state_open && !matches!(&*state.borrow(), TaskState::Running(_)) {
            // Done without this piece: the store was replaced or removed.
            return Err(StreamError::Task(format!(
                "download ended without piece {n}"
            )));
        }
        tokio::select! {
            _ = listener => {}
            r = state.changed(), if *state_open => {
                if r.is_err() {
                    *state_open = false;
                }
            }
            _ = tokio::time::sleep(PIECE_POLL) => {}
        }
    }
}

/// Reads `len` bytes at `offset` of the task file (and hashes them) off the async threads.
async fn read_chunk(
    store: Arc<TaskStore>,
    offset: u64,
    len: u64,
    hasher: Option<Sha256>,
) -> Result<(Bytes, Option<Sha256>), StreamError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        store
            .file()
            .read_exact_at(&mut buf, offset)
            .map_err(|e| StreamError::Io(e.to_string()))?;
        let hasher = hasher.map(|mut h| {
            h.update(&buf);
            h
        });
        Ok((Bytes::from(buf), hasher))
    })
    .await
    .map_err(|e| StreamError::Io(format!("reader task: {e}")))?
}
