//! The driver side of a split virtqueue, small and explicit, for tests that play the frontend.
//!
//! It writes descriptors and the available ring straight into the ring area and reads the used
//! ring back, and it also lets a test write anything at all there (hostile descriptors, a
//! jumping `avail.idx`). It trusts the device only as far as a test needs: used entries are
//! checked against the chains in flight. It never depends on the frontend crate.

use std::collections::HashMap;
use std::sync::atomic::{Ordering, fence};

use xenvirtio_virtio::features::{self, transport};
use xenvirtio_virtio::split::{
    Descriptor, RingLayout, UsedElem, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY, need_event,
};
use xenvirtio_xen::mem::{MemError, SharedMem};

/// Why the driver ring refused something.
#[derive(Debug, thiserror::Error)]
pub enum DriverRingError {
    /// Not enough free descriptors.
    #[error("{wanted} descriptors wanted, {free} free")]
    Full {
        /// Needed.
        wanted: usize,
        /// Free.
        free: usize,
    },
    /// A chain without buffers.
    #[error("a chain needs at least one buffer")]
    Empty,
    /// The device returned a head that is not in flight.
    #[error("the device returned head {0}, which is not in flight")]
    BadUsed(u32),
    /// The ring area is too small.
    #[error("ring area access failed")]
    Mem(#[from] MemError),
}

/// One buffer of a chain: DMA address, length, device-writable.
pub type Segment = (u64, u32, bool);

/// The driver's private state of one queue.
#[derive(Debug)]
pub struct DriverRing {
    layout: RingLayout,
    event_idx: bool,
    free: Vec<u16>,
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
}

impl DriverRing {
    /// A ring of `layout.size()` entries with the negotiated `features`. The ring area must
    /// be zeroed.
    pub fn new(layout: RingLayout, features: u64) -> Self {
        Self {
            layout,
            event_idx: features::has(features, transport::RING_EVENT_IDX),
            free: (0..layout.size()).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
        }
    }

    /// The layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Chains made available and not used yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Writes `segments` as a chain and makes it available (without publishing the index;
    /// see [`DriverRing::publish`]). Returns the head.
    pub fn add(
        &mut self,
        ring: &SharedMem<'_>,
        segments: &[Segment],
    ) -> Result<u16, DriverRingError> {
        if segments.is_empty() {
            return Err(DriverRingError::Empty);
        }
        if segments.len() > self.free.len() {
            return Err(DriverRingError::Full {
                wanted: segments.len(),
                free: self.free.len(),
            });
        }
        let ids: Vec<u16> = (0..segments.len())
            .map(|_| self.free.pop().expect("counted above"))
            .collect();
        for (i, &(addr, len, writable)) in segments.iter().enumerate() {
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < ids.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let d = Descriptor {
                addr,
                len,
                flags,
                next,
            };
            ring.write(self.layout.desc(ids[i]), &d.to_bytes())?;
        }
        let head = ids[0];
        self.in_flight.insert(head, ids);
        self.offer(ring, head)?;
        Ok(head)
    }

    /// Makes one indirect descriptor pointing at a table of `table_len` bytes at `table_addr`
    /// (the caller wrote the table into DMA memory) available. Returns the head.
    pub fn add_indirect(
        &mut self,
        ring: &SharedMem<'_>,
        table_addr: u64,
        table_len: u32,
    ) -> Result<u16, DriverRingError> {
        let Some(id) = self.free.pop() else {
            return Err(DriverRingError::Full { wanted: 1, free: 0 });
        };
        let d = Descriptor {
            addr: table_addr,
            len: table_len,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        };
        ring.write(self.layout.desc(id), &d.to_bytes())?;
        self.in_flight.insert(id, vec![id]);
        self.offer(ring, id)?;
        Ok(id)
    }

    /// The bytes of an indirect table holding `segments` (chained 0, 1, 2, ...).
    pub fn indirect_table(segments: &[Segment]) -> Vec<u8> {
        let mut table = Vec::with_capacity(segments.len() * 16);
        for (i, &(addr, len, writable)) in segments.iter().enumerate() {
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < segments.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                next = (i + 1) as u16;
            }
            table.extend_from_slice(
                &Descriptor {
                    addr,
                    len,
                    flags,
                    next,
                }
                .to_bytes(),
            );
        }
        table
    }

    fn offer(&mut self, ring: &SharedMem<'_>, head: u16) -> Result<(), DriverRingError> {
        ring.write(self.layout.avail_ring(self.avail_idx), &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes `avail.idx` and says whether the device wants a notification (2.7.13).
    pub fn publish(&mut self, ring: &SharedMem<'_>) -> Result<bool, DriverRingError> {
        ring.store_u16(self.layout.avail_idx(), self.avail_idx, Ordering::Release)?;
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.kicked_idx, self.avail_idx);
        if self.event_idx {
            let event = ring.load_u16(self.layout.avail_event(), Ordering::Acquire)?;
            Ok(need_event(event, self.avail_idx, old))
        } else {
            let flags = ring.load_u16(self.layout.used_flags(), Ordering::Acquire)?;
            Ok(flags & VIRTQ_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Asks for a used-buffer notification at the next used entry (EVENT_IDX `used_event`).
    pub fn want_notification(&self, ring: &SharedMem<'_>) -> Result<(), DriverRingError> {
        ring.store_u16(self.layout.used_event(), self.last_used, Ordering::Release)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Takes the next used entry, if any: `(head, written length)`.
    pub fn pop_used(
        &mut self,
        ring: &SharedMem<'_>,
    ) -> Result<Option<(u16, u32)>, DriverRingError> {
        let used_idx = ring.load_u16(self.layout.used_idx(), Ordering::Acquire)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let elem = UsedElem::from_bytes(&ring.read_array(self.layout.used_ring(self.last_used))?);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(elem.id).map_err(|_| DriverRingError::BadUsed(elem.id))?;
        let ids = self
            .in_flight
            .remove(&head)
            .ok_or(DriverRingError::BadUsed(elem.id))?;
        self.free.extend(ids);
        Ok(Some((head, elem.len)))
    }

    /// Writes descriptor `index` as is (hostile tests).
    pub fn write_raw_descriptor(
        &self,
        ring: &SharedMem<'_>,
        index: u16,
        desc: Descriptor,
    ) -> Result<(), DriverRingError> {
        ring.write(self.layout.desc(index), &desc.to_bytes())?;
        Ok(())
    }

    /// Puts `head` in the available ring as is, without any check (hostile tests).
    pub fn offer_raw(&mut self, ring: &SharedMem<'_>, head: u16) -> Result<(), DriverRingError> {
        self.offer(ring, head)
    }

    /// Moves the private available index by `n` without writing entries (hostile tests).
    pub fn skip_avail(&mut self, n: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(n);
    }

    /// A free descriptor index for a hand-written chain (hostile tests); it is never returned.
    pub fn take_free(&mut self) -> Option<u16> {
        self.free.pop()
    }
}
