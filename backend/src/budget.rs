//! Per-domain budgets of mapped pages (issue 13, finding 3).
//!
//! This module owns the ledger of how many of each frontend domain's pages the daemon has
//! mapped, shared by all device threads, and the mapper wrappers that reserve pages in it
//! **before** every grant or foreign map call and release them when the mapping is dropped.
//! Every mapping of a frontend's memory (rings, bounce pool and its directory, persistent and
//! per-request grants, `direct` chunks) goes through these wrappers, so a domain can never hold
//! more than its budget, however many devices it has. It never maps anything itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{
    ForeignMapper, GrantCopy, GrantMapper, GrantMapping, MappedPages, UnmapNotify,
};
use xenvirtio_xen::{Access, DomId, Gfn, GrantRef, XenError};

/// Default pages one frontend domain's devices may have mapped together: 768 (3 MiB).
///
/// Dom0's maptrack table holds about 256K entries at Xen's default (1024 frames of 256
/// entries) and is shared with the kernel's blkback and netback. A guest with one blkback
/// disk and one netback vif may make those hold up to 1056 persistent grants plus about 352
/// in-flight segments (blkback) and 256 in-flight tx grants (netback): about 1664 entries.
/// For 100 guests that is 166,400, which leaves about 95,700 entries, 957 per guest; 768
/// pages per guest keeps 100 guests at 243,200 entries, about 7 % under the table's size.
pub const DEFAULT_MAX_PAGES_PER_DOMAIN: u64 = 768;

/// Devices of one domain the published per-device bounce-pool size leaves room for.
pub const BOUNCE_SHARES_PER_DOMAIN: u64 = 4;

/// Pages of the domain budget a frontend should use for one device's bounce pool
/// (`max-bounce-pages`): a quarter of the budget, less room for the directory and the rings,
/// so that four devices of one domain fit; at least 1 and at most 16384.
pub fn max_bounce_pages(budget: u64) -> u32 {
    let share = (budget / BOUNCE_SHARES_PER_DOMAIN).saturating_sub(8);
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
    budgets: Arc<DomainBudgets>,
}

impl<M> Budgeted<M> {
    /// Wraps `inner`, charging its mappings to `budgets`.
    pub fn new(inner: M, budgets: Arc<DomainBudgets>) -> Self {
        Self { inner, budgets }
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
    _reservation: Reservation,
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
        let reservation = self.budgets.reserve(peer, refs.len())?;
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
        let reservation = self.budgets.reserve(dom, gfns.len())?;
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
    fn the_published_pool_size_leaves_room_for_four_devices() {
        assert_eq!(max_bounce_pages(DEFAULT_MAX_PAGES_PER_DOMAIN), 184);
        assert_eq!(max_bounce_pages(0), 1);
        assert_eq!(max_bounce_pages(1 << 30), 16384);
    }
}
