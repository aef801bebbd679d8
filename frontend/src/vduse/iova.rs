//! The device's view of VDUSE's IOVA domain: the regions the kernel's driver maps for DMA (its
//! rings, and the bounce pages of every buffer), each `mmap`ed from the file that
//! `VDUSE_IOTLB_GET_FD` returns, on first use, and dropped when the kernel says the mapping
//! changed (`VDUSE_UPDATE_IOTLB`).
//!
//! The driver is this domain's own kernel, but its memory changes under the device as any
//! shared memory does: every access goes through [`SharedMem`], never a Rust reference.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use xenvirtio_xen::mem::SharedMem;

use super::VduseError;
use super::device::{IotlbRegion, VduseDevice};

/// One mapped IOVA region `[start, last]`.
#[derive(Debug)]
pub struct Region {
    start: u64,
    last: u64,
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory that every access reaches through SharedMem's copies and
// atomics; nothing in Region is tied to the thread that mapped it.
unsafe impl Send for Region {}
// SAFETY: as for Send: Region hands out only SharedMem windows, which tolerate concurrent use.
unsafe impl Sync for Region {}

impl Region {
    fn map(r: &IotlbRegion) -> Result<Region, VduseError> {
        let len = r
            .last
            .checked_sub(r.start)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| VduseError::Spec {
                why: format!(
                    "IOVA region [{:#x}, {:#x}] is empty or too large",
                    r.start, r.last
                ),
            })?;
        let offset = libc::off_t::try_from(r.offset).map_err(|_| VduseError::Spec {
            why: format!("IOVA region offset {:#x} does not fit off_t", r.offset),
        })?;
        let mut prot = 0;
        if r.readable {
            prot |= libc::PROT_READ;
        }
        if r.writable {
            prot |= libc::PROT_WRITE | libc::PROT_READ;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of `len` bytes of the region's file at its offset, at
        // an address the kernel picks: it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                r.fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VduseError::Io {
                what: "mmap of a VDUSE IOVA region",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Region {
            start: r.start,
            last: r.last,
            ptr: NonNull::new(p.cast()).expect("mmap does not return NULL on success"),
            len,
            writable: r.writable,
        })
    }

    fn contains(&self, iova: u64, len: u64) -> bool {
        iova >= self.start
            && len > 0
            && iova
                .checked_add(len - 1)
                .is_some_and(|end| end <= self.last)
    }

    fn overlaps(&self, start: u64, last: u64) -> bool {
        start <= self.last && last >= self.start
    }

    /// The window `[iova, iova + len)` of this region.
    ///
    /// # Panics
    /// If the window is not inside the region ([`IovaMap::region`] returns a region that holds
    /// the range asked for).
    pub fn window(&self, iova: u64, len: usize) -> SharedMem<'_> {
        let off = iova
            .checked_sub(self.start)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o.checked_add(len).is_some_and(|end| end <= self.len))
            .unwrap_or_else(|| {
                panic!(
                    "window of {len} bytes at IOVA {iova:#x} outside the region [{:#x}, {:#x}]",
                    self.start, self.last
                )
            });
        // SAFETY: [off, off + len) lies inside the mapping (checked just above), which stays
        // mapped for as long as `self` lives: the window borrows `self`.
        unsafe {
            SharedMem::from_raw_parts(
                NonNull::new_unchecked(self.ptr.as_ptr().add(off)),
                len,
                self.writable,
            )
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr and len are the mapping made in `map`, and no window of it is alive (they
        // borrow the Region).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The regions mapped so far.
#[derive(Debug, Default)]
pub struct IovaMap {
    regions: Mutex<Vec<Arc<Region>>>,
}

impl IovaMap {
    /// The region that holds all of `[iova, iova + len)`, mapped from `dev` if it was not yet.
    /// A buffer that spans two regions is refused.
    pub fn region(
        &self,
        dev: &VduseDevice,
        iova: u64,
        len: u64,
    ) -> Result<Arc<Region>, VduseError> {
        let mut regions = self.regions.lock().expect("IOVA map poisoned");
        if let Some(r) = regions.iter().find(|r| r.contains(iova, len)) {
            return Ok(Arc::clone(r));
        }
        let r = Arc::new(Region::map(&dev.iotlb_region(iova)?)?);
        if !r.contains(iova, len) {
            return Err(VduseError::Spec {
                why: format!(
                    "a buffer of {len} bytes at IOVA {iova:#x} is not inside one IOVA region \
                     (the one there is [{:#x}, {:#x}])",
                    r.start, r.last
                ),
            });
        }
        regions.push(Arc::clone(&r));
        Ok(r)
    }

    /// Forgets every region that overlaps `[start, last]`; a request still using one keeps it
    /// mapped until it is done.
    pub fn invalidate(&self, start: u64, last: u64) {
        self.regions
            .lock()
            .expect("IOVA map poisoned")
            .retain(|r| !r.overlaps(start, last));
    }

    /// Forgets every region.
    pub fn clear(&self) {
        self.regions.lock().expect("IOVA map poisoned").clear();
    }
}
