//! Streaming a P2P blob to a client: the chunks of a [`TaskReader`] sent as each piece is
//! stored. With the blob's digest the reader hashes on the way and hands out the last chunk
//! only when the digest matches (see the parent module's docs).

use hyper::body::{Bytes, Frame};
use tokio::sync::mpsc;

use super::{BoxError, ProxyCounters};
use crate::task_reader::{ReadError, TaskReader};

type BodyTx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// Streams what `reader` reads to `tx`. Returns `Ok` also when the client went away.
pub(super) async fn stream_blob(
    counters: &ProxyCounters,
    mut reader: TaskReader,
    tx: &BodyTx,
) -> Result<(), ReadError> {
    while let Some(data) = reader.next_chunk().await? {
        dataplane::Counters::add(&counters.p2p_bytes, data.len() as u64);
        if tx.send(Ok(Frame::data(data))).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
