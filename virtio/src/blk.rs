//! virtio-blk requests and configuration (virtio 1.2 section 5.2).

use crate::le;

/// Sector size of the virtio-blk addressing, whatever the device's `blk_size`.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Read.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the volatile write cache.
pub const T_FLUSH: u32 = 4;
/// Read the device id string.
pub const T_GET_ID: u32 = 8;
/// Device lifetime information.
pub const T_GET_LIFETIME: u32 = 10;
/// Discard ranges.
pub const T_DISCARD: u32 = 11;
/// Write zeroes to ranges.
pub const T_WRITE_ZEROES: u32 = 13;
/// Securely erase ranges.
pub const T_SECURE_ERASE: u32 = 14;

/// Success.
pub const S_OK: u8 = 0;
/// Device or driver error.
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;

/// In a write-zeroes segment's `flags`: the device may unmap (discard) the range.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The request header, the device-readable first 16 bytes of every request (5.2.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReqHeader {
    /// `T_*`.
    pub req_type: u32,
    /// Reserved (was `ioprio`).
    pub reserved: u32,
    /// First sector, in 512-byte units, for IN/OUT.
    pub sector: u64,
}

/// Size of [`ReqHeader`] on the wire.
pub const REQ_HEADER_SIZE: usize = 16;

impl ReqHeader {
    /// Decodes a header from a private copy of its bytes.
    pub fn from_bytes(b: &[u8; REQ_HEADER_SIZE]) -> Self {
        Self {
            req_type: le::u32_at(b, std::mem::offset_of!(ReqHeader, req_type)),
            reserved: le::u32_at(b, std::mem::offset_of!(ReqHeader, reserved)),
            sector: le::u64_at(b, std::mem::offset_of!(ReqHeader, sector)),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; REQ_HEADER_SIZE] {
        let mut b = [0u8; REQ_HEADER_SIZE];
        le::put_u32(
            &mut b,
            std::mem::offset_of!(ReqHeader, req_type),
            self.req_type,
        );
        le::put_u32(
            &mut b,
            std::mem::offset_of!(ReqHeader, reserved),
            self.reserved,
        );
        le::put_u64(&mut b, std::mem::offset_of!(ReqHeader, sector), self.sector);
        b
    }
}

/// One range of a DISCARD, WRITE_ZEROES or SECURE_ERASE request
/// (`struct virtio_blk_discard_write_zeroes`, 5.2.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardWriteZeroes {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// `WRITE_ZEROES_FLAG_UNMAP` for write-zeroes; other bits reserved.
    pub flags: u32,
}

/// Size of [`DiscardWriteZeroes`] on the wire.
pub const DISCARD_SEGMENT_SIZE: usize = 16;

impl DiscardWriteZeroes {
    /// Decodes a segment from a private copy of its bytes.
    pub fn from_bytes(b: &[u8; DISCARD_SEGMENT_SIZE]) -> Self {
        Self {
            sector: le::u64_at(b, std::mem::offset_of!(DiscardWriteZeroes, sector)),
            num_sectors: le::u32_at(b, std::mem::offset_of!(DiscardWriteZeroes, num_sectors)),
            flags: le::u32_at(b, std::mem::offset_of!(DiscardWriteZeroes, flags)),
        }
    }

    /// Encodes the segment.
    pub fn to_bytes(&self) -> [u8; DISCARD_SEGMENT_SIZE] {
        let mut b = [0u8; DISCARD_SEGMENT_SIZE];
        le::put_u64(
            &mut b,
            std::mem::offset_of!(DiscardWriteZeroes, sector),
            self.sector,
        );
        le::put_u32(
            &mut b,
            std::mem::offset_of!(DiscardWriteZeroes, num_sectors),
            self.num_sectors,
        );
        le::put_u32(
            &mut b,
            std::mem::offset_of!(DiscardWriteZeroes, flags),
            self.flags,
        );
        b
    }
}

/// The device configuration (`struct virtio_blk_config`, 5.2.4) up to the secure-erase fields.
/// Nested structs of the specification (geometry, topology) are flattened with their offsets
/// kept.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum size of one segment (SIZE_MAX).
    pub size_max: u32,
    /// Maximum number of segments in a request (SEG_MAX).
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors.
    pub sectors: u8,
    /// Block size (BLK_SIZE).
    pub blk_size: u32,
    /// Topology: log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Topology: offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Topology: suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Topology: optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// Writeback cache mode (CONFIG_WCE).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Number of request queues (MQ).
    pub num_queues: u16,
    /// Maximum sectors of one discard segment (DISCARD).
    pub max_discard_sectors: u32,
    /// Maximum discard segments in a request (DISCARD).
    pub max_discard_seg: u32,
    /// Discard alignment in sectors (DISCARD).
    pub discard_sector_alignment: u32,
    /// Maximum sectors of one write-zeroes segment (WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Maximum write-zeroes segments in a request (WRITE_ZEROES).
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may unmap (WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
    /// Maximum sectors of one secure-erase segment (SECURE_ERASE).
    pub max_secure_erase_sectors: u32,
    /// Maximum secure-erase segments (SECURE_ERASE).
    pub max_secure_erase_seg: u32,
    /// Secure-erase alignment (SECURE_ERASE).
    pub secure_erase_sector_alignment: u32,
}

/// Size of [`BlkConfig`] on the wire.
pub const BLK_CONFIG_SIZE: usize = 72;

macro_rules! off {
    ($f:ident) => {
        std::mem::offset_of!(BlkConfig, $f)
    };
}

impl BlkConfig {
    /// Encodes the configuration.
    pub fn to_bytes(&self) -> [u8; BLK_CONFIG_SIZE] {
        let mut b = [0u8; BLK_CONFIG_SIZE];
        le::put_u64(&mut b, off!(capacity), self.capacity);
        le::put_u32(&mut b, off!(size_max), self.size_max);
        le::put_u32(&mut b, off!(seg_max), self.seg_max);
        le::put_u16(&mut b, off!(cylinders), self.cylinders);
        b[off!(heads)] = self.heads;
        b[off!(sectors)] = self.sectors;
        le::put_u32(&mut b, off!(blk_size), self.blk_size);
        b[off!(physical_block_exp)] = self.physical_block_exp;
        b[off!(alignment_offset)] = self.alignment_offset;
        le::put_u16(&mut b, off!(min_io_size), self.min_io_size);
        le::put_u32(&mut b, off!(opt_io_size), self.opt_io_size);
        b[off!(writeback)] = self.writeback;
        b[off!(unused0)] = self.unused0;
        le::put_u16(&mut b, off!(num_queues), self.num_queues);
        le::put_u32(&mut b, off!(max_discard_sectors), self.max_discard_sectors);
        le::put_u32(&mut b, off!(max_discard_seg), self.max_discard_seg);
        le::put_u32(
            &mut b,
            off!(discard_sector_alignment),
            self.discard_sector_alignment,
        );
        le::put_u32(
            &mut b,
            off!(max_write_zeroes_sectors),
            self.max_write_zeroes_sectors,
        );
        le::put_u32(
            &mut b,
            off!(max_write_zeroes_seg),
            self.max_write_zeroes_seg,
        );
        b[off!(write_zeroes_may_unmap)] = self.write_zeroes_may_unmap;
        b[off!(unused1)..off!(unused1) + 3].copy_from_slice(&self.unused1);
        le::put_u32(
            &mut b,
            off!(max_secure_erase_sectors),
            self.max_secure_erase_sectors,
        );
        le::put_u32(
            &mut b,
            off!(max_secure_erase_seg),
            self.max_secure_erase_seg,
        );
        le::put_u32(
            &mut b,
            off!(secure_erase_sector_alignment),
            self.secure_erase_sector_alignment,
        );
        b
    }

    /// Decodes a configuration. A shorter input (an older device) leaves the missing fields
    /// zero; bytes beyond [`BLK_CONFIG_SIZE`] are ignored.
    pub fn from_bytes(input: &[u8]) -> Self {
        let mut b = [0u8; BLK_CONFIG_SIZE];
        let n = input.len().min(BLK_CONFIG_SIZE);
        b[..n].copy_from_slice(&input[..n]);
        Self {
            capacity: le::u64_at(&b, off!(capacity)),
            size_max: le::u32_at(&b, off!(size_max)),
            seg_max: le::u32_at(&b, off!(seg_max)),
            cylinders: le::u16_at(&b, off!(cylinders)),
            heads: b[off!(heads)],
            sectors: b[off!(sectors)],
            blk_size: le::u32_at(&b, off!(blk_size)),
            physical_block_exp: b[off!(physical_block_exp)],
            alignment_offset: b[off!(alignment_offset)],
            min_io_size: le::u16_at(&b, off!(min_io_size)),
            opt_io_size: le::u32_at(&b, off!(opt_io_size)),
            writeback: b[off!(writeback)],
            unused0: b[off!(unused0)],
            num_queues: le::u16_at(&b, off!(num_queues)),
            max_discard_sectors: le::u32_at(&b, off!(max_discard_sectors)),
            max_discard_seg: le::u32_at(&b, off!(max_discard_seg)),
            discard_sector_alignment: le::u32_at(&b, off!(discard_sector_alignment)),
            max_write_zeroes_sectors: le::u32_at(&b, off!(max_write_zeroes_sectors)),
            max_write_zeroes_seg: le::u32_at(&b, off!(max_write_zeroes_seg)),
            write_zeroes_may_unmap: b[off!(write_zeroes_may_unmap)],
            unused1: [b[off!(unused1)], b[off!(unused1) + 1], b[off!(unused1) + 2]],
            max_secure_erase_sectors: le::u32_at(&b, off!(max_secure_erase_sectors)),
            max_secure_erase_seg: le::u32_at(&b, off!(max_secure_erase_seg)),
            secure_erase_sector_alignment: le::u32_at(&b, off!(secure_erase_sector_alignment)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use virtio_bindings::virtio_blk as v;

    #[test]
    fn constants_match_the_linux_headers() {
        assert_eq!(T_IN, v::VIRTIO_BLK_T_IN);
        assert_eq!(T_OUT, v::VIRTIO_BLK_T_OUT);
        assert_eq!(T_FLUSH, v::VIRTIO_BLK_T_FLUSH);
        assert_eq!(T_GET_ID, v::VIRTIO_BLK_T_GET_ID);
        assert_eq!(T_DISCARD, v::VIRTIO_BLK_T_DISCARD);
        assert_eq!(T_WRITE_ZEROES, v::VIRTIO_BLK_T_WRITE_ZEROES);
        assert_eq!(T_SECURE_ERASE, v::VIRTIO_BLK_T_SECURE_ERASE);
        assert_eq!(u32::from(S_OK), v::VIRTIO_BLK_S_OK);
        assert_eq!(u32::from(S_IOERR), v::VIRTIO_BLK_S_IOERR);
        assert_eq!(u32::from(S_UNSUPP), v::VIRTIO_BLK_S_UNSUPP);
        assert_eq!(ID_BYTES as u32, v::VIRTIO_BLK_ID_BYTES);
        assert_eq!(
            WRITE_ZEROES_FLAG_UNMAP,
            v::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        );
    }

    #[test]
    fn layouts_match_the_spec_and_linux() {
        assert_eq!(size_of::<ReqHeader>(), REQ_HEADER_SIZE);
        assert_eq!(size_of::<ReqHeader>(), size_of::<v::virtio_blk_outhdr>());
        assert_eq!(
            offset_of!(ReqHeader, sector),
            offset_of!(v::virtio_blk_outhdr, sector)
        );
        assert_eq!(size_of::<DiscardWriteZeroes>(), DISCARD_SEGMENT_SIZE);
        assert_eq!(
            size_of::<DiscardWriteZeroes>(),
            size_of::<v::virtio_blk_discard_write_zeroes>()
        );
        assert_eq!(size_of::<BlkConfig>(), BLK_CONFIG_SIZE);
        macro_rules! same {
            ($ours:ident, $theirs:ident) => {
                assert_eq!(
                    offset_of!(BlkConfig, $ours),
                    offset_of!(v::virtio_blk_config, $theirs),
                    stringify!($ours)
                );
            };
        }
        same!(capacity, capacity);
        same!(size_max, size_max);
        same!(seg_max, seg_max);
        same!(cylinders, geometry);
        same!(blk_size, blk_size);
        same!(physical_block_exp, physical_block_exp);
        same!(alignment_offset, alignment_offset);
        same!(min_io_size, min_io_size);
        same!(opt_io_size, opt_io_size);
        same!(writeback, wce);
        same!(num_queues, num_queues);
        same!(max_discard_sectors, max_discard_sectors);
        same!(max_discard_seg, max_discard_seg);
        same!(discard_sector_alignment, discard_sector_alignment);
        same!(max_write_zeroes_sectors, max_write_zeroes_sectors);
        same!(max_write_zeroes_seg, max_write_zeroes_seg);
        same!(write_zeroes_may_unmap, write_zeroes_may_unmap);
        same!(max_secure_erase_sectors, max_secure_erase_sectors);
        same!(max_secure_erase_seg, max_secure_erase_seg);
        same!(secure_erase_sector_alignment, secure_erase_sector_alignment);
        assert_eq!(offset_of!(BlkConfig, heads), 18);
        assert_eq!(offset_of!(BlkConfig, sectors), 19);
    }

    #[test]
    fn config_round_trips_and_tolerates_short_input() {
        let c = BlkConfig {
            capacity: 0x1234_5678_9abc,
            size_max: 4096,
            seg_max: 126,
            blk_size: 512,
            num_queues: 4,
            max_discard_sectors: u32::MAX,
            max_discard_seg: 1,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(BlkConfig::from_bytes(&b), c);
        assert_eq!(&b[0..8], &0x1234_5678_9abcu64.to_le_bytes());
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        let short = BlkConfig::from_bytes(&b[..24]);
        assert_eq!(short.capacity, c.capacity);
        assert_eq!(short.blk_size, 512);
        assert_eq!(short.num_queues, 0);
        let h = ReqHeader {
            req_type: T_OUT,
            reserved: 0,
            sector: 77,
        };
        assert_eq!(ReqHeader::from_bytes(&h.to_bytes()), h);
        let s = DiscardWriteZeroes {
            sector: 8,
            num_sectors: 16,
            flags: WRITE_ZEROES_FLAG_UNMAP,
        };
        assert_eq!(DiscardWriteZeroes::from_bytes(&s.to_bytes()), s);
    }
}
