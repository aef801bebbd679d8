//! Both ends of xenvirtio in one process, without Xen: the real backend daemon as Dom0 and the
//! real frontend as a guest, over the loopback hypervisor and the in-memory xenstore.
//!
//! This crate is the only place (with the cross-crate tests) where frontend and backend code
//! meet. It owns the pair's world ([`pair`]), the roles a frontend can play without Xen
//! ([`role`]), the counters both ends and the hypervisor keep ([`counters`]) and the
//! benchmark that compares the DMA strategies ([`bench`]) and the verified soak of many devices
//! at depth ([`soak`]). The binary `xenvirtio-loopback`
//! exports a blk device over NBD from such a pair, and runs the benchmark.
//!
//! ```
//! use xenvirtio_backend::admin::AttachRequest;
//! use xenvirtio_backend::daemon::DaemonConfig;
//! use xenvirtio_frontend::blk::BlkOptions;
//! use xenvirtio_loopback::pair::Pair;
//! use xenvirtio_loopback::role::RoleName;
//! use xenvirtio_xen::loopback::LoopbackConfig;
//!
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let image = dir.path().join("disk.img");
//! std::fs::write(&image, vec![0u8; 1 << 20])?;
//!
//! let pair = Pair::start(LoopbackConfig::default(), DaemonConfig::default())?;
//! let role = RoleName::X86Pvh;
//! pair.add_guest(role.domid(), "guest")?;
//! let attached = pair.attach(&AttachRequest::blk(role.domid(), &image))?;
//! let disk = pair.frontend(role.role())?.connect_blk(attached.devid, &BlkOptions::default())?;
//! disk.write_at(b"hello", 512)?;
//! disk.close()?;
//! assert_eq!(&std::fs::read(&image)?[512..517], b"hello");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod bench;
pub mod counters;
pub mod pair;
pub mod role;
pub mod soak;
