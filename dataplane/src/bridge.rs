//! The plane bridge: bounded lock-free queues between the control plane and the data plane.
//!
//! * Control plane → data-plane thread `i`: one [`ArrayQueue`] of [`Command`]s per thread plus
//!   an [`AtomicWaker`] holding the waker of that thread's command task. Waking it from a
//!   tokio thread goes through monoio's cross-thread wake (feature `sync`), which unparks the
//!   runtime through its eventfd.
//! * Data plane → control plane: one [`ArrayQueue`] of [`Event`]s and an [`AtomicWaker`] for
//!   the control plane's event task.
//!
//! Messages are small owned structs: ids, numbers, addresses, an `Arc<TaskStore>`. They have
//! no field that can hold piece bytes, which is how the code guarantees that piece bytes
//! never cross the bridge. A full queue is an error returned to the sender, never an
//! unbounded buffer.

use crate::storage::{StoreError, TaskStore};
use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use wire::TaskId;

/// A parent to fetch pieces from, as the scheduler named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// Host id of the parent.
    pub host_id: String,
    /// Data-plane address of the parent (TCP).
    pub addr: SocketAddr,
    /// QUIC address of the parent's data plane, when it serves QUIC.
    pub quic_addr: Option<SocketAddr>,
    /// Whether the parent is a seed peer (for per-source counters).
    pub is_seed: bool,
}

/// Where a finished piece came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceSource {
    /// A seed peer, by host id.
    Seed(String),
    /// A normal peer, by host id.
    Peer(String),
}

impl PieceSource {
    /// Host id of the source.
    pub fn host_id(&self) -> &str {
        match self {
            Self::Seed(h) | Self::Peer(h) => h,
        }
    }
}

/// A command from the control plane to one data-plane thread.
#[derive(Debug)]
pub enum Command {
    /// Fetch the missing pieces of a task from these parents (the thread owns the download
    /// of this task from now on).
    Download {
        /// Storage of the task, already created with its layout.
        store: Arc<TaskStore>,
        /// Parents to start with.
        parents: Vec<Parent>,
        /// This download's own rate limit in bytes per second (0: none).
        rate_limit: u64,
    },
    /// More parents for a running download.
    AddParents {
        /// Task id.
        task: TaskId,
        /// New parents (ones already in use are ignored).
        parents: Vec<Parent>,
    },
    /// Stop downloading a task (cancelled or failed); stored pieces stay.
    Cancel {
        /// Task id.
        task: TaskId,
    },
    /// Stop the thread's runtime.
    Shutdown,
}

/// An event from the data plane to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A piece was fetched, verified and stored.
    PieceFinished {
        /// Task id.
        task: TaskId,
        /// Piece number.
        number: u32,
        /// crc32c of the piece.
        crc32c: u32,
        /// Piece length.
        length: u64,
        /// Where it came from.
        source: PieceSource,
        /// Microseconds the parent spent on the piece: from its request, or from the previous
        /// piece of the same connection when it queued behind it ([`crate::window::RequestWindow::on_piece`]).
        cost_us: u64,
    },
    /// A piece from a parent was bad or refused.
    PieceFailed {
        /// Task id.
        task: TaskId,
        /// Piece number.
        number: u32,
        /// Parent host id.
        parent: String,
        /// What went wrong.
        reason: String,
    },
    /// A parent was dropped from a download (connection failed, protocol error, corrupt data).
    ParentFailed {
        /// Task id.
        task: TaskId,
        /// Parent host id.
        parent: String,
        /// What went wrong.
        reason: String,
        /// The parent stopped sending with requests outstanding (`parent_idle_timeout` or
        /// `piece_timeout`) rather than closing or failing: it may still look live to the
        /// scheduler.
        stalled: bool,
        /// The parent sent a forged piece: bytes with a matching crc32c but not the
        /// source's (its trusted digest).
        forged: bool,
    },
    /// Every parent of an unfinished download is gone: the control plane should reschedule.
    NeedParents {
        /// Task id.
        task: TaskId,
    },
    /// Writing a piece to the task file failed (disk full, I/O error): the download stops.
    StorageFailed {
        /// Task id.
        task: TaskId,
        /// What went wrong, by class.
        failure: StorageFailure,
    },
    /// Every piece of the task is stored.
    DownloadFinished {
        /// Task id.
        task: TaskId,
    },
}

/// Why storing (or creating) a task's pieces failed, by class, so that nobody decides what
/// kind of failure it was from its words. Crosses the plane bridge in
/// [`Event::StorageFailed`]; the control plane builds it for its own writes (origin pieces)
/// too. The display is the whole message of the underlying error, as it always was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageFailure {
    /// The file system is full (`ENOSPC`) or the quota exhausted (`EDQUOT`).
    #[error("{message}")]
    NoSpace {
        /// The error's message.
        message: String,
    },
    /// The task was evicted or removed while it was being written.
    #[error("{message}")]
    Retired {
        /// The error's message.
        message: String,
    },
    /// Another I/O error on the task file.
    #[error("{message}")]
    Io {
        /// The I/O error's kind.
        kind: std::io::ErrorKind,
        /// The error's message.
        message: String,
    },
    /// A failure that is not the disk's: a piece out of range or of the wrong length (the
    /// caller's bug), a writer task that died.
    #[error("{0}")]
    Other(String),
}

impl StorageFailure {
    /// Whether `e` says the disk (or the quota) is full: `ENOSPC`, `EDQUOT` or
    /// [`std::io::ErrorKind::StorageFull`] / [`std::io::ErrorKind::QuotaExceeded`].
    pub fn is_no_space(e: &std::io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            || matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
    }

    /// The failure an I/O error is, with `message` as its text.
    fn of_io(e: &std::io::Error, message: String) -> Self {
        if Self::is_no_space(e) {
            Self::NoSpace { message }
        } else {
            Self::Io {
                kind: e.kind(),
                message,
            }
        }
    }

    /// The task was evicted or removed: this message.
    pub fn retired(message: impl Into<String>) -> Self {
        Self::Retired {
            message: message.into(),
        }
    }
}

impl From<&std::io::Error> for StorageFailure {
    fn from(e: &std::io::Error) -> Self {
        Self::of_io(e, e.to_string())
    }
}

impl From<std::io::Error> for StorageFailure {
    fn from(e: std::io::Error) -> Self {
        Self::from(&e)
    }
}

impl From<StoreError> for StorageFailure {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match &e {
            StoreError::Io(io) => Self::of_io(io, message),
            StoreError::Retired => Self::Retired { message },
            _ => Self::Other(message),
        }
    }
}

/// A queue was full; the message is handed back to the sender.
#[derive(Debug)]
pub struct Full<T>(pub T);

struct Inbox {
    queue: ArrayQueue<Command>,
    waker: AtomicWaker,
}

/// Both directions of the bridge. Shared by `Arc` between the planes.
pub struct Bridge {
    inboxes: Box<[Inbox]>,
    events: ArrayQueue<Event>,
    event_waker: AtomicWaker,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("threads", &self.inboxes.len())
            .field("events", &self.events.len())
            .finish()
    }
}

impl Bridge {
    /// A bridge to `threads` data-plane threads, each queue holding at most `capacity`
    /// messages.
    pub fn new(threads: usize, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inboxes: (0..threads.max(1))
                .map(|_| Inbox {
                    queue: ArrayQueue::new(capacity),
                    waker: AtomicWaker::new(),
                })
                .collect(),
            events: ArrayQueue::new(capacity),
            event_waker: AtomicWaker::new(),
        }
    }

    /// Number of data-plane threads.
    pub fn threads(&self) -> usize {
        self.inboxes.len()
    }

    /// The thread that owns downloads of `task`.
    pub fn thread_of(&self, task: &TaskId) -> usize {
        let mut h = [0u8; 8];
        h.copy_from_slice(&task.0[..8]);
        (u64::from_le_bytes(h) % self.inboxes.len() as u64) as usize
    }

    /// Queues a command for thread `thread` and wakes it.
    pub fn send(&self, thread: usize, cmd: Command) -> Result<(), Full<Command>> {
        let Some(inbox) = self.inboxes.get(thread) else {
            return Err(Full(cmd));
        };
        inbox.queue.push(cmd).map_err(Full)?;
        inbox.waker.wake();
        Ok(())
    }

    /// Data-plane side: the next command for `thread`, registering the waker when empty.
    pub fn poll_command(&self, thread: usize, cx: &mut Context<'_>) -> Poll<Command> {
        let Some(inbox) = self.inboxes.get(thread) else {
            return Poll::Ready(Command::Shutdown);
        };
        if let Some(c) = inbox.queue.pop() {
            return Poll::Ready(c);
        }
        inbox.waker.register(cx.waker());
        match inbox.queue.pop() {
            Some(c) => Poll::Ready(c),
            None => Poll::Pending,
        }
    }

    /// Data-plane side: queues an event for the control plane and wakes it.
    pub fn emit(&self, ev: Event) -> Result<(), Full<Event>> {
        self.events.push(ev).map_err(Full)?;
        self.event_waker.wake();
        Ok(())
    }

    /// Control-plane side: the next event, registering the waker when empty.
    pub fn poll_event(&self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Some(e) = self.events.pop() {
            return Poll::Ready(e);
        }
        self.event_waker.register(cx.waker());
        match self.events.pop() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }

    /// Control-plane side: waits for the next event.
    pub async fn next_event(&self) -> Event {
        futures::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// Commands waiting for the data-plane threads, over all threads (queue depth).
    pub fn command_depth(&self) -> usize {
        self.inboxes.iter().map(|i| i.queue.len()).sum()
    }

    /// Events waiting for the control plane (queue depth).
    pub fn event_depth(&self) -> usize {
        self.events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_no_space_by_its_errno_not_its_text() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let io = std::io::Error::from_raw_os_error(errno);
            let text = format!("task file I/O: {io}");
            let f = StorageFailure::from(StoreError::Io(io));
            assert_eq!(
                f,
                StorageFailure::NoSpace {
                    message: text.clone()
                }
            );
            assert_eq!(f.to_string(), text, "the message is the store error's");
        }
        // The words of a full disk on another error are not a full disk.
        let io = std::io::Error::other("No space left on device (os error 28)");
        assert!(matches!(
            StorageFailure::from(&io),
            StorageFailure::Io {
                kind: std::io::ErrorKind::Other,
                ..
            }
        ));
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(
            StorageFailure::from(StoreError::Io(eio)),
            StorageFailure::Io { .. }
        ));
        assert_eq!(
            StorageFailure::from(StoreError::Retired),
            StorageFailure::retired("the task was evicted")
        );
        assert!(matches!(
            StorageFailure::from(StoreError::OutOfRange(9)),
            StorageFailure::Other(_)
        ));
    }

    #[test]
    fn full_queue_hands_the_message_back() {
        let b = Bridge::new(1, 2);
        assert!(b.send(0, Command::Shutdown).is_ok());
        assert!(b.send(0, Command::Shutdown).is_ok());
        assert!(matches!(
            b.send(0, Command::Shutdown),
            Err(Full(Command::Shutdown))
        ));
        assert!(b.send(5, Command::Shutdown).is_err());
    }

    #[test]
    fn events_cross_threads_and_wake() {
        let b = Arc::new(Bridge::new(1, 16));
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            for n in 0..10 {
                while b2
                    .emit(Event::DownloadFinished {
                        task: TaskId([n; 32]),
                    })
                    .is_err()
                {
                    std::thread::yield_now();
                }
            }
        });
        let got = futures::executor::block_on(async {
            let mut v = Vec::new();
            for _ in 0..10 {
                v.push(b.next_event().await);
            }
            v
        });
        t.join().expect("thread");
        assert_eq!(got.len(), 10);
        assert_eq!(
            got[9],
            Event::DownloadFinished {
                task: TaskId([9; 32])
            }
        );
    }
}
