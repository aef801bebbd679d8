//! The backend daemon (`xenvirtio-backend serve`): discovery, device lifecycle and isolation,
//! frontend domain death, the control socket, and the `stats` client.
//!
//! This module owns the daemon's own thread and the table of devices. It watches
//! `/local/domain/<self>/backend/virtio/` (every device of every frontend domain) and
//! `@releaseDomain`; each device it finds gets a thread of its own ([`crate::device`]) which
//! runs the handshake and the data path. The daemon thread only routes: a change under a device's
//! backend directory pokes that device's thread, a released domain that xenstored no longer
//! knows (`XS_IS_DOMAIN_INTRODUCED`) makes every device of that domain drop everything at once
//! (`docs/PROTOCOL.md` 8.4). A device thread that fails or panics affects that device only.
//! It never maps or binds anything itself.
//!
//! [`Daemon`] is generic over the [`Platform`] and takes any [`XenStore`], so tests and the
//! loopback crate run it in-process over `LoopbackXen` and `MemStore`; [`run`] is the real
//! daemon over `/dev/xen` and xenstored.
//!
//! **Control socket.** The daemon listens on a unix socket (mode 0600). A client sends one line,
//! `stats` (a table) or `stats json` (one JSON object), and reads the answer until EOF.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token, Waker};
use xenvirtio_xen::DomId;
use xenvirtio_xen::platform::Platform;
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, WatchEvents, XenStore, XsError};

use crate::budget::DomainBudgets;
use crate::device::{self, DeviceContext, DeviceMsg};
use crate::event_loop::{EventHandler, EventLoop, LoopToken};
use crate::stats::{self, DeviceStats, DomainPages, ProcessStats, StatsReport};

/// Where the daemon listens by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/xenvirtio/backend.sock";
/// How long a restarted backend waits for a frontend to answer a reset (8.5).
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connected frontends to close.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A frontend domain named on the command line, by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainSelector {
    /// A domid.
    Id(DomId),
    /// A domain name (`/local/domain/<id>/name`).
    Name(String),
}

impl std::str::FromStr for DomainSelector {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<DomId>() {
            Ok(id) => DomainSelector::Id(id),
            Err(_) => DomainSelector::Name(s.to_owned()),
        })
    }
}

impl DomainSelector {
    /// Whether `domid` is this domain (a name is looked up in xenstore).
    pub fn matches(&self, store: &dyn XenStore, domid: DomId) -> bool {
        match self {
            DomainSelector::Id(id) => *id == domid,
            DomainSelector::Name(name) => store
                .read_string(TxId::NONE, &format!("/local/domain/{domid}/name"))
                .is_ok_and(|n| n.trim() == name),
        }
    }
}

/// How the daemon behaves.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Frontend domains trusted with `direct` (section 10.5; also needs Dom0 and
    /// `grant_usage = 0`).
    pub allow_direct: Vec<DomainSelector>,
    /// `max-queue-size` offered (a power of two, at most 1024).
    pub max_queue_size: u32,
    /// `max-persistent-grants` per device (0: no persistent grants).
    pub max_persistent_grants: u32,
    /// Pages all devices of one frontend domain may have mapped together
    /// (`max-pages-per-domain`, issue 13 finding 3).
    pub max_pages_per_domain: u64,
    /// The control socket (`None`: no socket, e.g. in tests).
    pub control_socket: Option<PathBuf>,
    /// 8.5: how long to wait for a frontend to answer a reset after a restart.
    pub restart_timeout: Duration,
    /// How long shutdown waits for connected frontends to close.
    pub shutdown_grace: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            allow_direct: Vec::new(),
            max_queue_size: 1024,
            max_persistent_grants: 1024,
            max_pages_per_domain: crate::budget::DEFAULT_MAX_PAGES_PER_DOMAIN,
            control_socket: None,
            restart_timeout: RESTART_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

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
    root_events: WatchEvents,
    release_events: WatchEvents,
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
        let xs = |what| move |source| DaemonError::Xenstore { what, source };
        let mut root_events = store
            .watch_events_for(&root_token)
            .map_err(xs("opening a watch queue"))?;
        let mut release_events = store
            .watch_events_for(&release_token)
            .map_err(xs("opening a watch queue"))?;
        store
            .watch(&root, &root_token)
            .map_err(xs("watching the backend directory"))?;
        store
            .watch("@releaseDomain", &release_token)
            .map_err(xs("watching @releaseDomain"))?;
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
                root_events,
                release_events,
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
            for key in again {
                self.consider(key);
            }
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
        }
        ControlFlow::Continue(())
    }
}

/// The control socket, removed on drop.
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    fn bind(path: &Path) -> Result<Self, DaemonError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::Io {
                what: format!("another backend is listening on {}", path.display()),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            });
        }
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(io_err(format!("listening on {}", path.display())))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("making the control socket non-blocking"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", path.display())))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one control client: one request line, the answer, EOF.
fn answer_control(std_stream: UnixStream, shared: &Shared) {
    if std_stream.set_nonblocking(false).is_err()
        || std_stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .is_err()
    {
        return;
    }
    let mut line = String::new();
    let mut reader = BufReader::new((&std_stream).take(256));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match line.trim() {
        "stats" => shared.report().to_table(),
        "stats json" => {
            let mut j = shared.report().to_json();
            j.push('\n');
            j
        }
        other => format!(
            "error: unknown request {:?} (expected \"stats\" or \"stats json\")\n",
            other.chars().take(32).collect::<String>()
        ),
    };
    let _ = (&std_stream).write_all(answer.as_bytes());
}

/// Options of `xenvirtio-backend serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket on which the daemon answers `xenvirtio-backend stats` (created mode 0600,
    /// its folder created if missing).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,

    /// Trust this frontend domain (a domid or a domain name) with the `direct` DMA strategy,
    /// which lets the backend map any page of it. Repeat for several domains. `direct` is
    /// also refused unless this backend is Dom0 and the device has `grant_usage = 0`
    /// (attach --dma direct).
    #[arg(long = "allow-direct", value_name = "DOMAIN")]
    pub allow_direct: Vec<DomainSelector>,

    /// Largest queue size offered to frontends (`max-queue-size`): a power of two up to
    /// 1024. blk's `seg_max` is this minus 2.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_queue_size: u32,

    /// Grants of a persistent arena kept mapped per device (`max-persistent-grants`); beyond
    /// this, buffers are mapped per request. 0 turns persistent grants off.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_persistent_grants: u32,

    /// Grant-mapped pages all devices of one frontend domain may hold at once: rings, bounce
    /// pools and their directories, persistent and per-request grants. Mappings are
    /// refused before the map call once a domain holds this many (a connect that needs more
    /// is refused with an `error` node; a request, with a protocol error). The default, 1024
    /// (4 MiB), keeps 100 guests within Dom0's default maptrack table (about 256K entries)
    /// next to blkback and netback; see docs/OPERATING.md. Published to frontends as
    /// `max-pages-per-domain`, and less 16 as `max-bounce-pages`.
    #[arg(long, value_name = "PAGES", default_value_t = crate::budget::DEFAULT_MAX_PAGES_PER_DOMAIN)]
    pub max_pages_per_domain: u64,

    /// This backend's domain id. By default it is read from xenstore (`domid` in the domain's
    /// home, which Xen's init writes for Dom0).
    #[arg(long, value_name = "DOMID")]
    pub domid: Option<DomId>,

    /// The xenstored socket: filled from the global `--xenstore` option.
    #[arg(skip)]
    pub xenstore: Option<PathBuf>,

    /// Seconds a restarted backend waits for a frontend to answer the reset of a device an
    /// earlier instance was serving (PROTOCOL.md 8.5).
    #[arg(long, value_name = "SECONDS", default_value_t = RESTART_TIMEOUT.as_secs())]
    pub restart_timeout: u64,

    /// Seconds shutdown (SIGTERM, SIGINT) waits for connected frontends to close before it
    /// drops their mappings anyway.
    #[arg(long, value_name = "SECONDS", default_value_t = SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace: u64,
}

impl ServeArgs {
    /// The daemon configuration these options describe.
    pub fn config(&self) -> DaemonConfig {
        DaemonConfig {
            allow_direct: self.allow_direct.clone(),
            max_queue_size: self.max_queue_size,
            max_persistent_grants: self.max_persistent_grants,
            max_pages_per_domain: self.max_pages_per_domain,
            control_socket: Some(self.socket.clone()),
            restart_timeout: Duration::from_secs(self.restart_timeout),
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
        }
    }
}

/// Opens, once, every Xen device the daemon will need: gntdev (grant maps and copies), evtchn,
/// and privcmd when some guest may use `direct`. So a daemon that cannot work fails at start
/// instead of publishing devices it cannot serve.
pub fn xen_devices_usable<P: Platform>(
    platform: &P,
    config: &DaemonConfig,
) -> Result<(), xenvirtio_xen::XenError> {
    drop(platform.grant_mapper()?);
    drop(platform.event_channels()?);
    if !config.allow_direct.is_empty() {
        drop(platform.foreign_mapper()?);
    }
    Ok(())
}

/// Runs the real daemon: the Linux Xen devices, xenstored, until SIGTERM or SIGINT.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    // Before any thread exists (the xenstore client starts one), so that every thread
    // inherits the blocked signals and only the waiter thread receives them.
    let signals = xenvirtio_xen::signals::StopSignals::block()
        .context("blocking SIGINT and SIGTERM failed")?;
    let client = match &args.xenstore {
        Some(path) => xenvirtio_xenstore::XsClient::connect_socket(path)
            .with_context(|| format!("connecting to xenstored at {}", path.display()))?,
        None => xenvirtio_xenstore::XsClient::open().context("connecting to xenstored")?,
    };
    let store: Arc<dyn XenStore> = Arc::new(client);
    let domid = match args.domid {
        Some(d) => d,
        None => xenbus::read_u32(&*store, TxId::NONE, "domid")
            .ok()
            .and_then(|d| DomId::try_from(d).ok())
            .context("cannot read this domain's id from xenstore (key `domid`); pass --domid")?,
    };
    let platform = xenvirtio_xen::linux::LinuxXen::new(domid);
    let config = args.config();
    xen_devices_usable(&platform, &config).with_context(|| {
        format!(
            "cannot serve as domain {domid}: the Xen devices it needs cannot be opened (this \
             must run in Dom0 or a driver domain on Xen, as root); nothing was published"
        )
    })?;
    let daemon = Daemon::new(platform, store, config)?;
    let handle = daemon.handle();
    signals.spawn_waiter("xv-signals", move |signal| {
        tracing::info!(signal, "shutting down");
        handle.stop();
    })?;
    daemon.run()?;
    Ok(())
}

/// Options of `xenvirtio-backend stats`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatsArgs {
    /// The daemon's control socket (`serve --socket`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,

    /// Print one JSON object (`{"devices":[...],"process":{...}}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Asks a running daemon for its statistics and returns its answer.
pub fn query_stats(socket: &Path, json: bool) -> std::io::Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(if json { b"stats json\n" } else { b"stats\n" })?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `xenvirtio-backend stats`: prints the daemon's statistics.
pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let out = query_stats(&args.socket, args.json).with_context(|| {
        format!(
            "cannot reach the backend at {} (is `xenvirtio-backend serve` running? see --socket)",
            args.socket.display()
        )
    })?;
    if let Some(e) = out.strip_prefix("error: ") {
        anyhow::bail!("the backend answered: {}", e.trim());
    }
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[derive(Parser, Debug)]
    struct Stats {
        #[command(flatten)]
        args: StatsArgs,
    }

    #[test]
    fn every_option_is_documented_and_parses() {
        Serve::command().debug_assert();
        Stats::command().debug_assert();
        let help = Serve::command().render_long_help().to_string();
        for opt in [
            "--socket",
            "--allow-direct",
            "--max-queue-size",
            "--max-persistent-grants",
            "--max-pages-per-domain",
            "--domid",
            "--restart-timeout",
            "--shutdown-grace",
        ] {
            let line = help
                .lines()
                .position(|l| l.trim_start().starts_with(opt))
                .unwrap_or_else(|| panic!("{opt} missing from --help:\n{help}"));
            let explained = help
                .lines()
                .nth(line + 1)
                .is_some_and(|l| !l.trim().is_empty());
            assert!(explained, "{opt} has no explanation:\n{help}");
        }
        let s = Serve::try_parse_from([
            "serve",
            "--allow-direct",
            "7",
            "--allow-direct",
            "web1",
            "--max-queue-size",
            "256",
        ])
        .unwrap();
        let c = s.args.config();
        assert_eq!(
            c.allow_direct,
            vec![DomainSelector::Id(7), DomainSelector::Name("web1".into())]
        );
        assert_eq!(c.max_queue_size, 256);
        assert_eq!(
            c.control_socket.as_deref(),
            Some(Path::new(DEFAULT_CONTROL_SOCKET))
        );
        let st = Stats::try_parse_from(["stats", "--json"]).unwrap();
        assert!(st.args.json);
        assert!(
            Stats::command()
                .render_long_help()
                .to_string()
                .contains("--json")
        );
    }

    #[test]
    fn a_bad_queue_size_is_refused_before_anything_starts() {
        let hv = xenvirtio_xen::loopback::LoopbackXen::new();
        let xs = xenvirtio_xenstore::MemStore::new();
        let store: Arc<dyn XenStore> = Arc::new(xs.connect(0).unwrap());
        let config = DaemonConfig {
            max_queue_size: 100,
            ..Default::default()
        };
        assert!(matches!(
            Daemon::new(hv.domain(0), store, config),
            Err(DaemonError::BadQueueSize(100))
        ));
    }
}
