//! [`PeerStream`], the response stream of one `AnnouncePeer` call, which also reads the
//! call's requests: one task serves the whole call (see the parent module's docs).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tonic::{Status, Streaming};
use tracing::debug;
use wire::proto::scheduler::{announce_peer_request, AnnouncePeerRequest, AnnouncePeerResponse};

use super::{Outbound, Shared, Slot};
use crate::state::PeerKey;

/// Requests of one `AnnouncePeer` call handled per poll before the stream yields (so that a
/// daemon sending without pause cannot keep its task from returning answers).
const INBOUND_PER_POLL: usize = 64;

/// The response stream of one `AnnouncePeer` call, which also consumes the call's requests:
/// each poll first handles what the daemon sent (the registration, then reports), then
/// returns what the state has for the peer. The HTTP/2 stream task that polls it is woken by
/// either side, so one task serves the whole call.
pub struct PeerStream {
    pub(super) outbound: Outbound<AnnouncePeerResponse>,
    /// The daemon's requests; `None` once they ended or failed.
    pub(super) inbound: Option<Streaming<AnnouncePeerRequest>>,
    /// This stream's slot until the registration hands it to the state's stream table.
    pub(super) unregistered: Option<Slot<AnnouncePeerResponse>>,
    pub(super) shared: Arc<Shared>,
    pub(super) key: PeerKey,
}

impl PeerStream {
    /// Handles one item of the daemon's request stream; false when no more will be read.
    fn handle(&mut self, item: Option<Result<AnnouncePeerRequest, Status>>) -> bool {
        if let Some(slot) = self.unregistered.take() {
            return self.register(slot, item);
        }
        let key = self.key;
        let mut inner = self.shared.inner.lock();
        match item {
            Some(Ok(AnnouncePeerRequest {
                request: Some(request),
            })) => {
                let (since, kind) = (std::time::Instant::now(), crate::metrics::kind(&request));
                let outputs = inner.state.peer_request(key, request);
                crate::metrics::announced(kind, since);
                inner.dispatch(outputs);
                if !inner.state.has_peer(key) {
                    // Failed, or dropped by the scheduler: end the response stream cleanly
                    // (a no-op if it was already closed with an error).
                    inner.peer_gone(key, None);
                    return false;
                }
                true
            }
            Some(Ok(AnnouncePeerRequest { request: None })) => {
                debug!(?key, "empty AnnouncePeer message ignored");
                true
            }
            None => {
                debug!(?key, "peer closed its stream");
                inner.peer_gone(key, None);
                false
            }
            Some(Err(status)) => {
                crate::metrics::error("stream_failed");
                debug!(?key, %status, "peer stream failed");
                inner.peer_gone(key, None);
                false
            }
        }
    }

    /// The first message must register the peer; on success the slot joins the stream
    /// table, otherwise the stream ends (dropping `slot` ends it once its status is set).
    fn register(
        &mut self,
        slot: Slot<AnnouncePeerResponse>,
        item: Option<Result<AnnouncePeerRequest, Status>>,
    ) -> bool {
        use announce_peer_request::Request;
        let register = match item {
            Some(Ok(AnnouncePeerRequest {
                request: Some(Request::Register(register)),
            })) => register,
            Some(Ok(_)) => {
                slot.close(Some(Status::invalid_argument(
                    "the first AnnouncePeer message must be RegisterPeer",
                )));
                return false;
            }
            None => return false,
            Some(Err(status)) => {
                debug!(%status, "peer stream failed before registering");
                return false;
            }
        };
        let mut inner = self.shared.inner.lock();
        if inner.closed {
            slot.close(Some(Status::unavailable("scheduler shutting down")));
            return false;
        }
        let since = std::time::Instant::now();
        let registered = inner.state.register_peer(self.key, register);
        crate::metrics::registered(registered.is_ok(), since);
        match registered {
            Ok(outputs) => {
                inner.peers.insert(self.key, slot);
                inner.dispatch(outputs);
                true
            }
            Err(e) => {
                slot.close(Some(Status::invalid_argument(e.to_string())));
                false
            }
        }
    }
}

impl Stream for PeerStream {
    type Item = Result<AnnouncePeerResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut budget = INBOUND_PER_POLL;
        while let Some(inbound) = this.inbound.as_mut() {
            if budget == 0 {
                // Requests possibly left: come back after returning the answers.
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match Pin::new(inbound).poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(item) => {
                    if !this.handle(item) {
                        this.inbound = None;
                    }
                }
            }
        }
        Pin::new(&mut this.outbound).poll_next(cx)
    }
}
