//! The loopback hypervisor's state: every domain's RAM, grant table and event-channel ports,
//! the open event-channel handles, and the map records. All of it sits behind one mutex, and
//! every operation (checks, mmap, counters) runs under it, so a grant cannot be revoked between
//! its check and its mapping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::os;
use super::{DomainStats, LoopbackConfig, MapKind, MapRecord};
use crate::mem::PAGE_SIZE;
use crate::platform::{Access, DomId, Gfn, GrantRef, Port};
use crate::{Refusal, XenError};

/// Refs below this are reserved in Xen (`GNTTAB_NR_RESERVED_ENTRIES`); gntalloc never hands
/// them out.
pub(super) const FIRST_REF: GrantRef = 8;

/// The shared state of one loopback hypervisor.
#[derive(Debug)]
pub(super) struct Hv {
    state: Mutex<State>,
}

impl Hv {
    pub(super) fn new(config: LoopbackConfig) -> Self {
        Self {
            state: Mutex::new(State {
                config,
                domains: BTreeMap::new(),
                handles: HashMap::new(),
                next_handle: 1,
                records: BTreeMap::new(),
                next_record: 1,
            }),
        }
    }

    /// Locks the state. A panic while it was held (a failed test assertion in another thread)
    /// does not make it unusable: every operation leaves it consistent before it can panic.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One entry of a grant table.
#[derive(Debug, Clone, Copy)]
pub(super) struct GrantEntry {
    pub(super) grantee: DomId,
    pub(super) access: Access,
    pub(super) page: u64,
}

/// What a port is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PortKind {
    /// Allocated for `remote` to bind to (`ECS_UNBOUND`).
    Unbound { remote: DomId },
    /// Connected to `remote_port` of `remote` (`ECS_INTERDOMAIN`).
    Interdomain { remote: DomId, remote_port: Port },
}

#[derive(Debug)]
pub(super) struct PortState {
    /// The handle it is bound through; `None` once the handle let go of it while an unmap
    /// notification still holds it.
    handle: Option<u64>,
    kind: PortKind,
    /// Delivered and not yet unmasked.
    masked: bool,
    /// Fired while masked.
    pending: bool,
    /// Unmap notifications that will fire on it.
    holds: u32,
}

/// An open event-channel handle (the loopback `/dev/xen/evtchn`).
#[derive(Debug)]
pub(super) struct Handle {
    domid: DomId,
    ring: VecDeque<Port>,
    fd: Arc<OwnedFd>,
    /// Set by `IOCTL_EVTCHN_RESTRICT_DOMID`.
    restricted: Option<DomId>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    grant_maps: usize,
    grant_mapped_pages: usize,
    foreign_maps: usize,
    foreign_mapped_pages: usize,
    pinned_pages: usize,
    pages_mapped_by_peers: usize,
    dropped_notifications: u64,
}

#[derive(Debug)]
pub(super) struct Dom {
    destroyed: bool,
    ram: Option<Arc<File>>,
    next_page: u64,
    free: Vec<u64>,
    /// References to each allocated RAM page: its owner's allocation plus each mapping.
    page_refs: HashMap<u64, u32>,
    grants: HashMap<GrantRef, GrantEntry>,
    next_ref: GrantRef,
    ports: BTreeMap<Port, PortState>,
    counters: Counters,
}

impl Dom {
    fn new() -> Self {
        Self {
            destroyed: false,
            ram: None,
            next_page: 0,
            free: Vec::new(),
            page_refs: HashMap::new(),
            grants: HashMap::new(),
            next_ref: FIRST_REF,
            ports: BTreeMap::new(),
            counters: Counters::default(),
        }
    }
}

/// Which counters a mapping moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MapCounter {
    Grant,
    Foreign,
}

/// Everything the loopback hypervisor knows.
#[derive(Debug)]
pub(super) struct State {
    pub(super) config: LoopbackConfig,
    domains: BTreeMap<DomId, Dom>,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    records: BTreeMap<u64, MapRecord>,
    next_record: u64,
}

fn destroyed(domid: DomId) -> XenError {
    XenError::Domain {
        domid,
        reason: Refusal::Destroyed { domid },
    }
}

impl State {
    // ---- domains -----------------------------------------------------------------------------

    pub(super) fn ensure(&mut self, d: DomId) -> &mut Dom {
        self.domains.entry(d).or_insert_with(Dom::new)
    }

    /// The acting domain, which must not have been destroyed.
    pub(super) fn actor(&mut self, d: DomId) -> Result<&mut Dom, XenError> {
        let dom = self.ensure(d);
        if dom.destroyed {
            Err(destroyed(d))
        } else {
            Ok(dom)
        }
    }

    /// A domain that a request names: it must exist and be alive.
    fn target(&self, d: DomId) -> Result<&Dom, Refusal> {
        match self.domains.get(&d) {
            None => Err(Refusal::NoSuchDomain { domid: d }),
            Some(dom) if dom.destroyed => Err(Refusal::Destroyed { domid: d }),
            Some(dom) => Ok(dom),
        }
    }

    /// Whether a domain that a request names exists and is alive.
    pub(super) fn target_alive(&self, d: DomId) -> Result<(), Refusal> {
        self.target(d).map(drop)
    }

    pub(super) fn destroy(&mut self, d: DomId) {
        let dom = self.ensure(d);
        dom.destroyed = true;
        let ports = std::mem::take(&mut dom.ports);
        for (port, st) in ports {
            self.forget_port(d, port, &st);
        }
        for h in self.handles.values_mut().filter(|h| h.domid == d) {
            h.ring.clear();
            os::eventfd_drain(&h.fd);
        }
    }

    pub(super) fn stats(&self, d: DomId) -> DomainStats {
        let Some(dom) = self.domains.get(&d) else {
            return DomainStats::default();
        };
        let c = dom.counters;
        DomainStats {
            destroyed: dom.destroyed,
            grants: dom.grants.len(),
            grant_maps: c.grant_maps,
            grant_mapped_pages: c.grant_mapped_pages,
            foreign_maps: c.foreign_maps,
            foreign_mapped_pages: c.foreign_mapped_pages,
            bound_ports: dom.ports.len(),
            event_handles: self.handles.values().filter(|h| h.domid == d).count(),
            restricted_event_handles: self
                .handles
                .values()
                .filter(|h| h.domid == d && h.restricted.is_some())
                .count(),
            pinned_pages: c.pinned_pages,
            ram_pages_in_use: dom.page_refs.len(),
            pages_mapped_by_peers: c.pages_mapped_by_peers,
            dropped_notifications: c.dropped_notifications,
        }
    }

    // ---- RAM ---------------------------------------------------------------------------------

    pub(super) fn gfn(&self, page: u64) -> Gfn {
        self.config.ram_base_gfn + page
    }

    pub(super) fn page_of_gfn(&self, gfn: Gfn) -> Option<u64> {
        gfn.checked_sub(self.config.ram_base_gfn)
            .filter(|&p| p < self.config.ram_pages)
    }

    /// The domain's RAM, created on first use.
    pub(super) fn ram(&mut self, d: DomId) -> Result<Arc<File>, XenError> {
        let pages = self.config.ram_pages;
        let dom = self.ensure(d);
        if let Some(ram) = &dom.ram {
            return Ok(Arc::clone(ram));
        }
        let file = os::memfd(
            &format!("xenvirtio-loopback-dom{d}-ram"),
            pages * PAGE_SIZE as u64,
        )
        .map_err(|source| XenError::Mmap {
            device: "loopback guest RAM (memfd)",
            pages: usize::try_from(pages).unwrap_or(usize::MAX),
            source,
        })?;
        let ram = Arc::new(file);
        dom.ram = Some(Arc::clone(&ram));
        Ok(ram)
    }

    /// Allocates `n` zeroed pages of `d`'s RAM, each with one reference (the owner's),
    /// preferring one contiguous run when `contiguous`.
    pub(super) fn alloc_pages(
        &mut self,
        d: DomId,
        n: usize,
        contiguous: bool,
    ) -> Result<Vec<u64>, XenError> {
        self.ram(d)?;
        let limit = self.config.ram_pages;
        let dom = self.actor(d)?;
        let n64 = n as u64;
        let bump_room = limit - dom.next_page;
        let mut pages = Vec::with_capacity(n);
        if contiguous && bump_room >= n64 {
            pages.extend(dom.next_page..dom.next_page + n64);
            dom.next_page += n64;
        } else {
            if (dom.free.len() as u64).saturating_add(bump_room) < n64 {
                return Err(XenError::Domain {
                    domid: d,
                    reason: Refusal::OutOfMemory,
                });
            }
            while pages.len() < n {
                match dom.free.pop() {
                    Some(p) => pages.push(p),
                    None => {
                        pages.push(dom.next_page);
                        dom.next_page += 1;
                    }
                }
            }
        }
        for &p in &pages {
            dom.page_refs.insert(p, 1);
        }
        Ok(pages)
    }

    /// Takes a reference on each allocated page among `pages`; returns those pages (a page that
    /// is not allocated, e.g. free RAM mapped by Dom0, is not tracked).
    fn get_pages(&mut self, d: DomId, pages: &[u64]) -> Vec<u64> {
        let dom = self.ensure(d);
        let mut held = Vec::with_capacity(pages.len());
        for &p in pages {
            if let Some(c) = dom.page_refs.get_mut(&p) {
                *c += 1;
                held.push(p);
            }
        }
        held
    }

    /// Drops a reference on each page; a page left with none is zeroed and freed.
    pub(super) fn put_pages(&mut self, d: DomId, pages: &[u64]) {
        let Some(dom) = self.domains.get_mut(&d) else {
            return;
        };
        for &p in pages {
            let Some(c) = dom.page_refs.get_mut(&p) else {
                continue;
            };
            *c -= 1;
            if *c > 0 {
                continue;
            }
            dom.page_refs.remove(&p);
            if let Some(ram) = &dom.ram {
                let off = p * PAGE_SIZE as u64;
                if let Err(e) = os::punch_hole(ram, off, PAGE_SIZE as u64) {
                    tracing::debug!(error = %e, "punching a hole failed; zeroing instead");
                    let _ = ram.write_all_at(&[0u8; PAGE_SIZE], off);
                }
            }
            dom.free.push(p);
        }
    }

    pub(super) fn add_pinned(&mut self, d: DomId, pages: isize) {
        let c = &mut self.ensure(d).counters;
        c.pinned_pages = c.pinned_pages.saturating_add_signed(pages);
    }

    // ---- grants ------------------------------------------------------------------------------

    /// Grants `pages` (already allocated pages of `d`) to `peer`; returns the refs.
    pub(super) fn grant(
        &mut self,
        d: DomId,
        peer: DomId,
        pages: &[u64],
        access: Access,
    ) -> Result<Vec<GrantRef>, XenError> {
        let max = self.config.max_grants;
        let dom = self.actor(d)?;
        let room = (GrantRef::MAX - dom.next_ref) as usize;
        if dom.grants.len() + pages.len() > max || pages.len() > room {
            return Err(XenError::Domain {
                domid: d,
                reason: Refusal::Exhausted,
            });
        }
        let mut refs = Vec::with_capacity(pages.len());
        for &page in pages {
            let r = dom.next_ref;
            dom.next_ref += 1;
            dom.grants.insert(
                r,
                GrantEntry {
                    grantee: peer,
                    access,
                    page,
                },
            );
            refs.push(r);
        }
        Ok(refs)
    }

    /// Revokes `refs` of `d` (refs are never reused, so a revoked ref stays distinguishable
    /// from one that never existed).
    pub(super) fn revoke(&mut self, d: DomId, refs: &[GrantRef]) {
        if let Some(dom) = self.domains.get_mut(&d) {
            for r in refs {
                dom.grants.remove(r);
            }
        }
    }

    /// The checks Xen makes when `mapper` maps or copies `gref` of `peer` with `access`;
    /// returns the page.
    pub(super) fn check_grant(
        &self,
        mapper: DomId,
        peer: DomId,
        gref: GrantRef,
        access: Access,
    ) -> Result<u64, Refusal> {
        let dom = self.target(peer)?;
        if gref < FIRST_REF || gref >= dom.next_ref {
            return Err(Refusal::NoSuchGrant);
        }
        let entry = dom.grants.get(&gref).ok_or(Refusal::Revoked)?;
        if entry.grantee != mapper {
            return Err(Refusal::NotGrantedTo {
                grantee: entry.grantee,
            });
        }
        if access.writable() && !entry.access.writable() {
            return Err(Refusal::ReadOnlyGrant);
        }
        Ok(entry.page)
    }

    pub(super) fn grant_page(&self, d: DomId, gref: GrantRef) -> Option<u64> {
        self.domains.get(&d)?.grants.get(&gref).map(|e| e.page)
    }

    /// Accounts a new mapping by `mapper` of `pages` of `owner`: takes page references and
    /// moves the counters. Returns the pages whose references must be dropped at unmap.
    pub(super) fn map_pages(
        &mut self,
        mapper: DomId,
        owner: DomId,
        pages: &[u64],
        counter: MapCounter,
    ) -> Vec<u64> {
        let held = self.get_pages(owner, pages);
        self.ensure(owner).counters.pages_mapped_by_peers += held.len();
        let c = &mut self.ensure(mapper).counters;
        match counter {
            MapCounter::Grant => {
                c.grant_maps += 1;
                c.grant_mapped_pages += pages.len();
            }
            MapCounter::Foreign => {
                c.foreign_maps += 1;
                c.foreign_mapped_pages += pages.len();
            }
        }
        held
    }

    /// Undoes [`State::map_pages`].
    pub(super) fn unmap_pages(
        &mut self,
        mapper: DomId,
        owner: DomId,
        pages: usize,
        held: &[u64],
        counter: MapCounter,
    ) {
        // Saturating: this runs in Drop, where a panic while unwinding would abort.
        let c = &mut self.ensure(mapper).counters;
        match counter {
            MapCounter::Grant => {
                c.grant_maps = c.grant_maps.saturating_sub(1);
                c.grant_mapped_pages = c.grant_mapped_pages.saturating_sub(pages);
            }
            MapCounter::Foreign => {
                c.foreign_maps = c.foreign_maps.saturating_sub(1);
                c.foreign_mapped_pages = c.foreign_mapped_pages.saturating_sub(pages);
            }
        }
        let o = &mut self.ensure(owner).counters;
        o.pages_mapped_by_peers = o.pages_mapped_by_peers.saturating_sub(held.len());
        self.put_pages(owner, held);
    }

    // ---- records -----------------------------------------------------------------------------

    pub(super) fn record(
        &mut self,
        mapper: DomId,
        owner: DomId,
        kind: MapKind,
        access: Access,
        gfns: Vec<Gfn>,
        live: bool,
    ) -> u64 {
        let id = self.next_record;
        self.next_record += 1;
        self.records.insert(
            id,
            MapRecord {
                id,
                mapper,
                owner,
                kind,
                access,
                gfns,
                live,
            },
        );
        while self.records.len() > self.config.record_limit {
            self.records.pop_first();
        }
        id
    }

    pub(super) fn end_record(&mut self, id: u64) {
        if let Some(r) = self.records.get_mut(&id) {
            r.live = false;
        }
    }

    pub(super) fn records(&self) -> Vec<MapRecord> {
        self.records.values().cloned().collect()
    }

    pub(super) fn clear_records(&mut self) {
        self.records.clear();
    }

    // ---- event channels ----------------------------------------------------------------------

    pub(super) fn open_handle(&mut self, d: DomId, fd: Arc<OwnedFd>) -> Result<u64, XenError> {
        self.actor(d)?;
        let h = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(
            h,
            Handle {
                domid: d,
                ring: VecDeque::new(),
                fd,
                restricted: None,
            },
        );
        Ok(h)
    }

    pub(super) fn close_handle(&mut self, h: u64) {
        let Some(handle) = self.handles.get(&h) else {
            return;
        };
        let d = handle.domid;
        let ports: Vec<Port> = self
            .domains
            .get(&d)
            .map(|dom| {
                dom.ports
                    .iter()
                    .filter(|(_, st)| st.handle == Some(h))
                    .map(|(&p, _)| p)
                    .collect()
            })
            .unwrap_or_default();
        for port in ports {
            self.close_port(d, port);
        }
        self.handles.remove(&h);
    }

    fn handle_domain(&mut self, h: u64) -> Result<DomId, XenError> {
        let d = self
            .handles
            .get(&h)
            .map(|hd| hd.domid)
            .ok_or_else(|| XenError::Invalid {
                what: "event-channel handle".into(),
                why: "it has been closed".into(),
            })?;
        self.actor(d)?;
        Ok(d)
    }

    fn alloc_port(&mut self, d: DomId) -> Result<Port, XenError> {
        let max = self.config.max_ports;
        let dom = self.ensure(d);
        // Xen hands out the lowest free port; port 0 is never used.
        let mut port: Port = 1;
        for &p in dom.ports.keys() {
            if p != port {
                break;
            }
            port += 1;
        }
        if port as usize > max {
            return Err(XenError::Domain {
                domid: d,
                reason: Refusal::Exhausted,
            });
        }
        Ok(port)
    }

    fn new_port(kind: PortKind, h: u64) -> PortState {
        PortState {
            handle: Some(h),
            kind,
            masked: false,
            pending: false,
            holds: 0,
        }
    }

    /// `IOCTL_EVTCHN_RESTRICT_DOMID`, with Linux's checks: once per handle, never to Dom0 or a
    /// reserved domid (`DOMID_FIRST_RESERVED` is 0x7ff0).
    pub(super) fn restrict_handle(&mut self, h: u64, dom: DomId) -> Result<(), XenError> {
        let d = self.handle_domain(h)?;
        let handle = self.handles.get_mut(&h).expect("handle_domain checked it");
        if let Some(to) = handle.restricted {
            return Err(XenError::EventRefused {
                op: "restrict",
                domid: d,
                reason: Refusal::PortRestricted { to },
            });
        }
        if dom == 0 || dom >= 0x7ff0 {
            return Err(XenError::Invalid {
                what: "event-channel restriction".into(),
                why: format!("domain {dom} cannot be a restriction target (EINVAL)"),
            });
        }
        handle.restricted = Some(dom);
        Ok(())
    }

    /// The domain a restricted handle may bind to, or `None`.
    fn restriction(&self, h: u64) -> Option<DomId> {
        self.handles.get(&h).and_then(|hd| hd.restricted)
    }

    pub(super) fn bind_unbound(&mut self, h: u64, remote: DomId) -> Result<Port, XenError> {
        let d = self.handle_domain(h)?;
        if let Some(to) = self.restriction(h) {
            return Err(XenError::EventRefused {
                op: "bind_unbound",
                domid: d,
                reason: Refusal::PortRestricted { to },
            });
        }
        self.target(remote)
            .map_err(|reason| XenError::EventRefused {
                op: "bind_unbound",
                domid: d,
                reason,
            })?;
        let port = self.alloc_port(d)?;
        self.ensure(d)
            .ports
            .insert(port, Self::new_port(PortKind::Unbound { remote }, h));
        Ok(port)
    }

    pub(super) fn bind_interdomain(
        &mut self,
        h: u64,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Port, XenError> {
        let d = self.handle_domain(h)?;
        let refuse = |reason| XenError::EventRefused {
            op: "bind_interdomain",
            domid: d,
            reason,
        };
        if let Some(to) = self.restriction(h).filter(|&to| to != remote) {
            return Err(refuse(Refusal::PortRestricted { to }));
        }
        let rdom = self.target(remote).map_err(refuse)?;
        let offered = rdom
            .ports
            .get(&remote_port)
            .is_some_and(|st| st.handle.is_some() && st.kind == PortKind::Unbound { remote: d });
        if !offered {
            return Err(refuse(Refusal::PortNotOffered { port: remote_port }));
        }
        let port = self.alloc_port(d)?;
        self.ensure(d).ports.insert(
            port,
            Self::new_port(
                PortKind::Interdomain {
                    remote,
                    remote_port,
                },
                h,
            ),
        );
        if let Some(st) = self.ensure(remote).ports.get_mut(&remote_port) {
            st.kind = PortKind::Interdomain {
                remote: d,
                remote_port: port,
            };
        }
        // Xen marks the new local port pending, in case the remote end signalled before the
        // bind (evtchn_bind_interdomain); the binder sees one event straight away.
        self.deliver(d, port);
        Ok(port)
    }

    fn owned_port(&self, h: u64, d: DomId, port: Port) -> bool {
        self.domains
            .get(&d)
            .and_then(|dom| dom.ports.get(&port))
            .is_some_and(|st| st.handle == Some(h))
    }

    pub(super) fn unbind(&mut self, h: u64, port: Port) -> Result<(), XenError> {
        let d = self.handle_domain(h)?;
        if !self.owned_port(h, d, port) {
            return Err(XenError::EventRefused {
                op: "unbind",
                domid: d,
                reason: Refusal::PortNotBound { port },
            });
        }
        self.close_port(d, port);
        Ok(())
    }

    pub(super) fn notify(&mut self, h: u64, port: Port) -> Result<(), XenError> {
        let d = self.handle_domain(h)?;
        if !self.owned_port(h, d, port) {
            return Err(XenError::EventRefused {
                op: "notify",
                domid: d,
                reason: Refusal::PortNotBound { port },
            });
        }
        self.send(d, port);
        Ok(())
    }

    pub(super) fn pending(&mut self, h: u64) -> Vec<Port> {
        match self.handles.get_mut(&h) {
            Some(handle) => {
                os::eventfd_drain(&handle.fd);
                handle.ring.drain(..).collect()
            }
            None => Vec::new(),
        }
    }

    pub(super) fn unmask(&mut self, h: u64, ports: &[Port]) {
        let Some(d) = self.handles.get(&h).map(|hd| hd.domid) else {
            return;
        };
        for &port in ports {
            let Some(st) = self
                .domains
                .get_mut(&d)
                .and_then(|dom| dom.ports.get_mut(&port))
            else {
                continue;
            };
            // Like evtchn's write(): ports of other handles are ignored.
            if st.handle != Some(h) || !st.masked {
                continue;
            }
            st.masked = false;
            if std::mem::take(&mut st.pending) {
                self.deliver(d, port);
            }
        }
    }

    /// EVTCHNOP_send from `port` of `d`: an unbound port, or one whose peer is gone, drops the
    /// notification (counted on `d`).
    fn send(&mut self, d: DomId, port: Port) {
        let kind = self
            .domains
            .get(&d)
            .and_then(|dom| dom.ports.get(&port))
            .map(|st| st.kind);
        let delivered = match kind {
            Some(PortKind::Interdomain {
                remote,
                remote_port,
            }) => self.deliver(remote, remote_port),
            _ => false,
        };
        if !delivered {
            self.ensure(d).counters.dropped_notifications += 1;
        }
    }

    /// Marks `port` of `d` pending: delivered to its handle and masked, or remembered if it is
    /// masked already. Returns false if nobody can receive it.
    fn deliver(&mut self, d: DomId, port: Port) -> bool {
        let Some(dom) = self.domains.get_mut(&d).filter(|dom| !dom.destroyed) else {
            return false;
        };
        let Some(st) = dom.ports.get_mut(&port) else {
            return false;
        };
        let Some(h) = st.handle else { return false };
        if st.masked {
            st.pending = true;
            return true;
        }
        let Some(handle) = self.handles.get_mut(&h) else {
            return false;
        };
        st.masked = true;
        handle.ring.push_back(port);
        os::eventfd_signal(&handle.fd);
        true
    }

    /// Unbinds `port` of `d`, unless an unmap notification still holds it (then it only leaves
    /// its handle, and closes once the notification has fired).
    fn close_port(&mut self, d: DomId, port: Port) {
        let Some(dom) = self.domains.get_mut(&d) else {
            return;
        };
        let Some(st) = dom.ports.get_mut(&port) else {
            return;
        };
        let old_handle = st.handle.take();
        if st.holds == 0 {
            if let Some(st) = dom.ports.remove(&port) {
                self.forget_port(d, port, &st);
            }
        }
        if let Some(handle) = old_handle.and_then(|h| self.handles.get_mut(&h)) {
            handle.ring.retain(|&p| p != port);
        }
    }

    /// The other end of a closed port goes back to unbound, as in Xen's evtchn_close.
    fn forget_port(&mut self, d: DomId, port: Port, st: &PortState) {
        if let Some(handle) = st.handle.and_then(|h| self.handles.get_mut(&h)) {
            handle.ring.retain(|&p| p != port);
        }
        if let PortKind::Interdomain {
            remote,
            remote_port,
        } = st.kind
        {
            let back = PortKind::Interdomain {
                remote: d,
                remote_port: port,
            };
            if let Some(rst) = self
                .domains
                .get_mut(&remote)
                .and_then(|r| r.ports.get_mut(&remote_port))
            {
                if rst.kind == back {
                    rst.kind = PortKind::Unbound { remote: d };
                }
            }
        }
    }

    /// Holds `port` of `d` for an unmap notification.
    pub(super) fn hold_port(&mut self, d: DomId, port: Port) -> Result<(), XenError> {
        match self
            .domains
            .get_mut(&d)
            .and_then(|dom| dom.ports.get_mut(&port))
        {
            Some(st) if st.handle.is_some() => {
                st.holds += 1;
                Ok(())
            }
            _ => Err(XenError::EventRefused {
                op: "unmap notify",
                domid: d,
                reason: Refusal::PortNotBound { port },
            }),
        }
    }

    /// Releases a hold on `port` of `d`, first notifying through it if `fire`.
    pub(super) fn release_port(&mut self, d: DomId, port: Port, fire: bool) {
        if fire {
            self.send(d, port);
        }
        let Some(st) = self
            .domains
            .get_mut(&d)
            .and_then(|dom| dom.ports.get_mut(&port))
        else {
            return;
        };
        st.holds = st.holds.saturating_sub(1);
        if st.holds == 0 && st.handle.is_none() {
            self.close_port(d, port);
        }
    }

    /// Writes one byte of `d`'s RAM (an unmap notification clearing its byte).
    pub(super) fn clear_byte(&mut self, d: DomId, page: u64, offset: usize) {
        if let Some(ram) = self.domains.get(&d).and_then(|dom| dom.ram.as_ref()) {
            let at = page * PAGE_SIZE as u64 + (offset % PAGE_SIZE) as u64;
            if let Err(e) = ram.write_all_at(&[0], at) {
                tracing::debug!(error = %e, "clearing the unmap-notify byte failed");
            }
        }
    }
}
