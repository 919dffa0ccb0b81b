//! This thread's table of downloads and the entry points the data-plane runtime calls for
//! the bridge's commands: [`start_download`], [`add_parents`], [`cancel`], [`reap`].

use super::{emit, FetchConfig, Session};
use crate::bridge::{Bridge, Event, Parent};
use crate::counters::Counters;
use crate::hasher::HashWorker;
use crate::shaper::Shaping;
use crate::storage::TaskStore;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use wire::TaskId;

thread_local! {
    static SESSIONS: RefCell<HashMap<TaskId, Rc<Session>>> = RefCell::new(HashMap::new());
}

/// Where a download runs and what it may use.
#[derive(Debug, Clone)]
pub struct FetchEnv {
    /// Queues to the control plane.
    pub bridge: Arc<Bridge>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Fetcher tunables.
    pub cfg: FetchConfig,
    /// Rate limits of the daemon.
    pub shaping: Arc<Shaping>,
    /// QUIC endpoint, when the data plane runs one.
    pub quic: Option<quinn::Endpoint>,
    /// The thread's piece hasher ([`crate::hasher`]); `None`: pieces are hashed on the
    /// receiving thread.
    pub hasher: Option<Arc<HashWorker>>,
}

/// Starts (or extends) the download of `store` on this thread, limited to `rate_limit`
/// bytes per second on top of the daemon's limits (0: no own limit). The session is in this
/// thread's table when this returns, so an [`add_parents`] handled right after it (the
/// control plane often sends both at once) reaches it; the rest runs as a task.
pub fn start_download(store: Arc<TaskStore>, parents: Vec<Parent>, rate_limit: u64, env: FetchEnv) {
    let bridge = env.bridge.clone();
    let id = store.id();
    let existing = SESSIONS.with(|m| m.borrow().get(&id).filter(|s| !s.is_done()).cloned());
    let session = match existing {
        Some(s) => s,
        None => {
            let s = Session::new(store, env, rate_limit);
            SESSIONS.with(|m| m.borrow_mut().insert(id, s.clone()));
            s
        }
    };
    monoio::spawn(async move {
        if session.check_complete().await {
            SESSIONS.with(|m| m.borrow_mut().remove(&id));
            return;
        }
        if session.add_parents(parents) == 0 && session.state.borrow().active == 0 {
            emit(&bridge, Event::NeedParents { task: id }).await;
        }
    });
}

/// Adds parents to a running download on this thread (ignored when none runs).
pub fn add_parents(task: &TaskId, parents: Vec<Parent>) {
    if let Some(s) = SESSIONS.with(|m| m.borrow().get(task).cloned()) {
        s.add_parents(parents);
    }
}

/// Cancels a running download on this thread.
pub fn cancel(task: &TaskId) {
    if let Some(s) = SESSIONS.with(|m| m.borrow_mut().remove(task)) {
        s.cancel();
    }
}

/// Drops finished sessions from this thread's table.
pub fn reap() {
    SESSIONS.with(|m| m.borrow_mut().retain(|_, s| !s.is_done()));
}
