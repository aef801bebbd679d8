//! One connected virtqueue: its ring area, the driver's private state, and its event channel.
//!
//! This module owns the plumbing every driver shares: it turns a list of DMA [`Segment`]s into
//! a chain (through an indirect table in DMA memory when the chain is long), kicks the backend
//! when the ring asks for it, and waits for used-buffer notifications on the queue's own
//! event-channel handle. Each queue opens its own handle, so queues can be driven from
//! different threads without stealing each other's events. Spurious notifications are
//! tolerated (and counted): after every wake-up the used ring is simply checked again.
//!
//! It never interprets requests (the drivers do) and never notifies a backend that is not
//! Connected (queues only exist once the handshake reached Connected).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Token, Waker};
use xenvirtio_virtio::split::{DESCRIPTOR_SIZE, RingLayout};
use xenvirtio_xen::mem::PAGE_SIZE;
use xenvirtio_xen::platform::{BoundPort, EventChannels};
use xenvirtio_xen::{DomId, Port, XenError};

use crate::dma::{Arena, DmaBuf, DmaError, RingArea, Segment};
use crate::virtqueue::{DriverBuf, DriverQueue, DriverQueueError};

const EVENT_TOKEN: Token = Token(0);
const WAKE_TOKEN: Token = Token(1);

/// Chains longer than this go through an indirect table when indirect descriptors were
/// negotiated (shorter ones are cheaper as direct descriptors: a table costs a DMA page).
pub const INDIRECT_THRESHOLD: usize = 4;
/// Most entries in one indirect table: one page, so that a table never leaves its page.
pub const MAX_INDIRECT_ENTRIES: usize = PAGE_SIZE / DESCRIPTOR_SIZE;

/// Errors of a connected queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The ring refused the chain, or the backend broke the ring's rules.
    #[error("virtqueue {queue}")]
    Ring {
        /// Queue index.
        queue: u16,
        /// What went wrong.
        #[source]
        source: DriverQueueError,
    },
    /// No DMA memory for an indirect table.
    #[error("virtqueue {queue}: no DMA memory for an indirect table")]
    Dma {
        /// Queue index.
        queue: u16,
        /// The allocation's error.
        #[source]
        source: DmaError,
    },
    /// Notifying the backend failed.
    #[error("virtqueue {queue}: notifying the backend through port {port} failed")]
    Notify {
        /// Queue index.
        queue: u16,
        /// Local port.
        port: Port,
        /// The platform's error.
        #[source]
        source: XenError,
    },
    /// Reading or unmasking pending events failed.
    #[error("virtqueue {queue}: event channel")]
    Events {
        /// Queue index.
        queue: u16,
        /// The platform's error.
        #[source]
        source: XenError,
    },
    /// Waiting for events failed.
    #[error("virtqueue {queue}: waiting for events failed")]
    Poll {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A chain longer than the queue can ever take.
    #[error("virtqueue {queue}: a chain of {len} descriptors cannot fit a queue of {size}")]
    ChainTooLong {
        /// Queue index.
        queue: u16,
        /// Descriptors in the chain.
        len: usize,
        /// Queue size.
        size: u16,
    },
}

/// Notification counters of one device, shared by its queues.
#[derive(Debug, Default)]
pub struct EventCounters {
    /// Available-buffer notifications sent to the backend.
    pub(crate) sent: AtomicU64,
    /// Used-buffer notifications received.
    pub(crate) received: AtomicU64,
    /// Wake-ups that found no event pending.
    pub(crate) spurious: AtomicU64,
    /// Kicks suppressed by the backend (EVENT_IDX or NO_NOTIFY).
    pub(crate) suppressed: AtomicU64,
}

/// What a snapshot of [`EventCounters`] says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Notifications sent to the backend.
    pub sent: u64,
    /// Notifications received from the backend.
    pub received: u64,
    /// Wake-ups without a pending event.
    pub spurious: u64,
    /// Kicks the backend asked us to skip.
    pub suppressed: u64,
}

impl EventCounters {
    pub(crate) fn snapshot(&self) -> EventStats {
        EventStats {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            spurious: self.spurious.load(Ordering::Relaxed),
            suppressed: self.suppressed.load(Ordering::Relaxed),
        }
    }
}

/// Why [`QueueEvents::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A notification arrived (or the wait found one pending).
    Event,
    /// Someone called the waker (the backend left Connected, or a shutdown).
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// The notification side of a queue: its own event-channel handle and port, a poll on that
/// handle, and a waker that other threads use to interrupt a wait.
pub(crate) struct QueueEvents<E: EventChannels> {
    queue: u16,
    port: BoundPort<E>,
    poll: Mutex<(mio::Poll, mio::Events)>,
    waker: Arc<Waker>,
    counters: Arc<EventCounters>,
    /// Notifications drained so far, by whichever thread waited. A thread reads it before its
    /// last look at the ring and passes it to [`QueueEvents::wait`], which then does not sleep
    /// if another thread took a notification meanwhile (that notification may have been for
    /// this thread's requests, and it would never come again).
    deliveries: AtomicU64,
}

impl<E: EventChannels> std::fmt::Debug for QueueEvents<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvents")
            .field("queue", &self.queue)
            .field("port", &self.port.port())
            .finish()
    }
}

impl<E: EventChannels> QueueEvents<E> {
    /// Opens a handle and allocates an unbound port for `backend`.
    pub(crate) fn new(
        queue: u16,
        events: E,
        backend: DomId,
        counters: Arc<EventCounters>,
    ) -> Result<Self, QueueEventsError> {
        let events = Arc::new(events);
        let port = BoundPort::bind_unbound(&events, backend)
            .map_err(|source| QueueEventsError::Bind { backend, source })?;
        let poll = mio::Poll::new().map_err(QueueEventsError::Poll)?;
        let fd = events.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), EVENT_TOKEN, Interest::READABLE)
            .map_err(QueueEventsError::Poll)?;
        let waker =
            Arc::new(Waker::new(poll.registry(), WAKE_TOKEN).map_err(QueueEventsError::Poll)?);
        Ok(Self {
            queue,
            port,
            poll: Mutex::new((poll, mio::Events::with_capacity(4))),
            waker,
            counters,
            deliveries: AtomicU64::new(0),
        })
    }

    /// The local port (what `queue-<n>/event-channel` publishes).
    pub(crate) fn port(&self) -> Port {
        self.port.port()
    }

    /// A waker that interrupts [`QueueEvents::wait`].
    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Sends an available-buffer notification.
    pub(crate) fn notify(&self) -> Result<(), QueueError> {
        self.port.notify().map_err(|source| QueueError::Notify {
            queue: self.queue,
            port: self.port.port(),
            source,
        })?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many notifications have been drained so far (see [`QueueEvents::wait`]).
    pub(crate) fn deliveries(&self) -> u64 {
        self.deliveries.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` (forever with `None`) for a notification or a wake-up. Pending
    /// ports are drained and unmasked before returning.
    ///
    /// `seen` is what [`QueueEvents::deliveries`] said before the caller last looked at the
    /// ring: if another thread has drained a notification since, this returns
    /// [`Wake::Event`] at once, since what it announced is in the ring already.
    pub(crate) fn wait(&self, seen: u64, timeout: Option<Duration>) -> Result<Wake, QueueError> {
        let poll_err = |source| QueueError::Poll {
            queue: self.queue,
            source,
        };
        let mut guard = self.poll.lock().unwrap_or_else(PoisonError::into_inner);
        if self.deliveries() != seen {
            return Ok(Wake::Event);
        }
        let (poll, events) = &mut *guard;
        loop {
            match poll.poll(events, timeout) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(poll_err(e)),
            }
        }
        let mut wake = Wake::TimedOut;
        for ev in events.iter() {
            match ev.token() {
                EVENT_TOKEN => wake = Wake::Event,
                WAKE_TOKEN if wake != Wake::Event => wake = Wake::Woken,
                _ => {}
            }
        }
        if wake == Wake::Event {
            self.drain_pending()?;
        }
        Ok(wake)
    }

    /// Takes the pending ports and unmasks them, counting what arrived.
    fn drain_pending(&self) -> Result<(), QueueError> {
        let evtchn = self.port.events();
        let err = |source| QueueError::Events {
            queue: self.queue,
            source,
        };
        let ports = evtchn.pending().map_err(err)?;
        if ports.is_empty() {
            self.counters.spurious.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        evtchn.unmask(&ports).map_err(err)?;
        self.deliveries.fetch_add(1, Ordering::Release);
        self.counters
            .received
            .fetch_add(ports.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Setting up a queue's event channel failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueEventsError {
    /// The event-channel handle could not be opened.
    #[error("cannot open an event-channel handle")]
    Open(#[source] XenError),
    /// No unbound port could be allocated for the backend.
    #[error("cannot allocate an event channel for domain {backend}")]
    Bind {
        /// The backend domain.
        backend: DomId,
        /// The platform's error.
        #[source]
        source: XenError,
    },
    /// The poll on the handle could not be set up.
    #[error("cannot set up polling of the event channel")]
    Poll(#[source] io::Error),
}

/// Why [`Virtqueue::add`] did not add a chain.
#[derive(Debug)]
pub(crate) enum AddError<T> {
    /// No room now (descriptors, or DMA memory for a table): the token, to retry later.
    Busy(T),
    /// The chain cannot be added at all.
    Failed(QueueError),
}

/// A chain in flight and the indirect table it uses.
#[derive(Debug)]
struct InFlight<T> {
    token: T,
    _table: Option<DmaBuf>,
}

/// One connected queue: ring area, driver state, event channel.
pub(crate) struct Virtqueue<E: EventChannels, T> {
    index: u16,
    driver: DriverQueue<InFlight<T>>,
    events: Arc<QueueEvents<E>>,
    arena: Arc<Arena>,
    // Dropped last: the ring must outlive nothing that writes it.
    ring: RingArea,
}

impl<E: EventChannels, T> std::fmt::Debug for Virtqueue<E, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virtqueue")
            .field("index", &self.index)
            .field("size", &self.driver.layout().size())
            .field("in_flight", &self.driver.in_flight())
            .finish()
    }
}

impl<E: EventChannels, T> Virtqueue<E, T> {
    pub(crate) fn new(
        index: u16,
        ring: RingArea,
        layout: RingLayout,
        features: u64,
        events: Arc<QueueEvents<E>>,
        arena: Arc<Arena>,
    ) -> Self {
        Self {
            index,
            driver: DriverQueue::new(layout, features),
            events,
            arena,
            ring,
        }
    }

    /// Queue index.
    pub(crate) fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub(crate) fn size(&self) -> u16 {
        self.driver.layout().size()
    }

    /// Chains in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.driver.in_flight()
    }

    /// The notification side, shared with waiters.
    pub(crate) fn events(&self) -> &Arc<QueueEvents<E>> {
        &self.events
    }

    fn ring_err(&self, source: DriverQueueError) -> QueueError {
        QueueError::Ring {
            queue: self.index,
            source,
        }
    }

    /// Makes a chain available: `readable` segments then `writable` ones. Long chains go
    /// through an indirect table when negotiated. Does not notify: call [`Virtqueue::kick`].
    /// When the ring or the DMA memory for a table is full right now, the token comes back in
    /// [`AddError::Busy`]: retry after completions.
    pub(crate) fn add(
        &mut self,
        readable: &[Segment],
        writable: &[Segment],
        token: T,
    ) -> Result<u16, AddError<T>> {
        let bufs: Vec<DriverBuf> = readable
            .iter()
            .map(|s| (s, false))
            .chain(writable.iter().map(|s| (s, true)))
            .map(|(s, writable)| DriverBuf {
                addr: s.addr,
                len: s.len,
                writable,
            })
            .collect();
        let n = bufs.len();
        let size = self.size();
        let free = usize::from(self.driver.num_free());
        let can_indirect = self.driver.indirect_enabled() && n > 1 && n <= MAX_INDIRECT_ENTRIES;
        if !can_indirect && n > usize::from(size) {
            return Err(AddError::Failed(QueueError::ChainTooLong {
                queue: self.index,
                len: n,
                size,
            }));
        }
        let mut table = None;
        if can_indirect && (n > INDIRECT_THRESHOLD || n > free) {
            // A table costs a DMA page; without one, fall back to direct descriptors if they fit.
            table = self.arena.alloc(n * DESCRIPTOR_SIZE).ok();
        }
        let ring = self.ring.mem();
        let result = match table {
            Some(table) => {
                if free == 0 {
                    return Err(AddError::Busy(token));
                }
                let table_addr = table
                    .segments()
                    .first()
                    .map(|s| s.addr)
                    .expect("a buffer has at least one segment");
                let head = self.driver.add_indirect(
                    &ring,
                    table_addr,
                    &table.mem(),
                    &bufs,
                    InFlight {
                        token,
                        _table: None,
                    },
                );
                if let Ok(head) = head {
                    if let Some(slot) = self.driver.token_mut(head) {
                        slot._table = Some(table);
                    }
                }
                head
            }
            None => {
                if n > free {
                    return Err(AddError::Busy(token));
                }
                self.driver.add(
                    &ring,
                    &bufs,
                    InFlight {
                        token,
                        _table: None,
                    },
                )
            }
        };
        result.map_err(|e| AddError::Failed(self.ring_err(e)))
    }

    /// Notifies the backend if the ring says it wants to hear about what was added.
    pub(crate) fn kick(&mut self) -> Result<(), QueueError> {
        let ring = self.ring.mem();
        if self
            .driver
            .kick_prepare(&ring)
            .map_err(|e| self.ring_err(e))?
        {
            self.events.notify()
        } else {
            self.events
                .counters
                .suppressed
                .fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Takes the next completion: the token and the bytes the backend says it wrote.
    pub(crate) fn pop(&mut self) -> Result<Option<(T, u32)>, QueueError> {
        let ring = self.ring.mem();
        match self.driver.pop_used(&ring) {
            Ok(Some((slot, len))) => Ok(Some((slot.token, len))),
            Ok(None) => Ok(None),
            Err(e) => Err(self.ring_err(e)),
        }
    }

    /// Before sleeping: asks for a notification on the next completion. `None` if
    /// completions are already waiting (process them instead of sleeping); otherwise the
    /// count of delivered notifications to wait past (`events().wait(seen, ..)`). The count is
    /// read before callbacks are enabled, so a notification that comes in between wakes the
    /// wait even if another thread polling this queue consumed it.
    pub(crate) fn arm(&mut self) -> Result<Option<u64>, QueueError> {
        let seen = self.events.deliveries();
        let ring = self.ring.mem();
        let waiting = self
            .driver
            .enable_callbacks(&ring)
            .map_err(|e| self.ring_err(e))?;
        Ok((!waiting).then_some(seen))
    }

    /// Asks the backend not to notify (while the driver is busy reaping).
    pub(crate) fn disable_callbacks(&mut self) -> Result<(), QueueError> {
        let ring = self.ring.mem();
        self.driver
            .disable_callbacks(&ring)
            .map_err(|e| self.ring_err(e))
    }

    /// Forgets every chain in flight (the backend stopped) and returns their tokens.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.driver
            .drain_in_flight()
            .into_iter()
            .map(|slot| slot.token)
            .collect()
    }
}

/// Errors of the simple drivers (console, rng).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The backend left Connected, or the device is closing.
    #[error("the device stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// DMA memory could not be had or accessed.
    #[error(transparent)]
    Dma(#[from] DmaError),
}

impl From<xenvirtio_xen::mem::MemError> for DriverError {
    fn from(e: xenvirtio_xen::mem::MemError) -> Self {
        DriverError::Dma(DmaError::Mem(e))
    }
}

impl<E: EventChannels, T> Virtqueue<E, T> {
    /// Waits up to `timeout` (forever with `None`) for the next completion. `Ok(None)`: the
    /// timeout passed. Fails with [`DriverError::Stopped`] once the device stopped.
    pub(crate) fn wait_pop(
        &mut self,
        link: &crate::transport::Link,
        timeout: Option<Duration>,
    ) -> Result<Option<(T, u32)>, DriverError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(done) = self.pop()? {
                return Ok(Some(done));
            }
            if let Some(reason) = link.lost() {
                return Err(DriverError::Stopped { reason });
            }
            let Some(seen) = self.arm()? else {
                continue;
            };
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(None);
            }
            let events = Arc::clone(&self.events);
            events.wait(seen, left)?;
            self.disable_callbacks()?;
        }
    }

    /// Adds a chain, treating a busy ring as an error (simple drivers keep few requests in
    /// flight, so it means the backend stopped consuming).
    pub(crate) fn add_simple(
        &mut self,
        readable: &[Segment],
        writable: &[Segment],
        token: T,
    ) -> Result<u16, DriverError> {
        match self.add(readable, writable, token) {
            Ok(head) => Ok(head),
            Err(AddError::Busy(_)) => Err(DriverError::Dma(DmaError::Exhausted {
                len: 0,
                strategy: self.arena.strategy(),
            })),
            Err(AddError::Failed(e)) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::loopback::LoopbackXen;
    use xenvirtio_xen::platform::Platform;

    /// A queue's notification side in domain 1, and domain 0's end of its channel.
    fn channel() -> (
        QueueEvents<xenvirtio_xen::loopback::LoopbackEvents>,
        BoundPort<xenvirtio_xen::loopback::LoopbackEvents>,
    ) {
        let hv = LoopbackXen::new();
        let backend = Arc::new(hv.domain(0).event_channels().unwrap());
        let guest = hv.domain(1).event_channels().unwrap();
        let events = QueueEvents::new(0, guest, 0, Arc::default()).unwrap();
        let peer = BoundPort::bind_interdomain(&backend, 1, events.port()).unwrap();
        // Xen leaves one event pending on a new binding: take it.
        let _ = backend.pending();
        (events, peer)
    }

    /// Regression (found pairing the frontend with the daemon): when another thread drained
    /// the notification after this thread's last look at the ring, the wait must not sleep,
    /// since that notification will not come again.
    #[test]
    fn a_wait_returns_at_once_if_another_thread_took_the_notification() {
        let (events, peer) = channel();
        let seen = events.deliveries();
        // "Another thread" takes the notification.
        peer.notify().unwrap();
        assert_eq!(
            events
                .wait(events.deliveries(), Some(Duration::from_secs(5)))
                .unwrap(),
            Wake::Event
        );
        assert_eq!(events.deliveries(), seen + 1);
        // This thread looked at the ring before that: it must not sleep for 60 s.
        assert_eq!(
            events.wait(seen, Some(Duration::from_secs(60))).unwrap(),
            Wake::Event
        );
        // With nothing new, a wait times out as before.
        assert_eq!(
            events
                .wait(events.deliveries(), Some(Duration::from_millis(10)))
                .unwrap(),
            Wake::TimedOut
        );
    }
}
