//! Virtio wire formats shared by both ends of xenvirtio.
//!
//! This crate owns the bytes that cross between domains: the split-ring structures, feature and
//! status bits, device ids, the blk/console/rng/net request and config structures, and the xenvirtio
//! transport's DMA address encodings and xenstore key names (see `docs/PROTOCOL.md`). It holds no
//! state and performs no I/O. Every structure is `#[repr(C)]` with its size and field offsets
//! asserted against the virtio 1.2 specification, and is encoded and decoded field by field in
//! little-endian order: guest bytes are never transmuted.
//!
//! One module holds state: [`device_queue`], the device side of a split ring over memory shared
//! with a hostile driver (`xenvirtio_xen::mem::SharedMem`). Both devices of the project use it:
//! the backend daemon for the frontends' rings, and the frontend's VDUSE layer for the rings of
//! the guest kernel's own virtio driver.
#![deny(missing_docs)]

pub mod blk;
pub mod console;
pub mod device_queue;
pub mod dma;
pub mod features;
pub mod ids;
pub mod net;
pub mod protocol;
pub mod split;
pub mod status;
pub mod vdev;

mod le;
