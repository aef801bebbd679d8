//! The backend's half of the xenbus handshake (`docs/PROTOCOL.md` sections 2, 8 and 11): what it
//! reads from the toolstack, what it publishes before InitWait, and the validation of everything
//! the frontend publishes at Initialised.
//!
//! This module owns the meaning of the keys. It reads and writes xenstore but holds no state
//! and maps nothing: [`read_frontend_setup`] turns the frontend directory into a validated
//! [`FrontendSetup`] (or a [`ConnectError`] that names the offending key), and the device thread
//! acts on it. It must never accept a value it has not checked against section 11: every
//! count, size and reference list is bounded here, before anything is allocated for it.

use std::path::PathBuf;

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::features::{self, transport};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::net::{self, MacAddr};
use xenvirtio_virtio::protocol::{
    self, MAX_BOUNCE_PAGES, MAX_QUEUE_SIZE, MAX_QUEUES, backend_keys as bk, directory_pages,
    frontend_keys as fk,
};
use xenvirtio_virtio::split::{QueueSizeError, RingLayout};
use xenvirtio_xen::{DomId, Gfn, GrantRef, Port};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, XenStore, XsError, transaction};

use crate::net::{NetLink, NetTarget};

/// How many times a handshake transaction is retried on EAGAIN.
pub const TRANSACTION_ATTEMPTS: u32 = 16;

/// The transport features every device offers (section 10.1), without `ACCESS_PLATFORM`.
pub const TRANSPORT_FEATURES: u64 = features::bit(transport::VERSION_1)
    | features::bit(transport::RING_INDIRECT_DESC)
    | features::bit(transport::RING_EVENT_IDX);

/// Why the toolstack's keys cannot describe a device.
#[derive(Debug, thiserror::Error)]
pub enum ToolstackError {
    /// Reading a key failed (or a required key is missing).
    #[error("cannot read the toolstack's keys")]
    Xenstore(#[from] XsError),
    /// `type` names a device xenvirtio does not serve.
    #[error("type {0:?} is not a virtio device this backend serves (blk, console, rng, net)")]
    UnknownType(String),
    /// `transport` is not `xenbus`.
    #[error("transport {0:?} is not xenbus")]
    WrongTransport(String),
    /// `dma` is not `auto`, `grant`, `bounce` or `direct`.
    #[error("dma {0:?} is not auto, grant, bounce or direct")]
    BadDma(String),
    /// `mode` is not `r` or `w`.
    #[error("mode {0:?} is not r or w")]
    BadMode(String),
    /// `console` is not `pty` or `socket:<path>`.
    #[error("console {0:?} is not pty or socket:<path>")]
    BadConsole(String),
    /// net: `mac` is missing or not a unicast MAC address.
    #[error("mac {0:?} is not a unicast MAC address such as 00:16:3e:12:34:56")]
    BadMac(String),
    /// net: `mtu` is not a number from 68 to 9000.
    #[error("mtu {0:?} is not a number from 68 to 9000")]
    BadMtu(String),
    /// net: `link` is not `tap` or `socket:<path>`.
    #[error("link {0:?} is not tap or socket:<path>")]
    BadLink(String),
    /// blk without `params`.
    #[error("a blk device needs params (the image path)")]
    NoImage,
    /// `frontend` or `frontend-id` do not name the frontend this directory is for.
    #[error("frontend {found:?} does not match the expected {expected:?}")]
    WrongFrontend {
        /// What the key holds.
        found: String,
        /// What the backend path implies.
        expected: String,
    },
}

/// Where a console's port 0 goes (`console` key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// A new pty, whose slave path is published in `tty`.
    Pty,
    /// A unix socket the backend listens on (section 10.3).
    Socket(PathBuf),
}

/// The strategy the operator pinned for a device (`dma` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaPin {
    /// The frontend's policy chooses.
    Auto,
    /// Only this strategy is accepted.
    Only(DmaStrategy),
}

impl DmaPin {
    /// Whether the pin allows `s`.
    pub fn allows(self, s: DmaStrategy) -> bool {
        match self {
            DmaPin::Auto => true,
            DmaPin::Only(p) => p == s,
        }
    }
}

/// What the toolstack wrote in the backend directory (section 2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolstackConfig {
    /// The device.
    pub kind: DeviceKind,
    /// The toolstack's `grant_usage` (`toolstack-grant-usage` once the backend has rewritten
    /// `grant_usage`; absent counts as true): `false` lets a trusted frontend use `direct`.
    pub grant_usage: bool,
    /// `dma`.
    pub dma: DmaPin,
    /// blk: the image.
    pub image: Option<PathBuf>,
    /// blk: `mode = r`.
    pub read_only: bool,
    /// blk: `force-share = 1`: no image lock.
    pub force_share: bool,
    /// console: where port 0 goes.
    pub console: ConsoleTarget,
    /// net: the address, MTU and host side (`None` for other devices).
    pub net: Option<NetTarget>,
    /// blk: `requested-queues`, clamped to 1..=16.
    pub queues: u32,
}

fn read_opt_string(store: &dyn XenStore, path: &str) -> Result<Option<String>, XsError> {
    xenbus::optional(store.read_string(TxId::NONE, path)).map(|v| v.map(|s| s.trim().to_owned()))
}

/// Reads the toolstack's keys of the device at `bdir`, served to frontend `frontend`.
pub fn read_toolstack_config(
    store: &dyn XenStore,
    bdir: &str,
    frontend: DomId,
    devid: u32,
) -> Result<ToolstackConfig, ToolstackError> {
    let key = |k: &str| format!("{bdir}/{k}");
    let expected = xenbus::frontend_dir(frontend, devid);
    if let Some(found) = read_opt_string(store, &key(bk::FRONTEND))? {
        if found != expected {
            return Err(ToolstackError::WrongFrontend { found, expected });
        }
    }
    if let Some(found) = read_opt_string(store, &key(bk::FRONTEND_ID))? {
        if found != frontend.to_string() {
            return Err(ToolstackError::WrongFrontend {
                found,
                expected: frontend.to_string(),
            });
        }
    }
    let ty = store.read_string(TxId::NONE, &key(bk::TYPE))?;
    let kind = DeviceKind::parse_type_string(ty.trim())
        .and_then(DeviceKind::from_device_id)
        .ok_or_else(|| ToolstackError::UnknownType(ty.clone()))?;
    if let Some(t) = read_opt_string(store, &key(bk::TRANSPORT))? {
        if t != protocol::TRANSPORT {
            return Err(ToolstackError::WrongTransport(t));
        }
    }
    // The toolstack's value: the backend keeps it aside before it publishes the effective one
    // in `grant_usage` (section 2.2), so that a restarted backend starts from it again.
    let grant_usage = match xenbus::optional(xenbus::read_bool(
        store,
        TxId::NONE,
        &key(bk::TOOLSTACK_GRANT_USAGE),
    ))? {
        Some(v) => v,
        None => xenbus::optional(xenbus::read_bool(store, TxId::NONE, &key(bk::GRANT_USAGE)))?
            .unwrap_or(true),
    };
    let dma = match read_opt_string(store, &key(bk::DMA))?.as_deref() {
        None | Some("auto") | Some("") => DmaPin::Auto,
        Some(s) => DmaPin::Only(
            s.parse()
                .map_err(|_| ToolstackError::BadDma(s.to_owned()))?,
        ),
    };
    let read_only = match read_opt_string(store, &key(bk::MODE))?.as_deref() {
        None | Some("w") => false,
        Some("r") => true,
        Some(s) => return Err(ToolstackError::BadMode(s.to_owned())),
    };
    let force_share =
        xenbus::optional(xenbus::read_bool(store, TxId::NONE, &key(bk::FORCE_SHARE)))?
            .unwrap_or(false);
    let image = read_opt_string(store, &key(bk::PARAMS))?
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    if kind == DeviceKind::Block && image.is_none() {
        return Err(ToolstackError::NoImage);
    }
    let console = match read_opt_string(store, &key(bk::CONSOLE))?.as_deref() {
        None | Some("pty") | Some("") => ConsoleTarget::Pty,
        Some(s) => match s.strip_prefix("socket:") {
            Some(p) if !p.is_empty() => ConsoleTarget::Socket(PathBuf::from(p)),
            _ => return Err(ToolstackError::BadConsole(s.to_owned())),
        },
    };
    let net = if kind == DeviceKind::Net {
        Some(read_net_target(store, &key, frontend, devid)?)
    } else {
        None
    };
    let requested = xenbus::optional(xenbus::read_u32(
        store,
        TxId::NONE,
        &key(bk::REQUESTED_QUEUES),
    ))?;
    let queues = match kind {
        DeviceKind::Block => requested.unwrap_or(1).clamp(1, MAX_QUEUES),
        DeviceKind::Console => 2,
        DeviceKind::Rng => 1,
        DeviceKind::Net => 2,
    };
    Ok(ToolstackConfig {
        kind,
        grant_usage,
        dma,
        image,
        read_only,
        force_share,
        console,
        net,
        queues,
    })
}

/// The net keys: `mac` (required), `mtu`, `link`, `bridge`, `vifname`.
fn read_net_target(
    store: &dyn XenStore,
    key: &dyn Fn(&str) -> String,
    frontend: DomId,
    devid: u32,
) -> Result<NetTarget, ToolstackError> {
    let mac_s = read_opt_string(store, &key(bk::MAC))?.unwrap_or_default();
    let mac = match mac_s.parse::<MacAddr>() {
        Ok(m) if !m.is_multicast() && !m.is_zero() => m,
        _ => return Err(ToolstackError::BadMac(mac_s)),
    };
    let mtu = match read_opt_string(store, &key(bk::MTU))? {
        None => net::DEFAULT_MTU,
        Some(s) => match s.parse::<u16>() {
            Ok(m) if (net::MIN_MTU..=net::MAX_MTU).contains(&m) => m,
            _ => return Err(ToolstackError::BadMtu(s)),
        },
    };
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let link = match read_opt_string(store, &key(bk::LINK))?.as_deref() {
        None | Some("") | Some("tap") => NetLink::Tap {
            name: nonempty(read_opt_string(store, &key(bk::VIFNAME))?)
                .unwrap_or_else(|| format!("xvn{frontend}.{devid}")),
            bridge: nonempty(read_opt_string(store, &key(bk::BRIDGE))?),
        },
        Some(s) => match s.strip_prefix("socket:") {
            Some(p) if !p.is_empty() => NetLink::Socket(PathBuf::from(p)),
            _ => return Err(ToolstackError::BadLink(s.to_owned())),
        },
    };
    Ok(NetTarget { mac, mtu, link })
}

/// What the backend publishes before InitWait (section 2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// `device-features`: transport and device bits (`ACCESS_PLATFORM` exactly when
    /// `grant_usage`).
    pub features: u64,
    /// The effective `grant_usage` (section 2.2): `false` only when the frontend may use
    /// `direct` ([`DirectTrust::allows_direct`]).
    pub grant_usage: bool,
    /// The toolstack's own `grant_usage`, kept in `toolstack-grant-usage`.
    pub toolstack_grant_usage: bool,
    /// `max-queues`.
    pub max_queues: u32,
    /// `max-queue-size`.
    pub max_queue_size: u32,
    /// `max-persistent-grants` (`feature-persistent = 1` when non-zero).
    pub max_persistent_grants: u32,
    /// `max-pages-per-domain`: the domain's page budget (`max-bounce-pages` follows from it).
    pub max_pages_per_domain: u64,
    /// `config`: the device config struct.
    pub config: Vec<u8>,
    /// console: `tty`.
    pub tty: Option<String>,
    /// net: `tap`, the TAP made for the device.
    pub tap: Option<String>,
}

impl Offer {
    /// The offer of a device whose model offers `device_features` and `config`, to a frontend
    /// trusted as `trust` says.
    pub fn new(
        toolstack: &ToolstackConfig,
        trust: DirectTrust,
        device_features: u64,
        config: Vec<u8>,
        max_queue_size: u32,
        max_persistent_grants: u32,
    ) -> Self {
        let grant_usage = !trust.allows_direct(toolstack);
        let mut features = TRANSPORT_FEATURES | device_features;
        if grant_usage {
            features |= features::bit(transport::ACCESS_PLATFORM);
        }
        Offer {
            features,
            grant_usage,
            toolstack_grant_usage: toolstack.grant_usage,
            max_queues: toolstack.queues,
            max_queue_size: max_queue_size.clamp(1, MAX_QUEUE_SIZE),
            max_persistent_grants,
            max_pages_per_domain: crate::budget::DEFAULT_MAX_PAGES_PER_DOMAIN,
            config,
            tty: None,
            tap: None,
        }
    }
}

/// Publishes `offer` and switches to InitWait in one transaction (section 2.2): the effective
/// `grant_usage` (the toolstack's value kept in `toolstack-grant-usage`), the features,
/// limits and config, clearing an `error` node of an earlier connection and incrementing
/// `config-generation`. Fails with
/// [`XsError::NodeVanished`] if the directory was removed meanwhile (nothing is recreated).
pub fn publish(store: &dyn XenStore, bdir: &str, offer: &Offer) -> Result<u32, XsError> {
    let key = |k: &str| format!("{bdir}/{k}");
    let state = xenbus::state_path(bdir);
    transaction(store, TRANSACTION_ATTEMPTS, |tx| {
        if store.read_optional(tx, &state)?.is_none() {
            return Err(XsError::NodeVanished {
                path: state.clone(),
            });
        }
        let generation = xenbus::optional(xenbus::read_u32(store, tx, &key(bk::CONFIG_GENERATION)))
            .ok()
            .flatten()
            .unwrap_or(0)
            .wrapping_add(1);
        let flag = |b: bool| if b { "1" } else { "0" };
        store.write_str(
            tx,
            &key(bk::TOOLSTACK_GRANT_USAGE),
            flag(offer.toolstack_grant_usage),
        )?;
        store.write_str(tx, &key(bk::GRANT_USAGE), flag(offer.grant_usage))?;
        store.write_str(
            tx,
            &key(bk::DEVICE_FEATURES),
            &protocol::format_features(offer.features),
        )?;
        store.write_str(tx, &key(bk::MAX_QUEUES), &offer.max_queues.to_string())?;
        store.write_str(
            tx,
            &key(bk::MAX_QUEUE_SIZE),
            &offer.max_queue_size.to_string(),
        )?;
        let persistent = if offer.max_persistent_grants > 0 {
            "1"
        } else {
            "0"
        };
        store.write_str(tx, &key(bk::FEATURE_PERSISTENT), persistent)?;
        store.write_str(
            tx,
            &key(bk::MAX_PERSISTENT_GRANTS),
            &offer.max_persistent_grants.to_string(),
        )?;
        store.write_str(
            tx,
            &key(bk::MAX_PAGES_PER_DOMAIN),
            &offer.max_pages_per_domain.to_string(),
        )?;
        store.write_str(
            tx,
            &key(bk::MAX_BOUNCE_PAGES),
            &crate::budget::max_bounce_pages(offer.max_pages_per_domain).to_string(),
        )?;
        store.write_str(tx, &key(bk::CONFIG), &protocol::encode_hex(&offer.config))?;
        store.write_str(tx, &key(bk::CONFIG_GENERATION), &generation.to_string())?;
        if let Some(tap) = &offer.tap {
            store.write_str(tx, &key(bk::TAP), tap)?;
        }
        if let Some(tty) = &offer.tty {
            store.write_str(tx, &key(bk::TTY), tty)?;
        }
        store.rm(tx, &key(bk::ERROR))?;
        store.write_str(tx, &state, &XenbusState::InitWait.value().to_string())?;
        Ok(generation)
    })
}

/// Writes `BDIR/error` and switches to Closing in one transaction (section 8.3). A directory
/// that vanished is left alone ([`XsError::NodeVanished`]).
pub fn publish_error(store: &dyn XenStore, bdir: &str, reason: &str) -> Result<(), XsError> {
    let state = xenbus::state_path(bdir);
    let error = format!("{bdir}/{}", bk::ERROR);
    transaction(store, TRANSACTION_ATTEMPTS, |tx| {
        if store.read_optional(tx, &state)?.is_none() {
            return Err(XsError::NodeVanished {
                path: state.clone(),
            });
        }
        store.write_str(tx, &error, reason)?;
        store.write_str(tx, &state, &XenbusState::Closing.value().to_string())
    })
}

/// Why `direct` is allowed or not for one device (section 10.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectTrust {
    /// The backend runs in Dom0.
    pub backend_is_dom0: bool,
    /// The operator named this frontend domain with `--allow-direct`.
    pub operator_allows: bool,
}

impl DirectTrust {
    /// Section 10.5: whether a frontend may use `direct` with this device: the backend is
    /// Dom0, the toolstack wrote `grant_usage = 0`, the operator allowed the domain, and the
    /// `dma` key is `auto` or `direct`. The effective `grant_usage` is the negation.
    pub fn allows_direct(self, toolstack: &ToolstackConfig) -> bool {
        self.backend_is_dom0
            && self.operator_allows
            && !toolstack.grant_usage
            && toolstack.dma.allows(DmaStrategy::Direct)
    }
}

/// Where a queue's ring area is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingLocation {
    /// Grant references (`grant`, `bounce`).
    Grants(Vec<GrantRef>),
    /// Frame numbers (`direct`).
    Frames(Vec<Gfn>),
}

/// One queue as the frontend set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSetup {
    /// The ring layout (its size validated).
    pub layout: RingLayout,
    /// The ring area's pages, exactly `layout.pages()` of them.
    pub ring: RingLocation,
    /// The frontend's unbound port.
    pub event_channel: Port,
}

/// The bounce pool as the frontend described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BouncePool {
    /// Pool pages, 1..=16384.
    pub pages: u32,
    /// Directory page references, exactly `ceil(pages / 1024)`.
    pub dir_refs: Vec<GrantRef>,
}

/// Everything the frontend published at Initialised, validated (section 11, "at connect").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSetup {
    /// Negotiated features (`driver-features`).
    pub features: u64,
    /// The DMA strategy.
    pub strategy: DmaStrategy,
    /// `feature-persistent = 1` under `grant`, and the backend offered it.
    pub persistent: bool,
    /// The queues, in order.
    pub queues: Vec<QueueSetup>,
    /// The pool, under `bounce`.
    pub bounce: Option<BouncePool>,
}

/// A frontend's Initialised keys break section 11: a protocol error for the device.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A key could not be read or parsed.
    #[error("cannot read the frontend's keys")]
    Xenstore(#[from] XsError),
    /// `driver-features` has bits the device did not offer.
    #[error("driver-features {driver:#x} has bits {extra:#x} the device did not offer")]
    FeaturesNotOffered {
        /// What the frontend wrote.
        driver: u64,
        /// The bits not offered.
        extra: u64,
    },
    /// `driver-features` lacks a bit the frontend must accept.
    #[error("driver-features {driver:#x} lacks {missing} (section 10.1)")]
    FeatureRequired {
        /// What the frontend wrote.
        driver: u64,
        /// The missing feature's name.
        missing: &'static str,
    },
    /// `num-queues` is out of range.
    #[error("num-queues {got} is not between 1 and {max}{extra}")]
    NumQueues {
        /// What the frontend wrote.
        got: u32,
        /// `max-queues`.
        max: u32,
        /// A device-specific rule, e.g. " (a console needs exactly 2)".
        extra: &'static str,
    },
    /// A queue size is bad.
    #[error("queue-{queue}/size is refused")]
    QueueSize {
        /// The queue.
        queue: u32,
        /// Why.
        #[source]
        source: QueueSizeError,
    },
    /// A ring reference list has the wrong length or bad entries.
    #[error("queue-{queue}/{key} lists {got} pages, a ring of size {size} needs {need}")]
    RingPages {
        /// The queue.
        queue: u32,
        /// `ring-ref` or `ring-gfn`.
        key: &'static str,
        /// Entries found.
        got: usize,
        /// Entries needed.
        need: usize,
        /// Queue size.
        size: u16,
    },
    /// A list entry is not a number.
    #[error("{path} holds {value:?}, which is not {expected}")]
    BadEntry {
        /// The key.
        path: String,
        /// The entry.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// `dma` is not a strategy.
    #[error("dma {0:?} is not grant, bounce or direct")]
    UnknownDma(String),
    /// `dma` names a strategy the device's `dma` key does not allow.
    #[error("dma {used} is not allowed for this device (the toolstack pinned {pinned})")]
    DmaNotAllowed {
        /// What the frontend uses.
        used: DmaStrategy,
        /// What the toolstack pinned.
        pinned: DmaStrategy,
    },
    /// `direct` without the trust of section 10.5.
    #[error("dma direct refused: {0}")]
    DirectUntrusted(&'static str),
    /// `bounce/pages` is 0 or too large.
    #[error("bounce/pages {0} is not between 1 and {MAX_BOUNCE_PAGES}")]
    BouncePages(u32),
    /// `bounce/dir-ref` does not match `bounce/pages`.
    #[error("bounce/dir-ref lists {got} pages, a pool of {pages} pages needs {need}")]
    BounceDirectory {
        /// Entries found.
        got: usize,
        /// Entries needed.
        need: usize,
        /// Pool pages.
        pages: u32,
    },
}

fn parse_list<T>(
    store: &dyn XenStore,
    tx: TxId,
    path: &str,
    max: usize,
    parse: impl Fn(&str) -> Option<T>,
    expected: &'static str,
) -> Result<Result<Vec<T>, ConnectError>, XsError> {
    let words = xenbus::read_list(store, tx, path)?;
    let mut out = Vec::with_capacity(words.len().min(max));
    for w in words.iter() {
        if out.len() > max {
            break;
        }
        match parse(w) {
            Some(v) => out.push(v),
            None => {
                return Ok(Err(ConnectError::BadEntry {
                    path: path.to_owned(),
                    value: w.chars().take(32).collect(),
                    expected,
                }));
            }
        }
    }
    // At most `max + 1` entries are kept: enough to report "too many", bounded whatever the
    // frontend wrote.
    Ok(Ok(out))
}

/// Reads and validates what the frontend at `fdir` published at Initialised, in one
/// transaction, against what this device offered.
pub fn read_frontend_setup(
    store: &dyn XenStore,
    fdir: &str,
    offer: &Offer,
    toolstack: &ToolstackConfig,
    trust: DirectTrust,
) -> Result<FrontendSetup, ConnectError> {
    transaction(store, TRANSACTION_ATTEMPTS, |tx| {
        read_setup_in(store, tx, fdir, offer, toolstack, trust)
    })?
}

fn read_setup_in(
    store: &dyn XenStore,
    tx: TxId,
    fdir: &str,
    offer: &Offer,
    toolstack: &ToolstackConfig,
    trust: DirectTrust,
) -> Result<Result<FrontendSetup, ConnectError>, XsError> {
    let key = |k: &str| format!("{fdir}/{k}");
    macro_rules! check {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            }
        };
    }

    // Features (section 11: subset, VERSION_1, ACCESS_PLATFORM when offered).
    let driver = xenbus::read_hex_u64(store, tx, &key(fk::DRIVER_FEATURES))?;
    let extra = driver & !offer.features;
    if extra != 0 {
        return Ok(Err(ConnectError::FeaturesNotOffered { driver, extra }));
    }
    if !features::has(driver, transport::VERSION_1) {
        return Ok(Err(ConnectError::FeatureRequired {
            driver,
            missing: "VERSION_1",
        }));
    }
    let access_platform = features::has(offer.features, transport::ACCESS_PLATFORM);
    if access_platform && !features::has(driver, transport::ACCESS_PLATFORM) {
        return Ok(Err(ConnectError::FeatureRequired {
            driver,
            missing: "ACCESS_PLATFORM",
        }));
    }

    // The strategy, the pin and the trust of section 10.5.
    let dma_text = store.read_string(tx, &key(fk::DMA))?;
    let strategy: DmaStrategy = check!(
        dma_text
            .trim()
            .parse()
            .map_err(|_| ConnectError::UnknownDma(dma_text.chars().take(32).collect()))
    );
    if let DmaPin::Only(pinned) = toolstack.dma {
        if pinned != strategy {
            return Ok(Err(ConnectError::DmaNotAllowed {
                used: strategy,
                pinned,
            }));
        }
    }
    if strategy == DmaStrategy::Direct {
        // The operator's trust is named first: without it the effective grant_usage is 1
        // too, and "not allowed" says what to change.
        let why = if !trust.backend_is_dom0 {
            Some("the backend is not Dom0")
        } else if !trust.operator_allows {
            Some("the backend's operator did not allow direct for this domain (--allow-direct)")
        } else if toolstack.grant_usage || access_platform {
            Some("grant_usage is 1 (the device needs translated addresses)")
        } else {
            None
        };
        if let Some(why) = why {
            return Ok(Err(ConnectError::DirectUntrusted(why)));
        }
    }

    // Queues.
    let num_queues = xenbus::read_u32(store, tx, &key(fk::NUM_QUEUES))?;
    // A console (receiveq, transmitq of port 0) and a net device (one queue pair) have two.
    let pair_rule = match toolstack.kind {
        DeviceKind::Console => Some(" (a console needs exactly 2)"),
        DeviceKind::Net => Some(" (a net device needs exactly 2)"),
        _ => None,
    };
    if num_queues == 0 || num_queues > offer.max_queues || (pair_rule.is_some() && num_queues != 2)
    {
        return Ok(Err(ConnectError::NumQueues {
            got: num_queues,
            max: offer.max_queues,
            extra: pair_rule.unwrap_or(""),
        }));
    }
    let mut queues = Vec::with_capacity(num_queues as usize);
    for q in 0..num_queues {
        let qkey = |leaf: &str| key(&fk::queue(q, leaf));
        let size = xenbus::read_u32(store, tx, &qkey(fk::QUEUE_SIZE))?;
        let layout = check!(
            RingLayout::new(size, offer.max_queue_size)
                .map_err(|source| ConnectError::QueueSize { queue: q, source })
        );
        let need = layout.pages();
        let (ring, got, leaf) = if strategy == DmaStrategy::Direct {
            let gfns = check!(parse_list(
                store,
                tx,
                &qkey(fk::QUEUE_RING_GFN),
                need,
                xenbus::parse_hex_u64,
                "a hexadecimal frame number",
            )?);
            let n = gfns.len();
            (RingLocation::Frames(gfns), n, fk::QUEUE_RING_GFN)
        } else {
            let refs = check!(parse_list(
                store,
                tx,
                &qkey(fk::QUEUE_RING_REF),
                need,
                xenbus::parse_decimal,
                "a decimal grant reference",
            )?);
            let n = refs.len();
            (RingLocation::Grants(refs), n, fk::QUEUE_RING_REF)
        };
        if got != need {
            return Ok(Err(ConnectError::RingPages {
                queue: q,
                key: leaf,
                got,
                need,
                size: layout.size(),
            }));
        }
        let event_channel = xenbus::read_u32(store, tx, &qkey(fk::QUEUE_EVENT_CHANNEL))?;
        queues.push(QueueSetup {
            layout,
            ring,
            event_channel,
        });
    }

    // Strategy-specific keys.
    let persistent = strategy == DmaStrategy::Grant
        && offer.max_persistent_grants > 0
        && xenbus::optional(xenbus::read_bool(store, tx, &key(fk::FEATURE_PERSISTENT)))?
            .unwrap_or(false);
    let bounce = if strategy == DmaStrategy::Bounce {
        let pages = xenbus::read_u32(store, tx, &key(fk::BOUNCE_PAGES))?;
        if pages == 0 || pages > MAX_BOUNCE_PAGES {
            return Ok(Err(ConnectError::BouncePages(pages)));
        }
        let need = directory_pages(pages as usize);
        let dir_refs = check!(parse_list(
            store,
            tx,
            &key(fk::BOUNCE_DIR_REF),
            need,
            xenbus::parse_decimal,
            "a decimal grant reference",
        )?);
        if dir_refs.len() != need {
            return Ok(Err(ConnectError::BounceDirectory {
                got: dir_refs.len(),
                need,
                pages,
            }));
        }
        Some(BouncePool { pages, dir_refs })
    } else {
        None
    };

    Ok(Ok(FrontendSetup {
        features: driver,
        strategy,
        persistent,
        queues,
        bounce,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use xenvirtio_xenstore::{MemStore, Perm};

    const F: DomId = 5;

    fn toolstack(kind: DeviceKind) -> ToolstackConfig {
        ToolstackConfig {
            kind,
            grant_usage: true,
            dma: DmaPin::Auto,
            image: None,
            read_only: false,
            force_share: false,
            console: ConsoleTarget::Pty,
            net: None,
            queues: if kind == DeviceKind::Console { 2 } else { 4 },
        }
    }

    fn offer(ts: &ToolstackConfig) -> Offer {
        let trust = DirectTrust {
            backend_is_dom0: true,
            operator_allows: true,
        };
        Offer::new(
            ts,
            trust,
            features::bit(features::blk::FLUSH),
            vec![1, 2],
            256,
            64,
        )
    }

    struct Env {
        store: Arc<dyn XenStore>,
        fdir: String,
    }

    fn env() -> Env {
        let daemon = MemStore::new();
        daemon.start_guest(F).unwrap();
        let dom0 = daemon.connect(0).unwrap();
        let fdir = xenbus::frontend_dir(F, 0);
        dom0.mkdir(TxId::NONE, &fdir).unwrap();
        dom0.set_perms(TxId::NONE, &fdir, &[Perm::owner(F), Perm::read(0)])
            .unwrap();
        Env {
            store: Arc::new(dom0),
            fdir,
        }
    }

    fn write(e: &Env, k: &str, v: &str) {
        e.store
            .write_str(TxId::NONE, &format!("{}/{k}", e.fdir), v)
            .unwrap();
    }

    fn grant_frontend(e: &Env, features: u64, queues: u32) {
        write(e, "driver-features", &format!("{features:#x}"));
        write(e, "dma", "grant");
        write(e, "num-queues", &queues.to_string());
        for q in 0..queues {
            write(e, &format!("queue-{q}/size"), "256");
            write(e, &format!("queue-{q}/ring-ref"), "8 9");
            write(
                e,
                &format!("queue-{q}/event-channel"),
                &(10 + q).to_string(),
            );
        }
    }

    const TRUSTED: DirectTrust = DirectTrust {
        backend_is_dom0: true,
        operator_allows: true,
    };

    #[test]
    fn a_good_grant_setup_is_accepted() {
        let e = env();
        let ts = toolstack(DeviceKind::Block);
        let o = offer(&ts);
        grant_frontend(&e, o.features, 2);
        write(&e, "feature-persistent", "1");
        let s = read_frontend_setup(&*e.store, &e.fdir, &o, &ts, TRUSTED).unwrap();
        assert_eq!(s.strategy, DmaStrategy::Grant);
        assert!(s.persistent);
        assert_eq!(s.queues.len(), 2);
        assert_eq!(s.queues[1].ring, RingLocation::Grants(vec![8, 9]));
        assert_eq!(s.queues[1].event_channel, 11);
    }

    #[test]
    fn every_section_11_refusal_at_connect() {
        let ts = toolstack(DeviceKind::Block);
        let o = offer(&ts);
        let check = |setup: &dyn Fn(&Env), ts: &ToolstackConfig, trust, want: &str| {
            let e = env();
            grant_frontend(&e, o.features, 1);
            setup(&e);
            let err = read_frontend_setup(&*e.store, &e.fdir, &offer(ts), ts, trust)
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        };
        check(
            &|e| {
                write(
                    e,
                    "driver-features",
                    &format!("{:#x}", o.features | 1 << 50),
                )
            },
            &ts,
            TRUSTED,
            "did not offer",
        );
        check(
            &|e| {
                write(
                    e,
                    "driver-features",
                    &format!("{:#x}", o.features & !(1 << 32)),
                )
            },
            &ts,
            TRUSTED,
            "VERSION_1",
        );
        check(
            &|e| {
                write(
                    e,
                    "driver-features",
                    &format!("{:#x}", o.features & !(1 << 33)),
                )
            },
            &ts,
            TRUSTED,
            "ACCESS_PLATFORM",
        );
        check(
            &|e| write(e, "num-queues", "5"),
            &ts,
            TRUSTED,
            "num-queues 5",
        );
        check(
            &|e| write(e, "num-queues", "0"),
            &ts,
            TRUSTED,
            "num-queues 0",
        );
        check(
            &|e| write(e, "queue-0/size", "100"),
            &ts,
            TRUSTED,
            "queue-0/size",
        );
        check(
            &|e| write(e, "queue-0/size", "512"),
            &ts,
            TRUSTED,
            "queue-0/size",
        );
        check(
            &|e| write(e, "queue-0/ring-ref", "8"),
            &ts,
            TRUSTED,
            "lists 1 pages",
        );
        check(
            &|e| write(e, "queue-0/ring-ref", "8 9 10 11 12 13 14 15 16"),
            &ts,
            TRUSTED,
            "ring-ref lists 3 pages",
        );
        check(
            &|e| write(e, "queue-0/ring-ref", "8 x"),
            &ts,
            TRUSTED,
            "not a decimal grant reference",
        );
        check(&|e| write(e, "dma", "mmio"), &ts, TRUSTED, "not grant");
        let pinned = ToolstackConfig {
            dma: DmaPin::Only(DmaStrategy::Bounce),
            ..ts.clone()
        };
        check(&|_| {}, &pinned, TRUSTED, "pinned bounce");
        // direct: refused under grant_usage, for a non-Dom0 backend, without the operator.
        let direct_ok = ToolstackConfig {
            grant_usage: false,
            ..ts.clone()
        };
        let to_direct = |e: &Env| {
            write(e, "driver-features", "0x100000000");
            write(e, "dma", "direct");
            write(e, "queue-0/ring-gfn", "40008 0x40009");
        };
        check(&to_direct, &ts, TRUSTED, "ACCESS_PLATFORM");
        check(
            &to_direct,
            &direct_ok,
            DirectTrust {
                backend_is_dom0: false,
                operator_allows: true,
            },
            "not Dom0",
        );
        check(
            &to_direct,
            &direct_ok,
            DirectTrust {
                backend_is_dom0: true,
                operator_allows: false,
            },
            "--allow-direct",
        );
        // ... and accepted with all three.
        let e = env();
        grant_frontend(&e, 0, 1);
        to_direct(&e);
        let s = read_frontend_setup(&*e.store, &e.fdir, &offer(&direct_ok), &direct_ok, TRUSTED)
            .unwrap();
        assert_eq!(
            s.queues[0].ring,
            RingLocation::Frames(vec![0x40008, 0x40009])
        );
        // bounce: pages and directory.
        let bounce = |pages: &'static str, dir: &'static str| {
            move |e: &Env| {
                write(e, "dma", "bounce");
                write(e, "bounce/pages", pages);
                write(e, "bounce/dir-ref", dir);
            }
        };
        check(&bounce("0", "1"), &ts, TRUSTED, "bounce/pages 0");
        check(&bounce("16385", "1"), &ts, TRUSTED, "bounce/pages 16385");
        check(&bounce("1025", "1"), &ts, TRUSTED, "needs 2");
        // A console needs exactly two queues.
        let console = toolstack(DeviceKind::Console);
        check(
            &|e| write(e, "num-queues", "1"),
            &console,
            TRUSTED,
            "exactly 2",
        );
    }

    #[test]
    fn publish_bumps_the_generation_and_clears_the_error() {
        let e = env();
        let bdir = xenbus::backend_dir(0, F, 0);
        e.store
            .write_str(TxId::NONE, &format!("{bdir}/state"), "1")
            .unwrap();
        e.store
            .write_str(TxId::NONE, &format!("{bdir}/error"), "old")
            .unwrap();
        let ts = toolstack(DeviceKind::Block);
        let o = offer(&ts);
        assert_eq!(publish(&*e.store, &bdir, &o).unwrap(), 1);
        assert_eq!(publish(&*e.store, &bdir, &o).unwrap(), 2);
        assert!(
            !e.store
                .exists(TxId::NONE, &format!("{bdir}/error"))
                .unwrap()
        );
        assert_eq!(
            e.store
                .read_string(TxId::NONE, &format!("{bdir}/config"))
                .unwrap(),
            "0102"
        );
        assert_eq!(
            xenbus::read_state(&*e.store, TxId::NONE, &xenbus::state_path(&bdir)).unwrap(),
            XenbusState::InitWait
        );
        publish_error(&*e.store, &bdir, "broken").unwrap();
        assert_eq!(
            e.store
                .read_string(TxId::NONE, &format!("{bdir}/error"))
                .unwrap(),
            "broken"
        );
        // A removed directory is not recreated.
        e.store.rm(TxId::NONE, &bdir).unwrap();
        assert!(matches!(
            publish(&*e.store, &bdir, &o),
            Err(XsError::NodeVanished { .. })
        ));
        assert!(!e.store.exists(TxId::NONE, &bdir).unwrap());
    }
}
