//! What a toolstack does for a test: create both directories of a device with the permissions
//! of `docs/PROTOCOL.md` 2.1, and ask for its removal the way `detach` and libxl do.
//!
//! This is not `xenvirtio-backend attach`: it exists so the backend's tests need nothing
//! outside this crate, and it writes exactly the keys section 2 says the toolstack writes.

use std::path::PathBuf;

use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::protocol::{self, backend_keys as bk, frontend_keys as fk};
use xenvirtio_xen::DomId;
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{Perm, XenStore, XsError, transaction};

/// A device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestDevice {
    /// The device type.
    pub kind: DeviceKind,
    /// blk: the image.
    pub image: Option<PathBuf>,
    /// blk: `mode = r`.
    pub read_only: bool,
    /// blk: `requested-queues`.
    pub queues: Option<u32>,
    /// `dma` (`auto` when `None`).
    pub dma: Option<String>,
    /// `grant_usage`.
    pub grant_usage: bool,
    /// console: the `console` value (`pty` when `None`).
    pub console: Option<String>,
    /// net: `mac`, `mtu` and `link` (other keys for net are the tests' own).
    pub net: Option<(String, Option<u16>, String)>,
}

impl TestDevice {
    fn new(kind: DeviceKind) -> Self {
        Self {
            kind,
            image: None,
            read_only: false,
            queues: None,
            dma: None,
            grant_usage: true,
            console: None,
            net: None,
        }
    }

    /// A blk device over `image`.
    pub fn blk(image: impl Into<PathBuf>) -> Self {
        Self {
            image: Some(image.into()),
            ..Self::new(DeviceKind::Block)
        }
    }

    /// A console on a pty.
    pub fn console() -> Self {
        Self::new(DeviceKind::Console)
    }

    /// An rng.
    pub fn rng() -> Self {
        Self::new(DeviceKind::Rng)
    }

    /// A net device with `mac`, whose frames go to the `SOCK_SEQPACKET` socket at `socket`.
    pub fn net(mac: &str, socket: &std::path::Path) -> Self {
        Self {
            net: Some((mac.to_owned(), None, format!("socket:{}", socket.display()))),
            ..Self::new(DeviceKind::Net)
        }
    }

    /// With `mtu` (net).
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        if let Some(n) = &mut self.net {
            n.1 = Some(mtu);
        }
        self
    }

    /// With `grant_usage = 0` (what `direct` needs).
    pub fn without_grant_usage(mut self) -> Self {
        self.grant_usage = false;
        self
    }

    /// With `dma` pinned.
    pub fn with_dma(mut self, dma: &str) -> Self {
        self.dma = Some(dma.to_owned());
        self
    }

    /// With `requested-queues`.
    pub fn with_queues(mut self, n: u32) -> Self {
        self.queues = Some(n);
        self
    }

    /// Read-only (`mode = r`).
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// With `console = <value>` (e.g. `socket:/path`).
    pub fn with_console(mut self, value: &str) -> Self {
        self.console = Some(value.to_owned());
        self
    }
}

/// Creates both directories of device `devid` of `frontend`, served by `backend`, in one
/// transaction, as the toolstack does (section 2.1). `store` must be privileged (Dom0).
pub fn attach(
    store: &dyn XenStore,
    backend: DomId,
    frontend: DomId,
    devid: u32,
    dev: &TestDevice,
) -> Result<(), XsError> {
    let bdir = xenbus::backend_dir(backend, frontend, devid);
    let fdir = xenbus::frontend_dir(frontend, devid);
    let (bperms, fperms) = if backend == frontend {
        (vec![Perm::owner(backend)], vec![Perm::owner(frontend)])
    } else {
        (
            vec![Perm::owner(backend), Perm::read(frontend)],
            vec![Perm::owner(frontend), Perm::read(backend)],
        )
    };
    transaction(store, 16, |tx| {
        store.mkdir(tx, &bdir)?;
        store.set_perms(tx, &bdir, &bperms)?;
        store.mkdir(tx, &fdir)?;
        store.set_perms(tx, &fdir, &fperms)?;
        let b = |k: &str, v: &str| store.write_str(tx, &format!("{bdir}/{k}"), v);
        b(bk::FRONTEND, &fdir)?;
        b(bk::FRONTEND_ID, &frontend.to_string())?;
        b(bk::ONLINE, "1")?;
        b(bk::TYPE, &dev.kind.type_string())?;
        b(bk::TRANSPORT, protocol::TRANSPORT)?;
        b(bk::GRANT_USAGE, if dev.grant_usage { "1" } else { "0" })?;
        b(bk::DMA, dev.dma.as_deref().unwrap_or("auto"))?;
        if let Some(image) = &dev.image {
            b(bk::PARAMS, &image.display().to_string())?;
            b(bk::MODE, if dev.read_only { "r" } else { "w" })?;
        }
        if let Some(q) = dev.queues {
            b(bk::REQUESTED_QUEUES, &q.to_string())?;
        }
        if dev.kind == DeviceKind::Console {
            b(bk::CONSOLE, dev.console.as_deref().unwrap_or("pty"))?;
        }
        if let Some((mac, mtu, link)) = &dev.net {
            b(bk::MAC, mac)?;
            b(bk::LINK, link)?;
            if let Some(mtu) = mtu {
                b(bk::MTU, &mtu.to_string())?;
            }
        }
        b(bk::STATE, &XenbusState::Initialising.value().to_string())?;
        let f = |k: &str, v: &str| store.write_str(tx, &format!("{fdir}/{k}"), v);
        f(fk::BACKEND, &bdir)?;
        f(fk::BACKEND_ID, &backend.to_string())?;
        f(fk::STATE, &XenbusState::Initialising.value().to_string())
    })
}

/// Asks the backend to remove the device: `online = 0` and `state = 5`, in one transaction,
/// as `detach` and libxl do (section 8.3).
pub fn request_removal(
    store: &dyn XenStore,
    backend: DomId,
    frontend: DomId,
    devid: u32,
) -> Result<(), XsError> {
    let bdir = xenbus::backend_dir(backend, frontend, devid);
    transaction(store, 16, |tx| {
        store.write_str(tx, &format!("{bdir}/{}", bk::ONLINE), "0")?;
        store.write_str(
            tx,
            &xenbus::state_path(&bdir),
            &XenbusState::Closing.value().to_string(),
        )
    })
}

/// Removes both directories (the end of a detach).
pub fn remove(
    store: &dyn XenStore,
    backend: DomId,
    frontend: DomId,
    devid: u32,
) -> Result<(), XsError> {
    let bdir = xenbus::backend_dir(backend, frontend, devid);
    let fdir = xenbus::frontend_dir(frontend, devid);
    transaction(store, 16, |tx| {
        store.rm(tx, &bdir)?;
        store.rm(tx, &fdir)
    })
}
