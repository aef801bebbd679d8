//! The memory every DMA strategy hands out: a contiguous run of pages the device can reach, a
//! page allocator over it, and the rule that turns a byte of it into a descriptor address.
//!
//! An [`Arena`] owns its pages through a [`Backing`] (a grant, a pinned allocation) and never
//! lets a Rust reference into them escape: buffers are [`DmaBuf`] handles whose contents are read
//! and written through [`SharedMem`] copies. Dropping the last handle on an arena drops the
//! backing, which revokes the grants or unpins the memory; the owner of the arena
//! ([`super::DmaMemory`]) decides when that may happen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_xen::mem::{MemError, PAGE_SIZE, SharedMem};
use xenvirtio_xen::{Gfn, GrantRef};

use super::DmaError;

/// Pages this process can reach, owned by a grant or a pinned allocation.
pub(crate) trait Backing: Send + Sync {
    /// The pages, writable by this domain.
    fn mem(&self) -> SharedMem<'_>;
}

/// How a byte of an arena is named in a descriptor.
#[derive(Debug)]
pub(crate) enum Addressing {
    /// Page `i` is grant `refs[i]`; a descriptor never leaves its page.
    Grant(Vec<GrantRef>),
    /// The arena is the bounce pool: byte `o` is pool offset `o`.
    Pool,
    /// Page `i` is guest frame `gfns[i]`; a descriptor may span frames that are contiguous.
    Direct(Vec<Gfn>),
}

/// One descriptor's worth of an arena: an encoded address and a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The address, encoded for the strategy (`docs/PROTOCOL.md` section 4).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Counters shared by everything of one device's DMA memory.
#[derive(Debug, Default)]
pub(crate) struct DmaCounters {
    /// Bytes copied between callers' memory and DMA memory (copy in plus copy out).
    pub(crate) bytes_bounced: AtomicU64,
    /// Grant references this device holds now (arena, directory, rings).
    pub(crate) grants_held: AtomicU64,
    /// Grant references allocated over the device's life.
    pub(crate) grants_allocated: AtomicU64,
}

impl DmaCounters {
    pub(crate) fn add_grants(&self, n: usize) {
        self.grants_held.fetch_add(n as u64, Ordering::Relaxed);
        self.grants_allocated.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn drop_grants(&self, n: usize) {
        self.grants_held.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

/// A first-fit allocator of page runs, over at most a few thousand pages.
#[derive(Debug)]
struct PageBitmap {
    /// Bit set: page in use.
    used: Vec<u64>,
    pages: usize,
    free: usize,
    /// Where the next search starts (the end of the last allocation).
    hint: usize,
}

impl PageBitmap {
    fn new(pages: usize) -> Self {
        Self {
            used: vec![0; pages.div_ceil(64)],
            pages,
            free: pages,
            hint: 0,
        }
    }

    fn is_used(&self, p: usize) -> bool {
        self.used[p / 64] & (1 << (p % 64)) != 0
    }

    fn set(&mut self, p: usize, used: bool) {
        if used {
            self.used[p / 64] |= 1 << (p % 64);
        } else {
            self.used[p / 64] &= !(1 << (p % 64));
        }
    }

    /// A run of `n` free pages, first fit from the hint, wrapping once.
    fn alloc(&mut self, n: usize) -> Option<usize> {
        if n == 0 || n > self.free {
            return None;
        }
        for start_at in [self.hint, 0] {
            let mut run = 0;
            let mut p = start_at;
            while p < self.pages {
                if self.is_used(p) {
                    run = 0;
                } else {
                    run += 1;
                    if run == n {
                        let first = p + 1 - n;
                        for q in first..=p {
                            self.set(q, true);
                        }
                        self.free -= n;
                        self.hint = (p + 1) % self.pages;
                        return Some(first);
                    }
                }
                p += 1;
            }
        }
        None
    }

    fn release(&mut self, first: usize, n: usize) {
        for p in first..first + n {
            debug_assert!(self.is_used(p), "page {p} freed twice");
            self.set(p, false);
        }
        self.free += n;
    }
}

/// Pages the device can reach, with an allocator.
pub(crate) struct Arena {
    // Field order is drop order: nothing here outlives the backing's pages.
    addressing: Addressing,
    strategy: DmaStrategy,
    pages: usize,
    allocator: Mutex<PageBitmap>,
    freed: Condvar,
    pub(crate) counters: Arc<DmaCounters>,
    backing: Box<dyn Backing>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("strategy", &self.strategy)
            .field("pages", &self.pages)
            .field("free_pages", &self.free_pages())
            .finish()
    }
}

impl Arena {
    pub(crate) fn new(
        backing: Box<dyn Backing>,
        addressing: Addressing,
        counters: Arc<DmaCounters>,
    ) -> Self {
        let pages = backing.mem().len() / PAGE_SIZE;
        let strategy = match addressing {
            Addressing::Grant(_) => DmaStrategy::Grant,
            Addressing::Pool => DmaStrategy::Bounce,
            Addressing::Direct(_) => DmaStrategy::Direct,
        };
        Self {
            addressing,
            strategy,
            pages,
            allocator: Mutex::new(PageBitmap::new(pages)),
            freed: Condvar::new(),
            counters,
            backing,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PageBitmap> {
        // Every update of the bitmap completes before anything can panic.
        self.allocator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn pages(&self) -> usize {
        self.pages
    }

    pub(crate) fn free_pages(&self) -> usize {
        self.lock().free
    }

    pub(crate) fn strategy(&self) -> DmaStrategy {
        self.strategy
    }

    pub(crate) fn mem(&self) -> SharedMem<'_> {
        self.backing.mem()
    }

    /// The frame numbers of pages `[first, first + n)` (direct arenas only).
    pub(crate) fn gfns(&self, first: usize, n: usize) -> Option<Vec<Gfn>> {
        match &self.addressing {
            Addressing::Direct(gfns) => gfns.get(first..first + n).map(<[Gfn]>::to_vec),
            _ => None,
        }
    }

    fn pages_for(&self, len: usize) -> Result<usize, DmaError> {
        let n = len.div_ceil(PAGE_SIZE);
        if len == 0 || n > self.pages {
            return Err(DmaError::BadSize {
                len,
                arena: self.pages * PAGE_SIZE,
            });
        }
        Ok(n)
    }

    /// A buffer of `len` bytes (whole pages), or [`DmaError::Exhausted`] if there is no room
    /// now.
    pub(crate) fn alloc(self: &Arc<Self>, len: usize) -> Result<DmaBuf, DmaError> {
        let n = self.pages_for(len)?;
        let first = self.lock().alloc(n).ok_or(DmaError::Exhausted {
            len,
            strategy: self.strategy,
        })?;
        Ok(DmaBuf {
            arena: Arc::clone(self),
            first_page: first,
            pages: n,
            len,
        })
    }

    /// Like [`Arena::alloc`], waiting up to `timeout` for other buffers to be freed.
    pub(crate) fn alloc_wait(
        self: &Arc<Self>,
        len: usize,
        timeout: Duration,
    ) -> Result<DmaBuf, DmaError> {
        let n = self.pages_for(len)?;
        let deadline = Instant::now() + timeout;
        let mut bitmap = self.lock();
        loop {
            if let Some(first) = bitmap.alloc(n) {
                return Ok(DmaBuf {
                    arena: Arc::clone(self),
                    first_page: first,
                    pages: n,
                    len,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DmaError::Exhausted {
                    len,
                    strategy: self.strategy,
                });
            }
            bitmap = self
                .freed
                .wait_timeout(bitmap, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn release(&self, first: usize, n: usize) {
        self.lock().release(first, n);
        self.freed.notify_all();
    }

    /// Appends the segments that name `[offset, offset + len)` of the arena, each at most
    /// `max_piece` bytes, split where the strategy requires (page boundaries for grants,
    /// non-contiguous frames for direct).
    pub(crate) fn encode(
        &self,
        offset: usize,
        len: usize,
        max_piece: usize,
        out: &mut Vec<Segment>,
    ) {
        let max_piece = max_piece.clamp(1, u32::MAX as usize);
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let page = at / PAGE_SIZE;
            let in_page = at % PAGE_SIZE;
            let (addr, mut piece) = match &self.addressing {
                Addressing::Grant(refs) => (
                    DmaAddr::Grant {
                        gref: refs[page],
                        offset: in_page as u16,
                    }
                    .encode(),
                    PAGE_SIZE - in_page,
                ),
                Addressing::Pool => (DmaAddr::Bounce { offset: at as u64 }.encode(), end - at),
                Addressing::Direct(gfns) => {
                    // Extend over frames that follow each other.
                    let mut last = page;
                    while last + 1 < gfns.len()
                        && (last + 1) * PAGE_SIZE < end
                        && gfns[last + 1] == gfns[last] + 1
                    {
                        last += 1;
                    }
                    (
                        DmaAddr::Direct {
                            gpa: (gfns[page] << 12) | in_page as u64,
                        }
                        .encode(),
                        (last + 1) * PAGE_SIZE - at,
                    )
                }
            };
            piece = piece.min(end - at).min(max_piece);
            out.push(Segment {
                addr,
                len: piece as u32,
            });
            at += piece;
        }
    }
}

/// A buffer in DMA memory: pages of the grant arena, the bounce pool or pinned memory, which
/// the device reaches without a copy. Freed when dropped.
///
/// Its contents are read and written through [`DmaBuf::mem`] (copies, never references: the
/// device may write the pages at any time while a request is in flight).
pub struct DmaBuf {
    arena: Arc<Arena>,
    first_page: usize,
    pages: usize,
    len: usize,
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("strategy", &self.arena.strategy)
            .field("first_page", &self.first_page)
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: buffers have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The strategy whose memory this is.
    pub fn strategy(&self) -> DmaStrategy {
        self.arena.strategy
    }

    /// A window onto the buffer.
    pub fn mem(&self) -> SharedMem<'_> {
        self.arena
            .mem()
            .slice(self.first_page * PAGE_SIZE, self.len)
            .expect("a buffer lies inside its arena")
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.mem().write(offset, src)
    }

    /// Copies the buffer at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.mem().read(offset, dst)
    }

    /// The descriptor segments that name the whole buffer (what the device is given).
    pub fn segments(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        self.encode(0, self.len, usize::MAX, &mut out);
        out
    }

    /// Appends the segments of `[offset, offset + len)` of the buffer.
    pub(crate) fn encode(
        &self,
        offset: usize,
        len: usize,
        max_piece: usize,
        out: &mut Vec<Segment>,
    ) {
        debug_assert!(offset + len <= self.len);
        self.arena
            .encode(self.first_page * PAGE_SIZE + offset, len, max_piece, out);
    }

    /// Copies a caller's bytes in, counting them as bounced.
    pub(crate) fn bounce_in(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.write(offset, src)?;
        self.arena
            .counters
            .bytes_bounced
            .fetch_add(src.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Copies out to a caller's bytes, counting them as bounced.
    pub(crate) fn bounce_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.read(offset, dst)?;
        self.arena
            .counters
            .bytes_bounced
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The frame numbers of the buffer's pages (direct memory only).
    pub(crate) fn gfns(&self) -> Option<Vec<Gfn>> {
        self.arena.gfns(self.first_page, self.pages)
    }

    /// Whether two buffers come from the same arena.
    pub(crate) fn same_arena(&self, arena: &Arc<Arena>) -> bool {
        Arc::ptr_eq(&self.arena, arena)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        self.arena.release(self.first_page, self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_allocates_runs_first_fit_and_reuses_them() {
        let mut b = PageBitmap::new(10);
        assert_eq!(b.alloc(3), Some(0));
        assert_eq!(b.alloc(3), Some(3));
        assert_eq!(b.alloc(5), None, "only 4 left");
        b.release(0, 3);
        assert_eq!(b.free, 7);
        // From the hint (6) there are 4 free; a run of 3 fits there first.
        assert_eq!(b.alloc(3), Some(6));
        assert_eq!(b.alloc(3), Some(0), "wraps to the freed run");
        assert_eq!(b.alloc(1), Some(9));
        assert_eq!(b.alloc(1), None);
        assert_eq!(b.alloc(0), None);
    }
}
