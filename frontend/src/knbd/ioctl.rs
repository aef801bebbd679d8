//! The old NBD interface: `ioctl`s on `/dev/nbdN` (`include/uapi/linux/nbd.h`), as nbd-client
//! used it before the netlink family existed (Linux 4.12). [`super::KernelNbd`] falls back to it
//! where the kernel has nbd.ko but no netlink family, or when told to (`--nbd-interface ioctl`).
//!
//! Every call of the setup (`NBD_SET_BLKSIZE`, `NBD_SET_SIZE_BLOCKS`, `NBD_SET_FLAGS`,
//! `NBD_SET_TIMEOUT`, one `NBD_SET_SOCK` per connection) and then `NBD_DO_IT` run on one thread
//! of their own: the kernel accepts the sockets only from the task that began the setup, and
//! `NBD_DO_IT` blocks that task for as long as the device is connected. The thread reports the
//! setup's result before it blocks. [`Device::disconnect`] sends `NBD_DISCONNECT` from another
//! descriptor, which ends `NBD_DO_IT`; the thread then clears the sockets (`NBD_CLEAR_SOCK`).
//!
//! What the interface cannot do: hand a connected device new sockets (no reconfiguration, so a
//! frontend that restarts finds its device busy and must be given another one), hold requests
//! while no connection is left (no dead-connection timeout: a dead socket fails them), or
//! create devices (only the `nbds_max` that nbd.ko made at load are there).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::KernelNbdError;

/// `_IO(0xab, n)`: the NBD ioctls take their argument by value, never a pointer.
const fn nbd_io(n: u32) -> u32 {
    (0xab << 8) | n
}
const NBD_SET_SOCK: u32 = nbd_io(0);
const NBD_SET_BLKSIZE: u32 = nbd_io(1);
const NBD_DO_IT: u32 = nbd_io(3);
const NBD_CLEAR_SOCK: u32 = nbd_io(4);
const NBD_SET_SIZE_BLOCKS: u32 = nbd_io(7);
const NBD_DISCONNECT: u32 = nbd_io(8);
const NBD_SET_TIMEOUT: u32 = nbd_io(9);
const NBD_SET_FLAGS: u32 = nbd_io(10);

/// `ioctl(fd, request, arg)` for the NBD requests above, whose argument is a plain number.
fn nbd_ioctl(fd: BorrowedFd<'_>, request: u32, arg: u64) -> io::Result<()> {
    let arg = libc::c_ulong::try_from(arg)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument out of range"))?;
    // The request type is `unsigned long` in glibc and `int` in musl: `as` keeps the bits of
    // these small numbers in both.
    // SAFETY: every NBD request used here takes its third argument by value (a size, a count,
    // flags, a descriptor number or nothing); the kernel dereferences no pointer, so no memory
    // of this process is read or written whatever `arg` holds.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the export negotiated, as the kernel's NBD driver is given it.
pub(super) struct Geometry {
    pub size: u64,
    pub block: u32,
    pub flags: u16,
    pub io_timeout: Option<Duration>,
}

/// Whether the kernel has NBD devices (nbd.ko loaded): `/dev/nbd0` is there.
pub(super) fn available() -> bool {
    Path::new("/sys/block/nbd0").exists()
}

/// Whether `/dev/nbdN` is connected: sysfs shows the `pid` of its `NBD_DO_IT` task then.
fn busy(index: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// The first device that is not connected.
fn first_free() -> Option<u32> {
    (0..)
        .take_while(|n| Path::new(&format!("/sys/block/nbd{n}")).exists())
        .find(|&n| !busy(n))
}

/// A kernel NBD device connected through ioctls, with the thread that sits in `NBD_DO_IT`.
#[derive(Debug)]
pub(super) struct Device {
    index: u32,
    control: File,
    thread: Option<JoinHandle<io::Result<()>>>,
}

fn refused(what: String) -> impl FnOnce(io::Error) -> KernelNbdError {
    move |source| KernelNbdError::Kernel { what, source }
}

impl Device {
    /// Connects `/dev/nbd<index>` (or the first free device) to `sockets`, which are in the
    /// transmission phase already.
    pub(super) fn connect(
        index: Option<u32>,
        sockets: Vec<OwnedFd>,
        geometry: &Geometry,
    ) -> Result<Device, KernelNbdError> {
        let index = match index {
            Some(n) if busy(n) => {
                return Err(KernelNbdError::Kernel {
                    what: format!(
                        "/dev/nbd{n}: it is connected already, and the ioctl interface cannot \
                         hand a connected device new sockets"
                    ),
                    source: io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
            Some(n) => n,
            None => first_free().ok_or_else(|| KernelNbdError::Kernel {
                what: "a free /dev/nbdN (every device nbd.ko made is connected)".to_owned(),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            })?,
        };
        let path = format!("/dev/nbd{index}");
        let open = || OpenOptions::new().read(true).write(true).open(&path);
        let control = open().map_err(refused(format!("the opening of {path}")))?;
        let dev = open().map_err(refused(format!("the opening of {path}")))?;
        let (size, block, flags) = (geometry.size, geometry.block, geometry.flags);
        let timeout = geometry.io_timeout.map(|t| t.as_secs().max(1));
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("nbd{index}-do-it"))
            .spawn(move || {
                let fd = dev.as_fd();
                let setup = || -> Result<(), KernelNbdError> {
                    let call = |what: &str, request, arg| {
                        nbd_ioctl(fd, request, arg).map_err(refused(format!("{what} on {path}")))
                    };
                    call("NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, u64::from(block))?;
                    call(
                        "NBD_SET_SIZE_BLOCKS",
                        NBD_SET_SIZE_BLOCKS,
                        size / u64::from(block),
                    )?;
                    call("NBD_SET_FLAGS", NBD_SET_FLAGS, u64::from(flags))?;
                    if let Some(t) = timeout {
                        call("NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, t)?;
                    }
                    for s in &sockets {
                        let raw =
                            u64::try_from(s.as_raw_fd()).expect("descriptors are non-negative");
                        call("NBD_SET_SOCK", NBD_SET_SOCK, raw)?;
                    }
                    Ok(())
                };
                let result = setup();
                // The kernel holds its own references to the sockets that it took.
                drop(sockets);
                let ok = result.is_ok();
                if !ok {
                    let _ = nbd_ioctl(fd, NBD_CLEAR_SOCK, 0);
                }
                let _ = tx.send(result);
                if !ok {
                    return Ok(());
                }
                let done = nbd_ioctl(fd, NBD_DO_IT, 0);
                let _ = nbd_ioctl(fd, NBD_CLEAR_SOCK, 0);
                done
            })
            .map_err(refused("a thread for NBD_DO_IT".to_owned()))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(Device {
                index,
                control,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(KernelNbdError::Kernel {
                what: format!("the setup of /dev/nbd{index} (its thread ended)"),
                source: io::Error::other("the NBD_DO_IT thread panicked"),
            }),
        }
    }

    /// The device index N of `/dev/nbdN`.
    pub(super) fn index(&self) -> u32 {
        self.index
    }

    /// `NBD_DISCONNECT`, then waits for `NBD_DO_IT` to return and the sockets to be cleared.
    /// A `NBD_DO_IT` that ended with an error (every connection died) is reported here.
    pub(super) fn disconnect(&mut self) -> Result<(), KernelNbdError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let what = format!("NBD_DISCONNECT of /dev/nbd{}", self.index);
        // A NBD_DO_IT that ended on its own (every connection died) has nothing to disconnect.
        let sent = if thread.is_finished() {
            Ok(())
        } else {
            nbd_ioctl(self.control.as_fd(), NBD_DISCONNECT, 0)
        };
        // Joined even when the disconnect failed, so that the thread is never left behind.
        let ended = thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the NBD_DO_IT thread panicked")));
        sent.map_err(refused(what))?;
        match ended {
            // The kernel reports a requested disconnect as success; ETIMEDOUT or EPIPE mean the
            // connections died before it.
            Ok(()) => Ok(()),
            Err(source) => Err(KernelNbdError::Kernel {
                what: format!(
                    "NBD_DO_IT of /dev/nbd{} (it ended before the disconnect)",
                    self.index
                ),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IO(0xab, n) from include/uapi/linux/nbd.h, printed with the C macros.
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE, 0xab01);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT, 0xab09);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }
}
