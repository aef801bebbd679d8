//! Loopback event channels: one handle is one eventfd plus the ports bound through it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::os;
use super::state::Hv;
use crate::XenError;
use crate::platform::{DomId, EventChannels, Port};

/// A loopback `/dev/xen/evtchn`: its fd (an eventfd) is readable while a port is pending.
/// Dropping it unbinds every port bound through it.
#[derive(Debug)]
pub struct LoopbackEvents {
    hv: Arc<Hv>,
    handle: u64,
    domid: DomId,
    fd: Arc<OwnedFd>,
}

impl LoopbackEvents {
    pub(super) fn open(hv: Arc<Hv>, domid: DomId) -> Result<Self, XenError> {
        let fd = Arc::new(os::eventfd().map_err(|source| XenError::Ioctl {
            device: "loopback evtchn",
            ioctl: "eventfd",
            source,
        })?);
        let handle = hv.lock().open_handle(domid, Arc::clone(&fd))?;
        Ok(Self {
            hv,
            handle,
            domid,
            fd,
        })
    }

    /// The domain whose ports these are.
    pub fn domid(&self) -> DomId {
        self.domid
    }
}

impl Drop for LoopbackEvents {
    fn drop(&mut self) {
        self.hv.lock().close_handle(self.handle);
    }
}

impl AsRawFd for LoopbackEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl EventChannels for LoopbackEvents {
    fn bind_unbound(&self, remote: DomId) -> Result<Port, XenError> {
        self.hv.lock().bind_unbound(self.handle, remote)
    }

    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port, XenError> {
        self.hv
            .lock()
            .bind_interdomain(self.handle, remote, remote_port)
    }

    fn unbind(&self, port: Port) -> Result<(), XenError> {
        self.hv.lock().unbind(self.handle, port)
    }

    fn notify(&self, port: Port) -> Result<(), XenError> {
        self.hv.lock().notify(self.handle, port)
    }

    fn pending(&self) -> Result<Vec<Port>, XenError> {
        Ok(self.hv.lock().pending(self.handle))
    }

    fn unmask(&self, ports: &[Port]) -> Result<(), XenError> {
        self.hv.lock().unmask(self.handle, ports);
        Ok(())
    }

    fn restrict(&self, dom: DomId) -> Result<(), XenError> {
        self.hv.lock().restrict_handle(self.handle, dom)
    }
}
