//! Differential test: the hand-written device queue against rust-vmm's `virtio-queue`.
//!
//! Both read the same ring, laid out as docs/PROTOCOL.md says, in the same memory. For chains
//! that both accept (valid by virtio 1.2), the descriptors and the notification decisions must
//! be identical. Where `virtio-queue` is more lenient (it does not cap a chain across an
//! indirect table at the queue size, or refuse INDIRECT|NEXT), ours must refuse, never accept
//! something different.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use xenvirtio_virtio::device_queue::{ChainDescriptor, DeviceQueue};
use xenvirtio_virtio::features::{bit, transport};
use xenvirtio_virtio::split::{
    Descriptor, RingLayout, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use xenvirtio_xen::mem::SharedMem;

const RING_BASE: u64 = 0x10000;
const TABLES: u64 = 0x40000;
const MEM_SIZE: usize = 0x100000;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Setup {
    mem: GuestMemoryMmap,
    layout: RingLayout,
}

impl Setup {
    fn new(size: u32) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Self {
            mem,
            layout: RingLayout::new(size, 1024).unwrap(),
        }
    }

    fn ring(&self) -> SharedMem<'_> {
        let host = self.mem.get_host_address(GuestAddress(RING_BASE)).unwrap();
        // SAFETY: the region is MEM_SIZE bytes of anonymous memory owned by `self.mem` for the
        // lifetime of `self`, and RING_BASE + the ring area fits inside it.
        unsafe {
            SharedMem::from_raw_parts(
                std::ptr::NonNull::new(host).unwrap(),
                self.layout.pages() * 4096,
                true,
            )
        }
    }

    fn rust_vmm_queue(&self, features: u64) -> Queue {
        let mut q = Queue::new(self.layout.size()).unwrap();
        q.set_size(self.layout.size());
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(RING_BASE + self.layout.desc_offset() as u64);
        q.set_desc_table_address(l, h);
        let (l, h) = split(RING_BASE + self.layout.avail_offset() as u64);
        q.set_avail_ring_address(l, h);
        let (l, h) = split(RING_BASE + self.layout.used_offset() as u64);
        q.set_used_ring_address(l, h);
        q.set_event_idx(features & bit(transport::RING_EVENT_IDX) != 0);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    fn write_desc(&self, table: u64, i: u16, d: Descriptor) {
        self.mem
            .write_slice(&d.to_bytes(), GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    fn fetch(&self, addr: u64, len: u32) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .map_err(|e| e.to_string())?;
        Ok(v)
    }
}

/// Writes a random chain (possibly through an indirect table) starting at a random head;
/// returns the head. With `valid == false`, one field of one descriptor may be corrupted.
fn random_chain(s: &Setup, rng: &mut Rng, valid: bool, serial: u64) -> u16 {
    let size = s.layout.size();
    let n = 1 + rng.below(u64::from(size.min(6))) as u16;
    let mut order: Vec<u16> = (0..size).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let use_indirect = rng.below(3) == 0;
    let (table, indices): (u64, Vec<u16>) = if use_indirect {
        (TABLES + serial % 64 * 0x1000, (0..n).collect())
    } else {
        (RING_BASE, order[..n as usize].to_vec())
    };
    let writable_from = rng.below(u64::from(n) + 1) as u16;
    for k in 0..n {
        let mut flags = if k >= writable_from {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        };
        if k + 1 < n {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        let next = if k + 1 < n {
            indices[k as usize + 1]
        } else {
            0
        };
        let mut d = Descriptor {
            addr: 0x1000 * (1 + rng.below(200)),
            len: 1 + rng.below(8192) as u32,
            flags,
            next,
        };
        if !valid {
            match rng.below(5) {
                0 => d.next = rng.below(u64::from(size) * 2) as u16,
                1 => d.flags ^= 1 << rng.below(3),
                2 => d.len = u32::MAX - rng.below(4) as u32,
                3 => d.flags |= VIRTQ_DESC_F_NEXT,
                _ => {}
            }
        }
        s.write_desc(table, indices[k as usize], d);
    }
    if use_indirect {
        let head = order[0];
        let mut flags = VIRTQ_DESC_F_INDIRECT;
        if !valid && rng.below(4) == 0 {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        let d = Descriptor {
            addr: table,
            len: 16 * u32::from(n),
            flags,
            next: 0,
        };
        s.write_desc(RING_BASE, head, d);
        head
    } else {
        indices[0]
    }
}

fn offer(s: &Setup, avail: &mut u16, head: u16) {
    let ring = s.ring();
    ring.write(s.layout.avail_ring(*avail), &head.to_le_bytes())
        .unwrap();
    *avail = avail.wrapping_add(1);
    ring.store_u16(s.layout.avail_idx(), *avail, Ordering::Release)
        .unwrap();
}

fn run(seed: u64, size: u32, features: u64, valid: bool) -> (usize, usize) {
    let s = Setup::new(size);
    let mut rng = Rng(seed);
    let mut ours = DeviceQueue::new(s.layout, features);
    let mut theirs = s.rust_vmm_queue(features);
    let mut avail = 0u16;
    let (mut compared, mut refused) = (0, 0);
    for serial in 0..200u64 {
        // The driver's used_event moves around.
        let used_event = rng.below(u64::from(u16::MAX)) as u16;
        s.ring()
            .store_u16(s.layout.used_event(), used_event, Ordering::Release)
            .unwrap();
        let head = random_chain(&s, &mut rng, valid, serial);
        offer(&s, &mut avail, head);
        let ring = s.ring();
        let mine = ours.pop_chain(&ring, &mut |a, l| s.fetch(a, l));
        let other = theirs.pop_descriptor_chain(&s.mem).unwrap();
        assert_eq!(other.head_index(), head);
        let other: Vec<ChainDescriptor> = other
            .map(|d| ChainDescriptor {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        match mine {
            Ok(Some(chain)) => {
                assert_eq!(chain.head, head);
                assert_eq!(chain.descriptors, other, "seed {seed} serial {serial}");
                compared += 1;
            }
            Ok(None) => panic!("a chain was available"),
            Err(e) => {
                assert!(
                    !valid,
                    "a valid chain was refused (seed {seed} serial {serial}): {e}"
                );
                refused += 1;
                // A real backend stops the device here; start both queues afresh.
                ours = DeviceQueue::new(s.layout, features);
                theirs = s.rust_vmm_queue(features);
                ring.store_u16(s.layout.avail_idx(), 0, Ordering::Release)
                    .unwrap();
                ring.store_u16(s.layout.used_idx(), 0, Ordering::Release)
                    .unwrap();
                avail = 0;
                continue;
            }
        }
        let written = rng.below(4096) as u32;
        ours.add_used(&ring, head, written).unwrap();
        theirs.add_used(&s.mem, head, written).unwrap();
        assert_eq!(
            ours.needs_notification(&ring).unwrap(),
            theirs.needs_notification(&s.mem).unwrap(),
            "notification decision differs (seed {seed} serial {serial})"
        );
        if rng.below(4) == 0 {
            assert_eq!(
                ours.enable_notification(&ring).unwrap(),
                theirs.enable_notification(&s.mem).unwrap()
            );
        }
    }
    (compared, refused)
}

const ALL: u64 =
    bit(transport::VERSION_1) | bit(transport::RING_EVENT_IDX) | bit(transport::RING_INDIRECT_DESC);

#[test]
fn valid_chains_match_rust_vmm_exactly() {
    let no_event_idx = bit(transport::VERSION_1) | bit(transport::RING_INDIRECT_DESC);
    let mut total = 0;
    for seed in 1..=40u64 {
        for size in [8u32, 64, 256] {
            for f in [ALL, no_event_idx] {
                let (compared, refused) = run(seed * 7919 + u64::from(size), size, f, true);
                assert_eq!(refused, 0);
                total += compared;
            }
        }
    }
    assert_eq!(total, 40 * 3 * 2 * 200);
}

#[test]
fn corrupted_chains_are_refused_or_match_rust_vmm() {
    let (mut compared, mut refused) = (0, 0);
    for seed in 1..=60u64 {
        let (c, r) = run(seed * 104_729, 16, ALL, false);
        compared += c;
        refused += r;
    }
    // Both outcomes must occur, or the corruption generator is broken.
    assert!(
        compared > 1000 && refused > 1000,
        "compared {compared}, refused {refused}"
    );
}
