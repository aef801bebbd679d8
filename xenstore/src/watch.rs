//! Watch-event queues that a caller's own `mio::Poll` can wait on.
//!
//! This module owns the delivery of watch events from a connection (the client's reader thread
//! or the in-memory store) to whoever consumes them. A connection has one default queue and
//! may route the events of chosen tokens to private queues, so that a helper such as
//! [`wait_for_state`](crate::xenbus::wait_for_state) never steals events from the caller's main
//! loop. A queue never blocks the producer and is bounded by its number of watch tokens: a new
//! event for a token that already has one pending is folded into it (a dirty flag with a
//! path), so nothing a peer writes can grow it. When the connection is lost it is closed, which
//! wakes every waiter and every `Poll` it is registered in.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::unix::pipe;

use crate::error::XsError;

/// One watch event: the path that fired and the token given to `watch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The path of the node that changed, as the daemon reports it (relative if the watch was
    /// registered with a relative path).
    pub path: String,
    /// The token of the watch.
    pub token: String,
}

#[derive(Debug)]
struct QueueState {
    events: VecDeque<WatchEvent>,
    closed: Option<String>,
}

/// The shared queue behind [`WatchEvents`] handles.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    cond: Condvar,
    /// Readable (holds at least one byte) while events are queued or the queue is closed.
    ready_rx: pipe::Receiver,
    ready_tx: pipe::Sender,
}

impl Queue {
    fn new() -> Result<Queue, XsError> {
        let (ready_tx, ready_rx) = pipe::new().map_err(|source| XsError::Io {
            what: "creating the watch-event pipe failed".into(),
            source,
        })?;
        Ok(Queue {
            state: Mutex::new(QueueState {
                events: VecDeque::new(),
                closed: None,
            }),
            cond: Condvar::new(),
            ready_rx,
            ready_tx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update
        // is a single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the pipe readable. A full pipe is already readable, so WouldBlock is fine.
    fn signal(&self) {
        if let Err(e) = (&self.ready_tx).write(&[1]) {
            if e.kind() != ErrorKind::WouldBlock {
                tracing::debug!(error = %e, "writing the watch-event pipe failed");
            }
        }
    }

    /// Empties the pipe, so that it stops being readable.
    fn drain_signal(&self) {
        let mut buf = [0u8; 64];
        loop {
            match (&self.ready_rx).read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }

    /// Queues `event`, or folds it into the event already pending for its token.
    ///
    /// At most one event per token is ever pending, so the queue holds at most as many events
    /// as its connection has watch tokens, whatever a peer writes under a watch (XSA-349: a
    /// guest rewriting a watched node in a loop must not grow Dom0's memory). Folding keeps
    /// the pending event's place and replaces its path by the deepest node that holds both
    /// paths: the watched node or one below it, since both fired the same watch. Consumers
    /// re-read what the event names, as xenbus watchers must anyway.
    fn push(&self, event: WatchEvent) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        if let Some(pending) = st.events.iter_mut().find(|e| e.token == event.token) {
            if pending.path != event.path {
                pending.path = common_node(&pending.path, &event.path);
            }
            // Already pending: the pipe is readable and every waiter has been woken.
            return;
        }
        st.events.push_back(event);
        // One byte per event: each push is a new edge for edge-triggered pollers.
        self.signal();
        drop(st);
        self.cond.notify_all();
    }

    fn close(&self, reason: &str) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(reason.to_owned());
            self.signal();
        }
        drop(st);
        self.cond.notify_all();
    }

    fn pop_locked(&self, st: &mut QueueState) -> Result<Option<WatchEvent>, XsError> {
        if let Some(ev) = st.events.pop_front() {
            if st.events.is_empty() && st.closed.is_none() {
                self.drain_signal();
            }
            return Ok(Some(ev));
        }
        if let Some(reason) = &st.closed {
            return Err(XsError::ConnectionLost {
                reason: reason.clone(),
            });
        }
        Ok(None)
    }
}

/// The deepest node that holds both `a` and `b`, on `/` boundaries: `/x/y/z` and `/x/y/w`
/// give `/x/y`, `/a` and `/b` give `/`. Two paths with nothing in common (a relative and an
/// absolute one, or a special `@` path and another) give the first one unchanged: one token
/// never watches both kinds in this project, and the consumer re-reads either way.
fn common_node(a: &str, b: &str) -> String {
    let mut keep = 0;
    for (i, (x, y)) in a.split('/').zip(b.split('/')).enumerate() {
        if x != y {
            break;
        }
        keep = i + 1;
    }
    match keep {
        0 => a.to_owned(),
        1 if a.starts_with('/') => "/".to_owned(),
        _ => a.split('/').take(keep).collect::<Vec<_>>().join("/"),
    }
}

/// A handle on a queue of watch events. Cheap to clone; every clone sees the same queue, and
/// an event is taken by exactly one consumer.
///
/// It is a [`mio::event::Source`]: register it in your own `Poll` with
/// `Interest::READABLE`. It is readable while events are queued (each new event is a new
/// edge) and once the connection is lost. After a readiness event, call
/// [`try_next`](Self::try_next) until it returns `Ok(None)`, as mio's edge-triggered contract
/// requires. When the connection is lost, queued events are still delivered first, then
/// every call returns [`XsError::ConnectionLost`].
#[derive(Debug, Clone)]
pub struct WatchEvents {
    queue: Arc<Queue>,
}

impl WatchEvents {
    /// Takes the next event without blocking. `Ok(None)`: nothing queued now.
    pub fn try_next(&self) -> Result<Option<WatchEvent>, XsError> {
        let mut st = self.queue.lock();
        self.queue.pop_locked(&mut st)
    }

    /// Waits up to `timeout` for the next event. `Ok(None)`: the timeout passed.
    pub fn next_timeout(&self, timeout: Duration) -> Result<Option<WatchEvent>, XsError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.queue.lock();
        loop {
            if let Some(ev) = self.queue.pop_locked(&mut st)? {
                return Ok(Some(ev));
            }
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if remaining.is_zero() {
                return Ok(None);
            }
            st = self
                .queue
                .cond
                .wait_timeout(st, remaining)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the next event without a time limit (it still returns when the connection is
    /// lost).
    pub fn next_blocking(&self) -> Result<WatchEvent, XsError> {
        loop {
            if let Some(ev) = self.next_timeout(Duration::from_secs(3600))? {
                return Ok(ev);
            }
        }
    }

    /// Number of events queued now.
    pub fn len(&self) -> usize {
        self.queue.lock().events.len()
    }

    /// Whether no event is queued now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the connection behind this queue is gone.
    pub fn is_closed(&self) -> bool {
        self.queue.lock().closed.is_some()
    }
}

impl mio::event::Source for WatchEvents {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> std::io::Result<()> {
        SourceFd(&self.queue.ready_rx.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> std::io::Result<()> {
        SourceFd(&self.queue.ready_rx.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> std::io::Result<()> {
        SourceFd(&self.queue.ready_rx.as_raw_fd()).deregister(registry)
    }
}

#[derive(Debug)]
struct HubState {
    by_token: HashMap<String, Weak<Queue>>,
    closed: Option<String>,
}

/// Routes one connection's events: to the private queue of their token while one is alive,
/// else to the default queue.
#[derive(Debug)]
pub(crate) struct WatchHub {
    default: Arc<Queue>,
    state: Mutex<HubState>,
}

impl WatchHub {
    pub(crate) fn new() -> Result<WatchHub, XsError> {
        Ok(WatchHub {
            default: Arc::new(Queue::new()?),
            state: Mutex::new(HubState {
                by_token: HashMap::new(),
                closed: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // Every update is a single map operation: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The default queue.
    pub(crate) fn events(&self) -> WatchEvents {
        WatchEvents {
            queue: self.default.clone(),
        }
    }

    /// A private queue for `token` (the same one while a handle on it is alive).
    pub(crate) fn events_for(&self, token: &str) -> Result<WatchEvents, XsError> {
        let mut st = self.lock();
        if let Some(q) = st.by_token.get(token).and_then(Weak::upgrade) {
            return Ok(WatchEvents { queue: q });
        }
        let q = Arc::new(Queue::new()?);
        if let Some(reason) = &st.closed {
            q.close(reason);
        }
        st.by_token.retain(|_, w| w.strong_count() > 0);
        st.by_token.insert(token.to_owned(), Arc::downgrade(&q));
        Ok(WatchEvents { queue: q })
    }

    pub(crate) fn dispatch(&self, event: WatchEvent) {
        let private = self
            .lock()
            .by_token
            .get(&event.token)
            .and_then(Weak::upgrade);
        match private {
            Some(q) => q.push(event),
            None => self.default.push(event),
        }
    }

    /// Closes every queue: the connection is gone.
    pub(crate) fn close(&self, reason: &str) {
        let queues: Vec<Arc<Queue>> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason.to_owned());
            }
            st.by_token.values().filter_map(Weak::upgrade).collect()
        };
        self.default.close(reason);
        for q in queues {
            q.close(reason);
        }
    }
}

/// A token no other caller in this process uses, for helpers that need a private watch.
pub(crate) fn unique_token(purpose: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "xenvirtio-{purpose}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Interest, Poll, Token};

    fn ev(p: &str, t: &str) -> WatchEvent {
        WatchEvent {
            path: p.into(),
            token: t.into(),
        }
    }

    #[test]
    fn events_arrive_in_order_and_readiness_follows_the_queue() {
        let hub = WatchHub::new().unwrap();
        let mut events = hub.events();
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut events, Token(7), Interest::READABLE)
            .unwrap();
        let mut got = Events::with_capacity(4);
        poll.poll(&mut got, Some(Duration::from_millis(0))).unwrap();
        assert!(got.is_empty(), "not readable while empty");

        hub.dispatch(ev("/a", "t"));
        hub.dispatch(ev("/b", "u"));
        poll.poll(&mut got, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            got.iter().map(|e| e.token()).collect::<Vec<_>>(),
            vec![Token(7)]
        );
        assert_eq!(events.try_next().unwrap(), Some(ev("/a", "t")));
        assert_eq!(events.try_next().unwrap(), Some(ev("/b", "u")));
        assert_eq!(events.try_next().unwrap(), None);
        // Drained: the pipe is empty, so a level check shows nothing readable.
        let mut byte = [0u8; 1];
        assert!((&events.queue.ready_rx).read(&mut byte).is_err());

        hub.dispatch(ev("/c", "t"));
        poll.poll(&mut got, Some(Duration::from_secs(5))).unwrap();
        assert!(!got.is_empty(), "a new event is a new edge");
    }

    #[test]
    fn events_of_one_token_fold_into_the_pending_one_at_their_common_node() {
        let hub = WatchHub::new().unwrap();
        let events = hub.events();
        hub.dispatch(ev("/d/5/state", "t"));
        hub.dispatch(ev("/x", "u"));
        hub.dispatch(ev("/d/5/state", "t"));
        assert_eq!(events.len(), 2, "the same event again adds nothing");
        hub.dispatch(ev("/d/5/state/child", "t"));
        hub.dispatch(ev("/d/5/config-generation", "t"));
        assert_eq!(events.len(), 2);
        assert_eq!(
            events.try_next().unwrap(),
            Some(ev("/d/5", "t")),
            "the folded event keeps its place and names the node holding every path"
        );
        assert_eq!(events.try_next().unwrap(), Some(ev("/x", "u")));
        assert_eq!(events.try_next().unwrap(), None);
        hub.dispatch(ev("/d/5/state", "t"));
        assert_eq!(
            events.try_next().unwrap(),
            Some(ev("/d/5/state", "t")),
            "once taken, the next event has its own path again"
        );
    }

    #[test]
    fn common_node_of_two_paths() {
        assert_eq!(common_node("/x/y/z", "/x/y/w"), "/x/y");
        assert_eq!(common_node("/x/y", "/x/y/w"), "/x/y");
        assert_eq!(common_node("/a", "/b"), "/");
        assert_eq!(common_node("device/0/state", "device/1"), "device");
        assert_eq!(common_node("@releaseDomain", "/x"), "@releaseDomain");
        assert_eq!(common_node("/x/yy", "/x/y"), "/x", "only whole components");
    }

    #[test]
    fn private_queues_take_their_token_only_while_alive() {
        let hub = WatchHub::new().unwrap();
        let main = hub.events();
        let private = hub.events_for("mine").unwrap();
        hub.dispatch(ev("/x", "mine"));
        hub.dispatch(ev("/y", "other"));
        assert_eq!(private.try_next().unwrap(), Some(ev("/x", "mine")));
        assert_eq!(private.try_next().unwrap(), None);
        assert_eq!(main.try_next().unwrap(), Some(ev("/y", "other")));
        drop(private);
        hub.dispatch(ev("/z", "mine"));
        assert_eq!(main.try_next().unwrap(), Some(ev("/z", "mine")));
    }

    #[test]
    fn close_wakes_waiters_after_queued_events() {
        let hub = Arc::new(WatchHub::new().unwrap());
        let events = hub.events();
        hub.dispatch(ev("/a", "t"));
        let waiter = {
            let events = events.clone();
            std::thread::spawn(move || {
                let first = events.next_timeout(Duration::from_secs(10));
                let second = events.next_timeout(Duration::from_secs(10));
                (first, second)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        hub.close("daemon gone");
        let (first, second) = waiter.join().unwrap();
        assert_eq!(first.unwrap(), Some(ev("/a", "t")));
        assert!(second.unwrap_err().is_connection_lost());
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(events.is_closed());
        assert!(
            hub.events_for("late")
                .unwrap()
                .try_next()
                .unwrap_err()
                .is_connection_lost()
        );
    }

    #[test]
    fn closed_queue_stays_readable() {
        let hub = WatchHub::new().unwrap();
        let mut events = hub.events();
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut events, Token(1), Interest::READABLE)
            .unwrap();
        hub.close("gone");
        let mut got = Events::with_capacity(4);
        poll.poll(&mut got, Some(Duration::from_secs(5))).unwrap();
        assert!(!got.is_empty());
        assert!(events.try_next().is_err());
    }

    #[test]
    fn next_timeout_times_out() {
        let hub = WatchHub::new().unwrap();
        let start = Instant::now();
        assert_eq!(
            hub.events()
                .next_timeout(Duration::from_millis(30))
                .unwrap(),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn unique_tokens_differ() {
        assert_ne!(unique_token("w"), unique_token("w"));
    }
}
