//! Per-domain budgets of mapped pages (issue 13, finding 3).
//!
//! This module owns the ledger of how many of each frontend domain's pages the daemon has
//! mapped, shared by all device threads, and the mapper wrappers that reserve pages in it
//! **before** every grant or foreign map call and release them when the mapping is dropped.
//! Every grant mapping of a frontend's memory (rings, bounce pool and its directory, persistent
//! and per-request grants) goes through these wrappers, so a domain can never hold more than
//! its budget, however many devices it has. `direct`'s foreign mappings go through them
//! uncharged (they take no maptrack entry). It never maps anything itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{
    ForeignMapper, GrantCopy, GrantMapper, GrantMapping, MappedPages, UnmapNotify,
};
use xenvirtio_xen::{Access, DomId, Gfn, GrantRef, XenError};

/// Default grant-mapped pages one frontend domain's devices may hold together: 1024 (4 MiB).
///
/// Dom0's maptrack table holds about 256K entries at Xen's default (1024 frames of 256
/// entries: 262,144) and is shared with the kernel's blkback and netback. A guest with one
/// blkback disk (persistent grants, Linux's default: at most 1056 per ring, and the segments
/// in flight are those grants) and one netback vif (at most 256 tx grants mapped in flight)
/// makes them hold about 1312 entries. 100 such guests with 1024 pages each here take
/// 100 × (1312 + 1024) = 233,600 entries, about 11 % under the table's size.
pub const DEFAULT_MAX_PAGES_PER_DOMAIN: u64 = 1024;

/// Pages of the budget `max-bounce-pages` leaves for the pool's directory and the rings.
pub const BOUNCE_HEADROOM_PAGES: u64 = 16;

/// The largest bounce pool that can connect at all (`max-bounce-pages`): the budget less
/// [`BOUNCE_HEADROOM_PAGES`], at least 1 and at most 16384. The budget is shared by the
/// domain's devices, so a frontend with several should divide it.
pub fn max_bounce_pages(budget: u64) -> u32 {
    let share = budget.saturating_sub(BOUNCE_HEADROOM_PAGES);
    share.clamp(1, u64::from(xenvirtio_virtio::protocol::MAX_BOUNCE_PAGES)) as u32
}

/// The ledger: mapped pages per frontend domain, against one budget for every domain.
#[derive(Debug)]
pub struct DomainBudgets {
    budget: u64,
    mapped: Mutex<HashMap<DomId, u64>>,
}

impl DomainBudgets {
    /// A ledger where each domain may have `budget` pages mapped.
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Self {
            budget,
            mapped: Mutex::new(HashMap::new()),
        })
    }

    /// The budget of every domain, in pages.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Pages of `dom` mapped now.
    pub fn mapped(&self, dom: DomId) -> u64 {
        self.ledger().get(&dom).copied().unwrap_or(0)
    }

    /// Every domain with pages mapped, by domid.
    pub fn snapshot(&self) -> Vec<(DomId, u64)> {
        let mut v: Vec<_> = self.ledger().iter().map(|(&d, &p)| (d, p)).collect();
        v.sort_unstable();
        v
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, HashMap<DomId, u64>> {
        // The ledger stays consistent through a panic: each update is one statement.
        self.mapped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `pages` of `dom`'s budget, or refuses with [`XenError::OverBudget`].
    pub fn reserve(self: &Arc<Self>, dom: DomId, pages: usize) -> Result<Reservation, XenError> {
        let mut ledger = self.ledger();
        let mapped = ledger.get(&dom).copied().unwrap_or(0);
        match mapped.checked_add(pages as u64) {
            Some(total) if total <= self.budget => {
                ledger.insert(dom, total);
                Ok(Reservation {
                    budgets: Arc::clone(self),
                    dom,
                    pages: pages as u64,
                })
            }
            _ => Err(XenError::OverBudget {
                dom,
                pages,
                mapped,
                budget: self.budget,
            }),
        }
    }
}

/// Pages reserved in a domain's budget; dropping it gives them back.
#[derive(Debug)]
pub struct Reservation {
    budgets: Arc<DomainBudgets>,
    dom: DomId,
    pages: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut ledger = self.budgets.ledger();
        if let Some(n) = ledger.get_mut(&self.dom) {
            *n = n.saturating_sub(self.pages);
            if *n == 0 {
                ledger.remove(&self.dom);
            }
        }
    }
}

/// A grant or foreign mapper that reserves pages in the peer's budget before each map.
#[derive(Debug)]
pub struct Budgeted<M> {
    inner: M,
    /// `None`: mappings are not charged (see [`Budgeted::uncharged`]).
    budgets: Option<Arc<DomainBudgets>>,
}

impl<M> Budgeted<M> {
    /// Wraps `inner`, charging its mappings to `budgets`.
    pub fn new(inner: M, budgets: Arc<DomainBudgets>) -> Self {
        Self {
            inner,
            budgets: Some(budgets),
        }
    }

    /// Wraps `inner` without charging its mappings. Used for `direct`'s foreign mappings,
    /// which take no maptrack entry; their count is bounded per device by the chunk cache
    /// (`DIRECT_CACHE_CHUNKS`), and only trusted frontends get `direct` (PROTOCOL.md 10.5).
    pub fn uncharged(inner: M) -> Self {
        Self {
            inner,
            budgets: None,
        }
    }

    fn reserve(&self, dom: DomId, pages: usize) -> Result<Option<Reservation>, XenError> {
        self.budgets
            .as_ref()
            .map(|b| b.reserve(dom, pages))
            .transpose()
    }

    /// The wrapped mapper.
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

/// A mapping charged to its domain's budget until it is dropped.
#[derive(Debug)]
pub struct BudgetedMapping<M> {
    // Field order is drop order: unmap first, then give the pages back.
    inner: M,
    _reservation: Option<Reservation>,
}

impl<M: MappedPages> MappedPages for BudgetedMapping<M> {
    fn mem(&self) -> SharedMem<'_> {
        self.inner.mem()
    }
    fn pages(&self) -> usize {
        self.inner.pages()
    }
}

impl<M: GrantMapping> GrantMapping for BudgetedMapping<M> {
    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError> {
        self.inner.set_unmap_notify(notify)
    }
}

impl<G: GrantMapper> GrantMapper for Budgeted<G> {
    type Mapping = BudgetedMapping<G::Mapping>;

    fn map(
        &self,
        peer: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<Self::Mapping, XenError> {
        let reservation = self.reserve(peer, refs.len())?;
        Ok(BudgetedMapping {
            inner: self.inner.map(peer, refs, access)?,
            _reservation: reservation,
        })
    }

    fn copy(&self, segments: &mut [GrantCopy<'_>]) -> Result<Vec<Result<(), XenError>>, XenError> {
        // Copies map nothing that outlives the call.
        self.inner.copy(segments)
    }
}

impl<F: ForeignMapper> ForeignMapper for Budgeted<F> {
    type Mapping = BudgetedMapping<F::Mapping>;

    fn map(&self, dom: DomId, gfns: &[Gfn], access: Access) -> Result<Self::Mapping, XenError> {
        let reservation = self.reserve(dom, gfns.len())?;
        Ok(BudgetedMapping {
            inner: self.inner.map(dom, gfns, access)?,
            _reservation: reservation,
        })
    }

    fn restrict(&self, dom: DomId) -> Result<(), XenError> {
        self.inner.restrict(dom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_per_domain_and_given_back_on_drop() {
        let b = DomainBudgets::new(10);
        let r1 = b.reserve(3, 6).unwrap();
        assert!(matches!(
            b.reserve(3, 5),
            Err(XenError::OverBudget {
                dom: 3,
                pages: 5,
                mapped: 6,
                budget: 10
            })
        ));
        let r2 = b.reserve(4, 10).unwrap();
        assert_eq!(b.snapshot(), vec![(3, 6), (4, 10)]);
        drop(r1);
        assert_eq!(b.mapped(3), 0);
        let _r3 = b.reserve(3, 10).unwrap();
        drop(r2);
        assert_eq!(b.snapshot(), vec![(3, 10)]);
        assert!(b.reserve(3, usize::MAX).is_err());
    }

    #[test]
    fn the_published_pool_size_leaves_room_for_rings() {
        assert_eq!(max_bounce_pages(DEFAULT_MAX_PAGES_PER_DOMAIN), 1008);
        assert_eq!(max_bounce_pages(0), 1);
        assert_eq!(max_bounce_pages(1 << 30), 16384);
    }
}
