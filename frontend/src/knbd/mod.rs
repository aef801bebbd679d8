//! The guest kernel's own block device: `/dev/nbdN` connected to an NBD export through the
//! kernel's NBD netlink family, as `nbd-client` does, with no extra tool.
//!
//! [`KernelNbd::connect`] opens connections to the export (one per kernel queue where the export
//! allows several, otherwise one), normally this frontend's own on its unix socket, negotiates
//! each with [`NbdClient`] (`NBD_OPT_GO`), and
//! hands the sockets, in the transmission phase, to the kernel with `NBD_CMD_CONNECT`: size and
//! block size from the export, the transmission flags as the server sent them (flush, FUA,
//! trim, read-only, multi-connection). From then on the kernel's NBD driver speaks to the export
//! directly and this process only serves it. If the chosen device is already connected (a
//! restarted frontend), the new sockets replace the dead ones with `NBD_CMD_RECONFIGURE`, so a
//! mounted filesystem sees a pause, not an error. [`KernelNbd::disconnect`] ends it with
//! `NBD_CMD_DISCONNECT`.
//!
//! What it must never do: leave a device connected to sockets nobody serves without saying so
//! (the dead-connection timeout bounds how long the kernel waits for a reconfiguration), or
//! take a device that another export holds (the backend identifier, checked by the kernel on
//! reconfiguration).
//!
//! The old ioctl interface (`NBD_SET_SOCK`, `NBD_DO_IT`: module `ioctl`) is the fallback where
//! the kernel has NBD devices but no netlink family (before 4.12), or when
//! [`KernelNbdConfig::interface`] asks for it; [`KernelNbd::interface`] says which was used.
//! It cannot reconfigure a connected device nor hold requests while no connection is left.
//! Without either, [`KernelNbdError::NoDriver`] says what to load.

mod ioctl;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::nbd::{NbdAddress, NbdClient, NbdClientError};
use crate::netlink::{self, Attrs, GenlSocket};

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;
const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_CLIENT_FLAGS: u16 = 6;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`: a device the kernel created for us goes away with us.
const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;

/// Which of the kernel's two NBD interfaces connects the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdInterface {
    /// Netlink where the kernel has it, else ioctls.
    Auto,
    /// The netlink family `nbd` (Linux 4.12 and later): reconfiguration, dead-connection timeout.
    Netlink,
    /// The ioctls on `/dev/nbdN`, as nbd-client used before netlink.
    Ioctl,
}

impl NbdInterface {
    const ALL: [NbdInterface; 3] = [
        NbdInterface::Auto,
        NbdInterface::Netlink,
        NbdInterface::Ioctl,
    ];

    fn name(self) -> &'static str {
        match self {
            NbdInterface::Auto => "auto",
            NbdInterface::Netlink => "netlink",
            NbdInterface::Ioctl => "ioctl",
        }
    }
}

impl std::fmt::Display for NbdInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for NbdInterface {
    type Err = String;

    /// The names [`Display`](std::fmt::Display) prints.
    fn from_str(s: &str) -> Result<NbdInterface, String> {
        NbdInterface::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| format!("{s:?} is not one of auto, netlink, ioctl"))
    }
}

/// How to connect a kernel NBD device.
#[derive(Debug, Clone)]
pub struct KernelNbdConfig {
    /// The device index (`/dev/nbdN`), or `None` for the first free one.
    pub index: Option<u32>,
    /// Connections (kernel hardware queues); more than one only if the export allows several
    /// connections (`NBD_FLAG_CAN_MULTI_CONN`), otherwise one is used.
    pub connections: usize,
    /// Per-request timeout; `None` waits forever (the kernel logs a stuck request every 30 s),
    /// which is what turns a backend restart into a pause.
    pub io_timeout: Option<Duration>,
    /// How long the kernel holds requests after every connection died, waiting for a new
    /// frontend to reconfigure the device, before it fails them.
    pub dead_conn_timeout: Duration,
    /// Names the export; the kernel refuses a reconfiguration from another one.
    pub identifier: String,
    /// Which kernel interface to use.
    pub interface: NbdInterface,
}

impl KernelNbdConfig {
    /// One connection to any free device, no I/O timeout, 60 s for a frontend to come back.
    pub fn new(identifier: impl Into<String>) -> KernelNbdConfig {
        KernelNbdConfig {
            index: None,
            connections: 1,
            io_timeout: None,
            dead_conn_timeout: Duration::from_secs(60),
            identifier: identifier.into(),
            interface: NbdInterface::Auto,
        }
    }
}

/// Errors of connecting or disconnecting a kernel NBD device.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    /// The kernel has no NBD driver loaded: neither the netlink family nor `/dev/nbd0`.
    #[error("the kernel has no NBD driver: load it with `modprobe nbd` (module nbd.ko)")]
    NoDriver,
    /// The kernel has NBD devices but not the netlink family that was asked for.
    #[error(
        "the kernel has NBD devices but no NBD netlink family (Linux 4.12 and later have it): \
         the ioctl interface drives them (serve --nbd-interface ioctl, or auto)"
    )]
    NoNetlink,
    /// Talking to the export failed.
    #[error("cannot open a connection to the NBD export")]
    Export(#[source] NbdClientError),
    /// The kernel refused the request.
    #[error("the kernel refused {what}")]
    Kernel {
        /// The request.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// The export's geometry cannot be given to the kernel.
    #[error("the export cannot be a kernel block device: {0}")]
    Geometry(String),
}

/// A kernel NBD device connected to an export.
#[derive(Debug)]
pub struct KernelNbd {
    index: u32,
    size: u64,
    link: Link,
    reconfigured: bool,
    connected: bool,
}

/// How the device is held: by netlink requests, or by the thread in `NBD_DO_IT`.
#[derive(Debug)]
enum Link {
    Netlink { socket: GenlSocket, family: u16 },
    Ioctl(ioctl::Device),
}

impl KernelNbd {
    /// Connects a kernel device to the export `name` at `address` (see the module
    /// documentation).
    pub fn connect(
        address: &NbdAddress,
        name: &str,
        config: &KernelNbdConfig,
    ) -> Result<KernelNbd, KernelNbdError> {
        let kernel = |what: &str| {
            let what = what.to_owned();
            move |source| KernelNbdError::Kernel { what, source }
        };
        let netlink = if config.interface == NbdInterface::Ioctl {
            None
        } else {
            let mut socket = GenlSocket::open().map_err(kernel("a netlink socket"))?;
            socket
                .family(FAMILY)
                .map_err(kernel("the lookup of the nbd netlink family"))?
                .map(|family| (socket, family))
        };
        if netlink.is_none() {
            match (config.interface, ioctl::available()) {
                (_, false) => return Err(KernelNbdError::NoDriver),
                (NbdInterface::Netlink, true) => return Err(KernelNbdError::NoNetlink),
                _ => {}
            }
        }

        let first = NbdClient::connect(address, name).map_err(KernelNbdError::Export)?;
        let size = first.size();
        let flags = first.transmission_flags();
        let block = first.block_sizes().minimum.max(512);
        if !block.is_power_of_two() || block > 4096 {
            return Err(KernelNbdError::Geometry(format!(
                "a {block}-byte block size (the kernel takes 512 to 4096)"
            )));
        }
        if size == 0 || size % u64::from(block) != 0 {
            return Err(KernelNbdError::Geometry(format!(
                "{size} bytes is not a whole number of {block}-byte blocks"
            )));
        }
        let wanted = if first.can_multi_conn() {
            config.connections.clamp(1, 16)
        } else {
            1
        };
        let mut sockets: Vec<OwnedFd> = vec![first.into_socket().map_err(KernelNbdError::Export)?];
        while sockets.len() < wanted {
            let c = NbdClient::connect(address, name).map_err(KernelNbdError::Export)?;
            if c.size() != size || c.transmission_flags() != flags {
                return Err(KernelNbdError::Geometry(
                    "the export changed between two connections".to_owned(),
                ));
            }
            sockets.push(c.into_socket().map_err(KernelNbdError::Export)?);
        }

        let Some((mut socket, family)) = netlink else {
            let geometry = ioctl::Geometry {
                size,
                block,
                flags,
                io_timeout: config.io_timeout,
            };
            let device = ioctl::Device::connect(config.index, sockets, &geometry)?;
            return Ok(KernelNbd {
                index: device.index(),
                size,
                link: Link::Ioctl(device),
                reconfigured: false,
                connected: true,
            });
        };
        let mut items = Attrs::new();
        for s in &sockets {
            let mut item = Attrs::new();
            let fd = u32::try_from(s.as_raw_fd()).expect("descriptors are non-negative");
            item.u32(SOCK_FD, fd);
            items.nested(SOCK_ITEM, &item);
        }
        let mut attrs = Attrs::new();
        if let Some(index) = config.index {
            attrs.u32(ATTR_INDEX, index);
        }
        attrs
            .u64(ATTR_SIZE_BYTES, size)
            .u64(ATTR_BLOCK_SIZE_BYTES, u64::from(block))
            .u64(ATTR_SERVER_FLAGS, u64::from(flags))
            .u64(
                ATTR_DEAD_CONN_TIMEOUT,
                config.dead_conn_timeout.as_secs().max(1),
            )
            .string(ATTR_BACKEND_IDENTIFIER, &config.identifier);
        if let Some(t) = config.io_timeout {
            attrs.u64(ATTR_TIMEOUT, t.as_secs().max(1));
        }
        if config.index.is_none() {
            attrs.u64(ATTR_CLIENT_FLAGS, CFLAG_DESTROY_ON_DISCONNECT);
        }
        attrs.nested(ATTR_SOCKETS, &items);

        let (replies, reconfigured) = match socket.request(family, CMD_CONNECT, VERSION, &attrs) {
            Ok(replies) => (replies, false),
            // The device is connected already: a frontend that restarted hands it new
            // sockets. The kernel checks the identifier, so another export's device is refused.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && config.index.is_some() => {
                let replies = socket
                    .request(family, CMD_RECONFIGURE, VERSION, &attrs)
                    .map_err(kernel("NBD_CMD_RECONFIGURE of a device in use"))?;
                (replies, true)
            }
            Err(e) => return Err(kernel("NBD_CMD_CONNECT")(e)),
        };
        // The kernel holds its own references to the sockets now; ours close here.
        drop(sockets);
        let index = match config.index {
            Some(index) => index,
            None => replies
                .iter()
                .flatten()
                .find(|a| a.kind == ATTR_INDEX)
                .and_then(netlink::Attr::as_u32)
                .ok_or_else(|| {
                    kernel("NBD_CMD_CONNECT")(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the reply names no device",
                    ))
                })?,
        };
        Ok(KernelNbd {
            index,
            size,
            link: Link::Netlink { socket, family },
            reconfigured,
            connected: true,
        })
    }

    /// The device index N of `/dev/nbdN`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device node.
    pub fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// The kernel interface that connected the device (never [`NbdInterface::Auto`]).
    pub fn interface(&self) -> NbdInterface {
        match self.link {
            Link::Netlink { .. } => NbdInterface::Netlink,
            Link::Ioctl(_) => NbdInterface::Ioctl,
        }
    }

    /// Whether the device was connected before and got new sockets (`NBD_CMD_RECONFIGURE`).
    pub fn reconfigured(&self) -> bool {
        self.reconfigured
    }

    /// Waits until the kernel shows the device with its size in sysfs.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let path = format!("/sys/block/nbd{}/size", self.index);
        let deadline = Instant::now() + timeout;
        loop {
            let sectors = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            if sectors == Some(self.size / 512) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Disconnects the device (`NBD_CMD_DISCONNECT`): the kernel finishes or fails what is in
    /// flight, then closes its sockets.
    pub fn disconnect(mut self) -> Result<(), KernelNbdError> {
        self.send_disconnect()
    }

    fn send_disconnect(&mut self) -> Result<(), KernelNbdError> {
        if !self.connected {
            return Ok(());
        }
        self.connected = false;
        let (socket, family) = match &mut self.link {
            Link::Netlink { socket, family } => (socket, *family),
            Link::Ioctl(device) => return device.disconnect(),
        };
        let mut attrs = Attrs::new();
        attrs.u32(ATTR_INDEX, self.index);
        socket
            .request(family, CMD_DISCONNECT, VERSION, &attrs)
            .map_err(|source| KernelNbdError::Kernel {
                what: format!("NBD_CMD_DISCONNECT of /dev/nbd{}", self.index),
                source,
            })?;
        Ok(())
    }
}

impl Drop for KernelNbd {
    fn drop(&mut self) {
        if let Err(e) = self.send_disconnect() {
            tracing::warn!(device = self.index, error = %e, "disconnecting the kernel NBD device failed");
        }
    }
}

/// Whether the kernel has the NBD netlink family, that is whether `nbd.ko` is loaded.
pub fn available() -> std::io::Result<bool> {
    let mut socket = GenlSocket::open()?;
    Ok(socket.family(FAMILY)?.is_some())
}

/// Whether the kernel has NBD devices (`/dev/nbd0`), whichever interface drives them.
pub fn devices_available() -> bool {
    ioctl::available()
}

/// Marks the calling thread, and the threads it starts afterwards, as part of the block I/O
/// path (`PR_SET_IO_FLUSHER`): their memory allocations then never wait for writeback to the
/// very devices they serve, the classic deadlock of a user-space NBD server under memory
/// pressure. Needs `CAP_SYS_RESOURCE` and Linux 5.6.
pub fn mark_io_flusher() -> std::io::Result<()> {
    /// `PR_SET_IO_FLUSHER` from `linux/prctl.h` (not in the libc crate).
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with PR_SET_IO_FLUSHER reads only its scalar arguments.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
