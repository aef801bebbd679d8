//! `/dev/vduse/<name>`: one VDUSE device's control messages, queue information, kick eventfds,
//! interrupts, and the file descriptors behind its IOVA domain.
//!
//! Every ioctl of the open device sits in one small method here. The kernel's control
//! messages are fixed-size records read from and written to the fd.

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::VduseError;
use super::control::{device_path, ioctl};
use super::sys::{self, VduseDevRequest, VduseDevResponse, VduseIotlbEntry, VduseVqInfo};

/// A control message from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `VDUSE_GET_VQ_STATE`: where queue `index` is (its next available index).
    GetVqState {
        /// The queue.
        index: u32,
    },
    /// `VDUSE_SET_STATUS`: the driver wrote the virtio device status.
    SetStatus(u8),
    /// `VDUSE_UPDATE_IOTLB`: mappings in `[start, last]` changed; drop what was mapped there.
    UpdateIotlb {
        /// First IOVA.
        start: u64,
        /// Last IOVA (inclusive).
        last: u64,
    },
    /// A request type this layer does not know (answered as failed).
    Unknown(u32),
}

/// Where the kernel laid out one virtqueue, in IOVA space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    /// Entries.
    pub num: u32,
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub driver: u64,
    /// The used ring.
    pub device: u64,
    /// Whether the driver made it ready.
    pub ready: bool,
}

/// One IOVA region as `VDUSE_IOTLB_GET_FD` returns it: `[start, last]` is `fd` at `offset`.
#[derive(Debug)]
pub struct IotlbRegion {
    /// The file that holds the region's pages.
    pub fd: OwnedFd,
    /// The region's offset in `fd`.
    pub offset: u64,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// Whether the device may write it.
    pub writable: bool,
    /// Whether the device may read it.
    pub readable: bool,
}

/// An open VDUSE device.
#[derive(Debug)]
pub struct VduseDevice {
    file: std::fs::File,
    name: String,
}

impl VduseDevice {
    /// Opens `/dev/vduse/<name>`.
    pub fn open(name: &str) -> Result<VduseDevice, VduseError> {
        let path = device_path(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| VduseError::Open { path, source })?;
        Ok(VduseDevice {
            file,
            name: name.to_string(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `timeout` for a control message; `None` when none came.
    pub fn next_request(&self, timeout: Duration) -> Result<Option<(u32, Request)>, VduseError> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one live pollfd, as the count says.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(VduseError::Io {
                what: "poll on the VDUSE device",
                source: e,
            });
        }
        if n == 0 {
            return Ok(None);
        }
        let mut raw = [0u8; size_of::<VduseDevRequest>()];
        (&self.file)
            .read_exact(&mut raw)
            .map_err(|source| VduseError::Io {
                what: "reading a VDUSE control message",
                source,
            })?;
        let word = |i: usize| u32::from_ne_bytes(raw[i * 4..i * 4 + 4].try_into().expect("4"));
        let payload = |i: usize| word(6 + i);
        let kind = word(0);
        let id = word(1);
        let req = match kind {
            sys::VDUSE_GET_VQ_STATE => Request::GetVqState { index: payload(0) },
            sys::VDUSE_SET_STATUS => Request::SetStatus((payload(0) & 0xff) as u8),
            sys::VDUSE_UPDATE_IOTLB => Request::UpdateIotlb {
                start: u64::from(payload(0)) | (u64::from(payload(1)) << 32),
                last: u64::from(payload(2)) | (u64::from(payload(3)) << 32),
            },
            other => Request::Unknown(other),
        };
        Ok(Some((id, req)))
    }

    /// Answers request `id`: `ok`, and for `GetVqState` the queue's `avail_index`.
    pub fn respond(
        &self,
        id: u32,
        ok: bool,
        vq_state: Option<(u32, u16)>,
    ) -> Result<(), VduseError> {
        let mut resp = VduseDevResponse {
            request_id: id,
            result: if ok {
                sys::VDUSE_REQ_RESULT_OK
            } else {
                sys::VDUSE_REQ_RESULT_FAILED
            },
            reserved: [0; 4],
            payload: [0; 32],
        };
        if let Some((index, avail)) = vq_state {
            resp.payload[0] = index;
            resp.payload[1] = u32::from(avail);
        }
        // SAFETY: VduseDevResponse is plain old data (integers only, no padding: 152 bytes of
        // u32s), so viewing it as bytes is sound for the duration of the write.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const resp).cast::<u8>(),
                size_of::<VduseDevResponse>(),
            )
        };
        (&self.file)
            .write_all(bytes)
            .map_err(|source| VduseError::Io {
                what: "answering a VDUSE control message",
                source,
            })
    }

    /// Where the kernel laid out queue `index` (`VDUSE_VQ_GET_INFO`).
    pub fn queue_info(&self, index: u32) -> Result<QueueInfo, VduseError> {
        let mut info = VduseVqInfo {
            index,
            ..VduseVqInfo::default()
        };
        // SAFETY: VDUSE_VQ_GET_INFO reads the index and fills one vduse_vq_info, which `info` is.
        unsafe {
            self.ioctl(
                sys::VDUSE_VQ_GET_INFO,
                (&raw mut info).cast(),
                "VDUSE_VQ_GET_INFO",
            )
        }?;
        Ok(QueueInfo {
            num: info.num,
            desc: info.desc_addr,
            driver: info.driver_addr,
            device: info.device_addr,
            ready: info.ready != 0,
        })
    }

    /// Makes `eventfd` the kick of queue `index` (`VDUSE_VQ_SETUP_KICKFD`).
    pub fn set_kick(&self, index: u32, eventfd: &OwnedFd) -> Result<(), VduseError> {
        let mut arg = sys::VduseVqEventfd {
            index,
            fd: eventfd.as_raw_fd(),
        };
        // SAFETY: VDUSE_VQ_SETUP_KICKFD reads one vduse_vq_eventfd, which `arg` is; the fd is
        // live (the kernel takes its own reference).
        unsafe {
            self.ioctl(
                sys::VDUSE_VQ_SETUP_KICKFD,
                (&raw mut arg).cast(),
                "VDUSE_VQ_SETUP_KICKFD",
            )
        }
    }

    /// Interrupts the driver for queue `index` (`VDUSE_VQ_INJECT_IRQ`).
    pub fn inject_irq(&self, index: u32) -> Result<(), VduseError> {
        let mut arg = index;
        // SAFETY: VDUSE_VQ_INJECT_IRQ reads one u32, which `arg` is.
        unsafe {
            self.ioctl(
                sys::VDUSE_VQ_INJECT_IRQ,
                (&raw mut arg).cast(),
                "VDUSE_VQ_INJECT_IRQ",
            )
        }
    }

    /// The file behind the IOVA region that contains `iova` (`VDUSE_IOTLB_GET_FD`).
    pub fn iotlb_region(&self, iova: u64) -> Result<IotlbRegion, VduseError> {
        let mut entry = VduseIotlbEntry {
            start: iova,
            last: iova,
            ..VduseIotlbEntry::default()
        };
        // SAFETY: VDUSE_IOTLB_GET_FD reads start and last and fills one vduse_iotlb_entry,
        // which `entry` is; a non-negative result is a new fd that nothing else owns.
        let fd = unsafe {
            ioctl(
                self.file.as_fd(),
                sys::VDUSE_IOTLB_GET_FD,
                (&raw mut entry).cast(),
            )
        }
        .map_err(|source| VduseError::Ioctl {
            what: "VDUSE_IOTLB_GET_FD",
            source,
        })?;
        // SAFETY: `fd` was just returned by the kernel for us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(IotlbRegion {
            fd,
            offset: entry.offset,
            start: entry.start,
            last: entry.last,
            writable: entry.perm & sys::VDUSE_ACCESS_WO != 0,
            readable: entry.perm & 0x1 != 0,
        })
    }

    /// `ioctl(device, request, arg)`, its error named `what`.
    ///
    /// # Safety
    /// As for [`ioctl`]: `arg` must be the live argument `request` expects.
    unsafe fn ioctl(
        &self,
        request: u32,
        arg: *mut c_void,
        what: &'static str,
    ) -> Result<(), VduseError> {
        // SAFETY: the caller passes the argument its request expects (this function's contract).
        unsafe { ioctl(self.file.as_fd(), request, arg) }
            .map(drop)
            .map_err(|source| VduseError::Ioctl { what, source })
    }
}
