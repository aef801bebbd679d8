//! `attach`: creating a device's backend and frontend directories (PROTOCOL.md 2.1 to 2.3,
//! step 1 of 8.1).
//!
//! Everything is validated before anything is written: the domains exist, the options fit the
//! device type, the image (or the console socket's directory) is usable when it lives in this
//! domain. Both directories, their permissions and every toolstack key are then written in one
//! transaction that also picks the devid, so two concurrent attaches never share one.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{MAX_QUEUES, TRANSPORT, backend_keys as bk, frontend_keys as fk};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{DomId, Perm, TxId, XenStore, XsError, transaction};

use super::{AdminError, DomainRef, TRANSACTION_ATTEMPTS, numeric_children, own_domid};

/// Queues of a console device (receiveq and transmitq of port 0, PROTOCOL 10.3).
const CONSOLE_QUEUES: u32 = 2;
/// Queues of an rng device (PROTOCOL 10.4).
const RNG_QUEUES: u32 = 1;
/// Bytes of `sun_path` a socket path may use (108 with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// The `dma` key: a strategy the operator pins for the device, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DmaSetting {
    /// The frontend's role policy chooses.
    #[default]
    Auto,
    /// Only this strategy is accepted.
    Pinned(DmaStrategy),
}

impl FromStr for DmaSetting {
    type Err = AdminError;

    fn from_str(s: &str) -> Result<DmaSetting, AdminError> {
        if s == "auto" {
            return Ok(DmaSetting::Auto);
        }
        DmaStrategy::ALL
            .iter()
            .copied()
            .find(|d| d.name() == s)
            .map(DmaSetting::Pinned)
            .ok_or_else(|| AdminError::BadDmaSetting(s.to_owned()))
    }
}

impl fmt::Display for DmaSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaSetting::Auto => f.write_str("auto"),
            DmaSetting::Pinned(s) => f.write_str(s.name()),
        }
    }
}

/// Where a console device's port 0 goes (the `console` key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleOutput {
    /// A pty the backend opens and publishes in `tty`.
    #[default]
    Pty,
    /// A unix socket at this path.
    Socket(PathBuf),
}

impl FromStr for ConsoleOutput {
    type Err = AdminError;

    fn from_str(s: &str) -> Result<ConsoleOutput, AdminError> {
        let bad = |reason| AdminError::BadConsoleSpec {
            text: s.to_owned(),
            reason,
        };
        if s == "pty" {
            return Ok(ConsoleOutput::Pty);
        }
        match s.strip_prefix("socket:") {
            Some("") => Err(bad("socket: needs a path (socket:/run/guest1.sock)")),
            Some(path) => Ok(ConsoleOutput::Socket(PathBuf::from(path))),
            None => Err(bad("write pty or socket:<path>")),
        }
    }
}

impl fmt::Display for ConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleOutput::Pty => f.write_str("pty"),
            ConsoleOutput::Socket(p) => write!(f, "socket:{}", p.display()),
        }
    }
}

/// What to attach: the options of `xenvirtio-backend attach`, validated by [`attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The frontend domain (the guest).
    pub frontend: DomainRef,
    /// The backend domain; `None` is the domain we run in.
    pub backend: Option<DomainRef>,
    /// The device type.
    pub kind: DeviceKind,
    /// blk: the image file or block device (required for blk, refused otherwise).
    pub image: Option<PathBuf>,
    /// blk: attach read-only (`mode = r`).
    pub readonly: bool,
    /// A devid to use; `None` picks the smallest free one.
    pub devid: Option<u32>,
    /// Number of queues: blk 1 to `MAX_QUEUES`; console only 2; rng only 1.
    pub queues: Option<u32>,
    /// The `dma` key.
    pub dma: DmaSetting,
    /// console: where port 0 goes (`pty` when `None`); refused for other types.
    pub console: Option<ConsoleOutput>,
    /// blk: take no image lock and check no other attachment of the image (`force-share`).
    pub force_share: bool,
}

impl AttachRequest {
    /// A request for a device of `kind` for `frontend`, everything else default.
    pub fn new(frontend: impl Into<DomainRef>, kind: DeviceKind) -> AttachRequest {
        AttachRequest {
            frontend: frontend.into(),
            backend: None,
            kind,
            image: None,
            readonly: false,
            devid: None,
            queues: None,
            dma: DmaSetting::Auto,
            console: None,
            force_share: false,
        }
    }

    /// A blk device over `image`.
    pub fn blk(frontend: impl Into<DomainRef>, image: impl Into<PathBuf>) -> AttachRequest {
        AttachRequest {
            image: Some(image.into()),
            ..AttachRequest::new(frontend, DeviceKind::Block)
        }
    }

    /// Checks the options against the device type (no I/O).
    fn check_options(&self) -> Result<(), AdminError> {
        let kind = self.kind;
        let not_for = |option, for_kind| AdminError::OptionNotForKind {
            option,
            for_kind,
            kind,
        };
        match kind {
            DeviceKind::Block => {
                if self.image.is_none() {
                    return Err(AdminError::ImageRequired);
                }
                if self.console.is_some() {
                    return Err(not_for("--console", DeviceKind::Console));
                }
            }
            DeviceKind::Console | DeviceKind::Rng => {
                if self.image.is_some() {
                    return Err(not_for("--image", DeviceKind::Block));
                }
                if self.readonly {
                    return Err(not_for("--readonly", DeviceKind::Block));
                }
                if self.force_share {
                    return Err(not_for("--force-share", DeviceKind::Block));
                }
                if kind == DeviceKind::Rng && self.console.is_some() {
                    return Err(not_for("--console", DeviceKind::Console));
                }
            }
        }
        if let Some(requested) = self.queues {
            let (ok, allowed) = match kind {
                DeviceKind::Block => ((1..=MAX_QUEUES).contains(&requested), {
                    format!("1 to {MAX_QUEUES}")
                }),
                DeviceKind::Console => (requested == CONSOLE_QUEUES, "exactly 2".to_owned()),
                DeviceKind::Rng => (requested == RNG_QUEUES, "exactly 1".to_owned()),
            };
            if !ok {
                return Err(AdminError::QueuesOutOfRange {
                    kind,
                    allowed,
                    requested,
                });
            }
        }
        Ok(())
    }
}

/// What [`attach`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachOutcome {
    /// The frontend domain.
    pub frontend: DomId,
    /// The backend domain.
    pub backend: DomId,
    /// The devid chosen.
    pub devid: u32,
    /// The device type.
    pub kind: DeviceKind,
    /// `/local/domain/<B>/backend/virtio/<F>/<devid>`.
    pub backend_dir: String,
    /// `/local/domain/<F>/device/virtio/<devid>`.
    pub frontend_dir: String,
}

/// Creates a device: validates `req`, then writes the backend and frontend directories, their
/// permissions and every toolstack key in one transaction (retried on EAGAIN).
///
/// Files named by the request (the image, the console socket's directory) are checked only
/// when the backend is the domain we run in; for a driver domain they must be absolute paths
/// in that domain, which only its backend can check.
pub fn attach(store: &dyn XenStore, req: &AttachRequest) -> Result<AttachOutcome, AdminError> {
    req.check_options()?;
    let toolstack = own_domid(store)?;
    let frontend = super::resolve_domain(store, &req.frontend)?;
    let backend = match &req.backend {
        Some(b) => super::resolve_domain(store, b)?,
        None => toolstack,
    };
    for domid in [frontend, backend] {
        // Xenstored refuses a directory owned by a domain it does not know: say it plainly.
        let alive = domid == toolstack
            || store
                .is_domain_introduced(domid)
                .map_err(AdminError::store(format!(
                    "asking xenstored about domain {domid}"
                )))?;
        if !alive {
            return Err(AdminError::DomainNotRunning { domid });
        }
    }
    let local = backend == toolstack;
    if req.dma == DmaSetting::Pinned(DmaStrategy::Direct) && backend != 0 {
        return Err(AdminError::DirectNeedsDom0 { backend });
    }
    // PROTOCOL 2.2: libxl's default, `grant_usage = (backend != 0)`. `0` only says a Dom0
    // backend *may* accept `direct`; the daemon publishes the effective value, `1` unless it
    // was started trusting this guest (10.5), and the `dma` key still restricts the guest.
    let grant_usage = if backend == 0 { "0" } else { "1" };

    let mut device_keys: Vec<(&'static str, String)> = Vec::new();
    match req.kind {
        DeviceKind::Block => {
            let image = req.image.as_deref().ok_or(AdminError::ImageRequired)?;
            let image = if local {
                check_image(image, req.readonly, req.force_share)?
            } else {
                remote_path("image", image, backend)?
            };
            device_keys.push((bk::PARAMS, utf8("image", &image)?));
            device_keys.push((bk::MODE, if req.readonly { "r" } else { "w" }.to_owned()));
            if req.force_share {
                device_keys.push((bk::FORCE_SHARE, "1".to_owned()));
            }
            if let Some(queues) = req.queues {
                device_keys.push((bk::REQUESTED_QUEUES, queues.to_string()));
            }
        }
        DeviceKind::Console => {
            let console = match req.console.clone().unwrap_or_default() {
                ConsoleOutput::Pty => ConsoleOutput::Pty,
                ConsoleOutput::Socket(path) => ConsoleOutput::Socket(if local {
                    check_socket_path(&path)?
                } else {
                    remote_path("console socket", &path, backend)?
                }),
            };
            if let ConsoleOutput::Socket(path) = &console {
                utf8("console socket", path)?;
            }
            device_keys.push((bk::CONSOLE, console.to_string()));
        }
        DeviceKind::Rng => {}
    }

    let kind = req.kind;
    let image = device_keys
        .iter()
        .find(|(k, _)| *k == bk::PARAMS)
        .map(|(_, v)| PathBuf::from(v))
        .filter(|_| !req.force_share);
    let devid = transaction(store, TRANSACTION_ATTEMPTS, |tx| {
        if let Some(image) = &image {
            if let Some(user) = image_user(store, tx, backend, image, local)? {
                if !(req.readonly && user.read_only) {
                    return Ok(Err(AdminError::ImageAttached {
                        path: image.clone(),
                        read_only: req.readonly,
                        frontend: user.frontend,
                        name: super::domain_name(store, user.frontend).ok().flatten(),
                        devid: user.devid,
                        held_read_only: user.read_only,
                        held_dir: user.dir,
                    }));
                }
            }
        }
        let devid = match req.devid {
            Some(devid) => {
                if let Some(path) = devid_user(store, tx, backend, frontend, devid)? {
                    return Ok(Err(AdminError::DevidInUse {
                        frontend,
                        devid,
                        path,
                    }));
                }
                devid
            }
            None => match smallest_free_devid(store, tx, backend, frontend)? {
                Some(devid) => devid,
                None => return Ok(Err(AdminError::NoFreeDevid { frontend })),
            },
        };
        let be = xenbus::backend_dir(backend, frontend, devid);
        let fe = xenbus::frontend_dir(frontend, devid);
        let initialising = XenbusState::Initialising.value().to_string();

        ensure_frontend_parents(store, tx, toolstack, frontend)?;
        store.mkdir(tx, &be)?;
        store.set_perms(tx, &be, &dir_perms(backend, frontend))?;
        let common: [(&str, String); 8] = [
            (bk::FRONTEND, fe.clone()),
            (bk::FRONTEND_ID, frontend.to_string()),
            (bk::ONLINE, "1".to_owned()),
            (bk::STATE, initialising.clone()),
            (bk::TYPE, kind.type_string()),
            (bk::TRANSPORT, TRANSPORT.to_owned()),
            (bk::GRANT_USAGE, grant_usage.to_owned()),
            (bk::DMA, req.dma.to_string()),
        ];
        for (key, value) in common.iter().chain(device_keys.iter()) {
            store.write_str(tx, &format!("{be}/{key}"), value)?;
        }

        store.mkdir(tx, &fe)?;
        store.set_perms(tx, &fe, &dir_perms(frontend, backend))?;
        for (key, value) in [
            (fk::BACKEND, be.as_str()),
            (fk::BACKEND_ID, &backend.to_string()),
            (fk::STATE, &initialising),
        ] {
            store.write_str(tx, &format!("{fe}/{key}"), value)?;
        }
        Ok(Ok(devid))
    })
    .map_err(AdminError::store(format!(
        "writing the directories of a {kind} device for domain {frontend}"
    )))??;

    let outcome = AttachOutcome {
        frontend,
        backend,
        devid,
        kind,
        backend_dir: xenbus::backend_dir(backend, frontend, devid),
        frontend_dir: xenbus::frontend_dir(frontend, devid),
    };
    tracing::debug!(
        domid = frontend,
        devid,
        backend,
        %kind,
        "virtio device attached"
    );
    Ok(outcome)
}

/// PROTOCOL 2.1: a directory owned by `owner`, readable by `peer`; a single `n<owner>` when
/// both ends are the same domain.
fn dir_perms(owner: DomId, peer: DomId) -> Vec<Perm> {
    if owner == peer {
        vec![Perm::owner(owner)]
    } else {
        vec![Perm::owner(owner), Perm::read(peer)]
    }
}

/// Creates `/local/domain/<F>/device` and `.../device/virtio` if missing, owned by the
/// toolstack and readable by the guest, as libxl creates `device`: the guest may list and
/// watch its devices but not create any.
fn ensure_frontend_parents(
    store: &dyn XenStore,
    tx: TxId,
    toolstack: DomId,
    frontend: DomId,
) -> Result<(), XsError> {
    let device = format!("/local/domain/{frontend}/device");
    for path in [device.clone(), xenbus::frontend_root(frontend)] {
        if !store.exists(tx, &path)? {
            store.mkdir(tx, &path)?;
            store.set_perms(tx, &path, &dir_perms(toolstack, frontend))?;
        }
    }
    Ok(())
}

/// The directory that already uses `devid` for `frontend`, if any: its frontend directory
/// (whatever backend serves it) or a backend directory of ours.
fn devid_user(
    store: &dyn XenStore,
    tx: TxId,
    backend: DomId,
    frontend: DomId,
    devid: u32,
) -> Result<Option<String>, XsError> {
    for path in [
        xenbus::frontend_dir(frontend, devid),
        xenbus::backend_dir(backend, frontend, devid),
    ] {
        if store.exists(tx, &path)? {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The smallest devid used by neither directory.
fn smallest_free_devid(
    store: &dyn XenStore,
    tx: TxId,
    backend: DomId,
    frontend: DomId,
) -> Result<Option<u32>, XsError> {
    let mut used: Vec<u32> = numeric_children(store, tx, &xenbus::frontend_root(frontend))?;
    used.extend(numeric_children::<u32>(
        store,
        tx,
        &format!("{}/{frontend}", xenbus::backend_root(backend)),
    )?);
    used.sort_unstable();
    used.dedup();
    let mut candidate: u32 = 0;
    for devid in used {
        if devid != candidate {
            break;
        }
        let Some(next) = candidate.checked_add(1) else {
            return Ok(None);
        };
        candidate = next;
    }
    Ok(Some(candidate))
}

/// Makes a local path absolute: an absolute path is kept as the operator wrote it (a stable
/// name such as `/dev/disk/by-id/...` stays readable in `list`); a relative one is resolved
/// through the file system, so that `..` and symbolic links mean what they meant here.
fn absolute_here(path: &Path) -> std::io::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        std::fs::canonicalize(path)
    }
}

/// A blk device of backend domain `backend` over an image.
struct ImageUser {
    frontend: DomId,
    devid: u32,
    read_only: bool,
    dir: String,
}

/// The first blk device of `backend` (not `force-share`, of a live guest) over `image`,
/// read-write ones first.
/// A local image is compared by its file (device and inode), a driver domain's by its path.
fn image_user(
    store: &dyn XenStore,
    tx: TxId,
    backend: DomId,
    image: &Path,
    local: bool,
) -> Result<Option<ImageUser>, XsError> {
    use std::os::unix::fs::MetadataExt;
    let file_of = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ours = if local { file_of(image) } else { None };
    let root = format!("/local/domain/{backend}/backend/virtio");
    let mut found: Option<ImageUser> = None;
    for frontend in numeric_children::<DomId>(store, tx, &root)? {
        // A destroyed guest's leftover devices hold nothing: its daemon released them.
        if frontend != backend && !store.is_domain_introduced(frontend).unwrap_or(true) {
            continue;
        }
        for devid in numeric_children::<u32>(store, tx, &format!("{root}/{frontend}"))? {
            let dir = xenbus::backend_dir(backend, frontend, devid);
            let read = |k: &str| {
                xenbus::optional(store.read_string(tx, &format!("{dir}/{k}")))
                    .map(|v| v.map(|s| s.trim().to_owned()))
            };
            let Some(params) = read(bk::PARAMS)? else {
                continue;
            };
            if read(bk::FORCE_SHARE)?.as_deref() == Some("1") {
                continue;
            }
            let same = match ours {
                Some(key) => file_of(Path::new(&params)) == Some(key),
                None => Path::new(&params) == image,
            };
            if !same {
                continue;
            }
            let read_only = read(bk::MODE)?.as_deref() == Some("r");
            let user = ImageUser {
                frontend,
                devid,
                read_only,
                dir,
            };
            if !read_only {
                return Ok(Some(user));
            }
            found.get_or_insert(user);
        }
    }
    Ok(found)
}

/// Checks a local image and returns its absolute path. Unless `force_share`, the image must
/// also be free of conflicting locks (another daemon, a loopback, QEMU).
fn check_image(path: &Path, readonly: bool, force_share: bool) -> Result<PathBuf, AdminError> {
    let inaccessible = |path: PathBuf, source| AdminError::ImageInaccessible {
        path,
        access: "reading",
        hint: "",
        source,
    };
    let missing = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let absolute = match absolute_here(path) {
        Ok(p) => p,
        Err(e) if missing(&e) => return Err(AdminError::ImageMissing { path: path.into() }),
        Err(e) => return Err(inaccessible(path.into(), e)),
    };
    let meta = match std::fs::metadata(&absolute) {
        Ok(meta) => meta,
        Err(e) if missing(&e) => return Err(AdminError::ImageMissing { path: absolute }),
        Err(e) => return Err(inaccessible(absolute, e)),
    };
    let file_type = meta.file_type();
    if !(file_type.is_file() || file_type.is_block_device()) {
        let what = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_char_device() {
            "a character device"
        } else if file_type.is_socket() {
            "a socket"
        } else if file_type.is_fifo() {
            "a fifo"
        } else {
            "something else"
        };
        return Err(AdminError::NotAnImage {
            path: absolute,
            what,
        });
    }
    // Opening is harmless for a file or a block device (no O_EXCL, no truncation), and it is
    // the only honest test: permissions, ACLs, read-only mounts.
    let open = |write: bool| OpenOptions::new().read(true).write(write).open(&absolute);
    let mut file = match open(false) {
        Ok(file) => file,
        Err(source) => return Err(inaccessible(absolute, source)),
    };

    if !readonly {
        if let Err(source) = open(true) {
            return Err(AdminError::ImageInaccessible {
                path: absolute,
                access: "writing",
                hint: " (attach it with --readonly?)",
                source,
            });
        }
    }
    // A block device's metadata says 0 bytes; its end says its size.
    let bytes = match std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)) {
        Ok(bytes) => bytes,
        Err(source) => return Err(inaccessible(absolute, source)),
    };
    if let Some(why) = crate::blk::image_size_problem(bytes) {
        return Err(AdminError::ImageSize {
            path: absolute,
            bytes,
            why,
        });
    }
    if !force_share {
        let mode = crate::image_lock::LockMode::for_read_only(readonly);
        // A device detached a moment ago may still be dropping its image in its daemon.
        let grace = crate::image_lock::RELEASE_GRACE;
        crate::image_lock::probe_waiting(&file, &absolute, mode, grace)
            .map_err(AdminError::ImageLocked)?;
    }
    Ok(absolute)
}

/// Checks a local console socket path and returns it absolute.
fn check_socket_path(path: &Path) -> Result<PathBuf, AdminError> {
    // The socket need not exist yet: resolve its directory, keep its name.
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        let name = path.file_name().ok_or_else(|| AdminError::BadConsoleSpec {
            text: format!("socket:{}", path.display()),
            reason: "the path does not end in a file name",
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        match std::fs::canonicalize(dir) {
            Ok(dir) => dir.join(name),
            Err(_) => {
                return Err(AdminError::SocketDirMissing {
                    path: path.to_owned(),
                    dir: dir.to_owned(),
                });
            }
        }
    };
    let len = absolute.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(AdminError::SocketPathTooLong {
            path: absolute,
            len,
            max: SUN_PATH_MAX,
        });
    }
    let dir = absolute
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("/"))
        .to_owned();
    if !dir.is_dir() {
        return Err(AdminError::SocketDirMissing {
            path: absolute,
            dir,
        });
    }
    Ok(absolute)
}

/// A path that lives in another (driver) domain: it must be absolute, nothing else can be
/// checked from here.
fn remote_path(what: &'static str, path: &Path, backend: DomId) -> Result<PathBuf, AdminError> {
    if !path.is_absolute() {
        return Err(AdminError::PathNotAbsolute {
            what,
            path: path.to_owned(),
            backend,
        });
    }
    tracing::info!(
        backend,
        path = %path.display(),
        "{what} not checked: it lives in the backend domain"
    );
    Ok(path.to_owned())
}

fn utf8(what: &'static str, path: &Path) -> Result<String, AdminError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| AdminError::PathNotUtf8 {
            what,
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use xenvirtio_xenstore::{MemConnection, MemStore};

    const N: TxId = TxId::NONE;

    struct World {
        daemon: MemStore,
        dom0: MemConnection,
        dir: tempfile::TempDir,
    }

    impl World {
        fn new() -> World {
            let daemon = MemStore::new();
            let dom0 = daemon.connect(0).unwrap();
            dom0.write(N, "/local/domain/0/domid", b"0").unwrap();
            dom0.write(N, "/local/domain/0/name", b"Domain-0").unwrap();
            for (domid, name) in [(5, "guest1"), (6, "guest2"), (7, "driver")] {
                daemon.start_guest(domid).unwrap();
                dom0.write(N, &format!("/local/domain/{domid}/name"), name.as_bytes())
                    .unwrap();
            }
            // Has a home, but the hypervisor never started it.
            daemon.create_domain(8);
            dom0.mkdir(N, "/local/domain/8").unwrap();
            World {
                daemon,
                dom0,
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn image(&self, name: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
            path
        }

        /// Every node under `dir` with its value and permissions.
        fn tree(&self, dir: &str) -> BTreeMap<String, (String, Vec<Perm>)> {
            let mut out = BTreeMap::new();
            for child in self.dom0.directory(N, dir).unwrap() {
                let path = format!("{dir}/{child}");
                let value = String::from_utf8(self.dom0.read(N, &path).unwrap()).unwrap();
                out.insert(child, (value, self.dom0.get_perms(N, &path).unwrap()));
            }
            out
        }
    }

    fn expect(keys: &[(&str, &str)], perms: &[Perm]) -> BTreeMap<String, (String, Vec<Perm>)> {
        keys.iter()
            .map(|(k, v)| ((*k).to_owned(), ((*v).to_owned(), perms.to_vec())))
            .collect()
    }

    #[test]
    fn blk_writes_every_toolstack_key_with_the_protocol_permissions() {
        let w = World::new();
        let image = w.image("disk.img");
        let mut req = AttachRequest::blk(5, &image);
        req.queues = Some(4);
        req.dma = DmaSetting::Pinned(DmaStrategy::Bounce);
        let out = attach(&w.dom0, &req).unwrap();
        assert_eq!(out.devid, 0);
        assert_eq!(out.backend_dir, "/local/domain/0/backend/virtio/5/0");
        assert_eq!(out.frontend_dir, "/local/domain/5/device/virtio/0");
        let be_perms = [Perm::owner(0), Perm::read(5)];
        let fe_perms = [Perm::owner(5), Perm::read(0)];
        assert_eq!(w.dom0.get_perms(N, &out.backend_dir).unwrap(), be_perms);
        assert_eq!(w.dom0.get_perms(N, &out.frontend_dir).unwrap(), fe_perms);
        let image = image.to_str().unwrap();
        assert_eq!(
            w.tree(&out.backend_dir),
            expect(
                &[
                    ("frontend", "/local/domain/5/device/virtio/0"),
                    ("frontend-id", "5"),
                    ("online", "1"),
                    ("state", "1"),
                    ("type", "virtio,device2"),
                    ("transport", "xenbus"),
                    ("grant_usage", "0"),
                    ("dma", "bounce"),
                    ("params", image),
                    ("mode", "w"),
                    ("requested-queues", "4"),
                ],
                &be_perms
            )
        );
        assert_eq!(
            w.tree(&out.frontend_dir),
            expect(
                &[
                    ("backend", "/local/domain/0/backend/virtio/5/0"),
                    ("backend-id", "0"),
                    ("state", "1"),
                ],
                &fe_perms
            )
        );
        // The guest may list its devices but not create any.
        for p in ["/local/domain/5/device", "/local/domain/5/device/virtio"] {
            assert_eq!(
                w.dom0.get_perms(N, p).unwrap(),
                [Perm::owner(0), Perm::read(5)]
            );
        }
    }

    #[test]
    fn console_and_rng_write_their_own_keys_and_devids_count_up() {
        let w = World::new();
        let sock = w.dir.path().join("console.sock");
        let mut req = AttachRequest::new(DomainRef::Name("guest1".into()), DeviceKind::Console);
        req.console = Some(ConsoleOutput::Socket(sock.clone()));
        let console = attach(&w.dom0, &req).unwrap();
        let rng = attach(&w.dom0, &AttachRequest::new(5, DeviceKind::Rng)).unwrap();
        let pty = attach(&w.dom0, &AttachRequest::new(5, DeviceKind::Console)).unwrap();
        assert_eq!((console.devid, rng.devid, pty.devid), (0, 1, 2));
        assert_eq!(console.frontend, 5, "the name resolved");
        let be = w.tree(&console.backend_dir);
        assert_eq!(be["type"].0, "virtio,device3");
        assert_eq!(be["console"].0, format!("socket:{}", sock.display()));
        assert!(!be.contains_key("params") && !be.contains_key("requested-queues"));
        assert_eq!(w.tree(&pty.backend_dir)["console"].0, "pty");
        let be = w.tree(&rng.backend_dir);
        assert_eq!(be["type"].0, "virtio,device4");
        assert_eq!(be["dma"].0, "auto");
        assert_eq!(
            be.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "dma",
                "frontend",
                "frontend-id",
                "grant_usage",
                "online",
                "state",
                "transport",
                "type"
            ]
        );
    }

    #[test]
    fn a_given_devid_is_used_and_refused_when_taken_by_either_directory() {
        let w = World::new();
        let mut req = AttachRequest::new(5, DeviceKind::Rng);
        req.devid = Some(3);
        assert_eq!(attach(&w.dom0, &req).unwrap().devid, 3);
        let e = attach(&w.dom0, &req).unwrap_err();
        assert!(
            matches!(&e, AdminError::DevidInUse { devid: 3, path, .. }
                if path == "/local/domain/5/device/virtio/3"),
            "{e}"
        );
        // A stale backend directory alone also holds the devid.
        w.dom0
            .write(N, "/local/domain/0/backend/virtio/5/4/state", b"6")
            .unwrap();
        req.devid = Some(4);
        let e = attach(&w.dom0, &req).unwrap_err();
        assert!(
            e.to_string()
                .contains("/local/domain/0/backend/virtio/5/4 exists"),
            "{e}"
        );
        // The smallest free one skips both.
        req.devid = None;
        let ids: Vec<u32> = (0..4)
            .map(|_| attach(&w.dom0, &req).unwrap().devid)
            .collect();
        assert_eq!(ids, [0, 1, 2, 5]);
    }

    #[test]
    fn same_domain_at_both_ends_collapses_the_permissions() {
        let w = World::new();
        let out = attach(&w.dom0, &AttachRequest::new(0, DeviceKind::Rng)).unwrap();
        assert_eq!(out.backend_dir, "/local/domain/0/backend/virtio/0/0");
        for dir in [&out.backend_dir, &out.frontend_dir] {
            assert_eq!(w.dom0.get_perms(N, dir).unwrap(), [Perm::owner(0)]);
        }
    }

    #[test]
    fn a_driver_domain_backend_owns_its_directory_and_checks_no_local_files() {
        let w = World::new();
        let mut req = AttachRequest::blk(5, "/dev/mapper/vg-guest1");
        req.backend = Some(DomainRef::Name("driver".into()));
        req.readonly = true;
        let out = attach(&w.dom0, &req).unwrap();
        assert_eq!(out.backend_dir, "/local/domain/7/backend/virtio/5/0");
        assert_eq!(
            w.dom0.get_perms(N, &out.backend_dir).unwrap(),
            [Perm::owner(7), Perm::read(5)]
        );
        assert_eq!(
            w.dom0.get_perms(N, &out.frontend_dir).unwrap(),
            [Perm::owner(5), Perm::read(7)]
        );
        let be = w.tree(&out.backend_dir);
        assert_eq!(be["params"].0, "/dev/mapper/vg-guest1");
        assert_eq!(be["mode"].0, "r");
        assert_eq!(be["grant_usage"].0, "1");
        // The driver domain can write its backend state, the guest its frontend state.
        let driver = w.daemon.connect(7).unwrap();
        driver
            .write(N, &format!("{}/state", out.backend_dir), b"2")
            .unwrap();
        let guest = w.daemon.connect(5).unwrap();
        guest
            .write(N, &format!("{}/state", out.frontend_dir), b"3")
            .unwrap();
        assert!(
            guest
                .write(N, &format!("{}/state", out.backend_dir), b"6")
                .unwrap_err()
                .is_eacces()
        );
        // A relative path cannot name a file in another domain.
        req.image = Some("disk.img".into());
        let e = attach(&w.dom0, &req).unwrap_err();
        assert!(matches!(e, AdminError::PathNotAbsolute { .. }), "{e}");
    }

    #[test]
    fn grant_usage_is_libxls_default_and_direct_needs_dom0() {
        let w = World::new();
        let mut req = AttachRequest::new(5, DeviceKind::Rng);
        for dma in ["auto", "grant", "bounce", "direct"] {
            req.dma = dma.parse().unwrap();
            let out = attach(&w.dom0, &req).unwrap();
            let be = w.tree(&out.backend_dir);
            assert_eq!(
                (be["dma"].0.as_str(), be["grant_usage"].0.as_str()),
                (dma, "0"),
                "a Dom0 backend"
            );
        }
        req.backend = Some(DomainRef::Id(7));
        for dma in ["auto", "grant", "bounce"] {
            req.dma = dma.parse().unwrap();
            let out = attach(&w.dom0, &req).unwrap();
            assert_eq!(
                w.tree(&out.backend_dir)["grant_usage"].0,
                "1",
                "a driver domain"
            );
        }
        req.dma = DmaSetting::Pinned(DmaStrategy::Direct);
        let e = attach(&w.dom0, &req).unwrap_err();
        assert!(
            matches!(e, AdminError::DirectNeedsDom0 { backend: 7 }),
            "{e}"
        );
        assert!(e.to_string().contains("--dma direct"), "{e}");
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_written() {
        let w = World::new();
        let image = w.image("disk.img");
        let sock_dir_missing = w.dir.path().join("nodir/console.sock");
        let empty = w.dir.path().join("empty.img");
        std::fs::File::create(&empty).unwrap();
        let odd = w.dir.path().join("odd.img");
        std::fs::File::create(&odd)
            .unwrap()
            .set_len(1_000_000)
            .unwrap();
        let cases: Vec<(AttachRequest, &str)> = vec![
            (AttachRequest::new(5, DeviceKind::Block), "needs an image"),
            (AttachRequest::blk(5, &empty), "is 0 bytes: an empty image"),
            (
                AttachRequest::blk(5, &odd),
                "is 1000000 bytes: not a whole number of 512-byte sectors: its last 64 bytes",
            ),
            (
                AttachRequest::blk(5, w.dir.path().join("absent.img")),
                "absent.img does not exist",
            ),
            (AttachRequest::blk(5, w.dir.path()), "is a directory"),
            (
                AttachRequest::blk(5, "/dev/null"),
                "/dev/null is a character device",
            ),
            (AttachRequest::blk(42, &image), "domain 42 does not exist"),
            (
                AttachRequest::new(8, DeviceKind::Rng),
                "domain 8 is not running",
            ),
            (
                AttachRequest {
                    backend: Some(DomainRef::Id(8)),
                    ..AttachRequest::new(5, DeviceKind::Rng)
                },
                "domain 8 is not running",
            ),
            (
                AttachRequest::blk(DomainRef::Name("nobody".into()), &image),
                "no domain is named \"nobody\"",
            ),
            (
                AttachRequest {
                    backend: Some(DomainRef::Id(9)),
                    ..AttachRequest::blk(5, &image)
                },
                "domain 9 does not exist",
            ),
            (
                AttachRequest {
                    image: Some(image.clone()),
                    ..AttachRequest::new(5, DeviceKind::Rng)
                },
                "--image is only for blk devices, not for rng",
            ),
            (
                AttachRequest {
                    readonly: true,
                    ..AttachRequest::new(5, DeviceKind::Console)
                },
                "--readonly is only for blk devices, not for console",
            ),
            (
                AttachRequest {
                    console: Some(ConsoleOutput::Pty),
                    ..AttachRequest::blk(5, &image)
                },
                "--console is only for console devices, not for blk",
            ),
            (
                AttachRequest {
                    queues: Some(0),
                    ..AttachRequest::blk(5, &image)
                },
                "blk devices take 1 to 16 queues, not 0",
            ),
            (
                AttachRequest {
                    queues: Some(17),
                    ..AttachRequest::blk(5, &image)
                },
                "not 17",
            ),
            (
                AttachRequest {
                    queues: Some(1),
                    ..AttachRequest::new(5, DeviceKind::Console)
                },
                "console devices take exactly 2 queues, not 1",
            ),
            (
                AttachRequest {
                    queues: Some(2),
                    ..AttachRequest::new(5, DeviceKind::Rng)
                },
                "rng devices take exactly 1 queues, not 2",
            ),
            (
                AttachRequest {
                    console: Some(ConsoleOutput::Socket(sock_dir_missing)),
                    ..AttachRequest::new(5, DeviceKind::Console)
                },
                "nodir of console socket",
            ),
            (
                AttachRequest {
                    console: Some(ConsoleOutput::Socket(w.dir.path().join("s".repeat(120)))),
                    ..AttachRequest::new(5, DeviceKind::Console)
                },
                "over the 107 bytes",
            ),
        ];
        for (req, needle) in cases {
            let e = attach(&w.dom0, &req).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle), "{req:?}: {msg:?} lacks {needle:?}");
            assert!(!msg.contains('\n'), "one line: {msg:?}");
        }
        assert!(
            !w.dom0.exists(N, "/local/domain/5/device").unwrap(),
            "nothing was written"
        );
        assert!(!w.dom0.exists(N, "/local/domain/0/backend").unwrap());
    }

    #[test]
    fn an_image_has_one_writer_or_only_readers_unless_force_shared() {
        let w = World::new();
        let image = w.image("shared.img");
        let link = w.dir.path().join("link.img");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        let ro = |d: DomId, p: &Path| AttachRequest {
            readonly: true,
            ..AttachRequest::blk(d, p)
        };
        // Two readers share it; a writer beside them is refused, by any path to the file.
        attach(&w.dom0, &ro(5, &image)).unwrap();
        attach(&w.dom0, &ro(6, &link)).unwrap();
        let e = attach(&w.dom0, &AttachRequest::blk(6, &link)).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                AdminError::ImageAttached {
                    frontend: 5,
                    devid: 0,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("already attached read-only to domain 5 (guest1) as device 0")
                && msg.contains("attaching it read-write too")
                && msg.contains("--force-share"),
            "{msg}"
        );
        // A writer holds it: neither a reader nor a second writer gets it.
        let other = w.image("other.img");
        attach(&w.dom0, &AttachRequest::blk(5, &other)).unwrap();
        for req in [AttachRequest::blk(6, &other), ro(6, &other)] {
            let msg = attach(&w.dom0, &req).unwrap_err().to_string();
            assert!(
                msg.contains("already attached read-write to domain 5 (guest1)"),
                "{msg}"
            );
        }
        // The operator who means it.
        let forced = AttachRequest {
            force_share: true,
            ..AttachRequest::blk(6, &other)
        };
        let out = attach(&w.dom0, &forced).unwrap();
        let key = format!("{}/force-share", out.backend_dir);
        assert_eq!(w.dom0.read_string(N, &key).unwrap(), "1");
        // A force-shared device does not stop others either.
        let third = w.image("third.img");
        attach(
            &w.dom0,
            &AttachRequest {
                force_share: true,
                ..AttachRequest::blk(5, &third)
            },
        )
        .unwrap();
        attach(&w.dom0, &AttachRequest::blk(6, &third)).unwrap();
        // Not for other types.
        let bad = AttachRequest {
            force_share: true,
            ..AttachRequest::new(5, DeviceKind::Rng)
        };
        assert!(
            attach(&w.dom0, &bad)
                .unwrap_err()
                .to_string()
                .contains("--force-share")
        );
    }

    #[test]
    fn an_image_another_process_locked_is_refused_with_that_process() {
        let w = World::new();
        let image = w.image("held.img");
        let mut holder = std::process::Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(&image)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io (qemu-utils) is needed");
        let file = std::fs::File::open(&image).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while crate::image_lock::probe(&file, &image, crate::image_lock::LockMode::Exclusive)
            .is_ok()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never locked it"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let e = attach(&w.dom0, &AttachRequest::blk(5, &image)).unwrap_err();
        let forced = attach(
            &w.dom0,
            &AttachRequest {
                force_share: true,
                ..AttachRequest::blk(5, &image)
            },
        );
        let _ = holder.kill();
        let _ = holder.wait();
        let msg = e.to_string();
        assert!(matches!(e, AdminError::ImageLocked(_)), "{msg}");
        assert!(
            msg.contains(&format!("process {} (qemu-io)", holder.id())),
            "{msg}"
        );
        forced.unwrap();
    }

    #[test]
    fn an_image_that_cannot_be_written_needs_readonly() {
        use std::os::unix::fs::PermissionsExt;
        let w = World::new();
        // A regular file we may read but not write: mode 0444 stops anyone but root; root
        // is stopped by sysfs, whose read-only attributes refuse writers whatever the mode.
        let image = w.image("ro.img");
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o444)).unwrap();
        let image = if OpenOptions::new().write(true).open(&image).is_ok() {
            PathBuf::from("/sys/kernel/notes")
        } else {
            image
        };
        assert!(
            image.is_file() && OpenOptions::new().write(true).open(&image).is_err(),
            "no regular file that cannot be opened for writing: {}",
            image.display()
        );
        let e = attach(&w.dom0, &AttachRequest::blk(5, &image)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{} cannot be opened for writing", image.display()))
                && msg.contains("--readonly"),
            "{msg}"
        );
        let mut req = AttachRequest::blk(5, &image);
        req.readonly = true;
        // As root the unwritable file is a sysfs one, whose size need not be whole sectors
        // (refused for that reason); the read-only attach is then shown with our own file.
        let sectors = std::fs::metadata(&image).is_ok_and(|m| m.len() > 0 && m.len() % 512 == 0);
        if !sectors {
            req.image = Some(w.image("ro-whole-sectors.img"));
        }
        let out = attach(&w.dom0, &req).unwrap();
        assert_eq!(w.tree(&out.backend_dir)["mode"].0, "r");
    }

    #[test]
    fn relative_paths_are_stored_absolute() {
        let w = World::new();
        let image = std::fs::canonicalize(w.image("rel.img")).unwrap();
        // A path relative to the test's working directory, through "..", whatever that is.
        let cwd = std::env::current_dir().unwrap();
        let ups: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
        let rel = ups.join(image.strip_prefix("/").unwrap());
        assert!(rel.is_relative());
        let out = attach(&w.dom0, &AttachRequest::blk(5, &rel)).unwrap();
        assert_eq!(
            w.tree(&out.backend_dir)["params"].0,
            image.to_str().unwrap()
        );

        let sock = ups
            .join(w.dir.path().strip_prefix("/").unwrap())
            .join("c.sock");
        let mut req = AttachRequest::new(5, DeviceKind::Console);
        req.console = Some(ConsoleOutput::Socket(sock));
        let out = attach(&w.dom0, &req).unwrap();
        let dir = std::fs::canonicalize(w.dir.path()).unwrap();
        assert_eq!(
            w.tree(&out.backend_dir)["console"].0,
            format!("socket:{}", dir.join("c.sock").display())
        );
    }

    #[test]
    fn concurrent_attaches_get_distinct_devids() {
        let w = World::new();
        let conns: Vec<Arc<MemConnection>> = (0..4)
            .map(|_| Arc::new(w.daemon.connect(0).unwrap()))
            .collect();
        let threads: Vec<_> = conns
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    (0..5)
                        .map(|_| {
                            attach(&*c, &AttachRequest::new(5, DeviceKind::Rng))
                                .unwrap()
                                .devid
                        })
                        .collect::<Vec<u32>>()
                })
            })
            .collect();
        let mut all: Vec<u32> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<u32>>());
    }

    #[test]
    fn settings_parse_and_print() {
        assert_eq!("auto".parse::<DmaSetting>().unwrap(), DmaSetting::Auto);
        for s in DmaStrategy::ALL {
            let parsed: DmaSetting = s.name().parse().unwrap();
            assert_eq!(parsed, DmaSetting::Pinned(s));
            assert_eq!(parsed.to_string(), s.name());
        }
        assert!("fast".parse::<DmaSetting>().is_err());
        assert_eq!("pty".parse::<ConsoleOutput>().unwrap(), ConsoleOutput::Pty);
        let s: ConsoleOutput = "socket:/run/g.sock".parse().unwrap();
        assert_eq!(s, ConsoleOutput::Socket("/run/g.sock".into()));
        assert_eq!(s.to_string(), "socket:/run/g.sock");
        for bad in ["", "socket:", "tty", "file:/x"] {
            let e = bad.parse::<ConsoleOutput>().unwrap_err();
            assert!(
                e.to_string().contains("pty") || e.to_string().contains("path"),
                "{e}"
            );
        }
    }
}
