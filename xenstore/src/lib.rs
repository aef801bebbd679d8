//! Xenstore for xenvirtio: a client for the real daemon, an in-memory store with the same
//! semantics, and the xenbus layer (device states, paths, typed reads) built on them.
//!
//! - [`XenStore`] is the object-safe trait every caller programs against; hold it as
//!   `Arc<dyn XenStore>`.
//! - [`XsClient`] talks to xenstored over its unix socket or the guest's `/dev/xen/xenbus`.
//!   Replies are matched to requests by `req_id` on a reader thread, so one client serves
//!   many threads while watch events interleave. A lost connection fails every pending and
//!   later request with [`XsError::ConnectionLost`] and wakes watch waiters.
//! - [`WatchEvents`] is a queue of watch events that registers in the caller's own
//!   `mio::Poll`.
//! - [`Transaction`] aborts on drop; [`transaction`] retries on EAGAIN, with a bound.
//! - [`MemStore`] copies the C daemon's rules (permissions, quotas, watches, transaction
//!   conflicts) for unit tests that need no daemon.
//! - [`xenbus`] holds `XenbusState`, the virtio device paths and the handshake helpers.
//!
//! The crate never installs a tracing subscriber; it only emits events.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use xenvirtio_xenstore::xenbus::{self, XenbusState};
//! use xenvirtio_xenstore::{MemStore, Perm, TxId, XenStore, transaction};
//!
//! # fn main() -> Result<(), xenvirtio_xenstore::XsError> {
//! // In production: `let store: Arc<dyn XenStore> = Arc::new(XsClient::open()?);`
//! let daemon = MemStore::new();
//! daemon.start_guest(5)?;
//! let dom0: Arc<dyn XenStore> = Arc::new(daemon.connect(0)?);
//! let guest: Arc<dyn XenStore> = Arc::new(daemon.connect(5)?);
//!
//! // The backend publishes a device in one transaction, readable by the guest.
//! let be = xenbus::backend_dir(0, 5, 0);
//! transaction(&*dom0, 8, |tx| {
//!     dom0.mkdir(tx, &be)?;
//!     dom0.set_perms(tx, &be, &[Perm::owner(0), Perm::read(5)])?;
//!     dom0.write(tx, &format!("{be}/device-features"), xenbus::hex_u64(1 << 32).as_bytes())?;
//!     dom0.write(tx, &xenbus::state_path(&be), b"2")
//! })?;
//!
//! // The guest sees it, and a permission error where it has no access.
//! assert_eq!(xenbus::read_hex_u64(&*guest, TxId::NONE, &format!("{be}/device-features"))?, 1 << 32);
//! assert!(guest.write(TxId::NONE, "/local/domain/0/x", b"1").unwrap_err().is_eacces());
//! let state = xenbus::wait_for_state(&*guest, &xenbus::state_path(&be), |s| s == XenbusState::InitWait, Duration::from_secs(1))?;
//! assert_eq!(state, XenbusState::InitWait);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod client;
mod error;
mod mem;
mod perms;
mod store;
mod transport;
mod watch;
pub mod wire;
pub mod xenbus;

pub use client::XsClient;
pub use error::{Errno, XsError};
pub use mem::{MemConnection, MemStore};
pub use perms::{DomId, Perm, PermKind};
pub use store::{Transaction, TxId, XenStore, transaction};
pub use transport::{DEFAULT_SOCKET_PATHS, XENBUS_DEVICE, XENSTORED_PATH_ENV};
pub use watch::{WatchEvent, WatchEvents};
