//! Grants in through `/dev/xen/gntdev`: batch mapping and grant copy.
//!
//! `IOCTL_GNTDEV_MAP_GRANT_REF` only records the refs and returns a file offset; the hypercall
//! happens at `mmap` of the device at that offset, which is why a bad ref shows up as a failed
//! `mmap` (EINVAL). A mapping without `PROT_WRITE` is a read-only grant mapping
//! (`GNTMAP_readonly`), the only kind a read-only grant allows. Releasing is `munmap` first, then
//! `IOCTL_GNTDEV_UNMAP_GRANT_REF`, as the header requires.
//!
//! `IOCTL_GNTDEV_GRANT_COPY` copies between grant refs and local buffers without mapping them;
//! the kernel reports a status per segment.

use std::ffi::c_void;
use std::mem::offset_of;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::error::os_error;
use crate::linux::gntalloc::notify_action;
use crate::linux::{GNTDEV_PATH, ioctl, open_device};
use crate::mem::{PAGE_SIZE, SharedMem};
use crate::mmap::MmapRegion;
use crate::platform::{
    Access, DomId, GrantCopy, GrantMapper, GrantMapping, GrantRef, MappedPages, UnmapNotify,
    validate_copy,
};
use crate::sys::{
    self, FlexBuf, GntdevCopyForeign, GntdevCopyPtr, GntdevGrantCopy, GntdevGrantCopySegment,
    GntdevGrantRef, GntdevMapGrantRef, GntdevUnmapGrantRef, UnmapNotifyArg,
};
use crate::{GrantStatus, XenError};

/// Segments per `IOCTL_GNTDEV_GRANT_COPY`: bounds the kernel's work per call and the size of
/// the segment array built here.
const COPY_BATCH: usize = 128;

/// An open `/dev/xen/gntdev`.
#[derive(Debug)]
pub struct LinuxGrantMapper {
    dev: Arc<OwnedFd>,
}

impl LinuxGrantMapper {
    pub(crate) fn open() -> Result<Self, XenError> {
        Ok(Self {
            dev: Arc::new(open_device(GNTDEV_PATH, "xen-gntdev", 0)?),
        })
    }
}

/// `IOCTL_GNTDEV_MAP_GRANT_REF`: returns the file offset to mmap.
fn map_grant_ref(dev: &OwnedFd, peer: DomId, refs: &[GrantRef]) -> std::io::Result<u64> {
    let count = u32::try_from(refs.len()).map_err(|_| os_error(libc::E2BIG))?;
    let header = GntdevMapGrantRef {
        count,
        ..Default::default()
    };
    let mut buf = FlexBuf::<GntdevMapGrantRef, GntdevGrantRef>::new(
        header,
        offset_of!(GntdevMapGrantRef, refs),
        refs.len(),
    );
    for (i, &gref) in refs.iter().enumerate() {
        buf.set(
            i,
            GntdevGrantRef {
                domid: u32::from(peer),
                gref,
            },
        );
    }
    // SAFETY: buf holds an ioctl_gntdev_map_grant_ref whose refs[] has `count` entries, the
    // bytes the kernel reads; it writes back only the fixed part (index).
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTDEV_MAP_GRANT_REF,
            buf.as_mut_ptr(),
        )
    }?;
    Ok(buf.header().index)
}

/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
fn unmap_grant_ref(dev: &OwnedFd, index: u64, count: u32) -> std::io::Result<()> {
    let mut arg = GntdevUnmapGrantRef {
        index,
        count,
        pad: 0,
    };
    // SAFETY: arg is an ioctl_gntdev_unmap_grant_ref, which the kernel only reads.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTDEV_UNMAP_GRANT_REF,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY` at byte `index` of the device file.
fn set_unmap_notify(dev: &OwnedFd, index: u64, action: u32, port: u32) -> std::io::Result<()> {
    let mut arg = UnmapNotifyArg {
        index,
        action,
        event_channel_port: port,
    };
    // SAFETY: arg is an ioctl_gntdev_unmap_notify, which the kernel only reads.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// `IOCTL_GNTDEV_GRANT_COPY` over `segs`; the kernel fills in each `status`.
///
/// # Safety
/// Every local (`virt`) pointer in `segs` must be valid for `len` bytes: readable where it is the
/// source, writable (and not aliased by any Rust reference in use) where it is the destination.
unsafe fn grant_copy(dev: &OwnedFd, segs: &mut [GntdevGrantCopySegment]) -> std::io::Result<()> {
    let count = u32::try_from(segs.len()).map_err(|_| os_error(libc::E2BIG))?;
    let mut arg = GntdevGrantCopy {
        count,
        segments: segs.as_mut_ptr(),
    };
    // SAFETY: arg points at `count` segments; their local buffers are valid per this function's
    // contract; the kernel writes only the status fields of the segments.
    unsafe {
        ioctl(
            dev.as_fd(),
            sys::IOCTL_GNTDEV_GRANT_COPY,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// The grant-table slot of a mapping: released on drop (after the munmap, see
/// [`LinuxGrantMapping`]).
#[derive(Debug)]
struct GntdevSlot {
    dev: Arc<OwnedFd>,
    index: u64,
    count: u32,
}

impl Drop for GntdevSlot {
    fn drop(&mut self) {
        if let Err(e) = unmap_grant_ref(&self.dev, self.index, self.count) {
            tracing::error!(error = %e, index = self.index, count = self.count,
                "IOCTL_GNTDEV_UNMAP_GRANT_REF failed; the grant slots stay allocated");
        }
    }
}

/// A batch of a peer's grants mapped contiguously. Dropping it unmaps the pages, then releases
/// the slot.
#[derive(Debug)]
pub struct LinuxGrantMapping {
    // Field order is drop order: munmap first, then IOCTL_GNTDEV_UNMAP_GRANT_REF.
    region: MmapRegion,
    slot: GntdevSlot,
    peer: DomId,
}

impl LinuxGrantMapping {
    /// The granting domain.
    pub fn peer(&self) -> DomId {
        self.peer
    }
}

impl MappedPages for LinuxGrantMapping {
    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }
}

impl GrantMapping for LinuxGrantMapping {
    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError> {
        let (action, offset) = notify_action(notify, self.region.len())?;
        if notify.clear_byte.is_some() && !self.region.mem().is_writable() {
            return Err(XenError::Invalid {
                what: "unmap notification".into(),
                why: "clearing a byte needs a read-write mapping".into(),
            });
        }
        let port = notify.event.unwrap_or(0);
        set_unmap_notify(
            &self.slot.dev,
            self.slot.index + offset as u64,
            action,
            port,
        )
        .map_err(|source| XenError::Port {
            op: "gntdev unmap notify",
            port,
            source,
        })
    }
}

impl GrantMapper for LinuxGrantMapper {
    type Mapping = LinuxGrantMapping;

    fn map(
        &self,
        peer: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<LinuxGrantMapping, XenError> {
        let Some(&first_ref) = refs.first() else {
            return Err(XenError::Invalid {
                what: "grant map".into(),
                why: "no refs".into(),
            });
        };
        let count = refs.len();
        let fail = |source| XenError::MapGrants {
            peer,
            count,
            first_ref,
            source,
        };
        let index = map_grant_ref(&self.dev, peer, refs).map_err(fail)?;
        let slot = GntdevSlot {
            dev: Arc::clone(&self.dev),
            index,
            count: u32::try_from(count).unwrap_or(u32::MAX),
        };
        // The grant hypercall happens here; PROT_READ alone maps with GNTMAP_readonly.
        let region = MmapRegion::map_shared(
            self.dev.as_fd(),
            count * PAGE_SIZE,
            index,
            access.writable(),
        )
        .map_err(fail)?;
        Ok(LinuxGrantMapping { region, slot, peer })
    }

    fn copy(&self, segments: &mut [GrantCopy<'_>]) -> Result<Vec<Result<(), XenError>>, XenError> {
        validate_copy(segments)?;
        let mut results = Vec::with_capacity(segments.len());
        for chunk in segments.chunks_mut(COPY_BATCH) {
            let mut raw: Vec<GntdevGrantCopySegment> = chunk.iter_mut().map(raw_segment).collect();
            // SAFETY: each virt pointer comes from a slice borrowed (mutably for destinations)
            // from `chunk` for this whole call, with `len` equal to the slice's length.
            unsafe { grant_copy(&self.dev, &mut raw) }.map_err(|source| XenError::Ioctl {
                device: GNTDEV_PATH,
                ioctl: "IOCTL_GNTDEV_GRANT_COPY",
                source,
            })?;
            for (seg, r) in chunk.iter().zip(&raw) {
                let (peer, gref) = seg.target();
                results.push(match GrantStatus::from_raw(r.status) {
                    GrantStatus::Okay => Ok(()),
                    status => Err(XenError::CopySegment { peer, gref, status }),
                });
            }
        }
        Ok(results)
    }
}

/// The kernel's form of one segment. The length fits in u16 because `validate_copy` bounded it
/// by the page size.
fn raw_segment(seg: &mut GrantCopy<'_>) -> GntdevGrantCopySegment {
    let foreign = |peer: DomId, gref: GrantRef, offset: u16| GntdevCopyPtr {
        foreign: GntdevCopyForeign {
            gref,
            offset,
            domid: peer,
        },
    };
    match seg {
        GrantCopy::FromGrant {
            peer,
            gref,
            offset,
            dst,
        } => GntdevGrantCopySegment {
            source: foreign(*peer, *gref, *offset),
            dest: GntdevCopyPtr {
                virt: dst.as_mut_ptr().cast::<c_void>(),
            },
            len: u16::try_from(dst.len()).unwrap_or(0),
            flags: sys::GNTCOPY_SOURCE_GREF,
            status: GrantStatus::GeneralError.raw(),
        },
        GrantCopy::ToGrant {
            peer,
            gref,
            offset,
            src,
        } => GntdevGrantCopySegment {
            // The kernel only reads the source; the union field is a mutable pointer in C.
            source: GntdevCopyPtr {
                virt: src.as_ptr().cast_mut().cast::<c_void>(),
            },
            dest: foreign(*peer, *gref, *offset),
            len: u16::try_from(src.len()).unwrap_or(0),
            flags: sys::GNTCOPY_DEST_GREF,
            status: GrantStatus::GeneralError.raw(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_segments_are_encoded_like_the_uapi() {
        let mut dst = [0u8; 16];
        let src = [1u8; 8];
        let mut segs = [
            GrantCopy::FromGrant {
                peer: 3,
                gref: 77,
                offset: 100,
                dst: &mut dst,
            },
            GrantCopy::ToGrant {
                peer: 4,
                gref: 78,
                offset: 4088,
                src: &src,
            },
        ];
        validate_copy(&segs).unwrap();
        let a = raw_segment(&mut segs[0]);
        assert_eq!(a.flags, sys::GNTCOPY_SOURCE_GREF);
        assert_eq!(a.len, 16);
        // SAFETY: reading the union member that raw_segment wrote (a test).
        let f = unsafe { a.source.foreign };
        assert_eq!((f.gref, f.offset, f.domid), (77, 100, 3));
        let b = raw_segment(&mut segs[1]);
        assert_eq!(b.flags, sys::GNTCOPY_DEST_GREF);
        // SAFETY: as above: the member raw_segment wrote.
        let f = unsafe { b.dest.foreign };
        assert_eq!((f.gref, f.offset, f.domid), (78, 4088, 4));
        // SAFETY: as above: the member raw_segment wrote.
        assert_eq!(unsafe { b.source.virt }.cast_const(), src.as_ptr().cast());
    }

    #[test]
    fn a_segment_crossing_its_page_is_refused() {
        let src = [0u8; 9];
        let segs = [GrantCopy::ToGrant {
            peer: 1,
            gref: 1,
            offset: 4088,
            src: &src,
        }];
        let err = validate_copy(&segs).unwrap_err();
        assert!(err.to_string().contains("segment 0"), "{err}");
        let big = vec![0u8; PAGE_SIZE + 1];
        let segs = [GrantCopy::ToGrant {
            peer: 1,
            gref: 1,
            offset: 0,
            src: &big,
        }];
        assert!(validate_copy(&segs).is_err());
    }
}
