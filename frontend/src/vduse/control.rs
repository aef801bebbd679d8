//! `/dev/vduse/control`: the API version, and creating and destroying VDUSE devices.
//!
//! Each ioctl sits in one small function here, with the layout it passes from `super::sys`.
//! Creating a device only makes `/dev/vduse/<name>` appear; nothing reaches the kernel's
//! virtio drivers until the device is added to the vDPA bus (`super::vdpa`).

use std::ffi::{c_int, c_void};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::VduseError;
use super::sys::{self, VduseDevConfig, VduseVqConfig};

/// Where the VDUSE control device lives (`vduse.ko`, Linux 5.15 and later, built by Debian
/// from 6.12 on).
pub const CONTROL_PATH: &str = "/dev/vduse/control";

/// `ioctl(fd, request, arg)`.
///
/// # Safety
/// `arg` must point at the argument `request` expects, live and of the right size, readable
/// (and writable for the `_IOR`/`_IOWR` requests) for the duration of the call.
pub(crate) unsafe fn ioctl(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: *mut c_void,
) -> io::Result<c_int> {
    // The request type is `unsigned long` in glibc and `int` in musl: `as` keeps the bits of
    // these numbers in both.
    // SAFETY: the caller guarantees that `arg` matches `request` (this function's contract).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The alignment of each queue's used ring that this layer asks for (`vq_align`).
pub const VQ_ALIGN: u32 = 4;

/// What a VDUSE device is made of: its virtio identity, its queues and its config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The device's name: `/dev/vduse/<name>` and the vDPA device's name.
    pub name: String,
    /// The virtio device id (2: block).
    pub device_id: u32,
    /// The virtio features the device offers (must include `VERSION_1` and `ACCESS_PLATFORM`).
    pub features: u64,
    /// How many virtqueues.
    pub queues: u32,
    /// The largest size of each queue.
    pub queue_size: u16,
    /// The device's config space (for blk, `virtio_blk_config`), read-only to the driver.
    pub config: Vec<u8>,
}

/// The open control device.
#[derive(Debug)]
pub struct VduseControl {
    fd: OwnedFd,
}

impl VduseControl {
    /// Opens `/dev/vduse/control` and agrees on API version 0.
    pub fn open() -> Result<VduseControl, VduseError> {
        Self::open_at(Path::new(CONTROL_PATH))
    }

    fn open_at(path: &Path) -> Result<VduseControl, VduseError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| VduseError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let control = VduseControl { fd: file.into() };
        let mut version = sys::VDUSE_API_VERSION;
        // SAFETY: VDUSE_SET_API_VERSION reads one u64, which `version` is.
        unsafe {
            ioctl(
                control.fd.as_fd(),
                sys::VDUSE_SET_API_VERSION,
                (&raw mut version).cast(),
            )
        }
        .map_err(|source| VduseError::Ioctl {
            what: "VDUSE_SET_API_VERSION 0",
            source,
        })?;
        Ok(control)
    }

    /// The API version the kernel speaks (`VDUSE_GET_API_VERSION`).
    pub fn api_version(&self) -> Result<u64, VduseError> {
        let mut version: u64 = 0;
        // SAFETY: VDUSE_GET_API_VERSION writes one u64, which `version` is.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                sys::VDUSE_GET_API_VERSION,
                (&raw mut version).cast(),
            )
        }
        .map_err(|source| VduseError::Ioctl {
            what: "VDUSE_GET_API_VERSION",
            source,
        })?;
        Ok(version)
    }

    /// Creates the device `spec` (`VDUSE_CREATE_DEV`), then sets up each of its queues
    /// (`VDUSE_VQ_SETUP`, which the kernel wants before the device joins the vDPA bus). On an
    /// error after the creation the device is destroyed again.
    pub fn create(&self, spec: &DeviceSpec) -> Result<(), VduseError> {
        let name = name_bytes(&spec.name)?;
        let config_size = u32::try_from(spec.config.len()).map_err(|_| VduseError::Spec {
            why: "the config space is larger than 4 GiB".into(),
        })?;
        let head = VduseDevConfig {
            name,
            vendor_id: 0,
            device_id: spec.device_id,
            features: spec.features,
            vq_num: spec.queues,
            // The used ring right after the available ring, 4-byte aligned: the layout of
            // `RingLayout`, so the device side of the ring (`device_queue`) reads it as is.
            vq_align: VQ_ALIGN,
            reserved: [0; 13],
            config_size,
        };
        // The struct and its flexible config[] array, in u64s for the struct's alignment.
        let total = size_of::<VduseDevConfig>() + spec.config.len();
        let mut buf = vec![0u64; total.div_ceil(8)];
        let base: *mut u8 = buf.as_mut_ptr().cast();
        // SAFETY: `buf` holds at least `total` bytes and is 8-byte aligned, enough for
        // VduseDevConfig; the config bytes go right after the struct, inside `buf`, and the
        // two ranges do not overlap.
        unsafe {
            base.cast::<VduseDevConfig>().write(head);
            std::ptr::copy_nonoverlapping(
                spec.config.as_ptr(),
                base.add(size_of::<VduseDevConfig>()),
                spec.config.len(),
            );
        }
        // SAFETY: VDUSE_CREATE_DEV reads a vduse_dev_config followed by config_size bytes of
        // config, which is what `buf` holds; it outlives the call.
        unsafe { ioctl(self.fd.as_fd(), sys::VDUSE_CREATE_DEV, base.cast()) }.map_err(
            |source| VduseError::Ioctl {
                what: "VDUSE_CREATE_DEV",
                source,
            },
        )?;
        if let Err(e) = self.setup_queues(spec) {
            let _ = self.destroy(&spec.name);
            return Err(e);
        }
        Ok(())
    }

    fn setup_queues(&self, spec: &DeviceSpec) -> Result<(), VduseError> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(device_path(&spec.name))
            .map_err(|source| VduseError::Open {
                path: device_path(&spec.name),
                source,
            })?;
        let dev: OwnedFd = dev.into();
        for index in 0..spec.queues {
            let mut vq = VduseVqConfig {
                index,
                max_size: spec.queue_size,
                reserved: [0; 13],
            };
            // SAFETY: VDUSE_VQ_SETUP reads one vduse_vq_config, which `vq` is.
            unsafe { ioctl(dev.as_fd(), sys::VDUSE_VQ_SETUP, (&raw mut vq).cast()) }.map_err(
                |source| VduseError::Ioctl {
                    what: "VDUSE_VQ_SETUP",
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Destroys device `name` (`VDUSE_DESTROY_DEV`). The kernel refuses while the device is on
    /// the vDPA bus or its fd is open.
    pub fn destroy(&self, name: &str) -> Result<(), VduseError> {
        let mut bytes = name_bytes(name)?;
        // SAFETY: VDUSE_DESTROY_DEV reads a char[VDUSE_NAME_MAX], which `bytes` is.
        unsafe {
            ioctl(
                self.fd.as_fd(),
                sys::VDUSE_DESTROY_DEV,
                bytes.as_mut_ptr().cast(),
            )
        }
        .map_err(|source| VduseError::Ioctl {
            what: "VDUSE_DESTROY_DEV",
            source,
        })?;
        Ok(())
    }
}

/// `/dev/vduse/<name>`.
pub fn device_path(name: &str) -> String {
    format!("/dev/vduse/{name}")
}

/// `name` as the kernel wants it: NUL-terminated in 256 bytes, and a name the kernel accepts
/// for a device node (no `/`, not empty).
fn name_bytes(name: &str) -> Result<[u8; sys::VDUSE_NAME_MAX], VduseError> {
    if name.is_empty()
        || name.len() >= sys::VDUSE_NAME_MAX
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
        || name == "control"
    {
        return Err(VduseError::Spec {
            why: format!(
                "{name:?} is not a VDUSE device name (1 to 255 bytes, no '/', not \"control\")"
            ),
        });
    }
    let mut out = [0u8; sys::VDUSE_NAME_MAX];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(name_bytes("xenvirtio-xvda").is_ok());
        let b = name_bytes("ab").unwrap();
        assert_eq!(&b[..3], b"ab\0");
        for bad in ["", "a/b", "control", "..", &"x".repeat(256)] {
            assert!(name_bytes(bad).is_err(), "{bad:?} accepted");
        }
        assert!(name_bytes(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn a_missing_control_device_names_its_path() {
        let e = VduseControl::open_at(Path::new("/nonexistent/vduse/control")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/vduse/control"), "{msg}");
        assert!(msg.contains("vduse"), "{msg}");
    }
}
