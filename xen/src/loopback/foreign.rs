//! Loopback foreign mapping (Dom0 maps another domain's RAM by frame number) and pinned memory
//! (pages of a domain's RAM with known frame numbers, for the `direct` strategy).

use std::sync::{Arc, Mutex};

use super::MapKind;
use super::grants::MapLease;
use super::os;
use super::state::{Hv, MapCounter};
use crate::mem::SharedMem;
use crate::mmap::MmapRegion;
use crate::platform::{
    Access, DomId, ForeignMapper, Gfn, MappedPages, PinnedAllocator, PinnedPages,
};
use crate::{Refusal, XenError};

/// Foreign mapping for one loopback domain; only domain 0 gets anything through it.
#[derive(Debug)]
pub struct LoopbackForeignMapper {
    hv: Arc<Hv>,
    domid: DomId,
    restricted: Mutex<Option<DomId>>,
}

impl LoopbackForeignMapper {
    pub(super) fn new(hv: Arc<Hv>, domid: DomId) -> Self {
        Self {
            hv,
            domid,
            restricted: Mutex::new(None),
        }
    }

    fn restricted(&self) -> Option<DomId> {
        *self.restricted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Another domain's frames mapped into a loopback domain.
#[derive(Debug)]
pub struct LoopbackForeignMapping {
    // Field order is drop order: unmap first, then release the pages.
    region: MmapRegion,
    lease: MapLease,
}

impl LoopbackForeignMapping {
    /// The domain whose memory this is.
    pub fn dom(&self) -> DomId {
        self.lease.owner
    }
}

impl MappedPages for LoopbackForeignMapping {
    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }
}

impl ForeignMapper for LoopbackForeignMapper {
    type Mapping = LoopbackForeignMapping;

    fn map(
        &self,
        dom: DomId,
        gfns: &[Gfn],
        access: Access,
    ) -> Result<LoopbackForeignMapping, XenError> {
        let Some(&first_gfn) = gfns.first() else {
            return Err(XenError::Invalid {
                what: "foreign map".into(),
                why: "no frames".into(),
            });
        };
        let d = self.domid;
        let refuse = |gfn, reason| XenError::ForeignRefused {
            mapper: d,
            dom,
            gfn,
            reason,
        };
        let mut st = self.hv.lock();
        st.actor(d)?;
        if d != 0 {
            return Err(refuse(first_gfn, Refusal::NotPrivileged));
        }
        if let Some(to) = self.restricted().filter(|&to| to != dom) {
            return Err(refuse(first_gfn, Refusal::Restricted { to }));
        }
        if let Err(reason) = st.target_alive(dom) {
            return Err(refuse(first_gfn, reason));
        }
        let mut pages = Vec::with_capacity(gfns.len());
        for &gfn in gfns {
            pages.push(
                st.page_of_gfn(gfn)
                    .ok_or_else(|| refuse(gfn, Refusal::NoSuchFrame))?,
            );
        }
        let ram = st.ram(dom)?;
        let region = os::map_ram_pages(&ram, &pages, access.writable()).map_err(|source| {
            XenError::ForeignMapBatch {
                dom,
                count: gfns.len(),
                first_gfn,
                source,
            }
        })?;
        let held = st.map_pages(d, dom, &pages, MapCounter::Foreign);
        let record = st.record(d, dom, MapKind::Foreign, access, gfns.to_vec(), true);
        drop(st);
        let lease = MapLease {
            hv: Arc::clone(&self.hv),
            mapper: d,
            owner: dom,
            pages,
            held,
            record,
            counter: MapCounter::Foreign,
            notify: None,
        };
        Ok(LoopbackForeignMapping { region, lease })
    }

    fn restrict(&self, dom: DomId) -> Result<(), XenError> {
        let mut r = self.restricted.lock().unwrap_or_else(|e| e.into_inner());
        match *r {
            Some(to) if to != dom => Err(XenError::ForeignRefused {
                mapper: self.domid,
                dom,
                gfn: 0,
                reason: Refusal::Restricted { to },
            }),
            _ => {
                *r = Some(dom);
                Ok(())
            }
        }
    }
}

// ---- pinned memory ----------------------------------------------------------------------------

/// Carves pinned pages out of one loopback domain's RAM.
#[derive(Debug)]
pub struct LoopbackPinnedAllocator {
    hv: Arc<Hv>,
    domid: DomId,
}

impl LoopbackPinnedAllocator {
    pub(super) fn new(hv: Arc<Hv>, domid: DomId) -> Self {
        Self { hv, domid }
    }
}

#[derive(Debug)]
struct PinnedLease {
    hv: Arc<Hv>,
    domid: DomId,
    pages: Vec<u64>,
}

impl Drop for PinnedLease {
    fn drop(&mut self) {
        let mut st = self.hv.lock();
        st.add_pinned(self.domid, -(self.pages.len() as isize));
        st.put_pages(self.domid, &self.pages);
    }
}

/// Pages of a loopback domain's RAM, with their frame numbers.
#[derive(Debug)]
pub struct LoopbackPinned {
    // Field order is drop order: the domain's own view goes first.
    region: MmapRegion,
    _lease: PinnedLease,
    gfns: Vec<Gfn>,
}

impl PinnedPages for LoopbackPinned {
    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }

    fn gfns(&self) -> &[Gfn] {
        &self.gfns
    }
}

impl PinnedAllocator for LoopbackPinnedAllocator {
    type Pinned = LoopbackPinned;

    fn alloc_pinned(&self, pages: usize) -> Result<LoopbackPinned, XenError> {
        if pages == 0 {
            return Err(XenError::Pinned {
                pages,
                why: "zero pages requested".into(),
                source: None,
            });
        }
        let d = self.domid;
        let mut st = self.hv.lock();
        let ram = st.ram(d)?;
        let page_list = st.alloc_pages(d, pages, true)?;
        let region = match os::map_ram_pages(&ram, &page_list, true) {
            Ok(r) => r,
            Err(source) => {
                st.put_pages(d, &page_list);
                return Err(XenError::Mmap {
                    device: "loopback pinned memory",
                    pages,
                    source,
                });
            }
        };
        st.add_pinned(d, pages as isize);
        let gfns = page_list.iter().map(|&p| st.gfn(p)).collect();
        drop(st);
        Ok(LoopbackPinned {
            region,
            _lease: PinnedLease {
                hv: Arc::clone(&self.hv),
                domid: d,
                pages: page_list,
            },
            gfns,
        })
    }
}
