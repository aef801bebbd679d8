//! Feature bits (virtio 1.2 sections 6, 5.2.3, 5.3.3), as bit numbers, plus a small helper.

/// Reserved feature bits 28..=41 that describe the transport and the rings.
pub mod transport {
    /// Descriptors may point to indirect tables (2.7.5.3).
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event`/`avail_event` notification suppression (2.7.10).
    pub const RING_EVENT_IDX: u32 = 29;
    /// A virtio 1.x device (no legacy interface).
    pub const VERSION_1: u32 = 32;
    /// The device reaches memory through a platform translation (here: grants or a bounce
    /// pool), so the driver must not hand it raw guest-physical addresses.
    pub const ACCESS_PLATFORM: u32 = 33;
    /// The packed ring layout (not supported by xenvirtio).
    pub const RING_PACKED: u32 = 34;
    /// Buffers are used in order (not offered by xenvirtio).
    pub const IN_ORDER: u32 = 35;
}

/// virtio-blk feature bits (5.2.3).
pub mod blk {
    /// `size_max` is valid.
    pub const SIZE_MAX: u32 = 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u32 = 2;
    /// `geometry` is valid.
    pub const GEOMETRY: u32 = 4;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u32 = 6;
    /// Cache flush command support.
    pub const FLUSH: u32 = 9;
    /// `topology` is valid.
    pub const TOPOLOGY: u32 = 10;
    /// Writeback mode is configurable.
    pub const CONFIG_WCE: u32 = 11;
    /// More than one request queue (`num_queues`).
    pub const MQ: u32 = 12;
    /// Discard command support.
    pub const DISCARD: u32 = 13;
    /// Write-zeroes command support.
    pub const WRITE_ZEROES: u32 = 14;
    /// Lifetime command support.
    pub const LIFETIME: u32 = 15;
    /// Secure erase command support.
    pub const SECURE_ERASE: u32 = 16;
}

/// virtio-console feature bits (5.3.3).
pub mod console {
    /// `cols` and `rows` are valid.
    pub const SIZE: u32 = 0;
    /// Several ports and control queues.
    pub const MULTIPORT: u32 = 1;
    /// Emergency write.
    pub const EMERG_WRITE: u32 = 2;
}

/// virtio-net feature bits (5.1.3). Only the ones xenvirtio offers are named.
pub mod net {
    /// The device takes frames with a partial checksum (`NEEDS_CSUM`) from the driver.
    pub const CSUM: u32 = 0;
    /// The driver takes frames with a partial checksum (`NEEDS_CSUM`, `DATA_VALID`).
    pub const GUEST_CSUM: u32 = 1;
    /// `mtu` is valid.
    pub const MTU: u32 = 3;
    /// `mac` is valid.
    pub const MAC: u32 = 5;
    /// `status` is valid.
    pub const STATUS: u32 = 16;
}

/// The mask of one feature bit.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Whether `features` has bit `n`.
pub const fn has(features: u64, n: u32) -> bool {
    features & bit(n) != 0
}

/// Names of the set bits of `features` for `device_id`, for logs, e.g. `VERSION_1|EVENT_IDX|FLUSH`.
pub fn describe(device_id: u32, features: u64) -> String {
    let mut names = Vec::new();
    for n in 0..64u32 {
        if !has(features, n) {
            continue;
        }
        let name = match (n, device_id) {
            (transport::RING_INDIRECT_DESC, _) => "INDIRECT_DESC",
            (transport::RING_EVENT_IDX, _) => "EVENT_IDX",
            (transport::VERSION_1, _) => "VERSION_1",
            (transport::ACCESS_PLATFORM, _) => "ACCESS_PLATFORM",
            (transport::RING_PACKED, _) => "RING_PACKED",
            (transport::IN_ORDER, _) => "IN_ORDER",
            (blk::SIZE_MAX, 2) => "SIZE_MAX",
            (blk::SEG_MAX, 2) => "SEG_MAX",
            (blk::GEOMETRY, 2) => "GEOMETRY",
            (blk::RO, 2) => "RO",
            (blk::BLK_SIZE, 2) => "BLK_SIZE",
            (blk::FLUSH, 2) => "FLUSH",
            (blk::TOPOLOGY, 2) => "TOPOLOGY",
            (blk::CONFIG_WCE, 2) => "CONFIG_WCE",
            (blk::MQ, 2) => "MQ",
            (blk::DISCARD, 2) => "DISCARD",
            (blk::WRITE_ZEROES, 2) => "WRITE_ZEROES",
            (blk::LIFETIME, 2) => "LIFETIME",
            (blk::SECURE_ERASE, 2) => "SECURE_ERASE",
            (console::SIZE, 3) => "SIZE",
            (console::MULTIPORT, 3) => "MULTIPORT",
            (console::EMERG_WRITE, 3) => "EMERG_WRITE",
            (net::CSUM, 1) => "CSUM",
            (net::GUEST_CSUM, 1) => "GUEST_CSUM",
            (net::MTU, 1) => "MTU",
            (net::MAC, 1) => "MAC",
            (net::STATUS, 1) => "STATUS",
            _ => {
                names.push(format!("bit{n}"));
                continue;
            }
        };
        names.push(name.to_string());
    }
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join("|")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::{virtio_blk as vb, virtio_config as vc, virtio_ring as vr};

    #[test]
    fn bits_match_the_linux_headers() {
        assert_eq!(
            transport::RING_INDIRECT_DESC,
            vr::VIRTIO_RING_F_INDIRECT_DESC
        );
        assert_eq!(transport::RING_EVENT_IDX, vr::VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(transport::VERSION_1, vc::VIRTIO_F_VERSION_1);
        assert_eq!(transport::ACCESS_PLATFORM, vc::VIRTIO_F_ACCESS_PLATFORM);
        assert_eq!(transport::RING_PACKED, vc::VIRTIO_F_RING_PACKED);
        assert_eq!(transport::IN_ORDER, vc::VIRTIO_F_IN_ORDER);
        assert_eq!(blk::SIZE_MAX, vb::VIRTIO_BLK_F_SIZE_MAX);
        assert_eq!(blk::SEG_MAX, vb::VIRTIO_BLK_F_SEG_MAX);
        assert_eq!(blk::GEOMETRY, vb::VIRTIO_BLK_F_GEOMETRY);
        assert_eq!(blk::RO, vb::VIRTIO_BLK_F_RO);
        assert_eq!(blk::BLK_SIZE, vb::VIRTIO_BLK_F_BLK_SIZE);
        assert_eq!(blk::FLUSH, vb::VIRTIO_BLK_F_FLUSH);
        assert_eq!(blk::TOPOLOGY, vb::VIRTIO_BLK_F_TOPOLOGY);
        assert_eq!(blk::CONFIG_WCE, vb::VIRTIO_BLK_F_CONFIG_WCE);
        assert_eq!(blk::MQ, vb::VIRTIO_BLK_F_MQ);
        assert_eq!(blk::DISCARD, vb::VIRTIO_BLK_F_DISCARD);
        assert_eq!(blk::WRITE_ZEROES, vb::VIRTIO_BLK_F_WRITE_ZEROES);
        assert_eq!(blk::SECURE_ERASE, vb::VIRTIO_BLK_F_SECURE_ERASE);
        use virtio_bindings::virtio_net as vn;
        assert_eq!(net::CSUM, vn::VIRTIO_NET_F_CSUM);
        assert_eq!(net::GUEST_CSUM, vn::VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(net::MTU, vn::VIRTIO_NET_F_MTU);
        assert_eq!(net::MAC, vn::VIRTIO_NET_F_MAC);
        assert_eq!(net::STATUS, vn::VIRTIO_NET_F_STATUS);
    }

    #[test]
    fn describe_names_bits_per_device() {
        let f = bit(transport::VERSION_1) | bit(blk::FLUSH) | bit(50);
        assert_eq!(describe(2, f), "FLUSH|VERSION_1|bit50");
        assert_eq!(describe(3, bit(console::SIZE)), "SIZE");
        assert_eq!(describe(4, 0), "none");
        assert_eq!(describe(1, bit(net::MAC) | bit(net::MTU)), "MTU|MAC");
        assert!(has(f, transport::VERSION_1));
        assert!(!has(f, transport::ACCESS_PLATFORM));
    }
}
