//! The xenvirtio device side: it serves virtio devices to frontends in other domains.
//!
//! This crate owns everything the backend daemon does: discovering devices in xenstore, the
//! handshake of `docs/PROTOCOL.md`, mapping the frontend's memory under the negotiated DMA
//! strategy, the device models over the split virtqueues (`xenvirtio_virtio::device_queue`), and the admin
//! commands. It never depends on the frontend crate, and device models never touch `/dev/xen`:
//! they see buffers through `xenvirtio_xen::mem::SharedMem`.
#![deny(missing_docs)]

pub mod admin;
pub mod blk;
pub mod budget;
pub mod chain_io;
pub mod console;
pub mod daemon;
pub mod device;
pub mod dma;
pub mod event_loop;
pub mod follow;
pub mod handshake;
pub mod image_lock;
pub mod net;
pub mod rng;
pub mod stats;
#[cfg(feature = "test-utils")]
pub mod test_utils;
