//! The toolstack side of xenvirtio: creating, removing and listing devices in xenstore, as
//! `xenvirtio-backend attach`, `detach` and `list` do.
//!
//! This module owns the keys `docs/PROTOCOL.md` section 2 marks *toolstack*, the permissions of
//! section 2.1, the choice of devids, and the toolstack's half of the teardown of section 8.3.
//! Everything here runs as a privileged xenstore client (Dom0's toolstack) and is written
//! against [`XenStore`](xenvirtio_xenstore::XenStore), so the binary, the loopback crate, the
//! end-to-end scripts and the unit tests (over [`MemStore`](xenvirtio_xenstore::MemStore)) share
//! it. It validates every argument before it writes anything, writes each directory pair in one
//! transaction, and never touches a device's shared memory or event channels: that is the
//! daemon's business.
//!
//! The frontend directory belongs to the guest, which may be hostile: what it wrote is only
//! ever displayed (escaped, see [`list`]) and never trusted to find the backend directory.

mod attach;
pub mod book;
mod detach;
mod domain;
mod list;

use std::path::PathBuf;
use std::time::Duration;

use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xenstore::{DomId, XsError};

pub use attach::{
    AttachOutcome, AttachRequest, ConsoleOutput, DEFAULT_BRIDGE, DmaSetting, NetOptions, attach,
    random_mac,
};
pub use book::{BookEntry, DeviceBook};
pub use detach::{DEFAULT_DETACH_TIMEOUT, DetachOutcome, DetachRequest, Removal, detach};
pub use domain::{DomainRef, domain_name, domid_of, own_domid, resolve_domain};
pub use list::{DeviceEntry, StateView, list, printable, render_table};

/// How many times a toolstack transaction is run again after EAGAIN (another writer got in
/// first) before giving up.
pub const TRANSACTION_ATTEMPTS: u32 = 32;

/// Why an admin command refused or failed. Every message is one line that names the thing at
/// fault (a domain, a devid, a path, an option).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A domain argument that is neither a domid nor a usable name.
    #[error("{text:?} is not a domain: {reason}")]
    BadDomainRef {
        /// What was given.
        text: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// No `/local/domain/<domid>` in xenstore.
    #[error("domain {domid} does not exist (there is no /local/domain/{domid} in xenstore)")]
    UnknownDomain {
        /// The domid asked for.
        domid: DomId,
    },
    /// The domain has a home in xenstore but is not alive (not introduced to xenstored).
    #[error("domain {domid} is not running (xenstored does not know it as a live domain)")]
    DomainNotRunning {
        /// The domid.
        domid: DomId,
    },
    /// No domain has this name.
    #[error("no domain is named {name:?} (no /local/domain/*/name holds it)")]
    UnknownDomainName {
        /// The name asked for.
        name: String,
    },
    /// Several domains have this name.
    #[error("several domains are named {name:?} (domids {domids:?}); give a domid instead")]
    AmbiguousDomainName {
        /// The name asked for.
        name: String,
        /// Every domain that has it.
        domids: Vec<DomId>,
    },
    /// The `domid` key of this domain's home could not be read (libxl fails the same way).
    #[error(
        "cannot tell which domain this is: reading its domid key (/local/domain/<self>/domid, \
         which xen-init-dom0 writes at boot) failed"
    )]
    OwnDomidUnknown {
        /// Why.
        #[source]
        source: XsError,
    },
    /// The devid asked for is taken.
    #[error("devid {devid} of domain {frontend} is already in use: {path} exists")]
    DevidInUse {
        /// The frontend domain.
        frontend: DomId,
        /// The devid.
        devid: u32,
        /// The directory that holds it.
        path: String,
    },
    /// Every devid is taken (cannot happen with real xenstore quotas, but is checked).
    #[error("domain {frontend} has no free virtio devid left")]
    NoFreeDevid {
        /// The frontend domain.
        frontend: DomId,
    },
    /// A net option that cannot be used as given.
    #[error("{option}: {reason}")]
    BadNetOption {
        /// The option, as on the command line.
        option: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A blk device without an image.
    #[error("a blk device needs an image: give --image PATH")]
    ImageRequired,
    /// An option that only some device types take.
    #[error("{option} is only for {for_kind} devices, not for {kind}")]
    OptionNotForKind {
        /// The option, as on the command line.
        option: &'static str,
        /// The device type that takes it.
        for_kind: DeviceKind,
        /// The device type asked for.
        kind: DeviceKind,
    },
    /// The image does not exist.
    #[error("image {} does not exist", path.display())]
    ImageMissing {
        /// The image path.
        path: PathBuf,
    },
    /// The image cannot be opened (for reading, or for writing when not `--readonly`).
    #[error("image {} cannot be opened for {access}{hint}", path.display())]
    ImageInaccessible {
        /// The image path.
        path: PathBuf,
        /// `reading` or `writing`.
        access: &'static str,
        /// A hint for the operator (may be empty).
        hint: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image is a directory, a socket, a character device...
    #[error("image {} is {what}, not a regular file or a block device", path.display())]
    NotAnImage {
        /// The image path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The image is empty or not a whole number of sectors.
    #[error("image {} is {bytes} bytes: {why}", path.display())]
    ImageSize {
        /// The image path.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// The image is attached already, and the two uses conflict (a writer beside anyone).
    #[error(
        "image {} is already attached {} to domain {frontend}{} as device {devid} \
         ({held_dir}); attaching it {} too would let {} corrupt it. Detach that device first, \
         or give --force-share if every user really coordinates",
        path.display(),
        if *held_read_only { "read-only" } else { "read-write" },
        name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
        if *read_only { "read-only" } else { "read-write" },
        if *read_only { "a reader see a writer" } else { "two writers" }
    )]
    ImageAttached {
        /// The image.
        path: PathBuf,
        /// Whether this attach asked for read-only.
        read_only: bool,
        /// The domain that has it.
        frontend: DomId,
        /// That domain's name.
        name: Option<String>,
        /// Its devid there.
        devid: u32,
        /// Whether that device is read-only.
        held_read_only: bool,
        /// Its backend directory.
        held_dir: String,
    },
    /// Another process holds a conflicting lock on the image.
    #[error(transparent)]
    ImageLocked(crate::image_lock::LockError),
    /// A path that cannot be stored as xenstore text.
    #[error("{what} {} is not valid UTF-8", path.display())]
    PathNotUtf8 {
        /// `image` or `console socket`.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A path relative to a domain whose working directory we do not know.
    #[error(
        "{what} {} must be an absolute path: it names a file in backend domain {backend}, \
         not here",
        path.display()
    )]
    PathNotAbsolute {
        /// `image` or `console socket`.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The backend domain.
        backend: DomId,
    },
    /// A queue count outside what the device type allows.
    #[error("{kind} devices take {allowed} queues, not {requested}")]
    QueuesOutOfRange {
        /// The device type.
        kind: DeviceKind,
        /// What it allows, in words (`1 to 16`, `exactly 2`).
        allowed: String,
        /// What was asked for.
        requested: u32,
    },
    /// A `--console` value that is neither `pty` nor `socket:<path>`.
    #[error("console {text:?} is not valid: {reason}")]
    BadConsoleSpec {
        /// What was given.
        text: String,
        /// Why.
        reason: &'static str,
    },
    /// The console socket's directory does not exist.
    #[error("the directory {} of console socket {} does not exist", dir.display(), path.display())]
    SocketDirMissing {
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// The console socket path does not fit in a `sockaddr_un`.
    #[error(
        "console socket {} is {len} bytes long, over the {max} bytes a unix socket address holds",
        path.display()
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A `--dma` value that is not a strategy.
    #[error("dma {0:?} is not auto, grant, bounce or direct")]
    BadDmaSetting(String),
    /// `--dma direct` with a backend outside Dom0 (PROTOCOL 4 and 10.5).
    #[error(
        "--dma direct needs the backend in Dom0, and backend domain {backend} is not Dom0: \
         only Dom0 can map a guest's memory without grants"
    )]
    DirectNeedsDom0 {
        /// The backend domain.
        backend: DomId,
    },
    /// No such device (neither directory exists for this backend).
    #[error(
        "domain {frontend} has no virtio device {devid} served by domain {backend} \
         (neither {backend_dir} nor {frontend_dir} exists)"
    )]
    DeviceNotFound {
        /// The frontend domain.
        frontend: DomId,
        /// The devid.
        devid: u32,
        /// The backend domain.
        backend: DomId,
        /// The backend directory looked for.
        backend_dir: String,
        /// The frontend directory looked for.
        frontend_dir: String,
    },
    /// The frontend directory exists but names another backend.
    #[error(
        "virtio device {devid} of domain {frontend} is not served by domain {backend}: \
         its frontend directory names backend {named:?}; pass --backend-domain"
    )]
    OtherBackend {
        /// The frontend domain.
        frontend: DomId,
        /// The devid.
        devid: u32,
        /// The backend domain asked for.
        backend: DomId,
        /// What the frontend directory's `backend` key holds.
        named: String,
    },
    /// Detach without `--force`: the backend did not reach Closed in time. The device was
    /// left in xenstore with `online = 0` and `state = 5`.
    #[error(
        "the backend of virtio device {devid} of domain {frontend} did not reach Closed within \
         {}s (state: {last}); the device is left Closing with online=0. Run detach again when \
         the backend answers, or add --force to remove it anyway (the guest may lose in-flight \
         I/O)",
        timeout.as_secs_f64()
    )]
    BackendDidNotClose {
        /// The frontend domain.
        frontend: DomId,
        /// The devid.
        devid: u32,
        /// The last backend state seen.
        last: String,
        /// How long detach waited.
        timeout: Duration,
    },
    /// A xenstore operation failed.
    #[error("{what} failed")]
    Store {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: XsError,
    },
}

impl AdminError {
    /// Wraps a xenstore error with what was being done.
    pub(crate) fn store(what: impl Into<String>) -> impl FnOnce(XsError) -> AdminError {
        let what = what.into();
        move |source| AdminError::Store { what, source }
    }
}

/// Splits a path into the devid-like numeric children of a xenstore directory, sorted; other
/// names are skipped. An absent directory has none.
pub(crate) fn numeric_children<T: std::str::FromStr + Ord>(
    store: &dyn xenvirtio_xenstore::XenStore,
    tx: xenvirtio_xenstore::TxId,
    path: &str,
) -> Result<Vec<T>, XsError> {
    let names = match store.directory(tx, path) {
        Ok(names) => names,
        Err(e) if e.is_enoent() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out: Vec<T> = names
        .iter()
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|n| n.parse().ok())
        .collect();
    out.sort();
    Ok(out)
}
