//! The loopback platform: every trait of [`crate::platform`], in one process, with several
//! domains, and Xen's checks.
//!
//! [`LoopbackXen`] is the hypervisor; [`LoopbackXen::domain`] gives a [`LoopbackDomain`], which
//! implements [`Platform`] as that domain. Frontend and backend code runs against it unchanged,
//! for unit tests, the no-Xen try-out and benchmarks. It never touches `/dev/xen`.
//!
//! **Memory.** Each domain has a guest RAM: a sparse memfd of [`LoopbackConfig::ram_pages`]
//! pages whose frame numbers start at [`LoopbackConfig::ram_base_gfn`] (0x40000 by default, as
//! on Arm, so that a frame number is never mistaken for an index). Granted pages and pinned
//! pages are both carved out of it, so every mapping is real shared memory: a peer sees the
//! owner's writes and the other way round, and Dom0's foreign map of a frame reaches the very
//! page that the domain granted or pinned there. A batch of refs from different allocations is
//! mapped contiguously (a `PROT_NONE` reservation, then `MAP_FIXED` of each run of pages); a
//! read-only mapping is really `PROT_READ`. A page is freed (and zeroed) when its owner and every
//! mapping have let go of it, like Xen's page references.
//!
//! **Checks, as Xen makes them.** Mapping or copying a grant fails with
//! [`XenError::GrantRefused`] when the ref never existed ([`Refusal::NoSuchGrant`](crate::Refusal::NoSuchGrant)), was revoked
//! ([`Refusal::Revoked`](crate::Refusal::Revoked)), is granted to another domain ([`Refusal::NotGrantedTo`](crate::Refusal::NotGrantedTo)), is
//! read-only and asked for read-write ([`Refusal::ReadOnlyGrant`](crate::Refusal::ReadOnlyGrant)), or when the granting domain
//! is gone. Grants are limited to [`LoopbackConfig::max_grants`] per domain, like gntalloc's
//! `limit` parameter (1024 by default). Only Dom0 may foreign-map ([`Refusal::NotPrivileged`](crate::Refusal::NotPrivileged)),
//! only frames inside the domain's RAM, and only the domain a restricted mapper names.
//! Refusals carry the errno Linux reports for them ([`Refusal::errno`](crate::Refusal::errno)).
//!
//! **Event channels** are eventfds: a handle's fd becomes readable when one of its ports is
//! delivered. A delivered port stays masked until unmasked, and notifications while masked
//! coalesce into one delivery at unmask, exactly like `/dev/xen/evtchn`. `bind_interdomain`
//! checks that the remote port was allocated unbound for the binding domain, and, as Xen does,
//! leaves one (spurious) event pending on the new local port. Closing one end returns the other
//! to unbound; a notification through an unbound port is dropped silently, as in Xen, and
//! counted in [`DomainStats::dropped_notifications`]. Unmap notifications (clear a byte, send an
//! event) fire when a grant is released or a mapping dropped, and keep their port bound until
//! they have fired.
//!
//! **Records and counters.** Every successful grant mapping, foreign mapping and grant-copy
//! segment is recorded as a [`MapRecord`] (who, whose pages, which refs and frames, which
//! access, still mapped or not), so tests can assert what a peer could reach;
//! [`LoopbackXen::stats`] counts what each domain still holds, so tests can assert that
//! everything was released.
//!
//! **Destroying a domain** ([`LoopbackXen::destroy`]): its grants can no longer be mapped or
//! copied ([`Refusal::Destroyed`](crate::Refusal::Destroyed)), its ports are closed (their peers' ports become unbound, so
//! notifications to it are dropped and counted on the sender), and everything it tries to do
//! fails with [`XenError::Domain`]. Mappings that already exist stay valid until dropped, as Xen
//! keeps a dying domain's pages until the last mapping goes.
//!
//! Simplifications: a revoked grant is refused at once even if a peer still maps it (Linux
//! defers the revocation until the unmap); ports are allocated lowest-first like Xen's but with
//! no per-vCPU state; a foreign mapping of RAM that is not allocated reaches plain zero pages.

mod events;
mod foreign;
mod grants;
mod os;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;

pub use events::LoopbackEvents;
pub use foreign::{
    LoopbackForeignMapper, LoopbackForeignMapping, LoopbackPinned, LoopbackPinnedAllocator,
};
pub use grants::{
    LoopbackGrant, LoopbackGrantAllocator, LoopbackGrantMapper, LoopbackGrantMapping,
};

use crate::XenError;
use crate::platform::{Access, DomId, Gfn, GrantRef, Platform};
use state::Hv;

/// Sizes and limits of a loopback hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackConfig {
    /// Pages of guest RAM per domain (sparse: only pages in use cost memory).
    pub ram_pages: u64,
    /// The frame number of each domain's first RAM page.
    pub ram_base_gfn: Gfn,
    /// Live grants per domain (gntalloc's `limit` module parameter defaults to 1024).
    pub max_grants: usize,
    /// Event-channel ports per domain (4096 in Xen's 2-level ABI on 64-bit).
    pub max_ports: usize,
    /// Map records kept; the oldest are forgotten past this (bounds benchmarks' memory).
    pub record_limit: usize,
}

impl Default for LoopbackConfig {
    fn default() -> Self {
        Self {
            ram_pages: 65536, // 256 MiB
            ram_base_gfn: 0x40000,
            max_grants: 1024,
            max_ports: 4096,
            record_limit: 100_000,
        }
    }
}

/// What a mapping reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapKind {
    /// A batch of grant refs mapped through the grant mapper.
    Grant {
        /// The refs, in mapping order.
        refs: Vec<GrantRef>,
    },
    /// Frames mapped through the foreign mapper.
    Foreign,
    /// One grant-copy segment (read for [`Access::ReadOnly`], written for
    /// [`Access::ReadWrite`]).
    Copy {
        /// The ref copied from or to.
        gref: GrantRef,
    },
}

/// One mapping (or copy) that a domain made of another domain's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRecord {
    /// Sequence number, increasing.
    pub id: u64,
    /// The domain that mapped.
    pub mapper: DomId,
    /// The domain whose pages were mapped.
    pub owner: DomId,
    /// Grant, foreign or copy.
    pub kind: MapKind,
    /// The access granted to the mapper.
    pub access: Access,
    /// The owner's frame numbers that were reached, in order.
    pub gfns: Vec<Gfn>,
    /// Whether the mapping is still in place (always false for copies).
    pub live: bool,
}

/// What one domain holds right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// The domain has been destroyed.
    pub destroyed: bool,
    /// Live grant refs issued by the domain.
    pub grants: usize,
    /// Live grant mappings made by the domain.
    pub grant_maps: usize,
    /// Pages in those mappings.
    pub grant_mapped_pages: usize,
    /// Live foreign mappings made by the domain.
    pub foreign_maps: usize,
    /// Pages in those mappings.
    pub foreign_mapped_pages: usize,
    /// Ports of the domain, bound, unbound or held by an unmap notification.
    pub bound_ports: usize,
    /// Open event-channel handles of the domain.
    pub event_handles: usize,
    /// Those of them restricted to one peer (`IOCTL_EVTCHN_RESTRICT_DOMID`).
    pub restricted_event_handles: usize,
    /// Pinned pages allocated by the domain.
    pub pinned_pages: usize,
    /// Allocated pages of the domain's RAM (granted, pinned, or kept alive by a mapping).
    pub ram_pages_in_use: usize,
    /// References that other domains' mappings hold on this domain's pages.
    pub pages_mapped_by_peers: usize,
    /// Notifications this domain sent that reached no one.
    pub dropped_notifications: u64,
}

impl DomainStats {
    /// Whether the domain holds nothing: no grants, mappings, ports, handles or pages.
    pub fn is_idle(&self) -> bool {
        self.grants == 0
            && self.grant_maps == 0
            && self.foreign_maps == 0
            && self.bound_ports == 0
            && self.event_handles == 0
            && self.pinned_pages == 0
            && self.ram_pages_in_use == 0
    }
}

/// A loopback hypervisor: shared state for several domains of one process.
#[derive(Debug, Clone)]
pub struct LoopbackXen {
    hv: Arc<Hv>,
}

impl Default for LoopbackXen {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopbackXen {
    /// A hypervisor with the default [`LoopbackConfig`].
    pub fn new() -> Self {
        Self::with_config(LoopbackConfig::default())
    }

    /// A hypervisor with `config`.
    pub fn with_config(config: LoopbackConfig) -> Self {
        Self {
            hv: Arc::new(Hv::new(config)),
        }
    }

    /// Domain `domid`, created on first use (a destroyed domain stays destroyed).
    pub fn domain(&self, domid: DomId) -> LoopbackDomain {
        self.hv.lock().ensure(domid);
        LoopbackDomain {
            hv: Arc::clone(&self.hv),
            domid,
        }
    }

    /// Destroys `domid` (see the module documentation for what that does).
    pub fn destroy(&self, domid: DomId) {
        self.hv.lock().destroy(domid);
    }

    /// What `domid` holds now (all zero for a domain never used).
    pub fn stats(&self, domid: DomId) -> DomainStats {
        self.hv.lock().stats(domid)
    }

    /// Every mapping and copy recorded so far, oldest first.
    pub fn records(&self) -> Vec<MapRecord> {
        self.hv.lock().records()
    }

    /// Forgets the records.
    pub fn clear_records(&self) {
        self.hv.lock().clear_records();
    }

    /// Every frame of `owner` that `mapper` reached by any recorded mapping or copy.
    pub fn reached(&self, mapper: DomId, owner: DomId) -> BTreeSet<Gfn> {
        self.records()
            .into_iter()
            .filter(|r| r.mapper == mapper && r.owner == owner)
            .flat_map(|r| r.gfns)
            .collect()
    }

    /// The frame behind a live grant `gref` of `owner`.
    pub fn grant_gfn(&self, owner: DomId, gref: GrantRef) -> Option<Gfn> {
        let st = self.hv.lock();
        st.grant_page(owner, gref).map(|p| st.gfn(p))
    }

    /// The configuration.
    pub fn config(&self) -> LoopbackConfig {
        self.hv.lock().config
    }
}

/// One domain of a [`LoopbackXen`], acting as that domain.
#[derive(Debug, Clone)]
pub struct LoopbackDomain {
    hv: Arc<Hv>,
    domid: DomId,
}

impl LoopbackDomain {
    /// The hypervisor this domain belongs to.
    pub fn hypervisor(&self) -> LoopbackXen {
        LoopbackXen {
            hv: Arc::clone(&self.hv),
        }
    }
}

impl Platform for LoopbackDomain {
    type GrantAlloc = LoopbackGrantAllocator;
    type GrantMap = LoopbackGrantMapper;
    type Events = LoopbackEvents;
    type Foreign = LoopbackForeignMapper;
    type Pinned = LoopbackPinnedAllocator;

    fn domid(&self) -> DomId {
        self.domid
    }

    fn grant_allocator(&self) -> Result<LoopbackGrantAllocator, XenError> {
        self.hv.lock().actor(self.domid)?;
        Ok(LoopbackGrantAllocator::new(
            Arc::clone(&self.hv),
            self.domid,
        ))
    }

    fn grant_mapper(&self) -> Result<LoopbackGrantMapper, XenError> {
        self.hv.lock().actor(self.domid)?;
        Ok(LoopbackGrantMapper::new(Arc::clone(&self.hv), self.domid))
    }

    fn event_channels(&self) -> Result<LoopbackEvents, XenError> {
        LoopbackEvents::open(Arc::clone(&self.hv), self.domid)
    }

    fn foreign_mapper(&self) -> Result<LoopbackForeignMapper, XenError> {
        self.hv.lock().actor(self.domid)?;
        Ok(LoopbackForeignMapper::new(Arc::clone(&self.hv), self.domid))
    }

    fn pinned_allocator(&self) -> Result<LoopbackPinnedAllocator, XenError> {
        self.hv.lock().actor(self.domid)?;
        Ok(LoopbackPinnedAllocator::new(
            Arc::clone(&self.hv),
            self.domid,
        ))
    }
}
