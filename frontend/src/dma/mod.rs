//! DMA memory: what the device may reach, and how descriptors name it (docs/DESIGN.md "DMA
//! strategies", `docs/PROTOCOL.md` sections 3 to 6).
//!
//! A [`DmaMemory`] holds one device's memory for one connection, under one strategy:
//! - [`grant`]: an arena of gntalloc pages granted read-write to the backend domain; every
//!   descriptor stays in its page. Per-request mode lets the backend map each chain's grants
//!   and unmap them; persistent mode (`feature-persistent`) lets it keep them mapped, which is
//!   safe because the arena's grants stay valid until the backend reaches Closed.
//! - [`bounce`]: a pool granted once, whose references are listed in read-only directory
//!   pages; the backend maps it once at connect. Callers' data is copied in and out.
//! - [`direct`]: pinned memory whose guest frame numbers are the addresses.
//!
//! The ring areas are allocated here too ([`DmaMemory::alloc_ring`]): granted pages under
//! `grant` and `bounce`, pinned pages under `direct`.
//!
//! **Per buffer.** Only [`DmaBuf`]s, allocated from this memory, are ever named in a
//! descriptor. A caller's own slice (heap, stack, a foreign mapping: anything else) is always
//! copied through a `DmaBuf` first, whatever the strategy, and the copy is counted in
//! [`DmaStats::bytes_bounced`]. Nothing else can reach the device.
//!
//! This module never decides *which* strategy to use (that is [`crate::policy`]) and never
//! frees memory the backend may still use: [`DmaMemory`] is dropped by the connection only
//! after the backend reached Closed, or deliberately leaked when it never did (see
//! [`DmaMemory::release_after_backend_closed`]).

mod arena;
pub mod bounce;
pub mod direct;
pub mod grant;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) use arena::{Arena, Backing, DmaCounters};
pub use arena::{DmaBuf, Segment};

use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_xen::mem::{MemError, PAGE_SIZE, SharedMem};
use xenvirtio_xen::platform::{GrantAllocator, GrantedPages, Platform};
use xenvirtio_xen::{Access, DomId, Gfn, GrantRef, XenError};

/// Pages of DMA memory when nobody says otherwise: 1 MiB, which together with the rings of a
/// few devices stays below gntalloc's default limit of 1024 grants.
pub const DEFAULT_DMA_PAGES: usize = 256;

/// Errors of the DMA layer.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// No room in the arena now (buffers in flight hold it); wait for completions.
    #[error("no room for {len} bytes in the {strategy} DMA memory right now")]
    Exhausted {
        /// Bytes asked for.
        len: usize,
        /// The strategy whose memory is full.
        strategy: DmaStrategy,
    },
    /// A buffer of zero bytes, or larger than the whole arena.
    #[error("a DMA buffer of {len} bytes cannot come from an arena of {arena} bytes")]
    BadSize {
        /// Bytes asked for.
        len: usize,
        /// Size of the arena.
        arena: usize,
    },
    /// gntalloc refused with ENOSPC: its grant limit is reached.
    #[error(
        "cannot grant {pages} more pages to domain {peer}: gntalloc's grant limit is reached \
         ({held} grants held by this device). Raise the `limit` parameter of the xen-gntalloc \
         module (`modprobe xen-gntalloc limit=4096`, or write the number to \
         /sys/module/xen_gntalloc/parameters/limit), or use fewer DMA pages (--dma-pages)"
    )]
    GrantsExhausted {
        /// Pages in the refused request.
        pages: usize,
        /// The backend domain.
        peer: DomId,
        /// Grants the device already held.
        held: u64,
        /// The platform's error.
        #[source]
        source: XenError,
    },
    /// Granting pages failed for another reason.
    #[error("cannot grant {pages} pages ({what}) to domain {peer}")]
    Grant {
        /// What the pages were for.
        what: &'static str,
        /// Pages in the request.
        pages: usize,
        /// The backend domain.
        peer: DomId,
        /// The platform's error.
        #[source]
        source: XenError,
    },
    /// Pinned memory for `direct` could not be allocated.
    #[error("cannot allocate {pages} pages of pinned memory for direct DMA")]
    Pinned {
        /// Pages asked for.
        pages: usize,
        /// The platform's error.
        #[source]
        source: XenError,
    },
    /// The bounce pool is larger than the protocol allows.
    #[error("a bounce pool of {pages} pages is out of range (1 to {max} pages)")]
    PoolSize {
        /// Pages asked for.
        pages: usize,
        /// The protocol's maximum.
        max: u32,
    },
    /// DMA memory could not be accessed.
    #[error("DMA memory access failed")]
    Mem(#[from] MemError),
}

/// What a device's DMA memory looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaStats {
    /// The strategy.
    pub strategy: DmaStrategy,
    /// Whether persistent grants are in use (`grant` only).
    pub persistent: bool,
    /// Pages of the arena, pool or pinned memory.
    pub pages: usize,
    /// Of which free now.
    pub free_pages: usize,
    /// Grant references the device holds now (arena, pool, directory, rings).
    pub grants_held: u64,
    /// Grant references allocated since connect.
    pub grants_allocated: u64,
    /// Bytes copied between callers' memory and DMA memory.
    pub bytes_bounced: u64,
    /// `direct` only: the pinned pages are mlock'ed 4 KiB pages that the kernel may migrate.
    pub may_migrate: bool,
}

/// Granted pages kept behind the [`Backing`] trait object, counted while held.
pub(crate) struct GrantBacking<G: GrantedPages> {
    grant: G,
    counters: Arc<DmaCounters>,
}

impl<G: GrantedPages> GrantBacking<G> {
    pub(crate) fn new(grant: G, counters: &Arc<DmaCounters>) -> Self {
        counters.add_grants(grant.pages());
        Self {
            grant,
            counters: Arc::clone(counters),
        }
    }

    pub(crate) fn refs(&self) -> &[GrantRef] {
        self.grant.refs()
    }
}

impl<G: GrantedPages> Backing for GrantBacking<G> {
    fn mem(&self) -> SharedMem<'_> {
        self.grant.mem()
    }
}

impl<G: GrantedPages> Drop for GrantBacking<G> {
    fn drop(&mut self) {
        self.counters.drop_grants(self.grant.pages());
    }
}

/// Grants `pages` to `peer`, naming gntalloc's limit when that is what failed.
pub(crate) fn grant_pages<A: GrantAllocator>(
    granter: &A,
    peer: DomId,
    pages: usize,
    access: Access,
    what: &'static str,
    counters: &Arc<DmaCounters>,
) -> Result<GrantBacking<A::Grant>, DmaError> {
    match granter.grant(peer, pages, access) {
        Ok(g) => Ok(GrantBacking::new(g, counters)),
        Err(source) if source.errno() == Some(libc::ENOSPC) => Err(DmaError::GrantsExhausted {
            pages,
            peer,
            held: counters.grants_held.load(Ordering::Relaxed),
            source,
        }),
        Err(source) => Err(DmaError::Grant {
            what,
            pages,
            peer,
            source,
        }),
    }
}

/// How the device finds a ring area (`queue-<n>/ring-ref` or `queue-<n>/ring-gfn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingAddress {
    /// Grant references of the pages, in order.
    Refs(Vec<GrantRef>),
    /// Guest frame numbers of the pages, in order.
    Gfns(Vec<Gfn>),
}

enum RingOwner {
    Granted(Box<dyn Backing>),
    Carved(DmaBuf),
}

/// The pages of one queue's ring area, zeroed, and how the device finds them.
pub struct RingArea {
    owner: RingOwner,
    address: RingAddress,
}

impl std::fmt::Debug for RingArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingArea")
            .field("address", &self.address)
            .finish()
    }
}

impl RingArea {
    /// The ring area.
    pub fn mem(&self) -> SharedMem<'_> {
        match &self.owner {
            RingOwner::Granted(b) => b.mem(),
            RingOwner::Carved(buf) => buf.mem(),
        }
    }

    /// How the device finds it.
    pub fn address(&self) -> &RingAddress {
        &self.address
    }
}

/// One device's DMA memory for one connection (see the module documentation).
pub struct DmaMemory<P: Platform> {
    strategy: DmaStrategy,
    peer: DomId,
    persistent: bool,
    may_migrate: bool,
    arena: Arc<Arena>,
    /// `bounce`: the directory pages, granted read-only.
    directory: Option<GrantBacking<<P::GrantAlloc as GrantAllocator>::Grant>>,
    /// `grant` and `bounce`: grants the rings.
    granter: Option<P::GrantAlloc>,
    counters: Arc<DmaCounters>,
}

impl<P: Platform> std::fmt::Debug for DmaMemory<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMemory")
            .field("strategy", &self.strategy)
            .field("peer", &self.peer)
            .field("persistent", &self.persistent)
            .field("arena", &self.arena)
            .finish()
    }
}

impl<P: Platform> DmaMemory<P> {
    /// Sets up `pages` pages of DMA memory for a device served by domain `peer`.
    /// `persistent` only matters for `grant`: whether to tell the backend it may keep the
    /// arena mapped (when it offers `feature-persistent`).
    pub fn new(
        platform: &P,
        strategy: DmaStrategy,
        peer: DomId,
        pages: usize,
        persistent: bool,
    ) -> Result<Self, DmaError> {
        let counters = Arc::new(DmaCounters::default());
        match strategy {
            DmaStrategy::Grant => {
                let granter = open_granter(platform, peer)?;
                let arena = grant::arena(&granter, peer, pages, &counters)?;
                Ok(Self {
                    strategy,
                    peer,
                    persistent,
                    may_migrate: false,
                    arena: Arc::new(arena),
                    directory: None,
                    granter: Some(granter),
                    counters,
                })
            }
            DmaStrategy::Bounce => {
                let granter = open_granter(platform, peer)?;
                let (arena, directory) = bounce::pool(&granter, peer, pages, &counters)?;
                Ok(Self {
                    strategy,
                    peer,
                    persistent: false,
                    may_migrate: false,
                    arena: Arc::new(arena),
                    directory: Some(directory),
                    granter: Some(granter),
                    counters,
                })
            }
            DmaStrategy::Direct => {
                let (arena, may_migrate) = direct::pinned(platform, pages, &counters)?;
                Ok(Self {
                    strategy,
                    peer,
                    persistent: false,
                    may_migrate,
                    arena: Arc::new(arena),
                    directory: None,
                    granter: None,
                    counters,
                })
            }
        }
    }

    /// The strategy.
    pub fn strategy(&self) -> DmaStrategy {
        self.strategy
    }

    /// The backend domain the memory is for.
    pub fn peer(&self) -> DomId {
        self.peer
    }

    /// Whether the arena is offered as persistent grants.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// `direct`: whether the pinned pages may migrate (the mlock fallback).
    pub fn may_migrate(&self) -> bool {
        self.may_migrate
    }

    /// Pages of the arena, pool or pinned memory.
    pub fn pages(&self) -> usize {
        self.arena.pages()
    }

    /// `bounce`: the references of the directory pages (`bounce/dir-ref`).
    pub fn bounce_directory(&self) -> Option<&[GrantRef]> {
        self.directory.as_ref().map(GrantBacking::refs)
    }

    /// A buffer of `len` bytes (rounded up to whole pages) that the device can reach, or
    /// [`DmaError::Exhausted`] if the memory is all in use now.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf, DmaError> {
        self.arena.alloc(len)
    }

    /// Like [`DmaMemory::alloc`], waiting up to `timeout` for buffers to be freed.
    pub fn alloc_wait(&self, len: usize, timeout: Duration) -> Result<DmaBuf, DmaError> {
        self.arena.alloc_wait(len, timeout)
    }

    /// Whether `buf` is memory of this device (and so may be put in its descriptors).
    pub fn owns(&self, buf: &DmaBuf) -> bool {
        buf.same_arena(&self.arena)
    }

    /// A zeroed ring area of `pages` pages: granted read-write to the backend under `grant`
    /// and `bounce`, carved from the pinned memory under `direct`.
    pub fn alloc_ring(&self, pages: usize) -> Result<RingArea, DmaError> {
        let area = match &self.granter {
            Some(granter) => {
                let g = grant_pages(
                    granter,
                    self.peer,
                    pages,
                    Access::ReadWrite,
                    "a ring area",
                    &self.counters,
                )?;
                let refs = g.refs().to_vec();
                RingArea {
                    owner: RingOwner::Granted(Box::new(g)),
                    address: RingAddress::Refs(refs),
                }
            }
            None => {
                let buf = self.arena.alloc(pages * PAGE_SIZE)?;
                let gfns = buf.gfns().expect("direct memory has frame numbers");
                RingArea {
                    owner: RingOwner::Carved(buf),
                    address: RingAddress::Gfns(gfns),
                }
            }
        };
        let mem = area.mem();
        mem.fill(0, mem.len(), 0)?;
        Ok(area)
    }

    /// Counters.
    pub fn stats(&self) -> DmaStats {
        DmaStats {
            strategy: self.strategy,
            persistent: self.persistent,
            pages: self.arena.pages(),
            free_pages: self.arena.free_pages(),
            grants_held: self.counters.grants_held.load(Ordering::Relaxed),
            grants_allocated: self.counters.grants_allocated.load(Ordering::Relaxed),
            bytes_bounced: self.counters.bytes_bounced.load(Ordering::Relaxed),
            may_migrate: self.may_migrate,
        }
    }

    /// Releases the memory once the backend has reached Closed: grants are revoked, pinned
    /// memory is unpinned (as soon as the last [`DmaBuf`] a caller still holds is dropped).
    pub fn release_after_backend_closed(self) {
        drop(self);
    }

    /// Gives the memory up when the backend never confirmed that it let go of it.
    ///
    /// Grants (`grant`, `bounce`) are released anyway: gntalloc defers the revocation of a
    /// page that the peer still maps, and never reuses the page before the peer unmaps it, so
    /// the backend can only ever reach pages it was given. Pinned memory (`direct`) is leaked
    /// on purpose: once freed, its frames would go back to the kernel and could hold anything
    /// while the backend may still map them by frame number.
    pub fn abandon(self) {
        if self.strategy == DmaStrategy::Direct {
            tracing::warn!(
                backend = self.peer,
                pages = self.arena.pages(),
                "the backend never reached Closed: keeping the pinned DMA memory for the life \
                 of this process, since the backend may still map its frames"
            );
            std::mem::forget(Arc::clone(&self.arena));
        }
        drop(self);
    }

    pub(crate) fn arena(&self) -> Arc<Arena> {
        Arc::clone(&self.arena)
    }
}

fn open_granter<P: Platform>(platform: &P, peer: DomId) -> Result<P::GrantAlloc, DmaError> {
    platform
        .grant_allocator()
        .map_err(|source| DmaError::Grant {
            what: "opening the grant allocator",
            pages: 0,
            peer,
            source,
        })
}

#[cfg(test)]
mod tests;
