//! VDUSE: the guest kernel's own virtio-blk driver on a device this frontend serves.
//!
//! Linux's VDUSE (`vduse.ko`, with `vdpa.ko` and `virtio_vdpa.ko`; Debian builds them from 6.12,
//! not in 6.1) lets a user-space process be a virtio device: the process creates the device on
//! `/dev/vduse/control`, adds it to the vDPA bus over the `vdpa` netlink family, and the kernel's
//! `virtio_vdpa` turns it into a virtio device that `virtio_blk` binds, as `/dev/vdX`. The
//! driver's rings and buffers live in VDUSE's IOVA domain, which the process maps.
//!
//! The layer: the ABI (`sys`, every layout checked), creating and destroying devices
//! (`control`), the vDPA bus (`vdpa`), one open device's messages, queues and IOTLB (`device`),
//! the IOVA regions mapped on demand (`iova`), one virtio-blk request served from a
//! `BlockExport` (`request`), the threads that serve a device ([`VduseBlk`], `server`), and
//! [`probe`], which tells what this kernel offers. It knows nothing of Xen: the export behind
//! the device is the frontend's supervised xenbus device in `serve --kernel-vduse`.

pub mod control;
pub mod device;
pub mod iova;
mod request;
mod server;
pub(crate) mod sys;
pub mod vdpa;

use std::io;
use std::path::Path;

use xenvirtio_virtio::blk::BlkConfig;
use xenvirtio_virtio::features::{self, bit};

pub use control::{DeviceSpec, VduseControl};
pub use server::VduseBlk;
pub use vdpa::VdpaBus;

/// How the VDUSE layer failed.
#[derive(Debug, thiserror::Error)]
pub enum VduseError {
    /// A device could not be opened.
    #[error(
        "cannot open {path}: {source} (VDUSE needs vduse.ko, Linux 6.12's Debian kernel or later: modprobe vduse)"
    )]
    Open {
        /// The path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which one.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("{what} failed: {source}")]
    Netlink {
        /// Which one.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Reading or writing the device failed.
    #[error("{what} failed: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel has no `vdpa` netlink family.
    #[error("the kernel has no vdpa netlink family (modprobe vdpa)")]
    NoVdpaFamily,
    /// A device description the kernel would refuse.
    #[error("{why}")]
    Spec {
        /// What is wrong.
        why: String,
    },
}

/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// The spec of a VDUSE virtio-blk device named `name` with config `config`, offering the
/// block features of `offered` that this layer can pass to the guest's driver, plus
/// `VERSION_1` and `ACCESS_PLATFORM` (which VDUSE requires). `CONFIG_WCE` is never offered:
/// VDUSE's config space is read-only.
pub fn blk_spec(name: &str, config: &BlkConfig, offered: u64, queue_size: u16) -> DeviceSpec {
    use features::blk as b;
    let pass = [
        b::SIZE_MAX,
        b::SEG_MAX,
        b::RO,
        b::BLK_SIZE,
        b::FLUSH,
        b::TOPOLOGY,
        b::MQ,
        b::DISCARD,
        b::WRITE_ZEROES,
    ];
    let mut f = bit(features::transport::VERSION_1) | bit(features::transport::ACCESS_PLATFORM);
    for n in pass {
        if features::has(offered, n) {
            f |= bit(n);
        }
    }
    let queues = if features::has(f, b::MQ) {
        u32::from(config.num_queues.max(1))
    } else {
        1
    };
    DeviceSpec {
        name: name.to_string(),
        device_id: VIRTIO_ID_BLOCK,
        features: f,
        queues,
        queue_size,
        config: config.to_bytes().to_vec(),
    }
}

/// What this kernel offers for VDUSE.
#[derive(Debug)]
pub struct VdusePaths {
    /// The control device opened and agreed on API version 0: the kernel's version.
    pub control: Result<u64, VduseError>,
    /// The `vdpa` netlink family answered.
    pub vdpa: Result<(), VduseError>,
    /// `virtio_vdpa` is loaded: a device on the bus becomes a virtio device.
    pub virtio_vdpa: bool,
    /// With `create`: a virtio-blk device was created, its queues set up, and destroyed again.
    pub created: Option<Result<(), VduseError>>,
}

impl VdusePaths {
    /// Whether a VDUSE block device can be made here.
    pub fn usable(&self) -> bool {
        self.control.is_ok()
            && self.vdpa.is_ok()
            && self.virtio_vdpa
            && self.created.as_ref().is_none_or(Result::is_ok)
    }
}

/// Looks at what this kernel offers; with `create`, also creates a small virtio-blk device
/// named `name` and destroys it again, which proves that the kernel accepts this layer's
/// device configuration (it checks the features, the config space and every queue).
pub fn probe(create: Option<&str>) -> VdusePaths {
    let control = VduseControl::open();
    let created = match (&control, create) {
        (Ok(c), Some(name)) => {
            let config = BlkConfig {
                capacity: 2048,
                blk_size: 512,
                seg_max: 126,
                num_queues: 1,
                ..BlkConfig::default()
            };
            let offered = bit(features::blk::BLK_SIZE)
                | bit(features::blk::SEG_MAX)
                | bit(features::blk::FLUSH);
            let spec = blk_spec(name, &config, offered, 256);
            Some(c.create(&spec).and_then(|()| c.destroy(name)))
        }
        _ => None,
    };
    VdusePaths {
        control: control.and_then(|c| c.api_version()),
        vdpa: VdpaBus::open().map(drop),
        virtio_vdpa: Path::new("/sys/bus/vdpa/drivers/virtio_vdpa").exists(),
        created,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use features::blk as b;

    #[test]
    fn the_blk_spec_offers_what_vduse_requires_and_never_wce() {
        let config = BlkConfig {
            capacity: 1 << 20,
            num_queues: 4,
            ..BlkConfig::default()
        };
        let offered = bit(b::FLUSH) | bit(b::CONFIG_WCE) | bit(b::MQ) | bit(b::DISCARD);
        let s = blk_spec("xvda", &config, offered, 128);
        assert!(features::has(s.features, features::transport::VERSION_1));
        assert!(features::has(
            s.features,
            features::transport::ACCESS_PLATFORM
        ));
        assert!(features::has(s.features, b::FLUSH));
        assert!(features::has(s.features, b::DISCARD));
        assert!(!features::has(s.features, b::CONFIG_WCE));
        assert_eq!(s.queues, 4);
        assert_eq!(s.device_id, VIRTIO_ID_BLOCK);
        assert_eq!(s.config, config.to_bytes().to_vec());
        // without MQ, one queue whatever the config says
        let one = blk_spec("xvda", &config, bit(b::FLUSH), 128);
        assert_eq!(one.queues, 1);
    }
}
