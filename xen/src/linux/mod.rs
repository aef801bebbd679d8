//! The platform over the Linux Xen devices: `/dev/xen/gntalloc` (grants out), `/dev/xen/gntdev`
//! (grants in and grant copy), `/dev/xen/evtchn` (event channels), `/dev/xen/privcmd` (foreign
//! mapping, and one device-model operation: the IOREQ-server probe), plus pinned memory read
//! from `/proc/self/pagemap` for the `direct` strategy.
//!
//! Every ioctl sits in a small safe function next to the type that uses it, and every mapping in
//! a RAII type whose fields drop in the order the kernel needs (for instance a gntdev mapping is
//! `munmap`ed before its `IOCTL_GNTDEV_UNMAP_GRANT_REF`). Opening a device that is missing fails
//! with [`XenError::Open`], which names the path and the kernel module that provides it. This
//! module never interprets the memory it maps.
//!
//! The numbers and layouts come from `crate::sys`, checked by unit tests against the Linux UAPI
//! headers; the behaviour follows the kernel drivers and what was measured on Xen 4.17 (see
//! `shared/xen-qemu/README.md`): `PRIVCMD_MMAPBATCH_V2` can return 0 with errors in `err[]`,
//! so `err[]` is always inspected.

mod dmop;
mod evtchn;
mod gntalloc;
mod gntdev;
mod pinned;
mod privcmd;

use std::ffi::{c_int, c_void};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

pub use dmop::{IoreqProbe, probe_ioreq_server};
pub use evtchn::LinuxEvents;
pub use gntalloc::{LinuxGrant, LinuxGrantAllocator};
pub use gntdev::{LinuxGrantMapper, LinuxGrantMapping};
pub use pinned::{LinuxPinned, LinuxPinnedAllocator, PinnedBacking};
pub use privcmd::{LinuxForeignMapper, LinuxForeignMapping};

use crate::XenError;
use crate::platform::{DomId, Platform};

pub(crate) const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";
pub(crate) const GNTDEV_PATH: &str = "/dev/xen/gntdev";
pub(crate) const EVTCHN_PATH: &str = "/dev/xen/evtchn";
pub(crate) const PRIVCMD_PATH: &str = "/dev/xen/privcmd";
/// Where privcmd lives on kernels (or setups) without `/dev/xen/privcmd`: xenfs.
pub(crate) const PRIVCMD_XENFS_PATH: &str = "/proc/xen/privcmd";

/// The Linux Xen devices, acting as domain `domid`.
///
/// The value is only a recipe: each `Platform` method opens its device afresh, so each
/// allocator, mapper or event-channel handle has a file descriptor of its own, and everything
/// it hands out keeps that descriptor alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxXen {
    domid: DomId,
}

impl LinuxXen {
    /// The devices of this domain, whose id the caller has read from xenstore (`domid`).
    pub fn new(domid: DomId) -> Self {
        Self { domid }
    }
}

impl Platform for LinuxXen {
    type GrantAlloc = LinuxGrantAllocator;
    type GrantMap = LinuxGrantMapper;
    type Events = LinuxEvents;
    type Foreign = LinuxForeignMapper;
    type Pinned = LinuxPinnedAllocator;

    fn domid(&self) -> DomId {
        self.domid
    }

    fn grant_allocator(&self) -> Result<LinuxGrantAllocator, XenError> {
        LinuxGrantAllocator::open()
    }

    fn grant_mapper(&self) -> Result<LinuxGrantMapper, XenError> {
        LinuxGrantMapper::open()
    }

    fn event_channels(&self) -> Result<LinuxEvents, XenError> {
        LinuxEvents::open()
    }

    fn foreign_mapper(&self) -> Result<LinuxForeignMapper, XenError> {
        LinuxForeignMapper::open()
    }

    fn pinned_allocator(&self) -> Result<LinuxPinnedAllocator, XenError> {
        Ok(LinuxPinnedAllocator::new())
    }
}

/// Opens a Xen device read-write and close-on-exec, plus `extra_flags` (e.g. `O_NONBLOCK`).
pub(crate) fn open_device(
    path: &'static str,
    module: &'static str,
    extra_flags: c_int,
) -> Result<OwnedFd, XenError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | extra_flags)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| XenError::Open {
            path,
            module,
            source,
        })
}

/// `ioctl(fd, request, arg)`, returning the non-negative result or the OS error.
///
/// # Safety
/// `arg` must point to memory laid out as `request` expects (the `crate::sys` struct it was
/// computed from, with any trailing array as long as its count says), readable and writable for
/// as many bytes as the kernel copies in and out, and every pointer inside it must be valid for
/// what the kernel does through it.
pub(crate) unsafe fn ioctl(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: *mut c_void,
) -> io::Result<c_int> {
    // The request type is `unsigned long` in glibc and `int` in musl; the numbers used here
    // are below 2^31, so both conversions keep the value.
    // SAFETY: the caller guarantees that `arg` matches `request` (this function's contract).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::Platform;

    /// On a host without Xen the devices are missing; the error names the path and the module.
    #[test]
    fn missing_devices_give_a_clear_error() {
        if std::path::Path::new("/dev/xen").exists() {
            return; // running on Xen: nothing to check here
        }
        let xen = LinuxXen::new(0);
        assert_eq!(xen.domid(), 0);
        let cases = [
            (xen.grant_allocator().err(), GNTALLOC_PATH, "xen-gntalloc"),
            (xen.grant_mapper().err(), GNTDEV_PATH, "xen-gntdev"),
            (xen.event_channels().err(), EVTCHN_PATH, "xen-evtchn"),
            (xen.foreign_mapper().err(), PRIVCMD_PATH, "xen-privcmd"),
        ];
        for (err, path, module) in cases {
            let err = err.expect("no /dev/xen here, so opening must fail");
            let msg = err.to_string();
            assert!(msg.contains(path), "{msg}");
            assert!(msg.contains(module), "{msg}");
            assert!(matches!(err, XenError::Open { .. }), "{err:?}");
            assert_eq!(err.errno(), Some(libc::ENOENT));
        }
    }
}
