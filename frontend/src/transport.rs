//! The frontend's side of the xenbus handshake (`docs/PROTOCOL.md` section 8), and what a
//! connected device shares with its queues.
//!
//! This module owns the device's xenstore conversation: discovery under
//! `/local/domain/<self>/device/virtio/`, the restart rule (8.7), feature negotiation, the choice
//! of DMA strategy (logged and written to `dma`/`dma-reason`), publishing the queues **and
//! `state = 3` in one transaction**, waiting for the backend, and teardown (Closing, wait for
//! the backend's Closed, only then revoke grants, Closed). A monitor thread per connected
//! device watches the backend's `state` and `config-generation`: when the backend leaves
//! Connected it fails the outstanding requests (through [`Link`]) and writes Closing.
//!
//! Every wait has a timeout: a backend that vanishes mid-handshake is an error that says what
//! was waited for and what was seen, never a hang. Values read from the backend directory are
//! parsed strictly and bounded. This module never touches ring contents (see [`crate::queue`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::Waker;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::features::{self, bit, transport as ft};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{
    MAX_QUEUE_SIZE, MAX_QUEUES, backend_keys as bk, decode_hex, format_features,
    frontend_keys as fk,
};
use xenvirtio_virtio::split::RingLayout;
use xenvirtio_xen::DomId;
use xenvirtio_xen::platform::Platform;
use xenvirtio_xen::role::{DomainRole, RoleError};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, XenStore, XsError, transaction};

use crate::dma::{Arena, DmaError, DmaMemory, DmaStats, RingAddress, RingArea};
use crate::policy::{self, DmaChoice, PolicyError, PolicyInput};
use crate::queue::{EventCounters, EventStats, QueueEvents, QueueEventsError, Virtqueue};

/// How long each handshake step waits for the backend by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Queue size used when nobody asks for one (capped by the backend's `max-queue-size`).
pub const DEFAULT_QUEUE_SIZE: u32 = 256;
/// Attempts of the publishing transaction on EAGAIN.
const TRANSACTION_ATTEMPTS: u32 = 16;
/// How often the monitor thread checks whether it should stop.
const MONITOR_TICK: Duration = Duration::from_millis(100);
/// Quiet monitor ticks after which the backend's state is re-read anyway (1 s).
const MONITOR_RECHECK_TICKS: u32 = 10;

/// What the caller can choose about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// `--dma`: a strategy to use instead of the role's default (refused where unsafe).
    pub dma: Option<DmaStrategy>,
    /// Pages of DMA memory: the grant arena, the bounce pool, or pinned memory (rounded up to
    /// 2 MiB).
    pub dma_pages: usize,
    /// Under `grant`, offer the arena as persistent grants when the backend supports them.
    pub persistent: bool,
    /// Queues to set up (blk only; capped by `max-queues`). `None`: the backend's
    /// `max-queues`.
    pub num_queues: Option<u32>,
    /// Entries per queue (a power of two, capped by `max-queue-size`).
    pub queue_size: Option<u32>,
    /// How long each step of the handshake and of teardown waits for the backend.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            dma: None,
            dma_pages: crate::dma::DEFAULT_DMA_PAGES,
            persistent: true,
            num_queues: None,
            queue_size: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Errors of discovery, the handshake and teardown.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// There is no such device.
    #[error(
        "domain {domid} has no virtio device {devid} (devices: {}); see `xenvirtio-frontend list`",
        list_or_none(.available)
    )]
    NoSuchDevice {
        /// This domain.
        domid: DomId,
        /// The device asked for.
        devid: u32,
        /// The devices that exist.
        available: Vec<u32>,
    },
    /// The device is not of the kind the driver drives.
    #[error("device {devid} is {found}, not {expected}")]
    WrongKind {
        /// The device.
        devid: u32,
        /// What the driver drives.
        expected: DeviceKind,
        /// What the backend's `type` says.
        found: String,
    },
    /// A xenstore operation failed.
    #[error("device {devid}: {what}")]
    Store {
        /// The device.
        devid: u32,
        /// What was being done.
        what: String,
        /// The store's error.
        #[source]
        source: XsError,
    },
    /// The backend published something unusable.
    #[error("device {devid}: the backend's {key} is unusable: {why}")]
    BadBackend {
        /// The device.
        devid: u32,
        /// The key.
        key: &'static str,
        /// Why.
        why: String,
    },
    /// The backend did not reach a state in time.
    #[error(
        "device {devid}: the backend (domain {backend}) did not reach {waiting_for} within \
         {waited:?}; its state is {state}{}. Is xenvirtio-backend running in domain {backend}?",
        error_suffix(.error)
    )]
    BackendTimeout {
        /// The device.
        devid: u32,
        /// The backend domain.
        backend: DomId,
        /// The state waited for.
        waiting_for: &'static str,
        /// The last state seen.
        state: String,
        /// How long it waited.
        waited: Duration,
        /// The backend's `error` node, if any.
        error: Option<String>,
    },
    /// The backend directory disappeared.
    #[error("device {devid}: the backend directory {path} disappeared (device detached?)")]
    BackendGone {
        /// The device.
        devid: u32,
        /// The directory.
        path: String,
    },
    /// The backend refused the connection (it went to Closing instead of Connected).
    #[error("device {devid}: the backend (domain {backend}) refused the connection: {error}")]
    BackendRefused {
        /// The device.
        devid: u32,
        /// The backend domain.
        backend: DomId,
        /// Its `error` node, or the state it went to.
        error: String,
    },
    /// The DMA strategy asked for is not allowed.
    #[error("device {devid}")]
    Policy {
        /// The device.
        devid: u32,
        /// The policy's refusal.
        #[source]
        source: PolicyError,
    },
    /// The device lacks a feature the driver needs, or offers one it cannot accept.
    #[error("device {devid}: {why}")]
    Features {
        /// The device.
        devid: u32,
        /// What is wrong.
        why: String,
    },
    /// DMA memory could not be set up.
    #[error("device {devid}")]
    Dma {
        /// The device.
        devid: u32,
        /// The DMA layer's error.
        #[source]
        source: DmaError,
    },
    /// An event channel could not be set up.
    #[error("device {devid}, queue {queue}")]
    Events {
        /// The device.
        devid: u32,
        /// The queue.
        queue: u32,
        /// What failed.
        #[source]
        source: QueueEventsError,
    },
    /// This domain's role could not be determined.
    #[error("cannot determine this domain's role for the DMA policy")]
    Role(#[from] RoleError),
}

fn list_or_none(ids: &[u32]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn error_suffix(error: &Option<String>) -> String {
    match error {
        Some(e) => format!(" with error {e:?}"),
        None => String::new(),
    }
}

/// Reads this domain's id: the relative key `domid` (what a guest's xenbus connection sees),
/// or 0 when it is absent and `dom0_socket` says the connection is Dom0's own socket.
pub fn self_domid(store: &dyn XenStore, dom0_socket: bool) -> Result<DomId, XsError> {
    match xenbus::optional(xenbus::read_u32(store, TxId::NONE, "domid"))? {
        Some(d) => DomId::try_from(d).map_err(|_| XsError::BadValue {
            path: "domid".into(),
            value: d.to_string(),
            expected: "a domain id below 65536",
        }),
        None if dom0_socket => Ok(0),
        None => Err(XsError::BadValue {
            path: "domid".into(),
            value: "(absent)".into(),
            expected: "this domain's id, which the toolstack writes for every guest",
        }),
    }
}

/// What `list` shows about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device number.
    pub devid: u32,
    /// The frontend directory.
    pub frontend_dir: String,
    /// The backend directory (`backend` key).
    pub backend_dir: Option<String>,
    /// The backend domain (`backend-id` key).
    pub backend_id: Option<DomId>,
    /// The device kind, if the backend's `type` names one this crate drives.
    pub kind: Option<DeviceKind>,
    /// The backend's `type` as written.
    pub type_string: Option<String>,
    /// The frontend's state.
    pub frontend_state: Option<XenbusState>,
    /// The backend's state.
    pub backend_state: Option<XenbusState>,
    /// The strategy in use (`dma` key of the frontend directory).
    pub dma: Option<String>,
    /// Why (`dma-reason`).
    pub dma_reason: Option<String>,
    /// The frontend's `error` node.
    pub frontend_error: Option<String>,
    /// The backend's `error` node.
    pub backend_error: Option<String>,
}

/// Everything the frontend knows about the backend's offer, read at InitWait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOffer {
    /// `device-features`.
    pub device_features: u64,
    /// `max-queues`.
    pub max_queues: u32,
    /// `max-queue-size`.
    pub max_queue_size: u32,
    /// `feature-persistent`.
    pub persistent: bool,
    /// `grant_usage` (absent counts as 1: translated addresses).
    pub grant_usage: bool,
    /// The operator's `dma` pin (`auto` is `None`).
    pub pinned: Option<DmaStrategy>,
    /// `config`.
    pub config: Vec<u8>,
    /// `config-generation`.
    pub config_generation: u32,
}

/// A device's config space as last read, with its generation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceConfig {
    /// `config-generation`.
    pub generation: u32,
    /// The config struct's bytes.
    pub bytes: Vec<u8>,
}

/// The state a connected device's queues share with its monitor: whether the backend is
/// still there, and how to wake threads that wait on the queues.
#[derive(Debug, Default)]
pub(crate) struct Link {
    lost: Mutex<Option<String>>,
    wakers: Mutex<Vec<Arc<Waker>>>,
}

impl Link {
    /// Why the device stopped, if it did.
    pub(crate) fn lost(&self) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Marks the device stopped (the first reason wins) and wakes every waiter.
    pub(crate) fn mark_lost(&self, reason: String) {
        {
            let mut lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
            if lost.is_none() {
                *lost = Some(reason);
            }
        }
        for w in self
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if let Err(e) = w.wake() {
                tracing::debug!(error = %e, "waking a queue waiter failed");
            }
        }
    }

    fn add_waker(&self, waker: Arc<Waker>) {
        self.wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(waker);
    }
}

/// The frontend of one domain: finds its devices and connects them.
pub struct Frontend<P: Platform> {
    platform: P,
    store: Arc<dyn XenStore>,
    role: DomainRole,
}

impl<P: Platform> std::fmt::Debug for Frontend<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("role", &self.role)
            .finish()
    }
}

impl<P: Platform + Clone> Frontend<P> {
    /// A frontend acting as `role.domid` through `platform` and `store`. The role decides the
    /// default DMA strategy; detect it with [`DomainRole::detect`], or state it (tests, the
    /// loopback pair).
    pub fn new(platform: P, store: Arc<dyn XenStore>, role: DomainRole) -> Self {
        Self {
            platform,
            store,
            role,
        }
    }

    /// This domain.
    pub fn domid(&self) -> DomId {
        self.role.domid
    }

    /// This domain's role.
    pub fn role(&self) -> &DomainRole {
        &self.role
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn XenStore> {
        &self.store
    }

    /// The platform.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    fn store_err(devid: u32, what: impl Into<String>) -> impl FnOnce(XsError) -> ConnectError {
        let what = what.into();
        move |source| ConnectError::Store {
            devid,
            what,
            source,
        }
    }

    /// The device numbers under this domain's `device/virtio/`, in ascending order.
    pub fn devids(&self) -> Result<Vec<u32>, ConnectError> {
        let root = xenbus::frontend_root(self.domid());
        let names = match self.store.directory(TxId::NONE, &root) {
            Ok(n) => n,
            Err(e) if e.is_enoent() => Vec::new(),
            Err(e) => return Err(Self::store_err(0, format!("listing {root}"))(e)),
        };
        let mut ids: Vec<u32> = names.iter().filter_map(|n| n.parse().ok()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// What xenstore says about device `devid`.
    pub fn device(&self, devid: u32) -> Result<DeviceInfo, ConnectError> {
        let fdir = xenbus::frontend_dir(self.domid(), devid);
        let s = &*self.store;
        let err = |what: &str| Self::store_err(devid, format!("reading {fdir}/{what}"));
        let backend_dir = s
            .read_optional(TxId::NONE, &format!("{fdir}/{}", fk::BACKEND))
            .map_err(err(fk::BACKEND))?;
        let Some(backend_dir) = backend_dir else {
            return Err(ConnectError::NoSuchDevice {
                domid: self.domid(),
                devid,
                available: self.devids()?,
            });
        };
        let backend_dir = String::from_utf8_lossy(&backend_dir).trim().to_owned();
        let text = |path: String| -> Result<Option<String>, ConnectError> {
            match s.read_optional(TxId::NONE, &path) {
                Ok(v) => Ok(v.map(|v| String::from_utf8_lossy(&v).trim().to_owned())),
                // The backend directory may be unreadable (not created yet, or perms).
                Err(e) if e.is_eacces() => Ok(None),
                Err(e) => Err(Self::store_err(devid, format!("reading {path}"))(e)),
            }
        };
        let state = |path: String| -> Result<Option<XenbusState>, ConnectError> {
            Ok(text(path)?.and_then(|v| XenbusState::from_node_value(v.as_bytes())))
        };
        let type_string = text(format!("{backend_dir}/{}", bk::TYPE))?;
        let kind = type_string
            .as_deref()
            .and_then(DeviceKind::parse_type_string)
            .and_then(DeviceKind::from_device_id);
        Ok(DeviceInfo {
            devid,
            backend_id: text(format!("{fdir}/{}", fk::BACKEND_ID))?.and_then(|v| v.parse().ok()),
            kind,
            type_string,
            frontend_state: state(xenbus::state_path(&fdir))?,
            backend_state: state(xenbus::state_path(&backend_dir))?,
            dma: text(format!("{fdir}/{}", fk::DMA))?,
            dma_reason: text(format!("{fdir}/{}", fk::DMA_REASON))?,
            frontend_error: text(format!("{fdir}/{}", fk::ERROR))?,
            backend_error: text(format!("{backend_dir}/{}", bk::ERROR))?,
            frontend_dir: fdir,
            backend_dir: Some(backend_dir),
        })
    }

    /// Every device of this domain.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ConnectError> {
        self.devids()?.into_iter().map(|d| self.device(d)).collect()
    }

    /// Reads the backend's offer (in one transaction, so `config` and its generation match).
    pub fn read_offer(&self, devid: u32, bdir: &str) -> Result<BackendOffer, ConnectError> {
        let s = &*self.store;
        let key = |k: &str| format!("{bdir}/{k}");
        let bad = |key: &'static str, why: String| ConnectError::BadBackend { devid, key, why };
        let offer = transaction(s, TRANSACTION_ATTEMPTS, |tx| {
            let device_features = xenbus::read_hex_u64(s, tx, &key(bk::DEVICE_FEATURES))?;
            let max_queues = xenbus::read_u32(s, tx, &key(bk::MAX_QUEUES))?;
            let max_queue_size = xenbus::read_u32(s, tx, &key(bk::MAX_QUEUE_SIZE))?;
            let persistent =
                xenbus::optional(xenbus::read_bool(s, tx, &key(bk::FEATURE_PERSISTENT)))?
                    .unwrap_or(false);
            let grant_usage =
                xenbus::optional(xenbus::read_bool(s, tx, &key(bk::GRANT_USAGE)))?.unwrap_or(true);
            let pinned = xenbus::optional(s.read_string(tx, &key(bk::DMA)))?;
            let config = s.read_optional(tx, &key(bk::CONFIG))?.unwrap_or_default();
            let generation =
                xenbus::optional(xenbus::read_u32(s, tx, &key(bk::CONFIG_GENERATION)))?
                    .unwrap_or(0);
            Ok((
                device_features,
                max_queues,
                max_queue_size,
                persistent,
                grant_usage,
                pinned,
                config,
                generation,
            ))
        })
        .map_err(Self::store_err(
            devid,
            format!("reading the backend's offer in {bdir}"),
        ))?;
        let (
            device_features,
            max_queues,
            max_queue_size,
            persistent,
            grant_usage,
            pinned,
            config,
            gen_,
        ) = offer;
        if max_queues == 0 || max_queues > MAX_QUEUES {
            return Err(bad(
                bk::MAX_QUEUES,
                format!("{max_queues} is not between 1 and {MAX_QUEUES}"),
            ));
        }
        if max_queue_size == 0
            || !max_queue_size.is_power_of_two()
            || max_queue_size > MAX_QUEUE_SIZE
        {
            return Err(bad(
                bk::MAX_QUEUE_SIZE,
                format!("{max_queue_size} is not a power of two between 1 and {MAX_QUEUE_SIZE}"),
            ));
        }
        let pinned = match pinned.as_deref().map(str::trim) {
            None | Some("auto") | Some("") => None,
            Some(s) => Some(
                s.parse::<DmaStrategy>()
                    .map_err(|e| bad(bk::DMA, e.to_string()))?,
            ),
        };
        let config_text = String::from_utf8_lossy(&config).into_owned();
        let config = decode_hex(&config_text).map_err(|e| bad(bk::CONFIG, e.to_string()))?;
        Ok(BackendOffer {
            device_features,
            max_queues,
            max_queue_size,
            persistent,
            grant_usage,
            pinned,
            config,
            config_generation: gen_,
        })
    }

    /// The policy's input for a device with this offer.
    pub fn policy_input(
        &self,
        backend_id: DomId,
        offer: &BackendOffer,
        requested: Option<DmaStrategy>,
    ) -> PolicyInput {
        PolicyInput {
            is_dom0: self.role.is_dom0,
            arch: self.role.arch,
            guest_type: self.role.guest_type,
            backend_domid: backend_id,
            grant_usage: offer.grant_usage,
            device_features: offer.device_features,
            pinned: offer.pinned,
            requested,
        }
    }

    /// What the policy would choose for `devid` now (for `list`), without connecting.
    pub fn preview_dma(
        &self,
        devid: u32,
        requested: Option<DmaStrategy>,
    ) -> Result<DmaChoice, ConnectError> {
        let info = self.device(devid)?;
        let bdir = info.backend_dir.unwrap_or_default();
        let offer = self.read_offer(devid, &bdir)?;
        let backend = info.backend_id.unwrap_or(0);
        policy::choose(&self.policy_input(backend, &offer, requested))
            .map_err(|source| ConnectError::Policy { devid, source })
    }

    /// Runs the handshake for `devid` as a device of `kind`, accepting `device_bits` of the
    /// device-specific features, with `num_queues` queues (capped by the backend).
    pub(crate) fn connect_transport(
        &self,
        devid: u32,
        kind: DeviceKind,
        device_bits: u64,
        num_queues: QueueCount,
        options: &ConnectOptions,
    ) -> Result<(Transport<P>, Vec<QueueParts<P>>), ConnectError> {
        let span = tracing::info_span!("connect", domid = self.domid(), devid, %kind);
        let _enter = span.enter();
        let info = self.device(devid)?;
        if info.kind != Some(kind) {
            return Err(ConnectError::WrongKind {
                devid,
                expected: kind,
                found: info.type_string.clone().unwrap_or_else(|| {
                    "of no known type (the backend's type is unreadable)".into()
                }),
            });
        }
        let fdir = info.frontend_dir.clone();
        let bdir = info.backend_dir.clone().unwrap_or_default();
        let backend = info.backend_id.ok_or_else(|| ConnectError::BadBackend {
            devid,
            key: fk::BACKEND_ID,
            why: "absent or not a domain id".into(),
        })?;
        let ctx = DeviceCtx {
            store: Arc::clone(&self.store),
            domid: self.domid(),
            devid,
            backend,
            fdir,
            bdir,
            timeout: options.timeout,
        };
        ctx.reset_leftover_state(info.frontend_state)?;
        ctx.wait_backend_init_wait()?;
        let offer = self.read_offer(devid, &ctx.bdir)?;

        // The DMA strategy.
        let input = self.policy_input(backend, &offer, options.dma);
        let choice = match policy::choose(&input) {
            Ok(c) => c,
            Err(source) => {
                ctx.fail(&source.to_string());
                return Err(ConnectError::Policy { devid, source });
            }
        };
        // Features.
        let driver_features = match negotiate(kind, offer.device_features, device_bits) {
            Ok(f) => f,
            Err(why) => {
                ctx.fail(&why);
                return Err(ConnectError::Features { devid, why });
            }
        };
        let queues = match num_queues {
            QueueCount::Exactly(n) if offer.max_queues < n => {
                let why = format!(
                    "{kind} needs {n} queues but the backend offers max-queues={}",
                    offer.max_queues
                );
                ctx.fail(&why);
                return Err(ConnectError::Features { devid, why });
            }
            QueueCount::Exactly(n) => n,
            QueueCount::UpTo(n) => n.clamp(1, offer.max_queues),
        };
        let queue_size = largest_power_of_two_at_most(
            options
                .queue_size
                .unwrap_or(DEFAULT_QUEUE_SIZE)
                .clamp(1, offer.max_queue_size),
        );
        let persistent =
            choice.strategy == DmaStrategy::Grant && options.persistent && offer.persistent;

        // A bounce pool no larger than the backend's per-device share of this domain's page
        // budget (`max-bounce-pages`, PROTOCOL.md 2.2): a larger one would be refused.
        let mut dma_pages = options.dma_pages;
        if choice.strategy == DmaStrategy::Bounce {
            let max = xenbus::optional(xenbus::read_u32(
                &*self.store,
                TxId::NONE,
                &format!("{}/{}", ctx.bdir, bk::MAX_BOUNCE_PAGES),
            ))
            .ok()
            .flatten();
            if let Some(max) = max.filter(|&m| m > 0 && (m as usize) < dma_pages) {
                tracing::info!(
                    devid,
                    asked = dma_pages,
                    max_bounce_pages = max,
                    "bounce pool sized to the backend's max-bounce-pages"
                );
                dma_pages = max as usize;
            }
        }
        let dma = DmaMemory::new(
            &self.platform,
            choice.strategy,
            backend,
            dma_pages,
            persistent,
        )
        .map_err(|source| ConnectError::Dma { devid, source })?;
        let mut reason = choice.reason.clone();
        if dma.may_migrate() {
            reason.push_str(
                "; WARNING: pinned memory is mlock'ed 4 KiB pages that the kernel may migrate",
            );
        }
        tracing::info!(
            domid = self.domid(),
            devid,
            backend,
            dma = %choice.strategy,
            persistent,
            reason = %reason,
            "DMA strategy chosen"
        );

        let counters = Arc::new(EventCounters::default());
        let link = Arc::new(Link::default());
        let mut parts = Vec::new();
        for q in 0..queues {
            let layout = RingLayout::new(queue_size, offer.max_queue_size)
                .expect("the size was clamped to a power of two within the maximum");
            let ring = dma
                .alloc_ring(layout.pages())
                .map_err(|source| ConnectError::Dma { devid, source })?;
            let handle = self
                .platform
                .event_channels()
                .map_err(|e| ConnectError::Events {
                    devid,
                    queue: q,
                    source: QueueEventsError::Open(e),
                })?;
            let events = QueueEvents::new(q as u16, handle, backend, Arc::clone(&counters))
                .map_err(|source| ConnectError::Events {
                    devid,
                    queue: q,
                    source,
                })?;
            link.add_waker(events.waker());
            parts.push(QueueParts {
                index: q as u16,
                layout,
                ring,
                events: Arc::new(events),
            });
        }

        let negotiated = Negotiated {
            device_features: offer.device_features,
            driver_features,
            strategy: choice.strategy,
            reason,
            persistent,
            queue_size,
        };
        if let Err(e) = ctx.publish(&negotiated, &dma, &parts) {
            // Nothing reached the backend (the transaction did not commit).
            ctx.fail(&e.to_string());
            return Err(e);
        }
        tracing::debug!(
            features = %features::describe(kind.device_id(), driver_features),
            queues,
            queue_size,
            "published queues, state Initialised"
        );
        let mut transport = Transport {
            ctx,
            negotiated,
            dma: Some(dma),
            link,
            config: Arc::new(Mutex::new(DeviceConfig {
                generation: offer.config_generation,
                bytes: offer.config,
            })),
            monitor: None,
            counters,
        };
        match transport.ctx.wait_backend_connected() {
            Ok(()) => {}
            Err(e) => {
                // The backend may have mapped the rings: tear down by the rules.
                if let Err(close) = transport.teardown(parts) {
                    tracing::debug!(error = %close, "teardown after a failed connect");
                }
                return Err(e);
            }
        }
        if let Err(source) =
            xenbus::switch_state(&*self.store, &transport.ctx.fdir, XenbusState::Connected)
        {
            let e = Self::store_err(devid, "switching to Connected")(source);
            if let Err(close) = transport.teardown(parts) {
                tracing::debug!(error = %close, "teardown after a failed connect");
            }
            return Err(e);
        }
        transport.monitor = Some(Monitor::spawn(
            &transport.ctx,
            Arc::clone(&transport.link),
            Arc::clone(&transport.config),
        ));
        tracing::info!(
            domid = self.domid(),
            devid,
            backend,
            dma = %transport.negotiated.strategy,
            queues,
            queue_size,
            "device connected"
        );
        Ok((transport, parts))
    }
}

/// How many queues a driver wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueCount {
    /// Exactly this many (console: 2); fewer offered is an error.
    Exactly(u32),
    /// As many as offered, up to this many.
    UpTo(u32),
}

fn largest_power_of_two_at_most(n: u32) -> u32 {
    if n.is_power_of_two() {
        n
    } else {
        n.next_power_of_two() / 2
    }
}

/// The features to accept: `VERSION_1` (required), `ACCESS_PLATFORM` when offered (required
/// by PROTOCOL.md 10.1), `RING_EVENT_IDX`, `RING_INDIRECT_DESC`, and the device bits the
/// driver supports.
pub(crate) fn negotiate(kind: DeviceKind, offered: u64, device_bits: u64) -> Result<u64, String> {
    if !features::has(offered, ft::VERSION_1) {
        return Err(format!(
            "the device does not offer VERSION_1 (offered: {}); legacy devices are not supported",
            features::describe(kind.device_id(), offered)
        ));
    }
    let transport = bit(ft::VERSION_1)
        | bit(ft::ACCESS_PLATFORM)
        | bit(ft::RING_EVENT_IDX)
        | bit(ft::RING_INDIRECT_DESC);
    Ok(offered & (transport | device_bits))
}

/// What the handshake settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Offered features.
    pub device_features: u64,
    /// Accepted features.
    pub driver_features: u64,
    /// The DMA strategy.
    pub strategy: DmaStrategy,
    /// Why (as written to `dma-reason`).
    pub reason: String,
    /// Whether persistent grants are in use.
    pub persistent: bool,
    /// Entries per queue.
    pub queue_size: u32,
}

/// One queue as the handshake set it up, for a driver to wrap.
pub(crate) struct QueueParts<P: Platform> {
    pub(crate) index: u16,
    pub(crate) layout: RingLayout,
    pub(crate) ring: RingArea,
    pub(crate) events: Arc<QueueEvents<P::Events>>,
}

impl<P: Platform> QueueParts<P> {
    /// The driver's queue over these parts.
    pub(crate) fn into_virtqueue<T>(
        self,
        features: u64,
        arena: Arc<Arena>,
    ) -> Virtqueue<P::Events, T> {
        Virtqueue::new(
            self.index,
            self.ring,
            self.layout,
            features,
            self.events,
            arena,
        )
    }
}

/// The xenstore side of one device.
#[derive(Clone)]
pub(crate) struct DeviceCtx {
    pub(crate) store: Arc<dyn XenStore>,
    pub(crate) domid: DomId,
    pub(crate) devid: u32,
    pub(crate) backend: DomId,
    pub(crate) fdir: String,
    pub(crate) bdir: String,
    pub(crate) timeout: Duration,
}

impl DeviceCtx {
    fn store_err(&self, what: impl Into<String>) -> impl FnOnce(XsError) -> ConnectError {
        let devid = self.devid;
        let what = what.into();
        move |source| ConnectError::Store {
            devid,
            what,
            source,
        }
    }

    fn backend_error(&self) -> Option<String> {
        self.store
            .read_optional(TxId::NONE, &format!("{}/{}", self.bdir, bk::ERROR))
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    fn backend_state(&self) -> Option<XenbusState> {
        xenbus::read_state(&*self.store, TxId::NONE, &xenbus::state_path(&self.bdir)).ok()
    }

    fn switch(&self, state: XenbusState) -> Result<(), ConnectError> {
        xenbus::switch_state(&*self.store, &self.fdir, state)
            .map_err(self.store_err(format!("switching to {state}")))
    }

    /// Waits for the backend's state to satisfy `until`; maps the store's errors to ones that
    /// say what was waited for.
    fn wait_backend(
        &self,
        waiting_for: &'static str,
        until: impl FnMut(XenbusState) -> bool,
    ) -> Result<XenbusState, ConnectError> {
        let path = xenbus::state_path(&self.bdir);
        match xenbus::wait_for_state(&*self.store, &path, until, self.timeout) {
            Ok(s) => Ok(s),
            Err(XsError::WaitTimeout { last, waited, .. }) => Err(ConnectError::BackendTimeout {
                devid: self.devid,
                backend: self.backend,
                waiting_for,
                state: last,
                waited,
                error: self.backend_error(),
            }),
            Err(XsError::NodeVanished { .. }) => Err(ConnectError::BackendGone {
                devid: self.devid,
                path: self.bdir.clone(),
            }),
            // Once the directory is gone, the parent the toolstack made unreadable to the
            // guest answers EACCES rather than ENOENT.
            Err(e) if e.is_enoent() || e.is_eacces() => Err(ConnectError::BackendGone {
                devid: self.devid,
                path: self.bdir.clone(),
            }),
            Err(e) => Err(self
                .store_err(format!("waiting for the backend to reach {waiting_for}"))(
                e,
            )),
        }
    }

    /// PROTOCOL.md 8.7: a state left by an earlier instance is closed first, and a Closed
    /// frontend asks for a reconnect (`Sf = 1`).
    fn reset_leftover_state(&self, state: Option<XenbusState>) -> Result<(), ConnectError> {
        let state = state.unwrap_or(XenbusState::Initialising);
        match state {
            XenbusState::Initialising | XenbusState::Unknown => return Ok(()),
            XenbusState::Closed => {}
            other => {
                tracing::info!(
                    domid = self.domid,
                    devid = self.devid,
                    state = %other,
                    "an earlier instance left the device connected; closing it first"
                );
                self.switch(XenbusState::Closing)?;
                self.wait_backend("Closed", |s| s == XenbusState::Closed)?;
                self.switch(XenbusState::Closed)?;
            }
        }
        // Closed: ask the backend for a reconnect (8.2, 8.3).
        self.switch(XenbusState::Initialising)
    }

    /// 8.1 step 2: the backend publishes its offer and goes to InitWait.
    fn wait_backend_init_wait(&self) -> Result<(), ConnectError> {
        self.wait_backend("InitWait", |s| s == XenbusState::InitWait)
            .map(drop)
    }

    /// 8.1 step 4: the backend maps everything and goes to Connected, or refuses.
    fn wait_backend_connected(&self) -> Result<(), ConnectError> {
        let s = self.wait_backend("Connected", |s| {
            matches!(
                s,
                XenbusState::Connected | XenbusState::Closing | XenbusState::Closed
            )
        })?;
        if s == XenbusState::Connected {
            return Ok(());
        }
        Err(ConnectError::BackendRefused {
            devid: self.devid,
            backend: self.backend,
            error: self
                .backend_error()
                .unwrap_or_else(|| format!("it went to {s} without an error node")),
        })
    }

    /// 8.6: the frontend cannot use the device: `error` and `Sf = 6`.
    fn fail(&self, why: &str) {
        let path = format!("{}/{}", self.fdir, fk::ERROR);
        if let Err(e) = self.store.write(TxId::NONE, &path, why.as_bytes()) {
            tracing::debug!(error = %e, "writing the frontend's error node failed");
        }
        if let Err(e) = self.switch(XenbusState::Closed) {
            tracing::debug!(error = %e, "switching to Closed after an error failed");
        }
    }

    /// 8.1 step 3: everything of section 2.3 and `state = 3`, in one transaction.
    fn publish<P: Platform>(
        &self,
        negotiated: &Negotiated,
        dma: &DmaMemory<P>,
        queues: &[QueueParts<P>],
    ) -> Result<(), ConnectError> {
        let s = &*self.store;
        let fdir = &self.fdir;
        let key = |k: &str| format!("{fdir}/{k}");
        let state_path = xenbus::state_path(fdir);
        transaction(s, TRANSACTION_ATTEMPTS, |tx| {
            // The device must still exist; a removed directory is not recreated.
            match s.read(tx, &state_path) {
                Ok(_) => {}
                Err(e) if e.is_enoent() => {
                    return Err(XsError::NodeVanished {
                        path: state_path.clone(),
                    });
                }
                Err(e) => return Err(e),
            }
            // Nothing of an earlier connection may be reused (8.7).
            for child in s.directory(tx, fdir)? {
                if child.starts_with("queue-")
                    || child == "bounce"
                    || child == fk::FEATURE_PERSISTENT
                    || child == fk::ERROR
                {
                    s.rm(tx, &key(&child))?;
                }
            }
            s.write_str(
                tx,
                &key(fk::DRIVER_FEATURES),
                &format_features(negotiated.driver_features),
            )?;
            s.write_str(tx, &key(fk::DMA), negotiated.strategy.name())?;
            s.write_str(tx, &key(fk::DMA_REASON), &negotiated.reason)?;
            s.write_str(tx, &key(fk::NUM_QUEUES), &queues.len().to_string())?;
            for q in queues {
                let n = u32::from(q.index);
                s.write_str(
                    tx,
                    &key(&fk::queue(n, fk::QUEUE_SIZE)),
                    &negotiated.queue_size.to_string(),
                )?;
                match q.ring.address() {
                    RingAddress::Refs(refs) => s.write_str(
                        tx,
                        &key(&fk::queue(n, fk::QUEUE_RING_REF)),
                        &join(refs.iter().map(u32::to_string)),
                    )?,
                    RingAddress::Gfns(gfns) => s.write_str(
                        tx,
                        &key(&fk::queue(n, fk::QUEUE_RING_GFN)),
                        &join(gfns.iter().map(|g| format!("{g:x}"))),
                    )?,
                }
                s.write_str(
                    tx,
                    &key(&fk::queue(n, fk::QUEUE_EVENT_CHANNEL)),
                    &q.events.port().to_string(),
                )?;
            }
            if negotiated.strategy == DmaStrategy::Grant {
                s.write_str(
                    tx,
                    &key(fk::FEATURE_PERSISTENT),
                    if negotiated.persistent { "1" } else { "0" },
                )?;
            }
            if let Some(dir) = dma.bounce_directory() {
                s.write_str(tx, &key(fk::BOUNCE_PAGES), &dma.pages().to_string())?;
                s.write_str(
                    tx,
                    &key(fk::BOUNCE_DIR_REF),
                    &join(dir.iter().map(u32::to_string)),
                )?;
            }
            s.write_str(
                tx,
                &state_path,
                &XenbusState::Initialised.value().to_string(),
            )
        })
        .map_err(|e| match e {
            XsError::NodeVanished { path } => ConnectError::BackendGone {
                devid: self.devid,
                path,
            },
            e => self.store_err("publishing the queues (state Initialised)")(e),
        })
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(" ")
}

/// A connected device's transport: its xenstore side, DMA memory, monitor and counters. The
/// driver owns the queues and hands them back to [`Transport::teardown`].
pub(crate) struct Transport<P: Platform> {
    pub(crate) ctx: DeviceCtx,
    pub(crate) negotiated: Negotiated,
    dma: Option<DmaMemory<P>>,
    pub(crate) link: Arc<Link>,
    pub(crate) config: Arc<Mutex<DeviceConfig>>,
    monitor: Option<Monitor>,
    pub(crate) counters: Arc<EventCounters>,
}

impl<P: Platform> Transport<P> {
    pub(crate) fn dma(&self) -> &DmaMemory<P> {
        self.dma
            .as_ref()
            .expect("DMA memory lives until teardown consumes the transport")
    }

    pub(crate) fn arena(&self) -> Arc<Arena> {
        self.dma().arena()
    }

    pub(crate) fn config(&self) -> DeviceConfig {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn event_stats(&self) -> EventStats {
        self.counters.snapshot()
    }

    pub(crate) fn dma_stats(&self) -> DmaStats {
        self.dma().stats()
    }

    /// 8.2 (and the end of 8.3): Closing, wait for the backend's Closed, then drop the
    /// queues (event channels, rings) and the DMA memory (grants), then Closed. If the backend
    /// never answers, the memory is abandoned by the rules of [`DmaMemory::abandon`].
    pub(crate) fn teardown<Q>(&mut self, queues: Q) -> Result<(), ConnectError> {
        if let Some(m) = self.monitor.take() {
            m.stop();
        }
        self.link.mark_lost("the device is being closed".into());
        let ctx = &self.ctx;
        let state = xenbus::read_state(&*ctx.store, TxId::NONE, &xenbus::state_path(&ctx.fdir));
        let switched = match state {
            Ok(XenbusState::Closing) | Ok(XenbusState::Closed) => Ok(()),
            _ => ctx.switch(XenbusState::Closing),
        };
        let closed = switched.and_then(|()| {
            if ctx.backend_state() == Some(XenbusState::Closed) {
                Ok(XenbusState::Closed)
            } else {
                ctx.wait_backend("Closed", |s| s == XenbusState::Closed)
            }
        });
        drop(queues);
        let dma = self.dma.take();
        let result = match closed {
            Ok(_) => {
                if let Some(dma) = dma {
                    dma.release_after_backend_closed();
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    domid = ctx.domid,
                    devid = ctx.devid,
                    error = %e,
                    "the backend did not confirm Closed; releasing what is safe to release"
                );
                if let Some(dma) = dma {
                    dma.abandon();
                }
                Err(e)
            }
        };
        match xenbus::switch_state(&*ctx.store, &ctx.fdir, XenbusState::Closed) {
            Ok(()) => {}
            Err(XsError::NodeVanished { .. }) => {}
            Err(e) => tracing::debug!(error = %e, "switching to Closed failed"),
        }
        tracing::info!(domid = ctx.domid, devid = ctx.devid, "device closed");
        result
    }
}

impl<P: Platform> Drop for Transport<P> {
    fn drop(&mut self) {
        if self.dma.is_some() {
            // A driver that was not closed explicitly: close now (queues are already gone).
            if let Err(e) = self.teardown(()) {
                tracing::debug!(error = %e, "teardown on drop");
            }
        }
    }
}

/// Watches the backend of one connected device.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    fn spawn(ctx: &DeviceCtx, link: Arc<Link>, config: Arc<Mutex<DeviceConfig>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = ctx.clone();
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("xv-monitor-{}", ctx.devid))
            .spawn(move || monitor_loop(&ctx, &link, &config, &stop2))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the backend monitor thread"))
            .ok();
        Self { stop, thread }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::debug!("the backend monitor thread panicked");
            }
        }
    }
}

fn monitor_loop(ctx: &DeviceCtx, link: &Link, config: &Mutex<DeviceConfig>, stop: &AtomicBool) {
    let span = tracing::debug_span!("monitor", domid = ctx.domid, devid = ctx.devid);
    let _enter = span.enter();
    let token = format!("xenvirtio-frontend/{}/{}/{:p}", ctx.domid, ctx.devid, link);
    let store = &*ctx.store;
    let events = match store.watch_events_for(&token) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the backend");
            return;
        }
    };
    let state_path = xenbus::state_path(&ctx.bdir);
    let gen_path = format!("{}/{}", ctx.bdir, bk::CONFIG_GENERATION);
    for p in [&state_path, &gen_path] {
        if let Err(e) = store.watch(p, &token) {
            tracing::warn!(path = %p, error = %e, "cannot watch the backend");
        }
    }
    let mut quiet_ticks = 0u32;
    while !stop.load(Ordering::Relaxed) {
        match events.next_timeout(MONITOR_TICK) {
            // Level-triggered as well: the backend's state is re-read every
            // MONITOR_RECHECK_TICKS quiet ticks, so a watch event that never came (a
            // xenstored restart, a dropped connection) cannot leave I/O waiting forever.
            Ok(None) => {
                quiet_ticks += 1;
                if quiet_ticks < MONITOR_RECHECK_TICKS {
                    continue;
                }
            }
            Ok(Some(_)) => while let Ok(Some(_)) = events.try_next() {},
            Err(e) => {
                link.mark_lost(format!("the xenstore connection was lost: {e}"));
                break;
            }
        }
        quiet_ticks = 0;
        if link.lost().is_none() {
            match xenbus::read_state(store, TxId::NONE, &state_path) {
                Ok(XenbusState::Connected) => {}
                Ok(s) => {
                    let why = match ctx.backend_error() {
                        Some(e) => format!("the backend went to {s}: {e}"),
                        None => format!("the backend went to {s}"),
                    };
                    tracing::warn!(domid = ctx.domid, devid = ctx.devid, reason = %why, "device stopped");
                    link.mark_lost(why);
                    // 8.3: stop submitting, fail outstanding requests, write Closing.
                    if let Err(e) = xenbus::switch_state(store, &ctx.fdir, XenbusState::Closing) {
                        tracing::debug!(error = %e, "switching to Closing failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(domid = ctx.domid, devid = ctx.devid, error = %e, "the backend's state is unreadable; stopping the device");
                    link.mark_lost(format!("the backend's state is unreadable: {e}"));
                }
            }
        }
        refresh_config(ctx, config);
    }
    for p in [&state_path, &gen_path] {
        if let Err(e) = store.unwatch(p, &token) {
            tracing::debug!(error = %e, "unwatch failed");
        }
    }
}

/// Re-reads `config` when `config-generation` moved (both in one transaction).
fn refresh_config(ctx: &DeviceCtx, config: &Mutex<DeviceConfig>) {
    let store = &*ctx.store;
    let gen_path = format!("{}/{}", ctx.bdir, bk::CONFIG_GENERATION);
    let cfg_path = format!("{}/{}", ctx.bdir, bk::CONFIG);
    let current = config
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .generation;
    let read = transaction(store, TRANSACTION_ATTEMPTS, |tx| {
        let generation = xenbus::optional(xenbus::read_u32(store, tx, &gen_path))?.unwrap_or(0);
        if generation == current {
            return Ok(None);
        }
        let bytes = store.read_optional(tx, &cfg_path)?.unwrap_or_default();
        Ok(Some((generation, bytes)))
    });
    match read {
        Ok(Some((generation, bytes))) => match decode_hex(&String::from_utf8_lossy(&bytes)) {
            Ok(bytes) => {
                tracing::info!(
                    domid = ctx.domid,
                    devid = ctx.devid,
                    generation,
                    "device config changed"
                );
                *config.lock().unwrap_or_else(PoisonError::into_inner) =
                    DeviceConfig { generation, bytes };
            }
            Err(e) => tracing::debug!(error = %e, "the backend's new config is not hex; ignored"),
        },
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "re-reading the config failed"),
    }
}
