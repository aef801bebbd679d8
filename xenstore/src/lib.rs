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
