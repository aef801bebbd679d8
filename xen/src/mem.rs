//! Memory that another domain can change at any time.
//!
//! This module owns [`SharedMem`], the one primitive through which xenvirtio touches pages it
//! shares with a peer domain: grant mappings, foreign mappings, pages granted out, and the
//! loopback platform's pages. It never hands out a Rust reference (`&[u8]`, `&mut [u8]`) into
//! such memory, because the peer may write it concurrently and a reference would promise the
//! compiler that it cannot. Every access is a bounds-checked copy into or out of local memory
//! made of relaxed atomic loads or stores, or a single atomic load or store, so a value read from the peer is fetched exactly once and then
//! validated in private memory (the double-fetch class of XSA-155 cannot arise).

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

/// An access outside a [`SharedMem`] window, or a write to a read-only one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The range `[offset, offset + len)` does not fit in the window.
    #[error("access of {len} bytes at offset {offset} is outside a window of {size} bytes")]
    OutOfBounds {
        /// First byte of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the window.
        size: usize,
    },
    /// The window is mapped read-only.
    #[error("write of {len} bytes at offset {offset} into read-only memory")]
    ReadOnly {
        /// First byte of the write.
        offset: usize,
        /// Length of the write.
        len: usize,
    },
    /// An atomic access at an offset that is not naturally aligned.
    #[error("{width}-byte atomic access at unaligned offset {offset}")]
    Unaligned {
        /// Offset of the access.
        offset: usize,
        /// Width of the access in bytes.
        width: usize,
    },
}

/// The bounce buffer of [`SharedMem::fill`] and [`SharedMem::copy_from`].
const COPY_CHUNK: usize = 4096;

/// Copies `dst.len()` bytes from shared memory at `src` into private memory.
///
/// A plain `memcpy` of memory the peer writes concurrently is a data race, undefined behaviour
/// in Rust: the compiler may assume the bytes do not change and, for instance, fetch one twice.
/// Relaxed atomic loads (single `mov`s on x86_64 and aarch64) make every fetch one real load
/// whose value is whatever the peer left there, which is all this code relies on. Loads are 8
/// bytes wide where `src` is aligned, one byte wide at the unaligned ends.
///
/// # Safety
/// `[src, src + dst.len())` must be mapped readable and accessed by this process only
/// atomically while the copy runs.
unsafe fn atomic_copy_out(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let head = src.align_offset(8).min(n);
    let words = (n - head) / 8;
    for (i, d) in dst[..head].iter_mut().enumerate() {
        // SAFETY: src + i is inside the range (i < head <= n); u8 needs no alignment.
        *d = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
    }
    for w in 0..words {
        let at = head + 8 * w;
        // SAFETY: src + at is 8-aligned (head aligned it) and at + 8 <= n.
        let v = unsafe { AtomicU64::from_ptr(src.add(at).cast::<u64>().cast_mut()) }
            .load(Ordering::Relaxed);
        dst[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    for (i, d) in dst.iter_mut().enumerate().skip(head + 8 * words) {
        // SAFETY: src + i is inside the range (i < n).
        *d = unsafe { AtomicU8::from_ptr(src.add(i).cast_mut()) }.load(Ordering::Relaxed);
    }
}

/// Copies private `src` into shared memory at `dst`, with relaxed atomic stores (see
/// [`atomic_copy_out`] for why).
///
/// # Safety
/// `[dst, dst + src.len())` must be mapped writable and accessed by this process only
/// atomically while the copy runs.
unsafe fn atomic_copy_in(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let head = dst.align_offset(8).min(n);
    let words = (n - head) / 8;
    for (i, s) in src[..head].iter().enumerate() {
        // SAFETY: dst + i is inside the range (i < head <= n).
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(*s, Ordering::Relaxed);
    }
    for w in 0..words {
        let at = head + 8 * w;
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[at..at + 8]);
        // SAFETY: dst + at is 8-aligned (head aligned it) and at + 8 <= n.
        unsafe { AtomicU64::from_ptr(dst.add(at).cast::<u64>()) }
            .store(u64::from_ne_bytes(word), Ordering::Relaxed);
    }
    for (i, s) in src.iter().enumerate().skip(head + 8 * words) {
        // SAFETY: dst + i is inside the range (i < n).
        unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(*s, Ordering::Relaxed);
    }
}

/// A window of `len` bytes of memory shared with another domain, valid for the lifetime `'a` of
/// the mapping it was taken from.
///
/// `SharedMem` is `Copy`: it is a view, and the mapping that owns the pages decides how long they
/// stay mapped. A read-only window refuses writes with [`MemError::ReadOnly`] before touching
/// memory, so a write never reaches a `PROT_READ` mapping and never faults.
#[derive(Clone, Copy)]
pub struct SharedMem<'a> {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    _mapping: PhantomData<&'a ()>,
}

// SAFETY: a SharedMem is a pointer and a length into memory that is shared with other domains
// by design; every access through it is a copy or an atomic operation, never a reference, so
// using it from several threads adds nothing that the peer domain cannot already do.
unsafe impl Send for SharedMem<'_> {}
// SAFETY: as for Send: all accesses are copies or atomics, with no interior references.
unsafe impl Sync for SharedMem<'_> {}

impl std::fmt::Debug for SharedMem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMem")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl<'a> SharedMem<'a> {
    /// Wraps `len` bytes at `ptr`.
    ///
    /// # Safety
    /// For the whole lifetime `'a`, the `len` bytes at `ptr` must stay mapped and readable, and
    /// writable too if `writable` is true. They may be changed concurrently by another domain or
    /// process, but never through a Rust reference held by this process.
    pub unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize, writable: bool) -> Self {
        Self {
            ptr,
            len,
            writable,
            _mapping: PhantomData,
        }
    }

    /// Number of bytes in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of the first byte, for tests that inspect `/proc/self/maps`.
    #[cfg(test)]
    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The same window with writes refused.
    pub fn read_only(self) -> Self {
        Self {
            writable: false,
            ..self
        }
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    fn check_write(&self, offset: usize, len: usize) -> Result<(), MemError> {
        self.check(offset, len)?;
        if self.writable {
            Ok(())
        } else {
            Err(MemError::ReadOnly { offset, len })
        }
    }

    fn check_atomic(&self, offset: usize, width: usize) -> Result<*mut u8, MemError> {
        self.check(offset, width)?;
        // SAFETY: offset + width <= len was checked above, so the result stays in the window.
        let p = unsafe { self.ptr.as_ptr().add(offset) };
        if (p as usize) % width != 0 {
            return Err(MemError::Unaligned { offset, width });
        }
        Ok(p)
    }

    /// The sub-window `[offset, offset + len)`.
    pub fn slice(&self, offset: usize, len: usize) -> Result<SharedMem<'a>, MemError> {
        self.check(offset, len)?;
        // SAFETY: the range was checked to lie inside this window, which is valid for 'a.
        let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset)) };
        Ok(SharedMem {
            ptr,
            len,
            writable: self.writable,
            _mapping: PhantomData,
        })
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.check(offset, dst.len())?;
        // SAFETY: the source range is inside the window (checked), which is mapped readable for
        // 'a and only ever accessed atomically by this process; dst is private memory.
        unsafe { atomic_copy_out(self.ptr.as_ptr().add(offset), dst) };
        Ok(())
    }

    /// Reads an `N`-byte array at `offset` (one fetch, then parsed privately).
    pub fn read_array<const N: usize>(&self, offset: usize) -> Result<[u8; N], MemError> {
        let mut out = [0u8; N];
        self.read(offset, &mut out)?;
        Ok(out)
    }

    /// Copies `src` into the window at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.check_write(offset, src.len())?;
        // SAFETY: the destination range is inside a writable window (checked), mapped writable
        // for 'a and only ever accessed atomically by this process; src is private memory.
        unsafe { atomic_copy_in(src, self.ptr.as_ptr().add(offset)) };
        Ok(())
    }

    /// Stores `value` at `offset` with a plain CPU store, even if the window is read-only.
    ///
    /// Only the bounds are checked. On a mapping without `PROT_WRITE` the store faults and the
    /// kernel kills the process with SIGSEGV (or SIGBUS). This method exists for one purpose:
    /// proving, in a throwaway child process, that a read-only mapping (a read-only grant, for
    /// instance) is enforced by the MMU and not only by [`SharedMem::write`]'s check. Device
    /// code never calls it.
    ///
    /// # Safety
    /// The process may be killed by the fault: call it only in a process that has nothing else
    /// to lose (a child spawned for the probe). If the store does go through, it changes a page
    /// shared with a peer exactly as [`SharedMem::write`] would.
    pub unsafe fn write_byte_bypassing_protection(
        &self,
        offset: usize,
        value: u8,
    ) -> Result<(), MemError> {
        self.check(offset, 1)?;
        // SAFETY: the byte is inside the window (checked), which stays mapped for 'a; a store to
        // a read-only page faults and kills the process, which the caller accepts (contract).
        // The volatile store keeps the compiler from eliding or reordering it.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset), value) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError> {
        self.check_write(offset, len)?;
        let chunk = [byte; COPY_CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(COPY_CHUNK);
            // SAFETY: [offset + done, + n) is inside the writable window (checked above).
            unsafe { atomic_copy_in(&chunk[..n], self.ptr.as_ptr().add(offset + done)) };
            done += n;
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to this window at `offset`.
    pub fn copy_from(
        &self,
        offset: usize,
        src: &SharedMem<'_>,
        src_offset: usize,
        len: usize,
    ) -> Result<(), MemError> {
        self.check_write(offset, len)?;
        src.check(src_offset, len)?;
        // Through private memory, a chunk at a time, with memmove's result when the two windows
        // view the same pages: backwards when the destination starts inside the source.
        let from = src.ptr.as_ptr() as usize + src_offset;
        let to = self.ptr.as_ptr() as usize + offset;
        let backwards = to > from && to < from + len;
        let mut buf = [0u8; COPY_CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(COPY_CHUNK);
            let at = if backwards { len - done - n } else { done };
            src.read(src_offset + at, &mut buf[..n])?;
            self.write(offset + at, &buf[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Atomically loads the little-endian `u16` at `offset`.
    pub fn load_u16(&self, offset: usize, order: Ordering) -> Result<u16, MemError> {
        let p = self.check_atomic(offset, 2)?;
        // SAFETY: p is 2-byte aligned and inside the window (checked); shared memory is only
        // ever accessed atomically or by copies, and AtomicU16 has the layout of u16.
        let v = unsafe { AtomicU16::from_ptr(p.cast::<u16>()) }.load(order);
        Ok(u16::from_le(v))
    }

    /// Atomically stores `value` as a little-endian `u16` at `offset`.
    pub fn store_u16(&self, offset: usize, value: u16, order: Ordering) -> Result<(), MemError> {
        self.check_write(offset, 2)?;
        let p = self.check_atomic(offset, 2)?;
        // SAFETY: as for load_u16, and the window is writable (checked).
        unsafe { AtomicU16::from_ptr(p.cast::<u16>()) }.store(value.to_le(), order);
        Ok(())
    }

    /// Atomically loads the little-endian `u32` at `offset`.
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, MemError> {
        let p = self.check_atomic(offset, 4)?;
        // SAFETY: p is 4-byte aligned and inside the window (checked).
        let v = unsafe { AtomicU32::from_ptr(p.cast::<u32>()) }.load(order);
        Ok(u32::from_le(v))
    }

    /// Atomically stores `value` as a little-endian `u32` at `offset`.
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<(), MemError> {
        self.check_write(offset, 4)?;
        let p = self.check_atomic(offset, 4)?;
        // SAFETY: p is 4-byte aligned, inside the window and writable (checked).
        unsafe { AtomicU32::from_ptr(p.cast::<u32>()) }.store(value.to_le(), order);
        Ok(())
    }
}

/// Most windows passed to one `preadv`/`pwritev` call (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

fn iovecs(windows: &[SharedMem<'_>]) -> Vec<libc::iovec> {
    windows
        .iter()
        .map(|w| libc::iovec {
            iov_base: w.ptr.as_ptr().cast(),
            iov_len: w.len,
        })
        .collect()
}

/// Reads `file` from `file_offset` straight into `windows`, in order, with as few `preadv(2)`
/// calls as possible (one per 1024 windows when the file is long enough). Stops early at end of
/// file. Returns the bytes read. Every window must be writable.
pub fn read_vectored_from_file_at(
    windows: &[SharedMem<'_>],
    file: &File,
    file_offset: u64,
) -> io::Result<usize> {
    if let Some(w) = windows.iter().find(|w| !w.writable) {
        return Err(io::Error::other(MemError::ReadOnly {
            offset: 0,
            len: w.len,
        }));
    }
    vectored(windows, file, file_offset, true)
}

/// Writes `windows`, in order, to `file` at `file_offset` with as few `pwritev(2)` calls as
/// possible. Returns the bytes written (all of them, or an error).
pub fn write_vectored_to_file_at(
    windows: &[SharedMem<'_>],
    file: &File,
    file_offset: u64,
) -> io::Result<usize> {
    vectored(windows, file, file_offset, false)
}

fn vectored(windows: &[SharedMem<'_>], file: &File, mut pos: u64, read: bool) -> io::Result<usize> {
    let mut iov = iovecs(windows);
    let mut first = 0;
    let mut total = 0;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let count = (iov.len() - first).min(IOV_MAX);
        let off = libc::off_t::try_from(pos)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let batch = &iov[first..first + count];
        // `count` <= IOV_MAX, so it fits in c_int.
        let cnt = count as libc::c_int;
        // SAFETY: every iovec describes a window that stays mapped for the windows' lifetime
        // (checked by SharedMem's constructor contract); the kernel reads from them (pwritev) or
        // writes into them (preadv, all windows checked writable above) and touches nothing
        // else. No Rust reference to the shared memory is created.
        let n = unsafe {
            if read {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), cnt, off)
            } else {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), cnt, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n.unsigned_abs();
        if n == 0 {
            if read {
                return Ok(total);
            }
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        total += n;
        pos += n as u64;
        // Skip what was transferred; a partial window continues from where it stopped.
        while n > 0 {
            let v = &mut iov[first];
            let k = n.min(v.iov_len);
            // SAFETY: k <= iov_len, so the advanced pointer stays inside the window.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k) }.cast();
            v.iov_len -= k;
            n -= k;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(total)
}

/// Page-aligned private memory that can stand in for a shared mapping in tests and for bounce
/// staging: it owns its pages and hands out [`SharedMem`] windows onto them.
#[derive(Debug)]
pub struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: PageBuf owns its allocation; all access goes through SharedMem copies and atomics.
unsafe impl Send for PageBuf {}
// SAFETY: as for Send.
unsafe impl Sync for PageBuf {}

/// The page size of every Xen grant and of the xenvirtio protocol.
pub const PAGE_SIZE: usize = 4096;

impl PageBuf {
    /// Allocates `pages` zeroed pages.
    pub fn new(pages: usize) -> Self {
        let len = pages.max(1) * PAGE_SIZE;
        let layout = std::alloc::Layout::from_size_align(len, PAGE_SIZE)
            .expect("a page multiple with page alignment is a valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self {
            ptr,
            len: pages * PAGE_SIZE,
        }
    }

    /// A writable window onto the whole buffer.
    pub fn mem(&self) -> SharedMem<'_> {
        // SAFETY: the allocation lives as long as &self and is only accessed through SharedMem.
        unsafe { SharedMem::from_raw_parts(self.ptr, self.len, true) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(PAGE_SIZE), PAGE_SIZE)
            .expect("same layout as at allocation");
        // SAFETY: ptr was allocated in `new` with this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_read_only_are_enforced() {
        let buf = PageBuf::new(1);
        let m = buf.mem();
        m.write(4090, b"abcdef").unwrap();
        assert_eq!(m.read_array::<6>(4090).unwrap(), *b"abcdef");
        assert_eq!(
            m.write(4091, b"abcdef"),
            Err(MemError::OutOfBounds {
                offset: 4091,
                len: 6,
                size: 4096
            })
        );
        assert!(matches!(
            m.read(usize::MAX, &mut [0u8; 2]),
            Err(MemError::OutOfBounds { .. })
        ));
        let ro = m.read_only();
        assert_eq!(
            ro.write(0, b"x"),
            Err(MemError::ReadOnly { offset: 0, len: 1 })
        );
        assert_eq!(
            ro.store_u16(0, 1, Ordering::Release),
            Err(MemError::ReadOnly { offset: 0, len: 2 })
        );
        assert_eq!(ro.read_array::<1>(4090).unwrap(), *b"a");
    }

    #[test]
    fn copies_are_exact_at_every_alignment_and_length() {
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let pattern: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        for off in 0..17 {
            for len in 0..41 {
                m.fill(0, 128, 0xee).unwrap();
                m.write(off, &pattern[..len]).unwrap();
                let mut back = vec![0u8; len + 2];
                m.read(off.saturating_sub(1), &mut back).unwrap();
                let before = usize::from(off > 0);
                assert_eq!(&back[before..before + len], &pattern[..len], "{off}+{len}");
                if off > 0 {
                    assert_eq!(back[0], 0xee, "nothing written before {off}");
                }
                assert_eq!(
                    back[before + len],
                    0xee,
                    "nothing written after {off}+{len}"
                );
            }
        }
        m.fill(3, 4095 - 3, 0x11).unwrap();
        let mut all = vec![0u8; 4096];
        m.read(0, &mut all).unwrap();
        assert!(all[..3].iter().all(|&b| b == 0xee) && all[3..4095].iter().all(|&b| b == 0x11));
        assert_eq!(all[4095], 0, "the last byte was never written");
    }

    #[test]
    fn copy_from_moves_like_memmove_when_windows_overlap() {
        let buf = PageBuf::new(3);
        let m = buf.mem();
        for (src, dst, len) in [(0, 100, 9000), (100, 0, 9000), (5, 4100, 4000), (7, 7, 64)] {
            let mut model: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
            m.write(0, &model).unwrap();
            m.copy_from(dst, &m, src, len).unwrap();
            model.copy_within(src..src + len, dst);
            let mut got = vec![0u8; model.len()];
            m.read(0, &mut got).unwrap();
            assert!(got == model, "copy of {len} bytes from {src} to {dst}");
        }
    }

    /// Issue 13, finding 4: the peer writes shared memory while this process copies it out.
    /// With `copy_nonoverlapping` that is a data race, undefined behaviour: Miri reports it
    /// (`scripts/miri.sh` runs this test under Miri in CI). With atomic copies it is defined,
    /// and each aligned 8-byte word is read whole. The peer is played by a thread writing
    /// through `SharedMem::write`, the only way the project writes shared memory.
    #[test]
    fn hostile_peer_writing_during_a_copy_is_not_a_data_race() {
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let rounds = if cfg!(miri) { 20 } else { 20_000 };
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..rounds {
                    let byte = if i % 2 == 0 { 0xaa } else { 0x55 };
                    m.write(0, &[byte; 64]).unwrap();
                }
            });
            let mut got = [0u8; 64];
            for _ in 0..rounds {
                m.read(0, &mut got).unwrap();
                for word in got.chunks(8) {
                    assert!(
                        word.iter().all(|&b| b == word[0]) && [0, 0xaa, 0x55].contains(&word[0]),
                        "an aligned word read whole: {word:02x?}"
                    );
                }
            }
        });
    }

    #[test]
    fn atomics_are_little_endian_and_aligned() {
        let buf = PageBuf::new(1);
        let m = buf.mem();
        m.store_u16(2, 0x1234, Ordering::Release).unwrap();
        assert_eq!(m.read_array::<2>(2).unwrap(), [0x34, 0x12]);
        assert_eq!(m.load_u16(2, Ordering::Acquire).unwrap(), 0x1234);
        assert_eq!(
            m.load_u32(2, Ordering::Acquire),
            Err(MemError::Unaligned {
                offset: 2,
                width: 4
            })
        );
        let sub = m.slice(2, 2).unwrap();
        assert_eq!(sub.load_u16(0, Ordering::Relaxed).unwrap(), 0x1234);
        assert!(m.slice(4095, 2).is_err());
    }

    #[test]
    fn vectored_file_io_spans_windows() {
        use std::io::Write;
        let mut f = tempfile_in_tmp();
        f.write_all(b"abcdefghij").unwrap();
        let buf = PageBuf::new(2);
        let m = buf.mem();
        let ws = [
            m.slice(0, 3).unwrap(),
            m.slice(4096, 0).unwrap(),
            m.slice(5000, 20).unwrap(),
        ];
        assert_eq!(
            read_vectored_from_file_at(&ws, &f, 0).unwrap(),
            10,
            "stops at end of file"
        );
        assert_eq!(m.read_array::<3>(0).unwrap(), *b"abc");
        assert_eq!(m.read_array::<7>(5000).unwrap(), *b"defghij");
        assert!(read_vectored_from_file_at(&[m.slice(0, 1).unwrap().read_only()], &f, 0).is_err());
        let many: Vec<SharedMem<'_>> = (0..2000).map(|i| m.slice(i % 4096, 1).unwrap()).collect();
        assert_eq!(
            write_vectored_to_file_at(&many, &f, 100).unwrap(),
            2000,
            "more than IOV_MAX"
        );
        let mut back = vec![0u8; 2000];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 100).unwrap();
        let mut want = vec![0u8; 2000];
        for (i, b) in want.iter_mut().enumerate() {
            *b = m.read_array::<1>(i % 4096).unwrap()[0];
        }
        assert_eq!(back, want);
    }

    fn tempfile_in_tmp() -> File {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("xenvirtio-mem-{}-{n}", std::process::id()));
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
}
