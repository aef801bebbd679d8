//! The split virtqueue (virtio 1.2 section 2.7): descriptors, the available and used rings, and
//! how xenvirtio lays a queue out in its ring area.
//!
//! Ring memory belongs to the driver and is shared with a possibly hostile device (or the
//! reverse). This module only encodes and decodes: [`Descriptor::from_bytes`] parses a local
//! copy of the 16 bytes, never the shared memory itself.

use crate::le;

/// Size of one descriptor in the table.
pub const DESCRIPTOR_SIZE: usize = 16;
/// Size of one used-ring element.
pub const USED_ELEM_SIZE: usize = 8;

/// The buffer continues in the `next` descriptor.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// In `avail.flags`: the driver asks not to be notified (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// In `used.flags`: the device asks not to be notified (without EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor-table entry (`struct virtq_desc`, 2.7.5).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// DMA address of the buffer, encoded per the negotiated strategy ([`crate::dma`]).
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*`.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has `NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// Decodes a descriptor from a private copy of its 16 bytes.
    pub fn from_bytes(b: &[u8; DESCRIPTOR_SIZE]) -> Self {
        Self {
            addr: le::u64_at(b, std::mem::offset_of!(Descriptor, addr)),
            len: le::u32_at(b, std::mem::offset_of!(Descriptor, len)),
            flags: le::u16_at(b, std::mem::offset_of!(Descriptor, flags)),
            next: le::u16_at(b, std::mem::offset_of!(Descriptor, next)),
        }
    }

    /// Encodes the descriptor.
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_SIZE] {
        let mut b = [0u8; DESCRIPTOR_SIZE];
        le::put_u64(&mut b, std::mem::offset_of!(Descriptor, addr), self.addr);
        le::put_u32(&mut b, std::mem::offset_of!(Descriptor, len), self.len);
        le::put_u16(&mut b, std::mem::offset_of!(Descriptor, flags), self.flags);
        le::put_u16(&mut b, std::mem::offset_of!(Descriptor, next), self.next);
        b
    }

    /// Whether the chain continues.
    pub fn has_next(&self) -> bool {
        self.flags & VIRTQ_DESC_F_NEXT != 0
    }

    /// Whether the device may write the buffer.
    pub fn is_write_only(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    /// Whether the buffer is an indirect table.
    pub fn is_indirect(&self) -> bool {
        self.flags & VIRTQ_DESC_F_INDIRECT != 0
    }
}

/// One used-ring element (`struct virtq_used_elem`, 2.7.8).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsedElem {
    /// Head index of the completed chain.
    pub id: u32,
    /// Bytes the device wrote into the chain's device-writable buffers.
    pub len: u32,
}

impl UsedElem {
    /// Decodes a used element from a private copy of its 8 bytes.
    pub fn from_bytes(b: &[u8; USED_ELEM_SIZE]) -> Self {
        Self {
            id: le::u32_at(b, std::mem::offset_of!(UsedElem, id)),
            len: le::u32_at(b, std::mem::offset_of!(UsedElem, len)),
        }
    }

    /// Encodes the element.
    pub fn to_bytes(&self) -> [u8; USED_ELEM_SIZE] {
        let mut b = [0u8; USED_ELEM_SIZE];
        le::put_u32(&mut b, std::mem::offset_of!(UsedElem, id), self.id);
        le::put_u32(&mut b, std::mem::offset_of!(UsedElem, len), self.len);
        b
    }
}

/// Where each part of a queue of `size` entries lives in its ring area (`docs/PROTOCOL.md`,
/// "Ring area"): the descriptor table at 0, the available ring right after it, the used ring
/// at the next 4-byte boundary. The area is granted (or pinned) as whole pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    size: u16,
}

/// Why a queue size is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueSizeError {
    /// Zero, or not a power of two (2.7: "Queue Size value is always a power of 2").
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    NotPowerOfTwo(u32),
    /// Larger than the device's maximum.
    #[error("queue size {size} is larger than the device's maximum {max}")]
    TooLarge {
        /// Requested size.
        size: u32,
        /// Device maximum.
        max: u32,
    },
}

impl RingLayout {
    /// The layout of a queue of `size` entries, refused unless `size` is a power of two no
    /// larger than `max`.
    pub fn new(size: u32, max: u32) -> Result<Self, QueueSizeError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueSizeError::NotPowerOfTwo(size));
        }
        if size > max {
            return Err(QueueSizeError::TooLarge { size, max });
        }
        let size = u16::try_from(size).map_err(|_| QueueSizeError::NotPowerOfTwo(size))?;
        Ok(Self { size })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Offset of the descriptor table.
    pub fn desc_offset(&self) -> usize {
        0
    }

    /// Offset of descriptor `i`.
    pub fn desc(&self, i: u16) -> usize {
        usize::from(i) * DESCRIPTOR_SIZE
    }

    /// Offset of `struct virtq_avail`.
    pub fn avail_offset(&self) -> usize {
        usize::from(self.size) * DESCRIPTOR_SIZE
    }

    /// Offset of `avail.flags`.
    pub fn avail_flags(&self) -> usize {
        self.avail_offset()
    }

    /// Offset of `avail.idx`.
    pub fn avail_idx(&self) -> usize {
        self.avail_offset() + 2
    }

    /// Offset of `avail.ring[slot]`, `slot` taken modulo the size.
    pub fn avail_ring(&self, slot: u16) -> usize {
        self.avail_offset() + 4 + 2 * usize::from(slot % self.size)
    }

    /// Offset of `avail.used_event` (EVENT_IDX).
    pub fn used_event(&self) -> usize {
        self.avail_offset() + 4 + 2 * usize::from(self.size)
    }

    /// Offset of `struct virtq_used` (4-byte aligned).
    pub fn used_offset(&self) -> usize {
        (self.used_event() + 2).next_multiple_of(4)
    }

    /// Offset of `used.flags`.
    pub fn used_flags(&self) -> usize {
        self.used_offset()
    }

    /// Offset of `used.idx`.
    pub fn used_idx(&self) -> usize {
        self.used_offset() + 2
    }

    /// Offset of `used.ring[slot]`, `slot` taken modulo the size.
    pub fn used_ring(&self, slot: u16) -> usize {
        self.used_offset() + 4 + USED_ELEM_SIZE * usize::from(slot % self.size)
    }

    /// Offset of `used.avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> usize {
        self.used_offset() + 4 + USED_ELEM_SIZE * usize::from(self.size)
    }

    /// Bytes the whole area needs.
    pub fn total_len(&self) -> usize {
        self.avail_event() + 2
    }

    /// Pages the whole area needs.
    pub fn pages(&self) -> usize {
        self.total_len().div_ceil(crate::protocol::PAGE_SIZE)
    }
}

/// The EVENT_IDX test (2.7.10.2, `vring_need_event`): having moved an index from `old` to
/// `new`, must the other side be notified, given that it asked to hear at `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn descriptor_layout_matches_the_spec_and_linux() {
        use virtio_bindings::virtio_ring as v;
        assert_eq!(size_of::<Descriptor>(), 16);
        assert_eq!(size_of::<Descriptor>(), size_of::<v::vring_desc>());
        assert_eq!(
            offset_of!(Descriptor, addr),
            offset_of!(v::vring_desc, addr)
        );
        assert_eq!(offset_of!(Descriptor, len), offset_of!(v::vring_desc, len));
        assert_eq!(
            offset_of!(Descriptor, flags),
            offset_of!(v::vring_desc, flags)
        );
        assert_eq!(
            offset_of!(Descriptor, next),
            offset_of!(v::vring_desc, next)
        );
        assert_eq!(size_of::<UsedElem>(), size_of::<v::vring_used_elem>());
        assert_eq!(u32::from(VIRTQ_DESC_F_NEXT), v::VRING_DESC_F_NEXT);
        assert_eq!(u32::from(VIRTQ_DESC_F_WRITE), v::VRING_DESC_F_WRITE);
        assert_eq!(u32::from(VIRTQ_DESC_F_INDIRECT), v::VRING_DESC_F_INDIRECT);
        assert_eq!(
            u32::from(VIRTQ_AVAIL_F_NO_INTERRUPT),
            v::VRING_AVAIL_F_NO_INTERRUPT
        );
        assert_eq!(u32::from(VIRTQ_USED_F_NO_NOTIFY), v::VRING_USED_F_NO_NOTIFY);
    }

    #[test]
    fn descriptor_bytes_round_trip_little_endian() {
        let d = Descriptor {
            addr: 0x8000_0000_0001_2345,
            len: 512,
            flags: 3,
            next: 7,
        };
        let b = d.to_bytes();
        assert_eq!(&b[..8], &0x8000_0000_0001_2345u64.to_le_bytes());
        assert_eq!(&b[8..12], &512u32.to_le_bytes());
        assert_eq!(&b[12..14], &3u16.to_le_bytes());
        assert_eq!(&b[14..16], &7u16.to_le_bytes());
        assert_eq!(Descriptor::from_bytes(&b), d);
        assert!(d.has_next() && d.is_write_only() && !d.is_indirect());
        let u = UsedElem { id: 9, len: 4096 };
        assert_eq!(UsedElem::from_bytes(&u.to_bytes()), u);
    }

    #[test]
    fn layout_matches_the_linux_vring_formula() {
        // Linux vring_init with align 4: avail right after the table, used aligned to 4.
        for size in [1u32, 2, 4, 8, 16, 64, 128, 256, 1024] {
            let l = RingLayout::new(size, 1024).unwrap();
            let n = size as usize;
            assert_eq!(l.avail_offset(), 16 * n);
            assert_eq!(l.used_event(), 16 * n + 4 + 2 * n);
            assert_eq!(l.used_offset(), (16 * n + 6 + 2 * n).next_multiple_of(4));
            assert_eq!(l.avail_event(), l.used_offset() + 4 + 8 * n);
            assert_eq!(l.total_len(), l.used_offset() + 6 + 8 * n);
            assert_eq!(l.used_offset() % 4, 0);
        }
        let l = RingLayout::new(256, 1024).unwrap();
        assert_eq!(l.total_len(), 4096 + 518 + 2 + 2054); // desc + avail + pad + used
        assert_eq!(l.pages(), 2);
        assert_eq!(l.avail_ring(257), l.avail_ring(1));
        assert_eq!(RingLayout::new(1024, 1024).unwrap().pages(), 7);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(
            RingLayout::new(0, 256),
            Err(QueueSizeError::NotPowerOfTwo(0))
        );
        assert_eq!(
            RingLayout::new(100, 256),
            Err(QueueSizeError::NotPowerOfTwo(100))
        );
        assert_eq!(
            RingLayout::new(65536, 1 << 20),
            Err(QueueSizeError::NotPowerOfTwo(65536))
        );
        assert_eq!(
            RingLayout::new(512, 256),
            Err(QueueSizeError::TooLarge {
                size: 512,
                max: 256
            })
        );
    }

    #[test]
    fn need_event_follows_the_spec() {
        // The other side asked to be told when the index passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 7, 4));
        assert!(!need_event(5, 5, 4));
        assert!(!need_event(5, 9, 6));
        // Wrap-around.
        assert!(need_event(0xffff, 0, 0xfffe));
        assert!(!need_event(0xffff, 0xffff, 0xfffe));
    }
}
