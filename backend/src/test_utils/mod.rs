//! Test helpers (feature `test-utils`): a frontend that follows `docs/PROTOCOL.md` over any
//! [`Platform`](xenvirtio_xen::platform::Platform) and any [`XenStore`](xenvirtio_xenstore::XenStore),
//! and the toolstack's part of creating devices.
//!
//! They let the backend's tests, the loopback crate and the cross-crate tests drive the daemon
//! in one process over `LoopbackXen` and `MemStore` (or a real xenstored, acting as a guest).
//! The frontend here has its own small driver ring ([`DriverRing`]): it never depends on the
//! frontend crate, so dependencies keep running one way. Nothing here is used by the daemon.
//!
//! ```
//! # use std::sync::Arc;
//! # use xenvirtio_backend::daemon::{Daemon, DaemonConfig};
//! # use xenvirtio_backend::test_utils::*;
//! # use xenvirtio_xen::loopback::LoopbackXen;
//! # use xenvirtio_xenstore::{MemStore, XenStore};
//! let hv = LoopbackXen::new();
//! let xs = MemStore::new();
//! xs.start_guest(5).unwrap();
//! let dom0: Arc<dyn XenStore> = Arc::new(xs.connect(0).unwrap());
//! let daemon = Daemon::new(hv.domain(0), dom0.clone(), DaemonConfig::default()).unwrap().spawn().unwrap();
//! attach(&*dom0, 0, 5, 0, &TestDevice::rng()).unwrap();
//! let guest: Arc<dyn XenStore> = Arc::new(xs.connect(5).unwrap());
//! let mut rng = TestFrontend::connect(hv.domain(5), guest, 0, 0, FrontendOptions::new(TestStrategy::GrantPerRequest)).unwrap();
//! assert_eq!(rng.rng_read(32).unwrap().len(), 32);
//! rng.close().unwrap();
//! daemon.stop().unwrap();
//! ```

mod driver_ring;
mod frame_peer;
mod frontend;
mod toolstack;

pub use driver_ring::{DriverRing, DriverRingError, Segment};
pub use frame_peer::FramePeer;
pub use frontend::{
    DEFAULT_TIMEOUT, FrontendOptions, Hostile, TestError, TestFrontend, TestStrategy,
};
pub use toolstack::{TestDevice, attach, remove, request_removal};
