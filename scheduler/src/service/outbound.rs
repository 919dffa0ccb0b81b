//! The outbox of one response stream: a bounded channel of boxed messages ([`Slot`] on the
//! state's side, [`Outbound`] as the stream tonic polls), the status that ends it, and the
//! [`Guard`] that tells the state when tonic drops the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::Shared;
use crate::state::{HostKey, PeerKey};

/// Sending half of one response stream, plus the status to end it with.
///
/// Messages travel boxed: a channel allocates its slots 32 at a time when it is made, and
/// 32 unboxed responses (or a `Result` with a `Status` in it, ~200 bytes) made every stream
/// cost several KiB up front: ~60 MB of freshly faulted pages for 10,000 peers.
pub(super) struct Slot<T> {
    pub(super) tx: mpsc::Sender<Box<T>>,
    end: Arc<Mutex<Option<Status>>>,
}

impl<T> Slot<T> {
    /// Ends the stream once the buffered messages are read: with `status` as an error, or
    /// cleanly if `None`.
    pub(super) fn close(self, status: Option<Status>) {
        *self.end.lock() = status;
    }
}

/// Creates a slot and the response stream it feeds.
pub(super) fn channel<T>(capacity: usize, guard: impl FnOnce() -> Guard) -> (Slot<T>, Outbound<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    let end = Arc::new(Mutex::new(None));
    (
        Slot {
            tx,
            end: end.clone(),
        },
        Outbound {
            rx,
            end,
            _guard: guard(),
        },
    )
}

/// A response stream: what the state sends, then possibly one final error.
pub struct Outbound<T> {
    rx: mpsc::Receiver<Box<T>>,
    end: Arc<Mutex<Option<Status>>>,
    _guard: Guard,
}

impl<T> Stream for Outbound<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(message)) => Poll::Ready(Some(Ok(*message))),
            Poll::Ready(None) => Poll::Ready(this.end.lock().take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Tells the state that a response stream was dropped (by tonic, when the client is gone).
pub(super) struct Guard {
    pub(super) shared: Arc<Shared>,
    pub(super) stream: GuardedStream,
}

pub(super) enum GuardedStream {
    Host(HostKey),
    Peer(PeerKey),
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut inner = self.shared.inner.lock();
        match &self.stream {
            GuardedStream::Host(key) => inner.host_gone(*key, None),
            GuardedStream::Peer(key) => inner.peer_gone(*key, None),
        }
    }
}
