//! The subcommands of `xenvirtio-frontend`, one module each; `main.rs` holds the command line,
//! the shared helpers and the dispatch.

pub(crate) mod bench;
pub(crate) mod copy;
pub(crate) mod kernel_paths;
pub(crate) mod progress;
pub(crate) mod serve;
pub(crate) mod serve_blk;
pub(crate) mod stdio;
pub(crate) mod verify;
