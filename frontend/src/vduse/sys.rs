//! The part of the VDUSE user-space ABI (`include/uapi/linux/vduse.h`, API version 0) that
//! creates devices, and the name of the `vdpa` netlink family (`include/uapi/linux/vdpa.h`):
//! layouts and numbers only. The data path's half of the ABI
//! (IOTLB, queue info, kick eventfds, control messages) comes with the code that uses it.
//!
//! Every size, offset and ioctl number below is checked at compile time or in the tests against
//! the values the C header gives on x86_64 and aarch64 (the same on both: LP64, no packing):
//! they were printed with `sizeof`, `offsetof` and the `_IO*` macros from Debian's
//! `linux-libc-dev` and are written here as literals.

use std::mem::{offset_of, size_of};

/// `VDUSE_NAME_MAX`: device names are NUL-terminated within 256 bytes.
pub(crate) const VDUSE_NAME_MAX: usize = 256;
/// The API version this frontend speaks.
pub(crate) const VDUSE_API_VERSION: u64 = 0;

/// `struct vduse_dev_config` without its flexible `config[]` array, which follows it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct VduseDevConfig {
    pub name: [u8; VDUSE_NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

/// `struct vduse_vq_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VduseVqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// `struct vduse_iotlb_entry`: one IOVA region `[start, last]` at `offset` of the returned fd.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VduseIotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
    pub pad: [u8; 7],
}

/// `vduse_iotlb_entry.perm`.
pub(crate) const VDUSE_ACCESS_WO: u8 = 0x2;

/// `struct vduse_vq_info` (split queues: `avail_index` in the union's first two bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VduseVqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    /// `union { struct vduse_vq_state_split split; struct vduse_vq_state_packed packed; }`
    pub state: [u16; 4],
    pub ready: u8,
    pub pad: [u8; 7],
}

/// `struct vduse_vq_eventfd`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct VduseVqEventfd {
    pub index: u32,
    pub fd: i32,
}

/// `struct vduse_dev_request`: a control message from the kernel, read from the device fd.
/// The union is read as 32-bit words: `vq_state` is `{ u32 index; u16 avail_index; }`,
/// `s` is `{ u8 status; }`, `iova` is `{ u64 start; u64 last; }`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct VduseDevRequest {
    pub kind: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    pub payload: [u32; 32],
}

/// `struct vduse_dev_response`: the answer, written to the device fd.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct VduseDevResponse {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    pub payload: [u32; 32],
}

/// Request types (`enum vduse_req_type`).
pub(crate) const VDUSE_GET_VQ_STATE: u32 = 0;
pub(crate) const VDUSE_SET_STATUS: u32 = 1;
pub(crate) const VDUSE_UPDATE_IOTLB: u32 = 2;
/// Response results.
pub(crate) const VDUSE_REQ_RESULT_OK: u32 = 0;
pub(crate) const VDUSE_REQ_RESULT_FAILED: u32 = 1;

// ioctl numbers: _IOC(dir, 0x81, nr, size), written out (checked in the tests).
pub(crate) const VDUSE_GET_API_VERSION: u32 = 0x8008_8100;
pub(crate) const VDUSE_SET_API_VERSION: u32 = 0x4008_8101;
pub(crate) const VDUSE_CREATE_DEV: u32 = 0x4150_8102;
pub(crate) const VDUSE_DESTROY_DEV: u32 = 0x4100_8103;
pub(crate) const VDUSE_IOTLB_GET_FD: u32 = 0xc020_8110;
pub(crate) const VDUSE_VQ_SETUP: u32 = 0x4020_8114;
pub(crate) const VDUSE_VQ_GET_INFO: u32 = 0xc030_8115;
pub(crate) const VDUSE_VQ_SETUP_KICKFD: u32 = 0x4008_8116;
pub(crate) const VDUSE_VQ_INJECT_IRQ: u32 = 0x4004_8117;

/// The `vdpa` generic netlink family (`VDPA_GENL_NAME`, version 1) and what is sent to it.
pub(crate) const VDPA_GENL_NAME: &str = "vdpa";
pub(crate) const VDPA_GENL_VERSION: u8 = 1;
pub(crate) const VDPA_CMD_DEV_NEW: u8 = 3;
pub(crate) const VDPA_CMD_DEV_DEL: u8 = 4;
pub(crate) const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
pub(crate) const VDPA_ATTR_DEV_NAME: u16 = 4;
/// VDUSE's management device: `vdpa dev add mgmtdev vduse name NAME`.
pub(crate) const VDPA_MGMTDEV_VDUSE: &str = "vduse";

const _: () = assert!(size_of::<VduseDevConfig>() == 336);
const _: () = assert!(offset_of!(VduseDevConfig, features) == 264);
const _: () = assert!(offset_of!(VduseDevConfig, vq_num) == 272);
const _: () = assert!(offset_of!(VduseDevConfig, config_size) == 332);
const _: () = assert!(size_of::<VduseVqConfig>() == 32);
const _: () = assert!(size_of::<VduseIotlbEntry>() == 32);
const _: () = assert!(size_of::<VduseVqInfo>() == 48);
const _: () = assert!(offset_of!(VduseVqInfo, desc_addr) == 8);
const _: () = assert!(offset_of!(VduseVqInfo, state) == 32);
const _: () = assert!(offset_of!(VduseVqInfo, ready) == 40);
const _: () = assert!(size_of::<VduseVqEventfd>() == 8);
const _: () = assert!(size_of::<VduseDevRequest>() == 152);
const _: () = assert!(offset_of!(VduseDevRequest, payload) == 24);
const _: () = assert!(size_of::<VduseDevResponse>() == 152);
const _: () = assert!(offset_of!(VduseDevResponse, payload) == 24);

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IOC` as the kernel packs it: dir in bits 30-31, size in 16-29, type 8-15, nr 0-7.
    const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
        (dir << 30) | ((size as u32) << 16) | (0x81 << 8) | nr
    }
    const W: u32 = 1;
    const R: u32 = 2;

    /// Each number is the one the header's macro gives for our struct's size: a layout change
    /// that the header did not make would show up here as well as in the asserts above.
    #[test]
    fn ioctl_numbers_match_the_header() {
        let table = [
            (VDUSE_GET_API_VERSION, ioc(R, 0x00, 8)),
            (VDUSE_SET_API_VERSION, ioc(W, 0x01, 8)),
            (VDUSE_CREATE_DEV, ioc(W, 0x02, size_of::<VduseDevConfig>())),
            (VDUSE_DESTROY_DEV, ioc(W, 0x03, VDUSE_NAME_MAX)),
            (
                VDUSE_IOTLB_GET_FD,
                ioc(R | W, 0x10, size_of::<VduseIotlbEntry>()),
            ),
            (VDUSE_VQ_SETUP, ioc(W, 0x14, size_of::<VduseVqConfig>())),
            (
                VDUSE_VQ_GET_INFO,
                ioc(R | W, 0x15, size_of::<VduseVqInfo>()),
            ),
            (
                VDUSE_VQ_SETUP_KICKFD,
                ioc(W, 0x16, size_of::<VduseVqEventfd>()),
            ),
            (VDUSE_VQ_INJECT_IRQ, ioc(W, 0x17, 4)),
        ];
        for (ours, computed) in table {
            assert_eq!(ours, computed, "{ours:#010x} != {computed:#010x}");
        }
    }
}
