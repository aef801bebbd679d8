//! The `bounce` strategy (swiotlb-xen style): a pool granted once, and copies.
//!
//! At connect the frontend grants `bounce/pages` pool pages read-write to the backend, lists
//! their references in directory pages (1024 little-endian `u32`s each, PROTOCOL.md section 5)
//! that it grants **read-only**, and publishes the directory's references as `bounce/dir-ref`.
//! The backend maps the pool once; a descriptor names `1<<62 | offset` into it and may span
//! pool pages. Callers' data is copied into the pool before a request is made available and
//! out of it after completion; the copies are counted.
//!
//! This is the strategy of Dom0, which may hold foreign pages that it cannot grant, and the
//! one that shows the backend the least: only the pool, never a page of the caller's own.
//! This module never lets the directory be written by the backend.

use std::sync::Arc;

use xenvirtio_virtio::protocol::{MAX_BOUNCE_PAGES, directory_pages, encode_directory_page};
use xenvirtio_xen::mem::PAGE_SIZE;
use xenvirtio_xen::platform::GrantAllocator;
use xenvirtio_xen::{Access, DomId};

use super::arena::{Addressing, Arena, Backing, DmaCounters};
use super::{DmaError, GrantBacking, grant_pages};

/// The pool (`pages` pages granted read-write to `peer`) and its directory (granted
/// read-only, filled with the pool's references).
pub(crate) fn pool<A: GrantAllocator>(
    granter: &A,
    peer: DomId,
    pages: usize,
    counters: &Arc<DmaCounters>,
) -> Result<(Arena, GrantBacking<A::Grant>), DmaError> {
    if pages == 0 || pages > MAX_BOUNCE_PAGES as usize {
        return Err(DmaError::PoolSize {
            pages,
            max: MAX_BOUNCE_PAGES,
        });
    }
    let pool = grant_pages(
        granter,
        peer,
        pages,
        Access::ReadWrite,
        "the bounce pool",
        counters,
    )?;
    let refs = pool.refs().to_vec();
    let dir_pages = directory_pages(pages);
    let directory = grant_pages(
        granter,
        peer,
        dir_pages,
        Access::ReadOnly,
        "the bounce pool's directory",
        counters,
    )?;
    let dir_mem = directory.mem();
    for index in 0..dir_pages {
        dir_mem.write(index * PAGE_SIZE, &encode_directory_page(&refs, index))?;
    }
    tracing::debug!(
        peer,
        pages,
        directory_pages = dir_pages,
        "bounce pool granted"
    );
    Ok((
        Arena::new(Box::new(pool), Addressing::Pool, Arc::clone(counters)),
        directory,
    ))
}
