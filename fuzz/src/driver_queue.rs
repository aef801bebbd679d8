//! Target `driver_queue`: the frontend's [`DriverQueue`] against a used ring that a hostile
//! device writes.
//!
//! The script adds chains (direct and indirect) and lets the "device" complete them honestly,
//! with lies (heads never in flight, heads completed twice, lengths beyond the chain's
//! writable bytes), move `used.idx` anywhere, or scribble raw bytes over the used ring.
//! Checked after every step:
//! - nothing panics;
//! - `pop_used` returns only tokens in flight, each with the head the device named and a
//!   length within the chain's writable bytes; everything else is an error;
//! - every token comes back exactly once, through `pop_used` or `drain_in_flight`: a lying
//!   device never makes a request vanish;
//! - the free-descriptor count is exactly the queue size minus the descriptors in flight, and
//!   what `add` publishes (descriptors, indirect table, available ring) is the chain it was
//!   given.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use xenvirtio_frontend::virtqueue::{DriverBuf, DriverQueue, DriverQueueError};
use xenvirtio_virtio::features::{bit, transport};
use xenvirtio_virtio::split::{
    Descriptor, RingLayout, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use xenvirtio_xen::mem::{PageBuf, SharedMem};

use crate::input::{Reader, Structured, Writer};

/// Largest queue size built.
const MAX_SIZE_LOG2: u8 = 7;
/// Largest indirect table, in entries.
const MAX_TABLE: usize = 16;

/// One step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverOp {
    /// `add` of buffers (length, device-writable).
    Add(Vec<(u16, bool)>),
    /// `add_indirect` of buffers.
    AddIndirect(Vec<(u16, bool)>),
    /// The device completes a chain: a head in flight (`pick`) or `raw_id`, with `len` bytes
    /// (`honest`: at most the chain's writable bytes).
    Used {
        /// Which chain in flight.
        pick: u8,
        /// Name `raw_id` instead.
        raw: bool,
        /// Any id.
        raw_id: u32,
        /// Claimed length.
        len: u32,
        /// Clamp `len` to the chain's writable bytes.
        honest: bool,
    },
    /// The device sets `used.idx`.
    UsedIdx(u16),
    /// Raw bytes over the used ring (offset from its start).
    Bytes(u16, Vec<u8>),
    /// `pop_used`.
    Pop,
    /// `enable_callbacks`.
    Enable,
    /// `disable_callbacks`.
    Disable,
    /// `kick_prepare`.
    Kick,
    /// `drain_in_flight` (the device stopped).
    Drain,
}

/// One fuzz input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInput {
    /// The queue size is `1 << (size_log2 % 8)`.
    pub size_log2: u8,
    /// Bit 0: `RING_EVENT_IDX`; bit 1: `RING_INDIRECT_DESC`.
    pub features: u8,
    /// The script.
    pub ops: Vec<DriverOp>,
}

fn read_bufs(r: &mut Reader<'_>) -> Vec<(u16, bool)> {
    r.list(MAX_TABLE, |r| (r.u16(), r.bool()))
}

fn write_bufs(w: &mut Writer, bufs: &[(u16, bool)]) {
    w.list(bufs, MAX_TABLE, |w, (len, writable)| {
        w.u16(*len);
        w.bool(*writable);
    });
}

impl Structured for DriverInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            size_log2: r.u8(),
            features: r.u8(),
            ops: r.list(64, |r| match r.choice(10) {
                0 => DriverOp::Add(read_bufs(r)),
                1 => DriverOp::AddIndirect(read_bufs(r)),
                2 => DriverOp::Used {
                    pick: r.u8(),
                    raw: r.bool(),
                    raw_id: r.u32(),
                    len: r.u32(),
                    honest: r.bool(),
                },
                3 => DriverOp::UsedIdx(r.u16()),
                4 => DriverOp::Bytes(r.u16(), r.bytes(32)),
                5 => DriverOp::Pop,
                6 => DriverOp::Enable,
                7 => DriverOp::Disable,
                8 => DriverOp::Kick,
                _ => DriverOp::Drain,
            }),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u8(self.size_log2);
        w.u8(self.features);
        w.list(&self.ops, 64, |w, op| match op {
            DriverOp::Add(b) => {
                w.choice(0, 10);
                write_bufs(w, b);
            }
            DriverOp::AddIndirect(b) => {
                w.choice(1, 10);
                write_bufs(w, b);
            }
            DriverOp::Used {
                pick,
                raw,
                raw_id,
                len,
                honest,
            } => {
                w.choice(2, 10);
                w.u8(*pick);
                w.bool(*raw);
                w.u32(*raw_id);
                w.u32(*len);
                w.bool(*honest);
            }
            DriverOp::UsedIdx(v) => {
                w.choice(3, 10);
                w.u16(*v);
            }
            DriverOp::Bytes(off, b) => {
                w.choice(4, 10);
                w.u16(*off);
                w.bytes(b, 32);
            }
            DriverOp::Pop => w.choice(5, 10),
            DriverOp::Enable => w.choice(6, 10),
            DriverOp::Disable => w.choice(7, 10),
            DriverOp::Kick => w.choice(8, 10),
            DriverOp::Drain => w.choice(9, 10),
        });
    }
}

crate::structured_input!(DriverInput);

/// The model's record of a chain in flight.
#[derive(Debug, Clone, Copy)]
struct Flight {
    token: u64,
    descriptors: u16,
    writable_len: u32,
}

fn le16(ring: &SharedMem<'_>, at: usize) -> u16 {
    ring.load_u16(at, Ordering::Acquire).expect("aligned")
}

fn buf_addr(token: u64, k: usize) -> u64 {
    0x1_0000_0000 + token * 0x10_0000 + k as u64 * 0x1000
}

/// Runs one input.
pub fn run(input: &DriverInput) {
    let size = 1u16 << (input.size_log2 % (MAX_SIZE_LOG2 + 1));
    let mut features = bit(transport::VERSION_1);
    if input.features & 1 != 0 {
        features |= bit(transport::RING_EVENT_IDX);
    }
    let indirect = input.features & 2 != 0;
    if indirect {
        features |= bit(transport::RING_INDIRECT_DESC);
    }
    let layout = RingLayout::new(u32::from(size), 1 << MAX_SIZE_LOG2).expect("a power of two");
    let ring_buf = PageBuf::new(layout.pages());
    let ring = ring_buf
        .mem()
        .slice(0, layout.pages() * 4096)
        .expect("the area");
    let tables_buf = PageBuf::new((usize::from(size) * MAX_TABLE * 16).div_ceil(4096));
    let tables = tables_buf.mem();
    let mut q: DriverQueue<u64> = DriverQueue::new(layout, features);

    let mut in_flight: BTreeMap<u16, Flight> = BTreeMap::new();
    let mut added: BTreeSet<u64> = BTreeSet::new();
    let mut returned: BTreeSet<u64> = BTreeSet::new();
    let mut next_token = 0u64;
    let mut last_used = 0u16;

    let in_flight_descs =
        |m: &BTreeMap<u16, Flight>| -> u32 { m.values().map(|f| u32::from(f.descriptors)).sum() };

    for op in &input.ops {
        match op {
            DriverOp::Add(spec) | DriverOp::AddIndirect(spec) => {
                let is_indirect = matches!(op, DriverOp::AddIndirect(_));
                let token = next_token;
                next_token += 1;
                let bufs: Vec<DriverBuf> = spec
                    .iter()
                    .enumerate()
                    .map(|(k, &(len, writable))| DriverBuf {
                        addr: buf_addr(token, k),
                        len: u32::from(len),
                        writable,
                    })
                    .collect();
                let free_before = q.num_free();
                let avail_before = le16(&ring, layout.avail_idx());
                // The table slot of the head the queue is about to use is not known yet: every
                // head has its own slot, so use the free-list head the model cannot see; a
                // slot per token (wrapping) is as good, since the memory is the driver's.
                let slot = (token as usize % usize::from(size)) * MAX_TABLE * 16;
                let table = tables.slice(slot, MAX_TABLE * 16).expect("a table slot");
                let table_addr = 0x8000_0000 + slot as u64;
                let result = if is_indirect {
                    q.add_indirect(&ring, table_addr, &table, &bufs, token)
                } else {
                    q.add(&ring, &bufs, token)
                };
                let ordered = spec.windows(2).all(|p| !p[0].1 || p[1].1);
                let needed = if is_indirect { 1 } else { spec.len() };
                let valid = !spec.is_empty()
                    && ordered
                    && (!is_indirect || indirect)
                    && spec.len() <= usize::from(size);
                match result {
                    Ok(head) => {
                        assert!(valid, "an invalid chain was accepted: {spec:?}");
                        assert!(head < size);
                        assert!(
                            !in_flight.contains_key(&head),
                            "head {head} reused in flight"
                        );
                        let writable_len: u32 =
                            spec.iter().filter(|b| b.1).map(|b| u32::from(b.0)).sum();
                        in_flight.insert(
                            head,
                            Flight {
                                token,
                                descriptors: needed as u16,
                                writable_len,
                            },
                        );
                        added.insert(token);
                        assert_eq!(usize::from(free_before) - needed, usize::from(q.num_free()));
                        check_published(
                            &ring,
                            layout,
                            head,
                            avail_before,
                            &bufs,
                            is_indirect.then_some((&table, table_addr)),
                        );
                    }
                    Err(DriverQueueError::Full { .. }) => {
                        assert!(
                            valid && needed > usize::from(free_before),
                            "Full with {free_before} free"
                        );
                    }
                    Err(e) => assert!(!valid, "a valid chain was refused: {e}"),
                }
            }
            DriverOp::Used {
                pick,
                raw,
                raw_id,
                len,
                honest,
            } => {
                let heads: Vec<&u16> = in_flight.keys().collect();
                let (id, max) = if *raw || heads.is_empty() {
                    (*raw_id, u32::MAX)
                } else {
                    let h = *heads[usize::from(*pick) % heads.len()];
                    (u32::from(h), in_flight[&h].writable_len)
                };
                let len = if *honest && max > 0 {
                    len % (max.saturating_add(1))
                } else if *honest {
                    0
                } else {
                    *len
                };
                let idx = le16(&ring, layout.used_idx());
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&id.to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                ring.write(layout.used_ring(idx), &elem)
                    .expect("the used ring");
                ring.store_u16(layout.used_idx(), idx.wrapping_add(1), Ordering::Release)
                    .expect("aligned");
            }
            DriverOp::UsedIdx(v) => ring
                .store_u16(layout.used_idx(), *v, Ordering::Release)
                .expect("aligned"),
            DriverOp::Bytes(off, bytes) => {
                let used_len = layout.total_len() - layout.used_offset();
                let at = layout.used_offset() + usize::from(*off) % used_len;
                let n = bytes.len().min(layout.total_len() - at);
                ring.write(at, &bytes[..n]).expect("inside the used ring");
            }
            DriverOp::Pop => {
                let used_idx = le16(&ring, layout.used_idx());
                let ahead = used_idx.wrapping_sub(last_used);
                let mut raw = [0u8; 8];
                ring.read(layout.used_ring(last_used), &mut raw)
                    .expect("used ring");
                let id = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(raw[4..].try_into().expect("4 bytes"));
                let result = q.pop_used(&ring);
                if ahead == 0 {
                    assert!(matches!(result, Ok(None)), "{result:?} with nothing used");
                    continue;
                }
                if ahead > size {
                    assert!(
                        matches!(result, Err(DriverQueueError::UsedIndexJump { .. })),
                        "{result:?}"
                    );
                    continue;
                }
                last_used = last_used.wrapping_add(1);
                let flight = u16::try_from(id)
                    .ok()
                    .and_then(|h| in_flight.get(&h).copied());
                match (flight, result) {
                    (None, Err(DriverQueueError::BogusHead { head })) => assert_eq!(head, id),
                    (Some(f), Ok(Some((token, got_len)))) => {
                        assert!(
                            len <= f.writable_len,
                            "length {len} over {}",
                            f.writable_len
                        );
                        assert_eq!(
                            (token, got_len),
                            (f.token, len),
                            "the completion of head {id}"
                        );
                        in_flight.remove(&(id as u16));
                        assert!(returned.insert(token), "token {token} returned twice");
                    }
                    (Some(f), Err(DriverQueueError::BogusLength { .. })) => {
                        assert!(len > f.writable_len);
                        // The chain stays in flight: its token comes back through a drain.
                    }
                    (f, r) => {
                        panic!("pop_used gave {r:?} for id {id} len {len} (in flight: {f:?})")
                    }
                }
            }
            DriverOp::Enable => {
                let got = q.enable_callbacks(&ring).expect("a writable ring");
                assert_eq!(got, le16(&ring, layout.used_idx()) != last_used);
            }
            DriverOp::Disable => q.disable_callbacks(&ring).expect("a writable ring"),
            DriverOp::Kick => {
                q.kick_prepare(&ring).expect("a readable ring");
            }
            DriverOp::Drain => {
                let tokens: BTreeSet<u64> = q.drain_in_flight().into_iter().collect();
                let want: BTreeSet<u64> = in_flight.values().map(|f| f.token).collect();
                assert_eq!(tokens, want, "drain returns exactly the chains in flight");
                for t in tokens {
                    assert!(returned.insert(t), "token {t} returned twice");
                }
                in_flight.clear();
            }
        }
        assert_eq!(
            q.in_flight(),
            in_flight.len(),
            "chains in flight after {op:?}"
        );
        assert_eq!(
            u32::from(q.num_free()) + in_flight_descs(&in_flight),
            u32::from(size),
            "free descriptors after {op:?}"
        );
    }
    // Every token comes back exactly once.
    for t in q.drain_in_flight() {
        assert!(returned.insert(t), "token {t} returned twice");
    }
    assert_eq!(returned, added, "tokens lost");
    assert_eq!(q.num_free(), size);
}

/// What `add` published: the available entry and the chain (or its table).
fn check_published(
    ring: &SharedMem<'_>,
    layout: RingLayout,
    head: u16,
    avail_before: u16,
    bufs: &[DriverBuf],
    table: Option<(&SharedMem<'_>, u64)>,
) {
    assert_eq!(le16(ring, layout.avail_idx()), avail_before.wrapping_add(1));
    let entry = u16::from_le_bytes(
        ring.read_array(layout.avail_ring(avail_before))
            .expect("ring"),
    );
    assert_eq!(entry, head);
    let read = |mem: &SharedMem<'_>, at: usize| {
        Descriptor::from_bytes(&mem.read_array(at).expect("descriptor"))
    };
    let d = read(ring, layout.desc(head));
    let descs: Vec<Descriptor> = match table {
        Some((t, addr)) => {
            assert_eq!(
                (d.addr, d.len, d.flags),
                (addr, 16 * bufs.len() as u32, VIRTQ_DESC_F_INDIRECT)
            );
            (0..bufs.len()).map(|k| read(t, 16 * k)).collect()
        }
        None => {
            let mut out = vec![d];
            while out.last().is_some_and(|d| d.flags & VIRTQ_DESC_F_NEXT != 0)
                && out.len() <= bufs.len()
            {
                let next = out.last().expect("non-empty").next;
                out.push(read(ring, layout.desc(next)));
            }
            out
        }
    };
    assert_eq!(descs.len(), bufs.len(), "published chain length");
    for (k, (d, b)) in descs.iter().zip(bufs).enumerate() {
        let last = k + 1 == bufs.len();
        assert_eq!((d.addr, d.len), (b.addr, b.len));
        assert_eq!(d.flags & VIRTQ_DESC_F_WRITE != 0, b.writable);
        assert_eq!(d.flags & VIRTQ_DESC_F_NEXT == 0, last);
        if table.is_some() && !last {
            assert_eq!(usize::from(d.next), k + 1);
        }
    }
}

/// Seeds: the cases of the unit tests in `frontend/src/virtqueue.rs`.
pub fn seeds() -> Vec<(&'static str, DriverInput)> {
    let used = |pick, len, honest| DriverOp::Used {
        pick,
        raw: false,
        raw_id: 0,
        len,
        honest,
    };
    let raw_used = |id, len| DriverOp::Used {
        pick: 0,
        raw: true,
        raw_id: id,
        len,
        honest: false,
    };
    vec![
        (
            "add_and_complete",
            DriverInput {
                size_log2: 3,
                features: 3,
                ops: vec![
                    DriverOp::Add(vec![(16, false), (512, true), (1, true)]),
                    DriverOp::Kick,
                    DriverOp::Pop,
                    used(0, 513, true),
                    DriverOp::Pop,
                ],
            },
        ),
        (
            "indirect",
            DriverInput {
                size_log2: 2,
                features: 3,
                ops: vec![
                    DriverOp::AddIndirect(vec![
                        (16, false),
                        (4096, true),
                        (4096, true),
                        (4096, true),
                    ]),
                    used(0, 3 * 4096, true),
                    DriverOp::Pop,
                ],
            },
        ),
        (
            "hostile_device",
            DriverInput {
                size_log2: 3,
                features: 1,
                ops: vec![
                    DriverOp::Add(vec![(16, true)]),
                    raw_used(5, 0),
                    DriverOp::Pop,
                    raw_used(1000, 0),
                    DriverOp::Pop,
                    used(0, 17, false),
                    DriverOp::Pop,
                    DriverOp::UsedIdx(12),
                    DriverOp::Pop,
                    DriverOp::Drain,
                ],
            },
        ),
        (
            "full_ring_and_callbacks",
            DriverInput {
                size_log2: 1,
                features: 0,
                ops: vec![
                    DriverOp::Add(vec![(1, false), (1, true)]),
                    DriverOp::Add(vec![(1, true)]),
                    DriverOp::Disable,
                    used(0, 1, true),
                    DriverOp::Enable,
                    DriverOp::Pop,
                    DriverOp::Add(vec![(8, true)]),
                    DriverOp::Kick,
                ],
            },
        ),
    ]
}
