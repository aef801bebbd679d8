//! The `grant` strategy: an arena of this domain's pages granted read-write to the backend.
//!
//! gntalloc can only grant pages it allocates itself, so the arena is allocated once at
//! connect (one `IOCTL_GNTALLOC_ALLOC_GREF` for all its pages) and every buffer comes out of
//! it. A descriptor names `1<<63 | gref<<12 | offset` and never leaves its page, so a buffer of
//! several pages becomes one descriptor per page.
//!
//! - **Per-request mode**: the backend maps the grants of each chain (one batch per access)
//!   and unmaps them before it completes the chain; it can reach a page only while a request
//!   that names it is in flight.
//! - **Persistent mode** (`feature-persistent = 1`, when the backend offers it): the backend
//!   keeps each page mapped after first use. The frontend's promise (PROTOCOL.md section 6) is
//!   that every buffer comes from this fixed arena, whose grants stay valid until the backend
//!   reaches Closed; that holds by construction here, since the arena lives as long as the
//!   connection and the connection revokes it only after Closed.
//!
//! This module never grants memory it did not allocate, and never grants anything read-only
//! (device-readable buffers share pages with device-writable ones).

use std::sync::Arc;

use xenvirtio_xen::platform::GrantAllocator;
use xenvirtio_xen::{Access, DomId};

use super::arena::{Addressing, Arena, DmaCounters};
use super::{DmaError, grant_pages};

/// The arena: `pages` pages granted read-write to `peer`.
pub(crate) fn arena<A: GrantAllocator>(
    granter: &A,
    peer: DomId,
    pages: usize,
    counters: &Arc<DmaCounters>,
) -> Result<Arena, DmaError> {
    let grant = grant_pages(
        granter,
        peer,
        pages,
        Access::ReadWrite,
        "the grant arena",
        counters,
    )?;
    let refs = grant.refs().to_vec();
    tracing::debug!(
        peer,
        pages,
        first_ref = refs.first(),
        "grant arena allocated"
    );
    Ok(Arena::new(
        Box::new(grant),
        Addressing::Grant(refs),
        Arc::clone(counters),
    ))
}
