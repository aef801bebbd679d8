//! Safe wrappers of the Linux Xen devices, domain-role detection, and a loopback platform.
//!
//! This crate owns every ioctl and every mmap that xenvirtio makes on `/dev/xen/*`. Each call
//! sits in a small safe function or in a RAII type whose `Drop` unmaps, revokes or unbinds.
//! Device code elsewhere is generic over the traits of [`platform`] and touches shared memory
//! only through [`mem::SharedMem`]. This crate never interprets what the pages hold.
//!
//! - [`platform`]: the traits (grants out and in, event channels, foreign mapping, pinned
//!   memory) and [`platform::BoundPort`].
//! - [`linux`]: the implementation over `/dev/xen/{gntalloc,gntdev,evtchn,privcmd}`.
//! - [`loopback`]: the same traits in one process with several domains, checking grants the
//!   way Xen does and recording every mapping, for unit tests, the try-out and benchmarks.
//! - [`role`]: which kind of domain this is (Dom0 or not, PV/PVH/HVM, arch, Xen version).
//! - [`mem`]: [`mem::SharedMem`], the only way shared pages are read or written.
//! - [`signals`]: SIGINT and SIGTERM as a stop request, for the long-running commands.
#![deny(missing_docs)]

mod error;
pub mod linux;
pub mod loopback;
pub mod mem;
mod mmap;
pub mod platform;
pub mod role;
pub mod service;
pub mod signals;
mod sys;

pub use error::{GrantStatus, Refusal, XenError};
pub use platform::{Access, DomId, Gfn, GrantRef, Port};
