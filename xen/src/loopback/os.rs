//! The few system calls of the loopback platform: memfds for guest RAM, hole punching to free
//! and zero pages, eventfds for event channels, and mapping runs of RAM pages contiguously.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use crate::mem::PAGE_SIZE;
use crate::mmap::{MmapRegion, Reservation};

/// A sparse memfd of `bytes` bytes named `name` (its pages cost memory only once written).
pub(super) fn memfd(name: &str, bytes: u64) -> io::Result<File> {
    let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(bytes)?;
    Ok(file)
}

/// Frees (and so zeroes) `len` bytes of `file` at `offset`.
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: fallocate takes no pointers; the descriptor is valid while `file` is borrowed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking eventfd.
pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes an eventfd readable (adds 1 to its counter).
pub(super) fn eventfd_signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of `one`, which live across the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
    if n != 8 {
        // Only possible if the counter is about to overflow, which leaves it readable anyway.
        tracing::debug!(error = %io::Error::last_os_error(), "eventfd write failed");
    }
}

/// Resets an eventfd's counter, so it is no longer readable.
pub(super) fn eventfd_drain(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into `v`; EAGAIN (counter already 0) is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&raw mut v).cast(), 8) };
}

/// Maps pages `pages` (page indices of `ram`) contiguously, in that order, coalescing runs of
/// consecutive pages into one mapping each.
pub(super) fn map_ram_pages(ram: &File, pages: &[u64], writable: bool) -> io::Result<MmapRegion> {
    let mut r = Reservation::new(pages.len())?;
    let mut i = 0;
    while i < pages.len() {
        let start = i;
        while i + 1 < pages.len() && pages[i + 1] == pages[i] + 1 {
            i += 1;
        }
        i += 1;
        r.map_file(
            start,
            i - start,
            ram.as_fd(),
            pages[start] * PAGE_SIZE as u64,
            writable,
        )?;
    }
    r.finish(writable)
}
