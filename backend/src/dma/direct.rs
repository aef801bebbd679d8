//! `direct`: the foreign-mapping chunk cache of the frontend's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenvirtio_virtio::device_queue::ChainDescriptor;
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_virtio::protocol::PAGE_SIZE;
use xenvirtio_xen::platform::ForeignMapper;
use xenvirtio_xen::{Access, DomId, Gfn, XenError};

use super::{
    DIRECT_CHUNK_PAGES, DIRECT_NEGATIVE_ENTRIES, DmaMapError, MapCounters, MappedChain, Piece,
    SharedMapping, share,
};

/// `direct`: foreign mappings of 2 MiB chunks of the frontend's memory, least recently used
/// dropped first.
pub struct DirectSpace<F: ForeignMapper> {
    pub(super) mapper: Arc<F>,
    pub(super) peer: DomId,
    pub(super) chunks: HashMap<u64, SharedMapping>,
    pub(super) lru: VecDeque<u64>,
    pub(super) max_chunks: usize,
    /// Chunks that could not be mapped whole, with when they may be tried again, oldest first.
    pub(super) unmappable: VecDeque<(u64, Instant)>,
    pub(super) retry_backoff: Duration,
}

impl<F: ForeignMapper> std::fmt::Debug for DirectSpace<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectSpace")
            .field("peer", &self.peer)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
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

    pub(super) fn map_chain(
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
