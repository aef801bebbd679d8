//! The xenvirtio driver side: it drives virtio devices served by a backend in another domain.
//!
//! This crate owns what runs in the guest (or in Dom0 as a frontend): the choice of DMA
//! strategy for the domain's role, the DMA memory (grant arena, bounce pool, pinned memory),
//! the driver side of the split virtqueues, the handshake of `docs/PROTOCOL.md` from the
//! frontend's end, the blk/console/rng drivers and the NBD export. It never depends on the
//! backend crate and never trusts the backend's writes to shared memory.
#![deny(missing_docs)]

pub mod nbd;
pub mod policy;
pub mod virtqueue;
