//! Grants out through `/dev/xen/gntalloc`.
//!
//! `IOCTL_GNTALLOC_ALLOC_GREF` allocates zeroed pages, grants them to one domain and returns
//! their refs and a file offset; `mmap` of the device at that offset gives this process its own
//! view. Releasing is `munmap` plus `IOCTL_GNTALLOC_DEALLOC_GREF`; the kernel keeps a page that
//! the peer still maps until the peer unmaps it.

use std::mem::offset_of;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::XenError;
use crate::error::os_error;
use crate::linux::{GNTALLOC_PATH, ioctl, open_device};
use crate::mem::{PAGE_SIZE, SharedMem};
use crate::mmap::MmapRegion;
use crate::platform::{Access, DomId, GrantAllocator, GrantRef, GrantedPages, UnmapNotify};
use crate::sys::{self, FlexBuf, GntallocAllocGref, GntallocDeallocGref, UnmapNotifyArg};

/// An open `/dev/xen/gntalloc`.
#[derive(Debug)]
pub struct LinuxGrantAllocator {
    dev: Arc<OwnedFd>,
}

impl LinuxGrantAllocator {
    pub(crate) fn open() -> Result<Self, XenError> {
        Ok(Self {
            dev: Arc::new(open_device(GNTALLOC_PATH, "xen-gntalloc", 0)?),
        })
    }
}

/// `IOCTL_GNTALLOC_ALLOC_GREF`: returns the file offset and the refs.
fn alloc_gref(
    dev: &OwnedFd,
    peer: DomId,
    pages: usize,
    access: Access,
) -> std::io::Result<(u64, Vec<GrantRef>)> {
    let count = u32::try_from(pages).map_err(|_| os_error(libc::E2BIG))?;
    let header = GntallocAllocGref {
        domid: peer,
        flags: if access.writable() {
            sys::GNTALLOC_FLAG_WRITABLE
        } else {
            0
        },
        count,
        index: 0,
        gref_ids: [0],
    };
    let mut buf = FlexBuf::<GntallocAllocGref, u32>::new(
        header,
        offset_of!(GntallocAllocGref, gref_ids),
        pages,
    );
    // SAFETY: buf holds an ioctl_gntalloc_alloc_gref followed by room for `count` gref_ids
    // (at least the full 24-byte struct), which is what the kernel reads and writes.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTALLOC_ALLOC_GREF,
            buf.as_mut_ptr(),
        )
    }?;
    let refs = (0..pages).map(|i| buf.get(i).unwrap_or_default()).collect();
    Ok((buf.header().index, refs))
}

/// `IOCTL_GNTALLOC_DEALLOC_GREF`.
fn dealloc_gref(dev: &OwnedFd, index: u64, count: u32) -> std::io::Result<()> {
    let mut arg = GntallocDeallocGref { index, count };
    // SAFETY: arg is an ioctl_gntalloc_dealloc_gref, which the kernel only reads.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTALLOC_DEALLOC_GREF,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY` at byte `index` of the device file.
fn set_unmap_notify(dev: &OwnedFd, index: u64, action: u32, port: u32) -> std::io::Result<()> {
    let mut arg = UnmapNotifyArg {
        index,
        action,
        event_channel_port: port,
    };
    // SAFETY: arg is an ioctl_gntalloc_unmap_notify, which the kernel only reads.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// The allocation itself: deallocated on drop (after the mapping, see [`LinuxGrant`]).
#[derive(Debug)]
struct GntallocSlot {
    dev: Arc<OwnedFd>,
    index: u64,
    count: u32,
}

impl Drop for GntallocSlot {
    fn drop(&mut self) {
        if let Err(e) = dealloc_gref(&self.dev, self.index, self.count) {
            tracing::error!(error = %e, index = self.index, count = self.count,
                "IOCTL_GNTALLOC_DEALLOC_GREF failed; the grants stay allocated");
        }
    }
}

/// Pages granted to a peer through gntalloc. Dropping the value unmaps this process's view and
/// then deallocates the grants.
#[derive(Debug)]
pub struct LinuxGrant {
    // Field order is drop order: munmap first, then IOCTL_GNTALLOC_DEALLOC_GREF.
    region: MmapRegion,
    slot: GntallocSlot,
    refs: Vec<GrantRef>,
    peer: DomId,
    /// The page whose notification is armed, to disarm it when another page is chosen.
    notify_page: Option<usize>,
}

impl LinuxGrant {
    /// The domain the pages are granted to.
    pub fn peer(&self) -> DomId {
        self.peer
    }
}

impl GrantAllocator for LinuxGrantAllocator {
    type Grant = LinuxGrant;

    fn grant(&self, peer: DomId, pages: usize, access: Access) -> Result<LinuxGrant, XenError> {
        if pages == 0 {
            return Err(XenError::Invalid {
                what: "grant request".into(),
                why: "zero pages".into(),
            });
        }
        let (index, refs) =
            alloc_gref(&self.dev, peer, pages, access).map_err(|source| XenError::Grant {
                peer,
                pages,
                source,
            })?;
        let slot = GntallocSlot {
            dev: Arc::clone(&self.dev),
            index,
            count: u32::try_from(pages).unwrap_or(u32::MAX),
        };
        // gntalloc refuses private mappings; our own view is always read-write.
        let region = MmapRegion::map_shared(self.dev.as_fd(), pages * PAGE_SIZE, index, true)
            .map_err(|source| XenError::Mmap {
                device: GNTALLOC_PATH,
                pages,
                source,
            })?;
        tracing::debug!(peer, pages, first_ref = refs[0], ?access, "granted pages");
        Ok(LinuxGrant {
            region,
            slot,
            refs,
            peer,
            notify_page: None,
        })
    }
}

impl GrantedPages for LinuxGrant {
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }

    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError> {
        let (action, offset) = notify_action(notify, self.region.len())?;
        let page = offset / PAGE_SIZE;
        let port = notify.event.unwrap_or(0);
        let fail = |source| XenError::Port {
            op: "gntalloc unmap notify",
            port,
            source,
        };
        // gntalloc keeps one notification per page: disarm the old page if it moves.
        if let Some(old) = self.notify_page.filter(|&p| p != page) {
            set_unmap_notify(
                &self.slot.dev,
                self.slot.index + (old * PAGE_SIZE) as u64,
                0,
                0,
            )
            .map_err(fail)?;
            self.notify_page = None;
        }
        set_unmap_notify(
            &self.slot.dev,
            self.slot.index + offset as u64,
            action,
            port,
        )
        .map_err(fail)?;
        self.notify_page = (action != 0).then_some(page);
        Ok(())
    }
}

/// The `action` bits and the byte offset of an [`UnmapNotify`] over `len` bytes.
pub(crate) fn notify_action(notify: UnmapNotify, len: usize) -> Result<(u32, usize), XenError> {
    let mut action = 0;
    if let Some(off) = notify.clear_byte {
        if off >= len {
            return Err(XenError::Invalid {
                what: "unmap notification".into(),
                why: format!("byte {off} is outside the {len} mapped bytes"),
            });
        }
        action |= sys::UNMAP_NOTIFY_CLEAR_BYTE;
    }
    if notify.event.is_some() {
        action |= sys::UNMAP_NOTIFY_SEND_EVENT;
    }
    Ok((action, notify.clear_byte.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_actions_follow_the_uapi() {
        let n = UnmapNotify {
            clear_byte: Some(4097),
            event: Some(5),
        };
        assert_eq!(notify_action(n, 8192).unwrap(), (3, 4097));
        let n = UnmapNotify {
            clear_byte: None,
            event: Some(5),
        };
        assert_eq!(notify_action(n, 4096).unwrap(), (2, 0));
        assert_eq!(notify_action(UnmapNotify::default(), 4096).unwrap(), (0, 0));
        let n = UnmapNotify {
            clear_byte: Some(4096),
            event: None,
        };
        assert!(matches!(
            notify_action(n, 4096),
            Err(XenError::Invalid { .. })
        ));
    }
}
