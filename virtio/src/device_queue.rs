//! The device side of a split virtqueue (virtio 1.2 section 2.7), over a ring area shared with a
//! hostile frontend.
//!
//! This module owns the device's private queue state (the next available and used indices) and
//! turns the frontend's descriptors into validated [`Chain`]s. It never resolves an address: a
//! chain holds the raw DMA addresses, and the caller maps them under the negotiated strategy.
//! It never trusts shared memory twice: every ring entry, descriptor and indirect table is
//! copied once into private memory and validated there (the double-fetch class of XSA-155), and
//! every limit of `docs/PROTOCOL.md` section 11 is checked before a chain is returned.

use std::sync::atomic::{Ordering, fence};

use crate::features::{self, transport};
use crate::split::{
    DESCRIPTOR_SIZE, Descriptor, RingLayout, UsedElem, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_USED_F_NO_NOTIFY, need_event,
};
use xenvirtio_xen::mem::{MemError, SharedMem};

/// A violation of the split-ring rules by the driver. Each one is a protocol error for the
/// device (`docs/PROTOCOL.md` section 11).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// `avail.idx` moved further than the queue size past the device's position.
    #[error(
        "avail.idx {avail_idx} is {ahead} entries ahead of the device at {next_avail} (queue size {size})"
    )]
    AvailIndexJump {
        /// The value read.
        avail_idx: u16,
        /// The device's next index.
        next_avail: u16,
        /// `avail_idx - next_avail`.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// A chain head or `next` index beyond the table.
    #[error("descriptor index {index} is outside a table of {size}")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Entries in the table.
        size: u16,
    },
    /// More descriptors than the queue size (2.7.5.3.1), which includes loops.
    #[error("descriptor chain starting at {head} is longer than the queue size {size}")]
    ChainTooLong {
        /// Head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// An indirect descriptor that was not negotiated.
    #[error("indirect descriptor used but RING_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    /// An indirect descriptor inside an indirect table (2.7.5.3.1).
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor with `NEXT` set (2.7.5.3.1).
    #[error("indirect descriptor with the NEXT flag set")]
    IndirectWithNext,
    /// An indirect table length that is 0, not a multiple of 16, or too large.
    #[error("indirect table of {len} bytes (must be a non-zero multiple of 16, at most {max})")]
    BadIndirectLength {
        /// The length.
        len: u32,
        /// The largest allowed.
        max: u32,
    },
    /// A device-readable descriptor after a device-writable one (2.7.4.2).
    #[error("device-readable descriptor after a device-writable one in the chain at {head}")]
    ReadableAfterWritable {
        /// Head index.
        head: u16,
    },
    /// The chain's buffers add up to more than 2^32 - 1 bytes.
    #[error("descriptor chain at {head} is longer than 4 GiB in total")]
    TotalLengthOverflow {
        /// Head index.
        head: u16,
    },
    /// The indirect table could not be fetched (its address is bad under the strategy).
    #[error("indirect table at {addr:#x} could not be read: {reason}")]
    IndirectFetch {
        /// The table's DMA address.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// The ring area is too small or not writable where the device writes.
    #[error("ring area access failed")]
    Ring(#[from] MemError),
}

/// One buffer of a chain, as the frontend described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainDescriptor {
    /// DMA address, still encoded.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device may write it.
    pub writable: bool,
}

/// A validated descriptor chain: device-readable buffers first, then device-writable ones,
/// indirect tables already expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head index, returned in the used ring.
    pub head: u16,
    /// The buffers, in order.
    pub descriptors: Vec<ChainDescriptor>,
}

impl Chain {
    /// The device-readable buffers.
    pub fn readable(&self) -> impl Iterator<Item = &ChainDescriptor> {
        self.descriptors.iter().filter(|d| !d.writable)
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> impl Iterator<Item = &ChainDescriptor> {
        self.descriptors.iter().filter(|d| d.writable)
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        // Validated at construction: the sum of all lengths fits in u32.
        self.readable().map(|d| d.len).sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable().map(|d| d.len).sum()
    }
}

/// The device's side of one split virtqueue.
///
/// The queue never owns its ring memory: every method takes the ring area as a [`SharedMem`]
/// (laid out as [`RingLayout`] says), as rust-vmm's queues take `GuestMemory` per call.
#[derive(Debug)]
pub struct DeviceQueue {
    layout: RingLayout,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    next_used: u16,
    /// The used index at the last notification decision (`old` in 2.7.10.2). It starts at the
    /// initial used index, so a driver's initial `used_event` of 0 asks for the first buffer.
    signalled_used: u16,
}

impl DeviceQueue {
    /// A queue of `layout.size()` entries with the negotiated `features`.
    pub fn new(layout: RingLayout, features: u64) -> Self {
        Self {
            layout,
            event_idx: features::has(features, transport::RING_EVENT_IDX),
            indirect: features::has(features, transport::RING_INDIRECT_DESC),
            next_avail: 0,
            next_used: 0,
            signalled_used: 0,
        }
    }

    /// The ring layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// The next available index the device will read.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The next used index the device will write.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    fn size(&self) -> u16 {
        self.layout.size()
    }

    /// Number of chains the driver has made available and the device has not popped yet.
    pub fn pending(&self, ring: &SharedMem<'_>) -> Result<u16, QueueError> {
        let avail_idx = ring.load_u16(self.layout.avail_idx(), Ordering::Acquire)?;
        let ahead = avail_idx.wrapping_sub(self.next_avail);
        if ahead > self.size() {
            return Err(QueueError::AvailIndexJump {
                avail_idx,
                next_avail: self.next_avail,
                ahead,
                size: self.size(),
            });
        }
        Ok(ahead)
    }

    /// Pops the next available chain, if any, and validates it whole.
    ///
    /// `fetch_indirect(addr, len)` must return a private copy of the `len` bytes at DMA address
    /// `addr` (an indirect table), resolved under the negotiated strategy.
    pub fn pop_chain<E: std::fmt::Display>(
        &mut self,
        ring: &SharedMem<'_>,
        fetch_indirect: &mut dyn FnMut(u64, u32) -> Result<Vec<u8>, E>,
    ) -> Result<Option<Chain>, QueueError> {
        if self.pending(ring)? == 0 {
            return Ok(None);
        }
        // The acquire load of avail.idx in `pending` orders this read after the driver's
        // write of the entry.
        let slot = self.layout.avail_ring(self.next_avail);
        let head = u16::from_le_bytes(ring.read_array::<2>(slot)?);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.read_chain(ring, head, fetch_indirect).map(Some)
    }

    /// Reads and validates the chain that starts at `head`.
    fn read_chain<E: std::fmt::Display>(
        &self,
        ring: &SharedMem<'_>,
        head: u16,
        fetch_indirect: &mut dyn FnMut(u64, u32) -> Result<Vec<u8>, E>,
    ) -> Result<Chain, QueueError> {
        let size = self.size();
        let mut out = ChainBuilder::new(head, size);
        let mut index = head;
        loop {
            if index >= size {
                return Err(QueueError::IndexOutOfRange { index, size });
            }
            let desc = Descriptor::from_bytes(
                &ring.read_array::<DESCRIPTOR_SIZE>(self.layout.desc(index))?,
            );
            if desc.is_indirect() {
                self.read_indirect(&desc, &mut out, fetch_indirect)?;
                break;
            }
            out.push(&desc)?;
            if !desc.has_next() {
                break;
            }
            index = desc.next;
        }
        Ok(out.finish())
    }

    fn read_indirect<E: std::fmt::Display>(
        &self,
        desc: &Descriptor,
        out: &mut ChainBuilder,
        fetch_indirect: &mut dyn FnMut(u64, u32) -> Result<Vec<u8>, E>,
    ) -> Result<(), QueueError> {
        if !self.indirect {
            return Err(QueueError::IndirectNotNegotiated);
        }
        if desc.has_next() {
            return Err(QueueError::IndirectWithNext);
        }
        let max = u32::from(self.size()) * DESCRIPTOR_SIZE as u32;
        let size_ok = desc.len != 0 && desc.len % DESCRIPTOR_SIZE as u32 == 0 && desc.len <= max;
        if !size_ok {
            return Err(QueueError::BadIndirectLength { len: desc.len, max });
        }
        // One fetch of the whole table into private memory; everything below parses the copy.
        let table = fetch_indirect(desc.addr, desc.len).map_err(|e| QueueError::IndirectFetch {
            addr: desc.addr,
            reason: e.to_string(),
        })?;
        if table.len() != desc.len as usize {
            return Err(QueueError::IndirectFetch {
                addr: desc.addr,
                reason: format!("got {} bytes instead of {}", table.len(), desc.len),
            });
        }
        let entries = u16::try_from(table.len() / DESCRIPTOR_SIZE)
            .map_err(|_| QueueError::BadIndirectLength { len: desc.len, max })?;
        let mut index = 0u16;
        loop {
            if index >= entries {
                return Err(QueueError::IndexOutOfRange {
                    index,
                    size: entries,
                });
            }
            let start = usize::from(index) * DESCRIPTOR_SIZE;
            let mut raw = [0u8; DESCRIPTOR_SIZE];
            raw.copy_from_slice(&table[start..start + DESCRIPTOR_SIZE]);
            let d = Descriptor::from_bytes(&raw);
            if d.is_indirect() {
                return Err(QueueError::NestedIndirect);
            }
            out.push(&d)?;
            if !d.has_next() {
                return Ok(());
            }
            index = d.next;
        }
    }

    /// Returns the chain `head` to the driver with `written` bytes written into its
    /// device-writable buffers, and publishes the new `used.idx`.
    pub fn add_used(
        &mut self,
        ring: &SharedMem<'_>,
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        let elem = UsedElem {
            id: u32::from(head),
            len: written,
        };
        ring.write(self.layout.used_ring(self.next_used), &elem.to_bytes())?;
        self.next_used = self.next_used.wrapping_add(1);
        // Release: the element is visible before the index that exposes it.
        ring.store_u16(self.layout.used_idx(), self.next_used, Ordering::Release)?;
        Ok(())
    }

    /// Whether the driver wants a used-buffer notification now (2.7.10), given what was added
    /// to the used ring since the last call.
    pub fn needs_notification(&mut self, ring: &SharedMem<'_>) -> Result<bool, QueueError> {
        // Order the used.idx store before reading the driver's suppression state.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let old = std::mem::replace(&mut self.signalled_used, new);
        if self.event_idx {
            let used_event = ring.load_u16(self.layout.used_event(), Ordering::Acquire)?;
            Ok(need_event(used_event, new, old))
        } else {
            let flags = ring.load_u16(self.layout.avail_flags(), Ordering::Acquire)?;
            Ok(old != new && flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver not to send available-buffer notifications while the device is
    /// processing (without EVENT_IDX; with it, a stale `avail_event` has the same effect).
    pub fn disable_notification(&mut self, ring: &SharedMem<'_>) -> Result<(), QueueError> {
        if !self.event_idx {
            ring.store_u16(
                self.layout.used_flags(),
                VIRTQ_USED_F_NO_NOTIFY,
                Ordering::Relaxed,
            )?;
        }
        Ok(())
    }

    /// Asks the driver to notify on the next available buffer, then re-checks the ring: returns
    /// `true` if work arrived meanwhile (the caller must process it instead of sleeping).
    pub fn enable_notification(&mut self, ring: &SharedMem<'_>) -> Result<bool, QueueError> {
        if self.event_idx {
            ring.store_u16(
                self.layout.avail_event(),
                self.next_avail,
                Ordering::Relaxed,
            )?;
        } else {
            ring.store_u16(self.layout.used_flags(), 0, Ordering::Relaxed)?;
        }
        // The store above must be visible before we look at avail.idx again, or a driver that
        // checked the old value in between would not notify and we would sleep with work.
        fence(Ordering::SeqCst);
        Ok(self.pending(ring)? != 0)
    }
}

/// Accumulates a chain while enforcing the count, ordering and total-length rules.
struct ChainBuilder {
    head: u16,
    size: u16,
    descriptors: Vec<ChainDescriptor>,
    total: u64,
    seen_writable: bool,
}

impl ChainBuilder {
    fn new(head: u16, size: u16) -> Self {
        Self {
            head,
            size,
            descriptors: Vec::new(),
            total: 0,
            seen_writable: false,
        }
    }

    fn push(&mut self, d: &Descriptor) -> Result<(), QueueError> {
        if self.descriptors.len() >= usize::from(self.size) {
            return Err(QueueError::ChainTooLong {
                head: self.head,
                size: self.size,
            });
        }
        let writable = d.is_write_only();
        if self.seen_writable && !writable {
            return Err(QueueError::ReadableAfterWritable { head: self.head });
        }
        self.seen_writable |= writable;
        self.total += u64::from(d.len);
        if self.total > u64::from(u32::MAX) {
            return Err(QueueError::TotalLengthOverflow { head: self.head });
        }
        self.descriptors.push(ChainDescriptor {
            addr: d.addr,
            len: d.len,
            writable,
        });
        Ok(())
    }

    fn finish(self) -> Chain {
        Chain {
            head: self.head,
            descriptors: self.descriptors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::bit;
    use crate::split::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use xenvirtio_xen::mem::PageBuf;

    const ALL: u64 = bit(transport::VERSION_1)
        | bit(transport::RING_EVENT_IDX)
        | bit(transport::RING_INDIRECT_DESC);

    /// A driver that writes rings by hand, so tests can build hostile ones.
    struct Driver {
        buf: PageBuf,
        layout: RingLayout,
        avail: std::cell::Cell<u16>,
    }

    impl Driver {
        fn new(size: u32) -> Self {
            let layout = RingLayout::new(size, 1024).unwrap();
            Self {
                buf: PageBuf::new(layout.pages() + 4),
                layout,
                avail: Default::default(),
            }
        }
        fn ring(&self) -> SharedMem<'_> {
            self.buf.mem().slice(0, self.layout.pages() * 4096).unwrap()
        }
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = Descriptor {
                addr,
                len,
                flags,
                next,
            };
            self.ring()
                .write(self.layout.desc(i), &d.to_bytes())
                .unwrap();
        }
        fn offer(&self, head: u16) {
            let slot = self.layout.avail_ring(self.avail.get());
            self.ring().write(slot, &head.to_le_bytes()).unwrap();
            self.avail.set(self.avail.get().wrapping_add(1));
            self.ring()
                .store_u16(self.layout.avail_idx(), self.avail.get(), Ordering::Release)
                .unwrap();
        }
        fn used(&self, slot: u16) -> UsedElem {
            UsedElem::from_bytes(&self.ring().read_array(self.layout.used_ring(slot)).unwrap())
        }
        fn used_idx(&self) -> u16 {
            self.ring()
                .load_u16(self.layout.used_idx(), Ordering::Acquire)
                .unwrap()
        }
    }

    fn no_indirect(_: u64, _: u32) -> Result<Vec<u8>, String> {
        Err("no indirect tables in this test".into())
    }

    fn pop(q: &mut DeviceQueue, d: &Driver) -> Result<Option<Chain>, QueueError> {
        q.pop_chain(&d.ring(), &mut no_indirect)
    }

    #[test]
    fn pops_a_chain_and_returns_it_used() {
        let d = Driver::new(8);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(3, 0x1000, 16, VIRTQ_DESC_F_NEXT, 5);
        d.desc(5, 0x2000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1);
        d.desc(1, 0x3000, 1, VIRTQ_DESC_F_WRITE, 0);
        assert!(pop(&mut q, &d).unwrap().is_none());
        d.offer(3);
        let c = pop(&mut q, &d).unwrap().unwrap();
        assert_eq!(c.head, 3);
        assert_eq!(
            c.descriptors,
            vec![
                ChainDescriptor {
                    addr: 0x1000,
                    len: 16,
                    writable: false
                },
                ChainDescriptor {
                    addr: 0x2000,
                    len: 512,
                    writable: true
                },
                ChainDescriptor {
                    addr: 0x3000,
                    len: 1,
                    writable: true
                },
            ]
        );
        assert_eq!((c.readable_len(), c.writable_len()), (16, 513));
        assert!(pop(&mut q, &d).unwrap().is_none());
        q.add_used(&d.ring(), 3, 513).unwrap();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0), UsedElem { id: 3, len: 513 });
    }

    #[test]
    fn hostile_rings_are_refused() {
        // Head out of range.
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.offer(4);
        assert!(matches!(
            pop(&mut q, &d),
            Err(QueueError::IndexOutOfRange { index: 4, size: 4 })
        ));

        // A loop.
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(0, 0, 1, VIRTQ_DESC_F_NEXT, 1);
        d.desc(1, 0, 1, VIRTQ_DESC_F_NEXT, 0);
        d.offer(0);
        assert!(matches!(
            pop(&mut q, &d),
            Err(QueueError::ChainTooLong { head: 0, size: 4 })
        ));

        // next out of range.
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(0, 0, 1, VIRTQ_DESC_F_NEXT, 9);
        d.offer(0);
        assert!(matches!(
            pop(&mut q, &d),
            Err(QueueError::IndexOutOfRange { index: 9, .. })
        ));

        // Readable after writable.
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(0, 0, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1);
        d.desc(1, 0, 1, 0, 0);
        d.offer(0);
        assert!(matches!(
            pop(&mut q, &d),
            Err(QueueError::ReadableAfterWritable { head: 0 })
        ));

        // Total length over 4 GiB.
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(0, 0, u32::MAX, VIRTQ_DESC_F_NEXT, 1);
        d.desc(1, 0, 1, 0, 0);
        d.offer(0);
        assert!(matches!(
            pop(&mut q, &d),
            Err(QueueError::TotalLengthOverflow { head: 0 })
        ));

        // avail.idx jumping more than the queue size.
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.ring()
            .store_u16(d.layout.avail_idx(), 5, Ordering::Release)
            .unwrap();
        assert!(matches!(
            pop(&mut q, &d),
            Err(QueueError::AvailIndexJump { ahead: 5, .. })
        ));
    }

    fn table(descs: &[Descriptor]) -> Vec<u8> {
        descs.iter().flat_map(|d| d.to_bytes()).collect()
    }

    #[test]
    fn indirect_tables_are_fetched_once_and_validated() {
        let d = Driver::new(8);
        let mut q = DeviceQueue::new(d.layout, ALL);
        let t = table(&[
            Descriptor {
                addr: 0xa000,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: 2,
            },
            Descriptor {
                addr: 0xdead,
                len: 1,
                flags: 0,
                next: 0,
            },
            Descriptor {
                addr: 0xb000,
                len: 4096,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ]);
        d.desc(0, 0x7000, t.len() as u32, VIRTQ_DESC_F_INDIRECT, 0);
        d.offer(0);
        let mut fetches = 0;
        let c = q
            .pop_chain(&d.ring(), &mut |addr, len| {
                fetches += 1;
                assert_eq!((addr, len), (0x7000, 48));
                Ok::<_, String>(t.clone())
            })
            .unwrap()
            .unwrap();
        assert_eq!(fetches, 1);
        assert_eq!(c.descriptors.len(), 2);
        assert_eq!(
            c.descriptors[1],
            ChainDescriptor {
                addr: 0xb000,
                len: 4096,
                writable: true
            }
        );

        // Nested indirect, INDIRECT|NEXT, bad lengths, a table that cannot be fetched.
        let nested = table(&[Descriptor {
            addr: 0,
            len: 16,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        }]);
        let cases: Vec<(u32, u16, Vec<u8>)> = vec![
            (16, VIRTQ_DESC_F_INDIRECT, nested),
            (
                16,
                VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
                table(&[Descriptor::default()]),
            ),
            (0, VIRTQ_DESC_F_INDIRECT, vec![]),
            (24, VIRTQ_DESC_F_INDIRECT, vec![0; 24]),
            (16 * 9, VIRTQ_DESC_F_INDIRECT, vec![0; 16 * 9]),
        ];
        for (len, flags, bytes) in cases {
            let d = Driver::new(8);
            let mut q = DeviceQueue::new(d.layout, ALL);
            d.desc(0, 0x7000, len, flags, 1);
            d.offer(0);
            let r = q.pop_chain(&d.ring(), &mut |_, _| Ok::<_, String>(bytes.clone()));
            assert!(r.is_err(), "len {len} flags {flags:#x} was accepted");
        }
        let d = Driver::new(8);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(0, 0x7000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        d.offer(0);
        let e = q.pop_chain(&d.ring(), &mut no_indirect).unwrap_err();
        assert!(e.to_string().contains("could not be read"), "{e}");

        // Indirect without the feature.
        let d = Driver::new(8);
        let mut q = DeviceQueue::new(d.layout, bit(transport::VERSION_1));
        d.desc(0, 0x7000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        d.offer(0);
        assert!(matches!(
            q.pop_chain(&d.ring(), &mut |_, _| Ok::<_, String>(vec![0; 16])),
            Err(QueueError::IndirectNotNegotiated)
        ));
    }

    #[test]
    fn event_idx_suppresses_notifications() {
        let d = Driver::new(8);
        let mut q = DeviceQueue::new(d.layout, ALL);
        for i in 0..4 {
            d.desc(i, 0, 1, VIRTQ_DESC_F_WRITE, 0);
        }
        // The driver wants to hear when used.idx passes 1 (used_event = 1).
        d.ring()
            .store_u16(d.layout.used_event(), 1, Ordering::Release)
            .unwrap();
        for i in 0..4 {
            d.offer(i);
        }
        let r = d.ring();
        let c = pop(&mut q, &d).unwrap().unwrap();
        q.add_used(&r, c.head, 1).unwrap();
        assert!(
            !q.needs_notification(&r).unwrap(),
            "used.idx 0 -> 1 has not passed used_event 1"
        );
        let c = pop(&mut q, &d).unwrap().unwrap();
        q.add_used(&r, c.head, 1).unwrap();
        assert!(
            q.needs_notification(&r).unwrap(),
            "used.idx moved 1 -> 2 past used_event 1"
        );
        let c = pop(&mut q, &d).unwrap().unwrap();
        q.add_used(&r, c.head, 1).unwrap();
        assert!(
            !q.needs_notification(&r).unwrap(),
            "used_event 1 already passed"
        );
        // Re-enabling available notifications publishes avail_event and sees pending work.
        assert!(q.enable_notification(&r).unwrap());
        assert_eq!(
            r.load_u16(d.layout.avail_event(), Ordering::Acquire)
                .unwrap(),
            3
        );
        pop(&mut q, &d).unwrap().unwrap();
        assert!(!q.enable_notification(&r).unwrap());
    }

    #[test]
    fn flags_suppress_notifications_without_event_idx() {
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, bit(transport::VERSION_1));
        d.desc(0, 0, 1, VIRTQ_DESC_F_WRITE, 0);
        let r = d.ring();
        q.disable_notification(&r).unwrap();
        assert_eq!(
            r.load_u16(d.layout.used_flags(), Ordering::Acquire)
                .unwrap(),
            VIRTQ_USED_F_NO_NOTIFY
        );
        d.offer(0);
        pop(&mut q, &d).unwrap().unwrap();
        q.add_used(&r, 0, 0).unwrap();
        r.store_u16(
            d.layout.avail_flags(),
            VIRTQ_AVAIL_F_NO_INTERRUPT,
            Ordering::Release,
        )
        .unwrap();
        assert!(!q.needs_notification(&r).unwrap());
        r.store_u16(d.layout.avail_flags(), 0, Ordering::Release)
            .unwrap();
        assert!(!q.needs_notification(&r).unwrap(), "nothing new was used");
        d.offer(0);
        pop(&mut q, &d).unwrap().unwrap();
        q.add_used(&r, 0, 0).unwrap();
        assert!(q.needs_notification(&r).unwrap());
        assert!(!q.enable_notification(&r).unwrap());
        assert_eq!(
            r.load_u16(d.layout.used_flags(), Ordering::Acquire)
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_read_only_ring_cannot_be_completed() {
        let d = Driver::new(4);
        let mut q = DeviceQueue::new(d.layout, ALL);
        d.desc(0, 0, 1, 0, 0);
        d.offer(0);
        let ro = d.ring().read_only();
        let c = q.pop_chain(&ro, &mut no_indirect).unwrap().unwrap();
        assert!(matches!(
            q.add_used(&ro, c.head, 0),
            Err(QueueError::Ring(MemError::ReadOnly { .. }))
        ));
    }
}
