//! Helpers shared by the cross-crate tests in `tests/tests/`.
//!
//! - [`xenstored`]: Debian's real C xenstored, one per test, in a temporary folder;
//! - [`ring_bridge`]: a socket-to-ring bridge that lets a socket client act as a guest domain;
//! - [`help`]: `--help` checked as an 80-column terminal shows it.
#![deny(missing_docs)]

pub mod help;
pub mod ring_bridge;
pub mod xenstored;
