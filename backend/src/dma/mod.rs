//! How the backend reaches the frontend's buffers under each DMA strategy
//! (`docs/PROTOCOL.md` sections 4 to 6).
//!
//! This module owns every mapping of the frontend's buffer memory for one connected device:
//! the per-request grant mappings, the persistent-grant cache, the bounce pool, and the
//! foreign-mapping chunk cache of `direct`. [`AddressSpace::map_chain`] turns a validated
//! [`Chain`] into a [`MappedChain`] of windows; dropping the `MappedChain` releases whatever was
//! mapped for that request only (per-request grants are unmapped there, before the caller
//! publishes the chain as used). Every address is decoded strictly under the negotiated
//! strategy: a wrong tag, a buffer outside its page or the pool, a frame or grant that cannot be
//! mapped, or a device-writable buffer on a read-only grant is an error for the device, never a
//! guess.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use xenvirtio_virtio::dma::{DmaError, DmaStrategy};
use xenvirtio_virtio::protocol::{PAGE_SIZE, decode_directory_page, directory_pages};
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{ForeignMapper, GrantMapper, MappedPages};
use xenvirtio_xen::{Access, DomId, GrantRef, XenError};

use xenvirtio_virtio::device_queue::{Chain, ChainDescriptor};

/// Frames per chunk of the `direct` map cache: 2 MiB.
pub const DIRECT_CHUNK_PAGES: u64 = 512;
/// Chunks the `direct` cache keeps mapped (1 GiB of the frontend's memory).
pub const DIRECT_CACHE_CHUNKS: usize = 512;
/// How long a `direct` chunk that could not be mapped whole is not tried again (finding 5 of
/// issue 13: a chunk with a paged-out frame cost up to 0.5 s on every request). Meanwhile
/// requests in it map only their own pages, as they did after a failed attempt.
pub const DIRECT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Persistent-grant mappings (gntdev VMAs) kept per device. Each batch of new refs is one
/// mapping; past this many the oldest batch is unmapped (its refs are mapped again when next
/// used), so a frontend that touches one new page per request costs at most this many VMAs
/// (finding 3 of issue 13: it cost one per page, up to `max-persistent-grants`).
pub const MAX_PERSISTENT_MAPPINGS: usize = 32;
/// Unmappable chunks remembered at most (the oldest is forgotten first).
pub const DIRECT_NEGATIVE_ENTRIES: usize = 256;

/// Why a chain's buffers could not be reached. Each is a protocol error for the device.
#[derive(Debug, thiserror::Error)]
pub enum DmaMapError {
    /// The address breaks the strategy's encoding or range rule.
    #[error("descriptor address rejected")]
    Address(#[from] DmaError),
    /// Mapping failed (a grant not granted to us, a frame that does not exist, ...).
    #[error("cannot map the frontend's memory")]
    Map(#[from] XenError),
    /// A buffer the device must write is backed by a read-only mapping.
    #[error("device-writable buffer at {addr:#x} is backed by read-only memory")]
    WritableOnReadOnly {
        /// The descriptor's address.
        addr: u64,
    },
    /// A window could not be read (cannot happen for windows built here).
    #[error("mapped memory access failed")]
    Mem(#[from] xenvirtio_xen::mem::MemError),
    /// The bounce-pool description is inconsistent.
    #[error("bounce pool: {0}")]
    BadPool(String),
}

/// Counters of one device's mappings, for `stats`, benchmarks and leak checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapCounters {
    /// Map operations (each a batched ioctl on real Xen).
    pub map_calls: u64,
    /// Pages mapped by those operations.
    pub pages_mapped: u64,
    /// Chains resolved.
    pub chains: u64,
    /// Buffers served from the persistent-grant or direct cache without mapping.
    pub cache_hits: u64,
    /// `direct` chunk maps skipped because the chunk failed to map within the backoff.
    pub negative_hits: u64,
}

/// A mapping shared by the pieces of chains that use it.
type SharedMapping = Arc<dyn MappedPages>;

/// One buffer (or part of one) of a mapped chain.
#[derive(Clone)]
struct Piece {
    map: SharedMapping,
    offset: usize,
    len: usize,
    writable: bool,
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Piece")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Piece {
    fn window(&self) -> SharedMem<'_> {
        let w = self
            .map
            .mem()
            .slice(self.offset, self.len)
            .expect("pieces are built inside their mapping");
        if self.writable { w } else { w.read_only() }
    }
}

/// The buffers of one chain, mapped. Dropping it releases the request's own mappings.
#[derive(Debug, Default)]
pub struct MappedChain {
    pieces: Vec<Piece>,
}

impl MappedChain {
    /// Windows onto the device-readable buffers, in order (read-only).
    pub fn readable(&self) -> Vec<SharedMem<'_>> {
        self.pieces
            .iter()
            .filter(|p| !p.writable)
            .map(Piece::window)
            .collect()
    }

    /// Windows onto the device-writable buffers, in order.
    pub fn writable(&self) -> Vec<SharedMem<'_>> {
        self.pieces
            .iter()
            .filter(|p| p.writable)
            .map(Piece::window)
            .collect()
    }
}

/// Adapts a concrete mapping type to the shared trait object.
fn share<M: MappedPages + 'static>(m: M) -> SharedMapping {
    Arc::new(m)
}

/// The frontend's memory as the device sees it under the negotiated strategy.
pub enum AddressSpace<G: GrantMapper, F: ForeignMapper> {
    /// `grant`.
    Grant(GrantSpace<G>),
    /// `bounce`.
    Bounce(BounceSpace),
    /// `direct`.
    Direct(DirectSpace<F>),
}

impl<G: GrantMapper, F: ForeignMapper> std::fmt::Debug for AddressSpace<G, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AddressSpace::Grant(g) if g.persistent.is_some() => "AddressSpace::Grant(persistent)",
            AddressSpace::Grant(_) => "AddressSpace::Grant",
            AddressSpace::Bounce(_) => "AddressSpace::Bounce",
            AddressSpace::Direct(_) => "AddressSpace::Direct",
        })
    }
}

impl<G, F> AddressSpace<G, F>
where
    G: GrantMapper,
    G::Mapping: 'static,
    F: ForeignMapper,
    F::Mapping: 'static,
{
    /// `grant`, with a persistent cache of up to `max_persistent` pages if the frontend asked
    /// for one (`feature-persistent`).
    pub fn grant(mapper: Arc<G>, peer: DomId, persistent: bool, max_persistent: usize) -> Self {
        AddressSpace::Grant(GrantSpace {
            mapper,
            peer,
            persistent: persistent.then(HashMap::new),
            max_persistent,
            batches: VecDeque::new(),
        })
    }

    /// `bounce`: reads the pool's directory (`dir_refs`, granted read-only) and maps the
    /// `pages` pool pages in order, in one batch.
    pub fn bounce(
        mapper: &G,
        counters: &mut MapCounters,
        peer: DomId,
        pages: u32,
        dir_refs: &[GrantRef],
    ) -> Result<Self, DmaMapError> {
        let pages_usize = pages as usize;
        if dir_refs.len() != directory_pages(pages_usize) {
            return Err(DmaMapError::BadPool(format!(
                "{} directory pages listed for {pages} pool pages (need {})",
                dir_refs.len(),
                directory_pages(pages_usize)
            )));
        }
        let dir = mapper.map(peer, dir_refs, Access::ReadOnly)?;
        counters.map_calls += 1;
        counters.pages_mapped += dir_refs.len() as u64;
        let mut refs = Vec::with_capacity(pages_usize);
        for i in 0..dir_refs.len() {
            // One copy of each directory page into private memory, parsed there.
            let page = dir.mem().read_array::<PAGE_SIZE>(i * PAGE_SIZE)?;
            refs.extend(decode_directory_page(&page, pages_usize - refs.len()));
        }
        drop(dir);
        let pool = mapper.map(peer, &refs, Access::ReadWrite)?;
        counters.map_calls += 1;
        counters.pages_mapped += u64::from(pages);
        Ok(AddressSpace::Bounce(BounceSpace {
            pool: share(pool),
            pool_len: u64::from(pages) * PAGE_SIZE as u64,
        }))
    }

    /// `direct`, keeping up to `max_chunks` 2 MiB chunks mapped.
    pub fn direct(mapper: Arc<F>, peer: DomId, max_chunks: usize) -> Self {
        AddressSpace::Direct(DirectSpace {
            mapper,
            peer,
            chunks: HashMap::new(),
            lru: VecDeque::new(),
            max_chunks: max_chunks.max(1),
            unmappable: VecDeque::new(),
            retry_backoff: DIRECT_RETRY_BACKOFF,
        })
    }

    /// Sets how long an unmappable `direct` chunk is not tried again (tests use a short one).
    pub fn with_direct_retry_backoff(mut self, backoff: Duration) -> Self {
        if let AddressSpace::Direct(d) = &mut self {
            d.retry_backoff = backoff;
        }
        self
    }

    /// The strategy.
    pub fn strategy(&self) -> DmaStrategy {
        match self {
            AddressSpace::Grant(_) => DmaStrategy::Grant,
            AddressSpace::Bounce(_) => DmaStrategy::Bounce,
            AddressSpace::Direct(_) => DmaStrategy::Direct,
        }
    }

    /// Pages this space keeps mapped between requests (pool, persistent grants, direct chunks).
    pub fn resident_pages(&self) -> usize {
        match self {
            AddressSpace::Grant(g) => g.persistent.as_ref().map_or(0, HashMap::len),
            AddressSpace::Bounce(b) => b.pool.pages(),
            AddressSpace::Direct(d) => d.chunks.values().map(|c| c.pages()).sum(),
        }
    }

    /// Maps every buffer of `chain`.
    pub fn map_chain(
        &mut self,
        chain: &Chain,
        counters: &mut MapCounters,
    ) -> Result<MappedChain, DmaMapError> {
        counters.chains += 1;
        match self {
            AddressSpace::Grant(g) => g.map_chain(&chain.descriptors, counters),
            AddressSpace::Bounce(b) => b.map_chain(&chain.descriptors),
            AddressSpace::Direct(d) => d.map_chain(&chain.descriptors, counters),
        }
    }

    /// Copies `len` bytes at DMA address `addr` into private memory (an indirect table).
    pub fn read(
        &mut self,
        addr: u64,
        len: u32,
        counters: &mut MapCounters,
    ) -> Result<Vec<u8>, DmaMapError> {
        let desc = ChainDescriptor {
            addr,
            len,
            writable: false,
        };
        let mapped = match self {
            AddressSpace::Grant(g) => g.map_chain(&[desc], counters)?,
            AddressSpace::Bounce(b) => b.map_chain(&[desc])?,
            AddressSpace::Direct(d) => d.map_chain(&[desc], counters)?,
        };
        let mut out = vec![0u8; len as usize];
        let mut done = 0;
        for w in mapped.readable() {
            w.read(0, &mut out[done..done + w.len()])?;
            done += w.len();
        }
        Ok(out)
    }
}

mod bounce;
mod direct;
mod grant;
#[cfg(test)]
mod tests;

pub use bounce::BounceSpace;
pub use direct::DirectSpace;
pub use grant::GrantSpace;
