//! The backend daemon (`xenvirtio-backend serve`): discovery, device lifecycle and isolation,
//! frontend domain death, the control socket, and the `stats` client.
//!
//! This module owns the daemon's own thread and the table of devices. It watches
//! `/local/domain/<self>/backend/virtio/` (every device of every frontend domain) and
//! `@releaseDomain`; each device it finds gets a thread of its own ([`crate::device`]) which
//! runs the handshake and the data path. The daemon thread only routes: a change under a device's
//! backend directory pokes that device's thread, a released domain that xenstored no longer
//! knows (`XS_IS_DOMAIN_INTRODUCED`) makes every device of that domain drop everything at once
//! (`docs/PROTOCOL.md` 8.4), and once they let go the dead domid's entries are removed;
//! `@introduceDomain` gives a new domain the devices its name has in the device book
//! ([`crate::follow`]). A device thread that fails or panics affects that device only. It never
//! maps or binds anything itself.
//!
//! [`Daemon`] is generic over the [`Platform`] and takes any [`XenStore`], so tests and the
//! loopback crate run it in-process over `LoopbackXen` and `MemStore`; [`run`] is the real
//! daemon over `/dev/xen` and xenstored.
//!
//! **Control socket.** The daemon listens on a unix socket (mode 0600). A client sends one line,
//! `stats` (a table) or `stats json` (one JSON object), and reads the answer until EOF.
//!
//! Submodules: `config` (what the daemon is told), `control` (the control socket and the `stats`
//! client), `serve` (the command line of `serve` and the real daemon over `/dev/xen`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use std::os::fd::AsRawFd;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token, Waker};
use xenvirtio_xen::DomId;
use xenvirtio_xen::platform::Platform;
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, WatchEvents, XenStore, XsError};

use crate::budget::DomainBudgets;
use crate::device::{self, DeviceContext, DeviceMsg};
use crate::event_loop::{EventHandler, EventLoop, LoopToken};
use crate::follow;
use crate::stats::{self, DeviceStats, DomainPages, ProcessStats, StatsReport};

mod config;
mod control;
mod serve;

pub use config::{
    DEFAULT_CONTROL_SOCKET, DaemonConfig, DomainSelector, RESTART_TIMEOUT, SHUTDOWN_GRACE,
};
use control::{ControlSocket, answer_control};
pub use control::{StatsArgs, query_stats, stats};
pub use serve::{ServeArgs, run, xen_devices_usable};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Xenstore refused a watch or the connection was lost.
    #[error("xenstore: {what}")]
    Xenstore {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: XsError,
    },
    /// A local resource failed (poll, thread, socket).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `max-queue-size` is not a power of two up to 1024.
    #[error("max queue size {0} is not a power of two between 1 and 1024")]
    BadQueueSize(u32),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DaemonToken {
    Wake,
    BackendWatch,
    ReleaseWatch,
    IntroduceWatch,
    Control,
}

impl LoopToken for DaemonToken {
    const WAKE: Self = DaemonToken::Wake;
    fn token(self) -> Token {
        Token(self as usize)
    }
    fn from_token(token: Token) -> Option<Self> {
        [
            DaemonToken::Wake,
            DaemonToken::BackendWatch,
            DaemonToken::ReleaseWatch,
            DaemonToken::IntroduceWatch,
            DaemonToken::Control,
        ]
        .into_iter()
        .find(|t| t.token() == token)
    }
}

type DeviceKey = (DomId, u32);

/// State shared between the daemon thread, its handles and the control clients.
#[derive(Debug)]
struct Shared {
    waker: Arc<Waker>,
    stop: AtomicBool,
    devices: Mutex<BTreeMap<DeviceKey, Arc<Mutex<DeviceStats>>>>,
    /// Mapped pages per frontend domain, against `max_pages_per_domain`.
    budgets: Arc<DomainBudgets>,
}

impl Shared {
    fn report(&self) -> StatsReport {
        let devices: Vec<DeviceStats> = self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        let process = ProcessStats {
            devices: devices.len(),
            xen_mappings: stats::own_xen_mappings(),
            event_ports: devices.iter().map(|d| d.ports).sum(),
        };
        let budget = self.budgets.budget();
        let domains = self
            .budgets
            .snapshot()
            .into_iter()
            .map(|(domid, mapped_pages)| DomainPages {
                domid,
                mapped_pages,
                budget,
            })
            .collect();
        StatsReport {
            devices,
            domains,
            process,
        }
    }
}

/// A handle on a running daemon: stop it, read its statistics. Cheap to clone, usable from
/// any thread.
#[derive(Debug, Clone)]
pub struct DaemonHandle {
    shared: Arc<Shared>,
}

impl DaemonHandle {
    /// Asks the daemon to shut down (every device goes through Closing, at most
    /// [`DaemonConfig::shutdown_grace`]); [`Daemon::run`] then returns.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.shared.waker.wake() {
            tracing::debug!(error = %e, "waking the daemon failed");
        }
    }

    /// Every device's statistics and the process line.
    pub fn stats(&self) -> StatsReport {
        self.shared.report()
    }

    /// One device's statistics.
    pub fn device(&self, domid: DomId, devid: u32) -> Option<DeviceStats> {
        let devices = self
            .shared
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        devices
            .get(&(domid, devid))
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A device thread, seen from the daemon.
struct Slot {
    tx: Sender<DeviceMsg>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    generation: u64,
}

impl Slot {
    fn send(&self, msg: DeviceMsg) {
        // A thread that already exited has nothing left to do with the message.
        if self.tx.send(msg).is_ok() {
            if let Err(e) = self.waker.wake() {
                tracing::debug!(error = %e, "waking a device thread failed");
            }
        }
    }
}

/// Tells the daemon that a device thread ended, however it ended.
struct ExitNotice {
    tx: Sender<(DeviceKey, u64)>,
    waker: Arc<Waker>,
    key: DeviceKey,
    generation: u64,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.tx.send((self.key, self.generation));
        let _ = self.waker.wake();
    }
}

/// The daemon's thread state (the handler of its event loop).
struct DaemonState<P: Platform> {
    platform: Arc<P>,
    store: Arc<dyn XenStore>,
    config: Arc<DaemonConfig>,
    shared: Arc<Shared>,
    root: String,
    root_token: String,
    release_token: String,
    introduce_token: String,
    root_events: WatchEvents,
    release_events: WatchEvents,
    introduce_events: WatchEvents,
    control: Option<ControlSocket>,
    devices: HashMap<DeviceKey, Slot>,
    exit_tx: Sender<(DeviceKey, u64)>,
    exit_rx: Receiver<(DeviceKey, u64)>,
    next_generation: u64,
    /// A full rescan of the backend directory is due.
    rescan: bool,
}

/// The backend daemon, generic over the platform (real Xen or loopback) and the store.
pub struct Daemon<P: Platform> {
    evloop: EventLoop<DaemonToken>,
    state: DaemonState<P>,
}

impl<P: Platform> std::fmt::Debug for Daemon<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("backend", &self.state.platform.domid())
            .field("devices", &self.state.devices.len())
            .finish_non_exhaustive()
    }
}

impl<P: Platform> Daemon<P> {
    /// A daemon acting as `platform.domid()`: watches its backend directory and
    /// `@releaseDomain`, and opens the control socket if configured. Devices are discovered
    /// when [`Daemon::run`] starts.
    pub fn new(
        platform: P,
        store: Arc<dyn XenStore>,
        config: DaemonConfig,
    ) -> Result<Self, DaemonError> {
        let q = config.max_queue_size;
        if q == 0 || !q.is_power_of_two() || q > xenvirtio_virtio::protocol::MAX_QUEUE_SIZE {
            return Err(DaemonError::BadQueueSize(q));
        }
        let evloop: EventLoop<DaemonToken> = EventLoop::new().map_err(io_err("creating a poll"))?;
        let backend = platform.domid();
        let root = xenbus::backend_root(backend);
        let root_token = format!("xenvirtio-backend/root/{}", std::process::id());
        let release_token = format!("xenvirtio-backend/release/{}", std::process::id());
        let introduce_token = format!("xenvirtio-backend/introduce/{}", std::process::id());
        let xs = |what| move |source| DaemonError::Xenstore { what, source };
        let mut root_events = store
            .watch_events_for(&root_token)
            .map_err(xs("opening a watch queue"))?;
        let mut release_events = store
            .watch_events_for(&release_token)
            .map_err(xs("opening a watch queue"))?;
        let mut introduce_events = store
            .watch_events_for(&introduce_token)
            .map_err(xs("opening a watch queue"))?;
        store
            .watch(&root, &root_token)
            .map_err(xs("watching the backend directory"))?;
        store
            .watch("@releaseDomain", &release_token)
            .map_err(xs("watching @releaseDomain"))?;
        store
            .watch("@introduceDomain", &introduce_token)
            .map_err(xs("watching @introduceDomain"))?;
        let registry = evloop.registry();
        registry
            .register(
                &mut root_events,
                DaemonToken::BackendWatch.token(),
                Interest::READABLE,
            )
            .map_err(io_err("registering a watch"))?;
        registry
            .register(
                &mut release_events,
                DaemonToken::ReleaseWatch.token(),
                Interest::READABLE,
            )
            .map_err(io_err("registering a watch"))?;
        registry
            .register(
                &mut introduce_events,
                DaemonToken::IntroduceWatch.token(),
                Interest::READABLE,
            )
            .map_err(io_err("registering a watch"))?;
        let control = match &config.control_socket {
            Some(path) => {
                let c = ControlSocket::bind(path)?;
                registry
                    .register(
                        &mut SourceFd(&c.listener.as_raw_fd()),
                        DaemonToken::Control.token(),
                        Interest::READABLE,
                    )
                    .map_err(io_err("registering the control socket"))?;
                Some(c)
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            waker: evloop.waker(),
            stop: AtomicBool::new(false),
            devices: Mutex::new(BTreeMap::new()),
            budgets: DomainBudgets::new(config.max_pages_per_domain),
        });
        let (exit_tx, exit_rx) = channel();
        tracing::info!(backend, root, "xenvirtio backend started");
        Ok(Self {
            evloop,
            state: DaemonState {
                platform: Arc::new(platform),
                store,
                config: Arc::new(config),
                shared,
                root,
                root_token,
                release_token,
                introduce_token,
                root_events,
                release_events,
                introduce_events,
                control,
                devices: HashMap::new(),
                exit_tx,
                exit_rx,
                next_generation: 0,
                rescan: true,
            },
        })
    }

    /// A handle to stop the daemon and read its statistics.
    pub fn handle(&self) -> DaemonHandle {
        DaemonHandle {
            shared: Arc::clone(&self.state.shared),
        }
    }

    /// Serves until [`DaemonHandle::stop`], then shuts every device down (8.3) and returns.
    /// Fails if the xenstore connection is lost.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let result = self.evloop.run(&mut self.state).map_err(io_err("polling"));
        let lost = self.state.lost_store();
        self.state.shutdown();
        result?;
        match lost {
            Some(source) => Err(DaemonError::Xenstore {
                what: "the connection was lost",
                source,
            }),
            None => Ok(()),
        }
    }

    /// Runs the daemon on a thread of its own.
    pub fn spawn(self) -> Result<RunningDaemon, DaemonError> {
        let handle = self.handle();
        let thread = std::thread::Builder::new()
            .name("xenvirtio-backend".into())
            .spawn(move || self.run())
            .map_err(io_err("spawning the daemon thread"))?;
        Ok(RunningDaemon {
            handle,
            thread: Some(thread),
        })
    }
}

/// A daemon running on its own thread ([`Daemon::spawn`]); stopped and joined on drop.
#[derive(Debug)]
pub struct RunningDaemon {
    handle: DaemonHandle,
    thread: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl RunningDaemon {
    /// The daemon's handle.
    pub fn handle(&self) -> &DaemonHandle {
        &self.handle
    }

    /// Stops the daemon and waits for it; returns how it ended.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), DaemonError> {
        self.handle.stop();
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(DaemonError::Io {
                    what: "the daemon thread panicked".into(),
                    source: std::io::Error::other("panic"),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::warn!(error = %device::error_chain(&e), "the daemon ended with an error");
        }
    }
}

impl<P: Platform> DaemonState<P> {
    fn lost_store(&self) -> Option<XsError> {
        match self.root_events.try_next() {
            Err(e) if e.is_connection_lost() => Some(e),
            _ => None,
        }
    }

    /// Parses `<root>/<F>/<devid>[/...]`: `Some(None)` for the root or a frontend's folder.
    fn device_of(&self, path: &str) -> Option<Option<DeviceKey>> {
        let rest = path.strip_prefix(&self.root)?;
        if rest.is_empty() {
            return Some(None);
        }
        let rest = rest.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let f: DomId = parts.next()?.parse().ok()?;
        match parts.next() {
            None => Some(None),
            Some(d) => Some(Some((f, d.parse().ok()?))),
        }
    }

    fn scan(&mut self) {
        let frontends = match self.store.directory(TxId::NONE, &self.root) {
            Ok(v) => v,
            Err(e) if e.is_enoent() => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "listing the backend directory failed");
                return;
            }
        };
        for f in frontends {
            let Ok(fid) = f.parse::<DomId>() else {
                continue;
            };
            let devids = match self
                .store
                .directory(TxId::NONE, &format!("{}/{f}", self.root))
            {
                Ok(v) => v,
                Err(_) => continue,
            };
            for d in devids {
                if let Ok(devid) = d.parse::<u32>() {
                    self.consider((fid, devid));
                }
            }
        }
    }

    /// A device's backend directory changed: poke its thread, or start one.
    fn consider(&mut self, key: DeviceKey) {
        if let Some(slot) = self.devices.get(&key) {
            slot.send(DeviceMsg::BackendChanged);
            return;
        }
        let bdir = xenbus::backend_dir(self.platform.domid(), key.0, key.1);
        let sb = match xenbus::read_state(&*self.store, TxId::NONE, &xenbus::state_path(&bdir)) {
            Ok(s) => s,
            Err(_) => return,
        };
        let online =
            xenbus::read_bool(&*self.store, TxId::NONE, &format!("{bdir}/online")).unwrap_or(false);
        let leftover = matches!(
            sb,
            XenbusState::InitWait
                | XenbusState::Initialised
                | XenbusState::Connected
                | XenbusState::Closing
        );
        if !online && !leftover {
            return;
        }
        if key.0 != self.platform.domid() && !self.store.is_domain_introduced(key.0).unwrap_or(true)
        {
            tracing::debug!(
                domid = key.0,
                devid = key.1,
                "frontend domain is gone: not serving"
            );
            return;
        }
        if let Err(e) = self.spawn(key) {
            tracing::error!(domid = key.0, devid = key.1, error = %device::error_chain(&e), "cannot start the device thread");
        }
    }

    fn spawn(&mut self, key: DeviceKey) -> Result<(), DaemonError> {
        let evloop = device::device_loop().map_err(io_err("creating a device poll"))?;
        let waker = evloop.waker();
        let (tx, inbox) = channel();
        let stats = Arc::new(Mutex::new(DeviceStats {
            domid: key.0,
            devid: key.1,
            kind: "?",
            state: "Initialising",
            strategy: "-",
            ..Default::default()
        }));
        let generation = self.next_generation;
        self.next_generation += 1;
        let ctx = DeviceContext {
            platform: Arc::clone(&self.platform),
            store: Arc::clone(&self.store),
            config: Arc::clone(&self.config),
            frontend: key.0,
            devid: key.1,
            inbox,
            stats: Arc::clone(&stats),
            budgets: Arc::clone(&self.shared.budgets),
        };
        let notice = ExitNotice {
            tx: self.exit_tx.clone(),
            waker: Arc::clone(&self.shared.waker),
            key,
            generation,
        };
        let thread = std::thread::Builder::new()
            .name(format!("xv-dev-{}-{}", key.0, key.1))
            .spawn(move || {
                let _notice = notice;
                device::run_device(ctx, evloop);
            })
            .map_err(io_err("spawning a device thread"))?;
        self.shared
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, stats);
        self.devices.insert(
            key,
            Slot {
                tx,
                waker,
                thread: Some(thread),
                generation,
            },
        );
        tracing::debug!(domid = key.0, devid = key.1, "device thread started");
        Ok(())
    }

    /// Reaps device threads that ended; looks again at their directories.
    fn reap(&mut self) {
        let mut again = Vec::new();
        while let Ok((key, generation)) = self.exit_rx.try_recv() {
            let Some(slot) = self.devices.get(&key) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            if let Some(mut slot) = self.devices.remove(&key) {
                if let Some(t) = slot.thread.take() {
                    if t.join().is_err() {
                        tracing::error!(domid = key.0, devid = key.1, "a device thread died");
                    }
                }
            }
            self.shared
                .devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            again.push(key);
        }
        if !self.shared.stop.load(Ordering::SeqCst) {
            let ended = !again.is_empty();
            for key in again {
                self.consider(key);
            }
            // A dead guest's last device let go: its entries can go now.
            if ended {
                self.sweep();
            }
        }
    }

    /// Removes the entries of dead guests whose devices have all let go ([`follow`]).
    fn sweep(&mut self) {
        let busy: BTreeSet<DomId> = self.devices.keys().map(|k| k.0).collect();
        if let Err(e) = follow::sweep_dead(&*self.store, self.platform.domid(), &busy) {
            tracing::warn!(error = %e, "removing the entries of dead domains failed");
        }
    }

    /// Gives domains that appeared the devices their names have in the book ([`follow`]).
    fn restore(&mut self) {
        let Some(dir) = &self.config.state_dir else {
            return;
        };
        let book = crate::admin::DeviceBook::new(dir);
        if let Err(e) = follow::restore(&*self.store, &book, self.platform.domid()) {
            tracing::warn!(error = %e, "restoring remembered devices failed");
        }
    }

    /// `@releaseDomain` fired: every served domain that xenstored no longer knows is dead.
    fn released(&mut self) {
        let domains: BTreeSet<DomId> = self.devices.keys().map(|k| k.0).collect();
        for d in domains {
            if d == self.platform.domid() {
                continue;
            }
            match self.store.is_domain_introduced(d) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(domid = d, "frontend domain died: releasing its devices");
                    for (key, slot) in &self.devices {
                        if key.0 == d {
                            slot.send(DeviceMsg::DomainGone);
                        }
                    }
                }
                Err(e) => tracing::debug!(domid = d, error = %e, "is-domain-introduced failed"),
            }
        }
    }

    fn shutdown(&mut self) {
        for slot in self.devices.values() {
            slot.send(DeviceMsg::Shutdown);
        }
        for (key, slot) in self.devices.iter_mut() {
            if let Some(t) = slot.thread.take() {
                if t.join().is_err() {
                    tracing::error!(domid = key.0, devid = key.1, "a device thread died");
                }
            }
        }
        self.devices.clear();
        self.shared
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for (path, token) in [
            (self.root.as_str(), self.root_token.as_str()),
            ("@releaseDomain", self.release_token.as_str()),
            ("@introduceDomain", self.introduce_token.as_str()),
        ] {
            if let Err(e) = self.store.unwatch(path, token) {
                tracing::debug!(path, error = %e, "removing a watch failed");
            }
        }
        tracing::info!("xenvirtio backend stopped");
    }

    fn serve_control(&mut self) {
        let Some(control) = &self.control else { return };
        loop {
            match control.listener.accept() {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&self.shared);
                    let spawned = std::thread::Builder::new()
                        .name("xv-control".into())
                        .spawn(move || answer_control(stream, &shared));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot answer a control client");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a control client failed");
                    return;
                }
            }
        }
    }
}

impl<P: Platform> EventHandler<DaemonToken> for DaemonState<P> {
    fn deadline(&self) -> Option<Instant> {
        self.rescan.then(Instant::now)
    }

    fn handle_event(&mut self, token: DaemonToken, _registry: &Registry) -> ControlFlow<()> {
        match token {
            DaemonToken::Wake => {
                if self.shared.stop.load(Ordering::SeqCst) {
                    return ControlFlow::Break(());
                }
                self.reap();
            }
            DaemonToken::BackendWatch => {
                let mut keys = BTreeSet::new();
                loop {
                    match self.root_events.try_next() {
                        Ok(Some(ev)) => match self.device_of(&ev.path) {
                            Some(Some(key)) => {
                                keys.insert(key);
                            }
                            Some(None) => self.rescan = true,
                            None => {}
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::error!(error = %e, "the xenstore connection was lost");
                            return ControlFlow::Break(());
                        }
                    }
                }
                for key in keys {
                    self.consider(key);
                }
            }
            DaemonToken::ReleaseWatch => {
                let mut fired = false;
                while let Ok(Some(_)) = self.release_events.try_next() {
                    fired = true;
                }
                if fired {
                    self.released();
                    self.sweep();
                }
            }
            DaemonToken::IntroduceWatch => {
                let mut fired = false;
                while let Ok(Some(_)) = self.introduce_events.try_next() {
                    fired = true;
                }
                if fired {
                    self.restore();
                }
            }
            DaemonToken::Control => self.serve_control(),
        }
        ControlFlow::Continue(())
    }

    fn handle_timeout(&mut self, _registry: &Registry) -> ControlFlow<()> {
        if self.shared.stop.load(Ordering::SeqCst) {
            return ControlFlow::Break(());
        }
        if self.rescan {
            self.rescan = false;
            self.scan();
            // What happened while no daemon ran: dead guests' entries, guests that came.
            self.sweep();
            self.restore();
        }
        ControlFlow::Continue(())
    }
}
