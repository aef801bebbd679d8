//! Safe wrappers of the Linux Xen devices, domain-role detection, and a loopback platform.
//!
//! This crate owns every ioctl and every mmap that xenvirtio makes on `/dev/xen/*`. Each call
//! sits in a small safe function or in a RAII type whose `Drop` unmaps, revokes or unbinds.
//! Device code elsewhere is generic over the traits of [`platform`] and touches shared memory
//! only through [`mem::SharedMem`]. This crate never interprets what the pages hold.
#![deny(missing_docs)]

pub mod mem;
pub mod platform;

pub use platform::{Access, DomId, Gfn, GrantRef, Port};

/// An error from a Xen device or from the loopback platform.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// A system call failed.
    #[error("{op} failed")]
    Sys {
        /// What was being done, e.g. "GNTDEV_MAP_GRANT_REF".
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
