//! The vDPA bus, through the `vdpa` generic netlink family: add a VDUSE device to it (what
//! iproute2's `vdpa dev add mgmtdev vduse name NAME` does) and remove it. Once added, the
//! kernel's `virtio_vdpa` driver makes it a virtio device, and the kernel's own `virtio_blk`
//! binds it.

use super::VduseError;
use super::sys;
use crate::netlink::{Attrs, GenlSocket};

/// A connection to this kernel's `vdpa` netlink family.
#[derive(Debug)]
pub struct VdpaBus {
    sock: GenlSocket,
    family: u16,
}

impl VdpaBus {
    /// Finds the `vdpa` family; it exists once `vdpa.ko` is loaded.
    pub fn open() -> Result<VdpaBus, VduseError> {
        let mut sock = GenlSocket::open().map_err(|source| VduseError::Netlink {
            what: "opening a generic netlink socket",
            source,
        })?;
        let family = sock
            .family(sys::VDPA_GENL_NAME)
            .map_err(|source| VduseError::Netlink {
                what: "looking up the vdpa family",
                source,
            })?
            .ok_or(VduseError::NoVdpaFamily)?;
        // Adding a device waits for the kernel's virtio-blk driver to probe it, partition
        // table read included: seconds under an emulated CPU.
        sock.set_receive_timeout(120)
            .map_err(|source| VduseError::Netlink {
                what: "setting the netlink receive timeout",
                source,
            })?;
        Ok(VdpaBus { sock, family })
    }

    /// Adds VDUSE device `name` to the bus (`VDPA_CMD_DEV_NEW`). The kernel's virtio driver
    /// probes it before this returns: its first requests must already be served.
    pub fn add(&mut self, name: &str) -> Result<(), VduseError> {
        let mut attrs = Attrs::new();
        attrs
            .string(sys::VDPA_ATTR_MGMTDEV_DEV_NAME, sys::VDPA_MGMTDEV_VDUSE)
            .string(sys::VDPA_ATTR_DEV_NAME, name);
        self.command(
            sys::VDPA_CMD_DEV_NEW,
            &attrs,
            "vdpa dev add (VDPA_CMD_DEV_NEW)",
        )
    }

    /// Removes device `name` from the bus (`VDPA_CMD_DEV_DEL`): the virtio driver lets go.
    pub fn remove(&mut self, name: &str) -> Result<(), VduseError> {
        let mut attrs = Attrs::new();
        attrs.string(sys::VDPA_ATTR_DEV_NAME, name);
        self.command(
            sys::VDPA_CMD_DEV_DEL,
            &attrs,
            "vdpa dev del (VDPA_CMD_DEV_DEL)",
        )
    }

    fn command(&mut self, cmd: u8, attrs: &Attrs, what: &'static str) -> Result<(), VduseError> {
        self.sock
            .request(self.family, cmd, sys::VDPA_GENL_VERSION, attrs)
            .map_err(|source| VduseError::Netlink { what, source })?;
        Ok(())
    }
}
