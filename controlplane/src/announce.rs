//! The outgoing half of one `AnnouncePeer` stream: what a task run tells its scheduler.
//!
//! A run announces from synchronous code (data-plane events, the origin's piece sink), and
//! sometimes in bursts: a run that resumes a task restored from disk announces every piece it
//! holds at once, which can be far more than any fixed queue (a 64 MiB task with 16 KiB
//! pieces holds 4,096). A message the scheduler never gets is a piece it never hands out, so
//! [`Announcer`] drops nothing while the stream lives: messages go to a bounded channel that
//! tonic drains into the stream, and when the channel is full they wait, in order, in an
//! overflow that one task moves into the channel as room appears (the stream's own HTTP/2
//! flow control is the back-pressure). The overflow holds only what the run produced while
//! the scheduler was not reading: at most one `PieceFinished` per piece of the task, plus the
//! few control messages. When the stream ends, what is queued is dropped with it; the run
//! registers again and then announces everything it holds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use wire::proto::scheduler::AnnouncePeerRequest;

/// Messages in the channel to the stream before further ones wait in the overflow.
pub const ANNOUNCE_QUEUE: usize = 4096;

/// Sends a run's messages to its scheduler stream, in order, without dropping any.
#[derive(Debug, Clone)]
pub struct Announcer {
    tx: mpsc::Sender<AnnouncePeerRequest>,
    overflow: Arc<Mutex<Overflow>>,
}

#[derive(Debug, Default)]
struct Overflow {
    queue: VecDeque<AnnouncePeerRequest>,
    /// A task is moving `queue` into the channel; new messages must queue behind it.
    draining: bool,
}

/// A new stream's announcer and the request stream to give tonic.
pub fn channel() -> (Announcer, ReceiverStream<AnnouncePeerRequest>) {
    channel_with_capacity(ANNOUNCE_QUEUE)
}

fn channel_with_capacity(capacity: usize) -> (Announcer, ReceiverStream<AnnouncePeerRequest>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        Announcer {
            tx,
            overflow: Arc::default(),
        },
        ReceiverStream::new(rx),
    )
}

impl Announcer {
    /// Queues `msg` for the scheduler. Never blocks and never drops while the stream lives
    /// (see the module docs). Must be called inside a tokio runtime.
    pub fn send(&self, msg: AnnouncePeerRequest) {
        let Ok(mut o) = self.overflow.lock() else {
            return;
        };
        if !o.draining {
            match self.tx.try_send(msg) {
                Ok(()) => return,
                // The stream is gone: the run registers again and re-announces.
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    o.queue.push_back(msg);
                    o.draining = true;
                    tokio::spawn(drain(self.tx.clone(), self.overflow.clone()));
                    return;
                }
            }
        }
        o.queue.push_back(msg);
    }

    /// Whether the stream is gone (nothing reads what is sent): the run must register again.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Messages waiting in the overflow (not yet in the channel).
    pub fn waiting(&self) -> usize {
        self.overflow.lock().map_or(0, |o| o.queue.len())
    }
}

/// Moves the overflow into the channel, waiting for room, until it is empty.
async fn drain(tx: mpsc::Sender<AnnouncePeerRequest>, overflow: Arc<Mutex<Overflow>>) {
    loop {
        let permit = match tx.reserve().await {
            Ok(p) => p,
            Err(_) => {
                // The stream ended: nothing will read these.
                if let Ok(mut o) = overflow.lock() {
                    o.queue.clear();
                    o.draining = false;
                }
                return;
            }
        };
        let Ok(mut o) = overflow.lock() else {
            return;
        };
        match o.queue.pop_front() {
            Some(msg) => permit.send(msg),
            None => {
                o.draining = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;
    use wire::proto::scheduler::{announce_peer_request::Request, PieceFinished};

    fn piece(n: u32) -> AnnouncePeerRequest {
        AnnouncePeerRequest {
            request: Some(Request::PieceFinished(PieceFinished {
                number: n,
                ..Default::default()
            })),
        }
    }

    fn number(m: &AnnouncePeerRequest) -> Option<u32> {
        match &m.request {
            Some(Request::PieceFinished(p)) => Some(p.number),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_burst_larger_than_the_queue_arrives_whole_and_in_order() {
        let (a, mut rx) = channel_with_capacity(16);
        // A restored task announcing 1,000 pieces at once into a 16-message queue.
        for n in 0..1000 {
            a.send(piece(n));
        }
        assert!(a.waiting() > 0, "the burst should overflow the queue");
        // Messages sent while the overflow drains still come after it.
        a.send(piece(1000));
        let mut got = Vec::new();
        while got.len() < 1001 {
            let m = rx.next().await.expect("stream open");
            got.push(number(&m).expect("a piece"));
        }
        assert_eq!(got, (0..=1000).collect::<Vec<u32>>());
        assert_eq!(a.waiting(), 0);
        // Once drained, sends go straight to the channel again.
        a.send(piece(1001));
        assert_eq!(rx.next().await.as_ref().and_then(number), Some(1001));
    }

    #[tokio::test]
    async fn a_closed_stream_drops_the_overflow_and_later_sends() {
        let (a, rx) = channel_with_capacity(4);
        for n in 0..100 {
            a.send(piece(n));
        }
        drop(rx);
        a.send(piece(100));
        for _ in 0..100 {
            if a.waiting() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            a.waiting(),
            0,
            "the overflow of a closed stream is released"
        );
    }
}
