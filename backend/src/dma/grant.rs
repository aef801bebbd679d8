//! `grant`: per-request grant mappings, and the persistent-grant cache.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use xenvirtio_virtio::device_queue::ChainDescriptor;
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_virtio::protocol::PAGE_SIZE;
use xenvirtio_xen::platform::GrantMapper;
use xenvirtio_xen::{Access, DomId, GrantRef, XenError};

use super::{
    DmaMapError, MAX_PERSISTENT_MAPPINGS, MapCounters, MappedChain, Piece, SharedMapping, share,
};

/// `grant`: maps each chain's grants, in at most two batches (read-only and read-write), and
/// optionally keeps grants of a persistent arena mapped.
pub struct GrantSpace<G: GrantMapper> {
    pub(super) mapper: Arc<G>,
    pub(super) peer: DomId,
    /// Persistent grants: ref -> (mapping, page index). `None` without `feature-persistent`.
    pub(super) persistent: Option<HashMap<GrantRef, (SharedMapping, usize)>>,
    pub(super) max_persistent: usize,
    /// The persistent mappings with their refs, oldest first (at most
    /// [`MAX_PERSISTENT_MAPPINGS`]).
    pub(super) batches: VecDeque<Vec<GrantRef>>,
}

impl<G: GrantMapper> std::fmt::Debug for GrantSpace<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantSpace")
            .field("peer", &self.peer)
            .field("persistent", &self.persistent.as_ref().map(HashMap::len))
            .finish_non_exhaustive()
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
    pub(super) fn map_chain(
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
