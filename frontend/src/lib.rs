//! The xenvirtio driver side: it drives virtio devices served by a backend in another domain.
//!
//! This crate owns what runs in the guest (or in Dom0 as a frontend): the choice of DMA
//! strategy for the domain's role ([`policy`]), the DMA memory ([`dma`]: grant arena, bounce
//! pool, pinned memory), the driver side of the split virtqueues ([`virtqueue`], [`queue`]),
//! the handshake of `docs/PROTOCOL.md` from the frontend's end ([`transport`]), and the
//! blk/console/rng drivers ([`blk`], [`console`], [`rng`]). It never depends on the backend
//! crate and never trusts the backend's writes to shared memory.
//!
//! # Connecting
//!
//! A [`Frontend`] acts as one domain through a [`Platform`](xenvirtio_xen::platform::Platform)
//! (the real `/dev/xen` devices, or the loopback platform) and a xenstore connection, with the
//! domain's [`DomainRole`](xenvirtio_xen::role::DomainRole), which decides the default DMA
//! strategy. `connect_blk`, `connect_console` and `connect_rng` run the handshake and return a
//! connected device; `close()` (or dropping it) tears it down by the protocol's rules.
//!
//! # Zero-copy I/O
//!
//! Buffers allocated from the device's DMA memory ([`dma::DmaBuf`]) are handed to the backend
//! as they are: allocate, fill, submit, and collect the completion, which returns the buffer.
//! Caller slices given to the blocking API (`read_at`, `write_at`) are copied through DMA
//! memory instead (the per-buffer rule: nothing outside DMA memory ever reaches a descriptor).
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use xenvirtio_frontend::blk::BlkOptions;
//! use xenvirtio_frontend::transport::self_domid;
//! use xenvirtio_frontend::Frontend;
//! use xenvirtio_xen::linux::LinuxXen;
//! use xenvirtio_xen::role::DomainRole;
//! use xenvirtio_xenstore::{XenStore, XsClient};
//!
//! # fn main() -> anyhow::Result<()> {
//! let store: Arc<dyn XenStore> = Arc::new(XsClient::open_xenbus()?);
//! let domid = self_domid(&*store, false)?;
//! let frontend = Frontend::new(LinuxXen::new(domid), store, DomainRole::detect(domid)?);
//! let disk = frontend.connect_blk(0, &BlkOptions::default())?;
//! println!("{} via {}: {}", disk.size(), disk.negotiated().strategy, disk.negotiated().reason);
//!
//! // Zero-copy: the buffer is DMA memory; nothing is copied on its way to the backend.
//! {
//!     let mut queue = disk.lock_queue(0);
//!     let buf = queue.alloc(64 * 1024)?;
//!     buf.write(0, &[0xab; 64 * 1024])?;
//!     let id = queue.submit_write(buf, 2048)?; // sector 2048 = byte 1 MiB
//!     for done in queue.wait(Some(Duration::from_secs(5)))? {
//!         assert_eq!(done.id, id);
//!         let written = done.result?; // the buffer is back in `done.buf`
//!         println!("wrote {written} bytes in {:?}", done.latency);
//!     }
//! }
//!
//! // Blocking, with the caller's own memory (bounced through DMA memory), from any thread.
//! let mut block = vec![0u8; 4096];
//! disk.read_at(&mut block, 1 << 20)?;
//! disk.close()?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod blk;
pub mod console;
pub mod dma;
pub mod knbd;
pub mod nbd;
pub mod net;
mod netlink;
pub mod pattern;
pub mod policy;
pub mod queue;
pub mod rng;
pub mod supervisor;
pub mod transport;
pub mod vduse;
pub mod virtqueue;

pub use transport::{ConnectError, ConnectOptions, Frontend};
