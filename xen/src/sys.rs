//! The Linux UAPI of the Xen devices: `#[repr(C)]` argument structs and ioctl numbers, exactly as
//! in `include/uapi/xen/{gntdev,gntalloc,evtchn,privcmd}.h`.
//!
//! This module owns layouts and numbers only; it performs no system call. Every struct here is
//! checked against the header's size and field offsets by the unit tests below, and every ioctl
//! number is recomputed from [`ioc`] and compared with the values the issue lists for 64-bit
//! Linux. The headers use `_IOC(_IOC_NONE, …)` for all of these ioctls, so the direction bits are
//! zero; `_IOC_NONE` is 0 on both x86_64 and aarch64.
//!
//! Two arguments end in a variable-length array (`ioctl_gntdev_map_grant_ref::refs[]` and
//! `ioctl_gntalloc_alloc_gref::gref_ids[]`). The kernel copies the fixed struct (which includes
//! the first array element) and then `count` elements starting at the array's offset, so the
//! buffer must hold `max(size_of::<header>(), offset + count * size_of::<element>())` bytes,
//! aligned for the header. [`FlexBuf`] builds such a buffer.

use std::ffi::{c_uint, c_void};
use std::marker::PhantomData;
use std::mem::{align_of, offset_of, size_of};

// ---------------------------------------------------------------------------------------------
// _IOC (include/uapi/asm-generic/ioctl.h; x86_64 and arm64 use the generic layout)

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC_NONE`: the direction of every Xen device ioctl.
pub(crate) const IOC_NONE: u32 = 0;

/// `_IOC(dir, type, nr, size)`. A size that does not fit in 14 bits is a compile-time error
/// where the result initialises a constant.
pub(crate) const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(
        size < (1 << IOC_SIZEBITS),
        "ioctl argument too large for _IOC"
    );
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

// ---------------------------------------------------------------------------------------------
// gntdev.h

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GntdevGrantRef {
    pub domid: u32,
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` (with its one-element `refs[]`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GntdevMapGrantRef {
    pub count: u32,
    pub pad: u32,
    pub index: u64,
    pub refs: [GntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GntdevUnmapGrantRef {
    pub index: u64,
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_gntdev_unmap_notify` and `struct ioctl_gntalloc_unmap_notify` (identical).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UnmapNotifyArg {
    pub index: u64,
    pub action: u32,
    pub event_channel_port: u32,
}

/// The `foreign` member of the `source`/`dest` unions of `struct gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GntdevCopyForeign {
    pub gref: u32,
    pub offset: u16,
    pub domid: u16,
}

/// The `source`/`dest` union of `struct gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union GntdevCopyPtr {
    pub virt: *mut c_void,
    pub foreign: GntdevCopyForeign,
}

/// `struct gntdev_grant_copy_segment` (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GntdevGrantCopySegment {
    pub source: GntdevCopyPtr,
    pub dest: GntdevCopyPtr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct GntdevGrantCopy {
    pub count: c_uint,
    pub segments: *mut GntdevGrantCopySegment,
}

pub(crate) const IOCTL_GNTDEV_MAP_GRANT_REF: u32 =
    ioc(IOC_NONE, b'G', 0, size_of::<GntdevMapGrantRef>());
pub(crate) const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 =
    ioc(IOC_NONE, b'G', 1, size_of::<GntdevUnmapGrantRef>());
pub(crate) const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 =
    ioc(IOC_NONE, b'G', 7, size_of::<UnmapNotifyArg>());
pub(crate) const IOCTL_GNTDEV_GRANT_COPY: u32 =
    ioc(IOC_NONE, b'G', 8, size_of::<GntdevGrantCopy>());

/// `UNMAP_NOTIFY_CLEAR_BYTE`.
pub(crate) const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`.
pub(crate) const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// `GNTCOPY_source_gref` (xen/interface/grant_table.h): the source is a grant reference.
pub(crate) const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`: the destination is a grant reference.
pub(crate) const GNTCOPY_DEST_GREF: u16 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// gntalloc.h

/// `struct ioctl_gntalloc_alloc_gref` (with its one-element `gref_ids[]`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GntallocAllocGref {
    pub domid: u16,
    pub flags: u16,
    pub count: u32,
    pub index: u64,
    pub gref_ids: [u32; 1],
}

/// `struct ioctl_gntalloc_dealloc_gref` (16 bytes: 4 bytes of tail padding).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GntallocDeallocGref {
    pub index: u64,
    pub count: u32,
}

/// `GNTALLOC_FLAG_WRITABLE`.
pub(crate) const GNTALLOC_FLAG_WRITABLE: u16 = 1;

pub(crate) const IOCTL_GNTALLOC_ALLOC_GREF: u32 =
    ioc(IOC_NONE, b'G', 5, size_of::<GntallocAllocGref>());
pub(crate) const IOCTL_GNTALLOC_DEALLOC_GREF: u32 =
    ioc(IOC_NONE, b'G', 6, size_of::<GntallocDeallocGref>());
pub(crate) const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 =
    ioc(IOC_NONE, b'G', 7, size_of::<UnmapNotifyArg>());

// ---------------------------------------------------------------------------------------------
// evtchn.h

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EvtchnBindInterdomain {
    pub remote_domain: c_uint,
    pub remote_port: c_uint,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EvtchnBindUnboundPort {
    pub remote_domain: c_uint,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify` (both one port).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EvtchnPort {
    pub port: c_uint,
}

/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EvtchnRestrictDomid {
    pub domid: u16,
}

pub(crate) const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 =
    ioc(IOC_NONE, b'E', 1, size_of::<EvtchnBindInterdomain>());
pub(crate) const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 =
    ioc(IOC_NONE, b'E', 2, size_of::<EvtchnBindUnboundPort>());
pub(crate) const IOCTL_EVTCHN_UNBIND: u32 = ioc(IOC_NONE, b'E', 3, size_of::<EvtchnPort>());
pub(crate) const IOCTL_EVTCHN_NOTIFY: u32 = ioc(IOC_NONE, b'E', 4, size_of::<EvtchnPort>());
pub(crate) const IOCTL_EVTCHN_RESET: u32 = ioc(IOC_NONE, b'E', 5, 0);
pub(crate) const IOCTL_EVTCHN_RESTRICT_DOMID: u32 =
    ioc(IOC_NONE, b'E', 6, size_of::<EvtchnRestrictDomid>());

// ---------------------------------------------------------------------------------------------
// privcmd.h

/// `struct privcmd_mmapbatch_v2`. `arr` points at `xen_pfn_t`, which is 64 bits wide on both
/// x86_64 (`unsigned long`) and arm64 (`uint64_t`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrivcmdMmapBatchV2 {
    pub num: c_uint,
    pub dom: u16,
    pub addr: u64,
    pub arr: *const u64,
    pub err: *mut i32,
}

pub(crate) const IOCTL_PRIVCMD_MMAPBATCH_V2: u32 =
    ioc(IOC_NONE, b'P', 4, size_of::<PrivcmdMmapBatchV2>());
pub(crate) const IOCTL_PRIVCMD_RESTRICT: u32 = ioc(IOC_NONE, b'P', 6, size_of::<u16>());

/// `struct privcmd_dm_op_buf` (`include/uapi/xen/privcmd.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrivcmdDmOpBuf {
    pub uptr: *mut c_void,
    pub size: usize,
}

/// `struct privcmd_dm_op`: `num` buffers for domain `dom`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrivcmdDmOp {
    pub dom: u16,
    pub num: u16,
    pub ubufs: *const PrivcmdDmOpBuf,
}

pub(crate) const IOCTL_PRIVCMD_DM_OP: u32 = ioc(IOC_NONE, b'P', 5, size_of::<PrivcmdDmOp>());

/// `XEN_DMOP_create_ioreq_server` and `XEN_DMOP_destroy_ioreq_server` (Xen's
/// `public/hvm/dm_op.h`; the numbers have not changed since the interface was added in 4.9).
pub(crate) const XEN_DMOP_CREATE_IOREQ_SERVER: u32 = 1;
pub(crate) const XEN_DMOP_DESTROY_IOREQ_SERVER: u32 = 6;

/// `struct xen_dm_op` with the two members used here: `op`, `pad`, then the union, whose
/// `create_ioreq_server` member is `{ uint8_t handle_bufioreq; uint8_t pad[3]; ioservid_t id; }`
/// and `destroy_ioreq_server` member `{ ioservid_t id; uint16_t pad; }`. Xen reads and writes
/// back only the union member of `op` (its own table gives each op's size, all under 32
/// bytes), and refuses a buffer shorter than that, so a larger union is safe.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct XenDmOp {
    pub op: u32,
    pub pad: u32,
    pub u: [u8; 256],
}

// ---------------------------------------------------------------------------------------------
// Layout checks that do not depend on a test run.

const _: () = assert!(size_of::<GntdevMapGrantRef>() == 24);
const _: () = assert!(size_of::<PrivcmdDmOpBuf>() == 16);
const _: () = assert!(size_of::<PrivcmdDmOp>() == 16);
const _: () = assert!(offset_of!(PrivcmdDmOp, ubufs) == 8);
const _: () = assert!(offset_of!(XenDmOp, u) == 8);
const _: () = assert!(offset_of!(GntdevMapGrantRef, refs) == 16);
const _: () = assert!(size_of::<GntallocAllocGref>() == 24);
const _: () = assert!(offset_of!(GntallocAllocGref, gref_ids) == 16);
const _: () = assert!(size_of::<GntdevGrantCopySegment>() == 24);

// ---------------------------------------------------------------------------------------------
// Variable-length ioctl arguments

/// An ioctl argument `H` whose last field is a one-element array of `T` at byte offset `tail`,
/// extended to `count` elements.
///
/// The storage is a `Vec<u64>`, so the buffer is 8-byte aligned (enough for every header here,
/// checked in [`FlexBuf::new`]), and it is at least `size_of::<H>()` bytes long even when
/// `count` is 0 or 1, because the kernel always copies the whole fixed struct.
pub(crate) struct FlexBuf<H, T> {
    words: Vec<u64>,
    tail: usize,
    count: usize,
    _marker: PhantomData<(H, T)>,
}

impl<H: Copy, T: Copy> FlexBuf<H, T> {
    const ALIGN_OK: () = assert!(align_of::<H>() <= 8 && align_of::<T>() <= 8);

    /// A zeroed buffer holding `header` followed by room for `count` elements at byte offset
    /// `tail`. `tail` must be the offset of `H`'s trailing array (the callers pass
    /// `offset_of!`); it is checked to be aligned for `T` and inside `H`.
    pub(crate) fn new(header: H, tail: usize, count: usize) -> Self {
        let () = Self::ALIGN_OK;
        assert!(
            tail % align_of::<T>() == 0 && tail + size_of::<T>() <= size_of::<H>(),
            "FlexBuf tail offset does not describe a trailing array of H"
        );
        let bytes = size_of::<H>().max(tail + count.saturating_mul(size_of::<T>()));
        let mut words = vec![0u64; bytes.div_ceil(8)];
        // SAFETY: the buffer is at least size_of::<H>() bytes and 8-byte aligned, which is at
        // least H's alignment (checked by ALIGN_OK); H is Copy plain data.
        unsafe { words.as_mut_ptr().cast::<H>().write(header) };
        Self {
            words,
            tail,
            count,
            _marker: PhantomData,
        }
    }

    /// The fixed part, as the kernel left it.
    pub(crate) fn header(&self) -> H {
        // SAFETY: as in `new`: in bounds and aligned; every bit pattern the kernel or we wrote
        // there is a valid H because H only holds integers.
        unsafe { self.words.as_ptr().cast::<H>().read() }
    }

    fn element_ptr(&self, i: usize) -> Option<*const T> {
        if i >= self.count {
            return None;
        }
        // SAFETY: i < count, and the buffer holds tail + count * size_of::<T>() bytes, so the
        // element lies inside the allocation; tail is aligned for T and the base for 8.
        Some(
            unsafe {
                self.words
                    .as_ptr()
                    .cast::<u8>()
                    .add(self.tail + i * size_of::<T>())
            }
            .cast(),
        )
    }

    /// Element `i` of the trailing array, or `None` past `count`.
    pub(crate) fn get(&self, i: usize) -> Option<T> {
        // SAFETY: element_ptr returns only in-bounds, aligned pointers; T is plain integers.
        self.element_ptr(i).map(|p| unsafe { p.read() })
    }

    /// Sets element `i`; returns false past `count`.
    pub(crate) fn set(&mut self, i: usize, value: T) -> bool {
        match self.element_ptr(i) {
            Some(p) => {
                // SAFETY: in bounds and aligned (element_ptr); we hold &mut self, so no other
                // access to the buffer exists.
                unsafe { p.cast_mut().write(value) };
                true
            }
            None => false,
        }
    }

    /// The pointer to pass to `ioctl`.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr().cast()
    }

    /// Size of the buffer in bytes.
    #[cfg(test)]
    pub(crate) fn byte_len(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of the table (64-bit Linux).
    #[test]
    fn ioctl_numbers_match_the_table() {
        let table: &[(&str, u32, u32)] = &[
            (
                "GNTDEV_MAP_GRANT_REF",
                IOCTL_GNTDEV_MAP_GRANT_REF,
                0x0018_4700,
            ),
            (
                "GNTDEV_UNMAP_GRANT_REF",
                IOCTL_GNTDEV_UNMAP_GRANT_REF,
                0x0010_4701,
            ),
            (
                "GNTDEV_SET_UNMAP_NOTIFY",
                IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
                0x0010_4707,
            ),
            ("GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY, 0x0010_4708),
            (
                "GNTALLOC_ALLOC_GREF",
                IOCTL_GNTALLOC_ALLOC_GREF,
                0x0018_4705,
            ),
            (
                "GNTALLOC_DEALLOC_GREF",
                IOCTL_GNTALLOC_DEALLOC_GREF,
                0x0010_4706,
            ),
            (
                "GNTALLOC_SET_UNMAP_NOTIFY",
                IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
                0x0010_4707,
            ),
            (
                "EVTCHN_BIND_INTERDOMAIN",
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                0x0008_4501,
            ),
            (
                "EVTCHN_BIND_UNBOUND_PORT",
                IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                0x0004_4502,
            ),
            ("EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND, 0x0004_4503),
            ("EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY, 0x0004_4504),
            ("EVTCHN_RESET", IOCTL_EVTCHN_RESET, 0x0000_4505),
            (
                "EVTCHN_RESTRICT_DOMID",
                IOCTL_EVTCHN_RESTRICT_DOMID,
                0x0002_4506,
            ),
            (
                "PRIVCMD_MMAPBATCH_V2",
                IOCTL_PRIVCMD_MMAPBATCH_V2,
                0x0020_5004,
            ),
            ("PRIVCMD_RESTRICT", IOCTL_PRIVCMD_RESTRICT, 0x0002_5006),
            ("PRIVCMD_DM_OP", IOCTL_PRIVCMD_DM_OP, 0x0010_5005),
        ];
        for &(name, ours, want) in table {
            assert_eq!(ours, want, "{name}: {ours:#010x} != {want:#010x}");
        }
    }

    /// `_IOC` itself, recomputed field by field from the header's bit layout.
    #[test]
    fn ioc_packs_fields_like_the_kernel() {
        assert_eq!(ioc(IOC_NONE, b'G', 0, 24), (24 << 16) | (0x47 << 8));
        assert_eq!(ioc(IOC_NONE, b'P', 6, 2), (2 << 16) | (0x50 << 8) | 6);
        // _IOC_READ|_IOC_WRITE = 3 lands in the top two bits.
        assert_eq!(ioc(3, b'E', 5, 0), 0xC000_4505);
        // The table's numbers decode back to their type, nr and size.
        let n = IOCTL_PRIVCMD_MMAPBATCH_V2;
        assert_eq!((n >> 8) & 0xff, u32::from(b'P'));
        assert_eq!(n & 0xff, 4);
        assert_eq!((n >> 16) & 0x3fff, 32);
        assert_eq!(n >> 30, 0);
    }

    #[test]
    fn struct_sizes_and_offsets_match_the_headers() {
        assert_eq!(size_of::<GntdevGrantRef>(), 8);
        assert_eq!(offset_of!(GntdevGrantRef, domid), 0);
        assert_eq!(offset_of!(GntdevGrantRef, gref), 4);

        assert_eq!(size_of::<GntdevMapGrantRef>(), 24);
        assert_eq!(offset_of!(GntdevMapGrantRef, count), 0);
        assert_eq!(offset_of!(GntdevMapGrantRef, pad), 4);
        assert_eq!(offset_of!(GntdevMapGrantRef, index), 8);
        assert_eq!(offset_of!(GntdevMapGrantRef, refs), 16);

        assert_eq!(size_of::<GntdevUnmapGrantRef>(), 16);
        assert_eq!(offset_of!(GntdevUnmapGrantRef, index), 0);
        assert_eq!(offset_of!(GntdevUnmapGrantRef, count), 8);
        assert_eq!(offset_of!(GntdevUnmapGrantRef, pad), 12);

        assert_eq!(size_of::<UnmapNotifyArg>(), 16);
        assert_eq!(offset_of!(UnmapNotifyArg, index), 0);
        assert_eq!(offset_of!(UnmapNotifyArg, action), 8);
        assert_eq!(offset_of!(UnmapNotifyArg, event_channel_port), 12);

        assert_eq!(size_of::<GntdevCopyForeign>(), 8);
        assert_eq!(offset_of!(GntdevCopyForeign, gref), 0);
        assert_eq!(offset_of!(GntdevCopyForeign, offset), 4);
        assert_eq!(offset_of!(GntdevCopyForeign, domid), 6);
        assert_eq!(size_of::<GntdevCopyPtr>(), 8);
        assert_eq!(size_of::<GntdevGrantCopySegment>(), 24);
        assert_eq!(align_of::<GntdevGrantCopySegment>(), 8);
        assert_eq!(offset_of!(GntdevGrantCopySegment, source), 0);
        assert_eq!(offset_of!(GntdevGrantCopySegment, dest), 8);
        assert_eq!(offset_of!(GntdevGrantCopySegment, len), 16);
        assert_eq!(offset_of!(GntdevGrantCopySegment, flags), 18);
        assert_eq!(offset_of!(GntdevGrantCopySegment, status), 20);

        assert_eq!(size_of::<GntdevGrantCopy>(), 16);
        assert_eq!(offset_of!(GntdevGrantCopy, count), 0);
        assert_eq!(offset_of!(GntdevGrantCopy, segments), 8);

        assert_eq!(size_of::<GntallocAllocGref>(), 24);
        assert_eq!(offset_of!(GntallocAllocGref, domid), 0);
        assert_eq!(offset_of!(GntallocAllocGref, flags), 2);
        assert_eq!(offset_of!(GntallocAllocGref, count), 4);
        assert_eq!(offset_of!(GntallocAllocGref, index), 8);
        assert_eq!(offset_of!(GntallocAllocGref, gref_ids), 16);

        assert_eq!(size_of::<GntallocDeallocGref>(), 16);
        assert_eq!(offset_of!(GntallocDeallocGref, index), 0);
        assert_eq!(offset_of!(GntallocDeallocGref, count), 8);

        assert_eq!(size_of::<EvtchnBindInterdomain>(), 8);
        assert_eq!(offset_of!(EvtchnBindInterdomain, remote_domain), 0);
        assert_eq!(offset_of!(EvtchnBindInterdomain, remote_port), 4);
        assert_eq!(size_of::<EvtchnBindUnboundPort>(), 4);
        assert_eq!(size_of::<EvtchnPort>(), 4);
        assert_eq!(size_of::<EvtchnRestrictDomid>(), 2);

        assert_eq!(size_of::<PrivcmdMmapBatchV2>(), 32);
        assert_eq!(offset_of!(PrivcmdMmapBatchV2, num), 0);
        assert_eq!(offset_of!(PrivcmdMmapBatchV2, dom), 4);
        assert_eq!(offset_of!(PrivcmdMmapBatchV2, addr), 8);
        assert_eq!(offset_of!(PrivcmdMmapBatchV2, arr), 16);
        assert_eq!(offset_of!(PrivcmdMmapBatchV2, err), 24);
    }

    #[test]
    fn flex_buffers_are_sized_for_the_kernel_copy() {
        // gntdev: one ref fits the fixed struct; more refs extend it by 8 bytes each.
        let tail = offset_of!(GntdevMapGrantRef, refs);
        let one = FlexBuf::<GntdevMapGrantRef, GntdevGrantRef>::new(Default::default(), tail, 1);
        assert_eq!(one.byte_len(), 24);
        let many = FlexBuf::<GntdevMapGrantRef, GntdevGrantRef>::new(Default::default(), tail, 5);
        assert_eq!(many.byte_len(), 16 + 5 * 8);

        // gntalloc: count 1 and 2 still need the whole 24-byte struct; 3 needs 28 -> 32.
        let tail = offset_of!(GntallocAllocGref, gref_ids);
        for (count, bytes) in [(1usize, 24usize), (2, 24), (3, 32), (4, 32), (5, 40)] {
            let b = FlexBuf::<GntallocAllocGref, u32>::new(Default::default(), tail, count);
            assert_eq!(b.byte_len(), bytes, "count {count}");
            assert_eq!(b.words.as_ptr() as usize % 8, 0);
        }
    }

    #[test]
    fn flex_buffer_elements_follow_the_header() {
        let tail = offset_of!(GntdevMapGrantRef, refs);
        let header = GntdevMapGrantRef {
            count: 3,
            ..Default::default()
        };
        let mut b = FlexBuf::<GntdevMapGrantRef, GntdevGrantRef>::new(header, tail, 3);
        for i in 0..3u32 {
            assert!(b.set(
                i as usize,
                GntdevGrantRef {
                    domid: 7,
                    gref: 100 + i
                }
            ));
        }
        assert!(!b.set(3, GntdevGrantRef::default()));
        assert_eq!(b.get(3), None);
        // The header's own refs[0] is the array's first element.
        assert_eq!(
            b.header().refs[0],
            GntdevGrantRef {
                domid: 7,
                gref: 100
            }
        );
        assert_eq!(b.header().count, 3);
        // Raw bytes: count at 0, refs[2].ref at 16 + 2 * 8 + 4.
        let bytes: Vec<u8> = b.words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 3);
        assert_eq!(u32::from_ne_bytes(bytes[36..40].try_into().unwrap()), 102);
        assert_eq!(u32::from_ne_bytes(bytes[32..36].try_into().unwrap()), 7);
        assert_eq!(
            b.get(2),
            Some(GntdevGrantRef {
                domid: 7,
                gref: 102
            })
        );
    }
}
