//! The types one device holds: its model (blk, console, rng, net) and what it offers, the
//! runtime of a connection (rings, ports, address space), the phases of the state machine,
//! and the errors that end a connection or its setup. No behaviour beyond building the offer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::XenError;
use xenvirtio_xen::platform::{BoundPort, EventChannels, MappedPages, Platform};

use crate::blk::{BlkChainError, BlkOpenError, BlockDevice, Sharing};
use crate::budget::Budgeted;
use crate::console::ConsoleDevice;
use crate::daemon::DaemonConfig;
use crate::dma::{AddressSpace, DmaMapError, MapCounters};
use crate::handshake::{ConnectError, DirectTrust, Offer, ToolstackConfig};
use crate::image_lock::{LockError, RELEASE_GRACE};
use crate::net::NetDevice;
use crate::rng::RngDevice;
use xenvirtio_virtio::device_queue::{Chain, DeviceQueue, QueueError};

/// A fatal error of a connected device: the device goes to its error state.
#[derive(Debug, thiserror::Error)]
pub(super) enum DeviceError {
    #[error("queue {queue}")]
    Queue {
        queue: usize,
        #[source]
        source: QueueError,
    },
    #[error("queue {queue}")]
    Dma {
        queue: usize,
        #[source]
        source: DmaMapError,
    },
    #[error("queue {queue}")]
    Blk {
        queue: usize,
        #[source]
        source: BlkChainError,
    },
    #[error("queue {queue}: {what}")]
    Io {
        queue: usize,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event channel")]
    Event(#[source] XenError),
    #[error("queue {queue}: more receive buffers outstanding than the queue size {size}")]
    TooManyHeld { queue: usize, size: u16 },
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub(super) enum SetupError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot map queue {queue}'s ring")]
    Ring {
        queue: usize,
        #[source]
        source: XenError,
    },
    #[error("cannot bind queue {queue}'s event channel {port}")]
    Port {
        queue: usize,
        port: u32,
        #[source]
        source: XenError,
    },
    #[error("cannot set up the bounce pool")]
    Bounce(#[source] DmaMapError),
    #[error("cannot open the Xen devices")]
    Platform(#[source] XenError),
    #[error("cannot register the event channel")]
    Poll(#[source] std::io::Error),
}

/// The full chain of an error's messages, for the `error` node and logs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The device model.
#[derive(Debug)]
pub(super) enum Model {
    Blk(BlockDevice),
    Console(Box<ConsoleDevice>),
    Rng(RngDevice),
    Net(Box<NetDevice>),
}

impl Model {
    /// Opens the model of the device `who` (`domain 5 device 0`) describes. A locked image is
    /// tried again for [`RELEASE_GRACE`]: its holder may be on its way out (a device of this
    /// daemon detached a moment ago, a daemon that is still exiting).
    pub(super) fn open(ts: &ToolstackConfig, who: &str) -> Result<Model, String> {
        match ts.kind {
            DeviceKind::Block => {
                let path = ts.image.as_deref().ok_or("a blk device needs params")?;
                let sharing = if ts.force_share {
                    Sharing::ForceShare
                } else {
                    Sharing::Lock {
                        who: who.to_owned(),
                    }
                };
                let deadline = Instant::now() + RELEASE_GRACE;
                loop {
                    match BlockDevice::open_shared(path, ts.read_only, &sharing) {
                        Err(BlkOpenError::Lock(LockError::Held { .. }))
                            if Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        r => return r.map(Model::Blk).map_err(|e| error_chain(&e)),
                    }
                }
            }
            DeviceKind::Console => ConsoleDevice::open(&ts.console)
                .map(|c| Model::Console(Box::new(c)))
                .map_err(|e| error_chain(&e)),
            DeviceKind::Rng => Ok(Model::Rng(RngDevice::new())),
            DeviceKind::Net => {
                let target = ts.net.as_ref().ok_or("a net device needs mac")?;
                NetDevice::open(target)
                    .map(|n| Model::Net(Box::new(n)))
                    .map_err(|e| error_chain(&e))
            }
        }
    }

    pub(super) fn offer(
        &self,
        ts: &ToolstackConfig,
        trust: DirectTrust,
        config: &DaemonConfig,
    ) -> Offer {
        let qsize = config.max_queue_size;
        let queues = u16::try_from(ts.queues).unwrap_or(1);
        let (features, cfg) = match self {
            Model::Blk(b) => (
                b.features(queues),
                b.config(queues, u16::try_from(qsize).unwrap_or(u16::MAX))
                    .to_bytes()
                    .to_vec(),
            ),
            Model::Console(c) => (c.features(), c.config()),
            Model::Rng(_) => (0, Vec::new()),
            Model::Net(n) => (n.features(), n.config()),
        };
        let mut offer = Offer::new(
            ts,
            trust,
            features,
            cfg,
            qsize,
            config.max_persistent_grants,
        );
        offer.max_pages_per_domain = config.max_pages_per_domain;
        if let Model::Console(c) = self {
            offer.tty = c.tty().map(|p| p.display().to_string());
        }
        if let Model::Net(n) = self {
            offer.tap = n.tap_name().map(str::to_owned);
        }
        offer
    }
}

/// One queue of a connected device.
pub(super) struct QueueRuntime<E: EventChannels> {
    pub(super) ring: Box<dyn MappedPages>,
    pub(super) queue: DeviceQueue,
    pub(super) port: BoundPort<E>,
    /// Chains are still waiting after the budget ran out.
    pub(super) busy: bool,
}

/// Everything mapped and bound for one connection. Dropping it unmaps and unbinds all of it.
pub(super) struct Connection<P: Platform> {
    /// The event-channel handle; every port holds it too, so it closes after the last port.
    pub(super) events: Arc<P::Events>,
    pub(super) queues: Vec<QueueRuntime<P::Events>>,
    pub(super) space: AddressSpace<Budgeted<P::GrantMap>, Budgeted<P::Foreign>>,
    pub(super) counters: MapCounters,
    /// Console and net receive chains waiting for input (validated, not mapped).
    pub(super) held_rx: VecDeque<Chain>,
    pub(super) strategy: DmaStrategy,
    /// The queue served first by the next serve call (round robin, so a flooded queue cannot
    /// take every budget).
    pub(super) next_first: usize,
}

impl<P: Platform> Connection<P> {
    pub(super) fn resident_pages(&self) -> u64 {
        let rings: usize = self.queues.iter().map(|q| q.ring.pages()).sum();
        (rings + self.space.resident_pages()) as u64
    }
}

/// Cumulative counters that outlive connections.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Totals {
    pub(super) map: MapCounters,
    pub(super) notifications_sent: u64,
    pub(super) notifications_received: u64,
    pub(super) requests: u64,
    pub(super) errors: u64,
    /// Requests over the per-request cap: blk ones answered IOERR, console ones truncated.
    pub(super) oversized: u64,
}

/// Where the device is in section 8 (backend side).
pub(super) enum Phase<P: Platform> {
    /// Nothing published yet (`Sb = 1`).
    Idle,
    /// Features published (`Sb = 2`), waiting for the frontend's Initialised.
    InitWait,
    /// Serving (`Sb = 4`).
    Connected(Box<Connection<P>>),
    /// `Sb = 5`: nothing held any more; waiting for the frontend to leave Connected.
    Closing {
        deadline: Option<Instant>,
        error: bool,
        /// The frontend was seen in a state other than Initialising since the close began.
        frontend_left_init: bool,
    },
    /// `Sb = 6`: waiting for the frontend to reconnect (or for `online = 0`).
    Closed {
        error: bool,
        frontend_left_init: bool,
    },
}

impl<P: Platform> Phase<P> {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "Initialising",
            Phase::InitWait => "InitWait",
            Phase::Connected(_) => "Connected",
            Phase::Closing { .. } => "Closing",
            Phase::Closed { .. } => "Closed",
        }
    }
}
