//! The runtime side of the simulation: the scheduler connections and the single-threaded
//! tokio runtime that runs their stream tasks only while the simulation waits.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::client::Inbound;

/// Tasks the runtime runs before it polls the sockets again (tokio's default is 61). A
/// step wakes thousands of peer tasks; with the default, running them all took dozens of
/// turns of [`Io::drive`], each with its own `epoll_wait`.
pub const EVENT_INTERVAL: u32 = 4096;

/// A runtime turn (run up to [`EVENT_INTERVAL`] ready tasks, then poll the sockets without
/// waiting) that takes less than this found nothing to run: an `epoll_wait` and little else.
const IDLE_TURN: Duration = Duration::from_micros(10);
/// Consecutive idle turns after which [`Io::drive`] returns: the tasks the simulation woke
/// have run, their writes are out, and what the sockets had has been read.
const IDLE_TURNS: u32 = 2;
/// Most turns of one [`Io::drive`] (each up to [`EVENT_INTERVAL`] task polls), should the
/// heuristic above never see an idle turn.
const MAX_DRIVE_TURNS: u32 = 1000;

/// The runtime pieces the simulation talks through.
///
/// The runtime is single-threaded and runs only while the simulation waits in one of the
/// methods below: the simulated peers' requests pile up while the simulation computes and
/// go out together when it next waits, and no message ever crosses between threads. (With
/// a runtime thread beside the simulation, every request and answer woke the other thread;
/// on a 2-CPU machine those wake-ups cost the simulator more CPU than the scheduler spent
/// on the decisions.)
pub struct Io<'a> {
    /// Current-thread runtime of the stream tasks.
    pub rt: &'a tokio::runtime::Runtime,
    /// Connections to the scheduler.
    pub channels: Vec<Channel>,
    /// Everything the scheduler sends.
    pub events: RefCell<mpsc::UnboundedReceiver<Inbound>>,
    /// Sender side of `events`, cloned into every stream task.
    pub inbound: mpsc::UnboundedSender<Inbound>,
    /// Process id of the scheduler, when it runs on this machine (for its CPU time).
    pub scheduler_pid: Option<u32>,
    /// The scheduler's `/metrics` endpoint, when this process started it (for the time its
    /// swarm state took per registration).
    pub scheduler_metrics: Option<std::net::SocketAddr>,
}

impl Io<'_> {
    /// Runs the stream tasks until they are idle, without waiting for the network. A step
    /// wakes thousands of peer tasks (one per peer with a finished piece to announce); a
    /// fixed two turns of 61 tasks (until 2026-12-02) left a backlog that grew step after
    /// step, and the scheduler heard of pieces seconds late.
    pub(super) fn drive(&self) {
        self.rt.block_on(async {
            let mut idle = 0;
            for _ in 0..MAX_DRIVE_TURNS {
                let turn = Instant::now();
                tokio::task::yield_now().await;
                if turn.elapsed() < IDLE_TURN {
                    idle += 1;
                    if idle >= IDLE_TURNS {
                        break;
                    }
                } else {
                    idle = 0;
                }
            }
        });
    }

    /// An event already received, without running the stream tasks.
    pub(super) fn queued(&self) -> Option<Inbound> {
        self.events.borrow_mut().try_recv().ok()
    }

    /// An event already received or arriving while the stream tasks run once
    /// ([`Self::drive`]); `None` if there is none yet.
    pub(super) fn try_next(&self) -> Option<Inbound> {
        if let Some(ev) = self.queued() {
            return Some(ev);
        }
        self.drive();
        self.queued()
    }

    /// The next event, waiting for it up to `limit` while the stream tasks run.
    pub(super) fn next_within(&self, limit: Duration) -> Option<Inbound> {
        if let Some(ev) = self.queued() {
            return Some(ev);
        }
        let mut events = self.events.borrow_mut();
        // The timer is made inside the runtime: it needs the runtime's clock.
        self.rt
            .block_on(async { tokio::time::timeout(limit, events.recv()).await })
            .ok()
            .flatten()
    }
}
