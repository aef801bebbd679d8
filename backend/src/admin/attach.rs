//! `attach`: creating a device's backend and frontend directories (PROTOCOL.md 2.1 to 2.3,
//! step 1 of 8.1).
//!
//! Everything is validated before anything is written: the domains exist, the options fit the
//! device type, the image (or the console socket's directory) is usable when it lives in this
//! domain. Both directories, their permissions and every toolstack key are then written in one
//! transaction that also picks the devid, so two concurrent attaches never share one.

use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{TRANSPORT, backend_keys as bk, frontend_keys as fk};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{DomId, Perm, TxId, XenStore, XsError, transaction};

use super::{AdminError, TRANSACTION_ATTEMPTS, numeric_children, own_domid};

/// Bytes of `sun_path` a socket path may use (108 with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

mod request;
#[cfg(test)]
mod tests;

pub use request::{
    AttachRequest, ConsoleOutput, DEFAULT_BRIDGE, DmaSetting, NetOptions, random_mac,
};

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
        DeviceKind::Net => {
            let net = &req.net;
            let mac = net.mac.unwrap_or_else(request::random_mac);
            device_keys.push((bk::MAC, mac.to_string()));
            if let Some(mtu) = net.mtu {
                device_keys.push((bk::MTU, mtu.to_string()));
            }
            match &net.socket {
                Some(path) => {
                    let path = if local {
                        check_frame_socket(path)?
                    } else {
                        remote_path("frame socket", path, backend)?
                    };
                    device_keys
                        .push((bk::LINK, format!("socket:{}", utf8("frame socket", &path)?)));
                }
                None => {
                    let bridge = net
                        .bridge
                        .clone()
                        .unwrap_or_else(|| DEFAULT_BRIDGE.to_owned());
                    if local && !xenvirtio_tap::is_bridge(&bridge) {
                        let what = if xenvirtio_tap::exists(&bridge) {
                            "is not a bridge"
                        } else {
                            "does not exist"
                        };
                        return Err(AdminError::BadNetOption {
                            option: "--bridge",
                            reason: format!(
                                "{bridge} {what} in this domain (create it with 'ip link add \
                                 {bridge} type bridge', or name another with --bridge)"
                            ),
                        });
                    }
                    device_keys.push((bk::LINK, "tap".to_owned()));
                    device_keys.push((bk::BRIDGE, bridge));
                    if let Some(name) = &net.vifname {
                        device_keys.push((bk::VIFNAME, name.clone()));
                    }
                }
            }
        }
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
/// A frame socket must be listening already (the backend connects to it when it opens the
/// device): a path that is no socket is refused now.
fn check_frame_socket(path: &Path) -> Result<PathBuf, AdminError> {
    let path = absolute_here(path).map_err(|_| AdminError::BadNetOption {
        option: "--socket",
        reason: format!("cannot make {} absolute", path.display()),
    })?;
    let is_socket = std::fs::metadata(&path).map(|m| m.file_type().is_socket());
    if !matches!(is_socket, Ok(true)) {
        return Err(AdminError::BadNetOption {
            option: "--socket",
            reason: format!(
                "{} is not a listening unix socket (start the switch that listens there first)",
                path.display()
            ),
        });
    }
    Ok(path)
}

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
