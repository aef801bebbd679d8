//! virtio-net wire formats (virtio 1.2 section 5.1): the configuration space, the header that
//! precedes every frame (`struct virtio_net_hdr_v1`), and the MAC address.
//!
//! xenvirtio serves one queue pair and no control queue: queue 0 is receiveq1 (device to driver),
//! queue 1 is transmitq1 (driver to device). Checksum offload may be negotiated (`CSUM`,
//! `GUEST_CSUM`: a frame may carry a partial checksum that the other side completes, named by
//! `csum_start` and `csum_offset`); no segmentation offload is offered, so a header carries
//! `GSO_NONE`, and a frame is at most the MTU plus its Ethernet (and one VLAN) header.

use std::fmt;
use std::str::FromStr;

use crate::le;

/// Queue index of the receive queue (device writes frames, driver reads them).
pub const RECEIVEQ: u16 = 0;
/// Queue index of the transmit queue (driver writes frames, device reads them).
pub const TRANSMITQ: u16 = 1;

/// Size of `struct virtio_net_hdr_v1` (5.1.6): the header of every buffer under `VERSION_1`.
pub const HDR_SIZE: usize = 12;
/// An Ethernet header: destination, source, EtherType.
pub const ETH_HLEN: usize = 14;
/// One 802.1Q tag, which a frame may carry on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// The MTU offered when the operator names none: Ethernet's.
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU the device accepts (IPv4's minimum datagram).
pub const MIN_MTU: u16 = 68;
/// The largest MTU the device accepts without segmentation offload.
pub const MAX_MTU: u16 = 9000;

/// `flags`: the driver or device left the checksum to be computed (not offered here).
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was already validated (not offered here).
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a segmentation offload frame.
pub const GSO_NONE: u8 = 0;

/// The largest frame of a device with `mtu`, without its virtio header: the MTU, an Ethernet
/// header and one VLAN tag.
pub const fn max_frame(mtu: u16) -> usize {
    mtu as usize + ETH_HLEN + VLAN_HLEN
}

/// `struct virtio_net_hdr_v1` (5.1.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into every segment.
    pub hdr_len: u16,
    /// Bytes of payload per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum is stored, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers this frame spans (`MRG_RXBUF`; 1 otherwise, written by the device).
    pub num_buffers: u16,
}

impl NetHeader {
    /// The header the device writes in front of a received frame: no offload, one buffer.
    pub const fn received() -> Self {
        NetHeader {
            flags: 0,
            gso_type: GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 0,
            csum_offset: 0,
            num_buffers: 1,
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0] = self.flags;
        b[1] = self.gso_type;
        le::put_u16(&mut b, 2, self.hdr_len);
        le::put_u16(&mut b, 4, self.gso_size);
        le::put_u16(&mut b, 6, self.csum_start);
        le::put_u16(&mut b, 8, self.csum_offset);
        le::put_u16(&mut b, 10, self.num_buffers);
        b
    }

    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le::u16_at(b, 2),
            gso_size: le::u16_at(b, 4),
            csum_start: le::u16_at(b, 6),
            csum_offset: le::u16_at(b, 8),
            num_buffers: le::u16_at(b, 10),
        }
    }

    /// Whether the header asks for anything beyond a plain frame: any flag (a checksum offload,
    /// or a bit this crate does not name) or a segmentation offload. A device that negotiated no
    /// offload refuses such a header.
    pub fn asks_offload(&self) -> bool {
        self.flags != 0 || self.gso_type != GSO_NONE
    }

    /// The header reduced to what it may ask for: `None` unless every flag is among `allowed`
    /// (`HDR_F_NEEDS_CSUM`, `HDR_F_DATA_VALID`), it asks for no segmentation offload, and a
    /// partial checksum's place (if `NEEDS_CSUM`) lies inside a frame of `frame_len` bytes.
    /// Otherwise the flags and, with `NEEDS_CSUM`, the checksum's place; every other field is
    /// zero, so nothing else of a peer's header is passed on.
    pub fn checked(&self, allowed: u8, frame_len: usize) -> Option<NetHeader> {
        let partial = self.flags & HDR_F_NEEDS_CSUM != 0;
        if self.flags & !allowed != 0
            || self.gso_type != GSO_NONE
            || (partial && !self.csum_fits(frame_len))
        {
            return None;
        }
        let mut out = NetHeader {
            flags: self.flags,
            ..NetHeader::default()
        };
        if partial {
            out.csum_start = self.csum_start;
            out.csum_offset = self.csum_offset;
        }
        Some(out)
    }

    /// Whether a partial checksum's place lies inside a frame of `frame_len` bytes: the
    /// 16-bit field at `csum_start + csum_offset` and the bytes summed from `csum_start`.
    pub fn csum_fits(&self, frame_len: usize) -> bool {
        usize::from(self.csum_start) + usize::from(self.csum_offset) + 2 <= frame_len
    }
}

/// Completes a partial checksum in `frame` (what a `NEEDS_CSUM` header names, as Linux's
/// `skb_checksum_help`): the ones' complement sum of the bytes from `csum_start` to the end,
/// the field already holding the pseudo-header's sum, folded, complemented and stored big-endian
/// at `csum_start + csum_offset` (0 stored as `0xffff`, which reads the same). Returns false,
/// and changes nothing, when the place is outside the frame.
pub fn complete_checksum(frame: &mut [u8], csum_start: u16, csum_offset: u16) -> bool {
    let start = usize::from(csum_start);
    let at = start + usize::from(csum_offset);
    if at + 2 > frame.len() {
        return false;
    }
    let mut sum: u64 = 0;
    let mut words = frame[start..].chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // `sum` fits 16 bits after folding.
    let folded = !(sum as u16);
    let value = if folded == 0 { 0xffff } else { folded };
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
    true
}

/// `VIRTIO_NET_S_LINK_UP` in `status`.
pub const STATUS_LINK_UP: u16 = 1;

/// `struct virtio_net_config` (5.1.4), up to `mtu`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetConfig {
    /// The device's MAC address (`MAC`).
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` (`STATUS`).
    pub status: u16,
    /// Queue pairs (`MQ`; 1 here).
    pub max_virtqueue_pairs: u16,
    /// The MTU (`MTU`).
    pub mtu: u16,
}

/// Size of [`NetConfig`] on the wire.
pub const NET_CONFIG_SIZE: usize = 12;

impl NetConfig {
    /// Encodes the configuration.
    pub fn to_bytes(&self) -> [u8; NET_CONFIG_SIZE] {
        let mut b = [0u8; NET_CONFIG_SIZE];
        b[..6].copy_from_slice(&self.mac);
        le::put_u16(&mut b, std::mem::offset_of!(NetConfig, status), self.status);
        le::put_u16(
            &mut b,
            std::mem::offset_of!(NetConfig, max_virtqueue_pairs),
            self.max_virtqueue_pairs,
        );
        le::put_u16(&mut b, std::mem::offset_of!(NetConfig, mtu), self.mtu);
        b
    }

    /// Decodes a configuration; missing trailing bytes read as zero.
    pub fn from_bytes(input: &[u8]) -> Self {
        let mut b = [0u8; NET_CONFIG_SIZE];
        let n = input.len().min(NET_CONFIG_SIZE);
        b[..n].copy_from_slice(&input[..n]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[..6]);
        NetConfig {
            mac,
            status: le::u16_at(&b, std::mem::offset_of!(NetConfig, status)),
            max_virtqueue_pairs: le::u16_at(
                &b,
                std::mem::offset_of!(NetConfig, max_virtqueue_pairs),
            ),
            mtu: le::u16_at(&b, std::mem::offset_of!(NetConfig, mtu)),
        }
    }
}

/// An Ethernet MAC address, written `00:16:3e:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

/// The Xen project's OUI, which xl gives the MAC addresses it generates.
pub const XEN_OUI: [u8; 3] = [0x00, 0x16, 0x3e];

impl MacAddr {
    /// A MAC address under the Xen OUI with the given last three bytes.
    pub fn xen(tail: [u8; 3]) -> Self {
        MacAddr([
            XEN_OUI[0], XEN_OUI[1], XEN_OUI[2], tail[0], tail[1], tail[2],
        ])
    }

    /// A group (multicast or broadcast) address: no NIC may have one.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// All zeros: no address.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Why a MAC address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a MAC address (want six hex pairs such as 00:16:3e:12:34:56)")]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_specification() {
        assert_eq!(std::mem::size_of::<NetHeader>(), HDR_SIZE);
        assert_eq!(std::mem::offset_of!(NetHeader, num_buffers), 10);
        assert_eq!(std::mem::size_of::<NetConfig>(), NET_CONFIG_SIZE);
        assert_eq!(std::mem::offset_of!(NetConfig, status), 6);
        assert_eq!(std::mem::offset_of!(NetConfig, max_virtqueue_pairs), 8);
        assert_eq!(std::mem::offset_of!(NetConfig, mtu), 10);
        use virtio_bindings::virtio_net as vn;
        assert_eq!(
            std::mem::size_of::<vn::virtio_net_hdr_v1>(),
            HDR_SIZE,
            "the Linux header's size"
        );
        assert_eq!(u32::from(HDR_F_NEEDS_CSUM), vn::VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(u32::from(HDR_F_DATA_VALID), vn::VIRTIO_NET_HDR_F_DATA_VALID);
        assert_eq!(u32::from(GSO_NONE), vn::VIRTIO_NET_HDR_GSO_NONE);
        assert_eq!(u32::from(STATUS_LINK_UP), vn::VIRTIO_NET_S_LINK_UP);
    }

    #[test]
    fn header_and_config_round_trip() {
        let h = NetHeader {
            flags: 1,
            gso_type: 3,
            hdr_len: 0x1234,
            gso_size: 0x5678,
            csum_start: 0x9abc,
            csum_offset: 0xdef0,
            num_buffers: 2,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], &[1, 3, 0x34, 0x12]);
        assert_eq!(NetHeader::from_bytes(&b), h);
        assert!(h.asks_offload());
        assert!(!NetHeader::received().asks_offload());
        // A flag bit this crate does not name (RSC_INFO, 4) asks for something too.
        assert!(
            NetHeader {
                flags: 4,
                ..NetHeader::default()
            }
            .asks_offload()
        );
        assert_eq!(NetHeader::received().to_bytes()[10..], [1, 0]);
        let c = NetConfig {
            mac: [0, 0x16, 0x3e, 1, 2, 3],
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: 1,
            mtu: 1500,
        };
        let b = c.to_bytes();
        assert_eq!(&b[..6], &c.mac);
        assert_eq!(&b[10..], &1500u16.to_le_bytes());
        assert_eq!(NetConfig::from_bytes(&b), c);
        assert_eq!(
            NetConfig::from_bytes(&b[..6]).mtu,
            0,
            "short reads are zero"
        );
    }

    /// A UDP datagram's checksum, completed from the pseudo-header's sum as Linux leaves it in a
    /// `CHECKSUM_PARTIAL` frame, equals the full checksum computed independently.
    #[test]
    fn a_partial_checksum_is_completed_as_the_full_one() {
        // IPv4 192.168.0.1 -> 192.168.0.2, UDP 1000 -> 2000, payload "hello".
        let payload = b"hello";
        let udp_len = 8 + payload.len() as u16;
        let mut f = vec![0u8; 14 + 20];
        f.extend(1000u16.to_be_bytes());
        f.extend(2000u16.to_be_bytes());
        f.extend(udp_len.to_be_bytes());
        f.extend([0, 0]);
        f.extend(payload);
        let (src, dst) = ([192u8, 168, 0, 1], [192u8, 168, 0, 2]);
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        // The pseudo-header's sum, unfolded-then-folded, uncomplemented, in the field.
        let words = [
            u16::from_be_bytes([src[0], src[1]]),
            u16::from_be_bytes([src[2], src[3]]),
            u16::from_be_bytes([dst[0], dst[1]]),
            u16::from_be_bytes([dst[2], dst[3]]),
            17,
            udp_len,
        ];
        let mut p: u32 = words.iter().map(|&w| u32::from(w)).sum();
        while p > 0xffff {
            p = (p & 0xffff) + (p >> 16);
        }
        f[40..42].copy_from_slice(&(p as u16).to_be_bytes());
        assert!(complete_checksum(&mut f, 34, 6));
        // The full checksum over pseudo-header and datagram, computed from scratch, verifies.
        let mut all: u32 = words.iter().map(|&w| u32::from(w)).sum();
        for w in f[34..].chunks(2) {
            all += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while all > 0xffff {
            all = (all & 0xffff) + (all >> 16);
        }
        assert_eq!(all, 0xffff, "the completed datagram sums to all ones");
        let mut short = vec![0u8; 10];
        assert!(!complete_checksum(&mut short, 4, 5));
        assert_eq!(short, vec![0u8; 10]);
        let h = NetHeader {
            csum_start: 34,
            csum_offset: 6,
            ..NetHeader::default()
        };
        assert!(h.csum_fits(42) && !h.csum_fits(41));
        // `checked`: the allowed flags and the checksum's place pass, nothing else.
        let partial = NetHeader {
            flags: HDR_F_NEEDS_CSUM,
            num_buffers: 7,
            hdr_len: 9,
            ..h
        };
        assert_eq!(
            partial.checked(HDR_F_NEEDS_CSUM, 42),
            Some(NetHeader {
                flags: HDR_F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 6,
                ..NetHeader::default()
            })
        );
        assert_eq!(
            partial.checked(HDR_F_NEEDS_CSUM, 41),
            None,
            "outside the frame"
        );
        assert_eq!(partial.checked(0, 42), None, "not allowed");
        let valid = NetHeader {
            flags: HDR_F_DATA_VALID,
            csum_start: 5,
            ..NetHeader::default()
        };
        assert_eq!(
            valid
                .checked(HDR_F_DATA_VALID, 10)
                .map(|c| (c.flags, c.csum_start)),
            Some((HDR_F_DATA_VALID, 0))
        );
        let gso = NetHeader {
            gso_type: 1,
            ..NetHeader::default()
        };
        assert_eq!(gso.checked(u8::MAX, 100), None, "no segmentation offload");
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        let m: MacAddr = "00:16:3E:0a:ff:01".parse().unwrap();
        assert_eq!(m, MacAddr([0, 0x16, 0x3e, 0x0a, 0xff, 0x01]));
        assert_eq!(m.to_string(), "00:16:3e:0a:ff:01");
        assert_eq!(MacAddr::xen([1, 2, 3]).to_string(), "00:16:3e:01:02:03");
        for bad in [
            "",
            "00:16:3e:0a:ff",
            "00:16:3e:0a:ff:01:02",
            "0:16:3e:0a:ff:01",
            "00:16:3e:0a:ff:+1",
            "00-16-3e-0a-ff-01",
            "00:16:3e:0a:ff:0g",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
        assert!(
            "01:00:5e:00:00:01"
                .parse::<MacAddr>()
                .unwrap()
                .is_multicast()
        );
        assert!(!m.is_multicast());
        assert_eq!(max_frame(1500), 1518);
    }
}
