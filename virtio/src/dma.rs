//! How a descriptor address names memory under each DMA strategy (`docs/PROTOCOL.md`, "DMA
//! addresses").
//!
//! | strategy | address | range rule |
//! |---|---|---|
//! | `grant` | `1<<63 \| gref<<12 \| offset` (Linux grant-dma encoding) | the buffer stays in its page: `offset + len <= 4096` |
//! | `bounce` | `1<<62 \| offset` into the bounce pool | `offset + len <= pool size` |
//! | `direct` | guest-physical address, bits 63 and 62 clear | any range of the frontend's memory |
//!
//! Decoding is strict: an address whose tag does not match the negotiated strategy is a
//! protocol error, never silently reinterpreted.

use crate::protocol::PAGE_SIZE;

/// Tag bit of a grant address.
pub const GRANT_TAG: u64 = 1 << 63;
/// Tag bit of a bounce-pool address.
pub const BOUNCE_TAG: u64 = 1 << 62;
const TAG_MASK: u64 = GRANT_TAG | BOUNCE_TAG;
const PAGE_SHIFT: u32 = 12;

/// How the device resolves descriptor addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DmaStrategy {
    /// Every buffer page is a grant of the frontend's; the backend maps grants.
    Grant,
    /// Buffers are copied through a pool granted once at connect (swiotlb-xen style).
    Bounce,
    /// Raw guest-physical addresses; the backend (trusted Dom0) foreign-maps them.
    Direct,
}

impl DmaStrategy {
    /// All strategies, in the order the policy prefers them when isolation is equal.
    pub const ALL: [DmaStrategy; 3] =
        [DmaStrategy::Grant, DmaStrategy::Bounce, DmaStrategy::Direct];

    /// The xenstore and command-line name.
    pub fn name(self) -> &'static str {
        match self {
            DmaStrategy::Grant => "grant",
            DmaStrategy::Bounce => "bounce",
            DmaStrategy::Direct => "direct",
        }
    }
}

impl std::fmt::Display for DmaStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A DMA strategy name that is not `grant`, `bounce` or `direct`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown DMA strategy {0:?}: expected grant, bounce or direct")]
pub struct UnknownStrategy(pub String);

impl std::str::FromStr for DmaStrategy {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grant" => Ok(DmaStrategy::Grant),
            "bounce" => Ok(DmaStrategy::Bounce),
            "direct" => Ok(DmaStrategy::Direct),
            other => Err(UnknownStrategy(other.to_string())),
        }
    }
}

/// A decoded descriptor address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaAddr {
    /// Byte `offset` of the page granted as `gref`.
    Grant {
        /// Grant reference.
        gref: u32,
        /// Offset inside the page (< 4096).
        offset: u16,
    },
    /// Byte `offset` of the bounce pool.
    Bounce {
        /// Offset from the start of the pool.
        offset: u64,
    },
    /// A guest-physical address.
    Direct {
        /// The address.
        gpa: u64,
    },
}

/// A descriptor address or range that breaks the rules of the negotiated strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The address's tag bits name another strategy.
    #[error("address {addr:#x} is not a {expected} address")]
    WrongTag {
        /// The raw address.
        addr: u64,
        /// The negotiated strategy.
        expected: DmaStrategy,
    },
    /// A grant address with bits set between the grant reference and the tag.
    #[error("grant address {0:#x} has reserved bits set")]
    Reserved(u64),
    /// A grant buffer that does not stay inside its page.
    #[error("grant buffer at offset {offset} of length {len} crosses its page")]
    CrossesPage {
        /// Offset inside the page.
        offset: u16,
        /// Length of the buffer.
        len: u32,
    },
    /// A bounce buffer outside the pool.
    #[error("bounce buffer [{offset:#x}, +{len:#x}) is outside the {pool_len:#x}-byte pool")]
    OutsidePool {
        /// Offset into the pool.
        offset: u64,
        /// Length of the buffer.
        len: u32,
        /// Size of the pool.
        pool_len: u64,
    },
    /// A direct range that wraps around the address space.
    #[error("direct buffer at {gpa:#x} of length {len} wraps the address space")]
    Wraps {
        /// Start address.
        gpa: u64,
        /// Length of the buffer.
        len: u32,
    },
}

impl DmaAddr {
    /// Encodes the address for a descriptor.
    pub fn encode(&self) -> u64 {
        match *self {
            DmaAddr::Grant { gref, offset } => {
                GRANT_TAG | (u64::from(gref) << PAGE_SHIFT) | u64::from(offset & 0xfff)
            }
            DmaAddr::Bounce { offset } => BOUNCE_TAG | (offset & !TAG_MASK),
            DmaAddr::Direct { gpa } => gpa & !TAG_MASK,
        }
    }

    /// Decodes `addr` under `strategy`, checking the tag bits only.
    pub fn decode(strategy: DmaStrategy, addr: u64) -> Result<Self, DmaError> {
        let wrong = DmaError::WrongTag {
            addr,
            expected: strategy,
        };
        match strategy {
            DmaStrategy::Grant => {
                if addr & TAG_MASK != GRANT_TAG {
                    return Err(wrong);
                }
                let rest = addr & !GRANT_TAG;
                let gref = rest >> PAGE_SHIFT;
                let gref = u32::try_from(gref).map_err(|_| DmaError::Reserved(addr))?;
                let offset = u16::try_from(rest & 0xfff).map_err(|_| DmaError::Reserved(addr))?;
                Ok(DmaAddr::Grant { gref, offset })
            }
            DmaStrategy::Bounce => {
                if addr & TAG_MASK != BOUNCE_TAG {
                    return Err(wrong);
                }
                Ok(DmaAddr::Bounce {
                    offset: addr & !TAG_MASK,
                })
            }
            DmaStrategy::Direct => {
                if addr & TAG_MASK != 0 {
                    return Err(wrong);
                }
                Ok(DmaAddr::Direct { gpa: addr })
            }
        }
    }

    /// Decodes `addr` under `strategy` and checks that `len` bytes from it obey the strategy's
    /// range rule. `pool_len` is the bounce pool's size (ignored by the other strategies).
    pub fn decode_range(
        strategy: DmaStrategy,
        addr: u64,
        len: u32,
        pool_len: u64,
    ) -> Result<Self, DmaError> {
        let a = Self::decode(strategy, addr)?;
        match a {
            DmaAddr::Grant { offset, .. } => {
                if usize::from(offset) + len as usize > PAGE_SIZE {
                    return Err(DmaError::CrossesPage { offset, len });
                }
            }
            DmaAddr::Bounce { offset } => {
                let end = offset.checked_add(u64::from(len));
                if end.is_none_or(|e| e > pool_len) {
                    return Err(DmaError::OutsidePool {
                        offset,
                        len,
                        pool_len,
                    });
                }
            }
            DmaAddr::Direct { gpa } => {
                if gpa
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e & TAG_MASK != 0)
                {
                    return Err(DmaError::Wraps { gpa, len });
                }
            }
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_encoding_is_linux_grant_dma() {
        // drivers/xen/grant-dma-ops.c: XEN_GRANT_DMA_ADDR_OFF | grant << XEN_PAGE_SHIFT, + offset.
        let a = DmaAddr::Grant {
            gref: 0x1234,
            offset: 0x10,
        };
        assert_eq!(a.encode(), 0x8000_0000_0123_4010);
        assert_eq!(DmaAddr::decode(DmaStrategy::Grant, a.encode()), Ok(a));
        let max = DmaAddr::Grant {
            gref: u32::MAX,
            offset: 0xfff,
        };
        assert_eq!(DmaAddr::decode(DmaStrategy::Grant, max.encode()), Ok(max));
    }

    #[test]
    fn tags_are_never_reinterpreted() {
        let g = DmaAddr::Grant { gref: 5, offset: 0 }.encode();
        let b = DmaAddr::Bounce { offset: 4096 }.encode();
        let d = DmaAddr::Direct { gpa: 0x4000_0000 }.encode();
        for (s, ok) in [
            (DmaStrategy::Grant, g),
            (DmaStrategy::Bounce, b),
            (DmaStrategy::Direct, d),
        ] {
            assert!(DmaAddr::decode(s, ok).is_ok());
            for other in [g, b, d] {
                if other != ok {
                    assert_eq!(
                        DmaAddr::decode(s, other),
                        Err(DmaError::WrongTag {
                            addr: other,
                            expected: s
                        })
                    );
                }
            }
        }
        // Both tag bits set is nobody's address.
        for s in DmaStrategy::ALL {
            assert!(DmaAddr::decode(s, TAG_MASK | 0x1000).is_err());
        }
        // Bits between the gref and the tag are reserved.
        assert_eq!(
            DmaAddr::decode(DmaStrategy::Grant, GRANT_TAG | 1 << 50),
            Err(DmaError::Reserved(GRANT_TAG | 1 << 50))
        );
    }

    #[test]
    fn range_rules_per_strategy() {
        let g = DmaAddr::Grant {
            gref: 1,
            offset: 4000,
        }
        .encode();
        assert!(DmaAddr::decode_range(DmaStrategy::Grant, g, 96, 0).is_ok());
        assert_eq!(
            DmaAddr::decode_range(DmaStrategy::Grant, g, 97, 0),
            Err(DmaError::CrossesPage {
                offset: 4000,
                len: 97
            })
        );
        let b = DmaAddr::Bounce { offset: 8192 }.encode();
        assert!(DmaAddr::decode_range(DmaStrategy::Bounce, b, 4096, 12288).is_ok());
        assert!(DmaAddr::decode_range(DmaStrategy::Bounce, b, 4097, 12288).is_err());
        let top = BOUNCE_TAG | (u64::MAX >> 2);
        assert!(DmaAddr::decode_range(DmaStrategy::Bounce, top, 10, 1 << 26).is_err());
        let d = (1u64 << 62) - 2;
        assert_eq!(
            DmaAddr::decode_range(DmaStrategy::Direct, d, 4, 0),
            Err(DmaError::Wraps { gpa: d, len: 4 })
        );
        assert!(DmaAddr::decode_range(DmaStrategy::Direct, 0x1000, u32::MAX, 0).is_ok());
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in DmaStrategy::ALL {
            assert_eq!(s.name().parse::<DmaStrategy>(), Ok(s));
        }
        assert!("mmio".parse::<DmaStrategy>().is_err());
    }
}
