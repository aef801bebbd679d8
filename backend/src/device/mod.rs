//! One device of the daemon, on its own thread: the state machine of `docs/PROTOCOL.md`
//! section 8 (backend side) and, while connected, the data path.
//!
//! This module owns everything the backend holds for one device: the device model (image,
//! console, rng), the rings, the [`AddressSpace`] of the negotiated strategy and the event-
//! channel ports. They live in the thread's locals, so a protocol error, an I/O error or even a
//! panic drops them (unmapping and unbinding everything) and the thread carries on in the
//! error state; nothing here can stop another device or the daemon.
//!
//! **The loop.** A mio poll (through [`EventLoop`]) waits on the daemon's waker (messages: the
//! backend directory changed, the frontend domain is gone, shut down), a private watch on the
//! frontend's `state`, the device's event-channel handle, and the console's host side. Xenstore
//! is re-read only when one of the first two fired; the state machine is level-triggered, so
//! coalesced watch events lose nothing.
//!
//! **The data path**, per available-buffer notification: `pending()` names the ports, each port
//! is a queue; for each chain `DeviceQueue::pop_chain` validates it (indirect tables fetched
//! once through the address space), `AddressSpace::map_chain` maps it, the model serves it,
//! the `MappedChain` is dropped (per-request grants unmapped), and only then is the chain
//! added to the used ring; `needs_notification` decides whether to notify. Notifications are
//! disabled while a queue is drained and re-enabled with a re-check. Each request is checked
//! against its device's size cap before anything is mapped, and a serve call stops after
//! [`QUEUE_BUDGET`] chains per queue, 64 MiB or 50 ms over all queues; the queues still busy
//! are resumed after the thread has looked at
//! its messages. All queues of a device (blk multi-queue included) are served on this thread.
//!
//! It must never map anything before the frontend's keys passed [`read_frontend_setup`](crate::handshake::read_frontend_setup), and
//! never write `Sb = 6` before the frontend left Connected (or is gone).
//!
//! This file holds the state machine (phases, xenbus steps, the inbox); [`data_path`] serves
//! the queues, [`model`] holds the device model, the connection's runtime and the errors.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::backend_keys as bk;
use xenvirtio_xen::platform::{
    BoundPort, EventChannels, ForeignMapper, GrantMapper, MappedPages, Platform,
};
use xenvirtio_xen::{Access, DomId};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, WatchEvents, XenStore, XsError};

use crate::budget::{Budgeted, DomainBudgets};
use crate::daemon::DaemonConfig;
use crate::dma::{AddressSpace, DIRECT_CACHE_CHUNKS, MapCounters};
use crate::event_loop::{EventLoop, LoopToken};
use crate::handshake::{self, DirectTrust, FrontendSetup, Offer, RingLocation, ToolstackConfig};
use crate::stats::DeviceStats;
use xenvirtio_virtio::device_queue::DeviceQueue;

mod data_path;
mod model;
mod net_path;
mod serving;

pub use data_path::QUEUE_BUDGET;
pub(crate) use model::error_chain;
use model::{Connection, Model, Phase, QueueRuntime, SetupError, Totals};

/// What the daemon tells a device thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMsg {
    /// Something under the backend directory changed: re-read it.
    BackendChanged,
    /// The frontend domain is dead: drop everything now and forget the device (8.4).
    DomainGone,
    /// The daemon is shutting down (8.3).
    Shutdown,
}

/// The tokens of a device thread's poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceToken {
    Wake,
    FrontendWatch,
    Events,
    ConsoleIo,
    ConsoleListener,
    NetIo,
}

impl LoopToken for DeviceToken {
    const WAKE: Self = DeviceToken::Wake;
    fn token(self) -> Token {
        Token(self as usize)
    }
    fn from_token(token: Token) -> Option<Self> {
        [
            DeviceToken::Wake,
            DeviceToken::FrontendWatch,
            DeviceToken::Events,
            DeviceToken::ConsoleIo,
            DeviceToken::ConsoleListener,
            DeviceToken::NetIo,
        ]
        .into_iter()
        .find(|t| t.token() == token)
    }
}

/// What a device thread needs, handed over by the daemon.
pub(crate) struct DeviceContext<P: Platform> {
    pub platform: Arc<P>,
    pub store: Arc<dyn XenStore>,
    pub config: Arc<DaemonConfig>,
    pub frontend: DomId,
    pub devid: u32,
    pub inbox: Receiver<DeviceMsg>,
    pub stats: Arc<Mutex<DeviceStats>>,
    /// The page budgets of all frontend domains (every mapping below is charged to it).
    pub budgets: Arc<DomainBudgets>,
}

/// How a run of the state machine starts.
#[derive(Debug, Clone)]
enum Start {
    /// Check for leftovers of an earlier instance (8.5).
    Fresh,
    /// The previous run panicked: go to the error state.
    AfterPanic(String),
}

/// The device thread's body: runs the state machine until the device is forgotten, starting
/// again in the error state after a panic.
pub(crate) fn run_device<P: Platform>(ctx: DeviceContext<P>, mut evloop: EventLoop<DeviceToken>) {
    let span = tracing::info_span!("device", domid = ctx.frontend, devid = ctx.devid);
    let _enter = span.enter();
    let bdir = xenbus::backend_dir(ctx.platform.domid(), ctx.frontend, ctx.devid);
    let fdir = xenbus::frontend_dir(ctx.frontend, ctx.devid);
    // The frontend's state, on a private queue registered in this thread's poll.
    static NEXT_TOKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let token = format!(
        "xenvirtio-backend/{}/{}/{}",
        ctx.frontend,
        ctx.devid,
        NEXT_TOKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let fe_watch = match watch_frontend(&*ctx.store, &fdir, &token, evloop.registry()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "cannot watch the frontend's state; it is polled on backend changes only");
            None
        }
    };
    let mut totals = Totals::default();
    let mut start = Start::Fresh;
    loop {
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut machine = Machine {
                ctx: &ctx,
                bdir: &bdir,
                fdir: &fdir,
                fe_watch: fe_watch.as_ref(),
                phase: Phase::Idle,
                model: None,
                toolstack: None,
                offer: None,
                dirty: true,
                start: Some(start.clone()),
                shutting_down: false,
                forget: false,
                last_error: None,
                totals: &mut totals,
            };
            let r = evloop.run(&mut machine);
            machine.close_all(evloop.registry());
            r
        }));
        match result {
            Ok(Ok(())) => break,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the device's poll failed; the device is abandoned");
                break;
            }
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                tracing::error!(panic = %what, "the device thread panicked; the device goes to its error state");
                totals.errors += 1;
                start = Start::AfterPanic(format!("internal error in the backend: {what}"));
            }
        }
    }
    if fe_watch.is_some() {
        if let Err(e) = ctx.store.unwatch(&xenbus::state_path(&fdir), &token) {
            tracing::debug!(error = %e, "removing the frontend watch failed");
        }
    }
    tracing::debug!("device forgotten");
}

fn watch_frontend(
    store: &dyn XenStore,
    fdir: &str,
    token: &str,
    registry: &Registry,
) -> Result<WatchEvents, XsError> {
    let mut events = store.watch_events_for(token)?;
    store.watch(&xenbus::state_path(fdir), token)?;
    registry
        .register(
            &mut events,
            DeviceToken::FrontendWatch.token(),
            Interest::READABLE,
        )
        .map_err(|source| XsError::Io {
            what: "registering the frontend watch failed".into(),
            source,
        })?;
    Ok(events)
}

/// Creates a device thread's poll (so the daemon can hold its waker before the thread runs).
pub(crate) fn device_loop() -> std::io::Result<EventLoop<DeviceToken>> {
    EventLoop::new()
}

/// The state of one run of a device thread.
struct Machine<'a, P: Platform> {
    ctx: &'a DeviceContext<P>,
    bdir: &'a str,
    fdir: &'a str,
    fe_watch: Option<&'a WatchEvents>,
    phase: Phase<P>,
    model: Option<Model>,
    toolstack: Option<ToolstackConfig>,
    offer: Option<Offer>,
    /// Xenstore may have changed: re-run the state machine.
    dirty: bool,
    start: Option<Start>,
    shutting_down: bool,
    forget: bool,
    last_error: Option<String>,
    totals: &'a mut Totals,
}

/// What the state machine reads on each evaluation.
#[derive(Debug, Clone, Copy)]
struct Observed {
    sb: Option<XenbusState>,
    online: bool,
    sf: Option<XenbusState>,
}

impl<P: Platform> Machine<'_, P> {
    fn store(&self) -> &dyn XenStore {
        &*self.ctx.store
    }

    fn observe(&self) -> Observed {
        let sb = match xenbus::read_state(self.store(), TxId::NONE, &xenbus::state_path(self.bdir))
        {
            Ok(s) => Some(s),
            Err(e) if e.is_enoent() => None,
            Err(e) => {
                tracing::debug!(error = %e, "reading the backend state failed");
                Some(XenbusState::Unknown)
            }
        };
        let online = xenbus::read_bool(
            self.store(),
            TxId::NONE,
            &format!("{}/{}", self.bdir, bk::ONLINE),
        )
        .unwrap_or(false);
        // A frontend's state that is absent or garbage counts as "holds nothing".
        let sf = xenbus::read_state(self.store(), TxId::NONE, &xenbus::state_path(self.fdir)).ok();
        Observed { sb, online, sf }
    }

    fn switch(&mut self, state: XenbusState) {
        match xenbus::switch_state(self.store(), self.bdir, state) {
            Ok(()) => tracing::debug!(%state, "backend state"),
            Err(XsError::NodeVanished { .. }) => self.forget = true,
            Err(e) => {
                tracing::warn!(%state, error = %error_chain(&e), "writing the backend state failed")
            }
        }
    }

    /// Drops the connection (deregistering its event channel) and folds its counters in.
    fn drop_connection(&mut self, registry: &Registry) {
        if let Phase::Connected(conn) = std::mem::replace(&mut self.phase, Phase::Idle) {
            let _ = registry.deregister(&mut SourceFd(&conn.events.as_raw_fd()));
            self.fold(&conn.counters);
            drop(conn);
            tracing::debug!("connection dropped: nothing of the frontend stays mapped or bound");
        }
    }

    fn fold(&mut self, c: &MapCounters) {
        let t = &mut self.totals.map;
        t.map_calls += c.map_calls;
        t.pages_mapped += c.pages_mapped;
        t.chains += c.chains;
        t.cache_hits += c.cache_hits;
    }

    /// Everything held goes (end of a run, a panic, a forgotten device).
    fn close_all(&mut self, registry: &Registry) {
        self.drop_connection(registry);
        self.model = None;
        self.publish_stats();
    }

    /// Enters Closing: stops serving, drops everything, writes `Sb = 5` (with the error node
    /// first, in one transaction, for a fatal error).
    fn begin_close(
        &mut self,
        registry: &Registry,
        error: Option<String>,
        deadline: Option<Instant>,
    ) {
        // The first fatal error is the cause: one that a data-path thread reports after it
        // (from the ring it was still reading) must not replace it in the error node.
        if let (Some(reason), Phase::Closing { error: true, .. }) = (&error, &self.phase) {
            tracing::debug!(
                reason,
                "a later device error while closing for an earlier one"
            );
            return;
        }
        self.drop_connection(registry);
        match &error {
            Some(reason) => {
                self.totals.errors += 1;
                // A guest can cause this at will: debug, counted, and in the error node.
                tracing::debug!(reason, "device error: going to Closing");
                match handshake::publish_error(self.store(), self.bdir, reason) {
                    Ok(()) => {}
                    Err(XsError::NodeVanished { .. }) => self.forget = true,
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "writing the error node failed")
                    }
                }
                self.last_error = Some(reason.clone());
            }
            None => self.switch(XenbusState::Closing),
        }
        self.phase = Phase::Closing {
            deadline,
            error: error.is_some(),
            frontend_left_init: false,
        };
        self.dirty = true;
    }

    fn shutdown_deadline(&self) -> Instant {
        Instant::now() + self.ctx.config.shutdown_grace
    }

    /// 8.1 step 2: opens the model and publishes the offer.
    fn try_publish(&mut self, registry: &Registry) {
        let ts = match handshake::read_toolstack_config(
            self.store(),
            self.bdir,
            self.ctx.frontend,
            self.ctx.devid,
        ) {
            Ok(ts) => ts,
            Err(e) => {
                if let handshake::ToolstackError::Xenstore(XsError::NodeVanished { .. }) = e {
                    self.forget = true;
                    return;
                }
                let reason = format!("bad device description: {}", error_chain(&e));
                self.begin_close(registry, Some(reason), None);
                return;
            }
        };
        if self.model.is_none() {
            let who = format!("domain {} device {}", self.ctx.frontend, self.ctx.devid);
            match Model::open(&ts, &who) {
                Ok(mut m) => {
                    let polled = match &mut m {
                        Model::Console(c) => c
                            .register(
                                registry,
                                DeviceToken::ConsoleIo.token(),
                                DeviceToken::ConsoleListener.token(),
                            )
                            .map_err(|e| format!("cannot poll the console: {e}")),
                        Model::Net(n) => {
                            if let Some(tap) = n.tap_name() {
                                tracing::info!(tap, "net device's TAP is up");
                            }
                            n.register(registry, DeviceToken::NetIo.token())
                                .map_err(|e| format!("cannot poll the net device's host side: {e}"))
                        }
                        _ => Ok(()),
                    };
                    if let Err(reason) = polled {
                        self.begin_close(registry, Some(reason), None);
                        return;
                    }
                    self.model = Some(m);
                }
                Err(reason) => {
                    tracing::warn!(reason, "cannot open the device");
                    self.begin_close(registry, Some(reason), None);
                    return;
                }
            }
        }
        let Some(model) = &self.model else { return };
        let offer = model.offer(&ts, self.direct_trust(), &self.ctx.config);
        match handshake::publish(self.store(), self.bdir, &offer) {
            Ok(generation) => {
                tracing::info!(
                    kind = %ts.kind,
                    features = %xenvirtio_virtio::features::describe(ts.kind.device_id(), offer.features),
                    queues = offer.max_queues,
                    grant_usage = offer.grant_usage,
                    generation,
                    "published; waiting for the frontend (InitWait)"
                );
                self.toolstack = Some(ts);
                self.offer = Some(offer);
                self.phase = Phase::InitWait;
            }
            Err(XsError::NodeVanished { .. }) => self.forget = true,
            Err(e) => {
                let reason = format!("cannot publish the device: {}", error_chain(&e));
                self.begin_close(registry, Some(reason), None);
            }
        }
    }

    fn direct_trust(&self) -> DirectTrust {
        DirectTrust {
            backend_is_dom0: self.ctx.platform.domid() == 0,
            operator_allows: self
                .ctx
                .config
                .allow_direct
                .iter()
                .any(|sel| sel.matches(self.store(), self.ctx.frontend)),
        }
    }

    /// 8.1 step 4: validates, maps and binds; then Connected.
    fn try_connect(&mut self, registry: &Registry) {
        let (Some(ts), Some(offer)) = (self.toolstack.clone(), self.offer.clone()) else {
            return;
        };
        let trust = self.direct_trust();
        let result = handshake::read_frontend_setup(self.store(), self.fdir, &offer, &ts, trust)
            .map_err(SetupError::from)
            .and_then(|setup| self.establish(&setup, registry).map(|c| (setup, c)));
        match result {
            Ok((setup, conn)) => {
                let strategy = setup.strategy;
                if let Some(Model::Net(n)) = &mut self.model {
                    n.set_negotiated(setup.features);
                }
                self.phase = Phase::Connected(Box::new(conn));
                self.switch(XenbusState::Connected);
                tracing::info!(
                    %strategy,
                    persistent = setup.persistent,
                    queues = setup.queues.len(),
                    features = %xenvirtio_virtio::features::describe(ts.kind.device_id(), setup.features),
                    "connected"
                );
                // The frontend may have made buffers available before Connected.
                if let Phase::Connected(conn) = &mut self.phase {
                    for q in &mut conn.queues {
                        q.busy = true;
                    }
                }
            }
            Err(e) => {
                let reason = format!("connect refused: {}", error_chain(&e));
                self.begin_close(registry, Some(reason), None);
            }
        }
    }

    fn establish(
        &self,
        setup: &FrontendSetup,
        registry: &Registry,
    ) -> Result<Connection<P>, SetupError> {
        let peer = self.ctx.frontend;
        let platform = &*self.ctx.platform;
        let mut counters = MapCounters::default();
        let budgets = &self.ctx.budgets;
        let grants = Arc::new(Budgeted::new(
            platform.grant_mapper().map_err(SetupError::Platform)?,
            Arc::clone(budgets),
        ));
        let foreign = if setup.strategy == DmaStrategy::Direct {
            let f = platform.foreign_mapper().map_err(SetupError::Platform)?;
            f.restrict(peer).map_err(SetupError::Platform)?;
            Some(Arc::new(Budgeted::uncharged(f)))
        } else {
            None
        };
        let space = match (setup.strategy, &foreign) {
            (DmaStrategy::Grant, _) => AddressSpace::grant(
                Arc::clone(&grants),
                peer,
                setup.persistent,
                self.ctx.config.max_persistent_grants as usize,
            ),
            (DmaStrategy::Bounce, _) => {
                let pool = setup
                    .bounce
                    .as_ref()
                    .expect("read_frontend_setup returns a pool under bounce");
                AddressSpace::bounce(&*grants, &mut counters, peer, pool.pages, &pool.dir_refs)
                    .map_err(SetupError::Bounce)?
            }
            (DmaStrategy::Direct, Some(f)) => {
                AddressSpace::direct(Arc::clone(f), peer, DIRECT_CACHE_CHUNKS)
            }
            (DmaStrategy::Direct, None) => unreachable!("a foreign mapper is opened for direct"),
        };
        let events = platform.event_channels().map_err(SetupError::Platform)?;
        // This connection's handle binds the peer's ports only: an exploited daemon thread
        // cannot use it to reach another domain. Dom0 as frontend is its own peer, and Linux
        // refuses a restriction to domain 0.
        if peer != 0 {
            events.restrict(peer).map_err(SetupError::Platform)?;
        }
        let events = Arc::new(events);
        let mut queues = Vec::with_capacity(setup.queues.len());
        for (i, q) in setup.queues.iter().enumerate() {
            let ring: Box<dyn MappedPages> = match (&q.ring, &foreign) {
                (RingLocation::Grants(refs), _) => Box::new(
                    grants
                        .map(peer, refs, Access::ReadWrite)
                        .map_err(|source| SetupError::Ring { queue: i, source })?,
                ),
                (RingLocation::Frames(gfns), Some(f)) => Box::new(
                    f.map(peer, gfns, Access::ReadWrite)
                        .map_err(|source| SetupError::Ring { queue: i, source })?,
                ),
                (RingLocation::Frames(_), None) => unreachable!("frames only under direct"),
            };
            counters.map_calls += 1;
            counters.pages_mapped += ring.pages() as u64;
            let port =
                BoundPort::bind_interdomain(&events, peer, q.event_channel).map_err(|source| {
                    SetupError::Port {
                        queue: i,
                        port: q.event_channel,
                        source,
                    }
                })?;
            queues.push(QueueRuntime {
                ring,
                queue: DeviceQueue::new(q.layout, setup.features),
                port,
                busy: false,
            });
        }
        registry
            .register(
                &mut SourceFd(&events.as_raw_fd()),
                DeviceToken::Events.token(),
                Interest::READABLE,
            )
            .map_err(SetupError::Poll)?;
        Ok(Connection {
            events,
            queues,
            space,
            counters,
            held_rx: VecDeque::new(),
            strategy: setup.strategy,
            next_first: 0,
        })
    }

    /// Startup (8.5) or the error state after a panic.
    fn begin(&mut self, registry: &Registry, start: Start) {
        match start {
            Start::AfterPanic(reason) => self.begin_close(registry, Some(reason), None),
            Start::Fresh => {
                let o = self.observe();
                match o.sb {
                    None => self.forget = true,
                    Some(
                        XenbusState::InitWait
                        | XenbusState::Initialised
                        | XenbusState::Connected
                        | XenbusState::Closing,
                    ) => {
                        tracing::info!(
                            state = %o.sb.unwrap_or(XenbusState::Unknown),
                            "found a device left by an earlier backend: resetting it"
                        );
                        let deadline = Some(Instant::now() + self.ctx.config.restart_timeout);
                        self.begin_close(registry, None, deadline);
                    }
                    Some(XenbusState::Closed) => {
                        let error = self
                            .store()
                            .exists(TxId::NONE, &format!("{}/{}", self.bdir, bk::ERROR))
                            .unwrap_or(false);
                        self.phase = Phase::Closed {
                            error,
                            frontend_left_init: true,
                        };
                    }
                    Some(_) => self.phase = Phase::Idle,
                }
            }
        }
    }

    /// Evaluates section 8 until nothing changes.
    fn step(&mut self, registry: &Registry) {
        for _ in 0..8 {
            if self.forget {
                return;
            }
            let o = self.observe();
            let Some(sb) = o.sb else {
                tracing::info!("the backend directory was removed: forgetting the device");
                self.forget = true;
                return;
            };
            let frontend_idle = matches!(
                o.sf,
                None | Some(
                    XenbusState::Unknown
                        | XenbusState::Initialising
                        | XenbusState::Closing
                        | XenbusState::Closed
                )
            );
            let leave = self.shutting_down || !o.online;
            let before = self.phase.name();
            match &mut self.phase {
                Phase::Idle => {
                    if self.shutting_down {
                        self.forget = true;
                    } else if !o.online {
                        if sb != XenbusState::Closed {
                            self.switch(XenbusState::Closed);
                        }
                        self.forget = true;
                    } else {
                        self.try_publish(registry);
                    }
                }
                Phase::InitWait => {
                    if leave || sb == XenbusState::Closing {
                        let deadline = self.shutting_down.then(|| self.shutdown_deadline());
                        self.begin_close(registry, None, deadline);
                    } else if o.sf == Some(XenbusState::Initialised) {
                        self.try_connect(registry);
                    } else if o.sf == Some(XenbusState::Closing) {
                        // A restarted frontend resets what its predecessor left (8.7).
                        self.switch(XenbusState::Closed);
                        self.phase = Phase::Closed {
                            error: false,
                            frontend_left_init: true,
                        };
                    }
                }
                Phase::Connected(_) => {
                    if leave || sb == XenbusState::Closing {
                        let deadline = self.shutting_down.then(|| self.shutdown_deadline());
                        self.begin_close(registry, None, deadline);
                    } else if frontend_idle {
                        // 8.2 step 2: the frontend closes; drop everything, then Closed.
                        self.drop_connection(registry);
                        self.switch(XenbusState::Closed);
                        self.phase = Phase::Closed {
                            error: false,
                            frontend_left_init: o.sf != Some(XenbusState::Initialising),
                        };
                    }
                }
                Phase::Closing {
                    deadline,
                    error,
                    frontend_left_init,
                } => {
                    *frontend_left_init |= o.sf != Some(XenbusState::Initialising);
                    let left = *frontend_left_init;
                    let expired = deadline.is_some_and(|d| Instant::now() >= d);
                    if frontend_idle || expired {
                        if expired && !frontend_idle {
                            tracing::info!("the frontend did not answer in time: closing anyway");
                        }
                        let error = *error;
                        self.switch(XenbusState::Closed);
                        if leave {
                            self.forget = true;
                        } else {
                            self.phase = Phase::Closed {
                                error,
                                frontend_left_init: left,
                            };
                        }
                    }
                }
                Phase::Closed {
                    error,
                    frontend_left_init,
                } => {
                    if leave {
                        self.forget = true;
                    } else {
                        if o.sf != Some(XenbusState::Initialising) {
                            *frontend_left_init = true;
                        }
                        let reconnect = if *error {
                            // After an error, only a frontend that starts over (8.3).
                            o.sf == Some(XenbusState::Initialising) && *frontend_left_init
                        } else {
                            // 8.2 step 4.
                            matches!(o.sf, Some(XenbusState::Initialising | XenbusState::Closed))
                        };
                        if reconnect {
                            self.try_publish(registry);
                        }
                    }
                }
            }
            if self.phase.name() == before && !self.forget {
                return;
            }
        }
    }

    fn kind(&self) -> Option<DeviceKind> {
        self.toolstack.as_ref().map(|t| t.kind)
    }

    fn drain_inbox(&mut self, registry: &Registry) {
        loop {
            match self.ctx.inbox.try_recv() {
                Ok(DeviceMsg::BackendChanged) => self.dirty = true,
                Ok(DeviceMsg::Shutdown) => {
                    self.shutting_down = true;
                    self.dirty = true;
                    // A device already closing waits for its frontend no longer than the grace.
                    let grace = self.shutdown_deadline();
                    if let Phase::Closing { deadline, .. } = &mut self.phase {
                        *deadline = Some(deadline.map_or(grace, |d| d.min(grace)));
                    }
                }
                Ok(DeviceMsg::DomainGone) => {
                    tracing::info!("the frontend domain is gone: dropping everything");
                    self.drop_connection(registry);
                    if !matches!(self.phase, Phase::Closed { .. }) {
                        self.switch(XenbusState::Closed);
                    }
                    self.forget = true;
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // The daemon is gone: behave as on shutdown.
                    self.shutting_down = true;
                    self.dirty = true;
                    return;
                }
            }
        }
    }
}
