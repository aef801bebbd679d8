//! Loopback grants: out (the gntalloc side), in (the gntdev side) and grant copy.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::MapKind;
use super::os;
use super::state::{Hv, MapCounter, State};
use crate::mem::{PAGE_SIZE, SharedMem};
use crate::mmap::MmapRegion;
use crate::platform::{
    Access, DomId, Gfn, GrantAllocator, GrantCopy, GrantMapper, GrantMapping, GrantRef,
    GrantedPages, MappedPages, UnmapNotify, validate_copy,
};
use crate::{GrantStatus, XenError};

/// Checks an unmap notification against a window of `len` bytes.
fn check_notify(notify: &UnmapNotify, len: usize) -> Result<(), XenError> {
    match notify.clear_byte {
        Some(off) if off >= len => Err(XenError::Invalid {
            what: "unmap notification".into(),
            why: format!("byte {off} is outside the {len} mapped bytes"),
        }),
        _ => Ok(()),
    }
}

/// Arms `new` in place of `old` on ports of `d`: holds the new event port, releases the old.
fn rearm(
    st: &mut State,
    d: DomId,
    old: Option<UnmapNotify>,
    new: UnmapNotify,
) -> Result<Option<UnmapNotify>, XenError> {
    if let Some(port) = new.event {
        st.hold_port(d, port)?;
    }
    if let Some(port) = old.and_then(|o| o.event) {
        st.release_port(d, port, false);
    }
    Ok((new.clear_byte.is_some() || new.event.is_some()).then_some(new))
}

/// Fires an armed notification: clears its byte (in `owner`'s page among `pages`) and notifies
/// through its port of `d`.
fn fire(st: &mut State, d: DomId, owner: DomId, pages: &[u64], notify: UnmapNotify) {
    if let Some(off) = notify.clear_byte {
        if let Some(&page) = pages.get(off / PAGE_SIZE) {
            st.clear_byte(owner, page, off);
        }
    }
    if let Some(port) = notify.event {
        st.release_port(d, port, true);
    }
}

// ---- grants out -------------------------------------------------------------------------------

/// Grants pages of one loopback domain.
#[derive(Debug)]
pub struct LoopbackGrantAllocator {
    hv: Arc<Hv>,
    domid: DomId,
}

impl LoopbackGrantAllocator {
    pub(super) fn new(hv: Arc<Hv>, domid: DomId) -> Self {
        Self { hv, domid }
    }
}

/// The grant itself: revoked, and its pages released, on drop (after the owner's view is
/// unmapped; see [`LoopbackGrant`]).
#[derive(Debug)]
struct GrantLease {
    hv: Arc<Hv>,
    domid: DomId,
    refs: Vec<GrantRef>,
    pages: Vec<u64>,
    notify: Option<UnmapNotify>,
}

impl Drop for GrantLease {
    fn drop(&mut self) {
        let mut st = self.hv.lock();
        if let Some(n) = self.notify.take() {
            fire(&mut st, self.domid, self.domid, &self.pages, n);
        }
        st.revoke(self.domid, &self.refs);
        st.put_pages(self.domid, &self.pages);
    }
}

/// Pages of a loopback domain granted to a peer. Dropping it revokes the grants; a page that
/// the peer still maps lives on until the peer unmaps it.
#[derive(Debug)]
pub struct LoopbackGrant {
    // Field order is drop order: the owner's view goes first.
    region: MmapRegion,
    lease: GrantLease,
    peer: DomId,
    gfns: Vec<Gfn>,
}

impl LoopbackGrant {
    /// The domain the pages are granted to.
    pub fn peer(&self) -> DomId {
        self.peer
    }

    /// The granting domain's frame numbers of the pages, in order.
    pub fn gfns(&self) -> &[Gfn] {
        &self.gfns
    }
}

impl GrantAllocator for LoopbackGrantAllocator {
    type Grant = LoopbackGrant;

    fn grant(&self, peer: DomId, pages: usize, access: Access) -> Result<LoopbackGrant, XenError> {
        if pages == 0 {
            return Err(XenError::Invalid {
                what: "grant request".into(),
                why: "zero pages".into(),
            });
        }
        let d = self.domid;
        let mut st = self.hv.lock();
        let ram = st.ram(d)?;
        let page_list = st.alloc_pages(d, pages, false)?;
        let refs = match st.grant(d, peer, &page_list, access) {
            Ok(refs) => refs,
            Err(e) => {
                st.put_pages(d, &page_list);
                return Err(e);
            }
        };
        let region = match os::map_ram_pages(&ram, &page_list, true) {
            Ok(r) => r,
            Err(source) => {
                st.revoke(d, &refs);
                st.put_pages(d, &page_list);
                return Err(XenError::Mmap {
                    device: "loopback grant",
                    pages,
                    source,
                });
            }
        };
        let gfns = page_list.iter().map(|&p| st.gfn(p)).collect();
        drop(st);
        let lease = GrantLease {
            hv: Arc::clone(&self.hv),
            domid: d,
            refs,
            pages: page_list,
            notify: None,
        };
        Ok(LoopbackGrant {
            region,
            lease,
            peer,
            gfns,
        })
    }
}

impl GrantedPages for LoopbackGrant {
    fn refs(&self) -> &[GrantRef] {
        &self.lease.refs
    }

    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }

    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError> {
        check_notify(&notify, self.region.len())?;
        let mut st = self.lease.hv.lock();
        self.lease.notify = rearm(&mut st, self.lease.domid, self.lease.notify, notify)?;
        Ok(())
    }
}

// ---- grants in --------------------------------------------------------------------------------

/// Maps grants into one loopback domain.
#[derive(Debug)]
pub struct LoopbackGrantMapper {
    hv: Arc<Hv>,
    domid: DomId,
}

impl LoopbackGrantMapper {
    pub(super) fn new(hv: Arc<Hv>, domid: DomId) -> Self {
        Self { hv, domid }
    }
}

/// A mapping's hold on the owner's pages: released on drop, after the pages are unmapped.
#[derive(Debug)]
pub(super) struct MapLease {
    pub(super) hv: Arc<Hv>,
    pub(super) mapper: DomId,
    pub(super) owner: DomId,
    pub(super) pages: Vec<u64>,
    pub(super) held: Vec<u64>,
    pub(super) record: u64,
    pub(super) counter: MapCounter,
    pub(super) notify: Option<UnmapNotify>,
}

impl Drop for MapLease {
    fn drop(&mut self) {
        let mut st = self.hv.lock();
        if let Some(n) = self.notify.take() {
            fire(&mut st, self.mapper, self.owner, &self.pages, n);
        }
        st.unmap_pages(
            self.mapper,
            self.owner,
            self.pages.len(),
            &self.held,
            self.counter,
        );
        st.end_record(self.record);
    }
}

/// A batch of a peer's grants mapped contiguously into a loopback domain.
#[derive(Debug)]
pub struct LoopbackGrantMapping {
    // Field order is drop order: unmap first, then release the pages.
    region: MmapRegion,
    lease: MapLease,
}

impl MappedPages for LoopbackGrantMapping {
    fn mem(&self) -> SharedMem<'_> {
        self.region.mem()
    }
}

impl GrantMapping for LoopbackGrantMapping {
    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError> {
        check_notify(&notify, self.region.len())?;
        if notify.clear_byte.is_some() && !self.region.mem().is_writable() {
            return Err(XenError::Invalid {
                what: "unmap notification".into(),
                why: "clearing a byte needs a read-write mapping".into(),
            });
        }
        let mut st = self.lease.hv.lock();
        self.lease.notify = rearm(&mut st, self.lease.mapper, self.lease.notify, notify)?;
        Ok(())
    }
}

impl GrantMapper for LoopbackGrantMapper {
    type Mapping = LoopbackGrantMapping;

    fn map(
        &self,
        peer: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<LoopbackGrantMapping, XenError> {
        let Some(&first_ref) = refs.first() else {
            return Err(XenError::Invalid {
                what: "grant map".into(),
                why: "no refs".into(),
            });
        };
        let d = self.domid;
        let mut st = self.hv.lock();
        st.actor(d)?;
        let mut pages = Vec::with_capacity(refs.len());
        for &gref in refs {
            let page =
                st.check_grant(d, peer, gref, access)
                    .map_err(|reason| XenError::GrantRefused {
                        mapper: d,
                        peer,
                        gref,
                        reason,
                    })?;
            pages.push(page);
        }
        let ram = st.ram(peer)?;
        let region = os::map_ram_pages(&ram, &pages, access.writable()).map_err(|source| {
            XenError::MapGrants {
                peer,
                count: refs.len(),
                first_ref,
                source,
            }
        })?;
        let held = st.map_pages(d, peer, &pages, MapCounter::Grant);
        let gfns = pages.iter().map(|&p| st.gfn(p)).collect();
        let record = st.record(
            d,
            peer,
            MapKind::Grant {
                refs: refs.to_vec(),
            },
            access,
            gfns,
            true,
        );
        drop(st);
        let lease = MapLease {
            hv: Arc::clone(&self.hv),
            mapper: d,
            owner: peer,
            pages,
            held,
            record,
            counter: MapCounter::Grant,
            notify: None,
        };
        Ok(LoopbackGrantMapping { region, lease })
    }

    fn copy(&self, segments: &mut [GrantCopy<'_>]) -> Result<Vec<Result<(), XenError>>, XenError> {
        validate_copy(segments)?;
        let d = self.domid;
        let mut st = self.hv.lock();
        st.actor(d)?;
        let mut results = Vec::with_capacity(segments.len());
        for seg in segments.iter_mut() {
            results.push(copy_one(&mut st, d, seg));
        }
        Ok(results)
    }
}

/// One grant-copy segment, checked like Xen's `GNTTABOP_copy`.
fn copy_one(st: &mut State, d: DomId, seg: &mut GrantCopy<'_>) -> Result<(), XenError> {
    let (peer, gref) = seg.target();
    let access = match seg {
        GrantCopy::FromGrant { .. } => Access::ReadOnly,
        GrantCopy::ToGrant { .. } => Access::ReadWrite,
    };
    let page = st
        .check_grant(d, peer, gref, access)
        .map_err(|reason| XenError::GrantRefused {
            mapper: d,
            peer,
            gref,
            reason,
        })?;
    let ram = st.ram(peer)?;
    let at = page * PAGE_SIZE as u64 + u64::from(seg.offset());
    let io = match seg {
        GrantCopy::FromGrant { dst, .. } => ram.read_exact_at(dst, at),
        GrantCopy::ToGrant { src, .. } => ram.write_all_at(src, at),
    };
    io.map_err(|e| {
        tracing::debug!(error = %e, "loopback grant copy I/O failed");
        XenError::CopySegment {
            peer,
            gref,
            status: GrantStatus::GeneralError,
        }
    })?;
    let gfn = st.gfn(page);
    st.record(d, peer, MapKind::Copy { gref }, access, vec![gfn], false);
    Ok(())
}
