//! Event channels through `/dev/xen/evtchn`.
//!
//! The device is opened non-blocking. `read()` returns the ports that fired, as native `u32`s,
//! and the kernel masks each one it delivers; `write()` of ports unmasks them (a port that fired
//! again while masked is delivered once more right after). If the kernel's ring of pending ports
//! overflows, `read()` fails with `EFBIG` until `IOCTL_EVTCHN_RESET`; this handle then reports
//! every port it has bound as pending, so no event is lost (a spurious one is harmless).
//! Closing the device unbinds every port bound through it.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use crate::XenError;
use crate::linux::{EVTCHN_PATH, ioctl, open_device};
use crate::platform::{DomId, EventChannels, Port};
use crate::sys::{self, EvtchnBindInterdomain, EvtchnBindUnboundPort, EvtchnPort};

/// Ports read per `read()`: one page of the kernel's ring.
const READ_PORTS: usize = 1024;

/// An open `/dev/xen/evtchn` and the ports bound through it.
#[derive(Debug)]
pub struct LinuxEvents {
    fd: OwnedFd,
    bound: Mutex<BTreeSet<Port>>,
}

fn port_from(rc: i32) -> Port {
    rc.unsigned_abs()
}

impl LinuxEvents {
    pub(crate) fn open() -> Result<Self, XenError> {
        Ok(Self {
            fd: open_device(EVTCHN_PATH, "xen-evtchn", libc::O_NONBLOCK)?,
            bound: Mutex::new(BTreeSet::new()),
        })
    }

    fn bound(&self) -> MutexGuard<'_, BTreeSet<Port>> {
        // The set is only a list of ports; a panic elsewhere cannot leave it inconsistent.
        self.bound.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn restrict_ioctl(&self, dom: DomId) -> Result<(), XenError> {
        let mut arg = sys::EvtchnRestrictDomid { domid: dom };
        // SAFETY: arg is an ioctl_evtchn_restrict_domid, which the kernel only reads.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                sys::IOCTL_EVTCHN_RESTRICT_DOMID,
                (&raw mut arg).cast(),
            )
        }
        .map(drop)
        .map_err(|source| XenError::Ioctl {
            device: EVTCHN_PATH,
            ioctl: "IOCTL_EVTCHN_RESTRICT_DOMID",
            source,
        })
    }

    fn port_ioctl(&self, request: u32, port: Port) -> io::Result<()> {
        let mut arg = EvtchnPort { port };
        // SAFETY: arg is an ioctl_evtchn_unbind / ioctl_evtchn_notify (one port), which the
        // kernel only reads.
        unsafe { ioctl(self.fd.as_fd(), request, (&raw mut arg).cast()) }.map(drop)
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: IOCTL_EVTCHN_RESET takes no argument.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                sys::IOCTL_EVTCHN_RESET,
                std::ptr::null_mut(),
            )
        }
        .map(drop)
    }

    /// One non-blocking `read()` into `buf`; returns the number of ports read, 0 if none is
    /// pending.
    fn read_ports(&self, buf: &mut [u32; READ_PORTS]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a writable array of READ_PORTS u32s; the kernel writes at most
            // size_of_val(buf) bytes, in whole ports.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    size_of_val(buf),
                )
            };
            if n >= 0 {
                return Ok(n.unsigned_abs() / size_of::<u32>());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(e),
            }
        }
    }
}

impl AsRawFd for LinuxEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl EventChannels for LinuxEvents {
    fn restrict(&self, dom: DomId) -> Result<(), XenError> {
        self.restrict_ioctl(dom)
    }

    fn bind_unbound(&self, remote: DomId) -> Result<Port, XenError> {
        let mut arg = EvtchnBindUnboundPort {
            remote_domain: u32::from(remote),
        };
        // SAFETY: arg is an ioctl_evtchn_bind_unbound_port, which the kernel only reads.
        let rc = unsafe {
            ioctl(
                self.fd.as_fd(),
                sys::IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                (&raw mut arg).cast(),
            )
        }
        .map_err(|source| XenError::Bind {
            remote,
            remote_port: None,
            source,
        })?;
        let port = port_from(rc);
        self.bound().insert(port);
        Ok(port)
    }

    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port, XenError> {
        let mut arg = EvtchnBindInterdomain {
            remote_domain: u32::from(remote),
            remote_port,
        };
        // SAFETY: arg is an ioctl_evtchn_bind_interdomain, which the kernel only reads.
        let rc = unsafe {
            ioctl(
                self.fd.as_fd(),
                sys::IOCTL_EVTCHN_BIND_INTERDOMAIN,
                (&raw mut arg).cast(),
            )
        }
        .map_err(|source| XenError::Bind {
            remote,
            remote_port: Some(remote_port),
            source,
        })?;
        let port = port_from(rc);
        self.bound().insert(port);
        Ok(port)
    }

    fn unbind(&self, port: Port) -> Result<(), XenError> {
        self.port_ioctl(sys::IOCTL_EVTCHN_UNBIND, port)
            .map_err(|source| XenError::Port {
                op: "unbind",
                port,
                source,
            })?;
        self.bound().remove(&port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<(), XenError> {
        self.port_ioctl(sys::IOCTL_EVTCHN_NOTIFY, port)
            .map_err(|source| XenError::Port {
                op: "notify",
                port,
                source,
            })
    }

    fn pending(&self) -> Result<Vec<Port>, XenError> {
        let mut out = Vec::new();
        let mut buf = [0u32; READ_PORTS];
        loop {
            match self.read_ports(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if n < READ_PORTS {
                        return Ok(out); // a short read drained the ring
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                    self.reset().map_err(|source| XenError::Ioctl {
                        device: EVTCHN_PATH,
                        ioctl: "IOCTL_EVTCHN_RESET",
                        source,
                    })?;
                    let all: Vec<Port> = self.bound().iter().copied().collect();
                    tracing::warn!(
                        ports = all.len(),
                        "the evtchn ring overflowed; reporting every bound port as pending"
                    );
                    out.extend(all);
                    out.sort_unstable();
                    out.dedup();
                    return Ok(out);
                }
                Err(source) => {
                    return Err(XenError::Ioctl {
                        device: EVTCHN_PATH,
                        ioctl: "read",
                        source,
                    });
                }
            }
        }
    }

    fn unmask(&self, ports: &[Port]) -> Result<(), XenError> {
        let mut rest = ports;
        while !rest.is_empty() {
            // SAFETY: rest is a readable slice of u32 ports; the kernel reads at most
            // size_of_val(rest) bytes.
            let n = unsafe {
                libc::write(self.fd.as_raw_fd(), rest.as_ptr().cast(), size_of_val(rest))
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(XenError::Ioctl {
                    device: EVTCHN_PATH,
                    ioctl: "write",
                    source: e,
                });
            }
            let done = (n.unsigned_abs() / size_of::<u32>()).max(1).min(rest.len());
            rest = &rest[done..];
        }
        Ok(())
    }
}
