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
use std::time::{Duration, Instant};

use xenvirtio_virtio::dma::{DmaAddr, DmaError, DmaStrategy};
use xenvirtio_virtio::protocol::{PAGE_SIZE, decode_directory_page, directory_pages};
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{ForeignMapper, GrantMapper, MappedPages};
use xenvirtio_xen::{Access, DomId, Gfn, GrantRef, XenError};

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

/// `grant`: maps each chain's grants, in at most two batches (read-only and read-write), and
/// optionally keeps grants of a persistent arena mapped.
pub struct GrantSpace<G: GrantMapper> {
    mapper: Arc<G>,
    peer: DomId,
    /// Persistent grants: ref -> (mapping, page index). `None` without `feature-persistent`.
    persistent: Option<HashMap<GrantRef, (SharedMapping, usize)>>,
    max_persistent: usize,
    /// The persistent mappings with their refs, oldest first (at most
    /// [`MAX_PERSISTENT_MAPPINGS`]).
    batches: VecDeque<Vec<GrantRef>>,
}

impl<G: GrantMapper> std::fmt::Debug for GrantSpace<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantSpace")
            .field("peer", &self.peer)
            .field("persistent", &self.persistent.as_ref().map(HashMap::len))
            .finish_non_exhaustive()
    }
}

/// `bounce`: the pool, mapped once at connect.
pub struct BounceSpace {
    pool: SharedMapping,
    pool_len: u64,
}

impl std::fmt::Debug for BounceSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BounceSpace")
            .field("pool_len", &self.pool_len)
            .finish_non_exhaustive()
    }
}

/// `direct`: foreign mappings of 2 MiB chunks of the frontend's memory, least recently used
/// dropped first.
pub struct DirectSpace<F: ForeignMapper> {
    mapper: Arc<F>,
    peer: DomId,
    chunks: HashMap<u64, SharedMapping>,
    lru: VecDeque<u64>,
    max_chunks: usize,
    /// Chunks that could not be mapped whole, with when they may be tried again, oldest first.
    unmappable: VecDeque<(u64, Instant)>,
    retry_backoff: Duration,
}

impl<F: ForeignMapper> std::fmt::Debug for DirectSpace<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectSpace")
            .field("peer", &self.peer)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
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

/// Unmaps the oldest persistent batch that holds none of `keep`'s refs; false if there is none.
fn evict_oldest_batch(
    batches: &mut VecDeque<Vec<GrantRef>>,
    cache: &mut HashMap<GrantRef, (SharedMapping, usize)>,
    keep: &[(GrantRef, usize, &ChainDescriptor)],
) -> bool {
    let Some(pos) = batches
        .iter()
        .position(|b| !keep.iter().any(|(g, _, _)| b.contains(g)))
    else {
        return false;
    };
    for gref in batches.remove(pos).unwrap_or_default() {
        cache.remove(&gref);
    }
    true
}

impl<G: GrantMapper> GrantSpace<G>
where
    G::Mapping: 'static,
{
    fn map_chain(
        &mut self,
        descs: &[ChainDescriptor],
        counters: &mut MapCounters,
    ) -> Result<MappedChain, DmaMapError> {
        // Decode everything first: nothing is mapped for a chain with a bad address.
        let mut decoded = Vec::with_capacity(descs.len());
        for d in descs {
            match DmaAddr::decode_range(DmaStrategy::Grant, d.addr, d.len, 0)? {
                DmaAddr::Grant { gref, offset } => decoded.push((gref, usize::from(offset), d)),
                _ => unreachable!("decode under Grant yields grant addresses"),
            }
        }
        if self.persistent.is_some() {
            let mut fresh = self.fresh_refs(&decoded);
            if !fresh.is_empty() && self.batches.len() >= MAX_PERSISTENT_MAPPINGS {
                self.coalesce(&fresh, counters);
                fresh = self.fresh_refs(&decoded);
            }
            let cache = self.persistent.as_mut().expect("checked above");
            // Map the chain's new refs in one batch, and keep them if there is room.
            if cache.len() + fresh.len() <= self.max_persistent {
                let mut mapped = true;
                if !fresh.is_empty() {
                    // Keep the number of mappings bounded: unmap the oldest batch first (the
                    // pieces of chains in flight keep it alive until they are done).
                    while self.batches.len() >= MAX_PERSISTENT_MAPPINGS {
                        if !evict_oldest_batch(&mut self.batches, cache, &decoded) {
                            break;
                        }
                    }
                    let m = loop {
                        match self.mapper.map(self.peer, &fresh, Access::ReadWrite) {
                            Ok(m) => break Some(share(m)),
                            // Over the domain's page budget: give back the oldest batch.
                            Err(XenError::OverBudget { .. })
                                if evict_oldest_batch(&mut self.batches, cache, &decoded) => {}
                            Err(XenError::OverBudget { .. }) => break None,
                            Err(e) => return Err(e.into()),
                        }
                    };
                    match m {
                        Some(m) => {
                            counters.map_calls += 1;
                            counters.pages_mapped += fresh.len() as u64;
                            for (i, gref) in fresh.iter().enumerate() {
                                cache.insert(*gref, (Arc::clone(&m), i));
                            }
                            self.batches.push_back(fresh.clone());
                        }
                        None => mapped = false,
                    }
                }
                if mapped {
                    let hits = (decoded.len() - fresh.len()) as u64;
                    counters.cache_hits += hits;
                    let pieces = decoded
                        .iter()
                        .map(|(gref, offset, d)| {
                            let (map, page) = &cache[gref];
                            Piece {
                                map: Arc::clone(map),
                                offset: page * PAGE_SIZE + offset,
                                len: d.len as usize,
                                writable: d.writable,
                            }
                        })
                        .collect();
                    return Ok(MappedChain { pieces });
                }
            }
            // The cache is full: this chain is mapped per request, as without the feature.
        }
        self.map_per_request(&decoded, counters)
    }

    /// The refs of `decoded` that the persistent cache does not hold yet, each once.
    fn fresh_refs(&self, decoded: &[(GrantRef, usize, &ChainDescriptor)]) -> Vec<GrantRef> {
        let mut fresh: Vec<GrantRef> = Vec::new();
        if let Some(cache) = self.persistent.as_ref() {
            for (gref, _, _) in decoded {
                if !cache.contains_key(gref) && !fresh.contains(gref) {
                    fresh.push(*gref);
                }
            }
        }
        fresh
    }

    /// With [`MAX_PERSISTENT_MAPPINGS`] batches already mapped, maps every cached ref and
    /// `fresh` again as one batch, instead of giving the oldest batch back. A frontend that
    /// takes each buffer from anywhere in its arena touches a few new pages per request, so its
    /// batches are small; evicting one, whose pages the next requests use again, made the
    /// cache churn (about 0.6 map calls per request under the guest kernel's VDUSE disk,
    /// `scripts/bench.sh`). Merged, the whole arena ends up in one mapping and steady state maps
    /// nothing. Only while everything fits under `max_persistent`: past it, the oldest batch
    /// is evicted as before, so a frontend that cycles through more refs than that costs no
    /// more than it did. The old mappings are dropped first (chains in flight keep theirs);
    /// if the merged map fails (the page budget, a revoked ref) the cache starts empty again.
    fn coalesce(&mut self, fresh: &[GrantRef], counters: &mut MapCounters) {
        let Some(cache) = self.persistent.as_mut() else {
            return;
        };
        if cache.len() + fresh.len() > self.max_persistent {
            return;
        }
        let mut all: Vec<GrantRef> = self.batches.iter().flatten().copied().collect();
        all.extend_from_slice(fresh);
        cache.clear();
        self.batches.clear();
        match self.mapper.map(self.peer, &all, Access::ReadWrite) {
            Ok(m) => {
                let m = share(m);
                counters.map_calls += 1;
                counters.pages_mapped += all.len() as u64;
                for (i, gref) in all.iter().enumerate() {
                    cache.insert(*gref, (Arc::clone(&m), i));
                }
                self.batches.push_back(all);
            }
            Err(e) => {
                tracing::debug!(
                    peer = self.peer,
                    pages = all.len(),
                    "persistent grants not merged: {e}"
                );
            }
        }
    }

    fn map_per_request(
        &self,
        decoded: &[(GrantRef, usize, &ChainDescriptor)],
        counters: &mut MapCounters,
    ) -> Result<MappedChain, DmaMapError> {
        let mut groups: [(Vec<GrantRef>, Access); 2] = [
            (Vec::new(), Access::ReadOnly),
            (Vec::new(), Access::ReadWrite),
        ];
        for (gref, _, d) in decoded {
            let g = &mut groups[usize::from(d.writable)].0;
            if !g.contains(gref) {
                g.push(*gref);
            }
        }
        let mut maps: [Option<SharedMapping>; 2] = [None, None];
        for (i, (refs, access)) in groups.iter().enumerate() {
            if refs.is_empty() {
                continue;
            }
            let m = self.mapper.map(self.peer, refs, *access).map_err(|e| {
                // A writable buffer on a read-only grant shows up as a refused RW map.
                if *access == Access::ReadWrite
                    && matches!(e.refusal(), Some(xenvirtio_xen::Refusal::ReadOnlyGrant))
                {
                    DmaMapError::WritableOnReadOnly {
                        addr: decoded[0].2.addr,
                    }
                } else {
                    DmaMapError::Map(e)
                }
            })?;
            counters.map_calls += 1;
            counters.pages_mapped += refs.len() as u64;
            maps[i] = Some(share(m));
        }
        let pieces = decoded
            .iter()
            .map(|(gref, offset, d)| {
                let i = usize::from(d.writable);
                let page = groups[i]
                    .0
                    .iter()
                    .position(|g| g == gref)
                    .expect("grouped above");
                Piece {
                    map: Arc::clone(maps[i].as_ref().expect("mapped above")),
                    offset: page * PAGE_SIZE + offset,
                    len: d.len as usize,
                    writable: d.writable,
                }
            })
            .collect();
        Ok(MappedChain { pieces })
    }
}

impl BounceSpace {
    fn map_chain(&self, descs: &[ChainDescriptor]) -> Result<MappedChain, DmaMapError> {
        let mut pieces = Vec::with_capacity(descs.len());
        for d in descs {
            match DmaAddr::decode_range(DmaStrategy::Bounce, d.addr, d.len, self.pool_len)? {
                DmaAddr::Bounce { offset } => pieces.push(Piece {
                    map: Arc::clone(&self.pool),
                    // Within pool_len, which is a usize-sized mapping.
                    offset: offset as usize,
                    len: d.len as usize,
                    writable: d.writable,
                }),
                _ => unreachable!("decode under Bounce yields bounce addresses"),
            }
        }
        Ok(MappedChain { pieces })
    }
}

impl<F: ForeignMapper> DirectSpace<F>
where
    F::Mapping: 'static,
{
    /// The chunk `index`, mapped whole, or `None` if it cannot be (now, or within the backoff
    /// after a failed attempt).
    fn chunk(&mut self, index: u64, counters: &mut MapCounters) -> Option<SharedMapping> {
        if let Some(c) = self.chunks.get(&index) {
            counters.cache_hits += 1;
            let c = Arc::clone(c);
            if let Some(pos) = self.lru.iter().position(|&i| i == index) {
                self.lru.remove(pos);
            }
            self.lru.push_back(index);
            return Some(c);
        }
        let now = Instant::now();
        self.unmappable.retain(|&(_, until)| until > now);
        if self.unmappable.iter().any(|&(i, _)| i == index) {
            counters.negative_hits += 1;
            return None;
        }
        if self.chunks.len() >= self.max_chunks {
            // Evict before mapping, so the cache never holds more than its cap (or budget).
            if let Some(old) = self.lru.pop_front() {
                self.chunks.remove(&old);
            }
        }
        let first: Gfn = index * DIRECT_CHUNK_PAGES;
        let gfns: Vec<Gfn> = (first..first + DIRECT_CHUNK_PAGES).collect();
        let result = loop {
            match self.mapper.map(self.peer, &gfns, Access::ReadWrite) {
                // Over the domain's page budget: give back the least recently used chunk.
                Err(XenError::OverBudget { .. }) if !self.lru.is_empty() => {
                    if let Some(old) = self.lru.pop_front() {
                        self.chunks.remove(&old);
                    }
                }
                r => break r,
            }
        };
        let m = match result {
            Ok(m) => share(m),
            Err(e) => {
                tracing::debug!(chunk = index, error = %e, "direct chunk not mappable; backing off");
                if self.unmappable.len() >= DIRECT_NEGATIVE_ENTRIES {
                    self.unmappable.pop_front();
                }
                self.unmappable
                    .push_back((index, Instant::now() + self.retry_backoff));
                return None;
            }
        };
        counters.map_calls += 1;
        counters.pages_mapped += DIRECT_CHUNK_PAGES;
        self.chunks.insert(index, Arc::clone(&m));
        self.lru.push_back(index);
        Some(m)
    }

    fn map_chain(
        &mut self,
        descs: &[ChainDescriptor],
        counters: &mut MapCounters,
    ) -> Result<MappedChain, DmaMapError> {
        let chunk_bytes = DIRECT_CHUNK_PAGES * PAGE_SIZE as u64;
        let mut pieces = Vec::new();
        for d in descs {
            let DmaAddr::Direct { gpa } =
                DmaAddr::decode_range(DmaStrategy::Direct, d.addr, d.len, 0)?
            else {
                unreachable!("decode under Direct yields direct addresses")
            };
            let mut at = gpa;
            let end = gpa + u64::from(d.len);
            while at < end {
                let index = at / chunk_bytes;
                let within = at % chunk_bytes;
                let n = (chunk_bytes - within).min(end - at);
                let map = match self.chunk(index, counters) {
                    Some(m) => m,
                    // A chunk that reaches past the frontend's memory (or into a hole) cannot
                    // be mapped whole: map just this buffer's pages, for this request only.
                    None => {
                        let first = at / PAGE_SIZE as u64;
                        let last = (at + n - 1) / PAGE_SIZE as u64;
                        let gfns: Vec<Gfn> = (first..=last).collect();
                        let m = share(self.mapper.map(self.peer, &gfns, Access::ReadWrite)?);
                        counters.map_calls += 1;
                        counters.pages_mapped += gfns.len() as u64;
                        pieces.push(Piece {
                            map: m,
                            offset: (at % PAGE_SIZE as u64) as usize,
                            len: n as usize,
                            writable: d.writable,
                        });
                        at += n;
                        continue;
                    }
                };
                pieces.push(Piece {
                    map,
                    offset: within as usize,
                    len: n as usize,
                    writable: d.writable,
                });
                at += n;
            }
        }
        Ok(MappedChain { pieces })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_virtio::protocol::encode_directory_page;
    use xenvirtio_xen::loopback::{LoopbackDomain, LoopbackXen};
    use xenvirtio_xen::platform::{
        GrantAllocator, GrantedPages, PinnedAllocator, PinnedPages, Platform,
    };

    type Space =
        AddressSpace<<LoopbackDomain as Platform>::GrantMap, <LoopbackDomain as Platform>::Foreign>;

    const FRONT: DomId = 3;

    fn setup() -> (LoopbackXen, LoopbackDomain, LoopbackDomain) {
        let hv = LoopbackXen::new();
        let back = hv.domain(0);
        let front = hv.domain(FRONT);
        (hv, back, front)
    }

    fn gaddr(gref: GrantRef, offset: u16) -> u64 {
        DmaAddr::Grant { gref, offset }.encode()
    }

    fn chain(descs: &[(u64, u32, bool)]) -> Chain {
        Chain {
            head: 0,
            descriptors: descs
                .iter()
                .map(|&(addr, len, writable)| ChainDescriptor {
                    addr,
                    len,
                    writable,
                })
                .collect(),
        }
    }

    #[test]
    fn per_request_grants_are_mapped_for_the_request_only() {
        let (hv, back, front) = setup();
        let pages = front
            .grant_allocator()
            .unwrap()
            .grant(0, 2, Access::ReadWrite)
            .unwrap();
        pages.mem().write(100, b"request").unwrap();
        let (r0, r1) = (pages.refs()[0], pages.refs()[1]);
        let mut space: Space =
            AddressSpace::grant(Arc::new(back.grant_mapper().unwrap()), FRONT, false, 0);
        let mut c = MapCounters::default();
        {
            let m = space
                .map_chain(
                    &chain(&[
                        (gaddr(r0, 100), 7, false),
                        (gaddr(r1, 0), 16, true),
                        (gaddr(r1, 16), 1, true),
                    ]),
                    &mut c,
                )
                .unwrap();
            assert_eq!(m.readable()[0].read_array::<7>(0).unwrap(), *b"request");
            assert!(!m.readable()[0].is_writable());
            m.writable()[1].write(0, b"!").unwrap();
            assert_eq!(
                hv.stats(0).grant_maps,
                2,
                "one read-only and one read-write batch"
            );
        }
        assert_eq!(pages.mem().read_array::<1>(4096 + 16).unwrap(), *b"!");
        assert_eq!(hv.stats(0).grant_maps, 0, "unmapped with the MappedChain");
        assert_eq!((c.map_calls, c.pages_mapped, c.chains), (2, 2, 1));
        assert_eq!(space.resident_pages(), 0);
    }

    #[test]
    fn bad_grant_addresses_are_refused() {
        let (_hv, back, front) = setup();
        let alloc = front.grant_allocator().unwrap();
        let rw = alloc.grant(0, 1, Access::ReadWrite).unwrap();
        let ro = alloc.grant(0, 1, Access::ReadOnly).unwrap();
        let other = alloc.grant(7, 1, Access::ReadWrite).unwrap();
        let mut space: Space =
            AddressSpace::grant(Arc::new(back.grant_mapper().unwrap()), FRONT, false, 0);
        let mut c = MapCounters::default();
        let mut try_map = |d: (u64, u32, bool)| space.map_chain(&chain(&[d]), &mut c).map(|_| ());
        assert!(try_map((gaddr(rw.refs()[0], 0), 4096, true)).is_ok());
        assert!(matches!(
            try_map((gaddr(rw.refs()[0], 1), 4096, true)),
            Err(DmaMapError::Address(DmaError::CrossesPage { .. }))
        ));
        assert!(matches!(
            try_map((DmaAddr::Bounce { offset: 0 }.encode(), 1, false)),
            Err(DmaMapError::Address(DmaError::WrongTag { .. }))
        ));
        assert!(matches!(
            try_map((0x1000, 1, false)),
            Err(DmaMapError::Address(_))
        ));
        assert!(try_map((gaddr(ro.refs()[0], 0), 8, false)).is_ok());
        assert!(matches!(
            try_map((gaddr(ro.refs()[0], 0), 8, true)),
            Err(DmaMapError::WritableOnReadOnly { .. })
        ));
        assert!(matches!(
            try_map((gaddr(other.refs()[0], 0), 8, false)),
            Err(DmaMapError::Map(_))
        ));
        assert!(matches!(
            try_map((gaddr(9999, 0), 8, false)),
            Err(DmaMapError::Map(_))
        ));
    }

    #[test]
    fn persistent_grants_stay_mapped_up_to_the_cap() {
        let (hv, back, front) = setup();
        let pages = front
            .grant_allocator()
            .unwrap()
            .grant(0, 4, Access::ReadWrite)
            .unwrap();
        let refs = pages.refs().to_vec();
        let mut space: Space =
            AddressSpace::grant(Arc::new(back.grant_mapper().unwrap()), FRONT, true, 3);
        let mut c = MapCounters::default();
        let ch = chain(&[
            (gaddr(refs[0], 0), 16, false),
            (gaddr(refs[1], 0), 512, true),
        ]);
        drop(space.map_chain(&ch, &mut c).unwrap());
        drop(space.map_chain(&ch, &mut c).unwrap());
        assert_eq!(c.map_calls, 1, "the second chain hits the cache");
        assert_eq!(c.cache_hits, 2);
        assert_eq!(space.resident_pages(), 2);
        assert_eq!(
            hv.stats(0).grant_mapped_pages,
            2,
            "kept mapped between requests"
        );
        // Read-only view of a device-readable buffer, even on a persistent RW mapping.
        let m = space.map_chain(&ch, &mut c).unwrap();
        assert!(!m.readable()[0].is_writable());
        drop(m);
        // Two more refs would exceed the cap of 3: that chain is mapped per request.
        let ch2 = chain(&[
            (gaddr(refs[2], 0), 16, false),
            (gaddr(refs[3], 0), 16, true),
        ]);
        drop(space.map_chain(&ch2, &mut c).unwrap());
        assert_eq!(space.resident_pages(), 2);
        assert_eq!(hv.stats(0).grant_mapped_pages, 2);
        drop(space);
        assert_eq!(
            hv.stats(0).grant_maps,
            0,
            "everything unmapped with the space"
        );
    }

    #[test]
    fn the_bounce_pool_is_mapped_once_through_its_directory() {
        let (hv, back, front) = setup();
        let alloc = front.grant_allocator().unwrap();
        let pool = alloc.grant(0, 3, Access::ReadWrite).unwrap();
        let dir = alloc.grant(0, 1, Access::ReadOnly).unwrap();
        dir.mem()
            .write(0, &encode_directory_page(pool.refs(), 0))
            .unwrap();
        pool.mem().write(2 * 4096 + 10, b"pooled").unwrap();
        let mapper = back.grant_mapper().unwrap();
        let mut c = MapCounters::default();
        let mut space: Space = AddressSpace::bounce(&mapper, &mut c, FRONT, 3, dir.refs()).unwrap();
        assert_eq!(space.resident_pages(), 3);
        assert_eq!(
            hv.stats(0).grant_mapped_pages,
            3,
            "the directory was unmapped again"
        );
        let b = |o: u64| DmaAddr::Bounce { offset: o }.encode();
        // A buffer may span pool pages.
        let m = space
            .map_chain(
                &chain(&[(b(2 * 4096 + 10), 6, false), (b(4000), 200, true)]),
                &mut c,
            )
            .unwrap();
        assert_eq!(m.readable()[0].read_array::<6>(0).unwrap(), *b"pooled");
        m.writable()[0].fill(0, 200, 0xee).unwrap();
        drop(m);
        assert_eq!(pool.mem().read_array::<1>(4096 + 103).unwrap(), [0xee]);
        assert!(matches!(
            space.map_chain(&chain(&[(b(3 * 4096 - 4), 5, false)]), &mut c),
            Err(DmaMapError::Address(DmaError::OutsidePool { .. }))
        ));
        assert_eq!(space.read(b(2 * 4096 + 10), 6, &mut c).unwrap(), b"pooled");
        // A directory that does not match the page count.
        assert!(matches!(
            AddressSpace::<_, <LoopbackDomain as Platform>::Foreign>::bounce(
                &mapper,
                &mut c,
                FRONT,
                2000,
                dir.refs()
            ),
            Err(DmaMapError::BadPool(_))
        ));
    }

    #[test]
    fn direct_maps_chunks_of_pinned_memory() {
        let (hv, back, front) = setup();
        let pinned = front.pinned_allocator().unwrap().alloc_pinned(4).unwrap();
        pinned.mem().write(4096 + 5, b"direct").unwrap();
        let gpa = pinned.gfns()[1] * 4096 + 5;
        let mut space: Space =
            AddressSpace::direct(Arc::new(back.foreign_mapper().unwrap()), FRONT, 2);
        let mut c = MapCounters::default();
        let m = space.map_chain(&chain(&[(gpa, 6, false)]), &mut c).unwrap();
        assert_eq!(m.readable()[0].read_array::<6>(0).unwrap(), *b"direct");
        drop(m);
        drop(space.map_chain(&chain(&[(gpa, 6, true)]), &mut c).unwrap());
        assert_eq!(c.map_calls, 1, "the chunk stays mapped");
        assert!(hv.stats(0).foreign_mapped_pages >= 1);
        assert!(matches!(
            space.map_chain(&chain(&[(gaddr(1, 0), 6, false)]), &mut c),
            Err(DmaMapError::Address(DmaError::WrongTag { .. }))
        ));
        // Only Dom0 may map foreign memory.
        let other = hv.domain(5);
        let mut space: Space =
            AddressSpace::direct(Arc::new(other.foreign_mapper().unwrap()), FRONT, 2);
        assert!(matches!(
            space.map_chain(&chain(&[(gpa, 6, false)]), &mut c),
            Err(DmaMapError::Map(_))
        ));
    }

    /// A foreign mapper that counts its map attempts, successful or not, by size.
    struct CountingForeign {
        inner: <LoopbackDomain as Platform>::Foreign,
        chunk_attempts: std::sync::atomic::AtomicUsize,
        attempts: std::sync::atomic::AtomicUsize,
    }

    impl ForeignMapper for CountingForeign {
        type Mapping = <<LoopbackDomain as Platform>::Foreign as ForeignMapper>::Mapping;
        fn map(&self, dom: DomId, gfns: &[Gfn], access: Access) -> Result<Self::Mapping, XenError> {
            use std::sync::atomic::Ordering::Relaxed;
            self.attempts.fetch_add(1, Relaxed);
            if gfns.len() as u64 == DIRECT_CHUNK_PAGES {
                self.chunk_attempts.fetch_add(1, Relaxed);
            }
            self.inner.map(dom, gfns, access)
        }
        fn restrict(&self, dom: DomId) -> Result<(), XenError> {
            self.inner.restrict(dom)
        }
    }

    /// Finding 5 of issue 13: a `direct` chunk that cannot be mapped whole (here it reaches
    /// past the frontend's 256 pages of RAM; on Xen, a paged-out frame costs up to 0.5 s of
    /// retries) is tried once per backoff window, not on every request; the requests in it
    /// are still served through their own pages.
    #[test]
    fn hostile_direct_unmappable_chunk_is_not_retried() {
        use std::sync::atomic::Ordering::Relaxed;
        let hv = LoopbackXen::with_config(xenvirtio_xen::loopback::LoopbackConfig {
            ram_pages: 256,
            ..Default::default()
        });
        let back = hv.domain(0);
        let front = hv.domain(FRONT);
        let pinned = front.pinned_allocator().unwrap().alloc_pinned(2).unwrap();
        pinned.mem().write(4096 + 7, b"direct").unwrap();
        let gpa = pinned.gfns()[1] * 4096 + 7;
        let mapper = Arc::new(CountingForeign {
            inner: back.foreign_mapper().unwrap(),
            chunk_attempts: Default::default(),
            attempts: Default::default(),
        });
        let mut space: AddressSpace<<LoopbackDomain as Platform>::GrantMap, CountingForeign> =
            AddressSpace::direct(Arc::clone(&mapper), FRONT, 4);
        let mut c = MapCounters::default();
        const REQUESTS: usize = 50;
        let started = Instant::now();
        for _ in 0..REQUESTS {
            let m = space.map_chain(&chain(&[(gpa, 6, false)]), &mut c).unwrap();
            assert_eq!(m.readable()[0].read_array::<6>(0).unwrap(), *b"direct");
        }
        assert!(
            started.elapsed() < DIRECT_RETRY_BACKOFF,
            "the requests ran within one backoff window"
        );
        let chunk_attempts = mapper.chunk_attempts.load(Relaxed);
        assert_eq!(
            chunk_attempts, 1,
            "{REQUESTS} requests in one backoff window made {chunk_attempts} attempts to map \
             the unmappable chunk (expected 1)"
        );
        assert_eq!(
            mapper.attempts.load(Relaxed),
            1 + REQUESTS,
            "each request still maps its own page"
        );
        // After the window, the chunk is tried once more.
        std::thread::sleep(DIRECT_RETRY_BACKOFF + Duration::from_millis(50));
        for _ in 0..REQUESTS {
            drop(space.map_chain(&chain(&[(gpa, 6, false)]), &mut c).unwrap());
        }
        assert_eq!(
            mapper.chunk_attempts.load(Relaxed),
            2,
            "one attempt per window"
        );
        assert_eq!(
            hv.stats(0).foreign_maps,
            0,
            "per-request mappings were released"
        );
    }

    /// Issue 14: a frontend whose buffers come from anywhere in its arena, a page at a time,
    /// fills [`MAX_PERSISTENT_MAPPINGS`] small batches long before it has touched the whole
    /// arena. The batches are merged then, not evicted: after one pass over the arena, another
    /// pass maps nothing, and the mappings stay within the bound throughout.
    #[test]
    fn persistent_grants_are_merged_instead_of_churning() {
        const PAGES: usize = 256;
        let (hv, back, front) = setup();
        let pages = front
            .grant_allocator()
            .unwrap()
            .grant(0, PAGES, Access::ReadWrite)
            .unwrap();
        for i in 0..PAGES {
            pages
                .mem()
                .write(i * 4096, &(i as u32).to_le_bytes())
                .unwrap();
        }
        let refs = pages.refs().to_vec();
        let mut space: Space =
            AddressSpace::grant(Arc::new(back.grant_mapper().unwrap()), FRONT, true, 1024);
        let mut c = MapCounters::default();
        // a stride that visits every page once per pass, never two neighbours in a row
        let order: Vec<usize> = (0..PAGES).map(|i| (i * 97) % PAGES).collect();
        let read = |space: &mut Space, c: &mut MapCounters, page: usize| {
            let m = space
                .map_chain(&chain(&[(gaddr(refs[page], 0), 4, false)]), c)
                .unwrap();
            let got = u32::from_le_bytes(m.readable()[0].read_array::<4>(0).unwrap());
            assert_eq!(got as usize, page, "verified data");
        };
        let mut most = 0;
        for &p in &order {
            read(&mut space, &mut c, p);
            most = most.max(hv.stats(0).grant_maps);
        }
        let warm = c.map_calls;
        for &p in order.iter().rev() {
            read(&mut space, &mut c, p);
        }
        assert_eq!(
            c.map_calls, warm,
            "the second pass over the arena mapped something"
        );
        let now = hv.stats(0).grant_maps;
        assert!(
            most <= MAX_PERSISTENT_MAPPINGS && now <= MAX_PERSISTENT_MAPPINGS,
            "{most} mappings at most, {now} at the end (bound {MAX_PERSISTENT_MAPPINGS})"
        );
        drop(space);
        assert_eq!(hv.stats(0).grant_maps, 0);
    }

    /// Finding 3 of issue 13: under persistent grants, a frontend that uses one new page of its
    /// arena per request made one gntdev mapping (one VMA) per page, up to
    /// `max-persistent-grants`; the mappings per device now stay at or under
    /// [`MAX_PERSISTENT_MAPPINGS`] (32) however the pages are touched.
    #[test]
    fn hostile_persistent_grants_one_new_page_per_request() {
        const PAGES: usize = 1000;
        const VMA_BOUND: usize = 32;
        let (hv, back, front) = setup();
        let pages = front
            .grant_allocator()
            .unwrap()
            .grant(0, PAGES, Access::ReadWrite)
            .unwrap();
        for i in 0..PAGES {
            pages
                .mem()
                .write(i * 4096, &(i as u32).to_le_bytes())
                .unwrap();
        }
        let refs = pages.refs().to_vec();
        let mut space: Space =
            AddressSpace::grant(Arc::new(back.grant_mapper().unwrap()), FRONT, true, 1024);
        let mut c = MapCounters::default();
        let mut most = 0;
        for (round, &gref) in refs.iter().chain(refs.iter()).enumerate() {
            let m = space
                .map_chain(&chain(&[(gaddr(gref, 0), 4, false)]), &mut c)
                .unwrap();
            let got = u32::from_le_bytes(m.readable()[0].read_array::<4>(0).unwrap());
            assert_eq!(got as usize, round % PAGES, "verified data");
            most = most.max(hv.stats(0).grant_maps);
        }
        assert!(
            most <= VMA_BOUND,
            "{} requests, one new page each, left {most} grant mappings (VMAs) of one device \
             (bound {VMA_BOUND})",
            2 * PAGES
        );
        drop(space);
        assert_eq!(hv.stats(0).grant_maps, 0);
    }
}
