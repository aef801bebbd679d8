//! RAII mappings: every `mmap` this crate makes, for the Linux devices and for the loopback
//! platform, goes through [`MmapRegion`] or [`Reservation`], whose `Drop` unmaps.
//!
//! A region is only ever read or written through [`SharedMem`] windows borrowed from it, so the
//! borrow checker guarantees that no window outlives the mapping.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::mem::{PAGE_SIZE, SharedMem};

fn prot(writable: bool) -> c_int {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

fn offset_arg(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Calls `mmap(addr, len, prot, flags, fd, offset)` and turns `MAP_FAILED` into an error.
///
/// # Safety
/// With `MAP_FIXED` in `flags`, `[addr, addr + len)` must be a range this process owns and in
/// which nothing is borrowed: whatever was mapped there is replaced.
unsafe fn raw_mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> io::Result<NonNull<u8>> {
    // SAFETY: mmap itself is always safe to call; replacing an existing mapping with MAP_FIXED
    // is covered by this function's contract.
    let p = unsafe { libc::mmap(addr, len, prot, flags, fd, offset) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A mapping of whole pages, owned by this value and unmapped on drop.
#[derive(Debug)]
pub(crate) struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the region is owned memory; all access goes through SharedMem copies and atomics,
// which may come from any thread (the peer domain writes it concurrently anyway).
unsafe impl Send for MmapRegion {}
// SAFETY: as for Send.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// `mmap(NULL, len, PROT_READ[|PROT_WRITE], MAP_SHARED, fd, offset)`: the way pages of a
    /// Xen device (gntalloc, gntdev, privcmd) or of a memfd are brought into this process.
    pub(crate) fn map_shared(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: u64,
        writable: bool,
    ) -> io::Result<Self> {
        let offset = offset_arg(offset)?;
        // SAFETY: without MAP_FIXED the kernel picks a fresh range, so nothing is replaced.
        let ptr = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                len,
                prot(writable),
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        }?;
        Ok(Self { ptr, len, writable })
    }

    /// Private anonymous read-write memory, with `extra_flags` (e.g. `MAP_HUGETLB`) added to
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    pub(crate) fn anonymous(len: usize, extra_flags: c_int) -> io::Result<Self> {
        // SAFETY: no MAP_FIXED in the flags we pass (callers add only huge-page flags), so a
        // fresh range is chosen.
        let ptr = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                len,
                prot(true),
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | (extra_flags & !libc::MAP_FIXED),
                -1,
                0,
            )
        }?;
        Ok(Self {
            ptr,
            len,
            writable: true,
        })
    }

    /// The first byte.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A window onto the whole region.
    pub(crate) fn mem(&self) -> SharedMem<'_> {
        // SAFETY: the region stays mapped (readable, and writable if `writable`) for as long as
        // &self is borrowed; it is only accessed through SharedMem.
        unsafe { SharedMem::from_raw_parts(self.ptr, self.len, self.writable) }
    }

    /// A window onto the first `len` bytes (at most the whole region).
    pub(crate) fn mem_prefix(&self, len: usize) -> SharedMem<'_> {
        // SAFETY: as for `mem`, over a length clamped to the region.
        unsafe { SharedMem::from_raw_parts(self.ptr, len.min(self.len), self.writable) }
    }

    /// `madvise(2)` over the whole region.
    pub(crate) fn madvise(&self, advice: c_int) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping; the advices used here (DONTFORK,
        // NOHUGEPAGE) do not change its contents.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `mlock(2)` over the whole region (it is unlocked by the unmap on drop).
    pub(crate) fn mlock(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping; mlock does not change its contents.
        let rc = unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping owned by this value; no SharedMem window can
        // outlive &self, so nothing refers to it any more.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::error!(
                error = %io::Error::last_os_error(),
                len = self.len,
                "munmap failed; the pages stay mapped"
            );
        }
    }
}

/// An address range reserved with `PROT_NONE`, filled page by page with `MAP_FIXED` mappings
/// of files (so that pages of different files appear contiguous), then turned into an
/// [`MmapRegion`] once no hole is left.
#[derive(Debug)]
pub(crate) struct Reservation {
    region: MmapRegion,
    filled: Vec<bool>,
}

impl Reservation {
    /// Reserves `pages` pages of address space.
    pub(crate) fn new(pages: usize) -> io::Result<Self> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: no MAP_FIXED: a fresh range is chosen. PROT_NONE: nothing can read it yet.
        let ptr = unsafe {
            raw_mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        }?;
        Ok(Self {
            region: MmapRegion {
                ptr,
                len,
                writable: false,
            },
            filled: vec![false; pages],
        })
    }

    /// Maps `pages` pages of `fd` starting at `file_offset` over pages `first..first + pages`
    /// of the reservation, read-only or read-write.
    pub(crate) fn map_file(
        &mut self,
        first: usize,
        pages: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> io::Result<()> {
        let end = first.checked_add(pages).filter(|&e| e <= self.filled.len());
        let Some(end) = end else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let offset = offset_arg(file_offset)?;
        // SAFETY: [first, end) pages lie inside the reservation (checked), which this value
        // owns; no SharedMem exists yet (a Reservation hands none out), so replacing the pages
        // with MAP_FIXED cannot invalidate anything borrowed.
        unsafe {
            raw_mmap(
                self.region.ptr.as_ptr().add(first * PAGE_SIZE).cast(),
                pages * PAGE_SIZE,
                prot(writable),
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                offset,
            )
        }?;
        self.filled[first..end].fill(true);
        Ok(())
    }

    /// The finished region, writable or not; fails with `EFAULT` if a page was never mapped.
    pub(crate) fn finish(mut self, writable: bool) -> io::Result<MmapRegion> {
        if self.filled.iter().any(|f| !f) {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        self.region.writable = writable;
        Ok(self.region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn memfd(pages: usize) -> std::fs::File {
        let f = tempfile_like();
        f.set_len((pages * PAGE_SIZE) as u64).unwrap();
        f
    }

    fn tempfile_like() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "xenvirtio-mmap-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn reservation_stitches_file_pages_together() {
        let a = memfd(2);
        let b = memfd(2);
        let mut r = Reservation::new(3).unwrap();
        r.map_file(0, 1, a.as_fd(), PAGE_SIZE as u64, true).unwrap();
        assert!(
            r.map_file(2, 2, b.as_fd(), 0, true).is_err(),
            "past the end"
        );
        let r2 = {
            r.map_file(1, 2, b.as_fd(), 0, true).unwrap();
            r.finish(true).unwrap()
        };
        r2.mem().write(PAGE_SIZE - 2, b"abcd").unwrap();
        let mut buf = [0u8; 2];
        use std::os::unix::fs::FileExt;
        a.read_exact_at(&mut buf, 2 * PAGE_SIZE as u64 - 2).unwrap();
        assert_eq!(&buf, b"ab");
        b.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"cd");
    }

    #[test]
    fn a_hole_is_refused() {
        let a = memfd(1);
        let mut r = Reservation::new(2).unwrap();
        r.map_file(0, 1, a.as_fd(), 0, false).unwrap();
        assert_eq!(
            r.finish(false).unwrap_err().raw_os_error(),
            Some(libc::EFAULT)
        );
    }

    #[test]
    fn read_only_shared_mappings_refuse_writes() {
        let a = memfd(1);
        let m = MmapRegion::map_shared(a.as_fd(), PAGE_SIZE, 0, false).unwrap();
        assert!(!m.mem().is_writable());
        assert!(m.mem().write(0, b"x").is_err());
        assert_eq!(m.len(), PAGE_SIZE);
    }

    /// Runs `f` in a forked child and returns how the child ended: `Ok(exit status)` or
    /// `Err(signal)`.
    fn in_child(f: impl FnOnce()) -> Result<i32, i32> {
        // SAFETY: the child only runs `f` (a store through a mapping) and `_exit`, both
        // async-signal-safe, so forking a multi-threaded test process is sound.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            f();
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: pid is our child; status is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }

    /// The fault probe's store really reaches the page: it lands in a writable shared mapping
    /// and faults on a read-only one, which the checked `write` never lets happen.
    #[test]
    fn the_bypassing_store_lands_or_faults() {
        use std::os::unix::fs::FileExt;
        let a = memfd(1);
        let rw = MmapRegion::map_shared(a.as_fd(), PAGE_SIZE, 0, true).unwrap();
        // SAFETY: the mapping is writable, so the store cannot fault.
        unsafe { rw.mem().write_byte_bypassing_protection(7, 0x42) }.unwrap();
        let mut b = [0u8; 1];
        a.read_exact_at(&mut b, 7).unwrap();
        assert_eq!(b, [0x42]);
        // SAFETY: out of bounds is refused before any store.
        assert!(unsafe { rw.mem().write_byte_bypassing_protection(PAGE_SIZE, 1) }.is_err());

        let ro = MmapRegion::map_shared(a.as_fd(), PAGE_SIZE, 0, false).unwrap();
        let mem = ro.mem();
        let ended = in_child(|| {
            // SAFETY: this is the forked child, which exists to take the fault.
            let _ = unsafe { mem.write_byte_bypassing_protection(7, 0x99) };
        });
        assert_eq!(ended, Err(libc::SIGSEGV), "the store must fault");
        a.read_exact_at(&mut b, 7).unwrap();
        assert_eq!(b, [0x42], "the faulting store changed nothing");
    }
}
