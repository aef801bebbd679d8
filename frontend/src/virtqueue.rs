//! The driver side of a split virtqueue (virtio 1.2 section 2.7).
//!
//! This module owns the driver's private bookkeeping of one queue: the free descriptors, the
//! chains in flight and the shadow indices. The ring area is shared with a backend that may be
//! hostile or buggy, so nothing is ever read back from the descriptor table or the available
//! ring (the driver's own state is private), and everything read from the used ring (an index,
//! a head, a length) is checked against that private state before it is believed. Addresses in
//! descriptors are already encoded by the caller's DMA strategy; this module does not know
//! about grants.

use std::sync::atomic::{Ordering, fence};

use xenvirtio_virtio::features::{self, transport};
use xenvirtio_virtio::split::{
    DESCRIPTOR_SIZE, Descriptor, RingLayout, USED_ELEM_SIZE, UsedElem, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
    need_event,
};
use xenvirtio_xen::mem::{MemError, SharedMem};

/// One buffer to hand to the device, its address already encoded for the DMA strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverBuf {
    /// Encoded DMA address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device may write it.
    pub writable: bool,
}

/// Errors of the driver-side queue.
#[derive(Debug, thiserror::Error)]
pub enum DriverQueueError {
    /// Not enough free descriptors for the chain.
    #[error("queue full: {needed} descriptors needed, {free} free")]
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: u16,
    },
    /// A chain with no buffers, or device-readable buffers after device-writable ones.
    #[error("invalid chain: {0}")]
    InvalidChain(&'static str),
    /// An indirect table was requested but not negotiated, or does not fit its memory.
    #[error("indirect table: {0}")]
    Indirect(&'static str),
    /// The device moved `used.idx` further than it could have.
    #[error(
        "device moved used.idx to {used_idx}, {ahead} past the driver's {last_used} (size {size})"
    )]
    UsedIndexJump {
        /// Value read.
        used_idx: u16,
        /// The driver's last seen index.
        last_used: u16,
        /// Distance.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// The device returned a head that is not a chain in flight.
    #[error("device returned head {head}, which is not in flight")]
    BogusHead {
        /// The head.
        head: u32,
    },
    /// The device claims to have written more than the chain's writable length.
    #[error("device wrote {len} bytes into chain {head} whose writable buffers hold {max}")]
    BogusLength {
        /// Head of the chain.
        head: u16,
        /// Length claimed.
        len: u32,
        /// Writable capacity of the chain.
        max: u32,
    },
    /// Ring memory could not be accessed.
    #[error("ring area access failed")]
    Ring(#[from] MemError),
}

#[derive(Debug)]
struct InFlight<T> {
    token: T,
    descriptors: u16,
    writable_len: u32,
}

/// The driver's side of one split virtqueue. `T` is what the caller gets back with each
/// completion (a request id, a buffer handle).
#[derive(Debug)]
pub struct DriverQueue<T> {
    layout: RingLayout,
    event_idx: bool,
    indirect: bool,
    /// Free list, private: `next_free[i]` is the descriptor after `i` in the free list.
    next_free: Vec<u16>,
    free_head: u16,
    num_free: u16,
    in_flight: Vec<Option<InFlight<T>>>,
    avail_idx: u16,
    /// `avail.idx` at the last kick decision.
    kicked_avail: u16,
    last_used: u16,
}

impl<T> DriverQueue<T> {
    /// A queue of `layout.size()` entries with the negotiated `features`. The caller must have
    /// zeroed the ring area.
    pub fn new(layout: RingLayout, features: u64) -> Self {
        let size = layout.size();
        Self {
            layout,
            event_idx: features::has(features, transport::RING_EVENT_IDX),
            indirect: features::has(features, transport::RING_INDIRECT_DESC),
            next_free: (1..=size).map(|i| i % size).collect(),
            free_head: 0,
            num_free: size,
            in_flight: (0..size).map(|_| None).collect(),
            avail_idx: 0,
            kicked_avail: 0,
            last_used: 0,
        }
    }

    /// The ring layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains handed to the device and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|s| s.is_some()).count()
    }

    /// Whether indirect descriptors were negotiated.
    pub fn indirect_enabled(&self) -> bool {
        self.indirect
    }

    fn check_order(bufs: &[DriverBuf]) -> Result<u32, DriverQueueError> {
        if bufs.is_empty() {
            return Err(DriverQueueError::InvalidChain("no buffers"));
        }
        let mut seen_writable = false;
        let mut writable_len = 0u64;
        let mut total = 0u64;
        for b in bufs {
            if seen_writable && !b.writable {
                return Err(DriverQueueError::InvalidChain(
                    "device-readable buffer after a device-writable one",
                ));
            }
            seen_writable |= b.writable;
            total += u64::from(b.len);
            if b.writable {
                writable_len += u64::from(b.len);
            }
        }
        if total > u64::from(u32::MAX) {
            return Err(DriverQueueError::InvalidChain("longer than 4 GiB"));
        }
        // total fits in u32, so writable_len does too.
        Ok(writable_len as u32)
    }

    fn take_free(&mut self, n: u16) -> Result<Vec<u16>, DriverQueueError> {
        if n > self.num_free {
            return Err(DriverQueueError::Full {
                needed: usize::from(n),
                free: self.num_free,
            });
        }
        let mut ids = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            ids.push(self.free_head);
            self.free_head = self.next_free[usize::from(self.free_head)];
        }
        self.num_free -= n;
        Ok(ids)
    }

    /// Adds a chain of direct descriptors and makes it available. Returns its head.
    pub fn add(
        &mut self,
        ring: &SharedMem<'_>,
        bufs: &[DriverBuf],
        token: T,
    ) -> Result<u16, DriverQueueError> {
        let writable_len = Self::check_order(bufs)?;
        if bufs.len() > usize::from(self.layout.size()) {
            return Err(DriverQueueError::InvalidChain("longer than the queue size"));
        }
        let n = bufs.len() as u16;
        let ids = self.take_free(n)?;
        for (k, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let last = k + 1 == ids.len();
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if last {
                0
            } else {
                flags |= VIRTQ_DESC_F_NEXT;
                ids[k + 1]
            };
            let d = Descriptor {
                addr: b.addr,
                len: b.len,
                flags,
                next,
            };
            ring.write(self.layout.desc(id), &d.to_bytes())?;
        }
        let head = ids[0];
        self.in_flight[usize::from(head)] = Some(InFlight {
            token,
            descriptors: n,
            writable_len,
        });
        self.publish(ring, head)?;
        Ok(head)
    }

    /// Adds a chain through an indirect table and makes it available. The table is written
    /// into `table` (memory the device can reach at DMA address `table_addr`); it must stay
    /// untouched until the chain completes. Returns the head.
    pub fn add_indirect(
        &mut self,
        ring: &SharedMem<'_>,
        table_addr: u64,
        table: &SharedMem<'_>,
        bufs: &[DriverBuf],
        token: T,
    ) -> Result<u16, DriverQueueError> {
        if !self.indirect {
            return Err(DriverQueueError::Indirect(
                "RING_INDIRECT_DESC was not negotiated",
            ));
        }
        let writable_len = Self::check_order(bufs)?;
        if bufs.len() > usize::from(self.layout.size()) {
            return Err(DriverQueueError::InvalidChain("longer than the queue size"));
        }
        let bytes = bufs.len() * DESCRIPTOR_SIZE;
        if bytes > table.len() {
            return Err(DriverQueueError::Indirect("table memory too small"));
        }
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let mut flags = if b.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = if last {
                0
            } else {
                flags |= VIRTQ_DESC_F_NEXT;
                k as u16 + 1
            };
            let d = Descriptor {
                addr: b.addr,
                len: b.len,
                flags,
                next,
            };
            table.write(k * DESCRIPTOR_SIZE, &d.to_bytes())?;
        }
        let ids = self.take_free(1)?;
        let head = ids[0];
        let d = Descriptor {
            addr: table_addr,
            len: bytes as u32,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        };
        ring.write(self.layout.desc(head), &d.to_bytes())?;
        self.in_flight[usize::from(head)] = Some(InFlight {
            token,
            descriptors: 1,
            writable_len,
        });
        self.publish(ring, head)?;
        Ok(head)
    }

    fn publish(&mut self, ring: &SharedMem<'_>, head: u16) -> Result<(), DriverQueueError> {
        ring.write(self.layout.avail_ring(self.avail_idx), &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the index.
        ring.store_u16(self.layout.avail_idx(), self.avail_idx, Ordering::Release)?;
        Ok(())
    }

    /// Whether the device wants an available-buffer notification for what was added since the
    /// last call (2.7.10, `virtqueue_kick_prepare`).
    pub fn kick_prepare(&mut self, ring: &SharedMem<'_>) -> Result<bool, DriverQueueError> {
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = std::mem::replace(&mut self.kicked_avail, new);
        if self.event_idx {
            let avail_event = ring.load_u16(self.layout.avail_event(), Ordering::Acquire)?;
            Ok(need_event(avail_event, new, old))
        } else {
            let flags = ring.load_u16(self.layout.used_flags(), Ordering::Acquire)?;
            Ok(old != new && flags & VIRTQ_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Takes the next completion, if any: the caller's token and the number of bytes the device
    /// says it wrote (already checked against the chain's writable length).
    pub fn pop_used(&mut self, ring: &SharedMem<'_>) -> Result<Option<(T, u32)>, DriverQueueError> {
        let used_idx = ring.load_u16(self.layout.used_idx(), Ordering::Acquire)?;
        let ahead = used_idx.wrapping_sub(self.last_used);
        if ahead == 0 {
            return Ok(None);
        }
        let size = self.layout.size();
        if ahead > size {
            return Err(DriverQueueError::UsedIndexJump {
                used_idx,
                last_used: self.last_used,
                ahead,
                size,
            });
        }
        let elem = UsedElem::from_bytes(
            &ring.read_array::<USED_ELEM_SIZE>(self.layout.used_ring(self.last_used))?,
        );
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(elem.id)
            .ok()
            .filter(|&h| h < size)
            .ok_or(DriverQueueError::BogusHead { head: elem.id })?;
        let slot = self.in_flight[usize::from(head)]
            .take()
            .ok_or(DriverQueueError::BogusHead { head: elem.id })?;
        if elem.len > slot.writable_len {
            // Leave the chain in flight: the caller fails the device and drains the queue, so
            // the token (the request it stands for) comes back exactly once, through
            // `drain_in_flight`. Dropping it here made the request vanish (found by the
            // `driver_queue` fuzz target; see `test_regression_bogus_length_keeps_the_token`).
            let max = slot.writable_len;
            self.in_flight[usize::from(head)] = Some(slot);
            return Err(DriverQueueError::BogusLength {
                head,
                len: elem.len,
                max,
            });
        }
        self.release(head, slot.descriptors);
        Ok(Some((slot.token, elem.len)))
    }

    /// Returns a chain's descriptors to the free list, following the driver's own record of
    /// the chain (never the shared table).
    fn release(&mut self, head: u16, descriptors: u16) {
        // The chain's descriptors were taken from the free list in order; rebuild the same
        // sequence from the private `next_free` links, which still hold it.
        let mut last = head;
        for _ in 1..descriptors {
            last = self.next_free[usize::from(last)];
        }
        self.next_free[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += descriptors;
    }

    /// Asks the device for a used-buffer notification on the next completion, then re-checks
    /// the ring: `true` means completions arrived meanwhile (process them instead of sleeping).
    pub fn enable_callbacks(&mut self, ring: &SharedMem<'_>) -> Result<bool, DriverQueueError> {
        if self.event_idx {
            ring.store_u16(self.layout.used_event(), self.last_used, Ordering::Relaxed)?;
        } else {
            ring.store_u16(self.layout.avail_flags(), 0, Ordering::Relaxed)?;
        }
        fence(Ordering::SeqCst);
        let used_idx = ring.load_u16(self.layout.used_idx(), Ordering::Acquire)?;
        Ok(used_idx != self.last_used)
    }

    /// Asks the device not to notify completions (without EVENT_IDX; with it a stale
    /// `used_event` has the same effect).
    pub fn disable_callbacks(&mut self, ring: &SharedMem<'_>) -> Result<(), DriverQueueError> {
        if !self.event_idx {
            ring.store_u16(
                self.layout.avail_flags(),
                VIRTQ_AVAIL_F_NO_INTERRUPT,
                Ordering::Relaxed,
            )?;
        }
        Ok(())
    }

    /// The caller's token of the chain in flight at `head`, to attach more to it.
    pub fn token_mut(&mut self, head: u16) -> Option<&mut T> {
        self.in_flight
            .get_mut(usize::from(head))?
            .as_mut()
            .map(|slot| &mut slot.token)
    }

    /// Forgets every chain in flight (after the device stopped) and returns their tokens, so
    /// the caller can fail the requests they stand for.
    pub fn drain_in_flight(&mut self) -> Vec<T> {
        let mut tokens = Vec::new();
        for head in 0..self.layout.size() {
            if let Some(slot) = self.in_flight[usize::from(head)].take() {
                self.release(head, slot.descriptors);
                tokens.push(slot.token);
            }
        }
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use xenvirtio_virtio::features::bit;

    const BASE: u64 = 0x10000;
    const ALL: u64 = bit(transport::VERSION_1)
        | bit(transport::RING_EVENT_IDX)
        | bit(transport::RING_INDIRECT_DESC);

    /// A descriptor as the device saw it: address, length, writable.
    type SeenDesc = (u64, u32, bool);

    /// rust-vmm's device queue over the same memory plays the device.
    struct Rig {
        mem: GuestMemoryMmap,
        layout: RingLayout,
        device: std::cell::RefCell<Queue>,
    }

    impl Rig {
        fn new(size: u32, features: u64) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
            let layout = RingLayout::new(size, 1024).unwrap();
            let mut device = Queue::new(layout.size()).unwrap();
            device.set_size(layout.size());
            let at = |o: usize| {
                let a = BASE + o as u64;
                (Some(a as u32), Some((a >> 32) as u32))
            };
            let (l, h) = at(layout.desc_offset());
            device.set_desc_table_address(l, h);
            let (l, h) = at(layout.avail_offset());
            device.set_avail_ring_address(l, h);
            let (l, h) = at(layout.used_offset());
            device.set_used_ring_address(l, h);
            device.set_event_idx(features::has(features, transport::RING_EVENT_IDX));
            device.set_ready(true);
            Self {
                mem,
                layout,
                device: std::cell::RefCell::new(device),
            }
        }

        fn mem_at(&self, addr: u64, len: usize) -> SharedMem<'_> {
            let host = self.mem.get_host_address(GuestAddress(addr)).unwrap();
            // SAFETY: 1 MiB of anonymous memory owned by self.mem for the lifetime of self;
            // every window asked for here lies inside it.
            unsafe { SharedMem::from_raw_parts(std::ptr::NonNull::new(host).unwrap(), len, true) }
        }

        fn ring(&self) -> SharedMem<'_> {
            self.mem_at(BASE, self.layout.pages() * 4096)
        }

        /// Device pops one chain; returns (head, descriptors).
        fn device_pop(&self) -> Option<(u16, Vec<SeenDesc>)> {
            let chain = self.device.borrow_mut().pop_descriptor_chain(&self.mem)?;
            let head = chain.head_index();
            Some((
                head,
                chain
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect(),
            ))
        }

        fn device_complete(&self, head: u16, len: u32) -> bool {
            let mut device = self.device.borrow_mut();
            device.add_used(&self.mem, head, len).unwrap();
            device.needs_notification(&self.mem).unwrap()
        }
    }

    fn buf(addr: u64, len: u32, writable: bool) -> DriverBuf {
        DriverBuf {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn chains_reach_the_device_and_complete() {
        let rig = Rig::new(8, ALL);
        let mut q = DriverQueue::new(rig.layout, ALL);
        let ring = rig.ring();
        let bufs = [
            buf(0x1000, 16, false),
            buf(0x2000, 512, true),
            buf(0x3000, 1, true),
        ];
        let head = q.add(&ring, &bufs, "req-1").unwrap();
        assert_eq!(q.num_free(), 5);
        assert!(
            q.kick_prepare(&ring).unwrap(),
            "avail_event 0 asks for the first buffer"
        );
        let (h, descs) = rig.device_pop().unwrap();
        assert_eq!(h, head);
        assert_eq!(
            descs,
            vec![(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, true)]
        );
        assert!(q.pop_used(&rig.ring()).unwrap().is_none());
        rig.device_complete(head, 513);
        assert_eq!(q.pop_used(&rig.ring()).unwrap(), Some(("req-1", 513)));
        assert_eq!(q.num_free(), 8);
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn indirect_chains_use_one_ring_descriptor() {
        let rig = Rig::new(4, ALL);
        let mut q = DriverQueue::new(rig.layout, ALL);
        let table_addr = 0x80000;
        let bufs: Vec<DriverBuf> = (0..4).map(|i| buf(0x1000 * (i + 1), 4096, i > 0)).collect();
        let head = {
            let ring = rig.ring();
            let table = rig.mem_at(table_addr, 4096);
            q.add_indirect(&ring, table_addr, &table, &bufs, 7u32)
                .unwrap()
        };
        assert_eq!(q.num_free(), 3);
        let (h, descs) = rig.device_pop().unwrap();
        assert_eq!(h, head);
        assert_eq!(descs.len(), 4);
        assert_eq!(descs[1], (0x2000, 4096, true));
        rig.device_complete(head, 3 * 4096);
        assert_eq!(q.pop_used(&rig.ring()).unwrap(), Some((7, 3 * 4096)));
        let mut no = DriverQueue::<u32>::new(rig.layout, bit(transport::VERSION_1));
        let ring = rig.ring();
        let table = rig.mem_at(table_addr, 4096);
        assert!(matches!(
            no.add_indirect(&ring, table_addr, &table, &bufs, 1),
            Err(DriverQueueError::Indirect(_))
        ));
    }

    #[test]
    fn out_of_order_completion_keeps_the_free_list_sound() {
        // xorshift: deterministic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let rig = Rig::new(16, ALL);
        let mut q = DriverQueue::new(rig.layout, ALL);
        let mut pending: Vec<(u16, u64)> = Vec::new();
        let mut next_token = 0u64;
        let mut completed = 0;
        for _ in 0..5000 {
            if rnd(2) == 0 {
                let n = 1 + rnd(4) as usize;
                let bufs: Vec<DriverBuf> = (0..n)
                    .map(|i| buf(next_token << 12 | i as u64, 8, i + 1 == n))
                    .collect();
                match q.add(&rig.ring(), &bufs, next_token) {
                    Ok(_) => {
                        let (head, descs) = rig.device_pop().unwrap();
                        assert_eq!(descs.len(), n);
                        assert_eq!(descs[0].0 >> 12, next_token);
                        pending.push((head, next_token));
                        next_token += 1;
                    }
                    Err(DriverQueueError::Full { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            } else if !pending.is_empty() {
                let (head, token) = pending.swap_remove(rnd(pending.len() as u64) as usize);
                rig.device_complete(head, 8);
                assert_eq!(q.pop_used(&rig.ring()).unwrap(), Some((token, 8)));
                completed += 1;
            }
            assert_eq!(usize::from(q.num_free()) + pending_descs(&q), 16);
        }
        assert!(completed > 1000);
    }

    fn pending_descs<T>(q: &DriverQueue<T>) -> usize {
        q.in_flight
            .iter()
            .flatten()
            .map(|s| usize::from(s.descriptors))
            .sum()
    }

    #[test]
    fn a_lying_device_is_caught() {
        let rig = Rig::new(8, ALL);
        let layout = rig.layout;
        let ring = rig.ring();
        let mut q = DriverQueue::new(layout, ALL);
        q.add(&ring, &[buf(0x1000, 16, true)], ()).unwrap();
        let put_used = |slot: u16, id: u32, len: u32, idx: u16| {
            ring.write(layout.used_ring(slot), &UsedElem { id, len }.to_bytes())
                .unwrap();
            ring.store_u16(layout.used_idx(), idx, Ordering::Release)
                .unwrap();
        };
        // A head that is not in flight.
        put_used(0, 5, 0, 1);
        assert!(matches!(
            q.pop_used(&ring),
            Err(DriverQueueError::BogusHead { head: 5 })
        ));
        // A head out of range.
        put_used(1, 1000, 0, 2);
        assert!(matches!(
            q.pop_used(&ring),
            Err(DriverQueueError::BogusHead { head: 1000 })
        ));
        // More bytes than the chain can hold: refused, and the chain stays in flight for the
        // drain that follows a broken device.
        put_used(2, 0, 17, 3);
        assert!(matches!(
            q.pop_used(&ring),
            Err(DriverQueueError::BogusLength {
                len: 17,
                max: 16,
                ..
            })
        ));
        assert_eq!((q.num_free(), q.in_flight()), (7, 1));
        // used.idx racing ahead.
        ring.store_u16(layout.used_idx(), 3 + 9, Ordering::Release)
            .unwrap();
        assert!(matches!(
            q.pop_used(&ring),
            Err(DriverQueueError::UsedIndexJump { ahead: 9, .. })
        ));
    }

    /// Fuzz finding (`driver_queue`): a completion longer than the chain's writable buffers
    /// dropped the chain's token, so the request it stood for was neither completed nor
    /// returned by `drain_in_flight` after the device was failed.
    #[test]
    fn test_regression_bogus_length_keeps_the_token() {
        let rig = Rig::new(4, ALL);
        let layout = rig.layout;
        let ring = rig.ring();
        let mut q = DriverQueue::new(layout, ALL);
        let head = q.add(&ring, &[buf(0x1000, 16, true)], "req").unwrap();
        ring.write(
            layout.used_ring(0),
            &UsedElem {
                id: u32::from(head),
                len: 17,
            }
            .to_bytes(),
        )
        .unwrap();
        ring.store_u16(layout.used_idx(), 1, Ordering::Release)
            .unwrap();
        assert!(matches!(
            q.pop_used(&ring),
            Err(DriverQueueError::BogusLength { .. })
        ));
        assert_eq!(q.drain_in_flight(), vec!["req"]);
        assert_eq!((q.num_free(), q.in_flight()), (4, 0));
    }

    #[test]
    fn bad_chains_and_full_queues_are_refused() {
        let rig = Rig::new(2, ALL);
        let ring = rig.ring();
        let mut q = DriverQueue::new(rig.layout, ALL);
        assert!(matches!(
            q.add(&ring, &[], ()),
            Err(DriverQueueError::InvalidChain(_))
        ));
        let wr = [buf(1, 1, true), buf(2, 1, false)];
        assert!(matches!(
            q.add(&ring, &wr, ()),
            Err(DriverQueueError::InvalidChain(_))
        ));
        let big = [buf(1, u32::MAX, false), buf(2, 1, true)];
        assert!(matches!(
            q.add(&ring, &big, ()),
            Err(DriverQueueError::InvalidChain(_))
        ));
        q.add(&ring, &[buf(1, 1, false)], ()).unwrap();
        q.add(&ring, &[buf(1, 1, false)], ()).unwrap();
        assert!(matches!(
            q.add(&ring, &[buf(1, 1, false)], ()),
            Err(DriverQueueError::Full { needed: 1, free: 0 })
        ));
        assert_eq!(q.drain_in_flight().len(), 2);
        assert_eq!(q.num_free(), 2);
    }

    #[test]
    fn event_idx_suppresses_kicks_and_callbacks() {
        let rig = Rig::new(8, ALL);
        let mut q = DriverQueue::new(rig.layout, ALL);
        let ring = rig.ring();
        q.add(&ring, &[buf(1, 1, true)], 1).unwrap();
        assert!(q.kick_prepare(&ring).unwrap());
        // The device processes and re-enables notifications at avail index 1.
        let (h, _) = rig.device_pop().unwrap();
        assert!(
            !rig.device
                .borrow_mut()
                .enable_notification(&rig.mem)
                .unwrap()
        );
        q.add(&ring, &[buf(1, 1, true)], 2).unwrap();
        assert!(q.kick_prepare(&ring).unwrap(), "avail_event 1 passed");
        q.add(&ring, &[buf(1, 1, true)], 3).unwrap();
        assert!(
            !q.kick_prepare(&ring).unwrap(),
            "the device has not asked again"
        );
        // Completions: the driver asks to hear about the first one only.
        assert!(!q.enable_callbacks(&ring).unwrap());
        assert!(rig.device_complete(h, 1));
        assert!(
            q.enable_callbacks(&ring).unwrap(),
            "a completion is waiting"
        );
        assert_eq!(q.pop_used(&ring).unwrap(), Some((1, 1)));
    }
}
