//! The `direct` strategy: pinned memory whose guest frame numbers are the DMA addresses.
//!
//! The backend (Dom0, trusted, `grant_usage = 0`) foreign-maps whatever frame a descriptor
//! names, so the frames behind every page the frontend names must not change while the device
//! is connected. The memory comes from the platform's `PinnedAllocator`: on Linux, 2 MiB
//! hugetlb pages whose frame numbers are read from `/proc/self/pagemap` (hugetlb pages are
//! never swapped, and compaction does not move them); on the loopback platform, pages carved
//! from the domain's RAM.
//!
//! **The mlock fallback is not safe, and says so.** When no huge pages are reserved, Linux
//! falls back to 4 KiB pages held with `mlock`. `mlock` keeps pages resident, but it does not
//! stop the kernel from *migrating* them (memory compaction, NUMA balancing, hot-unplug): the
//! page's contents move to a new frame and the old frame is reused for something else, while
//! the backend still reads and writes the old frame. Nothing tells the backend. So the
//! fallback is logged as a warning at connect and recorded in `dma-reason`, and the operator
//! should reserve huge pages (`/proc/sys/vm/nr_hugepages`) or use `grant`. The policy
//! refuses `direct` outright where it is invalid (x86 PV, a backend that is not Dom0, a device
//! that offers `ACCESS_PLATFORM`): see [`crate::policy`].
//!
//! The ring areas are carved from the same memory (`ring-gfn`). This module never frees
//! pinned memory the backend may still map: see `DmaMemory::abandon`.

use std::sync::Arc;

use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{PinnedAllocator, PinnedPages, Platform};

use super::DmaError;
use super::arena::{Addressing, Arena, Backing, DmaCounters};

/// Huge pages are 512 frames: pinned memory is allocated in whole 2 MiB runs so that nothing
/// of a huge page is wasted.
const HUGE_PAGE_FRAMES: usize = 512;

struct PinnedBacking<T: PinnedPages>(T);

impl<T: PinnedPages> Backing for PinnedBacking<T> {
    fn mem(&self) -> SharedMem<'_> {
        self.0.mem()
    }
}

/// Pinned memory of at least `pages` pages (rounded up to whole huge pages), and whether it
/// may migrate.
pub(crate) fn pinned<P: Platform>(
    platform: &P,
    pages: usize,
    counters: &Arc<DmaCounters>,
) -> Result<(Arena, bool), DmaError> {
    let pages = pages.max(1).next_multiple_of(HUGE_PAGE_FRAMES);
    let allocator = platform
        .pinned_allocator()
        .map_err(|source| DmaError::Pinned { pages, source })?;
    let pinned = allocator
        .alloc_pinned(pages)
        .map_err(|source| DmaError::Pinned { pages, source })?;
    let may_migrate = pinned.may_migrate();
    if may_migrate {
        tracing::warn!(
            pages,
            "direct DMA memory is mlock'ed 4 KiB pages, which the kernel may still migrate \
             to other frames while the backend maps the old ones; reserve 2 MiB huge pages \
             (/proc/sys/vm/nr_hugepages) or use --dma grant"
        );
    }
    let gfns = pinned.gfns().to_vec();
    tracing::debug!(
        pages,
        first_gfn = gfns.first(),
        may_migrate,
        "pinned DMA memory allocated"
    );
    Ok((
        Arena::new(
            Box::new(PinnedBacking(pinned)),
            Addressing::Direct(gfns),
            Arc::clone(counters),
        ),
        may_migrate,
    ))
}
