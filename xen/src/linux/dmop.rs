//! One device-model operation through `/dev/xen/privcmd` (`IOCTL_PRIVCMD_DM_OP`): asking Xen for
//! an IOREQ server and giving it back. That is the probe for why this project exists: a virtio
//! device model of the usual kind (virtio-mmio or virtio-pci trapped by Xen and forwarded to a
//! user-space model) needs an IOREQ server, and a hypervisor built without
//! `CONFIG_IOREQ_SERVER` refuses to create one. The project itself never uses IOREQ.

use std::io;
use std::os::fd::AsFd;

use crate::XenError;
use crate::linux::{LinuxForeignMapper, ioctl};
use crate::platform::DomId;
use crate::sys::{self, PrivcmdDmOp, PrivcmdDmOpBuf, XenDmOp};

/// What Xen answered to `XEN_DMOP_create_ioreq_server` for a domain.
#[derive(Debug)]
pub enum IoreqProbe {
    /// Xen created an IOREQ server, and the probe destroyed it again.
    Created {
        /// The server's id (`ioservid_t`).
        id: u16,
        /// How destroying it went.
        destroyed: io::Result<()>,
    },
    /// Xen refused: `EOPNOTSUPP` or `ENOSYS` from a hypervisor built without IOREQ servers,
    /// `EINVAL`, `ESRCH` or `EPERM` for a domain that cannot have one.
    Refused(io::Error),
}

/// `IOCTL_PRIVCMD_DM_OP` of one `xen_dm_op` for `dom`.
fn dm_op(dev: &LinuxForeignMapper, dom: DomId, op: &mut XenDmOp) -> io::Result<()> {
    let buf = PrivcmdDmOpBuf {
        uptr: (op as *mut XenDmOp).cast(),
        size: size_of::<XenDmOp>(),
    };
    let mut arg = PrivcmdDmOp {
        dom,
        num: 1,
        ubufs: &raw const buf,
    };
    // SAFETY: arg is a privcmd_dm_op naming one buffer, `buf`, which points at `op`: a live,
    // writable xen_dm_op of `size` bytes that Xen reads and writes back (create_ioreq_server
    // returns the id in it). Both outlive the call.
    unsafe {
        ioctl(
            dev.device().as_fd(),
            sys::IOCTL_PRIVCMD_DM_OP,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(())
}

/// Asks Xen for an IOREQ server for domain `dom` (without buffered ioreqs) and destroys it
/// again. Fails only when privcmd cannot be opened; Xen's refusal is an [`IoreqProbe::Refused`].
pub fn probe_ioreq_server(dom: DomId) -> Result<IoreqProbe, XenError> {
    let dev = LinuxForeignMapper::open()?;
    let mut op = XenDmOp {
        op: sys::XEN_DMOP_CREATE_IOREQ_SERVER,
        pad: 0,
        u: [0; 256],
    };
    if let Err(e) = dm_op(&dev, dom, &mut op) {
        return Ok(IoreqProbe::Refused(e));
    }
    // create_ioreq_server: handle_bufioreq (u8), pad[3], then the id (u16) Xen wrote back.
    let id = u16::from_ne_bytes([op.u[4], op.u[5]]);
    let mut destroy = XenDmOp {
        op: sys::XEN_DMOP_DESTROY_IOREQ_SERVER,
        pad: 0,
        u: [0; 256],
    };
    destroy.u[..2].copy_from_slice(&id.to_ne_bytes());
    let destroyed = dm_op(&dev, dom, &mut destroy);
    Ok(IoreqProbe::Created { id, destroyed })
}
