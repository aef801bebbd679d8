//! The NBD export: block devices served to the guest's own tools (qemu-img, qemu-io, nbdcopy,
//! nbdinfo, the kernel's nbd-client) over the NBD protocol, and a small client for the guests
//! that have none.
//!
//! What this module owns:
//! - [`BlockExport`], the narrow view of a block device the server needs, and [`FileExport`],
//!   its implementation over a file, so the server is usable and testable on its own;
//! - [`NbdServer`], a long-running server of one export on a unix socket and optionally on
//!   loopback TCP, with the fixed newstyle handshake (`NBD_OPT_GO`, `INFO`, `LIST`,
//!   `EXPORT_NAME`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`),
//!   READ/WRITE(+FUA)/FLUSH/TRIM/WRITE_ZEROES/BLOCK_STATUS(`base:allocation`)/DISC, many
//!   requests in flight per connection with replies as they complete, and graceful shutdown;
//! - [`NbdClient`], a blocking client used by `xenvirtio-frontend verify --nbd` and the tests;
//! - [`proto`], the wire constants and headers.
//!
//! What it must never do: trust a client. Every length is capped before anything is
//! allocated (options at 64 KiB, requests at the advertised maximum block size, requests in
//! flight at a per-connection budget of count and bytes, larger requests through a 1 MiB
//! per-connection buffer), every request is checked against the export's size, alignment,
//! capabilities and read-only state before the device is touched, and a client that breaks the
//! protocol, stalls in the handshake or vanishes loses only its own connection. It never
//! listens beyond loopback. The protocol reference is the NBD project's `doc/proto.md`; quoted
//! sentences in comments come from it.
//!
//! TLS, extended headers and `NBD_CMD_CACHE` are not implemented: the options that would
//! enable them are refused with `NBD_REP_ERR_UNSUP`, so clients fall back.

mod client;
mod conn;
mod export;
mod pipeline;
pub mod proto;
mod reply;
mod server;
mod session;
mod transmit;

pub use client::{NbdAddress, NbdClient, NbdClientError};
pub use export::{BlockExport, FileExport, write_zero_buffers};
pub use server::{
    DEFAULT_MAX_REQUEST, NbdServer, NbdServerConfig, NbdServerError, NbdStats, ShutdownTrigger,
};
