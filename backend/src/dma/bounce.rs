//! `bounce`: the pool, mapped once at connect.

use std::sync::Arc;

use xenvirtio_virtio::device_queue::ChainDescriptor;
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};

use super::{DmaMapError, MappedChain, Piece, SharedMapping};

/// `bounce`: the pool, mapped once at connect.
pub struct BounceSpace {
    pub(super) pool: SharedMapping,
    pub(super) pool_len: u64,
}

impl std::fmt::Debug for BounceSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BounceSpace")
            .field("pool_len", &self.pool_len)
            .finish_non_exhaustive()
    }
}

impl BounceSpace {
    pub(super) fn map_chain(&self, descs: &[ChainDescriptor]) -> Result<MappedChain, DmaMapError> {
        let mut pieces = Vec::with_capacity(descs.len());
        for d in descs {
            match DmaAddr::decode_range(DmaStrategy::Bounce, d.addr, d.len, self.pool_len)? {
                DmaAddr::Bounce { offset } => pieces.push(Piece {
                    map: Arc::clone(&self.pool),
                    // Within pool_len, which is a usize-sized mapping.
                    offset: offset as usize,
                    len: d.len as usize,
                    writable: d.writable,
                }),
                _ => unreachable!("decode under Bounce yields bounce addresses"),
            }
        }
        Ok(MappedChain { pieces })
    }
}
